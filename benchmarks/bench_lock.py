"""Distributed locks side by side, on one private server, in one run.

(1) Uncontended acquire+release pairs/s: the bare ``SET NX PX`` + ``DEL`` floor, redis-py's Lock,
python-redis-lock, pottery's Redlock (one master: the same server) and syncmap's Lock and
AsyncLock; ratio column vs redis-py's Lock.

(2) Contended: 4 processes each do N read-modify-writes (GET, SET) of one counter under the
lock. Reported: final count vs expected (mutual exclusion), acquisitions/s, owner switches/s
(fair hand-off switches owner on nearly every acquisition), and the wait for the lock
(p50/p99/max), and the lock's own client CPU per acquisition (time spent in acquire and
release, summed over the processes): on 2 vCPUs the contended run is CPU-bound, so this says
how much of the machine each lock leaves to the critical sections. Every loop is bounded (N
iterations, and a wall-clock cap per peer).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import ServerProcess, percentile, print_table, quick, round_ratios

FORK = mp.get_context("fork")
PROCESSES = 4
WALL_CAP = 30.0  # seconds per contended peer, whatever N says


# ----------------------------------------------------------------------- the peers


def make_lock(kind: str, port: int, name: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """(acquire, release) of a blocking lock of ``kind`` named ``name``."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    if kind == "SET NX PX + DEL (floor)":
        return (lambda: client.set(name, "x", nx=True, px=10_000)), (lambda: client.delete(name))
    if kind == "redis-py Lock":
        lock = client.lock(name, timeout=10)
        return lock.acquire, lock.release
    if kind == "python-redis-lock":
        import redis_lock

        plock = redis_lock.Lock(client, name, expire=10)
        return plock.acquire, plock.release
    if kind == "pottery Redlock":
        from pottery import Redlock

        rlock = Redlock(key=name, masters={client}, auto_release_time=10)
        return rlock.acquire, rlock.release
    if kind == "syncmap Lock":
        import syncmap

        slock = syncmap.connect(f"redis://127.0.0.1:{port}/0").lock(name, ttl=10)
        return slock.acquire, slock.release
    raise ValueError(kind)


UNCONTENDED = [
    "SET NX PX + DEL (floor)",
    "redis-py Lock",
    "python-redis-lock",
    "pottery Redlock",
    "syncmap Lock",
]
ASYNC_UNCONTENDED = ["redis-py asyncio Lock", "syncmap AsyncLock"]
CONTENDED = ["syncmap Lock", "redis-py Lock", "python-redis-lock", "pottery Redlock"]


# ----------------------------------------------------------------------- (1) uncontended


def _sync_timer(kind: str, port: int) -> Callable[[int], float]:
    acquire, release = make_lock(kind, port, f"bench:u:{kind}")

    def timed(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        return time.perf_counter() - started

    return timed


def _async_timer(kind: str, port: int, loop: asyncio.AbstractEventLoop) -> Callable[[int], float]:
    async def make() -> Any:
        if kind == "syncmap AsyncLock":
            import syncmap

            node = await syncmap.connect_async(f"redis://127.0.0.1:{port}/0")
            return node.lock("bench:u:async", ttl=10)
        import redis.asyncio

        return redis.asyncio.Redis(host="127.0.0.1", port=port).lock("bench:u:rasync", timeout=10)

    lock = loop.run_until_complete(make())

    async def pairs(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await lock.acquire()
            await lock.release()
        return time.perf_counter() - started

    return lambda n: loop.run_until_complete(pairs(n))


def bench_uncontended(port: int) -> None:
    """Peers measured in interleaved rounds (the machine's load drifts); median rate per
    peer, and the median of each round's ratio to redis-py's Lock (many short rounds: the
    host's speed drifts within seconds)."""
    loop = asyncio.new_event_loop()
    timers = {kind: _sync_timer(kind, port) for kind in UNCONTENDED}
    for kind in ASYNC_UNCONTENDED:
        timers[kind] = _async_timer(kind, port, loop)
    pairs = 50 if quick() else 150
    rates: dict[str, list[float]] = {kind: [] for kind in timers}
    for timed in timers.values():
        timed(20)  # warm up: connections, script cache
    for _ in range(3 if quick() else 21):
        for kind, timed in timers.items():
            n = max(1, pairs // 4) if kind == "pottery Redlock" else pairs
            rates[kind].append(n / timed(n))
    loop.close()
    base = rates["redis-py Lock"]
    rows = []
    for kind, values in rates.items():
        rows.append([kind, statistics.median(values), *round_ratios(values, base)])
    print_table(
        "Lock: uncontended acquire+release pairs/s (one process, loopback)",
        ["lock", "pairs/s", "vs redis-py Lock (median of rounds)", "range over rounds"],
        rows,
    )


# ----------------------------------------------------------------------- (2) contended


def _critical_section(client: Any, counter: str, trips: int) -> None:
    """``trips`` round trips that count one increment of ``counter``: 1 is an ``INCR``; more
    are ``trips - 1`` ``GET``s then a ``SET`` of the last read plus one (a broken lock loses
    updates); 0 is an empty critical section."""
    if trips == 1:
        client.incr(counter)
    elif trips > 1:
        for _ in range(trips - 1):
            value = int(client.get(counter) or 0)
        client.set(counter, value + 1)


def _worker(
    kind: str, port: int, name: str, loops: int, barrier: Any, out: Any, me: int, trips: int
) -> None:
    import redis

    acquire, release = make_lock(kind, port, name)
    client = redis.Redis(host="127.0.0.1", port=port)
    counter = f"{name}:counter"
    records: list[tuple[float, float, int, float]] = []
    lock_cpu = 0.0  # this thread's CPU time inside acquire() and release()
    barrier.wait()
    stop_at = time.monotonic() + WALL_CAP
    for _ in range(loops):
        asked = time.monotonic()
        cpu0 = time.thread_time()
        acquire()
        got = time.monotonic()
        lock_cpu += time.thread_time() - cpu0
        _critical_section(client, counter, trips)
        releasing = time.monotonic()
        cpu0 = time.thread_time()
        release()
        lock_cpu += time.thread_time() - cpu0
        records.append((asked, got, me, releasing))
        if got > stop_at:
            break
    out.put((records, lock_cpu))


def _contend(
    kind: str, port: int, name: str, loops: int, trips: int
) -> tuple[list[tuple[float, float, int, float]], float]:
    """One round: PROCESSES processes, ``loops`` locked increments each (critical sections of
    ``trips`` round trips: see :func:`_critical_section`); their records (asked, got, process,
    release called), sorted by acquisition, and the CPU seconds they spent in the lock's
    acquire and release calls."""
    barrier = FORK.Barrier(PROCESSES)
    out = FORK.Queue()
    procs = [
        FORK.Process(target=_worker, args=(kind, port, name, loops, barrier, out, i, trips))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    records: list[tuple[float, float, int, float]] = []
    lock_cpu = 0.0
    for _ in procs:
        mine, cpu = out.get(timeout=WALL_CAP + 60)
        records += mine
        lock_cpu += cpu
    for p in procs:
        p.join(10)
    return sorted(records, key=lambda r: r[1]), lock_cpu


def bench_contended(port: int, work: bool = True) -> None:
    """Peers in interleaved rounds (load drifts); rates are medians over rounds, ratios
    medians of each round's ratio, waits percentiles over every acquisition of every round.
    ``work=False``: an empty critical section, so the lock's own hand-off is all that is
    measured (no count to check)."""
    import redis

    rounds, loops = (1, 50) if quick() else (5, 200)
    rates: dict[str, list[float]] = {kind: [] for kind in CONTENDED}
    switch_rates: dict[str, list[float]] = {kind: [] for kind in CONTENDED}
    waits: dict[str, list[float]] = {kind: [] for kind in CONTENDED}
    cpu: dict[str, float] = dict.fromkeys(CONTENDED, 0.0)
    handoffs: dict[str, list[float]] = {kind: [] for kind in CONTENDED}
    held: dict[str, list[float]] = {kind: [] for kind in CONTENDED}
    for _ in range(rounds):
        for kind in CONTENDED:
            records, lock_cpu = _contend(
                kind, port, f"bench:c{int(work)}:{kind}", loops, 2 if work else 0
            )
            cpu[kind] += lock_cpu
            span = records[-1][1] - min(r[0] for r in records)
            rates[kind].append(len(records) / span)
            switches = sum(1 for a, b in itertools.pairwise(records) if a[2] != b[2])
            switch_rates[kind].append(switches / span)
            waits[kind] += [(got - asked) * 1000 for asked, got, _, _ in records]
            held[kind] += [(rel - got) * 1e6 for _, got, _, rel in records]
            # release called -> the next holder's acquire returned: the lock's own critical path
            handoffs[kind] += [(b[1] - a[3]) * 1e6 for a, b in itertools.pairwise(records)]
    base = rates["python-redis-lock"]
    rows = []
    with redis.Redis(host="127.0.0.1", port=port) as c:
        for kind in CONTENDED:
            final = int(c.get(f"bench:c1:{kind}:counter") or 0)
            expected = len(waits[kind])
            count = f"{final} / {expected}" + ("" if final == expected else " WRONG")
            rows.append(
                [
                    kind,
                    count if work else "-",
                    statistics.median(rates[kind]),
                    *round_ratios(rates[kind], base),
                    statistics.median(switch_rates[kind]),
                    percentile(waits[kind], 50),
                    percentile(waits[kind], 99),
                    max(waits[kind]),
                    percentile(handoffs[kind], 50),
                    percentile(held[kind], 50) if work else "-",
                    cpu[kind] / expected * 1e6,
                ]
            )
    what = "locked read-modify-writes of one counter" if work else "empty critical sections"
    print_table(
        f"Lock: {PROCESSES} processes x {loops} {what} x {rounds} rounds",
        [
            "lock",
            "final count / expected",
            "acquisitions/s",
            "vs python-redis-lock (median of rounds)",
            "range over rounds",
            "owner switches/s",
            "wait p50 ms",
            "wait p99 ms",
            "wait max ms",
            "hand-off µs p50",
            "GET+SET µs p50",
            "lock CPU µs/acq",
        ],
        rows,
    )


def _model(trips: int) -> float:
    """The round-trip model's acquisitions/s ratio, syncmap's lock to python-redis-lock's,
    for critical sections of ``trips`` round trips. Per acquisition the critical path is:
    the release reaching the server, the wake-up reaching the next waiter, then (for
    python-redis-lock only: its woken waiter must still take the lock) a ``SET NX`` round
    trip, then the critical section. In one-way trips: syncmap 2 + 2k, python-redis-lock
    4 + 2k."""
    return (4 + 2 * trips) / (2 + 2 * trips)


def bench_trips(port: int) -> None:
    """Contended acquisitions/s as the critical section grows by round trips: syncmap's lock
    against python-redis-lock's in interleaved rounds, next to the round-trip model's ratio.
    Says how much of the contended ratio is the lock, and how much the critical section."""
    import redis

    rounds, loops = (1, 30) if quick() else (5, 150)
    kinds = ["syncmap Lock", "python-redis-lock"]
    sweep = (0, 1, 2, 4)
    rates: dict[tuple[str, int], list[float]] = {}
    done: dict[tuple[str, int], int] = {}
    for _ in range(rounds):
        for trips in sweep:
            for kind in kinds:
                records, _ = _contend(kind, port, f"bench:t{trips}:{kind}", loops, trips)
                span = records[-1][1] - min(r[0] for r in records)
                rates.setdefault((kind, trips), []).append(len(records) / span)
                done[(kind, trips)] = done.get((kind, trips), 0) + len(records)
    wrong = []
    with redis.Redis(host="127.0.0.1", port=port) as c:
        for (kind, trips), n in done.items():
            final = int(c.get(f"bench:t{trips}:{kind}:counter") or 0)
            if trips and final != n:
                wrong.append(f"{kind}, k={trips}: {final} / {n}")
    rows = []
    for trips in sweep:
        ours = rates[(kinds[0], trips)]
        theirs = rates[(kinds[1], trips)]
        rows.append(
            [
                trips,
                statistics.median(ours),
                statistics.median(theirs),
                *round_ratios(ours, theirs),
                _model(trips),
            ]
        )
    print_table(
        f"Lock: {PROCESSES} processes x {loops} acquisitions x {rounds} rounds, critical "
        "sections of k round trips (0: empty; 1: INCR; k >= 2: k-1 GETs, then a SET)",
        [
            "k",
            "syncmap acq/s",
            "python-redis-lock acq/s",
            "ratio (median of rounds)",
            "range over rounds",
            "round-trip model (4+2k)/(2+2k)",
        ],
        rows,
    )
    print("final counts: " + ("all exact" if not wrong else "WRONG " + "; ".join(wrong)) + "\n")


def bench_idle_host(port: int) -> None:
    """What a pause costs the next round trip on this host: one GET+SET (the contended
    benchmark's critical section) after the client and the server sat idle, or kept busy
    (the client spinning), for a while. A fair lock runs each critical section in a process
    that waited its turn, so it pays the idle price; a lock that lets the running process
    take it again does not."""
    import redis

    pauses = (0.0, 0.001, 0.003)
    samples = 30 if quick() else 300
    took: dict[tuple[str, float], list[float]] = {}
    with redis.Redis(host="127.0.0.1", port=port) as c:
        key = "bench:idle:counter"
        c.set(key, 0)
        for _ in range(samples):
            for pause in pauses:
                for how in ("sleeps", "spins"):
                    if pause and how == "sleeps":
                        time.sleep(pause)
                    elif pause:
                        end = time.perf_counter() + pause
                        while time.perf_counter() < end:
                            pass
                    elif how == "spins":
                        continue  # (no pause: the same as "sleeps")
                    t0 = time.perf_counter()
                    c.set(key, int(c.get(key) or 0) + 1)
                    took.setdefault((how, pause), []).append((time.perf_counter() - t0) * 1e6)
    base = percentile(took[("sleeps", 0.0)], 50)
    rows = [
        [
            "back to back" if not pause else f"client {how} {pause * 1000:g} ms first",
            percentile(values, 50),
            percentile(values, 90),
            percentile(values, 50) / base,
        ]
        for (how, pause), values in took.items()
    ]
    print_table(
        "The host: one GET+SET (redis-py) after a pause (the server is idle during it)",
        ["before it", "µs p50", "µs p90", "x back to back"],
        rows,
    )


def main() -> None:
    server = ServerProcess().start()
    try:
        bench_uncontended(server.port)
        bench_contended(server.port)
        bench_contended(server.port, work=False)  # the hand-off alone
        bench_trips(server.port)
        bench_idle_host(server.port)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
