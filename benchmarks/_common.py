"""Shared helpers for the benchmarks: a private server, timing, and ratio tables.

Machines here are noisy (2 vCPUs): every table compares peers measured in the same run and
reports ratios; absolute times are indicative only. Every loop is bounded.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess

__all__ = [
    "ServerProcess",
    "goal",
    "ns_per_call",
    "percentile",
    "print_goals",
    "print_table",
    "quick",
]

QUICK = "--quick" in sys.argv


def quick() -> bool:
    """``--quick``: smaller loops (for smoke-testing the benchmarks themselves)."""
    return QUICK


def ns_per_call(fn: Callable[[], object], loops: int = 200_000, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean time of one ``fn()`` call, in nanoseconds."""
    if QUICK:
        loops, repeat = max(1, loops // 50), 3
    results = []
    rng = range(loops)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            for _ in rng:
                fn()
            results.append((time.perf_counter_ns() - t0) / loops)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(results)


def round_ratios(values: Sequence[float], base: Sequence[float]) -> tuple[float, str]:
    """Each round's value over ``base``'s in the same round (the host's speed drifts between
    rounds; a paired ratio sets that aside): their median, and their range as text."""
    ratios = sorted(a / b for a, b in zip(values, base, strict=True))
    return statistics.median(ratios), f"{ratios[0]:.2f} to {ratios[-1]:.2f}"


def paired_ns_per_call(
    fn: Callable[[], object],
    base: Callable[[], object],
    loops: int,
    base_loops: int,
    repeats: int = 7,
) -> tuple[float, float, float]:
    """ns per call of ``fn`` and of ``base``, and ``fn``'s ratio to ``base``: each repeat
    times ``base`` right before ``fn`` (the machine's speed drifts between runs seconds
    apart); the medians of each one's times and of the per-repeat ratios."""
    times, bases, ratios = [], [], []
    for _ in range(3 if QUICK else repeats):
        b = ns_per_call(base, loops=base_loops, repeat=1)
        t = ns_per_call(fn, loops=loops, repeat=1)
        times.append(t)
        bases.append(b)
        ratios.append(t / b)
    return statistics.median(times), statistics.median(bases), statistics.median(ratios)


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[idx]


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print (and return) a Markdown table."""
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def goal(goals: dict[str, tuple[str, str]], name: str, measured: str, met: bool) -> None:
    """Record in ``goals`` whether goal ``name`` was met in this run, and its measure."""
    goals[name] = (measured, "yes" if met else "**no**")


def print_goals(title: str, goals: dict[str, tuple[str, str]]) -> None:
    """The goals recorded with :func:`goal`, as a table (nothing if there are none)."""
    if goals:
        print_table(title, ["goal", "measured", "met"], [[k, *v] for k, v in goals.items()])


def _fmt(cell: object) -> str:
    if isinstance(cell, float):
        if cell >= 100:
            return f"{cell:,.0f}"
        if cell >= 10:
            return f"{cell:.1f}"
        return f"{cell:.2f}"
    return str(cell)
