"""The coherence state of one SyncMap's local copy: no I/O, every decision in one place.

What it tracks (for the map's one shard; the server numbers every change of the map):

* ``epoch`` / ``applied``: the server epoch and the last change number (seq) whose message was
  applied to the local copy. Messages must arrive as ``applied + 1``; anything else is a *gap*.
* ``synced``: the local copy is known to have seen every change since some base. Only then is
  anything installed in it. ``generation`` moves at every transition, so a fill that started
  under another generation never installs.
* ``verified_at``: the (injected) clock time at which the local copy was last *proven* to
  reflect every write acknowledged before it (probe: PING over the subscriber connection; the
  PONG comes after every message published before; a copy with no base reads the server's
  (epoch, seq) first). Local reads are served only while ``clock() - verified_at <=
  max_staleness``.

Fill protocol (no fill race): before a fetch or a write the caller puts a :class:`Placeholder`
in the local store; a change message for that key only *marks* the placeholder with its seq;
the result is installed only if nothing newer than the result's version was marked on it, the
generation did not move, and the key holds that placeholder or an older entry (concurrent
fills of one key share one placeholder: a write's value replaces an older one that a
concurrent read installed first, so a node reads its own write). Invalidation of an entry
drops it only if its version is older than the message's seq: O(1) per message, never a scan.

All mutations happen under ``mutex`` (injected: a lock for threads, or a null context).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Final, Protocol, overload

from .hooks import Hooks

__all__ = [
    "ABSENT",
    "Change",
    "Coherence",
    "Entry",
    "LocalStore",
    "Placeholder",
    "parse_change",
    "parse_changes",
]

log = logging.getLogger("syncmap.map")

INF: Final = float("inf")


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()
"""The value of an entry that records "this key has no value on the server" (a cached miss)."""


class Entry:
    """A value in the local copy, with the map seq it is known current at."""

    __slots__ = ("value", "version")

    def __init__(self, value: Any, version: int) -> None:
        self.value = value
        self.version = version

    def __repr__(self) -> str:
        return f"Entry({self.value!r}, v{self.version})"


class Placeholder:
    """A reservation for a fetch or write in flight; change messages mark it (``max_seq``).
    Its ``value`` is ``ABSENT``, as a cached miss's: a read that serves only an entry whose
    value is not ``ABSENT`` (the map's hit path) needs no type check."""

    __slots__ = ("generation", "max_seq")
    value: ClassVar[_Absent] = ABSENT

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.max_seq = 0

    def __repr__(self) -> str:
        return f"Placeholder(g{self.generation}, max_seq={self.max_seq})"


UNGUARDED: Final = Placeholder(-1)
"""Returned by :meth:`Coherence.begin_fill` when the fill guard is disabled (tests only)."""


class LocalStore(Protocol):
    """What the coherence state needs of the local store (``syncmap.SafeHashMap`` fits)."""

    @overload
    def get(self, key: str) -> Any: ...
    @overload
    def get(self, key: str, default: Any) -> Any: ...

    def set(self, key: str, value: Any, ttl: float | None = None) -> None: ...

    def replace(self, key: str, expected: Any, value: Any, ttl: float | None = None) -> bool: ...

    def delete_if(self, key: str, predicate: Callable[[Any], object]) -> bool: ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


class Change:
    """One decoded change message: ``SM1 <epoch> <seq> <op> <key>``; op S (set), D (delete),
    C (clear: key is empty); or ``SM1 <epoch> <seq> V <len(key)> <key><payload>``: a set that
    carries the new value's payload (``op`` "S", ``value`` the payload; else ``value`` None)."""

    __slots__ = ("epoch", "key", "op", "seq", "value")

    def __init__(self, epoch: str, seq: int, op: str, key: str, value: bytes | None = None) -> None:
        self.epoch = epoch
        self.seq = seq
        self.op = op
        self.key = key
        self.value = value


MAGIC: Final = b"SM1 "


_BATCH_OPS: Final = {ord("S"): "S", ord("D"): "D", ord("V"): "S"}
_OPS: Final = {b"S": "S", b"D": "D", b"C": "C", b"V": "S"}  # a single change's op, decoded


class MalformedChange(ValueError):
    """A message that claims to be ours (magic prefix) but cannot be decoded."""


def parse_change(data: bytes) -> Change | None:
    """``None`` for a message that is not ours (garbage: log and skip); raises
    :class:`MalformedChange` for one that claims to be ours but is malformed (resync)."""
    if not data.startswith(MAGIC):
        return None
    return _parse_single(data.split(b" ", 4))


def _parse_single(parts: list[bytes]) -> Change:
    """One change from its message split in five at spaces (see :func:`parse_change`)."""
    if len(parts) != 5:
        raise MalformedChange(f"change message with {len(parts)} fields")
    _, epoch, seq, op, key = parts
    kind = _OPS.get(op)
    if kind is None or not seq.isdigit() or not epoch:
        raise MalformedChange("bad seq, op or epoch in change message")
    value = None
    if op == b"V":
        size, _, body = key.partition(b" ")
        if not size.isdigit() or len(body) < int(size):
            raise MalformedChange("bad key length in a change message with a value")
        n = int(size)
        key, value = body[:n], body[n:]
    try:
        return Change(epoch.decode("ascii"), int(seq), kind, key.decode("utf-8"), value)
    except UnicodeDecodeError as exc:
        raise MalformedChange(f"undecodable change message: {exc}") from None


def parse_changes(data: bytes) -> list[Change] | None:
    """The changes of one message, as :func:`parse_change`; a batch message
    ``SM1 <epoch> <seq> B <changes>`` holds consecutive changes from ``seq`` on, each
    ``S<len(key)> <key>``, ``D<len(key)> <key>`` or ``V<len(key)> <key><len(value)> <value>``."""
    if not data.startswith(MAGIC):
        return None
    parts = data.split(b" ", 4)  # (once: the single change's fields, or the batch's)
    if len(parts) < 4 or parts[3] != b"B":
        return [_parse_single(parts)]
    if len(parts) != 5:
        raise MalformedChange("a batch change message without a body")
    _, epoch_b, seq_b, _, body = parts
    if not seq_b.isdigit() or not epoch_b or not body:
        raise MalformedChange("bad seq, epoch or body in a batch change message")
    try:
        epoch = epoch_b.decode("ascii")
        changes = []
        seq, pos, end = int(seq_b), 0, len(body)
        while pos < end:
            kind = body[pos]
            sp = body.index(b" ", pos + 1)
            size = body[pos + 1 : sp]
            pos = sp + 1 + int(size)
            if not size.isdigit() or pos > end:
                raise ValueError("bad key length")
            key = body[sp + 1 : pos].decode("utf-8")
            value = None
            if kind == 86:  # V: a value follows
                sp = body.index(b" ", pos)
                size = body[pos:sp]
                pos = sp + 1 + int(size)
                if not size.isdigit() or pos > end:
                    raise ValueError("bad value length")
                value = body[sp + 1 : pos]
            changes.append(Change(epoch, seq, _BATCH_OPS[kind], key, value))
            seq += 1
    except (KeyError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise MalformedChange(f"undecodable batch change message: {exc}") from None
    return changes


class Coherence:
    """The state machine of one local copy. See the module docstring."""

    SEEN_LIMIT: Final = 10_000

    def __init__(
        self,
        store: LocalStore,
        clock: Callable[[], float],
        mutex: AbstractContextManager[Any],
        max_staleness: float,
        *,
        probe_timeout: float,
        hooks: Hooks[Any],
    ) -> None:
        self.store = store
        self.clock = clock
        self.mutex = mutex
        self.max_staleness = max_staleness
        self.probe_interval = max_staleness / 3
        self.probe_timeout = probe_timeout
        self.hooks = hooks  # (its node's: the tests' sabotage points)
        # decodes a value carried by a change message; None: such values only invalidate
        self.decode: Callable[[bytes], Any] | None = None
        self.watchers: list[Callable[[Change], None]] = []  # told of every change message
        # coherence
        self.epoch: str | None = None
        self.applied = 0
        self.synced = False
        self.generation = 0
        self.fresh_until = -INF  # verified_at + max_staleness: the read path's one compare
        self._verified_at = -INF
        self.subscribed_once = False
        # probe in flight: token, start time, server (epoch, seq) read at start
        self._token_counter = 0
        self.probe_token: str | None = None
        self.probe_t0 = 0.0
        self.probe_meta: tuple[str | None, int] | None = None
        self.last_probe = -INF
        self._seen: list[tuple[str, int]] = []  # unsynced: changes seen since the probe began
        self.forget_counts()

    def forget_counts(self) -> None:
        """Start the stats from zero (made, or in a forked child: counts are per process)."""
        self.invalidations = 0
        self.skipped = 0
        self.resyncs = 0
        self.resync_causes: dict[str, int] = {}

    # ---- reads -----------------------------------------------------------------------------

    @property
    def verified_at(self) -> float:
        return self._verified_at

    @verified_at.setter
    def verified_at(self, when: float) -> None:
        self._verified_at = when
        self.fresh_until = when + self.max_staleness

    def is_fresh(self) -> bool:
        return self.clock() <= self.fresh_until

    # ---- fills -----------------------------------------------------------------------------

    def begin_fill(self, key: str) -> Placeholder | None:
        """Reserve ``key`` before a fetch/write; ``None`` means "do not install the result"."""
        if not self.hooks.fill_guard:
            return UNGUARDED
        with self.mutex:
            if not self.synced:
                return None
            current = self.store.get(key)
            if type(current) is Placeholder and current.generation == self.generation:
                return current
            ph = Placeholder(self.generation)
            self.store.set(key, ph)
            return ph

    def finish_fill(
        self,
        key: str,
        ph: Placeholder | None,
        value: Any,
        version: int,
        epoch: str | None,
        ttl: float | None = None,
    ) -> bool:
        """Install ``value`` (current at map seq ``version`` in ``epoch``) if nothing newer was
        seen meanwhile. Returns whether it was installed."""
        if ph is None:
            return False
        with self.mutex:
            if self.synced:
                self._adopt_first_epoch(epoch, version)
            if epoch != self.epoch:
                if self.epoch is not None and self.synced:
                    # the server's data was lost/reset and the listener has not said so yet
                    self._resync("epoch")
                self._drop(key, ph)
                return False
            if ph is UNGUARDED:
                if self.synced:
                    self.store.set(key, Entry(value, version), ttl)
                return self.synced
            if (
                not self.synced
                or ph.generation != self.generation
                or ph.max_seq > version
                or (ttl is not None and ttl <= 0)
            ):
                self._drop(key, ph)
                return False
            current = self.store.get(key)
            if current is ph or (type(current) is Entry and current.version < version):
                # An entry there came from a fill that shared this placeholder (so the changes
                # seen before it were checked above) and took every change since: one older
                # than ``version`` is replaced, e.g. a concurrent read's value by a write's.
                return self.store.replace(key, current, Entry(value, version), ttl)
            return False

    def _adopt_first_epoch(self, epoch: str | None, seq: int) -> bool:
        """(mutex held, synced) A map with no data when the copy was based (no epoch) got its
        very first change, seq 1, which created ``epoch``: adopt it. Whether it was adopted."""
        if self.epoch is None and self.applied == 0 and seq == 1 and epoch is not None:
            self.epoch = epoch
            return True
        return False

    def local_clear(self) -> None:
        """Empty the local copy (after this node cleared the map); fills in flight fail."""
        with self.mutex:
            self.generation += 1
            self.store.clear()

    def abort_fill(self, key: str, ph: Placeholder | None) -> None:
        if ph is not None and ph is not UNGUARDED:
            with self.mutex:
                self._drop(key, ph)

    def _drop(self, key: str, ph: Placeholder) -> None:
        self.store.delete_if(key, lambda e: e is ph)

    def note_epoch(self, epoch: str | None) -> None:
        """A server reply showed ``epoch``; a different one than ours means data was lost."""
        if epoch != self.epoch and self.epoch is not None:
            with self.mutex:
                if self.synced and epoch != self.epoch:
                    self._resync("epoch")

    # ---- the listener's events -------------------------------------------------------------

    def on_subscribed(self) -> None:
        """A (re)subscribe confirmation: anything may have been missed before it."""
        with self.mutex:
            cause = "resubscribe" if self.subscribed_once else None
            self.subscribed_once = True
            self._resync(cause)

    def on_disconnect(self) -> None:
        with self.mutex:
            self._resync("disconnect")

    def on_message(self, data: bytes) -> None:
        """One message from the map's channel (one change, or a batch of consecutive ones)."""
        try:
            changes = parse_changes(data)
        except MalformedChange as exc:
            log.warning("malformed change message on %r: %s; dropping the local copy", data, exc)
            with self.mutex:
                self._resync("malformed")
            return
        if changes is None:
            log.warning("skipped a message that is not syncmap's: %r", data[:200])
            self.skipped += 1
            return
        watchers = self.watchers
        if watchers:
            for change in changes:
                for watcher in watchers:
                    watcher(change)
        with self.mutex:
            for change in changes:
                if not self._on_change(change):
                    return

    def _on_change(self, change: Change) -> bool:
        """(mutex held) One change; False when the rest of its message is moot (resync)."""
        self.invalidations += 1
        if not self.synced:
            if self.probe_token is not None:  # on_pong sorts out what the probe's read saw
                if len(self._seen) >= self.SEEN_LIMIT:
                    self._resync(None)
                    return False
                self._seen.append((change.epoch, change.seq))
            return True
        if change.epoch != self.epoch and not self._adopt_first_epoch(change.epoch, change.seq):
            self._resync("epoch")
            return False
        if change.seq != self.applied + 1:
            self._resync("gap" if change.seq > self.applied else "seq_regress")
            return False
        self.applied = change.seq
        if change.op == "C":
            self.generation += 1
            self.store.clear()
            return True
        self._apply(change)
        return True

    def _apply(self, change: Change) -> None:
        """A change of one key at seq ``s``: an entry older than ``s`` takes the new state if
        the message says what it is (a value it carries, or absent after a delete), else it is
        dropped; a placeholder is only marked (its fill will not install); a key that is not
        in the local copy stays out of it. O(1)."""
        key, seq = change.key, change.seq
        current = self.store.get(key)
        if current is None:
            return
        if type(current) is Placeholder:
            if seq > current.max_seq:
                current.max_seq = seq
            return
        if current.version >= seq:
            return
        if change.op == "D":
            self.store.replace(key, current, Entry(ABSENT, seq))
            return
        if change.value is not None and self.decode is not None:
            try:
                value = self.decode(change.value)
            except Exception as exc:  # another codec wrote it? then only invalidate
                log.warning("undecodable value in a change of %r: %s", key, exc)
            else:
                self.store.replace(key, current, Entry(value, seq))
                return
        self.store.delete_if(key, lambda e: e is current)

    # ---- probes: proving freshness ---------------------------------------------------------

    def start_probe(self, token: str | None = None) -> str:
        """Call when a probe starts (before the server's (epoch, seq) is read, if it is);
        ``token``: the PING's (the node's listener probes all its maps with one), else a new
        one. Returns the token."""
        with self.mutex:
            if token is None:
                self._token_counter += 1
                token = f"syncmap-probe-{self._token_counter}"
            self.probe_token = token
            self.probe_t0 = self.last_probe = self.clock()
            self.probe_meta = None
            self._seen = []
            return self.probe_token

    def cancel_probe(self) -> None:
        with self.mutex:
            self.probe_token = None
            self.probe_meta = None

    def probe_read(self, token: str, epoch: str | None, seq: int) -> None:
        """The server's (epoch, seq) as read for probe ``token``."""
        with self.mutex:
            if token != self.probe_token:
                return
            # Changes seen since start_probe stay in _seen: another thread may apply events
            # while this one waits for the read; on_pong skips those the read includes.
            self.probe_meta = (epoch, seq)

    def on_pong(self, token: str) -> None:
        """Every message published before the probe started has now arrived. A synced copy
        is then proven current as of the probe's start (and, if the probe read the server's
        (epoch, seq), checked against it); an unsynced one takes its base from the read."""
        with self.mutex:
            if token != self.probe_token:
                return  # a stale or foreign PONG
            meta, t0 = self.probe_meta, self.probe_t0
            self.probe_token = None
            self.probe_meta = None
            if meta is None:
                if self.synced:
                    self.verified_at = t0
                else:
                    self._seen = []  # no base was read: probe again
                return
            epoch, seq = meta
            if self.synced:
                if epoch != self.epoch:
                    # data lost/reset (or, from no epoch, a first change we never saw)
                    self._resync("epoch" if self.epoch is not None else "gap")
                elif self.applied < seq:
                    self._resync("gap")  # a message was lost and nothing came after it
                else:
                    self.verified_at = t0
                return
            # unsynced: establish the base from this probe
            applied = seq
            for e, s in self._seen:
                if e == epoch and s <= seq:
                    continue
                if e != epoch or s != applied + 1:
                    self._seen = []
                    return  # changes during the probe we cannot account for: probe again
                applied = s
            self._seen = []
            self.epoch = epoch
            self.applied = applied
            self.synced = True
            self.generation += 1
            self.verified_at = t0

    # ---- resync ----------------------------------------------------------------------------

    def _resync(self, cause: str | None) -> None:
        """Drop the local copy; nothing is served or installed until a probe re-establishes a
        base. ``cause`` None: a reset that is not counted (e.g. the first subscription)."""
        was_synced = self.synced
        self.verified_at = -INF  # first: no local read is served from here on
        self.synced = False
        self.generation += 1
        self.probe_token = None
        self.probe_meta = None
        self._seen = []
        self.store.clear()
        if cause is not None and (was_synced or cause != "disconnect"):
            self.resyncs += 1
            self.resync_causes[cause] = self.resync_causes.get(cause, 0) + 1
            log.info("syncmap: local copy dropped (%s)", cause)

    def resync(self, cause: str | None) -> None:
        with self.mutex:
            self._resync(cause)
