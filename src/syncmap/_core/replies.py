"""The Lua scripts' replies as named types: each script's reply is parsed here, in one place,
and read by name (the layouts are documented in each ``lua/*.lua`` header, which names the
type that parses it).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Final, NamedTuple

__all__ = [
    "PTTL_ABSENT",
    "PTTL_NOT_HELD",
    "AcquireReply",
    "DeleteManyReply",
    "GetManyReply",
    "GetReply",
    "LoadReply",
    "LoadState",
    "ReleaseStatus",
    "SetManyReply",
    "VersionReply",
    "WriteReply",
    "WriteStatus",
    "text",
]

PTTL_ABSENT: Final = -2
"""A record's remaining life when it is absent (as ``PTTL`` answers); -1 means no expiry."""
PTTL_NOT_HELD: Final = -3
"""``lock_pttl``'s answer when the lock is not held with the value."""


def text(value: Any) -> str | None:
    """An epoch (or other text) from a reply: ``None`` for a missing one (Lua's false)."""
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- map scripts --------------------------------------------------------------------------


class WriteStatus(IntEnum):
    """``map_write``'s status."""

    WRITTEN = 1
    CONDITION_FALSE = 0  # nothing written
    GUARD_REJECTED = -1
    NOT_A_COUNTER = -2  # incr on a value that is not an integer
    FOREIGN = -3  # foreign data under the record key


class WriteReply(NamedTuple):
    """``map_write``: ``seq`` is the write's seq when written, else the map's current seq;
    ``record`` the record before the call (del/setnx/cas/casv) or the new one (incr/incrx/
    touch); ``pttl`` the record's remaining life in ms after the call."""

    epoch: str | None
    seq: int
    status: int  # a WriteStatus value
    record: bytes | None
    pttl: int

    @classmethod
    def parse(cls, reply: Any, px: int) -> WriteReply:
        """``px``: the expiry the call sent. A set or setnx that wrote answers its version
        alone, ``b"epoch seq"`` (its record lives ``px`` ms, or forever for 0); a del that
        wrote, its version, a newline and the record it removed (empty: foreign data)."""
        if isinstance(reply, bytes):
            version, deleted, record = reply.partition(b"\n")
            epoch, seq = version.rsplit(b" ", 1)
            if deleted:
                return cls(epoch.decode(), int(seq), WriteStatus.WRITTEN, record or None,
                           PTTL_ABSENT)  # fmt: skip
            return cls(epoch.decode(), int(seq), WriteStatus.WRITTEN, None, px or -1)
        return cls(text(reply[0]), int(reply[1]), int(reply[2]), reply[3], int(reply[4]))


class GetReply(NamedTuple):
    """``map_get``: one entry's record read with the map's version."""

    epoch: str | None
    seq: Any
    record: bytes | None
    pttl: Any
    foreign: bool  # something that is not a string sits under the record key

    @classmethod
    def parse(cls, reply: Any) -> GetReply:
        if isinstance(reply, bytes):  # a record is there: b"epoch seq pttl\n" and the record
            head, _, record = reply.partition(b"\n")
            epoch, seq, pttl = head.split(b" ")
            return cls(epoch.decode() or None, int(seq), record, int(pttl), False)
        return cls(text(reply[0]), reply[1], reply[2], reply[3], bool(reply[4]))


class GetManyReply(NamedTuple):
    """``map_get_many``: one item per entry in ``records``, ``pttls`` and ``foreign``."""

    epoch: str | None
    seq: Any
    records: list[bytes | None]
    pttls: list[Any]
    foreign: list[Any]

    @classmethod
    def parse(cls, reply: Any) -> GetManyReply:
        return cls(text(reply[0]), reply[1], reply[2], reply[3], reply[4])


class VersionReply(NamedTuple):
    """``map_version``: the map's version and the head of one entry's record."""

    epoch: str | None
    seq: Any
    head: bytes | None
    foreign: bool

    @classmethod
    def parse(cls, reply: Any) -> VersionReply:
        return cls(text(reply[0]), reply[1], reply[2], bool(reply[3]))


class LoadState(IntEnum):
    """``map_load``'s state."""

    LOADING = 0  # another node is loading (pttl: the load lock's remaining life)
    PRESENT = 1  # the entry exists (record, pttl as map_get)
    OURS = 2  # the load lock is ours: run the loader


class LoadReply(NamedTuple):
    """``map_load``: get_or_load's single flight."""

    state: int  # a LoadState value
    epoch: str | None
    seq: Any
    record: bytes | None
    pttl: Any
    foreign: bool

    @classmethod
    def parse(cls, reply: Any) -> LoadReply:
        return cls(int(reply[0]), text(reply[1]), reply[2], reply[3], reply[4], bool(reply[5]))


class SetManyReply(NamedTuple):
    """``map_set_many``: entry i of n has seq ``last_seq - n + i``."""

    epoch: str | None
    last_seq: int
    pttl: int

    @classmethod
    def parse(cls, reply: Any) -> SetManyReply:
        return cls(text(reply[0]), int(reply[1]), int(reply[2]))


class DeleteManyReply(NamedTuple):
    """``map_delete_many``: every entry of the batch is absent as of ``seq``."""

    epoch: str | None
    seq: int
    deleted: int

    @classmethod
    def parse(cls, reply: Any) -> DeleteManyReply:
        return cls(text(reply[0]), int(reply[1]), int(reply[2]))


# ---- lock scripts -------------------------------------------------------------------------


class AcquireReply(NamedTuple):
    """``lock_acquire``: whether this value holds the lock, and its fencing number."""

    got: bool
    fence: Any

    @classmethod
    def parse(cls, reply: Any) -> AcquireReply:
        """The fencing number when held, else ``None`` (the script's false)."""
        return cls(reply is not None, reply)


class ReleaseStatus(IntEnum):
    """``lock_release``'s answer."""

    NOT_HELD = 0  # expired, or taken by another holder
    RELEASED = 1
    ALREADY_RELEASED = 2  # a retried release whose first answer was lost
