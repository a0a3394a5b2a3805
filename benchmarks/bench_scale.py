"""What SyncMap costs at scale, on one private server: (a) one node with many maps, (b) one
write seen by many subscribed nodes spread over a few processes.

(a) opens 1, 10, 100 and 1,000 maps in one node (a fresh spawned process per count) and
reports what they add to the node once it is connected: threads (``threading.active_count``),
server connections (``CLIENT LIST``), idle server commands/s (``INFO commandstats``, all
commands of all clients, minus this process's own ``INFO``), server CPU at idle, the time to
open them and the process's RSS. Opening stops after ``OPEN_LIMIT`` seconds and reports how
many opened.

(b) one writer here; 1, 10 or 100 subscribed nodes (one map, its key cached in every node)
spread over up to 4 spawned processes, each polling its nodes' local copies. Time from the
write's invoke until every node has served the new value (p50/p99), and the server's CPU per
write (``INFO cpu``: user + sys).

Goals (issue 16): 1,000 maps open in one node in under 5 s, with at most 2 threads and
4 server connections beyond the node's own, and at most 12 idle server commands/s;
propagation p99 with 100 subscribed nodes within 3x of one node's.
Every loop is bounded; ``--quick`` shrinks everything.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from benchmarks._common import ServerProcess, goal, percentile, print_goals, print_table, quick

SPAWN = mp.get_context("spawn")
OPEN_LIMIT = 60.0  # s: stop opening maps after this long
MAP_COUNTS = (1, 10, 100, 1000)
NODE_COUNTS = (1, 10, 100)
PROCESSES = 4  # (b): subscribed nodes spread over at most this many processes
POLL_SLEEP = 0.0002  # s: (b)'s readers sleep this long between sweeps over their nodes
SEEN_TIMEOUT = 2.0  # s: (b) a write not seen by then counts as never seen

# goal -> (measured, met?), filled by the sections, printed last
GOALS: dict[str, tuple[str, str]] = {}


def _goal(name: str, measured: str, met: bool) -> None:
    goal(GOALS, name, measured, met)


def _rss_mb() -> float:
    """This process's resident set size, MB (``/proc/self/status``; elsewhere its peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _info(port: int, section: str) -> dict[str, Any]:
    import redis

    with redis.Redis(host="127.0.0.1", port=port) as c:
        return dict(c.info(section))


def _total_calls(port: int) -> int:
    """Every command the server has run (``INFO commandstats``, summed); the ``INFO`` that
    reads it is not counted in its own answer."""
    return sum(int(v["calls"]) for v in _info(port, "commandstats").values())


def _server_cpu(port: int) -> float:
    cpu = _info(port, "cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _clients(port: int) -> int:
    import redis

    with redis.Redis(host="127.0.0.1", port=port) as c:
        return len(c.client_list())


def _recv(pipe: Connection, timeout: float, what: str) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"no answer from the child within {timeout:.0f}s ({what})")
    return pipe.recv()


def _stop(proc: Any) -> None:
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(10)


# ------------------------------------------------------------------------- (a) many maps


def _maps_child(url: str, n: int, limit: float, pipe: Connection) -> None:
    """One node; on request, ``n`` maps opened (for at most ``limit`` seconds)."""
    import syncmap

    node = syncmap.connect(url)
    node.ping()
    pipe.send((threading.active_count(), _rss_mb()))
    pipe.recv()
    maps = []
    t0 = time.perf_counter()
    for i in range(n):
        if time.perf_counter() - t0 > limit:
            break
        maps.append(node.map(f"scale-{n}-{i}"))
    pipe.send((len(maps), time.perf_counter() - t0))
    while pipe.recv() == "measure":
        pipe.send((threading.active_count(), _rss_mb()))
    os._exit(0)  # closing the maps is not measured (and can take long with many threads)


def bench_maps(port: int) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    window = 2.0 if quick() else 5.0
    counts = MAP_COUNTS[:3] if quick() else MAP_COUNTS
    limit = 10.0 if quick() else OPEN_LIMIT
    # this process's own commands between two snapshots (the first INFO is counted)
    own = _total_calls(port)
    own = _total_calls(port) - own
    rows: list[list[object]] = []
    for n in counts:
        here, there = SPAWN.Pipe()
        proc = SPAWN.Process(target=_maps_child, args=(url, n, limit, there))
        proc.start()
        try:
            threads0, rss0 = _recv(here, 60, "connect")
            clients0 = _clients(port)
            here.send("open")
            opened, seconds = _recv(here, limit + 60, "open maps")
            time.sleep(1.0)  # the listeners start and make their first probe
            here.send("measure")
            threads1, rss1 = _recv(here, 60, "measure")
            clients1 = _clients(port)
            # (between the two commandstats snapshots, only the first INFO is this process's)
            cpu0 = _server_cpu(port)
            calls0, t0 = _total_calls(port), time.monotonic()
            time.sleep(window)
            calls1, t1 = _total_calls(port), time.monotonic()
            cpu1 = _server_cpu(port)
            here.send("exit")
        finally:
            _stop(proc)
        idle = (calls1 - calls0 - own) / (t1 - t0)
        rows.append(
            [
                n,
                opened if opened == n else f"**{opened}** (in {limit:.0f} s)",
                seconds,
                threads1 - threads0,
                clients1 - clients0,
                idle,
                (cpu1 - cpu0) / (t1 - t0) * 1000,
                rss1,
                rss1 - rss0,
            ]
        )
        if n == 1000:
            _goal("1,000 maps open in one node in < 5 s", f"{opened} in {seconds:.1f} s",
                  opened == n and seconds < 5)  # fmt: skip
            _goal("... with <= 2 threads beyond the node's own", str(threads1 - threads0),
                  threads1 - threads0 <= 2)  # fmt: skip
            _goal("... and <= 4 server connections beyond the node's own",
                  str(clients1 - clients0), clients1 - clients0 <= 4)  # fmt: skip
            _goal("... and <= 12 idle server commands/s", f"{idle:.1f}", idle <= 12)
    print_table(
        f"(a) One node with many maps (default options): what the maps add to the connected "
        f"node; idle over {window:.0f} s, 1 s after the last map opened",
        [
            "maps",
            "opened",
            "time to open, s",
            "threads",
            "server connections",
            "idle server commands/s",
            "idle server CPU, ms/s",
            "RSS, MB",
            "RSS added, MB",
        ],
        rows,
    )


# ------------------------------------------------------------------------- (b) many nodes


def _nodes_child(url: str, name: str, key: str, count: int, poll: bool, pipe: Connection) -> None:
    """``count`` nodes on map ``name`` with ``key`` cached; for each value asked, the time
    (monotonic ns) when the last of them served it (``poll``: this thread polls every
    node's ``get``), or received its change message (else: the nodes' listeners alone apply
    the messages, and tell this thread; nothing polls), or -1 if one did not in time."""
    import syncmap

    nodes = [syncmap.connect(url) for _ in range(count)]
    maps = [node.map(name) for node in nodes]
    for m in maps:
        m.get(key)
    waiting: set[int] = set()  # nodes that have not yet received the awaited change
    last_heard = [0]  # monotonic ns when the last of them did
    all_heard = threading.Event()
    mutex = threading.Lock()

    def watcher(i: int) -> Any:
        def on_change(change: Any) -> None:  # (in the listener thread, as it receives it)
            if change.key == key:
                with mutex:
                    if i in waiting:
                        waiting.discard(i)
                        if not waiting:
                            last_heard[0] = time.monotonic_ns()
                            all_heard.set()

        return on_change

    if not poll:
        for i, m in enumerate(maps):
            m._state.watchers.append(watcher(i))  # (the hook behind SyncMap.watch)
    pipe.send("ready")
    while (value := pipe.recv()) is not None:
        if value == "cpu":
            pipe.send(time.process_time())
            continue
        if not poll:
            with mutex:
                all_heard.clear()
                waiting.update(range(count))
            pipe.send("armed")
            done = all_heard.wait(SEEN_TIMEOUT)
            with mutex:
                waiting.clear()
            pipe.send(last_heard[0] if done else -1)
            continue
        pipe.send("armed")
        pending = maps
        last = -1
        deadline = time.monotonic() + SEEN_TIMEOUT
        while pending and time.monotonic() < deadline:
            still = [m for m in pending if m.get(key) != value]
            if len(still) < len(pending):
                last = time.monotonic_ns()
            pending = still
            if pending:
                time.sleep(POLL_SLEEP)
        pipe.send(-1 if pending else last)
    os._exit(0)


def _spread(nodes: int) -> list[int]:
    procs = min(PROCESSES, nodes)
    return [nodes // procs + (1 if i < nodes % procs else 0) for i in range(procs)]


class _Fleet:
    """(b)'s subscribed nodes of one size: a writer node here, ``n`` nodes on a map of their
    own over up to ``PROCESSES`` spawned processes (``poll``: see :func:`_nodes_child`)."""

    def __init__(self, url: str, n: int, poll: bool) -> None:
        import syncmap

        self.n, self.key = n, "k"
        name = f"scale-nodes-{'poll' if poll else 'listen'}-{n}"
        self.node = syncmap.connect(url)
        self.writer = self.node.map(name)
        self.writer[self.key] = 0
        self.value = 0
        self.rng = random.Random(n)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for count in _spread(n):
            here, there = SPAWN.Pipe()
            proc = SPAWN.Process(
                target=_nodes_child, args=(url, name, self.key, count, poll, there)
            )
            proc.start()
            self.procs.append(proc)
            self.pipes.append(here)
        self.samples: list[float] = []
        self.lost = 0
        self.writes = 0
        self.cpu = 0.0  # server CPU (s) over this fleet's timed rounds
        self.readers_cpu = 0.0  # the reader processes' CPU (s) over them
        self.seconds = 0.0  # how long they took

    def wait_ready(self) -> None:
        for pipe in self.pipes:
            if _recv(pipe, 120, "open nodes") != "ready":
                raise RuntimeError("a reader process did not start")

    def round(self, count: int, port: int, timed: bool) -> None:
        """``count`` writes, 1-3 ms apart, each awaited until every node served it."""
        readers0 = self._readers_cpu()
        cpu0, t0 = _server_cpu(port), time.monotonic()
        for _ in range(count):
            time.sleep(self.rng.uniform(0.001, 0.003))
            self.value += 1
            for pipe in self.pipes:
                pipe.send(self.value)
            for pipe in self.pipes:  # (each reader is waiting for it before the write)
                if _recv(pipe, 30, "armed") != "armed":
                    raise RuntimeError("a reader process is out of step")
            start = time.monotonic_ns()
            self.writer[self.key] = self.value
            seen = [_recv(pipe, SEEN_TIMEOUT + 30, "seen") for pipe in self.pipes]
            if not timed:
                continue
            self.writes += 1
            if min(seen) < 0:
                self.lost += 1
            else:
                self.samples.append((max(seen) - start) / 1000)
        if timed:
            self.cpu += _server_cpu(port) - cpu0
            self.seconds += time.monotonic() - t0
            self.readers_cpu += self._readers_cpu() - readers0

    def _readers_cpu(self) -> float:
        for pipe in self.pipes:
            pipe.send("cpu")
        return sum(float(_recv(pipe, 30, "cpu")) for pipe in self.pipes)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            _stop(proc)
        self.writer.close()
        self.node.close()


def bench_nodes(port: int) -> None:
    """Two tables: (b1) a reading thread per process polls its nodes' local copies until
    each serves the write (what an application sees; the polling costs CPU the listeners
    then lack), (b2) nothing polls: each node's listener receives the change message and
    tells a waiting thread (what the listeners alone cost)."""
    _nodes(port, poll=True)
    _nodes(port, poll=False)


def _nodes(port: int, poll: bool) -> None:
    """Every size's nodes stay up for the whole table; the sizes take turns in short
    rounds of 10 writes (the starting size rotates), so that a burst of host load longer
    than a cycle falls on every size alike (this machine's load drifts within seconds)."""
    url = f"redis://127.0.0.1:{port}/0"
    rounds, per_round = (3, 10) if quick() else (100, 10)
    fleets: list[_Fleet] = []
    with contextlib.ExitStack() as stack:
        for n in NODE_COUNTS:  # (a failed start stops those started)
            fleets.append(_Fleet(url, n, poll))
            stack.callback(fleets[-1].close)
        for fleet in fleets:
            fleet.wait_ready()
            fleet.round(2, port, timed=False)  # every node has its key cached
        time.sleep(1.0)  # every listener has made its first probe
        cpu_idle0, t_idle0 = _server_cpu(port), time.monotonic()
        time.sleep(2.0)
        idle_cpu = (_server_cpu(port) - cpu_idle0) / (time.monotonic() - t_idle0)
        for r in range(rounds):
            for j in range(len(fleets)):
                fleets[(r + j) % len(fleets)].round(per_round, port, timed=True)
    base = percentile(fleets[0].samples, 99)
    rows: list[list[object]] = []
    for fleet in fleets:
        p99 = percentile(fleet.samples, 99)
        cpu_per_write = fleet.cpu / max(1, fleet.writes) * 1e6
        idle_per_write = idle_cpu * fleet.seconds / max(1, fleet.writes) * 1e6
        rows.append(
            [
                fleet.n,
                len(fleet.pipes),
                percentile(fleet.samples, 50),
                percentile(fleet.samples, 90),
                p99,
                p99 / base,
                f"{fleet.lost}/{fleet.writes}",
                cpu_per_write,
                cpu_per_write - idle_per_write,
                fleet.readers_cpu / max(1, fleet.writes) * 1e6,
            ]
        )
    top = fleets[-1]
    ratio = percentile(top.samples, 99) / base
    label = "b1" if poll else "b2"
    _goal(
        f"propagation p99 with {top.n} nodes <= 3x one node's ({label})",
        f"{ratio:.2f}x",
        ratio <= 3,
    )
    how = (
        f"served it (the readers poll their nodes' local copies, sleeping "
        f"{POLL_SLEEP * 1e6:.0f} µs between sweeps)"
        if poll
        else "received it (its listener tells a waiting thread; nothing polls)"
    )
    print_table(
        f"({label}) One write seen by every subscribed node, µs from the write's invoke until "
        f"the last node {how}; {rounds} rounds x {per_round} writes per size, the sizes "
        "taking turns, writes 1-3 ms apart",
        [
            "subscribed nodes",
            "processes",
            "p50",
            "p90",
            "p99",
            "p99 x one node's",
            f"never seen ({SEEN_TIMEOUT:.0f} s)",
            "server CPU µs per write",
            "... beyond idle",
            "readers' CPU µs per write",
        ],
        rows,
    )
    print(
        "*server CPU*: INFO cpu (user + sys) over a size's rounds, per write; *beyond idle*:\n"
        f"less the server's CPU at idle with every size's nodes up ({idle_cpu * 1000:.1f} ms/s,\n"
        "measured over 2 s before the rounds) for as long as the rounds took. *readers' CPU*:\n"
        "the reader processes' CPU time over a size's rounds (polling included), per write.\n"
        f"Nothing is pinned to a CPU ({os.cpu_count()} CPUs here).\n"
    )


def main() -> None:
    srv = ServerProcess().start()
    try:
        print(f"## bench_scale (server on port {srv.port}{', quick' if quick() else ''})\n")
        for fn in (bench_maps, bench_nodes):
            srv.client().flushall()
            fn(srv.port)
        print_goals("bench_scale goals (this run)", GOALS)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
