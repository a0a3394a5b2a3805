"""The process's maps and lock statistics, for :mod:`syncmap.metrics` to read at collect time.

Maps register themselves (a weak reference: a registry never keeps one alive) when made and
retire when closed (their final counts are kept, so counters never go backwards). Reading
them costs the read path nothing: exporters read the counters a map keeps anyway
(:attr:`SyncMap.stats`). Locks count acquisitions, their wait times (fixed buckets) and lost
holds, per lock name; lock names beyond :data:`MAX_LOCK_NAMES` are counted under ``"_other"``
(names made per user or per order would otherwise grow without bound).
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._map import MapStats

__all__ = ["LOCK_WAIT_BUCKETS", "LockStats", "MapTotals", "lock_stats", "registry"]

LOCK_WAIT_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
MAX_LOCK_NAMES: Final = 1000
OTHER: Final = "_other"


@dataclass
class MapTotals:
    """One map name's counts in this process (every open map of that name, plus the final
    counts of those closed)."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    resync_causes: dict[str, int] = field(default_factory=dict)
    local_items: int = 0
    verified_age: float = 0.0  # the oldest proof among the open maps (inf: never proven)

    def add(self, stats: MapStats, open_map: bool) -> None:
        self.hits += stats.hits
        self.misses += stats.misses
        self.invalidations += stats.invalidations
        for cause, count in stats.resync_causes.items():
            self.resync_causes[cause] = self.resync_causes.get(cause, 0) + count
        if open_map:
            self.local_items += stats.local_size
            self.verified_age = max(self.verified_age, stats.verified_age)


class LockStats:
    """One lock name's acquisitions, wait times and lost holds in this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.acquisitions = 0
        self.lost = 0
        self.wait_counts = [0] * (len(LOCK_WAIT_BUCKETS) + 1)  # the last: above every bound
        self.wait_sum = 0.0

    def acquired(self, wait: float) -> None:
        with self._lock:
            self.acquisitions += 1
            self.wait_counts[bisect.bisect_left(LOCK_WAIT_BUCKETS, wait)] += 1
            self.wait_sum += wait

    def lost_hold(self) -> None:
        with self._lock:
            self.lost += 1

    def snapshot(self) -> tuple[int, int, list[int], float]:
        """``(acquisitions, lost, wait counts per bucket, wait sum)``."""
        with self._lock:
            return self.acquisitions, self.lost, list(self.wait_counts), self.wait_sum


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, weakref.ref[Any]] = {}  # id: map (maps are unhashable)
        self._retired: dict[str, MapTotals] = {}
        self._locks: dict[str, LockStats] = {}
        self.wait_listeners: list[Callable[[str, float], None]] = []

    # -- maps --

    def add_map(self, m: Any) -> None:
        with self._lock:
            # (no weakref callback: it could run inside a collection while this lock is held)
            for key in [key for key, ref in self._maps.items() if ref() is None]:
                del self._maps[key]
            self._maps[id(m)] = weakref.ref(m)

    def retire_map(self, m: Any) -> None:
        with self._lock:
            ref = self._maps.get(id(m))
            if ref is None or id(ref()) != id(m):
                return
            del self._maps[id(m)]
            self._retired.setdefault(m.name, MapTotals()).add(m.stats, False)

    def map_totals(self) -> dict[str, MapTotals]:
        """Per map name: the counts of this process's maps of that name."""
        with self._lock:
            refs = [ref() for ref in self._maps.values()]
            maps = [m for m in refs if m is not None]
            totals = {}
            for name, retired in self._retired.items():
                totals[name] = MapTotals(
                    retired.hits, retired.misses, retired.invalidations,
                    dict(retired.resync_causes),
                )  # fmt: skip
        for m in maps:
            totals.setdefault(m.name, MapTotals()).add(m.stats, True)
        return totals

    # -- locks --

    def lock(self, name: str) -> LockStats:
        stats = self._locks.get(name)
        if stats is None:
            with self._lock:
                stats = self._locks.get(name)
                if stats is None:
                    if len(self._locks) >= MAX_LOCK_NAMES:
                        name = OTHER
                    stats = self._locks.setdefault(name, LockStats(name))
        return stats

    def lock_snapshots(self) -> dict[str, tuple[int, int, list[int], float]]:
        with self._lock:
            locks = list(self._locks.items())
        return {name: stats.snapshot() for name, stats in locks}

    def lock_acquired(self, name: str, wait: float) -> None:
        stats = self.lock(name)
        stats.acquired(wait)
        for listener in self.wait_listeners:
            listener(stats.name, wait)

    def forked(self) -> None:
        """In a forked child: every count starts from zero (a process's counts are its own,
        as prometheus_client's are: else a metrics backend adding up processes counts the
        parent's twice)."""
        self._lock = threading.Lock()
        self._retired.clear()
        for name in list(self._locks):
            self._locks[name] = LockStats(name)
        for ref in list(self._maps.values()):
            m = ref()
            if m is not None:
                m._hits = m._misses = 0


registry = _Registry()
os.register_at_fork(after_in_child=registry.forked)


def lock_stats(name: str) -> LockStats:
    """The statistics of lock ``name`` in this process."""
    return registry.lock(name)
