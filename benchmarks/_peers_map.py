"""The near-caches bench_map compares, behind one small interface, and its worker processes.

A *kind* names one reader/writer pair. What each peer does depends on its version: the
versions measured are the installed ones, which bench_map prints in its header and in its
peers' row names; the behaviour described here is that of redis-py 8.2.0, valkey-py 6.2.0 and
cashews 7.6.0 (tests/test_peers_csc.py checks it, for the versions it names):

============== ==========================================================================
``get``        plain redis-py GET/SET (no local copy)
``redis-csc``  redis-py's client-side cache (RESP3 + CacheConfig). redis-py refuses every
               server whose HELLO does not say ``server: redis`` with version >= 7.4, so
               Valkey is refused; the workaround is to tell ``CacheProxyConnection`` the
               server's real name (:func:`allow_redis_py_csc`).
``valkey-csc`` valkey-py's client-side cache (``protocol=3, cache_enabled=True``); breaks
               when libvalkey is installed (not installed here).
``cashews``    cashews ``client_side=True`` forced to RESP2 (``?protocol=2``): the only
               configuration in which it invalidates. A local hit never suspends, so a tight
               read loop starves cashews' own listener task: readers yield once per poll /
               per batch of 16 reads (``await asyncio.sleep(0)``).
``cashews-r3`` cashews as configured by default on redis-py 8 (RESP3): never invalidates.
``syncmap``    SyncMap: ``m.get(k)`` from the local copy, ``m[k] = v`` to write.
``syncmap-async`` AsyncSyncMap reading (``await m.get(k)``; a local hit yields to the loop
               every 0.25 ms by itself, the reader also once per poll); a blocking SyncMap
               of the same map writes.
============== ==========================================================================

Values are integers; ``decode`` turns whatever the client returns into ``int | None``.
Every worker runs in its own spawned OS process; times are ``time.monotonic_ns``
(CLOCK_MONOTONIC, one clock for every process on the machine).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import pickle
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("get", "redis-csc", "valkey-csc", "cashews", "cashews-r3", "syncmap", "syncmap-async")
ASYNC_KINDS = ("cashews", "cashews-r3", "syncmap-async")
MAP_NAME = "benchmap"


def key_of(kind: str, i: int) -> str:
    return f"k{i}" if kind in (*ASYNC_KINDS, "syncmap") else f"bench:k{i}"  # (a map's keys)


def decode(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bytes | str):
        return int(value)
    return int(value)


def allow_redis_py_csc(port: int) -> str:
    """redis-py's CSC refuses Valkey by HELLO's ``server`` field; accept the real name instead.

    Returns the server name it now accepts. (Valkey's ``extended-redis-compatibility`` makes
    HELLO say ``redis`` but also version 7.2.4, below redis-py's 7.4 floor: refused again.)
    """
    import redis
    from redis.connection import CacheProxyConnection

    with redis.Redis(host="127.0.0.1", port=port, protocol=3) as c:
        hello = c.execute_command("HELLO", 3)
    name = hello[b"server"].decode()
    CacheProxyConnection.DEFAULT_SERVER_NAME = name  # type: ignore[misc]
    return name


@dataclass
class Client:
    """``get(key)``/``set(key, int)`` of one kind; async kinds return awaitables."""

    kind: str
    get: Callable[[str], Any]
    set: Callable[[str, int], Any]
    close: Callable[[], Any]
    raw: Any = None

    @property
    def is_async(self) -> bool:
        return self.kind in ASYNC_KINDS


def open_client(
    kind: str, port: int, *, cache_size: int = 20_000, map_name: str = MAP_NAME
) -> Client:
    """A connected client of ``kind`` (for async kinds: call inside a running loop, then
    ``await client.raw.init()`` via :func:`open_async`)."""
    import redis

    if kind == "get":
        r = redis.Redis(host="127.0.0.1", port=port)
        return Client(kind, r.get, r.set, r.close, r)
    if kind == "redis-csc":
        from redis.cache import CacheConfig

        allow_redis_py_csc(port)
        r = redis.Redis(
            host="127.0.0.1", port=port, protocol=3, cache_config=CacheConfig(max_size=cache_size)
        )
        return Client(kind, r.get, r.set, r.close, r)
    if kind == "valkey-csc":
        import valkey

        v = valkey.Valkey(
            host="127.0.0.1", port=port, protocol=3, cache_enabled=True, cache_max_size=cache_size
        )
        return Client(kind, v.get, v.set, v.close, v)
    if kind == "syncmap":
        import syncmap

        node = syncmap.connect(f"redis://127.0.0.1:{port}/0")
        m = node.map(map_name, maxsize=cache_size)

        def close() -> None:
            m.close()
            with contextlib.suppress(Exception):
                node.client.close()

        return Client(kind, m.get, m.__setitem__, close, m)
    raise ValueError(kind)


async def open_async(
    kind: str, port: int, *, cache_size: int = 20_000, map_name: str = MAP_NAME
) -> Client:
    if kind == "syncmap-async":
        import syncmap

        node = await syncmap.connect_async(f"redis://127.0.0.1:{port}/0")
        m = await node.map(map_name, maxsize=cache_size)

        async def close() -> None:
            await m.close()
            await node.close()

        return Client(kind, m.get, m.set, close, m)

    from cashews import Cache
    from cashews.backends.memory import Memory

    proto = "2" if kind == "cashews" else "3"
    cache = Cache()
    cache.setup(
        f"redis://127.0.0.1:{port}/0?protocol={proto}",
        client_side=True,
        local_cache=Memory(size=cache_size),
    )
    await cache.init()

    async def set_(key: str, value: int) -> None:
        await cache.set(key, value)

    return Client(kind, cache.get, set_, cache.close, cache)


class SyncWriter:
    """A blocking writer for readers of ``kind``. cashews stores an int as its decimal text
    under ``cashews:<key>``, so its readers are fed by a plain redis-py SET there (cashews' own
    ``set`` is several times slower, and the writer is not what is measured)."""

    def __init__(self, kind: str, port: int, map_name: str = MAP_NAME) -> None:
        self.prefix = ""
        if kind == "syncmap-async":
            kind = "syncmap"  # the same map, written by a blocking SyncMap
        elif kind in ASYNC_KINDS:
            kind, self.prefix = "get", "cashews:"
        self.client = open_client(kind, port, map_name=map_name)

    def set(self, key: str, value: int) -> None:
        self.client.set(self.prefix + key, value)

    def set_many(self, items: list[tuple[str, int]]) -> None:
        for k, v in items:
            self.set(k, v)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _wait(start_ns: int) -> None:
    while time.monotonic_ns() < start_ns:
        time.sleep(0.0005)


# ------------------------------------------------------------------ propagation reader


def propagation_reader(
    kind: str,
    port: int,
    key: str,
    conn: Any,
    polite: bool = False,
    map_name: str = MAP_NAME,
    cpus: frozenset[int] = frozenset(),
) -> None:
    """Serve rounds until told to stop: for each ``(first, count)`` received, poll ``key``
    once, send ``"on"`` (the writer waits for it: every write of a round finds the reader
    polling), then poll until ``key`` shows ``first``, ``first + 1``, ... and send the time
    each one showed up (-1 if not within 2 s). Between rounds it waits on the pipe (no
    polling, no CPU).

    ``polite``: ``time.sleep(0)`` between polls (releases the GIL, as any I/O would).
    ``cpus``: run on these CPUs only (set before any thread starts, so all its threads do)."""
    timeout_ns = 2_000_000_000
    if cpus:
        os.sched_setaffinity(0, cpus)

    def run_sync(client: Client) -> None:
        get = client.get
        pause = time.sleep if polite else (lambda _: None)
        while decode(get(key)) != 0:  # the value 0 is cached before the first write
            time.sleep(0.001)
        conn.send("ready")
        while (job := conn.recv()) is not None:
            first, count = job
            get(key)
            conn.send("on")
            for i in range(first, first + count):
                deadline = time.monotonic_ns() + timeout_ns
                while True:
                    if decode(get(key)) == i:
                        conn.send(time.monotonic_ns())
                        break
                    if time.monotonic_ns() > deadline:
                        conn.send(-1)
                        break
                    pause(0)

    async def run_async() -> None:
        client = await open_async(kind, port, map_name=map_name)
        get = client.get
        while decode(await get(key)) != 0:
            await asyncio.sleep(0.001)
        conn.send("ready")
        loop = asyncio.get_running_loop()
        # (waited for in a thread: the loop goes on running the map's listener task meanwhile)
        while (job := await loop.run_in_executor(None, conn.recv)) is not None:
            first, count = job
            await get(key)
            conn.send("on")
            for i in range(first, first + count):
                deadline = time.monotonic_ns() + timeout_ns
                while True:
                    if decode(await get(key)) == i:
                        conn.send(time.monotonic_ns())
                        break
                    if time.monotonic_ns() > deadline:
                        conn.send(-1)
                        break
                    await asyncio.sleep(0)  # a local hit never suspends: let the listener run
        await client.close()

    if kind in ASYNC_KINDS:
        asyncio.run(run_async())
    else:
        client = open_client(kind, port, map_name=map_name)
        run_sync(client)
        client.close()


# ------------------------------------------------------------------ throughput workers


def paced_writer(
    kind: str, port: int, nkeys: int, rate: int, start_ns: int, duration_s: float, out: str
) -> None:
    """Write ``rate`` values per second to random keys; log (key index, value, ack time).

    Values come from one counter, so each key's values grow with its write order.
    """
    writer = SyncWriter(kind, port)
    rng = random.Random(1)
    log_k: list[int] = []
    log_v: list[int] = []
    log_t: list[int] = []
    keys = [key_of(kind, i) for i in range(nkeys)]
    period = 1_000_000_000 // rate
    _wait(start_ns)
    end = start_ns + int(duration_s * 1e9)
    n = 0
    due = start_ns
    max_writes = int(rate * duration_s) + 1
    while n < max_writes:
        now = time.monotonic_ns()
        if now >= end:
            break
        if now < due:
            time.sleep((due - now) / 1e9)
        due += period
        n += 1
        i = rng.randrange(nkeys)
        writer.set(keys[i], n)
        log_k.append(i)
        log_v.append(n)
        log_t.append(time.monotonic_ns())
    writer.close()
    with open(out, "wb") as fh:
        pickle.dump((log_k, log_v, log_t), fh)


BATCH = 16


def reader(kind: str, port: int, nkeys: int, start_ns: int, duration_s: float, out: str) -> None:
    """Read random keys for ``duration_s``; keep every (key, value) and one invoke time per
    batch of 16 reads (the batch's start: earlier than each read's own start, so the stale
    count can only be under-, never over-stated by it)."""
    rng = random.Random(2)
    idx = [rng.randrange(nkeys) for _ in range(1 << 16)]
    mask = (1 << 16) - 1
    keys = [key_of(kind, i) for i in range(nkeys)]
    seq = [keys[i] for i in idx]
    got: list[Any] = []
    stamps: list[int] = []
    end = start_ns + int(duration_s * 1e9)

    # The sync and async loops are twins on purpose: the timed loop takes no indirection.
    def run_sync(client: Client) -> None:
        get = client.get
        for k in keys:  # warm the local copy
            get(k)
        _wait(start_ns)
        j = 0
        append = got.append
        while True:
            t = time.monotonic_ns()
            if t >= end:
                break
            stamps.append(t)
            for _ in range(BATCH):
                append(get(seq[j & mask]))
                j += 1

    async def run_async() -> None:
        client = await open_async(kind, port)
        get = client.get
        for k in keys:
            await get(k)
        _wait(start_ns)
        j = 0
        append = got.append
        while True:
            t = time.monotonic_ns()
            if t >= end:
                break
            stamps.append(t)
            for _ in range(BATCH):
                append(await get(seq[j & mask]))
                j += 1
            await asyncio.sleep(0)  # a local hit never suspends: let the listener run
        await client.close()

    stats = ""
    if kind in ASYNC_KINDS:
        asyncio.run(run_async())
    else:
        client = open_client(kind, port)
        run_sync(client)
        if kind == "syncmap":
            stats = repr(client.raw.stats)
        client.close()
    values = [decode(v) for v in got]
    with open(out, "wb") as fh:
        pickle.dump((idx, values, stamps, stats), fh)


@dataclass
class Staleness:
    reads: int
    stale: dict[int, int]  # window (ms) -> reads older than the writer's ack by more than it
    max_lag_ms: float


def staleness(
    nkeys: int,
    writes: tuple[list[int], list[int], list[int]],
    reads: tuple[Any, ...],
    windows_ms: tuple[int, ...],
) -> Staleness:
    """A read of key k invoked at t returning value v is *stale beyond w* if a write of k with
    a value > v was acknowledged before t - w. Its lag is t - (ack of the first such write)."""
    wk, wv, wt = writes
    per_v: list[list[int]] = [[] for _ in range(nkeys)]
    per_t: list[list[int]] = [[] for _ in range(nkeys)]
    for k, v, t in zip(wk, wv, wt, strict=True):
        per_v[k].append(v)
        per_t[k].append(t)
    idx, values, stamps = reads[:3]
    stale = dict.fromkeys(windows_ms, 0)
    max_lag = 0
    mask = len(idx) - 1
    for j, v in enumerate(values):
        t = stamps[j // BATCH]
        k = idx[j & mask]
        vs = per_v[k]
        pos = 0 if v is None else bisect.bisect_right(vs, v)  # first write newer than v
        if pos >= len(vs):
            continue
        lag = t - per_t[k][pos]
        if lag <= 0:
            continue
        max_lag = max(max_lag, lag)
        for w in windows_ms:
            if lag > w * 1_000_000:
                stale[w] += 1
    return Staleness(len(values), stale, max_lag / 1e6)


async def async_ns_per_call(fn: Callable[[], Awaitable[Any]], loops: int, repeat: int = 5) -> float:
    results = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            await fn()
        results.append((time.perf_counter_ns() - t0) / loops)
    results.sort()
    return results[len(results) // 2]
