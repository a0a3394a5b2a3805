"""SafeHashMap against dict and cachetools, in one process, same run.

Every case is a zero-argument Python function around the statement under test; the cost of
calling an empty function is measured too and subtracted, so the table shows what the
statement itself costs in a caller's code. Each case is timed in several rounds, cases
interleaved, and the best round is kept (the machine is noisy; ratios hold better than ns).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import cachetools

from benchmarks._common import ns_per_call, print_table, quick
from syncmap import SafeHashMap

SIZE = 10_000
HOT = "key-4242"


def _cases() -> list[tuple[str, Callable[[], object]]]:
    keys = [f"key-{i}" for i in range(SIZE)]
    lock = threading.Lock()

    plain: dict[str, int] = dict.fromkeys(keys, 1)
    lru: cachetools.LRUCache[str, int] = cachetools.LRUCache(SIZE * 2)
    ttlc: cachetools.TTLCache[str, int] = cachetools.TTLCache(SIZE * 2, ttl=3600)
    unbounded: SafeHashMap[str, int] = SafeHashMap()
    unbounded_ttl: SafeHashMap[str, int] = SafeHashMap(ttl=3600)
    bounded: SafeHashMap[str, int] = SafeHashMap(maxsize=SIZE * 2)
    bounded_ttl: SafeHashMap[str, int] = SafeHashMap(maxsize=SIZE * 2, ttl=3600)
    for key in keys:
        lru[key] = ttlc[key] = 1
    for m in (unbounded, unbounded_ttl, bounded, bounded_ttl):
        m.update(plain)

    # full caches for "insert a new key, evicting the oldest"
    lru_full: cachetools.LRUCache[int, int] = cachetools.LRUCache(SIZE)
    safe_full: SafeHashMap[int, int] = SafeHashMap(maxsize=SIZE)
    for i in range(SIZE):
        lru_full[i] = safe_full[i] = i
    lru_next = itertools.count(SIZE).__next__
    safe_next = itertools.count(SIZE).__next__

    def dict_get_locked() -> object:
        with lock:
            return plain.get(HOT)

    def lru_get_locked() -> object:
        with lock:
            return lru.get(HOT)

    def ttl_get_locked() -> object:
        with lock:
            return ttlc.get(HOT)

    def lru_miss_locked() -> object:
        with lock:
            return lru.get("absent")

    def dict_set_locked() -> None:
        with lock:
            plain[HOT] = 2

    def lru_set_locked() -> None:
        with lock:
            lru[HOT] = 2

    def ttl_set_locked() -> None:
        with lock:
            ttlc[HOT] = 2

    def lru_insert_evict_locked() -> None:
        with lock:
            lru_full[lru_next()] = 1

    return [
        ("empty call (subtracted from every row)", lambda: None),
        ("hit: dict.get", lambda: plain.get(HOT)),
        ("hit: dict.get under threading.Lock", dict_get_locked),
        ("hit: cachetools LRUCache.get under Lock", lru_get_locked),
        ("hit: cachetools TTLCache.get under Lock", ttl_get_locked),
        ("hit: SafeHashMap.get", lambda: unbounded.get(HOT)),
        ("hit: SafeHashMap.get, ttl", lambda: unbounded_ttl.get(HOT)),
        ("hit: SafeHashMap.get, maxsize", lambda: bounded.get(HOT)),
        ("hit: SafeHashMap.get, maxsize + ttl", lambda: bounded_ttl.get(HOT)),
        ("hit: SafeHashMap[key], maxsize + ttl", lambda: bounded_ttl[HOT]),
        ("miss: dict.get", lambda: plain.get("absent")),
        ("miss: cachetools LRUCache.get under Lock", lru_miss_locked),
        ("miss: SafeHashMap.get, maxsize + ttl", lambda: bounded_ttl.get("absent")),
        ("set: dict[key] = v under Lock", dict_set_locked),
        ("set: cachetools LRUCache under Lock", lru_set_locked),
        ("set: cachetools TTLCache under Lock", ttl_set_locked),
        ("set: SafeHashMap.set", lambda: unbounded.set(HOT, 2)),
        ("set: SafeHashMap.set, maxsize + ttl", lambda: bounded_ttl.set(HOT, 2)),
        ("insert + evict: cachetools LRUCache under Lock", lru_insert_evict_locked),
        ("insert + evict: SafeHashMap, maxsize", lambda: safe_full.set(safe_next(), 1)),
    ]


def main() -> None:
    cases = _cases()
    rounds = 1 if quick() else 20
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in cases:
            ns = ns_per_call(fn, loops=5_000)
            best[name] = min(best.get(name, ns), ns)
    empty = best.pop(cases[0][0])
    net = {name: max(ns - empty, 0.1) for name, ns in best.items()}
    base_dict = net["hit: dict.get"]
    base_lru = net["hit: cachetools LRUCache.get under Lock"]
    rows = [[name, ns, ns / base_dict, ns / base_lru] for name, ns in net.items()]
    print_table(
        f"SafeHashMap: ns per operation ({SIZE:,} entries; empty-call cost {empty:.0f} ns "
        f"subtracted; best of {rounds} rounds; {time.strftime('%Y-%m-%d')})",
        ["operation", "ns", "x dict.get", "x LRUCache.get+Lock"],
        rows,
    )


if __name__ == "__main__":
    main()
