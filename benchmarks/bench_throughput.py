"""Throughput: bulk operations, the server's cost per write, its write capacity, and asyncio.

(1) Bulk: ``update`` / ``get_many`` / ``delete_many`` of N keys (10, 1,000, 20,000), per key,
    against redis-py pipelines of SET / GET / DEL of the same keys, timed round by round right
    before them (paired rounds; the ratio is the median of the rounds' ratios). ``get_many``
    is timed on a map opened for the round (an empty local copy: every key is fetched).
(2) Server time per write: ``INFO commandstats`` (usec per call, the periodic Lua GC step
    included) of 20,000 pipelined calls per variant, with one subscriber on the channel: a
    minimal SET + PUBLISH script, SyncMap's ``map_write`` as a plain write sends it,
    ``map_write`` with one part cut out at a time (what that part costs), the floors (the
    least a script does that keeps each guarantee), ``return 1`` with each side's
    arguments, and ``map_set_many`` per key; the calls over 25 µs (SLOWLOG), and the Lua GC
    step's cost per call (every call of a further 4,000 logged).
(3) Server write capacity: writes/s when CLIENTS processes each pipeline 100 writes at a time
    (30,000 each), SyncMap's ``map_write`` against the SET + PUBLISH script, and the
    server's CPU time per write.
(4) asyncio: AsyncLock uncontended acquire+release pairs/s against redis-py's asyncio Lock
    (and the blocking Lock against redis-py's, for reference), interleaved rounds; and
    AsyncSyncMap.set against redis-py's asyncio SET, paired rounds.

Every loop is bounded; ``--quick`` shrinks everything.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import ServerProcess, print_table, quick, round_ratios, versions

FORK = mp.get_context("fork")
CLIENTS = 3
PIPELINE = 100
GOALS: dict[str, tuple[str, str]] = {}


def _goal(name: str, measured: str, met: bool) -> None:
    GOALS[name] = (measured, "yes" if met else "**no**")


def _rounds(n: int) -> int:
    return 3 if quick() else n


# ------------------------------------------------------------------------------ (1) bulk


def bench_bulk(port: int) -> None:
    import redis

    import syncmap

    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis(host="127.0.0.1", port=port)
    node = syncmap.connect(url)
    m = node.map("bench-bulk")
    rows: list[list[object]] = []
    worst: dict[str, float] = {}
    sizes = [10, 1_000] if quick() else [10, 1_000, 20_000]
    for n in sizes:
        keys = [f"k{i}" for i in range(n)]
        data = {k: {"n": i, "name": k} for i, k in enumerate(keys)}
        rounds = _rounds(max(3, min(15, 200_000 // (n * 10) or 3)))
        times: dict[str, list[float]] = {op: [] for op in ("SET", "update", "GET", "get_many")}
        times.update({"DEL": [], "delete_many": []})
        m.update(data)  # (the server learns the scripts)
        m.delete_many(keys)

        for _ in range(rounds):
            times["SET"].append(_piped(r, "SET", data))
            t0 = time.perf_counter()
            m.update(data)
            times["update"].append(time.perf_counter() - t0)
            reader = node.map("bench-bulk")  # an empty local copy: every key is fetched
            times["GET"].append(_piped(r, "GET", data))
            t0 = time.perf_counter()
            got = reader.get_many(keys)
            times["get_many"].append(time.perf_counter() - t0)
            reader.close()
            assert len(got) == n
            times["DEL"].append(_piped(r, "DEL", data))
            t0 = time.perf_counter()
            assert m.delete_many(keys) == n
            times["delete_many"].append(time.perf_counter() - t0)
        for op, base in (("update", "SET"), ("get_many", "GET"), ("delete_many", "DEL")):
            ratio, spread = round_ratios(times[op], times[base])
            per_key = statistics.median(times[op]) / n * 1e6
            base_key = statistics.median(times[base]) / n * 1e6
            rows.append([f"{n:,}", f"SyncMap {op}", per_key, f"redis-py pipelined {base}",
                         base_key, ratio, spread])  # fmt: skip
            worst[op] = max(worst.get(op, 0.0), ratio)
    m.close()
    node.close()
    r.close()
    n = sizes[-1]
    times = asyncio.run(_async_bulk(port, n, _rounds(5)))
    for op, base in (("update", "SET"), ("get_many", "GET"), ("delete_many", "DEL")):
        ratio, spread = round_ratios(times[op], times[base])
        rows.append([f"{n:,}", f"AsyncSyncMap {op}", statistics.median(times[op]) / n * 1e6,
                     f"redis-py asyncio pipelined {base}",
                     statistics.median(times[base]) / n * 1e6, ratio, spread])  # fmt: skip
        worst[op] = max(worst[op], ratio)
    print_table(
        "(1) Bulk operations, µs per key (paired rounds; ratio: median of the rounds' ratios)",
        ["keys", "syncmap", "µs/key", "peer", "µs/key", "x peer", "range over rounds"],
        rows,
    )
    for op in ("update", "get_many", "delete_many"):
        _goal(f"{op} <= 3x redis-py pipeline, per key", f"{worst[op]:.2f}x (worst size)",
              worst[op] <= 3.0)  # fmt: skip


def _piped(r: Any, command: str, data: dict[str, Any]) -> float:
    """Seconds for one redis-py pipeline of ``command`` over ``data``'s keys (SET: values)."""
    pipe = r.pipeline(transaction=False)
    t0 = time.perf_counter()
    for k, v in data.items():
        if command == "SET":
            pipe.set(f"p:{k}", syncmap_json(v))
        else:
            pipe.execute_command(command, f"p:{k}")
    pipe.execute()
    return time.perf_counter() - t0


async def _async_bulk(port: int, n: int, rounds: int) -> dict[str, list[float]]:
    """(1) for the asyncio map, against redis-py's asyncio pipelines."""
    import redis.asyncio

    import syncmap

    r = redis.asyncio.Redis(host="127.0.0.1", port=port)
    node = await syncmap.connect_async(f"redis://127.0.0.1:{port}/0")
    m = await node.map("bench-abulk")
    keys = [f"k{i}" for i in range(n)]
    data = {k: {"n": i, "name": k} for i, k in enumerate(keys)}
    times: dict[str, list[float]] = {op: [] for op in ("SET", "update", "GET", "get_many")}
    times.update({"DEL": [], "delete_many": []})
    await m.update(data)  # (the server learns the scripts)
    await m.delete_many(keys)

    async def piped(command: str) -> float:
        pipe = r.pipeline(transaction=False)
        t0 = time.perf_counter()
        for k in keys:
            if command == "SET":
                pipe.set(f"p:{k}", syncmap_json(data[k]))
            else:
                pipe.execute_command(command, f"p:{k}")
        await pipe.execute()
        return time.perf_counter() - t0

    try:
        for _ in range(rounds):
            times["SET"].append(await piped("SET"))
            t0 = time.perf_counter()
            await m.update(data)
            times["update"].append(time.perf_counter() - t0)
            reader = await node.map("bench-abulk")  # an empty local copy
            times["GET"].append(await piped("GET"))
            t0 = time.perf_counter()
            got = await reader.get_many(keys)
            times["get_many"].append(time.perf_counter() - t0)
            await reader.close()
            assert len(got) == n
            times["DEL"].append(await piped("DEL"))
            t0 = time.perf_counter()
            assert await m.delete_many(keys) == n
            times["delete_many"].append(time.perf_counter() - t0)
    finally:
        await m.close()
        await node.close()
        await r.aclose()
    return times


def syncmap_json(value: Any) -> bytes:
    """The same payload a map with the JSON codec stores (so both sides send as much)."""
    import json

    return json.dumps(value, separators=(",", ":")).encode()


# -------------------------------------------------------------------- (2) server time per write

MINIMAL = "redis.call('SET', KEYS[1], ARGV[1])\nredis.call('PUBLISH', ARGV[2], ARGV[3])\nreturn 1"
# map_write's five commands and nothing else (the floor of its calls) ...
CALLS_ONLY = (
    "redis.call('HGET', KEYS[1], 'epoch') redis.call('HINCRBY', KEYS[1], 'seq', 1) "
    "redis.call('SET', KEYS[2], ARGV[5]) redis.call('ZADD', KEYS[3], '+inf', ARGV[2]) "
    "redis.call('SPUBLISH', ARGV[4], ARGV[2]) return 1"
)
# ... and strings like its record and message, and its reply, without a command
STRINGS_ONLY = (
    "local version = ARGV[3] .. ' ' .. string.format('%d', #ARGV[2]) "
    "local record = 'SM\\1' .. version .. '\\n' .. ARGV[5] "
    "local message = 'SM1 ' .. version .. ' V ' .. ARGV[7] .. ' ' .. ARGV[2] .. ARGV[5] "
    "return version"
)
# The floors: the least any script does that keeps (a) each key's version and gap detection
# (one seq bump, the version in the record and in the change message), (b) the same and the
# detection of a server that lost the map's data, in the same command: the seq is a field of
# the meta hash named after the epoch the writer knows (1: a new field, the data was lost or
# the epoch is another; a slow path, not taken here, reads the epoch and retries), and (c) the
# same and the index. Each answers the write's version, as map_write does.
FLOOR_A = (
    "local seq = string.format('%d', redis.call('HINCRBY', KEYS[1], 'seq', 1)) "
    "redis.call('SET', KEYS[2], seq .. '\\n' .. ARGV[2]) "
    "redis.call('SPUBLISH', ARGV[3], seq .. ' ' .. ARGV[1]) return seq"
)
FLOOR_B = (
    "local n = redis.call('HINCRBY', KEYS[1], ARGV[4], 1) "
    "if n == 1 then return redis.call('HGET', KEYS[1], 'epoch') end "
    "local version = ARGV[4] .. ' ' .. string.format('%d', n) "
    "redis.call('SET', KEYS[2], version .. '\\n' .. ARGV[2]) "
    "redis.call('SPUBLISH', ARGV[3], version .. ' ' .. ARGV[1]) return version"
)
FLOOR_C = FLOOR_B.replace(
    "redis.call('SPUBLISH'", "redis.call('ZADD', KEYS[3], '+inf', ARGV[1]) redis.call('SPUBLISH'"
)


def _map_write_variants() -> dict[str, str]:
    """``map_write`` as shipped, and with one part cut out at a time (checked: a cut that
    no longer matches the script fails loudly rather than measuring the whole script)."""
    from syncmap._scripts import script_source

    src = script_source("map_write")
    cuts = {
        "- the idx ZADD (len, iteration, clear)": (
            "  redis.call('ZADD', idx, '+inf', key)\n",
            "",
        ),
        "- the epoch read (loss of the server's data)": (
            "local epoch = redis.call('HGET', meta, 'epoch')",
            "local epoch = ARGV[3]",
        ),
        "- the seq bump (versions, gap detection)": (
            "local seq = redis.call('HINCRBY', meta, 'seq', 1)",
            "local seq = 7",
        ),
        "- the value in the change message (an invalidation instead)": (
            "if pttl < 0 and push ~= '' then",
            "if false then",
        ),
        "- the SPUBLISH (the change message)": (
            "  redis.call('SPUBLISH', channel, 'SM1 ' .. version .. ' V ' .. push",
            "  local _ = ('SM1 ' .. version .. ' V ' .. push",
        ),
    }
    variants = {"map_write (a plain write)": src}
    for name, (old, new) in cuts.items():
        if src.count(old) != 1:
            raise RuntimeError(f"bench: map_write no longer has {old!r}")
        variants[f"map_write {name}"] = src.replace(old, new)
    return variants


def _write_call(kind: str, i: int) -> tuple[Any, ...]:
    """The EVALSHA arguments (after the sha) of write number ``i`` of a ``kind`` script."""
    key = f"k{i % 1000}"
    if kind == "minimal":
        return (1, f"plain:{key}", b'{"n":12345}', "plain:ch", key)
    if kind.startswith("floor"):  # a: meta, record; b: and the epoch; c: and the index
        keys = ("syncmap:{tp}:meta", f"syncmap:{{tp}}:v:{key}")
        args: tuple[Any, ...] = (key, b'{"n":12345}', "syncmap:{tp}:ch")
        if kind == "floor_a":
            return (2, *keys, *args)
        if kind == "floor_b":
            return (2, *keys, *args, "Xq3v9aZkP0rTb2cW1dE4fA")
        return (3, *keys, "syncmap:{tp}:idx", *args, "Xq3v9aZkP0rTb2cW1dE4fA")
    if kind == "many":
        many: list[Any] = [f"e{i}", "syncmap:{tp}:ch", 0, 4096]
        records = []
        for j in range(100):
            k = f"k{(i * 100 + j) % 1000}"
            records.append(f"syncmap:{{tp}}:v:{k}")
            many += (k, b'{"n":12345}')
        return (2 + len(records), "syncmap:{tp}:meta", "syncmap:{tp}:idx", *records, *many)
    # (a small value with no TTL rides in the change message: the writer sends the key's length)
    return (3, "syncmap:{tp}:meta", f"syncmap:{{tp}}:v:{key}", "syncmap:{tp}:idx",
            "set", key, f"e{i}", "syncmap:{tp}:ch", b'{"n":12345}', 0, len(key))  # fmt: skip


class _Subscriber:
    """One subscriber on both channels, draining in a thread (as a node's listener would)."""

    def __init__(self, port: int) -> None:
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=port)
        self.pubsub = self.client.pubsub()
        self.pubsub.execute_command("SSUBSCRIBE", "syncmap:{tp}:ch")
        self.pubsub.execute_command("SUBSCRIBE", "plain:ch")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stop.is_set():
            self.pubsub.get_message(timeout=0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()


SLOW_US = 25  # a call slower than this is logged (the Lua GC step's calls, mostly)


def _logged_calls(r: Any, sha: str, kind: str, calls: int, over_us: int) -> list[Any]:
    """Run ``calls`` pipelined calls (the server's stats reset first) with SLOWLOG logging
    those over ``over_us`` µs: their entries, oldest first."""
    r.config_set("slowlog-log-slower-than", over_us)
    r.config_set("slowlog-max-len", calls + 100)
    r.slowlog_reset()
    r.config_resetstat()
    pipe = r.pipeline(transaction=False)
    for i in range(calls):
        pipe.evalsha(sha, *_write_call(kind, i))
        if i % PIPELINE == PIPELINE - 1:
            pipe.execute()
    pipe.execute()
    entries = r.slowlog_get(calls + 100)
    r.config_set("slowlog-log-slower-than", 10_000)
    r.slowlog_reset()
    return [e for e in reversed(entries) if e["command"].startswith(b"EVALSHA")]


def _server_time(r: Any, sha: str, kind: str, calls: int) -> tuple[float, int, float]:
    """Over ``calls`` pipelined calls: µs per call (INFO commandstats: the mean, the Lua GC
    step included), how many took over SLOW_US µs (SLOWLOG), and their µs in total."""
    slow = _logged_calls(r, sha, kind, calls, SLOW_US)
    mean = float(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
    return mean, len(slow), float(sum(e["duration"] for e in slow))


GC_PERIOD = 50  # the server runs a step of the Lua collector after every 50th script call


def _gc_step(r: Any, sha: str, kind: str, calls: int) -> float:
    """The Lua GC step's µs per call: every call is logged (SLOWLOG), and the calls that
    ran the step (one position in every GC_PERIOD: the slowest on average) are compared
    with the others; their extra time, spread over GC_PERIOD calls."""
    times = [e["duration"] for e in _logged_calls(r, sha, kind, calls, 0)]
    by_phase = [statistics.mean(times[j::GC_PERIOD]) for j in range(GC_PERIOD)]
    step = max(range(GC_PERIOD), key=by_phase.__getitem__)
    rest = statistics.mean(t for i, t in enumerate(times) if i % GC_PERIOD != step)
    return (by_phase[step] - rest) / GC_PERIOD


def bench_server_time(port: int) -> None:
    import redis

    from syncmap._scripts import script_source

    r = redis.Redis(host="127.0.0.1", port=port)
    sub = _Subscriber(port)
    scripts: dict[str, tuple[str, str]] = {"SET + PUBLISH (minimal script)": (MINIMAL, "minimal")}
    scripts.update({name: (src, "write") for name, src in _map_write_variants().items()})
    scripts["return 1, with map_write's arguments (3 keys, 7 arguments)"] = ("return 1", "write")
    scripts["return 1, with SET + PUBLISH's arguments (1 key, 3 arguments)"] = (
        "return 1",
        "minimal",
    )
    scripts["map_write's five commands alone"] = (CALLS_ONLY, "write")
    scripts["map_write's strings and reply alone (no command)"] = (STRINGS_ONLY, "write")
    scripts["floor (a): seq bump, version in record and message"] = (FLOOR_A, "floor_a")
    scripts["floor (b): (a) + epoch, in the seq's command"] = (FLOOR_B, "floor_b")
    scripts["floor (c): (b) + the index"] = (FLOOR_C, "floor_c")
    scripts["map_set_many, per key (100 keys a call)"] = (script_source("map_set_many"), "many")
    calls = 2_000 if quick() else 20_000
    means: dict[str, list[float]] = {name: [] for name in scripts}
    slow: dict[str, list[tuple[float, float]]] = {name: [] for name in scripts}
    gc_steps: dict[str, list[float]] = {name: [] for name in scripts}
    try:
        shas = {name: r.script_load(src) for name, (src, _) in scripts.items()}
        for _ in range(_rounds(5)):
            for name, (_, kind) in scripts.items():
                per = 100 if kind == "many" else 1
                n = calls // per
                mean, count, total = _server_time(r, shas[name], kind, n)
                if kind != "many":
                    gc_steps[name].append(_gc_step(r, shas[name], kind, calls // 5))
                means[name].append(mean / per)
                # slow calls per 1,000 calls, and their share of all the time
                slow[name].append((count * 1000 / n, total / (mean * n)))
    finally:
        sub.close()
        r.close()
    base = means["SET + PUBLISH (minimal script)"]
    full = means["map_write (a plain write)"]
    rows = []
    for name, values in means.items():
        ratio, spread = round_ratios(values, base)
        part = ""
        if name.startswith("map_write -"):  # paired by round: the whole script, less this
            part = f"{statistics.median(f - v for f, v in zip(full, values, strict=True)):.2f}"
        per_1000: object = statistics.median(c for c, _ in slow[name])
        share = f"{statistics.median(t for _, t in slow[name]):.0%}"
        gc: object = statistics.median(gc_steps[name]) if gc_steps[name] else "-"
        if scripts[name][1] == "many":  # (a call of 100 keys is always over SLOW_US)
            per_1000 = share = "-"
        rows.append([name, statistics.median(values), ratio, spread, part, per_1000, share, gc])
    print_table(
        f"(2) Server time per write (INFO commandstats, the Lua GC step included; "
        f"{_rounds(5)} rounds of {calls:,} calls; medians, ratios paired by round)",
        ["script", "µs/call", "x SET + PUBLISH", "range over rounds",
         "µs this part costs", f"calls > {SLOW_US} µs per 1,000", "their share of the time",
         "Lua GC step, µs per call"],
        rows,
    )  # fmt: skip
    ratio, _ = round_ratios(full, base)
    _goal("server time per write <= 1.5x SET + PUBLISH script", f"{ratio:.2f}x", ratio <= 1.5)


# -------------------------------------------------------------------- (3) server capacity


def _client(port: int, sha: str, kind: str, count: int, offset: int, go: Any, out: Any) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    calls = [_write_call(kind, offset + i) for i in range(count)]
    go.wait()
    pipe = r.pipeline(transaction=False)
    for i, args in enumerate(calls):
        pipe.evalsha(sha, *args)
        if i % PIPELINE == PIPELINE - 1:
            pipe.execute()
    pipe.execute()
    out.put(time.perf_counter())
    r.close()


def _saturate(port: int, sha: str, kind: str, count: int) -> tuple[float, float]:
    """Writes/s of CLIENTS pipelining processes, and the server's CPU µs per write."""
    import redis

    go, out = FORK.Event(), FORK.Queue()
    procs = [
        FORK.Process(target=_client, args=(port, sha, kind, count, c * count, go, out))
        for c in range(CLIENTS)
    ]
    for p in procs:
        p.start()
    time.sleep(0.3)  # (the clients build their calls first)
    with redis.Redis(host="127.0.0.1", port=port) as r:
        cpu0 = r.info("cpu")
        t0 = time.perf_counter()
        go.set()
        ends = [out.get(timeout=120) for _ in procs]
        cpu1 = r.info("cpu")
    for p in procs:
        p.join(30)
    writes = count * CLIENTS
    elapsed = max(ends) - t0
    cpu = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_sys", "used_cpu_user"))
    return writes / elapsed, cpu / writes * 1e6


def bench_capacity(port: int) -> None:
    import redis

    from syncmap._scripts import script_source

    r = redis.Redis(host="127.0.0.1", port=port)
    sub = _Subscriber(port)
    count = 2_000 if quick() else 30_000
    kinds = {
        "SET + PUBLISH (minimal script)": (MINIMAL, "minimal"),
        "SyncMap map_write (a plain write)": (script_source("map_write"), "write"),
    }
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        shas = {k: r.script_load(src) for k, (src, _) in kinds.items()}
        for _ in range(_rounds(5)):
            for name, (_, kind) in kinds.items():
                rate, cpu = _saturate(port, shas[name], kind, count)
                rates[name].append(rate)
                cpus[name].append(cpu)
    finally:
        sub.close()
        r.close()
    base = rates["SET + PUBLISH (minimal script)"]
    rows = []
    for name in kinds:
        ratio, spread = round_ratios(rates[name], base)
        rows.append([name, statistics.median(rates[name]), ratio, spread,
                     statistics.median(cpus[name])])  # fmt: skip
    print_table(
        f"(3) Server write capacity: {CLIENTS} processes x {count:,} writes, pipelines of "
        f"{PIPELINE}, one subscriber (median of rounds)",
        ["writes", "writes/s", "x SET + PUBLISH", "range over rounds", "server CPU µs/write"],
        rows,
    )


# ------------------------------------------------------------------------------ (4) asyncio


def _sync_pairs(kind: str, port: int) -> Callable[[int], float]:
    import redis

    import syncmap

    if kind == "syncmap Lock":
        lock: Any = syncmap.connect(f"redis://127.0.0.1:{port}/0").lock("tp:lock", ttl=10)
    else:
        lock = redis.Redis(host="127.0.0.1", port=port).lock("tp:rlock", timeout=10)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            lock.acquire()
            lock.release()
        return time.perf_counter() - t0

    return timed


async def _async_peers(port: int) -> dict[str, Callable[[int], Any]]:
    import redis.asyncio

    import syncmap

    node = await syncmap.connect_async(f"redis://127.0.0.1:{port}/0")
    alock = node.lock("tp:alock", ttl=10)
    r = redis.asyncio.Redis(host="127.0.0.1", port=port)
    rlock = r.lock("tp:ralock", timeout=10)
    m = await node.map("bench-async-set")

    async def pairs(lock: Any, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await lock.acquire()
            await lock.release()
        return time.perf_counter() - t0

    async def sets(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            await r.set("tp:w", i)
        return time.perf_counter() - t0

    async def map_sets(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            await m.set("w", i)
        return time.perf_counter() - t0

    async def close() -> None:
        await m.close()
        await node.close()
        await r.aclose()

    return {
        "redis-py asyncio Lock": lambda n: pairs(rlock, n),
        "syncmap AsyncLock": lambda n: pairs(alock, n),
        "redis-py asyncio SET": sets,
        "AsyncSyncMap.set": map_sets,
        "close": lambda n: close(),
    }


def bench_asyncio(port: int) -> None:
    loop = asyncio.new_event_loop()
    peers = loop.run_until_complete(_async_peers(port))
    timers: dict[str, Callable[[int], float]] = {
        kind: _sync_pairs(kind, port) for kind in ("redis-py Lock", "syncmap Lock")
    }
    for kind in ("redis-py asyncio Lock", "syncmap AsyncLock"):
        timers[kind] = lambda n, f=peers[kind]: loop.run_until_complete(f(n))
    pairs = 50 if quick() else 200
    rates: dict[str, list[float]] = {kind: [] for kind in timers}
    for timed in timers.values():
        timed(20)  # warm up: connections, script cache
    for _ in range(_rounds(21)):
        for kind, timed in timers.items():
            rates[kind].append(pairs / timed(pairs))
    rows = []
    for kind, base_kind in (
        ("redis-py Lock", "redis-py Lock"),
        ("syncmap Lock", "redis-py Lock"),
        ("redis-py asyncio Lock", "redis-py asyncio Lock"),
        ("syncmap AsyncLock", "redis-py asyncio Lock"),
    ):
        ratio, spread = round_ratios(rates[kind], rates[base_kind])
        rows.append([kind, statistics.median(rates[kind]), base_kind, ratio, spread])
    print_table(
        f"(4a) Uncontended acquire+release pairs/s, one process ({_rounds(21)} interleaved "
        f"rounds of {pairs})",
        ["lock", "pairs/s", "vs", "ratio (median of rounds)", "range over rounds"],
        rows,
    )
    lock_ratio, _ = round_ratios(rates["syncmap AsyncLock"], rates["redis-py asyncio Lock"])
    _goal("AsyncLock pairs/s >= 1.4x redis-py asyncio Lock", f"{lock_ratio:.2f}x",
          lock_ratio >= 1.4)  # fmt: skip

    writes = 100 if quick() else 500
    base_t: list[float] = []
    map_t: list[float] = []
    run = loop.run_until_complete
    run(peers["redis-py asyncio SET"](50))
    run(peers["AsyncSyncMap.set"](50))
    for _ in range(_rounds(29)):
        base_t.append(run(peers["redis-py asyncio SET"](writes)) / writes)
        map_t.append(run(peers["AsyncSyncMap.set"](writes)) / writes)
    run(peers["close"](0))
    loop.close()
    ratio, spread = round_ratios(map_t, base_t)
    print_table(
        f"(4b) asyncio write latency ({_rounds(29)} paired rounds of {writes}, medians)",
        ["writer", "µs/write", "x redis-py asyncio SET", "range over rounds"],
        [
            ["redis-py asyncio SET", statistics.median(base_t) * 1e6, 1.0, ""],
            ["AsyncSyncMap await m.set(k, v)", statistics.median(map_t) * 1e6, ratio, spread],
        ],
    )
    _goal("AsyncSyncMap.set <= 1.3x redis-py asyncio SET", f"{ratio:.2f}x", ratio <= 1.3)


def main() -> None:
    """``BENCH_THROUGHPUT_ONLY=bulk,server,capacity,asyncio`` runs only those sections."""
    sections = {"bulk": bench_bulk, "server": bench_server_time, "capacity": bench_capacity,
                "asyncio": bench_asyncio}  # fmt: skip
    only = os.environ.get("BENCH_THROUGHPUT_ONLY")
    srv = ServerProcess().start()
    try:
        info = srv.client().info("server")
        print(f"## bench_throughput (server on port {srv.port}{', quick' if quick() else ''})\n")
        print(f"Measured: {versions('redis', 'hiredis')}; server valkey "
              f"{info.get('valkey_version', info['redis_version'])}.\n", flush=True)  # fmt: skip
        for name, fn in sections.items():
            if only and name not in only.split(","):
                continue
            fn(srv.port)
    finally:
        srv.stop()
    print_table(
        "Throughput goals (this run)",
        ["goal", "measured", "met"],
        [[name, measured, met] for name, (measured, met) in GOALS.items()],
    )


if __name__ == "__main__":
    main()
