"""What one change message costs the process of a node that receives it: CPU time (process
time) per received message, for a blocking node (its listener thread) and an asyncio node
(its listener task), against peers that receive the same messages in the same windows:
redis-py's pub/sub read with ``get_message`` and with a ``run_in_thread`` handler (the floor of
a Python subscriber), and a bare socket woken by ``poll(2)`` that only ``recv``s (the wake-up
alone).

The writer is this process (a node of its own); each receiver is a spawned process of its
own, subscribed for the whole run. Messages, one write 1 ms apart (so that each one wakes its
receivers on its own): *S*, a set whose value is not pushed (the node invalidates; after the
first one the key is not in its copy); *V*, a set whose value rides in the message (the node
decodes it and replaces its entry: the key stays cached); *B*, a ``set_many`` of
``BATCH`` keys, one message (every key cached, each value pushed).

*idle*: nothing else runs in the node's process; the listener alone applies the messages. A
window's CPU time, less the process's CPU at idle (measured over a window without writes) for
as long, over the messages it received. *spinning*: a thread (a task, for the asyncio node)
spins on local hits of another key and applies the messages itself (``poll``; the asyncio
loop's reader callback between its steps): the thread CPU time (``time.thread_time``) of
each drain of the subscriber connection that applied changes, per message (the benchmark
wraps the drain for these windows only; the hits' own polling, which runs with or without
messages, is not counted). Only the node measured
spins; the other receivers stay idle. Every window is bounded; ``--quick`` shrinks them.

``BENCH_LISTEN_OTHER=<src dir>`` adds two receivers, a blocking and an asyncio node of the
syncmap found in that directory (another checkout's ``src``), measured in the same windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import select
import socket
import statistics
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from benchmarks._common import ServerProcess, print_table, quick, versions

SPAWN = mp.get_context("spawn")
BATCH = 10  # keys per set_many
GAP = 0.001  # s between writes
OTHER = os.environ.get("BENCH_LISTEN_OTHER", "")  # another syncmap's src dir, or ""
NODES = ("syncmap", "syncmap-async", *(("other", "other-async") if OTHER else ()))
RECEIVERS = (*NODES, "redis-py get_message", "redis-py run_in_thread", "socket")
KINDS = ("S", "V", "B")
MAP = "listen-bench"
KEYS = ["k", *(f"b{j}" for j in range(BATCH))]


def _cpu() -> float:
    return time.process_time()


# ----------------------------------------------------------------------------- receivers


def _import_syncmap(src: str) -> Any:
    """syncmap, from ``src`` if given (what was imported before, from elsewhere, is
    forgotten: the benchmark's helpers import it)."""
    if src:
        import sys

        for name in [n for n in sys.modules if n == "syncmap" or n.startswith("syncmap.")]:
            del sys.modules[name]
        sys.path.insert(0, src)
    import syncmap

    if src and not syncmap.__file__.startswith(src):  # type: ignore[operator]
        raise RuntimeError(f"syncmap came from {syncmap.__file__}, not {src}")
    return syncmap


@contextlib.contextmanager
def _timed_drains(state: Any, into: list[int]) -> Any:
    """While in it, each drain of the subscriber connection that applies changes of
    ``state``'s map adds its thread's CPU time (ns) and those changes to ``into``."""
    import sys

    raw = sys.modules["syncmap._listener"]._RawSubscriber
    drain = raw.drain

    def timed(self: Any, hub: Any) -> int:
        changes, t0 = state.invalidations, time.thread_time_ns()
        try:
            return int(drain(self, hub))
        finally:
            if state.invalidations != changes:
                into[0] += time.thread_time_ns() - t0
                into[1] += state.invalidations - changes

    raw.drain = timed
    try:
        yield
    finally:
        raw.drain = drain


def _sync_child(url: str, src: str, pipe: Connection) -> None:
    syncmap = _import_syncmap(src)

    node = syncmap.connect(url)
    m = node.map(MAP)
    for key in (*KEYS, "hot"):
        m.get(key)
    state = m._state  # (its coherence state: counts every change applied)
    pipe.send("ready")
    while (cmd := pipe.recv()) is not None:
        stop = threading.Event()

        def spinner(stop: threading.Event = stop) -> None:
            get = m.get
            while not stop.is_set():
                for _ in range(1000):
                    get("hot")

        drains = [0, 0]
        with contextlib.ExitStack() as stack:
            thread = None
            if cmd == "spin":
                stack.enter_context(_timed_drains(state, drains))
                thread = threading.Thread(target=spinner)
            changes0, cpu0, t0 = state.invalidations, _cpu(), time.monotonic()
            if thread is not None:
                thread.start()
            pipe.send("started")
            pipe.recv()  # stop
            stop.set()
            if thread is not None:
                thread.join()
            cpu, seconds = _cpu() - cpu0, time.monotonic() - t0
        pipe.send((cpu, seconds, state.invalidations - changes0, drains))
    node.close()


def _async_child(url: str, src: str, pipe: Connection) -> None:
    syncmap = _import_syncmap(src)

    async def main() -> None:
        node = await syncmap.connect_async(url)
        m = await node.map(MAP)
        for key in (*KEYS, "hot"):
            await m.get(key)
        state = m._state
        loop = asyncio.get_running_loop()
        pipe.send("ready")
        while True:
            got: asyncio.Future[Any] = loop.create_future()
            loop.add_reader(pipe.fileno(), lambda f=got: f.done() or f.set_result(pipe.recv()))
            cmd = await got
            loop.remove_reader(pipe.fileno())
            if cmd is None:
                break
            stopped = loop.create_future()
            loop.add_reader(pipe.fileno(), lambda f=stopped: f.done() or f.set_result(pipe.recv()))
            drains = [0, 0]
            with contextlib.ExitStack() as stack:
                if cmd == "spin":
                    stack.enter_context(_timed_drains(state, drains))
                changes0, cpu0, t0 = state.invalidations, _cpu(), time.monotonic()
                pipe.send("started")
                if cmd == "spin":
                    get = m.get
                    while not stopped.done():
                        for _ in range(1000):
                            await get("hot")
                else:
                    await stopped
                cpu, seconds = _cpu() - cpu0, time.monotonic() - t0
            loop.remove_reader(pipe.fileno())
            pipe.send((cpu, seconds, state.invalidations - changes0, drains))
        await node.close()

    asyncio.run(main())


def _channel(url: str) -> bytes:
    from syncmap._core.keys import MapKeys

    return MapKeys(MAP).channel.encode()


def _pubsub_child(url: str, threaded: bool, pipe: Connection) -> None:
    import redis

    client = redis.Redis.from_url(url)
    channel = _channel(url)
    count = [0]
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    runner = None
    if threaded:

        def handler(message: dict[str, Any]) -> None:
            count[0] += 1

        pubsub.ssubscribe(**{channel.decode(): handler})
        runner = pubsub.run_in_thread(sleep_time=1.0, daemon=True, sharded_pubsub=True)
    else:
        pubsub.ssubscribe(channel)
        while pubsub.get_message(timeout=0.2) is None and not pubsub.subscribed:
            pass
    pipe.send("ready")
    while pipe.recv() is not None:
        count0, cpu0, t0 = count[0], _cpu(), time.monotonic()
        pipe.send("started")
        while not pipe.poll(0):
            if threaded:
                pipe.poll(0.05)
                continue
            message = pubsub.get_message(timeout=0.05)
            while message is not None:  # (every waiting one, as a subscriber would)
                count[0] += message["type"] == "smessage"
                message = pubsub.get_message(timeout=0.05)
        pipe.recv()
        pipe.send((_cpu() - cpu0, time.monotonic() - t0, count[0] - count0, None))
    if runner is not None:
        runner.stop()
    pubsub.close()


def _socket_child(url: str, port: int, pipe: Connection) -> None:
    """The wake-up alone: poll(2) on a subscribed socket, recv, count messages by their
    prefix; no RESP parsing, nothing applied."""
    channel = _channel(url)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(channel), channel))
    sock.recv(65536)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(pipe.fileno(), select.POLLIN)
    mark = b"smessage\r\n"
    pipe.send("ready")
    while pipe.recv() is not None:
        count, cpu0, t0 = 0, _cpu(), time.monotonic()
        pipe.send("started")
        while True:
            ready = poller.poll(1000)
            if any(fd == pipe.fileno() for fd, _ in ready):
                break
            if ready:
                count += sock.recv(65536).count(mark)
        pipe.recv()
        pipe.send((_cpu() - cpu0, time.monotonic() - t0, count, None))
    sock.close()


# ------------------------------------------------------------------------------- the run


def _recv(pipe: Connection, what: str, timeout: float = 60) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"no answer from a receiver within {timeout:.0f}s ({what})")
    return pipe.recv()


class _Run:
    def __init__(self, port: int) -> None:
        import syncmap

        self.url = f"redis://127.0.0.1:{port}/0"
        self.nodes = [syncmap.connect(self.url), syncmap.connect(self.url)]
        self.plain = self.nodes[0].map(MAP, push_values=0)  # S: the value is not pushed
        self.pushed = self.nodes[1].map(MAP)  # V and B: small values ride in the message
        self.pushed.set_many({key: 0 for key in (*KEYS, "hot")})
        self.value = 0
        self.pipes: dict[str, Connection] = {}
        self.procs: list[Any] = []
        targets: dict[str, tuple[Any, tuple[Any, ...]]] = {
            "syncmap": (_sync_child, (self.url, "")),
            "syncmap-async": (_async_child, (self.url, "")),
            "other": (_sync_child, (self.url, OTHER)),
            "other-async": (_async_child, (self.url, OTHER)),
            "redis-py get_message": (_pubsub_child, (self.url, False)),
            "redis-py run_in_thread": (_pubsub_child, (self.url, True)),
            "socket": (_socket_child, (self.url, port)),
        }
        for name in RECEIVERS:
            target, args = targets[name]
            here, there = SPAWN.Pipe()
            proc = SPAWN.Process(target=target, args=(*args, there), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.pipes[name] = here
        for name, pipe in self.pipes.items():
            if _recv(pipe, f"{name} start", 120) != "ready":
                raise RuntimeError(f"{name} did not start")

    def write(self, kind: str) -> None:
        self.value += 1
        if kind == "S":
            self.plain["k"] = self.value
        elif kind == "V":
            self.pushed["k"] = self.value
        else:
            self.pushed.set_many({f"b{j}": self.value for j in range(BATCH)})

    def window(self, kind: str | None, writes: int, spinning: str | None) -> dict[str, Any]:
        """One window: every receiver measures (``spinning`` spins), ``writes`` of ``kind``
        (none: ``writes`` x GAP of nothing). Each receiver's (cpu, seconds, changes, drains):
        drains ``[ns, changes]`` (see :func:`_timed_drains`) or None."""
        for name, pipe in self.pipes.items():
            pipe.send("spin" if name == spinning else "idle")
        for name, pipe in self.pipes.items():
            if _recv(pipe, f"{name} window") != "started":
                raise RuntimeError(f"{name} is out of step")
        for _ in range(writes):
            time.sleep(GAP)
            if kind is not None:
                self.write(kind)
        time.sleep(0.05)  # the last messages arrive
        for pipe in self.pipes.values():
            pipe.send("stop")
        return {name: _recv(pipe, f"{name} result") for name, pipe in self.pipes.items()}

    def close(self) -> None:
        for pipe in self.pipes.values():
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for node in self.nodes:
            node.close()


def _per_message(changes: int, kind: str, name: str) -> float:
    """Messages received, from what the receiver counted (changes for a syncmap node)."""
    return changes / BATCH if kind == "B" and name in NODES else changes


def bench(port: int) -> None:
    cycles, writes = (1, 100) if quick() else (3, 600)
    run = _Run(port)
    idle: dict[tuple[str, str], list[float]] = {}  # (receiver, kind) -> µs per message
    spin: dict[tuple[str, str], list[float]] = {}
    lost: dict[str, int] = {}
    try:
        for kind in KINDS:  # warm-up: every path runs once
            run.window(kind, 20, None)
        for cycle in range(cycles):
            base = run.window(None, writes, None)
            rates = {name: r[0] / r[1] for name, r in base.items()}  # CPU s per s, idle
            for i in range(len(KINDS)):
                kind = KINDS[(cycle + i) % len(KINDS)]
                results = run.window(kind, writes, None)
                for name, (cpu, seconds, changes, _) in results.items():
                    got = _per_message(changes, kind, name)
                    if got != writes:
                        lost[name] = lost.get(name, 0) + abs(writes - int(got))
                    idle.setdefault((name, kind), []).append(
                        (cpu - rates[name] * seconds) / max(1, got) * 1e6
                    )
                for name in NODES:
                    ns, applied = run.window(kind, writes, name)[name][3]
                    got = _per_message(applied, kind, name)
                    spin.setdefault((name, kind), []).append(ns / 1000 / max(1, got))
    finally:
        run.close()

    def fig(values: list[float]) -> str:
        mid = statistics.median(values)
        if len(values) == 1:
            return f"{mid:.1f}"
        return f"{mid:.1f} ({min(values):.1f}-{max(values):.1f})"

    rows: list[list[object]] = []
    for kind in KINDS:
        floor = statistics.median(idle[("redis-py get_message", kind)])
        for name in RECEIVERS:
            values = idle[(name, kind)]
            rows.append(
                [
                    kind,
                    name,
                    fig(values),
                    f"{statistics.median(values) / floor:.2f}x",
                    fig(spin[(name, kind)]) if (name, kind) in spin else "",
                ]
            )
    print_table(
        f"CPU µs per received change message, median (range) of {cycles} windows of "
        f"{writes} messages 1 ms apart; S: invalidation, V: value pushed, B: set_many of "
        f"{BATCH} keys (per message)",
        [
            "message",
            "receiver",
            "idle: µs per message",
            "x redis-py get_message",
            "spinning on hits: µs per message in its drains",
        ],
        rows,
    )
    missing = ", ".join(f"{k} {v}" for k, v in lost.items()) or "none"
    print(
        "*idle*: the window's process CPU less the process's idle CPU for as long, per message\n"
        "received; *spinning*: a thread (task) of the node spins on hits of another key; the\n"
        "thread CPU time of each drain of the subscriber connection that applied changes, per\n"
        f"message applied. Messages not counted by a receiver: {missing}.\n"
    )


def main() -> None:
    srv = ServerProcess().start()
    try:
        print(
            f"## bench_listen (server on port {srv.port}{', quick' if quick() else ''}; "
            f"{versions('redis', 'hiredis')})\n"
        )
        if OTHER:
            print(f"*other*, *other-async*: the syncmap of {OTHER}\n")
        bench(srv.port)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
