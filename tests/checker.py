"""A Jepsen-style staleness checker for SyncMap, and a multi-process harness that feeds it.

History model
-------------
Every operation is stamped with the system-wide monotonic clock (``time.monotonic_ns`` is
``CLOCK_MONOTONIC``: one clock for every process on a Linux machine).

* :class:`Write` — one write of ``key``. ``value`` is a token unique per write (``None`` means
  "the key is absent": a delete, or a server reset). ``order`` is the write's position in the
  key's write order on the server; it must come from the server's own serialization, never from
  a client's guess: either one writer per key (its program order is the server order, because it
  waits for each ack), or a read-modify-write chain (the new value carries ``previous.n + 1``
  computed atomically by the server-side CAS), or a version the map exposes. ``acked=False``
  marks a write whose call raised: it may or may not have landed, so its value is legal to read
  but it creates no obligation.
* :class:`Read` — one read: the token returned, when it was invoked, when it returned.

The rule (docs/contract.md §1-§2)
---------------------------------
A read R of key k on node X must return a value whose order is >= the order of every acked
write W of k with ``W.ack_ns + window(W, X) < R.invoke_ns``, where ``window`` is 0 when W was
made by X itself (read-your-writes) and ``window_ns`` otherwise (propagation). A read must also
never return a token that no write of that key produced ("phantom"), nor one whose write was
invoked only after the read had returned ("future").

A ``None`` read is matched to the best "absent" state it could have seen: the initial state
(order ``()``-smallest) or any delete/reset of the key invoked before the read returned. This is
lenient only where a history cannot say more; it never reports a correct read as stale.

Server resets (a restart without persistence) are modelled as a delete of every key by the
pseudo-node ``SERVER`` invoked when the kill began and acked when the new server answered, with
its own window (``max_staleness`` and slack): the contract lets a disconnected node be stale for
at most that long. Orders are tuples ``(epoch, n)`` so that a reset sorts after everything
before it; :func:`with_resets` does the bookkeeping.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import pickle
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

SERVER = "<server>"

Order = tuple[int, ...]


@dataclass(frozen=True)
class Write:
    node: str
    key: str
    value: Hashable | None  # unique token per write; None = absent (delete / reset)
    order: Order | None  # position in the key's server-side write order (None: unknown)
    invoke_ns: int
    ack_ns: int
    acked: bool = True
    window_ns: int | None = None  # overrides the checker's window for this write


@dataclass(frozen=True)
class Read:
    node: str
    key: str
    value: Hashable | None
    invoke_ns: int
    return_ns: int


@dataclass(frozen=True)
class Violation:
    kind: str  # "stale" | "phantom" | "future" | "duplicate-order" | "duplicate-token"
    read: Read | None
    write: Write | None  # the write the read should have seen (stale) / the clashing write
    lag_ns: int = 0  # stale: how long after the write's deadline the read was invoked

    def describe(self) -> str:
        r, w = self.read, self.write
        if self.kind == "stale" and r and w:
            return (
                f"stale: node {r.node} read {r.key}={r.value!r} {self.lag_ns / 1e6:.3f} ms past "
                f"the deadline of {w.node}'s write {w.value!r} (order {w.order})"
            )
        if self.kind == "duplicate-order" and w:
            return f"duplicate-order: two writes of {w.key} claim order {w.order}"
        if self.kind == "duplicate-token" and w:
            return f"duplicate-token: two writes of {w.key} wrote {w.value!r}"
        return f"{self.kind}: {r}"


@dataclass
class Report:
    reads: int = 0
    writes: int = 0
    violations: list[Violation] = field(default_factory=list)
    max_lag_ns: int = 0
    unjudged: int = 0
    # how long after a newer write's ack each read was invoked, for every read that
    # returned an older value (inside or outside the window): the observed propagation delay
    lags_ns: list[int] = field(default_factory=list)

    def lag_percentiles(self) -> str:
        if not self.lags_ns:
            return "no read ever returned a value older than an acked write"
        xs = sorted(self.lags_ns)
        pick = [xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] / 1e6 for q in (0.5, 0.99, 1.0)]
        return (
            f"{len(xs)} reads saw an older value after a newer ack: "
            f"p50 {pick[0]:.3f} ms, p99 {pick[1]:.3f} ms, max {pick[2]:.3f} ms"
        )

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for v in self.violations:
            out[v.kind] += 1
        return dict(out)

    def summary(self, limit: int = 5) -> str:
        head = f"{self.reads} reads, {self.writes} writes, violations {self.kinds() or 'none'}"
        if self.violations:
            head += f", max lag {self.max_lag_ns / 1e6:.3f} ms"
        lines = [head, "  " + self.lag_percentiles()]
        lines += ["  " + v.describe() for v in self.violations[:limit]]
        return "\n".join(lines)


class _Deadlines:
    """For one key: the highest order that must be visible at a given time (bisect + prefix max)."""

    def __init__(self, entries: Iterable[tuple[int, Order, Write]]) -> None:
        rows = sorted(entries, key=lambda e: e[0])
        self.times = [t for t, _, _ in rows]
        self.best: list[tuple[Order, Write]] = []
        for _, order, w in rows:
            if not self.best or order > self.best[-1][0]:
                self.best.append((order, w))
            else:
                self.best.append(self.best[-1])

    def required(self, before_ns: int) -> tuple[Order, Write] | None:
        i = bisect.bisect_left(self.times, before_ns)  # deadlines strictly before the read
        return self.best[i - 1] if i else None


class _FirstNewer:
    """For one key: the earliest ack among acked writes ordered after a given order."""

    def __init__(self, entries: Iterable[tuple[int, Order, Write]]) -> None:
        rows = sorted((o, w.ack_ns) for _, o, w in entries)
        self.orders = [o for o, _ in rows]
        self.min_ack: list[int] = [0] * len(rows)
        best = 1 << 62
        for i in range(len(rows) - 1, -1, -1):
            best = min(best, rows[i][1])
            self.min_ack[i] = best

    def lag(self, order: Order, at_ns: int) -> int:
        i = bisect.bisect_right(self.orders, order)
        return at_ns - self.min_ack[i] if i < len(self.orders) else 0


def check(writes: Sequence[Write], reads: Sequence[Read], window_ns: int) -> Report:
    """Every read against every acked write; see the module docstring for the rule."""
    report = Report(reads=len(reads), writes=len(writes))
    by_token: dict[tuple[str, Hashable], Write] = {}
    absent: dict[str, list[Write]] = defaultdict(list)
    for w in writes:
        if w.value is None:
            absent[w.key].append(w)
            continue
        if (w.key, w.value) in by_token:
            report.violations.append(Violation("duplicate-token", None, w))
            continue
        by_token[(w.key, w.value)] = w
    seen_order: dict[tuple[str, Order], Write] = {}
    for w in writes:
        if not w.acked or w.node == SERVER or w.order is None:
            continue
        clash = seen_order.setdefault((w.key, w.order), w)
        if clash is not w:
            report.violations.append(Violation("duplicate-order", None, w))

    acked = [w for w in writes if w.acked and w.order is not None]
    everyone: dict[str, list[tuple[int, Order, Write]]] = defaultdict(list)
    own: dict[tuple[str, str], list[tuple[int, Order, Write]]] = defaultdict(list)
    for w in acked:
        win = window_ns if w.window_ns is None else w.window_ns
        assert w.order is not None
        everyone[w.key].append((w.ack_ns + win, w.order, w))
        own[(w.key, w.node)].append((w.ack_ns, w.order, w))
    deadlines = {k: _Deadlines(v) for k, v in everyone.items()}
    first_newer = {k: _FirstNewer(v) for k, v in everyone.items()}
    own_deadlines = {k: _Deadlines(v) for k, v in own.items()}
    for lst in absent.values():
        lst.sort(key=lambda w: w.invoke_ns)

    for r in reads:
        if r.value is None:
            order: Order = ()
            for w in absent.get(r.key, ()):
                if w.invoke_ns >= r.return_ns:
                    break
                if w.order is not None:
                    order = max(order, w.order)
        else:
            src = by_token.get((r.key, r.value))
            if src is None:
                report.violations.append(Violation("phantom", r, None))
                continue
            if src.invoke_ns > r.return_ns:
                report.violations.append(Violation("future", r, src))
                continue
            if src.order is None:  # a failed write of unknown position: cannot be judged
                report.unjudged += 1
                continue
            order = src.order
        newer = first_newer.get(r.key)
        if newer is not None:
            lag = newer.lag(order, r.invoke_ns)
            if lag > 0:
                report.lags_ns.append(lag)
        worst: tuple[Order, Write, int] | None = None
        for table, deadline_of in (
            (deadlines.get(r.key), lambda w: w.ack_ns + _win(w, window_ns)),
            (own_deadlines.get((r.key, r.node)), lambda w: w.ack_ns),
        ):
            if table is None:
                continue
            need = table.required(r.invoke_ns)
            if need is not None and need[0] > order and (worst is None or need[0] > worst[0]):
                worst = (need[0], need[1], r.invoke_ns - deadline_of(need[1]))
        if worst is not None:
            report.violations.append(Violation("stale", r, worst[1], worst[2]))
            report.max_lag_ns = max(report.max_lag_ns, worst[2])
    return report


def _win(w: Write, window_ns: int) -> int:
    return window_ns if w.window_ns is None else w.window_ns


@dataclass(frozen=True)
class Reset:
    """The server lost its memory: killed at ``down_ns``, answering again at ``up_ns``."""

    down_ns: int
    up_ns: int
    window_ns: int  # how long a node may keep serving pre-reset values after ``up_ns``


def with_resets(
    writes: Sequence[Write], resets: Sequence[Reset], keys: Iterable[str]
) -> list[Write]:
    """Prefix every order with its epoch and add one "absent" write per key per reset.

    A write belongs to the epoch of the last reset that began before it was acked. A write whose
    call overlapped a reset may have landed on either server: it becomes ``acked=False`` (legal to
    read, no obligation).
    """
    resets = sorted(resets, key=lambda r: r.down_ns)
    downs = [r.down_ns for r in resets]
    out: list[Write] = []
    for w in writes:
        epoch = bisect.bisect_left(downs, w.ack_ns)
        overlaps = any(w.invoke_ns <= r.up_ns and w.ack_ns >= r.down_ns for r in resets)
        order = None if w.order is None else (epoch, *w.order)
        out.append(replace(w, order=order, acked=w.acked and not overlaps))
    for e, r in enumerate(resets, start=1):
        for k in keys:
            out.append(Write(SERVER, k, None, (e,), r.down_ns, r.up_ns, True, r.window_ns))
    return out


# --------------------------------------------------------------------------------------------
# The multi-process harness: each node is an OS process with its own SyncMap.


@dataclass(frozen=True)
class NodeSpec:
    """What one node process does. ``setup`` (an importable function) runs in the child first.

    Writes come in steps at exponentially distributed gaps (mean ``write_interval_s``; 0: this
    node never writes); a step writes one key ``burst`` times back to back (bursts make fill
    races likely, the quiet gaps let a wrongly installed value linger). Reads of random keys
    fill the time in between, paced to at most ``read_rate`` per second.
    """

    url: str
    map_name: str
    node: str
    index: int
    keys: tuple[str, ...]
    owned: tuple[str, ...] = ()  # mode "owned": the keys only this node writes
    mode: str = "owned"  # "owned": plain m[k] = v by the key's single writer; "rmw": update_item
    duration_s: float = 2.0
    write_interval_s: float = 0.0
    burst: int = 1
    read_rate: float = 20_000.0
    max_ops: int = 200_000
    map_options: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[Any], None] | None = None  # called with the map, in the child
    asyncio: bool = False  # an AsyncSyncMap on an event loop, instead of a SyncMap
    readers: int = 0  # extra threads (tasks, under asyncio) of this node that only read
    reader_rate: float = 0.0  # reads per second of each of them (0: back to back)
    delete_ratio: float = 0.0  # mode "owned": this share of the writes are deletes
    out_path: str = ""


def _now() -> int:
    return time.monotonic_ns()


def _token(value: Any) -> Hashable | None:
    if isinstance(value, dict):
        return value.get("id")  # type: ignore[no-any-return]
    if isinstance(value, list):
        return tuple(value)
    return value  # type: ignore[no-any-return]


def _bump(token: str) -> Callable[[Any], dict[str, Any]]:
    def fn(old: Any) -> dict[str, Any]:
        return {"n": (old or {"n": 0})["n"] + 1, "id": token}

    return fn


def run_node(spec: NodeSpec, ready: Any, go: Any, start_at: Any) -> None:
    """Body of one node process: writes its history to ``spec.out_path`` (pickle).

    Puts its name on ``ready`` once connected, waits for ``go``, starts at ``start_at.value``.
    The workload is one step generator (:func:`_steps`), performed on a blocking ``SyncMap``
    or, with ``spec.asyncio``, on an ``AsyncSyncMap``. Both run under one small event loop (the
    blocking map's calls simply block it: nothing else runs on it).
    """
    import asyncio

    history = _NodeHistory()
    asyncio.run(_node_main(spec, history, ready, go, start_at))
    with open(spec.out_path, "wb") as fh:
        pickle.dump({**history.__dict__, "errors": dict(history.errors)}, fh)


@dataclass
class _NodeHistory:
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stats: str | None = None


Step = tuple[Any, ...]  # ("sleep", s) | ("read", key) | ("set", key, token) | ("del", key)
# | ("bump", key, token)


def _steps(spec: NodeSpec, history: _NodeHistory, start_at_ns: int) -> Any:
    """The node's workload as a generator of steps; each step's result (or error) is sent
    back in. Records every write and read in ``history``."""
    writes, reads, errors = history.writes, history.reads, history.errors
    rng = random.Random(spec.index * 7919 + os.getpid())
    counters: dict[str, int] = defaultdict(int)
    writable = spec.owned if spec.mode == "owned" else spec.keys
    seq = 0
    while _now() < start_at_ns:
        yield ("sleep", 0.0005)
    end = start_at_ns + int(spec.duration_s * 1e9)
    read_gap = int(1e9 / spec.read_rate)
    next_read = start_at_ns
    next_write = start_at_ns + _gap(rng, spec.write_interval_s)
    ops = 0
    while ops < spec.max_ops:
        now = _now()
        if now >= end:
            break
        ops += 1
        if writable and now >= next_write:
            key = rng.choice(writable)
            for _ in range(spec.burst):
                seq += 1
                token = f"{spec.node}:{seq}"
                order: Order | None = None
                if spec.mode == "owned":
                    counters[key] += 1
                    order = (counters[key],)
                value: str | None = token
                if spec.mode == "owned" and rng.random() < spec.delete_ratio:
                    value = None
                t0 = _now()
                try:
                    if spec.mode != "owned":
                        order = ((yield ("bump", key, token))["n"],)
                    elif value is None:
                        yield ("del", key)
                    else:
                        yield ("set", key, token)
                    writes.append(Write(spec.node, key, value, order, t0, _now()))
                except Exception as exc:  # may have landed: legal to read, no obligation
                    errors[f"write {type(exc).__name__}"] += 1
                    writes.append(Write(spec.node, key, value, order, t0, _now(), False))
            next_write = _now() + _gap(rng, spec.write_interval_s)
            continue
        if now < next_read:
            yield ("sleep", min(next_read - now, max(0, next_write - now)) / 1e9)
            continue
        next_read += read_gap
        key = rng.choice(spec.keys)
        t0 = _now()
        try:
            value = yield ("read", key)
        except Exception as exc:  # a read that raises is allowed by the contract
            errors[f"read {type(exc).__name__}"] += 1
            continue
        reads.append(Read(spec.node, key, _token(value), t0, _now()))


async def _node_main(
    spec: NodeSpec, history: _NodeHistory, ready: Any, go: Any, start_at: Any
) -> None:
    import asyncio

    import syncmap

    if spec.asyncio:
        anode = await syncmap.connect_async(spec.url)
        m: Any = await anode.map(spec.map_name, **spec.map_options)
    else:
        m = syncmap.connect(spec.url).map(spec.map_name, **spec.map_options)

    async def perform(step: Step) -> Any:
        if step[0] == "read":
            result = m.get(step[1])
        elif step[0] == "set":
            result = m.set(step[1], step[2])
        elif step[0] == "del":
            result = m.delete(step[1])
        else:
            result = m.update_item(step[1], _bump(step[2]))
        return await result if spec.asyncio else result

    if spec.setup is not None:
        spec.setup(m)
    ready.put(spec.node)
    if not await asyncio.to_thread(go.wait, 120):
        raise RuntimeError("never told to start")
    readers = [_Readers(spec, i, int(start_at.value)) for i in range(spec.readers)]
    if spec.asyncio:
        reading: list[Any] = [asyncio.ensure_future(r.run_async(m)) for r in readers]
    else:
        reading = [threading.Thread(target=r.run, args=(m,)) for r in readers]
        for t in reading:
            t.start()
    steps = _steps(spec, history, int(start_at.value))
    result: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration:
            break
        result, error = None, None
        try:
            if step[0] == "sleep":
                await asyncio.sleep(step[1])
            else:
                result = await perform(step)
        except Exception as exc:
            error = exc
    for r, t in zip(readers, reading, strict=True):
        if spec.asyncio:
            await t
        else:
            await asyncio.to_thread(t.join, 60)
        history.reads += r.reads
        for k, n in r.errors.items():
            history.errors[k] += n
    with contextlib.suppress(Exception):
        history.stats = repr(m.stats)
    with contextlib.suppress(Exception):
        closed = m.close()
        if spec.asyncio:
            await closed
            await anode.close()


class _Readers:
    """One more reader of the node's map, concurrent with its main workload (a thread of a
    blocking node, a task of an asyncio one): reads of random keys, back to back or paced to
    ``reader_rate``, from the start time for ``duration_s``, at most ``max_ops``. Its reads
    are the node's reads: a read that starts after one of the node's own writes was
    acknowledged must see it, whichever thread wrote (read-your-writes is per node)."""

    def __init__(self, spec: NodeSpec, index: int, start_at_ns: int) -> None:
        self.spec = spec
        self.rng = random.Random(spec.index * 104729 + index * 31 + os.getpid())
        self.start_at_ns = start_at_ns
        self.end_ns = start_at_ns + int(spec.duration_s * 1e9)
        self.reads: list[Read] = []
        self.errors: dict[str, int] = defaultdict(int)

    def _next(self) -> tuple[str, float] | None:
        """The next key to read, and how long to wait before (pacing)."""
        now = _now()
        if len(self.reads) >= self.spec.max_ops or now >= self.end_ns:
            return None
        wait = 0.0
        if self.spec.reader_rate > 0:
            due = self.start_at_ns + int(len(self.reads) * 1e9 / self.spec.reader_rate)
            wait = max(0, due - now) / 1e9
        return self.rng.choice(self.spec.keys), wait

    def _record(self, key: str, value: Any, t0: int) -> None:
        self.reads.append(Read(self.spec.node, key, _token(value), t0, _now()))

    def run(self, m: Any) -> None:
        sleep_until(self.start_at_ns / 1e9)
        while (step := self._next()) is not None:
            key, wait = step
            if wait:
                time.sleep(wait)
            t0 = _now()
            try:
                value = m.get(key)
            except Exception as exc:
                self.errors[f"read {type(exc).__name__}"] += 1
                continue
            self._record(key, value, t0)

    async def run_async(self, m: Any) -> None:
        import asyncio

        await asyncio.sleep(max(0.0, (self.start_at_ns - _now()) / 1e9))
        while (step := self._next()) is not None:
            key, wait = step
            if wait:
                await asyncio.sleep(wait)
            t0 = _now()
            try:
                value = await m.get(key)
            except Exception as exc:
                self.errors[f"read {type(exc).__name__}"] += 1
                continue
            self._record(key, value, t0)
            await asyncio.sleep(0)  # local hits do not yield by themselves every time


def _gap(rng: random.Random, mean_s: float) -> int:
    return int(rng.expovariate(1 / mean_s) * 1e9) if mean_s > 0 else 1 << 62


@dataclass
class History:
    writes: list[Write]
    reads: list[Read]
    errors: dict[str, int]
    stats: list[str | None]


def run_nodes(
    specs: Sequence[NodeSpec],
    *,
    during: Callable[[float], None] | None = None,
    start_delay_s: float = 0.1,
    ready_timeout_s: float = 60.0,
    join_timeout_s: float = 30.0,
) -> History:
    """Start one process per spec (spawn), release them together once all are connected,
    gather their histories.

    ``during(start_monotonic_s)`` runs in the parent while the nodes work (fault injection).
    """
    import multiprocessing as mp
    import queue
    import tempfile

    ctx = mp.get_context("spawn")
    ready, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    with tempfile.TemporaryDirectory(prefix="syncmap-check-") as tmp:
        specs = [replace(s, out_path=os.path.join(tmp, f"{s.node}.pkl")) for s in specs]
        procs = [
            ctx.Process(target=run_node, args=(s, ready, go, start_at), daemon=True) for s in specs
        ]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + ready_timeout_s
            for _ in procs:
                try:
                    ready.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise RuntimeError("node processes did not connect in time") from None
            t0 = _now() + int(start_delay_s * 1e9)
            start_at.value = t0
            go.set()
            if during is not None:
                during(t0 / 1e9)
            for p in procs:
                p.join(join_timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        failed = [(s.node, p.exitcode) for s, p in zip(specs, procs, strict=True) if p.exitcode]
        if failed:
            raise RuntimeError(f"node processes failed: {failed}")
        history = History([], [], defaultdict(int), [])
        for s in specs:
            with open(s.out_path, "rb") as fh:
                part = pickle.load(fh)
            history.writes += part["writes"]
            history.reads += part["reads"]
            for k, n in part["errors"].items():
                history.errors[k] += n
            history.stats.append(part["stats"])
    history.errors = dict(history.errors)
    return history


def sleep_until(t_s: float) -> None:
    """Sleep until the monotonic clock reads ``t_s`` (bounded by the caller's schedule)."""
    delay = t_s - time.monotonic()
    if delay > 0:
        time.sleep(delay)
