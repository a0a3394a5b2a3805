"""A fault soak for SyncMap: the multi-process checker (tests/checker.py) under a random mix of
real faults, round after round. Not collected by pytest (too long for CI); run it by hand:

    .venv/bin/python tests/soak.py --rounds 16 --seconds 10 [--asyncio] [--readers N] [--seed 0]
        [--trace DIR]

Each round starts 3 node processes on one private Valkey (modes alternate: "owned" keys with
one writer each, a fifth of its writes deletes, and "rmw" read-modify-writes on shared keys);
with ``--asyncio`` some nodes run an AsyncSyncMap (every third round all three); with
``--readers N`` every node has N more threads (tasks) that only read, so fills overlap the
node's own writes. While they run, a fault every 0.4-1.2 s: subscriber, normal or all
connections killed, the server paused (SIGSTOP) for 50-400 ms, or restarted empty. The
checker then reports any read staler than the contract allows (100 ms propagation window; a
restart is a reset every node may take up to the window to notice; a write acknowledged just
as the server was stopped reaches the others once it runs again, so its window ends 100 ms
after the pause).
Run it on a quiet machine: a process starved of CPU for over 100 ms breaks the window without
breaking the contract (whose bound is ``max_staleness``). Exit status 1 if any round had a
violation.

``--trace DIR``: every node's listener logs each of its operations (kind, start, end, whether
the copy was synced, how many changes it had applied, the error) into ``DIR/<pid>.txt``; for a
stale read, the soak prints the faults around it and every node's operations around the
write it missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_map_checker as checks  # (the specs and windows of the checker tests)
from checker import Reset, Write, check, run_nodes, sleep_until, with_resets
from servers import ServerProcess

FAULTS = ("pubsub", "normal", "all", "pause", "pause", "restart")
TRACE_DIR = "SYNCMAP_SOAK_TRACE"  # environment: where the node processes write their traces


def trace(m: Any) -> None:
    """``NodeSpec.setup``: log every operation of ``m``'s listener (sync or asyncio) to a file."""
    listener = m._listener
    out = open(Path(os.environ[TRACE_DIR]) / f"{os.getpid()}.txt", "a", buffering=1)  # noqa: SIM115
    out.write(f"node {type(listener).__name__}\n")
    perform = listener._perform

    @contextlib.contextmanager
    def timed(op: Any) -> Iterator[None]:
        t0, error = time.monotonic_ns(), ""
        try:
            yield
        except BaseException as exc:
            error = repr(exc)[:80]
            raise
        finally:
            state = m._state  # (the listener serves every map of its node)
            out.write(
                f"{t0} {time.monotonic_ns()} {type(op).__name__} synced={state.synced} "
                f"applied={state.applied} {error}\n"
            )

    async def traced(op: Any) -> Any:
        with timed(op):
            return await perform(op)

    def traced_sync(op: Any) -> Any:
        with timed(op):
            return perform(op)

    listener._perform = traced if inspect.iscoroutinefunction(perform) else traced_sync


def paused(writes: list[Write], pauses: list[tuple[int, int]]) -> list[Write]:
    """A stopped server delivers nothing: a write acknowledged just before (or as) the server
    was paused reaches the other nodes once it runs again. Its window then ends the checker's
    window after the pause, not after the acknowledgement. (Reads meanwhile are bounded by
    ``max_staleness``: the contract's bound, not this check's.)"""
    window = checks.WINDOW_REAL
    out = []
    for w in writes:
        for stopped, resumed in pauses:
            if w.ack_ns < resumed and w.ack_ns + window > stopped:
                w = dataclasses.replace(w, window_ns=resumed + window - w.ack_ns)
        out.append(w)
    return out


def explain(report: Any, faults: list[tuple[int, int, str]], trace_dir: Path | None) -> None:
    """For the first stale read: the faults around it, and the nodes' traced operations within
    400 ms of the acknowledgement of the write it missed."""
    stale = [v for v in report.violations if v.kind == "stale"]
    if not stale:
        return
    read, write = stale[0].read, stale[0].write
    print(
        f"  first stale read: node {read.node} {read.key}={read.value!r}, "
        f"{(read.invoke_ns - write.ack_ns) / 1e6:.1f} ms after the ack of {write.value!r} "
        f"(written by {write.node} in {(write.ack_ns - write.invoke_ns) / 1e6:.1f} ms)"
    )
    near = [
        f"{what} {(start - write.ack_ns) / 1e6:.0f}..{(end - write.ack_ns) / 1e6:.0f}"
        for start, end, what in faults
        if end > write.ack_ns - 3e9 and start < read.invoke_ns
    ]
    print("  faults (ms from the ack): " + ", ".join(near))
    for path in sorted(trace_dir.glob("*.txt")) if trace_dir else []:
        lines = path.read_text().splitlines()
        print(f"  trace {path.name}: {lines[0]} (ms from the ack)")
        for line in lines[1:]:
            t0, t1, rest = line.split(" ", 2)
            if int(t1) > write.ack_ns - 400_000_000 and int(t0) < write.ack_ns + 400_000_000:
                a, b = (int(t0) - write.ack_ns) / 1e6, (int(t1) - write.ack_ns) / 1e6
                print(f"    {a:9.1f} .. {b:9.1f} {rest}")


def one_round(
    server: ServerProcess,
    rnd: int,
    seconds: float,
    asyncio_nodes: bool,
    trace_dir: Path | None,
    readers: int = 0,
) -> bool:
    rng = random.Random(rnd)
    mode = "owned" if rnd % 2 == 0 else "rmw"
    resets: list[Reset] = []
    log: list[str] = []
    faults: list[tuple[int, int, str]] = []  # (start, end, what)
    pauses: list[tuple[int, int]] = []

    def during(t0: float) -> None:
        at = 0.5
        while at < seconds - 1.0:
            sleep_until(t0 + at)
            fault = rng.choice(FAULTS)
            start = time.monotonic_ns()
            if fault == "restart":
                down = time.monotonic_ns()
                server.restart()
                resets.append(Reset(down, time.monotonic_ns(), checks.WINDOW_REAL))
            elif fault == "pause":
                pause = rng.uniform(0.05, 0.4)
                stopped = time.monotonic_ns()
                server.pause()
                time.sleep(pause)  # (the fault itself: the server is stopped this long)
                server.resume()
                pauses.append((stopped, time.monotonic_ns()))
                fault += f" {pause:.2f} s"
            else:
                server.drop_clients(None if fault == "all" else fault)
            log.append(f"{at:.1f} s: {fault}")
            faults.append((start, time.monotonic_ns(), fault))
            at += rng.uniform(0.4, 1.2)

    name = f"soak{rnd}-{time.monotonic_ns()}"
    specs = checks._specs(server.url, name, mode=mode, duration_s=seconds)
    if mode == "owned":  # a fifth of the writes are deletes
        specs = [dataclasses.replace(spec, delete_ratio=0.2) for spec in specs]
    if asyncio_nodes:
        specs = checks._asyncio(specs, "abc" if rnd % 3 == 0 else "bc")
    # readers paced so that they last the round (back to back they reach max_ops in ~4 s)
    specs = [dataclasses.replace(spec, readers=readers, reader_rate=20_000) for spec in specs]
    if trace_dir is not None:
        specs = [dataclasses.replace(spec, setup=trace) for spec in specs]
        for old in trace_dir.glob("*.txt"):
            old.unlink()
    history = run_nodes(specs, during=during)
    writes = with_resets(paused(history.writes, pauses), resets, checks.KEYS)
    report = check(writes, history.reads, checks.WINDOW_REAL)
    acked = sum(1 for w in history.writes if w.acked)
    kinds = ("asyncio" if asyncio_nodes else "blocking") + (f", {readers} readers" * bool(readers))
    print(f"round {rnd} ({mode}, {kinds}): {len(history.reads)} reads, {acked} acked writes")
    print("  faults: " + ", ".join(log))
    print("  " + ("no violation" if report.ok else report.summary(limit=5)))
    explain(report, faults, trace_dir)
    if history.errors:
        print(f"  errors (allowed by the contract): {history.errors}")
    sys.stdout.flush()
    return report.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0, help="first round's seed")
    parser.add_argument("--asyncio", action="store_true", help="AsyncSyncMap nodes too")
    parser.add_argument("--readers", type=int, default=0, help="reading threads per node")
    parser.add_argument("--trace", type=Path, help="trace the listeners into this directory")
    args = parser.parse_args()
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
        os.environ[TRACE_DIR] = str(args.trace.resolve())
    server = ServerProcess().start()
    try:
        results = [
            one_round(server, rnd, args.seconds, args.asyncio, args.trace, args.readers)
            for rnd in range(args.seed, args.seed + args.rounds)
        ]
    finally:
        server.stop()
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} rounds without violation")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
