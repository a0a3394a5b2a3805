"""SyncMap: a map shared by every node, with a local copy in each for dict-speed reads.

The consistency contract, numbered, and how each point is enforced, lives in one place:
``docs/contract.md``. Code comments cite it as "docs/contract.md §N". In short: every write is
one Lua script that bumps the map's seq, writes the entry and publishes the change atomically
(§1-§2); fetches are guarded by placeholders (§3); gaps, epochs and lost connections drop
the copy (§4); one probe per node and server bounds staleness (§5); and a node crosses
``os.fork()`` as described under "Across fork".
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import operator
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    ValuesView,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from ._cached import AsyncCachedFunction, CachedFunction, cached, cached_async
from ._cluster import key_slot
from ._codec import Codec, get_codec
from ._core.coherence import ABSENT, Change, Coherence, Entry
from ._core.keys import MapKeys
from ._core.map_flows import Call, MapCore, MapFlow
from ._core.map_listen import Member
from ._core.validate import check_seconds
from ._driver import AsyncDriver, SyncDriver
from ._errors import InvalidArgument, NodeForked, StaleRead
from ._listener import READERS_ACTIVE, AsyncListener, SyncListener
from ._local import SafeHashMap
from ._stats import registry

if TYPE_CHECKING:
    from ._node import AsyncNode, Node

__all__ = ["AsyncSyncMap", "MapChange", "MapStats", "SyncMap"]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")
_MISSING: Any = object()
DEFAULT_MAXSIZE: Final = 100_000
DEFAULT_PUSH_VALUES: Final = 4096  # bytes: writes of values up to this size carry them
_monotonic: Final = time.monotonic  # the map's clock (a global: cheaper to call on hits)
_value_of: Final = operator.attrgetter("value")  # the local store's view of its entries
POLL_INTERVAL: Final = 0.00005  # s: how often a local hit applies waiting change messages
# (one check costs ~3 µs when nothing waits: ~6% of a thread spinning on hits; at 0.1 ms,
# a hit cost ~5% less and another node's write took ~60-80 µs longer to show, p50 to p95)
YIELD_INTERVAL: Final = 0.00025  # s: how often an asyncio local hit lets other tasks run
STALL: Final = 0.001  # s: an asyncio read this long after the last one's turn to yield first
# applies the change messages waiting on the socket (the loop was blocked, or idle)
OP_POLL_INTERVAL: Final = 0.001  # s: the same before server operations (a write's own change
# message is applied with the next few writes' in one drain; within READERS_ACTIVE)
OP_POLL_MAX_SKIP: Final = 0.01  # s: skipped when the answer is in, but not for longer than this


@dataclass(frozen=True, slots=True)
class MapStats:
    """A snapshot of one map's local-copy counters."""

    hits: int  # reads served from the local copy
    misses: int  # reads that went to the server
    invalidations: int  # change messages received
    resyncs: int  # times the local copy was dropped because coherence could not be proven
    resync_causes: dict[str, int]  # gap, epoch, resubscribe, disconnect, probe_timeout, ...
    local_size: int  # entries in the local copy (placeholders included)
    skipped_messages: int  # foreign messages on the map's channel, logged and skipped
    verified_age: float  # seconds since the local copy was last proven current (inf: never)


@dataclass(frozen=True, slots=True)
class MapChange:
    """One change seen by :meth:`SyncMap.watch`: ``op`` is "set", "del" or "clear"."""

    op: str
    key: str
    value: Any = None


_OPS: Final = {"S": "set", "D": "del", "C": "clear"}


def _pairs(other: Any, kwargs: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``dict.update``'s arguments as a list of pairs: a mapping (or anything with
    ``keys()``), or an iterable of pairs; then the keyword arguments."""
    if isinstance(other, Mapping):
        pairs = list(other.items())
    elif hasattr(other, "keys"):
        pairs = [(key, other[key]) for key in other.keys()]  # noqa: SIM118 (dict.update's protocol)
    else:
        pairs = []
        for item in other:
            try:
                key, value = item
            except (TypeError, ValueError):
                raise InvalidArgument(
                    f"update() takes a mapping or (key, value) pairs, not {item!r}"
                ) from None
            pairs.append((key, value))
    return pairs + list(kwargs.items())


class _Items(ItemsView[str, Any]):
    """A blocking map's items: the keys are listed when iteration starts, each value is read
    then; a key deleted meanwhile (by any node) is skipped, not a KeyError."""

    _mapping: SyncMap

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._mapping._each_item()


class _Values(ValuesView[Any]):
    """A blocking map's values (as :class:`_Items`)."""

    _mapping: SyncMap

    def __iter__(self) -> Iterator[Any]:
        for _, value in _Items(self._mapping):
            yield value


# What a watch waits on differs (threads vs tasks): a queue and its wait, one class per kind.


class _Changes:
    """A blocking watch's changes, put by the listener thread (or a reading thread)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Change] = queue.SimpleQueue()
        self.put = self._queue.put

    def next(self, deadline: float | None) -> Change | None:
        """The next change; ``None`` once ``deadline`` has passed (woken every 0.1 s)."""
        while deadline is None or time.monotonic() < deadline:
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            try:
                return self._queue.get(timeout=wait)
            except queue.Empty:
                continue
        return None


class _AsyncChanges:
    """An asyncio watch's changes, put by the listener task (or the raw reader's callback)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self.put = self._queue.put_nowait

    async def next(self, deadline: float | None) -> Change | None:
        """The next change; ``None`` once ``deadline`` has passed."""
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            return None


def _check_options(
    maxsize: object,
    max_staleness: object,
    on_stale: object,
    max_key_bytes: object,
    max_value_bytes: object,
    push_values: object,
) -> None:
    check_seconds(
        max_staleness, "max_staleness", low=0.01, low_ok=True, high=3600,
        expected="between 0.01 and 3600 s",
    )  # fmt: skip
    if on_stale not in ("server", "raise"):
        raise InvalidArgument(f"on_stale must be 'server' or 'raise', not {on_stale!r}")
    for name, limit in (("max_key_bytes", max_key_bytes), ("max_value_bytes", max_value_bytes)):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"{name} must be a positive int, not {limit!r}")
    if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int)):
        raise InvalidArgument(f"maxsize must be an int or None, not {maxsize!r}")
    if isinstance(push_values, bool) or not isinstance(push_values, int) or push_values < 0:
        raise InvalidArgument(f"push_values must be an int >= 0 (bytes), not {push_values!r}")


class _Tokens:
    """Unique tokens (epoch candidates, load tokens): a random prefix and a counter, no system
    call per write. One per process, shared by its maps: a forked child draws a new prefix
    (else the children of one parent would make the same tokens, and each would take the
    others' load locks as its own: a get_or_load loader run in every child)."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_tokens: Final = _Tokens()


class _Driver(SyncDriver):
    """The node's driver, plus :class:`Call` (a loader or test hook, called in place)."""

    def perform(self, op: Any) -> Any:
        if isinstance(op, Call):
            return op.fn(*op.args)
        return super().perform(op)


class _AsyncDriver(AsyncDriver):
    """The asyncio driver, plus :class:`Call` (awaited if the call returns an awaitable)."""

    async def perform(self, op: Any) -> Any:
        if isinstance(op, Call):
            result = op.fn(*op.args)
            return await result if inspect.isawaitable(result) else result
        return await super().perform(op)


class _MapBase:
    """What the blocking and the asyncio map share: options, local copy, coherence, flows."""

    def __init__(
        self,
        node: Node | AsyncNode,
        name: str,
        *,
        maxsize: int | None = DEFAULT_MAXSIZE,
        ttl: float | None = None,
        codec: str | Codec | None = None,
        max_staleness: float = 1.0,
        on_stale: str = "server",
        max_key_bytes: int = 1024,
        max_value_bytes: int = 1 << 20,
        push_values: int = DEFAULT_PUSH_VALUES,
    ) -> None:
        keys = MapKeys(name)
        _check_options(
            maxsize, max_staleness, on_stale, max_key_bytes, max_value_bytes, push_values
        )
        self.name = name
        self.node = node
        # the store's entries are Entry or Placeholder objects, viewed as their value (a
        # Placeholder's is ABSENT): the hit path reads the value without a second lookup
        self._store: SafeHashMap[str, Any] = SafeHashMap(maxsize, view=_value_of)
        self._data: dict[str, tuple[Any, float, Any]] = {}  # the store's dict, for the hit path
        self._touch: Callable[[str], object] | None = None  # its move_to_end (LRU), if bounded
        self._store.follow_store(self._follow)
        self._clock = _monotonic
        self._max_staleness = float(max_staleness)
        self._raise_stale = on_stale == "raise"
        self._state = Coherence(
            self._store,
            self._clock,
            threading.RLock(),
            self._max_staleness,
            probe_timeout=max(3 * self._max_staleness, 2.0),
            hooks=node._root._hooks,
        )
        self._core = MapCore(
            keys,
            self._state,
            get_codec(codec),
            new_token=_tokens,
            default_ttl=ttl,
            max_key_bytes=max_key_bytes,
            max_value_bytes=max_value_bytes,
            push_values=push_values,
        )
        self._state.decode = self._core.codec.decode
        self._listener_timeout = min(max(self._max_staleness, 0.25), 2.0)
        slot = None if node._root.router is None else key_slot(keys.meta)
        self._member = Member(self._state, keys, slot)
        self._listen_at(slot)
        self._member.relisten = self._relisten
        self._hits = 0
        self._misses = 0
        self._closed = False
        registry.add_map(self)  # (for syncmap.metrics: read at collect time)

    def _listen_at(self, slot: int | None) -> Any:
        """Take the node's listener for ``slot`` (on a Cluster: the one of the master owning
        it now) as the map's, and return it."""
        self._listener = self.node._listener_for(slot, self._listener_timeout)
        return self._listener

    def _relisten(self, member: Member) -> None:
        """(Cluster) The map's slot now lives on another master: listen there."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {self.node.address}>"

    def _follow(self, data: dict[str, tuple[Any, float, Any]]) -> None:
        # (set with the swap, under the store's lock; a hit between the two sees the other
        # store's move_to_end: a KeyError it ignores, or the key's move in the new store)
        self._touch = data.move_to_end if isinstance(data, OrderedDict) else None
        self._data = data

    def _local(self, key: Any) -> Any:
        """The local copy's value (``ABSENT`` for a cached miss), or ``_MISSING``. Reads the
        store's dict in place, as SafeHashMap.get does (the lookup, the entry's deadline, the
        LRU touch), with one clock read for the deadline and the proof (contract §5)."""
        try:
            entry, expires, _ = self._data[key]
        except (KeyError, TypeError):  # (unhashable: not cached; the server path names it)
            return _MISSING
        if entry.__class__ is Entry:
            now = self._clock()
            if now >= expires:  # expired: absent (the store drops it lazily)
                return _MISSING
            if now <= self._state.fresh_until:  # a hit (LRU move, count: inline, as in get)
                touch = self._touch
                if touch is not None:
                    try:  # noqa: SIM105 (contextlib.suppress costs more on this hot path)
                        touch(key)
                    except KeyError:  # a writer removed it since our read: the read stands
                        pass
                self._hits += 1
                return entry.value
            if self._raise_stale:
                raise StaleRead(self._stale_message())
        return _MISSING

    def _local_read(self, key: Any) -> Any:
        """:meth:`_local` for a read that goes to the server when the key is not cached (a
        miss is counted)."""
        value = self._local(key)
        if value is _MISSING:
            self._misses += 1
        return value

    def _stale_message(self) -> str:
        age = self._clock() - self._state.verified_at
        shown = "never" if math.isinf(age) else f"{age:.3f}s ago"
        return (
            f"map {self.name!r}: the local copy was last proven current {shown}, beyond "
            f"max_staleness={self._max_staleness}s (listener stalled or server unreachable?)"
        )

    def get_local(self, key: Any, default: Any = None) -> Any:
        """The local copy's value if it is cached and fresh, else ``default``; no server call.
        (With ``on_stale="raise"``, a cached but unprovable entry raises StaleRead.)"""
        value = self._local(key)
        return default if value is _MISSING or value is ABSENT else value

    @property
    def stats(self) -> MapStats:
        state = self._state
        return MapStats(
            hits=self._hits,
            misses=self._misses,
            invalidations=state.invalidations,
            resyncs=state.resyncs,
            resync_causes=dict(state.resync_causes),
            local_size=len(self._store),
            skipped_messages=state.skipped,
            verified_age=self._clock() - state.verified_at,
        )

    def _closing(self) -> None:
        self._closed = True
        self._state.resync(None)  # nothing is served or installed locally after close
        registry.retire_map(self)


class SyncMap(_MapBase, MutableMapping[str, Any]):
    """The blocking map. Make one with ``node.map(name, ...)``; its contract: docs/contract.md."""

    _listener: SyncListener

    def __init__(self, node: Node, name: str, **options: Any) -> None:
        super().__init__(node, name, **options)
        self._driver = _Driver(node.client, node.address)
        self._driver.while_waiting = self._poll_while_waiting
        self._next_poll = 0.0  # the read path applies waiting change messages from then on
        self._read_until = -math.inf  # a local hit is served without more checks until then
        self._store.follow_deadlines(self._unsettle)
        self._next_op_poll = 0.0  # the same before a server operation (less often: batches)
        self._op_poll_by = 0.0  # ... and not skipped past this time
        self._quiet = False  # the running operation came after a quiet spell (no polling)
        self._start()  # (a blocking map starts as it is made; an asyncio one in open)

    @classmethod
    def open(cls, node: Node, name: str, **options: Any) -> SyncMap:
        """The map, started (as ``AsyncSyncMap.open``: ``node.map(name)`` calls it)."""
        return cls(node, name, **options)

    # unasync: generated start (from the asyncio code by scripts/unasync.py: do not edit)
    def _start(self) -> None:
        """Listen for the map's changes, and wait (usually ms, at most 2 s) for the first
        proof that the copy is current: ready to cache right away."""
        self._listener.register(self._member)
        deadline = time.monotonic() + 2.0
        while not self._state.synced and time.monotonic() < deadline:
            time.sleep(0.001)

    # unasync: end

    def _relisten(self, member: Member) -> None:
        self._listen_at(member.slot).register(member)  # (in the listener thread)

    def _run(self, flow: MapFlow[T]) -> T:
        now, listener = self._clock(), self._listener
        if not listener.started:  # a forked child's first call (every read is one there)
            listener.start()
        self._quiet = now - listener.last_poll >= READERS_ACTIVE
        listener.last_poll = now  # busy: the listener thread keeps out of the way
        return self._driver.run(flow)  # type: ignore[arg-type]  # it performs Call too

    def _poll_while_waiting(self, answered: Callable[[], bool]) -> None:
        """Apply waiting change messages (e.g. of our own writes) while the server works on
        our command: the driver calls this between sending and reading. Not when the answer
        is already in (the server ran at once, on this CPU say, as the send woke it): that
        would only delay the caller; the messages wait for the next time, but no longer than
        OP_POLL_MAX_SKIP (a busy writer keeps the listener thread away: see _listener).

        Not for the first operation after a quiet spell either: the listener thread watched
        the socket until now and applied what came, so there is nothing to gain, and the
        answer of a server that was idle comes back fast enough to find this thread busy (a
        write after a pause measured ~40 µs slower at p50, ~140 µs at p99, on 2 vCPUs)."""
        if self._quiet:
            self._quiet = False
            return
        now = self._clock()
        answered = self._state.hooks.answered or answered
        if now >= self._next_op_poll and (now >= self._op_poll_by or not answered()):
            self._next_op_poll = now + OP_POLL_INTERVAL
            self._op_poll_by = now + OP_POLL_MAX_SKIP
            self._next_poll = now + POLL_INTERVAL
            self._listener.poll(now)
        else:
            self._listener.last_poll = now

    # ---- reads ----

    # The hit path of get and [] reads the local store's dict in place, without a call into
    # it: SafeHashMap.get's lock-free read (see _local.py: the lookup, the LRU touch). It reads
    # the clock once and compares it with one deadline, _read_until, which _read settles with
    # the store (SafeHashMap.settle): the earliest of the next poll, fresh_until, and the
    # earliest time an entry of the store may expire (so no entry's own deadline is read).
    # That deadline can only be early, never late: the next poll only moves later; fresh_until
    # only grows, except when the copy is dropped (Coherence._resync), which empties the store,
    # and nothing is installed in it again before a new proof moves fresh_until past the old
    # one; and the store resets it (_unsettle, under its lock, then the write) before it
    # writes an entry that may expire sooner. The entry is looked up before the deadline is
    # read, so a hit on an entry just written sees that reset. The lookup gives the entry's
    # value itself (the store keeps it beside the entry: its view). It serves only a value
    # that is not ABSENT, and a Placeholder's value is ABSENT: no type check. Past the
    # deadline, on a miss, a placeholder or a cached absence, _read does the rest.

    def get(self, key: Any, default: Any = None, fresh: bool = False) -> Any:
        """The value of ``key`` (``default`` if absent): local when fresh, else the server's.
        ``fresh=True``: linearizable, at the cost of one small round trip."""
        try:
            value = self._data[key][2]  # (the entry's value: the store's view of it)
        except (KeyError, TypeError):  # (unhashable: _read names the error)
            return self._read(key, default, fresh)
        # (the clock: a module global, cheaper than self._clock here)
        if _monotonic() < self._read_until and value is not ABSENT and not fresh:
            touch = self._touch
            if touch is not None:
                try:  # noqa: SIM105 (contextlib.suppress costs more on this hot path)
                    touch(key)
                except KeyError:  # a writer removed it since our read: the read stands
                    pass
            self._hits += 1
            return value
        return self._read(key, default, fresh)

    def __getitem__(self, key: str) -> Any:
        try:
            value = self._data[key][2]
        except (KeyError, TypeError):
            value = ABSENT
        if _monotonic() < self._read_until and value is not ABSENT:  # as in get
            touch = self._touch
            if touch is not None:
                try:  # noqa: SIM105
                    touch(key)
                except KeyError:
                    pass
            self._hits += 1
            return value
        value = self._read(key, _MISSING, False)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def _unsettle(self) -> None:
        """The store is about to write an entry that may expire before ``_read_until``: hits
        go through :meth:`_read` until it settles the deadline again (store's lock held)."""
        self._read_until = -math.inf

    def _settled(self, until: float) -> None:
        self._read_until = until  # (store's lock held: see SafeHashMap.settle)

    def _read(self, key: Any, default: Any, fresh: bool) -> Any:
        """``get`` past the hit path: applies the waiting change messages when a poll is due
        (then reads again), and sets the hit path's deadline; else goes to the server."""
        if not fresh:
            try:
                entry = self._store.get(key)
            except TypeError:
                entry = None
            if entry.__class__ is Entry:
                now = self._clock()
                fresh_until = self._state.fresh_until
                if now <= fresh_until:
                    if now >= self._next_poll:
                        # due: apply waiting change messages here (see _listener), read again
                        self._next_poll = now + POLL_INTERVAL
                        self._listener.poll(now)
                        entry = self._store.get(key)
                        now = self._clock()
                        fresh_until = self._state.fresh_until
                    self._store.settle(min(self._next_poll, fresh_until), self._settled)
                    if entry.__class__ is Entry and now <= fresh_until:
                        self._hits += 1
                        value = entry.value
                        return default if value is ABSENT else value
                elif self._raise_stale:
                    raise StaleRead(self._stale_message())
        self._misses += 1
        return self._run(self._core.get(key, default, fresh))

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return self._run(self._core.length())

    def __iter__(self) -> Iterator[str]:
        return iter(self._run(self._core.key_list()))

    # ---- writes ----

    def __setitem__(self, key: str, value: Any) -> None:
        self._run(self._core.set(key, value, None, None))

    def __delitem__(self, key: str) -> None:
        if not self._run(self._core.delete(key, None)):
            raise KeyError(key)

    def _catch_up(self) -> None:
        """Before a bulk read: apply waiting change messages first (as get does)."""
        now = self._clock()
        if now >= self._next_poll:
            self._next_poll = now + POLL_INTERVAL
            self._listener.poll(now)

    def items(self) -> ItemsView[str, Any]:
        return _Items(self)

    def values(self) -> ValuesView[Any]:
        return _Values(self)

    # unasync: generated writes (from the asyncio code by scripts/unasync.py: do not edit)
    def set(self, key: str, value: Any, ttl: float | None = None, guard: Any = None) -> None:
        """Write ``key``; ``ttl`` in seconds (default: the map's); ``guard``: a held Lock."""
        self._run(self._core.set(key, value, ttl, guard))

    def delete(self, key: str, guard: Any = None) -> bool:
        """Remove ``key``; True if it existed."""
        return self._run(self._core.delete(key, guard))

    def pop(self, key: str, default: Any = _MISSING, *, guard: Any = None) -> Any:
        value = self._run(self._core.pop(key, ABSENT, guard))
        if value is ABSENT:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def setdefault(self, key: str, default: Any = None, *, guard: Any = None) -> Any:
        return self._run(self._core.setdefault(key, default, guard))

    def popitem(self, *, guard: Any = None) -> tuple[str, Any]:
        """Remove and return some ``(key, value)`` (atomically: no other node can change the
        value between the read and the removal); KeyError when the map is empty."""
        return self._run(self._core.popitem(guard))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Write every pair (a mapping, pairs, keywords), as ``dict.update``: a bulk write
        (see :meth:`set_many`) with the map's TTL."""
        self._run(self._core.set_many(_pairs(other, kwargs), None))

    def set_many(self, pairs: Any, ttl: float | None = None) -> None:
        """Write every pair of ``pairs`` (a mapping or ``(key, value)`` pairs); ``ttl`` in
        seconds (default: the map's). One round trip for the whole batch; every key and value
        is checked and encoded first (bad input writes nothing); each pair is its own change,
        with its own version, as if written by :meth:`set` in turn."""
        self._run(self._core.set_many(_pairs(pairs, {}), ttl))

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The keys of ``keys`` that have a value, with it: local entries from the local copy,
        the others fetched in one round trip (and cached, as :meth:`get` does)."""
        self._catch_up()
        return self._run(self._core.get_many(keys, self._local_read, _MISSING))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove every key of ``keys`` in one round trip; how many existed."""
        return self._run(self._core.delete_many(keys))

    def clear(self) -> None:
        """Remove every entry (one script; every node drops its copy)."""
        self._run(self._core.clear())

    def compare_and_set(
        self, key: str, expected: Any, new: Any, ttl: float | None = None, guard: Any = None
    ) -> bool:
        """Set ``key`` to ``new`` if its value equals ``expected`` (absent never matches)."""
        return self._run(self._core.compare_and_set(key, expected, new, ttl, guard))

    def update_item(
        self,
        key: str,
        fn: Callable[[Any], Any],
        default: Any = None,
        ttl: float | None = None,
        *,
        guard: Any = None,
    ) -> Any:
        """Atomically replace the value ``v`` of ``key`` (``default`` if absent) by ``fn(v)``;
        ``fn`` may run more than once under contention. Returns the new value."""
        return self._run(self._core.update_item(key, fn, default, ttl, guard))

    def incr(self, key: str, amount: int = 1, *, guard: Any = None, create: bool = True) -> int:
        """Atomically add ``amount`` to the integer counter ``key`` (absent: 0, or
        :class:`KeyError` with ``create=False``)."""
        return self._run(self._core.incr(key, amount, guard, create))

    def add(self, key: str, value: Any, ttl: float | None = None, *, guard: Any = None) -> bool:
        """Write ``key`` only if it is absent (atomically); True if this call wrote it."""
        return self._run(self._core.add(key, value, ttl, guard))

    def touch(self, key: str, ttl: float | None = None, *, guard: Any = None) -> bool:
        """Give an existing ``key`` a new TTL (seconds; None: the map's default, if any, else
        no expiry), atomically; False if it is absent."""
        return self._run(self._core.touch(key, ttl, guard))

    def get_or_load(
        self, key: str, loader: Callable[[], Any], ttl: float | None = None, timeout: float = 10.0
    ) -> Any:
        """The value of ``key``; if absent, ``loader()`` runs on exactly one node and its
        result is stored (``ttl``) and returned to every waiting node."""
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        return self._run(self._core.get_or_load(key, loader, ttl, timeout))

    # unasync: end

    # unasync: generated items (from the asyncio code by scripts/unasync.py: do not edit)
    def _each_item(self) -> Iterator[tuple[str, Any]]:
        """The map's ``(key, value)`` pairs: its keys are listed first, then each value is read
        in turn; a key deleted meanwhile (by any node) is skipped, not a KeyError."""
        for key in self.keys():
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                yield key, value

    # unasync: end

    def cached(
        self,
        ttl: float | None = None,
        *,
        key: str | Callable[..., str] | None = None,
        timeout: float = 10.0,
        early_refresh: float | None = None,
    ) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
        """Decorate a function: its results live in this map, one entry per call's key
        (module, qualified name and arguments; or ``key=``, a template or a callable), each
        loaded once across all nodes (:meth:`get_or_load`); ``early_refresh`` (XFetch's
        beta, with a ``ttl``): recompute hot entries in the background before they expire.
        See :mod:`syncmap._cached`."""
        return cached(self, ttl, key, timeout, early_refresh)

    # unasync: generated lifecycle (from the asyncio code by scripts/unasync.py: do not edit)
    def watch(self, timeout: float | None = None) -> Iterator[MapChange]:
        """Yield the map's changes as this node's listener receives them, for ``timeout``
        seconds (``None``: until the caller stops). Best effort: a change lost on the way is
        not replayed (the local copy is still dropped: contract §4); a "set" carries the
        value read when the change is yielded."""
        changes = _Changes()
        self._state.watchers.append(changes.put)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (change := changes.next(deadline)) is not None:
                value = self.get(change.key) if change.op == "S" else None
                yield MapChange(_OPS[change.op], change.key, value)
        finally:
            self._state.watchers.remove(changes.put)

    def close(self) -> None:
        """Stop the listener; the local copy is no longer used (server calls still work)."""
        if not self._closed:
            self._closing()
            self._listener.unregister(self._member)

    def __enter__(self) -> SyncMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # unasync: end


class AsyncSyncMap(_MapBase):
    """The asyncio map. ``await anode.map(name, ...)``; server operations are awaited,
    ``get_local`` reads the local copy without awaiting."""

    _listener: AsyncListener

    def __init__(self, node: AsyncNode, name: str, **options: Any) -> None:
        super().__init__(node, name, **options)
        self._driver = _AsyncDriver(node.client, node.address)
        self._relistening: set[asyncio.Task[None]] = set()
        self._next_yield = 0.0  # a local hit yields to the event loop from then on

    @classmethod
    async def open(cls, node: AsyncNode, name: str, **options: Any) -> AsyncSyncMap:
        """The map, started: ``await anode.map(name)`` calls it (a constructor cannot await)."""
        self = cls(node, name, **options)
        await self._start()
        return self

    # unasync: source start
    async def _start(self) -> None:
        """Listen for the map's changes, and wait (usually ms, at most 2 s) for the first
        proof that the copy is current: ready to cache right away."""
        await self._listener.register(self._member)
        deadline = time.monotonic() + 2.0
        while not self._state.synced and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    # unasync: end

    def _relisten(self, member: Member) -> None:
        # (in the listener task: registering awaits, so it is a task of its own)
        register = self._listen_at(member.slot).register(member)
        task = asyncio.get_running_loop().create_task(register)
        self._relistening.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._relistening.discard)

    async def _run(self, flow: MapFlow[T]) -> T:
        if self._listener.forked:
            raise NodeForked(
                f"map {self.name!r}: its asyncio node was made before os.fork(); "
                "call connect_async() in the child process"
            )
        return await self._driver.run(flow)  # type: ignore[arg-type]  # it performs Call too

    async def get(self, key: Any, default: Any = None, fresh: bool = False) -> Any:
        if not fresh:
            now = self._clock()
            if now >= self._next_yield:
                # a local hit does not suspend: a task spinning on get() would starve the
                # listener task (until max_staleness). Every YIELD_INTERVAL it lets it run.
                # After a longer gap (the loop was blocked, say), messages may be waiting
                # that the loop would apply only after this read: apply them first.
                if now - self._next_yield > STALL and not self._listener.poll():
                    await asyncio.sleep(0)  # (redis-py's reader: two more turns of the loop
                    await asyncio.sleep(0)  # for its task to read and apply them)
                self._next_yield = now + YIELD_INTERVAL
                await asyncio.sleep(0)
            value = self._local(key)
            if value is not _MISSING:
                return default if value is ABSENT else value
        self._misses += 1
        return await self._run(self._core.get(key, default, fresh))

    async def contains(self, key: Any) -> bool:
        return await self.get(key, _MISSING) is not _MISSING

    async def length(self) -> int:
        return await self._run(self._core.length())

    async def keys(self) -> list[str]:
        return await self._run(self._core.key_list())

    # unasync: source writes
    async def set(self, key: str, value: Any, ttl: float | None = None, guard: Any = None) -> None:
        """Write ``key``; ``ttl`` in seconds (default: the map's); ``guard``: a held Lock."""
        await self._run(self._core.set(key, value, ttl, guard))

    async def delete(self, key: str, guard: Any = None) -> bool:
        """Remove ``key``; True if it existed."""
        return await self._run(self._core.delete(key, guard))

    async def pop(self, key: str, default: Any = _MISSING, *, guard: Any = None) -> Any:
        value = await self._run(self._core.pop(key, ABSENT, guard))
        if value is ABSENT:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    async def setdefault(self, key: str, default: Any = None, *, guard: Any = None) -> Any:
        return await self._run(self._core.setdefault(key, default, guard))

    async def popitem(self, *, guard: Any = None) -> tuple[str, Any]:
        """Remove and return some ``(key, value)`` (atomically: no other node can change the
        value between the read and the removal); KeyError when the map is empty."""
        return await self._run(self._core.popitem(guard))

    async def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Write every pair (a mapping, pairs, keywords), as ``dict.update``: a bulk write
        (see :meth:`set_many`) with the map's TTL."""
        await self._run(self._core.set_many(_pairs(other, kwargs), None))

    async def set_many(self, pairs: Any, ttl: float | None = None) -> None:
        """Write every pair of ``pairs`` (a mapping or ``(key, value)`` pairs); ``ttl`` in
        seconds (default: the map's). One round trip for the whole batch; every key and value
        is checked and encoded first (bad input writes nothing); each pair is its own change,
        with its own version, as if written by :meth:`set` in turn."""
        await self._run(self._core.set_many(_pairs(pairs, {}), ttl))

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The keys of ``keys`` that have a value, with it: local entries from the local copy,
        the others fetched in one round trip (and cached, as :meth:`get` does)."""
        await self._catch_up()
        return await self._run(self._core.get_many(keys, self._local_read, _MISSING))

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Remove every key of ``keys`` in one round trip; how many existed."""
        return await self._run(self._core.delete_many(keys))

    async def clear(self) -> None:
        """Remove every entry (one script; every node drops its copy)."""
        await self._run(self._core.clear())

    async def compare_and_set(
        self, key: str, expected: Any, new: Any, ttl: float | None = None, guard: Any = None
    ) -> bool:
        """Set ``key`` to ``new`` if its value equals ``expected`` (absent never matches)."""
        return await self._run(self._core.compare_and_set(key, expected, new, ttl, guard))

    async def update_item(
        self,
        key: str,
        fn: Callable[[Any], Any],
        default: Any = None,
        ttl: float | None = None,
        *,
        guard: Any = None,
    ) -> Any:
        """Atomically replace the value ``v`` of ``key`` (``default`` if absent) by ``fn(v)``;
        ``fn`` may run more than once under contention. Returns the new value."""
        return await self._run(self._core.update_item(key, fn, default, ttl, guard))

    async def incr(
        self, key: str, amount: int = 1, *, guard: Any = None, create: bool = True
    ) -> int:
        """Atomically add ``amount`` to the integer counter ``key`` (absent: 0, or
        :class:`KeyError` with ``create=False``)."""
        return await self._run(self._core.incr(key, amount, guard, create))

    async def add(
        self, key: str, value: Any, ttl: float | None = None, *, guard: Any = None
    ) -> bool:
        """Write ``key`` only if it is absent (atomically); True if this call wrote it."""
        return await self._run(self._core.add(key, value, ttl, guard))

    async def touch(self, key: str, ttl: float | None = None, *, guard: Any = None) -> bool:
        """Give an existing ``key`` a new TTL (seconds; None: the map's default, if any, else
        no expiry), atomically; False if it is absent."""
        return await self._run(self._core.touch(key, ttl, guard))

    async def get_or_load(
        self, key: str, loader: Callable[[], Any], ttl: float | None = None, timeout: float = 10.0
    ) -> Any:
        """As :meth:`SyncMap.get_or_load`; ``loader`` may be a coroutine function."""
        value = await self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        return await self._run(self._core.get_or_load(key, loader, ttl, timeout))

    # unasync: end

    async def _catch_up(self) -> None:
        """Before a bulk read: let the listener task apply what waits."""
        # (a blocking map's thread applies it itself: SyncMap._catch_up)
        if self._clock() >= self._next_yield:
            self._next_yield = self._clock() + YIELD_INTERVAL
            await asyncio.sleep(0)

    async def items(self) -> list[tuple[str, Any]]:
        """``(key, value)`` pairs: the keys are listed first, then each value is read; a key
        deleted meanwhile is skipped."""
        return [pair async for pair in self._each_item()]

    # unasync: source items
    async def _each_item(self) -> AsyncIterator[tuple[str, Any]]:
        """The map's ``(key, value)`` pairs: its keys are listed first, then each value is read
        in turn; a key deleted meanwhile (by any node) is skipped, not a KeyError."""
        for key in await self.keys():
            value = await self.get(key, _MISSING)
            if value is not _MISSING:
                yield key, value

    # unasync: end

    async def values(self) -> list[Any]:
        return [value for _, value in await self.items()]

    def cached(
        self,
        ttl: float | None = None,
        *,
        key: str | Callable[..., str] | None = None,
        timeout: float = 10.0,
        early_refresh: float | None = None,
    ) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], AsyncCachedFunction[P, R]]:
        """As :meth:`SyncMap.cached`, for ``async def`` functions."""
        return cached_async(self, ttl, key, timeout, early_refresh)

    # unasync: source lifecycle
    async def watch(self, timeout: float | None = None) -> AsyncIterator[MapChange]:
        """As :meth:`SyncMap.watch`: ``async for change in m.watch(timeout=...)``."""
        changes = _AsyncChanges()
        self._state.watchers.append(changes.put)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (change := await changes.next(deadline)) is not None:
                value = await self.get(change.key) if change.op == "S" else None
                yield MapChange(_OPS[change.op], change.key, value)
        finally:
            self._state.watchers.remove(changes.put)

    async def close(self) -> None:
        """Stop the listener; the local copy is no longer used (server calls still work)."""
        if not self._closed:
            self._closing()
            if self._listener.forked:  # unasync: drop
                return  # (the parent's listener: see AsyncListener._after_fork)  # unasync: drop
            await self._listener.unregister(self._member)

    async def __aenter__(self) -> AsyncSyncMap:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # unasync: end
