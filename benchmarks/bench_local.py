"""SafeHashMap against dict and cachetools, in one process, same run.

Every case is a statement as a caller writes it, timed as ``timeit`` times it (the callable
bound in the statement's globals: ``g("key-4242")`` with ``g = m.get``), in paired repeats:
each repeat times a bare ``dict.get`` right before the case (*its dict.get ns*: their
median). *x dict.get* is the ratio of the two medians; *pair ratios* the range of the
per-repeat ratios (the host's speed drifts between repeats; a pair shares it). The *harness
loop* columns are the same statement inside a zero-argument function called in a Python
loop, the cost of calling an empty function subtracted, best of several rounds: what the
statement adds to a caller's function.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import cachetools

from benchmarks._common import ns_per_call, paired_bare, print_table, quick, versions
from syncmap import SafeHashMap

SIZE = 10_000
HOT = "key-4242"
K = repr(HOT)

Case = tuple[str, str, dict[str, Any], int]  # name, statement, its globals, calls per timing


def _cases() -> list[Case]:
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

    def locked(stmt: str) -> str:
        return f"with lock:\n    {stmt}"

    def e(**names: Any) -> dict[str, Any]:  # a statement's globals
        return {"lock": lock, **names}

    n = 200_000
    return [
        ("hit: dict.get", f"g({K})", e(g=plain.get), n),
        ("hit: dict.get under threading.Lock", locked(f"g({K})"), e(g=plain.get), n),
        ("hit: cachetools LRUCache.get under Lock", locked(f"g({K})"), e(g=lru.get), n),
        ("hit: cachetools TTLCache.get under Lock", locked(f"g({K})"), e(g=ttlc.get), n // 4),
        ("hit: SafeHashMap.get", f"g({K})", e(g=unbounded.get), n),
        ("hit: SafeHashMap.get, ttl", f"g({K})", e(g=unbounded_ttl.get), n),
        ("hit: SafeHashMap.get, maxsize", f"g({K})", e(g=bounded.get), n),
        ("hit: SafeHashMap.get, maxsize + ttl", f"g({K})", e(g=bounded_ttl.get), n),
        ("hit: SafeHashMap[key], maxsize + ttl", f"m[{K}]", e(m=bounded_ttl), n),
        ("miss: dict.get", 'g("absent")', e(g=plain.get), n),
        ("miss: cachetools LRUCache.get under Lock", locked('g("absent")'), e(g=lru.get), n),
        ("miss: SafeHashMap.get, maxsize + ttl", 'g("absent")', e(g=bounded_ttl.get), n),
        ("set: dict[key] = v under Lock", locked(f"d[{K}] = 2"), e(d=plain), n),
        ("set: cachetools LRUCache under Lock", locked(f"c[{K}] = 2"), e(c=lru), n // 4),
        ("set: cachetools TTLCache under Lock", locked(f"c[{K}] = 2"), e(c=ttlc), n // 10),
        ("set: SafeHashMap.set", f"g({K}, 2)", e(g=unbounded.set), n // 4),
        ("set: SafeHashMap.set, maxsize + ttl", f"g({K}, 2)", e(g=bounded_ttl.set), n // 4),
        (
            "insert + evict: cachetools LRUCache under Lock",
            locked("c[n()] = 1"),
            e(c=lru_full, n=lru_next),
            n // 10,
        ),
        (
            "insert + evict: SafeHashMap, maxsize",
            "g(n(), 1)",
            e(g=safe_full.set, n=safe_next),
            n // 10,
        ),
    ]


def _as_function(stmt: str, env: dict[str, Any]) -> Any:
    """``stmt`` in a zero-argument function whose globals are ``env`` (the harness loop's
    subject)."""
    scope = dict(env)
    body = "\n".join("    " + line for line in stmt.splitlines())
    exec(f"def case():\n{body}\n", scope)
    return scope["case"]


def _harness_loop(cases: list[Case], rounds: int) -> dict[str, float]:
    """ns per case in the harness loop, the empty function's cost subtracted, best of
    ``rounds`` rounds (cases interleaved)."""
    fns = [("empty", lambda: None)] + [(name, _as_function(s, env)) for name, s, env, _ in cases]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns:
            ns = ns_per_call(fn, loops=5_000)
            best[name] = min(best.get(name, ns), ns)
    empty = best.pop("empty")
    return {name: max(ns - empty, 0.1) for name, ns in best.items()}


def main() -> None:
    cases = _cases()
    base = (f"g({K})", cases[0][2])
    repeats = 3 if quick() else 9
    bare = {name: paired_bare(stmt, env, n, base, repeats) for name, stmt, env, n in cases}
    loop = _harness_loop(cases, 1 if quick() else 10)
    loop_base = loop["hit: dict.get"]
    base_lru = bare["hit: cachetools LRUCache.get under Lock"].ns
    rows = [
        [
            name,
            b.ns,
            b.base_ns,
            b.ratio,
            b.spread,
            b.ns / base_lru,
            loop[name],
            loop[name] / loop_base,
        ]
        for name, b in bare.items()
    ]
    print_table(
        f"SafeHashMap: ns per operation ({SIZE:,} entries; bare calls as timeit times them, "
        f"{repeats} repeats paired with a bare dict.get, medians; {versions('cachetools')})",
        [
            "operation",
            "ns (bare)",
            "its dict.get ns",
            "x dict.get",
            "pair ratios",
            "x LRUCache.get+Lock",
            "harness loop ns",
            "harness loop x dict.get",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
