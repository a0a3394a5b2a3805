"""SyncMap's server operations as flows (generators over :mod:`syncmap._core.ops`), shared by
the blocking and the asyncio map. No I/O here: flows yield operations, the map's runner
performs them. Input is checked before the first yield, so bad input never reaches the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .._codec import Codec
from .._errors import (
    CorruptData,
    GuardRejected,
    InvalidArgument,
    NotObtained,
    ServerError,
    TooLarge,
    UnsupportedKey,
)
from .coherence import ABSENT, Coherence, Entry, Placeholder
from .keys import MapKeys
from .ops import Batch, Command, Op, Script, Sleep
from .replies import (
    PTTL_ABSENT,
    DeleteManyReply,
    GetManyReply,
    GetReply,
    LoadReply,
    LoadState,
    SetManyReply,
    VersionReply,
    WriteReply,
    WriteStatus,
)
from .validate import check_seconds

__all__ = ["Call", "MapCore", "MapFlow", "MapOp", "parse_record"]

T = TypeVar("T")
RECORD_MAGIC: Final = b"SM\x01"
_SCALARS: Final = (str, int, float, bool, type(None))
_NO_INSTALL: Any = object()
_SENT_PAYLOAD: Final = frozenset(("set", "setnx", "cas", "casv"))
"""``map_write`` ops whose value the writer sends: it decides whether the value rides in the
change message (the script then converts no number for it)."""
BATCH_KEYS: Final = 500  # keys per script of a bulk operation (the scripts of one call share a
# round trip; a script holds the server for ~0.3-1 ms of others' commands)
BATCH_BYTES: Final = 256 * 1024  # ... and at most this many payload bytes (its change message)
PUSH_BUDGET = 4 << 20  # bytes of values one bulk write carries in its change messages; the
# chunks after that only invalidate (every subscriber gets every message at once: a server
# closes a subscriber connection whose output buffer passes 8 MiB for a minute or 32 MiB)


@dataclass(frozen=True, slots=True)
class Call:
    """Call ``fn(*args)`` in the caller's context; the asyncio runner awaits an awaitable
    result (a loader may be a coroutine function)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


MapOp = Op | Call
MapFlow = Generator[MapOp, Any, T]
"""A map flow: the operations of :mod:`~syncmap._core.ops`, plus :class:`Call`."""


def _keep_if_written(keep: Any) -> Callable[[int, Any], Any]:
    """An ``install`` for ``MapCore._write``: ``keep`` if the write landed, else nothing."""
    return lambda status, record: keep if status == WriteStatus.WRITTEN else _NO_INSTALL


def parse_record(record: bytes) -> tuple[str, int, bytes]:
    """``(epoch, seq, payload)`` of a record; :class:`CorruptData` for foreign data."""
    if not isinstance(record, bytes) or not record.startswith(RECORD_MAGIC):
        raise CorruptData("the value under a map key is not a syncmap record (foreign data?)")
    nl = record.find(b"\n", 3, 64)
    epoch, _, seq = record[3:nl].partition(b" ")
    if nl < 0 or not epoch or not seq.isdigit():
        raise CorruptData("malformed syncmap record header (foreign data?)")
    return epoch.decode("ascii", "replace"), int(seq), record[nl + 1 :]


def _server_ms() -> MapFlow[int]:
    """The server's clock in ms (the index's scores are expiry times on it)."""
    now = yield Command(("TIME",))
    return int(now[0]) * 1000 + int(now[1]) // 1000


def _member(member: Any) -> str:
    """A key as the index holds it (bytes, or str from a decoding client)."""
    return member.decode("utf-8") if isinstance(member, bytes) else str(member)


def _chunks(items: list[T], size_of: Callable[[T], int] | None = None) -> list[list[T]]:
    """``items`` cut into the chunks of a bulk operation: at most :data:`BATCH_KEYS` items,
    and at most :data:`BATCH_BYTES` by ``size_of`` (a single larger item is a chunk alone)."""
    if size_of is None:
        return [items[i : i + BATCH_KEYS] for i in range(0, len(items), BATCH_KEYS)]
    chunks: list[list[T]] = []
    current: list[T] = []
    size = 0
    for item in items:
        n = size_of(item)
        if current and (len(current) >= BATCH_KEYS or size + n > BATCH_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        chunks.append(current)
    return chunks


def _key_list(keys: object, what: str) -> list[Any]:
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise InvalidArgument(f"{what} takes an iterable of keys, not {type(keys).__name__}")
    return list(keys)


def _check_ttl(ttl: object) -> float:
    """A TTL > 0 whose milliseconds a Lua number holds exactly."""
    return check_seconds(ttl, "ttl", high=(2**53 - 1) / 1000, or_none=True)


class MapCore:
    """The decisions of one map's server operations. ``state`` is its local copy's coherence;
    ``new_token()`` returns a hex string never returned before by any node (epoch candidates,
    load tokens)."""

    def __init__(
        self,
        keys: MapKeys,
        state: Coherence,
        codec: Codec,
        *,
        new_token: Callable[[], str],
        default_ttl: float | None,
        max_key_bytes: int,
        max_value_bytes: int,
        push_values: int = 0,
    ) -> None:
        self.keys = keys
        self.state = state
        self.codec = codec
        self.new_token = new_token
        self.default_ttl = None if default_ttl is None else _check_ttl(default_ttl)
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.push_values = push_values  # payloads up to this size ride in change messages
        self._copy_scalars = codec.name in ("json", "msgpack")
        # incr runs on the server when the codec stores ints as JSON or msgpack numbers: the
        # json and msgpack codecs, or a codec that says so (``counters = "json"``)
        counters = codec.name if codec.name in ("json", "msgpack") else None
        counters = getattr(codec, "counters", counters)
        self.incr_codec = counters if counters in ("json", "msgpack") else None

    # ---- input checks (before anything is sent) --------------------------------------------

    def check_key(self, key: object) -> str:
        if not isinstance(key, str):
            raise UnsupportedKey(f"map keys must be str, not {type(key).__name__}")
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise UnsupportedKey(f"map key {key!r} is not encodable as UTF-8") from None
        if size > self.max_key_bytes:
            raise TooLarge(f"map key is {size} bytes; the limit is {self.max_key_bytes}")
        return key

    def encode(self, value: Any) -> bytes:
        payload = self.codec.encode(value)
        if len(payload) > self.max_value_bytes:
            raise TooLarge(
                f"encoded value is {len(payload)} bytes; the limit is {self.max_value_bytes}"
            )
        return payload

    def px(self, ttl: float | None) -> int:
        seconds = self.default_ttl if ttl is None else _check_ttl(ttl)
        return 0 if seconds is None else max(1, math.ceil(seconds * 1000))

    def guard_args(self, guard: Any) -> tuple[tuple[str, ...], tuple[str, str]]:
        if guard is None:
            return (), ("", "")
        try:
            key, token, fence = guard.key, guard.token, guard.fence
        except AttributeError:
            raise InvalidArgument(
                f"guard must be a held syncmap.Lock, not {type(guard).__name__}"
            ) from None
        if not isinstance(key, str):
            raise InvalidArgument(f"guard must be a syncmap.Lock, not {type(guard).__name__}")
        if not isinstance(token, str) or not token:
            raise GuardRejected(f"write refused: lock {key!r} is not held by this holder")
        if fence is not None and (isinstance(fence, bool) or not isinstance(fence, int)):
            raise InvalidArgument(f"guard fence must be an int or None, not {fence!r}")
        return (key,), (token, "" if fence is None else str(fence))

    def decode_value(self, record: bytes | None) -> Any:
        if record is None:
            return ABSENT
        return self.codec.decode(parse_record(record)[2])

    def local_copy(self, value: Any, payload: bytes) -> Any:
        """What the writer keeps: the value as every other node will decode it."""
        if self._copy_scalars and type(value) in _SCALARS:
            return value
        return self.codec.decode(payload)

    # ---- reads -----------------------------------------------------------------------------

    def get(self, key: object, default: Any, fresh: bool) -> MapFlow[Any]:
        k = self.check_key(key)
        state = self.state
        if fresh:
            generation = state.generation
            entry = state.store.get(k)
            if type(entry) is Entry:
                version = VersionReply.parse(
                    (yield Script("map_version", (self.keys.meta, self.keys.record(k)), ()))
                )
                epoch = version.epoch
                head = version.head
                if (
                    not version.foreign
                    and epoch is not None
                    and epoch == state.epoch
                    and generation == state.generation
                    and self._unchanged(head, entry, epoch)
                ):
                    value = entry.value
                    return default if value is ABSENT else value
                state.note_epoch(epoch)
        value = yield from self._fetch(k)
        return default if value is ABSENT else value

    @staticmethod
    def _unchanged(head: bytes | None, entry: Entry, epoch: str) -> bool:
        if head is None:
            return entry.value is ABSENT
        if entry.value is ABSENT:
            return False
        try:
            rec_epoch, rec_seq, _ = parse_record(head if b"\n" in head else head + b"\n")
        except CorruptData:
            return False
        return rec_epoch == epoch and rec_seq <= entry.version

    def _fetch(self, k: str) -> MapFlow[Any]:
        state = self.state
        ph = state.begin_fill(k)
        started = state.clock()
        try:
            reply = GetReply.parse(
                (yield Script("map_get", (self.keys.meta, self.keys.record(k)), ()))
            )
            if reply.foreign:
                raise CorruptData(f"map key {k!r} holds a non-string value (foreign data)")
            value = self.decode_value(reply.record)
            fill_hook = self.state.hooks.fill_hook
            if fill_hook is not None:
                yield Call(fill_hook, (k,))
        except BaseException:
            state.abort_fill(k, ph)
            raise
        self._install(k, ph, value, reply.seq, reply.epoch, reply.pttl, started)
        return value

    def _install(
        self,
        k: str,
        ph: Placeholder | None,
        value: Any,
        version: int,
        epoch: str | None,
        pttl_ms: int,
        started: float,
    ) -> None:
        ttl = None
        if pttl_ms is not None and pttl_ms >= 0:
            ttl = pttl_ms / 1000 - (self.state.clock() - started)
        self.state.finish_fill(k, ph, value, int(version), epoch, ttl)

    # ---- writes ----------------------------------------------------------------------------

    def _write(
        self,
        op: str,
        k: str,
        *,
        payload: bytes = b"",
        px: int = 0,
        expected: bytes | str = "",
        guard: Any = None,
        load_token: str = "",
        install: Callable[[int, Any], Any],
    ) -> MapFlow[tuple[int, Any]]:
        """Run ``map_write``; returns ``(status, record)``. ``install(status, record)`` says
        what the local copy should hold afterwards (``_NO_INSTALL``: nothing)."""
        keys = self.keys
        guard_keys, (token, fence) = self.guard_args(guard)
        state = self.state
        ph = state.begin_fill(k)
        started = state.clock()
        script_keys: tuple[str, ...] = (keys.meta, keys.record(k), keys.idx)
        push: Any = self.push_values  # the script makes the value: it compares with the limit
        if op in _SENT_PAYLOAD:  # it rides: the key's length in bytes; it does not: ""
            rides = not px and self.push_values > 0 and len(payload) <= self.push_values
            push = (len(k) if k.isascii() else len(k.encode())) if rides else ""
        args: tuple[Any, ...] = (op, k, self.new_token(), keys.channel, payload, px, push)
        if guard_keys or load_token:
            script_keys += (keys.fences, keys.load(k), *guard_keys)
            args += (expected, token, fence, load_token)
        elif expected:
            args += (expected,)
        try:
            raw = yield Script(
                "map_write",
                script_keys,
                args,
                idempotent=False,  # an incr sent twice counts twice: never resent blindly
            )
            reply = WriteReply.parse(raw, px)
            status, record = reply.status, reply.record
            if status < 0:  # (the refusals: WRITTEN and CONDITION_FALSE are >= 0)
                self._refused(status, k, guard_keys)
            value = install(status, record)
        except BaseException:
            state.abort_fill(k, ph)
            raise
        if value is _NO_INSTALL:
            state.abort_fill(k, ph)
        else:
            self._install(k, ph, value, reply.seq, reply.epoch, reply.pttl, started)
        return status, record

    @staticmethod
    def _refused(status: int, k: str, guard_keys: tuple[str, ...]) -> None:
        """Raise the error of a ``map_write`` that refused to write (a negative status)."""
        if status == WriteStatus.GUARD_REJECTED:
            raise GuardRejected(
                f"write to {k!r} refused: lock {guard_keys[0]!r} is no longer held by this "
                "holder, or a newer holder has written"
            )
        if status == WriteStatus.NOT_A_COUNTER:
            raise InvalidArgument(f"incr: the value of {k!r} is not an integer counter")
        if status == WriteStatus.FOREIGN:
            raise CorruptData(f"map key {k!r} holds foreign data; nothing was written")

    def set(self, key: object, value: Any, ttl: float | None, guard: Any) -> MapFlow[None]:
        k = self.check_key(key)
        payload = self.encode(value)
        px = self.px(ttl)
        keep = self.local_copy(value, payload)
        yield from self._write(
            "set", k, payload=payload, px=px, guard=guard, install=lambda status, rec: keep
        )

    def set_many(self, pairs: Iterable[tuple[object, Any]], ttl: float | None) -> MapFlow[None]:
        """Write every pair: chunks of :data:`BATCH_KEYS` pairs, one ``map_set_many`` script
        each, all in one round trip. Every key, value and the TTL is checked and encoded
        before anything is sent, so bad input writes nothing. Each pair is its own change (its
        own seq); a chunk is atomic, the chunks are not atomic together: a chunk that fails
        on the server leaves the others written (the first failure is raised)."""
        encoded = [(k, value, self.encode(value)) for k, value in
                   [(self.check_key(key), value) for key, value in pairs]]  # fmt: skip
        px = self.px(ttl)
        if not encoded:
            return
        keys, state = self.keys, self.state
        chunks = _chunks(encoded, lambda item: len(item[2]) + len(item[0]))
        scripts = []
        carried = 0
        for chunk in chunks:
            push = self.push_values if carried < PUSH_BUDGET else 0
            carried += sum(len(p) for _, _, p in chunk if len(p) <= push)
            args: list[Any] = [self.new_token(), keys.channel, px, push]
            for k, _, payload in chunk:
                args += (k, payload)
            records = [keys.record(k) for k, _, _ in chunk]
            scripts.append(
                Script("map_set_many", (keys.meta, keys.idx, *records), tuple(args), False)
            )
        phs = [state.begin_fill(k) for k, _, _ in encoded]
        started = state.clock()
        replies = yield from self._batch(scripts, encoded, phs)
        failure, i = None, 0
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, Exception):
                failure = failure or reply
                for k, _, _ in chunk:
                    state.abort_fill(k, phs[i])
                    i += 1
                continue
            written = SetManyReply.parse(reply)
            epoch, seq, pttl = written.epoch, written.last_seq - len(chunk), written.pttl
            for k, value, payload in chunk:
                seq += 1
                self._install(k, phs[i], self.local_copy(value, payload), seq, epoch, pttl, started)
                i += 1
        if failure is not None:
            raise failure

    def _batch(
        self, scripts: list[Script], items: list[Any], phs: list[Placeholder | None]
    ) -> MapFlow[list[Any]]:
        """Run ``scripts`` in one round trip; if that fails as a whole, the placeholders of
        ``items`` (keys first) are given up."""
        try:
            replies = yield Batch(tuple(scripts))
        except BaseException:
            for item, ph in zip(items, phs, strict=True):
                self.state.abort_fill(item if isinstance(item, str) else item[0], ph)
            raise
        return list(replies)

    def get_many(
        self, keys: object, local: Callable[[str], Any], missing: Any
    ) -> MapFlow[dict[str, Any]]:
        """The present keys of ``keys`` and their values: ``local(k)`` first (the map's local
        read: the value, ``ABSENT``, or ``missing``), the others fetched in chunks of
        :data:`BATCH_KEYS`, one ``map_get_many`` script each, all in one round trip, and
        installed as single fetches are (placeholders: no fill race)."""
        wanted = list(dict.fromkeys([self.check_key(k) for k in _key_list(keys, "get_many")]))
        found: dict[str, Any] = {}
        misses = []
        for k in wanted:
            value = local(k)
            if value is missing:
                misses.append(k)
            elif value is not ABSENT:
                found[k] = value
        if not misses:
            return found
        state, meta, record = self.state, self.keys.meta, self.keys.record
        phs = [state.begin_fill(k) for k in misses]
        started = state.clock()
        chunks = _chunks(misses)
        replies = yield from self._batch(
            [Script("map_get_many", (meta, *map(record, chunk)), ()) for chunk in chunks],
            misses,
            phs,
        )
        fill_hook = state.hooks.fill_hook
        if fill_hook is not None:
            for k in misses:
                yield Call(fill_hook, (k,))
        failure: BaseException | None = None
        i = 0
        for chunk, raw in zip(chunks, replies, strict=True):
            reply = raw if isinstance(raw, Exception) else GetManyReply.parse(raw)
            for j, k in enumerate(chunk):
                ph = phs[i + j]
                try:
                    if isinstance(reply, Exception):
                        raise reply
                    if reply.foreign[j]:
                        raise CorruptData(f"map key {k!r} holds a non-string value (foreign data)")
                    value = self.decode_value(reply.records[j])
                except Exception as exc:
                    failure = failure or exc
                    state.abort_fill(k, ph)
                    continue
                self._install(k, ph, value, reply.seq, reply.epoch, reply.pttls[j], started)
                if value is not ABSENT:
                    found[k] = value
            i += len(chunk)
        if failure is not None:
            raise failure
        return {k: found[k] for k in wanted if k in found}

    def delete_many(self, keys: object) -> MapFlow[int]:
        """Delete every key of ``keys`` (all checked before anything is sent); how many
        existed. Chunks of :data:`BATCH_KEYS`, one ``map_delete_many`` script each, all in
        one round trip; each deleted key is its own change."""
        wanted = list(dict.fromkeys([self.check_key(k) for k in _key_list(keys, "delete_many")]))
        if not wanted:
            return 0
        mk, state = self.keys, self.state
        chunks = _chunks(wanted)
        scripts = [
            Script(
                "map_delete_many",
                (mk.meta, mk.idx, *map(mk.record, chunk)),
                (self.new_token(), mk.channel, *chunk),
                False,
            )
            for chunk in chunks
        ]
        phs = [state.begin_fill(k) for k in wanted]
        started = state.clock()
        replies = yield from self._batch(scripts, wanted, phs)
        failure, count, i = None, 0, 0
        for chunk, raw in zip(chunks, replies, strict=True):
            reply = raw if isinstance(raw, Exception) else DeleteManyReply.parse(raw)
            for k in chunk:
                if isinstance(reply, Exception):
                    state.abort_fill(k, phs[i])
                else:  # every key of the chunk is absent as of the script's seq
                    self._install(k, phs[i], ABSENT, reply.seq, reply.epoch, PTTL_ABSENT, started)
                i += 1
            if isinstance(reply, Exception):
                failure = failure or reply
            else:
                count += reply.deleted
        if failure is not None:
            raise failure
        return count

    def delete(self, key: object, guard: Any) -> MapFlow[bool]:
        k = self.check_key(key)
        status, _ = yield from self._write(
            "del", k, guard=guard, install=lambda status, rec: ABSENT
        )
        return status == WriteStatus.WRITTEN

    def pop(self, key: object, default: Any, guard: Any = None) -> MapFlow[Any]:
        """The removed value, else ``default`` (``ABSENT`` if none was given)."""
        k = self.check_key(key)
        status, record = yield from self._write(
            "del", k, guard=guard, install=lambda status, rec: ABSENT
        )
        if status != WriteStatus.WRITTEN:
            return default
        return self.decode_value(record)

    def popitem(self, guard: Any = None) -> MapFlow[tuple[str, Any]]:
        """Remove and return some ``(key, value)``: a few live keys are listed from the index
        and popped in turn (each pop atomic) until one still existed; :class:`KeyError` when
        the map is empty."""
        self.guard_args(guard)
        for _ in range(64):
            now_ms = yield from _server_ms()
            members = yield Command(
                ("ZRANGE", self.keys.idx, f"({now_ms}", "+inf", "BYSCORE", "LIMIT", 0, 8)
            )
            if not members:
                raise KeyError("popitem(): the map is empty")
            for member in members:
                k = _member(member)
                value = yield from self.pop(k, ABSENT, guard)
                if value is not ABSENT:
                    return k, value
        raise ServerError("popitem(): gave up after 64 rounds of keys deleted by others")

    def setdefault(self, key: object, default: Any, guard: Any = None) -> MapFlow[Any]:
        _, value = yield from self._setnx(self.check_key(key), default, self.px(None), guard)
        return value

    def add(self, key: object, value: Any, ttl: float | None, guard: Any = None) -> MapFlow[bool]:
        """Write ``key`` only if it is absent; True if it was written."""
        added, _ = yield from self._setnx(self.check_key(key), value, self.px(ttl), guard)
        return added

    def _setnx(self, k: str, value: Any, px: int, guard: Any) -> MapFlow[tuple[bool, Any]]:
        """``(written, value now held)``: ``value`` if absent, else the existing one."""
        payload = self.encode(value)
        keep = self.local_copy(value, payload)

        def install(status: int, record: Any) -> Any:
            return keep if status == WriteStatus.WRITTEN else self.decode_value(record)

        status, record = yield from self._write(
            "setnx", k, payload=payload, px=px, guard=guard, install=install
        )
        return (True, keep) if status == WriteStatus.WRITTEN else (False, self.decode_value(record))

    def touch(self, key: object, ttl: float | None, guard: Any = None) -> MapFlow[bool]:
        """Give an existing entry a new expiry (``ttl`` None: the map's default, else none),
        as a write (new seq, change message); False if ``key`` is absent."""
        k = self.check_key(key)
        status, _ = yield from self._write(
            "touch", k, px=self.px(ttl), guard=guard, install=self._install_record
        )
        return status == WriteStatus.WRITTEN

    def _install_record(self, status: int, record: Any) -> Any:
        """An ``install``: the record the script returned (incr, touch), if it wrote."""
        return self.decode_value(record) if status == WriteStatus.WRITTEN else _NO_INSTALL

    def compare_and_set(
        self, key: object, expected: Any, new: Any, ttl: float | None, guard: Any
    ) -> MapFlow[bool]:
        k = self.check_key(key)
        want = self.encode(expected)
        payload = self.encode(new)
        px = self.px(ttl)
        keep = self.local_copy(new, payload)
        seen: list[Any] = []

        def install(status: int, record: Any) -> Any:
            if status == WriteStatus.WRITTEN:
                return keep
            seen[:] = [self.decode_value(record)]
            return seen[0]

        op, arg = "cas", want
        for _ in range(64):
            status, record = yield from self._write(
                op, k, payload=payload, px=px, expected=arg, guard=guard, install=install
            )
            if status == WriteStatus.WRITTEN:
                return True
            current = seen[0]
            if current is ABSENT or current != expected:
                return False
            # equal as values but not as bytes (e.g. dict order): compare-and-set on its version
            epoch, seq, _ = parse_record(record)
            op, arg = "casv", f"{epoch} {seq}".encode()
        raise ServerError(f"compare_and_set({k!r}): gave up after 64 conflicting attempts")

    def update_item(
        self,
        key: object,
        fn: Callable[[Any], Any],
        default: Any,
        ttl: float | None,
        guard: Any = None,
    ) -> MapFlow[Any]:
        if not callable(fn):
            raise InvalidArgument(f"update_item needs a callable, not {type(fn).__name__}")
        k = self.check_key(key)
        px = self.px(ttl)
        self.guard_args(guard)
        for attempt in range(64):
            reply = GetReply.parse(
                (yield Script("map_get", (self.keys.meta, self.keys.record(k)), ()))
            )
            if reply.foreign:
                raise CorruptData(f"map key {k!r} holds a non-string value (foreign data)")
            record = reply.record
            if record is None:
                current, version = default, b""
            else:
                epoch, seq, body = parse_record(record)
                current, version = self.codec.decode(body), f"{epoch} {seq}".encode()
            new = fn(current)
            payload = self.encode(new)
            keep = self.local_copy(new, payload)
            status, _ = yield from self._write(
                "casv",
                k,
                payload=payload,
                px=px,
                expected=version,
                guard=guard,
                install=_keep_if_written(keep),
            )
            if status == WriteStatus.WRITTEN:
                return keep
            if attempt >= 3:
                yield Sleep(min(0.001 * attempt, 0.05))
        raise ServerError(f"update_item({k!r}): gave up after 64 conflicting attempts")

    def incr(
        self, key: object, amount: int, guard: Any = None, create: bool = True
    ) -> MapFlow[int]:
        """Add ``amount`` to the counter ``key``: absent counts as 0 (``create``), else
        :class:`KeyError`."""
        if isinstance(amount, bool) or not isinstance(amount, int) or abs(amount) >= 2**53:
            raise InvalidArgument(f"incr amount must be an int below 2**53, not {amount!r}")
        k = self.check_key(key)
        if self.incr_codec is None:

            def add(value: Any) -> int:
                if value is ABSENT:
                    raise KeyError(k)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InvalidArgument(f"incr: the value of {k!r} is not an integer counter")
                return value + amount

            result = yield from self.update_item(k, add, 0 if create else ABSENT, None, guard)
            return int(result)
        status, record = yield from self._write(
            "incr" if create else "incrx", k, payload=str(amount).encode(), px=self.px(None),
            expected=self.incr_codec, guard=guard, install=self._install_record,
        )  # fmt: skip
        if status != WriteStatus.WRITTEN:
            raise KeyError(k)
        return int(self.decode_value(record))

    def get_or_load(
        self, key: object, loader: Callable[[], Any], ttl: float | None, timeout: float
    ) -> MapFlow[Any]:
        if not callable(loader):
            raise InvalidArgument(f"loader must be callable, not {type(loader).__name__}")
        check_seconds(timeout, "timeout")
        k = self.check_key(key)
        px = self.px(ttl)
        state = self.state
        keys = self.keys
        token = self.new_token()
        deadline = state.clock() + timeout
        delay = 0.002
        while True:
            ph = state.begin_fill(k)
            started = state.clock()
            try:
                raw = yield Script(
                    "map_load",
                    (keys.meta, keys.record(k), keys.load(k)),
                    (token, max(1, math.ceil(timeout * 1000))),
                )
                reply = LoadReply.parse(raw)
                code = reply.state
                if code == LoadState.PRESENT:
                    if reply.foreign:
                        raise CorruptData(f"map key {k!r} holds a non-string value (foreign data)")
                    value = self.decode_value(reply.record)
            except BaseException:
                state.abort_fill(k, ph)
                raise
            if code == LoadState.PRESENT:
                self._install(k, ph, value, reply.seq, reply.epoch, reply.pttl, started)
                return value
            state.abort_fill(k, ph)
            if code == LoadState.OURS:
                try:
                    value = yield Call(loader)
                    payload = self.encode(value)
                except BaseException:
                    yield Script("map_unload", (keys.load(k),), (token,))
                    raise
                keep = self.local_copy(value, payload)
                yield from self._write(
                    "set", k, payload=payload, px=px, load_token=token,
                    install=_keep_if_written(keep),
                )  # fmt: skip
                return keep
            if state.clock() >= deadline:
                raise NotObtained(
                    f"get_or_load({k!r}): another node's loader did not finish within {timeout}s"
                )
            yield Sleep(min(delay, max(0.0, deadline - state.clock())))
            delay = min(delay * 2, 0.05)

    # ---- whole-map operations --------------------------------------------------------------

    def length(self) -> MapFlow[int]:
        count = yield Script("map_len", (self.keys.idx,), ())
        return int(count)

    def key_list(self) -> MapFlow[list[str]]:
        """Every live key (ZSCAN of the index: keys present throughout are listed once)."""
        now_ms = yield from _server_ms()
        cursor: Any = 0
        seen: dict[str, None] = {}
        while True:
            cursor, items = yield Command(("ZSCAN", self.keys.idx, cursor, "COUNT", 1000))
            if items and not isinstance(items[0], tuple | list):  # raw reply, not redis-py's pairs
                items = list(zip(items[::2], items[1::2], strict=True))
            for member, score in items:
                if float(score) > now_ms:
                    seen[_member(member)] = None
            if int(cursor) == 0:
                return list(seen)

    def clear(self) -> MapFlow[None]:
        keys = self.keys
        yield Script(
            "map_clear",
            (keys.meta, keys.idx),
            (keys.record_prefix, keys.channel, self.new_token()),
        )
        self.state.local_clear()
