"""Django's ``cache.get`` of a cached key: syncmap's SyncMapCache against Django's own
RedisCache and LocMemCache, same run, one private Valkey.

Every statement is timed as ``timeit`` times one (the statement inlined in timeit's loop, no
function call around it), in rounds; each round times the bare ``dict.get`` right before the
caches, and a cache's ratio is the median of its per-round ratios to that ``dict.get`` (the
host's speed drifts between rounds). ns/get are medians over the rounds. Every cache goes
through Django's key handling (``make_and_validate_key``: the key function and the memcached
key warnings), as application code does, and returns a fresh object (the value is a small
dict: each get unpickles it, in every backend).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from benchmarks._common import ServerProcess, bare_ns, print_table, quick, round_ratios

KEY = "product:4242"


def _caches(url: str) -> dict[str, Any]:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(USE_TZ=True)
        django.setup()
    from django.core.cache.backends.locmem import LocMemCache
    from django.core.cache.backends.redis import RedisCache

    from syncmap.django import SyncMapCache

    return {
        "SyncMapCache (syncmap.django)": SyncMapCache(url, {"OPTIONS": {"name": "bench-django"}}),
        "LocMemCache (Django)": LocMemCache("bench", {}),
        "RedisCache (Django)": RedisCache(url, {}),
    }


def main() -> None:
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    server = ServerProcess().start()
    try:
        caches = _caches(server.url)
        value = {"id": 4242, "name": "pen", "price": 120}
        for cache in caches.values():
            cache.set(KEY, value, timeout=None)
            assert cache.get(KEY) == value
        smc = caches["SyncMapCache (syncmap.django)"]
        m = smc.map
        m.get(smc.make_key(KEY))
        env: dict[str, Any] = {"d": {KEY: value}, "k": KEY, "m": m, "mk": smc.make_key(KEY)}
        for i, cache in enumerate(caches.values()):
            env[f"c{i}"] = cache
        cases = [("SyncMap m.get under it (no key handling, no unpickle)", "m.get(mk)", 200_000)]
        cases += [
            (name, f"c{i}.get(k)", 1_000 if "Redis" in name else 100_000)
            for i, name in enumerate(caches)
        ]
        rounds = 3 if quick() else 9
        scale = 50 if quick() else 1
        base_times: list[float] = []
        times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        misses0 = m.stats.misses
        reads = 0
        for _ in range(rounds):
            base_times.append(bare_ns("d.get(k)", env, 1_000_000 // scale))
            for name, stmt, number in cases:
                times[name].append(bare_ns(stmt, env, max(1, number // scale)))
                if stmt.startswith(("m.", "c0.")):
                    reads += max(1, number // scale)
        server_reads = (m.stats.misses - misses0) * 1000 / reads
        rows: list[list[object]] = [["dict.get (bare, timeit)", statistics.median(base_times),
                                     1.0, "-"]]  # fmt: skip
        for name, _, _ in cases:
            ratio, spread = round_ratios(times[name], base_times)
            rows.append([name, statistics.median(times[name]), ratio, spread])
        print_table(
            "Django cache.get of a cached key (SyncMapCache vs Django's RedisCache, LocMemCache)",
            ["reader", "ns/get", "x dict.get", "per-round range"],
            rows,
        )
        print(
            f"SyncMap reads that went to the server: {server_reads:.2f} per 1k gets "
            f"({rounds} rounds; x dict.get: median of per-round ratios).\n"
        )
    finally:
        from syncmap.django import close_all

        close_all()
        server.stop()


if __name__ == "__main__":
    main()
