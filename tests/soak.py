"""A fault soak for SyncMap: the multi-process checker (tests/checker.py) under a random mix of
real faults, round after round. Not collected by pytest (too long for CI); run it by hand:

    .venv/bin/python tests/soak.py --rounds 16 --seconds 10 [--asyncio] [--seed 0]

Each round starts 3 node processes on one private Valkey (modes alternate: "owned" keys with
one writer each, and "rmw" read-modify-writes on shared keys); with ``--asyncio`` some nodes
run an AsyncSyncMap (every third round all three). While they run, a fault every 0.4-1.2 s:
subscriber, normal or all connections killed, the server paused (SIGSTOP) for 50-400 ms, or
restarted empty. The checker then reports any read staler than the contract allows (100 ms
propagation window; a restart is a reset every node may take up to the window to notice).
Run it on a quiet machine: a process starved of CPU for over 100 ms breaks the window without
breaking the contract (whose bound is ``max_staleness``). Exit status 1 if any round had a
violation.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_map_checker as checks  # (the specs and windows of the checker tests)
from checker import Reset, check, run_nodes, sleep_until, with_resets
from servers import ServerProcess

FAULTS = ("pubsub", "normal", "all", "pause", "pause", "restart")


def one_round(server: ServerProcess, rnd: int, seconds: float, asyncio_nodes: bool) -> bool:
    rng = random.Random(rnd)
    mode = "owned" if rnd % 2 == 0 else "rmw"
    resets: list[Reset] = []
    log: list[str] = []

    def during(t0: float) -> None:
        at = 0.5
        while at < seconds - 1.0:
            sleep_until(t0 + at)
            fault = rng.choice(FAULTS)
            if fault == "restart":
                down = time.monotonic_ns()
                server.restart()
                resets.append(Reset(down, time.monotonic_ns(), checks.WINDOW_REAL))
            elif fault == "pause":
                pause = rng.uniform(0.05, 0.4)
                server.pause()
                time.sleep(pause)  # (the fault itself: the server is stopped this long)
                server.resume()
                fault += f" {pause:.2f} s"
            else:
                server.drop_clients(None if fault == "all" else fault)
            log.append(f"{at:.1f} s: {fault}")
            at += rng.uniform(0.4, 1.2)

    name = f"soak{rnd}-{time.monotonic_ns()}"
    specs = checks._specs(server.url, name, mode=mode, duration_s=seconds)
    if asyncio_nodes:
        specs = checks._asyncio(specs, "abc" if rnd % 3 == 0 else "bc")
    history = run_nodes(specs, during=during)
    writes = with_resets(history.writes, resets, checks.KEYS)
    report = check(writes, history.reads, checks.WINDOW_REAL)
    acked = sum(1 for w in history.writes if w.acked)
    kinds = "asyncio" if asyncio_nodes else "blocking"
    print(f"round {rnd} ({mode}, {kinds}): {len(history.reads)} reads, {acked} acked writes")
    print("  faults: " + ", ".join(log))
    print("  " + ("no violation" if report.ok else report.summary(limit=5)))
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
    args = parser.parse_args()
    server = ServerProcess().start()
    try:
        results = [
            one_round(server, rnd, args.seconds, args.asyncio)
            for rnd in range(args.seed, args.seed + args.rounds)
        ]
    finally:
        server.stop()
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} rounds without violation")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
