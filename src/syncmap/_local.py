"""SafeHashMap: the thread-safe in-process map (per-entry TTL, LRU bound, stats).

Concurrency model (CPython 3.11, which has a GIL):

* Reads (``get``, ``[]``, ``in``) take no lock. Each touches the store with single C-level
  operations (``dict.__getitem__``, ``OrderedDict.move_to_end``) that the GIL makes atomic,
  so a read sees an entry either before or after a concurrent write, never half of one. A
  writer may remove the key between a reader's lookup and its ``move_to_end``; the reader
  then catches the ``KeyError`` and still returns the value it found (it was current when
  read).
* Every write, and every read that must look at more than one key (``len``, iteration,
  ``popitem``), holds one ``threading.Lock``. Writers make room *before* inserting, so no
  reader ever sees more than ``maxsize`` entries.
* Entries are ``(value, deadline, view)`` tuples. ``deadline`` is ``inf`` without a TTL, so
  a hit on such an entry costs one float comparison and no clock call. ``view`` is the value
  itself, or what the map's ``view`` makes of it: for a reader of the store's dict
  (``follow_store``) that wants a part of the value without another lookup.
* Expired entries are dropped lazily: by the read that finds one, and in bulk through a
  min-heap of deadlines before ``len``, iteration and eviction. Every entry with a deadline
  has a heap record due no later than it; refreshing an entry to a later deadline (the
  common case) pushes nothing, and the old record is re-filed when it comes due. Records
  of deleted keys are skipped when popped; the heap is rebuilt if they pile up. A record is
  filed before its entry is written, so the heap's first record bounds every deadline: a
  reader that keeps the store's dict (``follow_store``) may skip reading deadlines until
  ``settle``'s time, and ``follow_deadlines`` resets it before an entry that expires sooner.
* Hit and miss counters are bumped without the lock. CPython 3.11 checks for a thread
  switch only at calls and backward jumps, never between the load and the store of
  ``self._hits += 1``, so they come out exact; on other interpreters they may under-count
  a little under concurrent reads. The other counters change only under the lock.

Keys that hash and compare in C (``str``, ``bytes``, ``int``, tuples of them) make each
lock-free step atomic. Keys that hash in Python let the GIL switch inside a lookup; reads
stay correct, and a bounded map's snapshot may then fall back to an order other than LRU
(see ``_entries``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    Mapping,
    MutableMapping,
    ValuesView,
)
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from ._core.validate import check_seconds
from ._errors import InvalidArgument

__all__ = ["LocalStats", "SafeHashMap"]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

_NEVER = math.inf
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class LocalStats:
    """A snapshot of a :class:`SafeHashMap`'s counters."""

    hits: int
    misses: int
    evictions: int
    expirations: int
    size: int
    maxsize: int | None

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


def _check_maxsize(maxsize: object) -> int | None:
    if maxsize is None:
        return None
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise InvalidArgument(f"maxsize must be an int or None, not {type(maxsize).__name__}")
    if maxsize < 1:
        raise InvalidArgument(f"maxsize must be >= 1, got {maxsize}")
    return maxsize


class SafeHashMap(MutableMapping[K, V], Generic[K, V]):
    """A thread-safe map with optional per-entry TTL and an LRU size bound.

    ``maxsize=None`` is unbounded; ``ttl=None`` means entries never expire unless
    ``set(..., ttl=)`` says otherwise. ``timer`` is the clock the deadlines are read on.
    ``view(value)``, if given, is kept beside each value for readers of the store's dict
    (:meth:`follow_store`). Iteration, ``keys()``, ``values()`` and ``items()`` walk a
    snapshot (least recently used first when bounded), so they never raise while other
    threads write. Only ``get``, ``[]`` and ``setdefault`` count as hits/misses and refresh
    recency; ``in`` does neither.
    """

    __slots__ = (
        "__weakref__",
        "_data",
        "_evictions",
        "_expirations",
        "_expiry",
        "_hits",
        "_lock",
        "_maxsize",
        "_misses",
        "_on_deadline",
        "_on_new_store",
        "_seq",
        "_timer",
        "_touch",
        "_ttl",
        "_view",
    )

    _data: dict[K, tuple[V, float, Any]]
    _touch: Callable[[K], None] | None

    def __init__(
        self,
        maxsize: int | None = None,
        ttl: float | None = None,
        *,
        timer: Callable[[], float] = time.monotonic,
        view: Callable[[V], Any] | None = None,
    ) -> None:
        self._maxsize = _check_maxsize(maxsize)
        self._ttl = None if ttl is None else check_seconds(ttl, "ttl")
        if not callable(timer):
            raise InvalidArgument(f"timer must be callable, not {type(timer).__name__}")
        if view is not None and not callable(view):
            raise InvalidArgument(f"view must be callable or None, not {type(view).__name__}")
        self._timer = timer
        self._view = view
        self._lock = threading.Lock()
        self._expiry: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._hits = self._misses = self._evictions = self._expirations = 0
        self._on_new_store: Callable[[dict[K, tuple[V, float, Any]]], None] | None = None
        self._on_deadline: Callable[[], None] | None = None
        self._new_store()

    def follow_store(self, callback: Callable[[dict[K, tuple[V, float, Any]]], None]) -> None:
        """Call ``callback(store)`` now and with each new store (``clear`` swaps it): for a
        reader that keeps the store's dict itself (SyncMap's hit path). The dict maps each
        key to ``(value, deadline, view)`` (see the module docstring)."""
        self._on_new_store = callback
        callback(self._data)

    def follow_deadlines(self, reset: Callable[[], None]) -> None:
        """For a reader that serves entries without checking their deadlines until a time
        :meth:`settle` gave it (SyncMap's hit path): ``reset()`` is called, lock held, before
        an entry is written whose deadline is earlier than that time may be. The reader then
        checks deadlines again until it settles anew."""
        self._on_deadline = reset

    def settle(self, until: float, keep: Callable[[float], None]) -> None:
        """``keep(t)``, lock held: ``t`` is ``until`` or, if earlier, the earliest time an
        entry may expire (expired entries are dropped first). No entry expires before ``t``,
        and until :meth:`follow_deadlines`' ``reset()`` is called, no entry that expires
        before ``t`` is written."""
        with self._lock:
            heap = self._expiry
            if heap and heap[0][0] <= self._timer():
                self._purge()
                heap = self._expiry
            keep(min(until, heap[0][0]) if heap else until)

    def _new_store(self) -> None:
        # Unbounded maps need no recency order: a plain dict reads faster than an OrderedDict.
        if self._maxsize is None:
            self._data = {}
            self._touch = None
        else:
            ordered: OrderedDict[K, tuple[V, float, Any]] = OrderedDict()
            self._data = ordered
            self._touch = ordered.move_to_end
        if self._on_new_store is not None:
            self._on_new_store(self._data)

    @property
    def maxsize(self) -> int | None:
        return self._maxsize

    @property
    def ttl(self) -> float | None:
        """The default TTL in seconds (``None``: entries do not expire by default)."""
        return self._ttl

    # ---- reads (lock-free) -------------------------------------------------------------

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T) -> V | T: ...

    def get(self, key: K, default: Any = None) -> Any:
        try:
            value, deadline, _ = self._data[key]
        except KeyError:
            self._misses += 1
            return default
        if deadline < _NEVER and deadline <= self._timer():
            self._drop_if_expired(key)
            self._misses += 1
            return default
        touch = self._touch
        if touch is not None:
            try:  # noqa: SIM105 (contextlib.suppress costs more on this hot path)
                touch(key)
            except KeyError:  # a writer removed it since our read: the read still stands
                pass
        self._hits += 1
        return value

    def __getitem__(self, key: K) -> V:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        entry = self._data.get(key)  # type: ignore[arg-type]
        return entry is not None and self._alive(entry[1])

    def _alive(self, deadline: float) -> bool:
        return deadline == _NEVER or deadline > self._timer()

    # ---- whole-map reads (snapshots under the lock) -------------------------------------

    def __len__(self) -> int:
        if self._expiry:
            with self._lock:
                self._purge()
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter([key for key, _ in self._snapshot()])

    def _snapshot(self) -> list[tuple[K, V]]:
        with self._lock:
            self._purge()
            entries = self._entries()
        return [(key, entry[0]) for key, entry in entries]

    def _entries(self) -> list[tuple[K, tuple[V, float, Any]]]:
        """A copy of the store, least recently used first when bounded (lock held).

        Writers wait on the lock, but lock-free readers may ``move_to_end`` meanwhile. The
        dict's own table is never reordered, so copying it is always complete. The
        OrderedDict's order is read in one C-level pass, which no reader can interleave
        with while keys hash in C; keys that hash in Python can let a move in, and the pass
        then skips or repeats keys, or raises. So that order is used only if it is a
        permutation of the table; after a few tries the table's order is used instead.
        """
        data = self._data
        table = list(dict.items(data))
        if self._touch is None:
            return table
        for _ in range(3):
            try:
                order = list(data)
            except RuntimeError:  # "OrderedDict mutated during iteration"
                continue
            if len(order) == len(table) and len(set(order)) == len(table):
                return [(key, data[key]) for key in order]
        return table

    def items(self) -> _ItemsView[K, V]:
        return _ItemsView(self)

    def values(self) -> _ValuesView[V]:
        return _ValuesView(self)

    def _peek(self, key: K) -> V:
        """The live value of ``key`` without counting or refreshing it; ``KeyError`` if none."""
        entry = self._data.get(key)
        if entry is None or not self._alive(entry[1]):
            raise KeyError(key)
        return entry[0]

    # ---- writes (under the lock) ---------------------------------------------------------

    def set(self, key: K, value: V, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; ``ttl=None`` uses the map's default TTL."""
        seconds = self._ttl if ttl is None else check_seconds(ttl, "ttl")
        with self._lock:
            self._store(key, value, seconds)

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
            self._store(key, value, self._ttl)

    def add(self, key: K, value: V, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); True if it stored."""
        seconds = self._ttl if ttl is None else check_seconds(ttl, "ttl")
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and self._alive(entry[1]):
                return False
            self._store(key, value, seconds)
            return True

    def replace(self, key: K, expected: V, value: V, ttl: float | None = None) -> bool:
        """If ``key``'s live value ``is expected``, store ``value`` instead; True if it did.

        Identity, not equality: a placeholder object installed before a fetch is replaced
        by the fetched value only if nothing (an invalidation, another write) took its place.
        """
        seconds = self._ttl if ttl is None else check_seconds(ttl, "ttl")
        with self._lock:
            entry = self._data.get(key)
            if entry is None or entry[0] is not expected or not self._alive(entry[1]):
                return False
            self._store(key, value, seconds)
            return True

    def setdefault(self, key: K, default: V = None) -> V:  # type: ignore[assignment]
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and self._alive(entry[1]):
                if self._touch is not None:
                    self._touch(key)
                self._hits += 1
                return entry[0]
            self._misses += 1
            self._store(key, default, self._ttl)
            return default

    def update(self, other: Any = (), /, **kwargs: V) -> None:
        """Like ``dict.update``, applied under one hold of the lock."""
        if isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(key, other[key]) for key in other.keys()]  # noqa: SIM118
        else:
            pairs = [(key, value) for key, value in other]
        pairs.extend(kwargs.items())
        with self._lock:
            for key, value in pairs:
                self._store(key, value, self._ttl)

    def _store(self, key: K, value: V, ttl: float | None) -> None:
        # Caller holds the lock.
        data = self._data
        old = data.get(key)
        if ttl is None:
            deadline = _NEVER
            if old is not None and old[1] < _NEVER and old[1] <= self._timer():
                old = self._forget_expired(key)  # None
        else:
            now = self._timer()
            deadline = now + ttl
            if old is not None and old[1] <= now:
                old = self._forget_expired(key)  # None
        if old is None:
            maxsize = self._maxsize
            if maxsize is not None and len(data) >= maxsize:
                self._make_room(maxsize)
        # An entry with a deadline needs a heap record due no later than it, filed before the
        # entry is written (see settle). A refresh to a later deadline keeps the old record,
        # which _purge re-files when it comes due.
        filed = deadline < (_NEVER if old is None else old[1])
        if filed:
            heap = self._expiry
            if self._on_deadline is not None and (not heap or deadline < heap[0][0]):
                self._on_deadline()  # (due before every other record: see settle)
            heapq.heappush(heap, (deadline, next(self._seq), key))
        view = self._view
        data[key] = (value, deadline, value if view is None else view(value))
        if old is not None and self._touch is not None:
            self._touch(key)
        if filed and len(self._expiry) > 2 * len(data) + 32:
            self._rebuild_expiry()

    def _forget_expired(self, key: K) -> tuple[V, float, Any] | None:
        """An expired key is absent: a write to it inserts anew, at the end (lock held)."""
        del self._data[key]
        self._expirations += 1
        return None

    def _make_room(self, maxsize: int) -> None:
        # Caller holds the lock; only bounded maps (OrderedDict) get here.
        self._purge()
        data = self._data
        while len(data) >= maxsize:
            data.popitem(last=False)  # type: ignore[call-arg]
            self._evictions += 1

    def _purge(self) -> None:
        """Drop every expired entry (caller holds the lock)."""
        heap = self._expiry
        if not heap:
            return
        now = self._timer()
        data = self._data
        while heap and heap[0][0] <= now:
            key = heapq.heappop(heap)[2]
            entry = data.get(key)
            if entry is None:  # deleted since
                continue
            if entry[1] <= now:
                del data[key]
                self._expirations += 1
            elif entry[1] < _NEVER:  # refreshed to a later deadline: re-file it
                heapq.heappush(heap, (entry[1], next(self._seq), key))

    def _rebuild_expiry(self) -> None:
        seq = self._seq
        heap = [(e[1], next(seq), k) for k, e in self._entries() if e[1] < _NEVER]
        heapq.heapify(heap)
        self._expiry = heap

    def _drop_if_expired(self, key: K) -> None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and not self._alive(entry[1]):
                del self._data[key]
                self._expirations += 1

    def _take(self, key: K) -> V:
        """Remove and return ``key``'s live value, ``_MISSING`` if none (caller holds the lock)."""
        entry = self._data.pop(key, None)
        if entry is None:
            return _MISSING  # type: ignore[no-any-return]
        if self._alive(entry[1]):
            return entry[0]
        self._expirations += 1
        return _MISSING  # type: ignore[no-any-return]

    def delete(self, key: K) -> bool:
        """Remove ``key``; True if a live entry was removed."""
        with self._lock:
            return self._take(key) is not _MISSING

    def __delitem__(self, key: K) -> None:
        if not self.delete(key):
            raise KeyError(key)

    @overload
    def pop(self, key: K) -> V: ...
    @overload
    def pop(self, key: K, default: V | T) -> V | T: ...

    def pop(self, key: K, default: Any = _MISSING) -> Any:
        with self._lock:
            value = self._take(key)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self) -> tuple[K, V]:
        """Remove and return the least recently used (bounded) or oldest (unbounded) entry."""
        with self._lock:
            self._purge()
            data = self._data
            if not data:
                raise KeyError("popitem(): map is empty")
            if self._touch is not None:  # bounded: an OrderedDict
                key, entry = data.popitem(last=False)  # type: ignore[call-arg]
            else:
                key = next(iter(data))
                entry = data.pop(key)
            return key, entry[0]

    def delete_if(self, key: K, predicate: Callable[[V], object]) -> bool:
        """Remove ``key`` if it is live and ``predicate(value)`` is true; True if removed.

        Atomic per entry: ``predicate`` runs without the lock (so it may be slow or even use
        this map), and the entry is removed only if it is still the very entry that was
        judged; if a writer replaced it meanwhile, the new one is judged instead.
        """
        data = self._data
        while True:
            entry = data.get(key)
            if entry is None:
                return False
            if not self._alive(entry[1]):
                self._drop_if_expired(key)
                return False
            if not predicate(entry[0]):
                return False
            with self._lock:
                data = self._data  # clear() may have swapped it
                if data.get(key) is entry:
                    return self._take(key) is not _MISSING

    def clear(self) -> None:
        """Empty the map: the store is swapped, so the lock is held for O(1)."""
        with self._lock:
            old = self._data
            self._new_store()
            self._expiry = []
        del old  # the old store is freed here, outside the lock

    # ---- stats -----------------------------------------------------------------------------

    @property
    def stats(self) -> LocalStats:
        size = len(self)
        return LocalStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            size=size,
            maxsize=self._maxsize,
        )

    def reset_stats(self) -> None:
        """Zero the hit, miss, eviction and expiration counters."""
        with self._lock:
            self._hits = self._misses = self._evictions = self._expirations = 0

    def __repr__(self) -> str:
        return f"<SafeHashMap size={len(self)} maxsize={self._maxsize} ttl={self._ttl}>"


class _ItemsView(ItemsView[K, V]):
    """``items()`` over a snapshot; ``in`` neither counts as a hit nor refreshes recency."""

    __slots__ = ()
    _mapping: SafeHashMap[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return iter(self._mapping._snapshot())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        try:
            current = self._mapping._peek(key)
        except KeyError:
            return False
        return current is value or current == value


class _ValuesView(ValuesView[V]):
    __slots__ = ()
    _mapping: SafeHashMap[Any, V]

    def __iter__(self) -> Iterator[V]:
        return iter([value for _, value in self._mapping._snapshot()])
