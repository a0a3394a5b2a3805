"""Shared helpers for the benchmarks: a private server, timing, and ratio tables.

Machines here are noisy (2 vCPUs): every table compares peers measured in the same run and
reports ratios; absolute times are indicative only. Every loop is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import itertools
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess

__all__ = [
    "Bare",
    "ServerProcess",
    "apaired_bare",
    "bare_ns",
    "goal",
    "ns_per_call",
    "paired_bare",
    "percentile",
    "print_goals",
    "print_table",
    "quick",
    "version",
    "versions",
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


def versions(*dists: str) -> str:
    """``Python 3.11.7, redis 8.2.0, ...``: the interpreter and the installed ``dists``, as
    measured (a table's peers are named by the versions that ran)."""
    found = [f"{d} {importlib.metadata.version(d)}" for d in dists]
    return ", ".join([f"{platform.python_implementation()} {platform.python_version()}", *found])


def version(dist: str) -> str:
    return importlib.metadata.version(dist)


# ---- bare calls, timed as timeit times them ---------------------------------------------------


def bare_ns(stmt: str, env: dict[str, Any], number: int) -> float:
    """ns per execution of ``stmt`` timed as ``timeit`` times it: ``timeit.Timer(stmt,
    globals=env)``, ``number`` times in timeit's own loop, the garbage collector off. Write
    the call as a caller would, the callable bound in ``env``: ``g("k")`` with ``g = d.get``."""
    return timeit.Timer(stmt, globals=env).timeit(number) / number * 1e9


def _async_inner(expr: str, env: dict[str, Any]) -> Callable[[Any], Any]:
    """timeit's loop in a coroutine: ``for _i in _it: await <expr>``, ``env`` its globals."""
    scope = dict(env)
    exec(f"async def inner(_it):\n    for _i in _it:\n        await {expr}\n", scope)
    inner: Callable[[Any], Any] = scope["inner"]
    return inner


async def async_bare_ns(expr: str, env: dict[str, Any], number: int) -> float:
    """ns per ``await <expr>`` in timeit's loop, inside a coroutine (run in the caller's event
    loop; the garbage collector off): the bare cost of an awaited call."""
    inner = _async_inner(expr, env)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        await inner(itertools.repeat(None, number))
        return (time.perf_counter() - t0) / number * 1e9
    finally:
        if gc_was:
            gc.enable()


@dataclass(frozen=True)
class Bare:
    """A subject against a base, both bare calls, in paired repeats (each repeat times the
    base right before the subject): the medians of each one's times, their ratio, and the
    range of the per-repeat ratios."""

    ns: float
    base_ns: float
    lo: float
    hi: float

    @property
    def ratio(self) -> float:
        return self.ns / self.base_ns

    @property
    def spread(self) -> str:
        return f"{self.lo:.2f} to {self.hi:.2f}"


def _bare(times: list[float], bases: list[float]) -> Bare:
    ratios = sorted(t / b for t, b in zip(times, bases, strict=True))
    return Bare(statistics.median(times), statistics.median(bases), ratios[0], ratios[-1])


BASE_NUMBER = 1_000_000  # dict.get calls per timing of the base (~15-30 ms)


def paired_bare(
    stmt: str,
    env: dict[str, Any],
    number: int,
    base: tuple[str, dict[str, Any]],
    repeats: int = 9,
) -> Bare:
    """``stmt`` against ``base`` (a statement and its globals, e.g. ``('g("k")', {"g":
    d.get})``), both timed by :func:`bare_ns`, in ``repeats`` pairs."""
    if QUICK:
        number, repeats = max(1, number // 50), 3
    base_number = BASE_NUMBER // 50 if QUICK else BASE_NUMBER
    times, bases = [], []
    for _ in range(repeats):
        bases.append(bare_ns(base[0], base[1], base_number))
        times.append(bare_ns(stmt, env, number))
    return _bare(times, bases)


async def apaired_bare(
    stmt: str,
    env: dict[str, Any],
    number: int,
    base: tuple[str, dict[str, Any]],
    repeats: int = 9,
    awaited: bool = False,
) -> Bare:
    """As :func:`paired_bare`, inside the running event loop (whose tasks, a map's listener
    say, run between the repeats); ``awaited``: ``stmt`` is an expression to await, timed by
    :func:`async_bare_ns`."""
    if QUICK:
        number, repeats = max(1, number // 50), 3
    base_number = BASE_NUMBER // 50 if QUICK else BASE_NUMBER
    times, bases = [], []
    for _ in range(repeats):
        await asyncio.sleep(0.002)
        bases.append(bare_ns(base[0], base[1], base_number))
        if awaited:
            times.append(await async_bare_ns(stmt, env, number))
        else:
            times.append(bare_ns(stmt, env, number))
    return _bare(times, bases)


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
