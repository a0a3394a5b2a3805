"""``syncmap demo``: N real node processes share one map and one lock, and check the contract.

Each node reads and writes a shared map, increments one counter under the distributed lock
(a guarded, fenced write) and another with the server-side atomic ``incr``, measures how fast
other nodes' writes reach it, and reports to the parent through the server. The parent kills
one node with SIGKILL mid-run and starts a replacement, draws a live progress display, and ends
with a report and its checks (non-zero exit when one fails):

- every counter equals the number of acknowledged increments (a killed node may have had one
  increment per counter in flight: landed on the server, never acknowledged to it);
- no read returned an older value than one the reading node itself had acknowledged
  (read-your-writes), and every node's view agrees with the server at the end;
- all nodes end with identical maps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._node import Node, connect

__all__ = ["run_demo"]

KEYS = 64
MAX_STALENESS = 1.0


def _now_ns() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process on the machine


# --------------------------------------------------------------------------- node process


class _DemoNode:
    """One node process of the demo: its map, lock and counters, and one step of the
    workload at a time (the counters go to the parent through the server: :meth:`report`)."""

    def __init__(self, url: str, map_name: str, lock_name: str, node_id: str) -> None:
        self.node = connect(url)
        self.node_id = node_id
        self.progress_key = f"syncmap-demo:{{{map_name}}}:progress"
        self.done_key = f"syncmap-demo:{{{map_name}}}:done"
        self.acks_key = f"syncmap-demo:{{{map_name}}}:acks:"
        self.m = self.node.map(map_name, max_staleness=MAX_STALENESS)
        self.lock = self.node.lock(lock_name, ttl=1.0)
        self.rng = random.Random(f"{node_id}-{os.getpid()}")
        self.my_slot = f"probe:{int(node_id.split('-')[0]) % 8}"
        self.own_last: dict[str, int] = {}
        self.latencies: list[int] = []
        self.writes_seq = 0
        self.ops = self.reads = self.writes = self.locked = self.atomic = self.switches = 0
        self.ryw_violations = self.stale_checks = self.stale_reads = 0

    def report(self, **extra: Any) -> None:
        stats = self.m.stats
        counts = {
            "pid": os.getpid(),
            "ops": self.ops,
            "reads": self.reads,
            "writes": self.writes,
            "locked": self.locked,
            "atomic": self.atomic,
            "switches": self.switches,
            "hits": stats.hits,
            "misses": stats.misses,
            "ryw_violations": self.ryw_violations,
            "stale_checks": self.stale_checks,
            "stale_reads": self.stale_reads,
            "latencies_us": [x / 1000 for x in self.latencies[-2000:]],
        }
        self.node.client.hset(self.progress_key, self.node_id, json.dumps({**counts, **extra}))

    def step(self) -> None:
        """One operation (80% reads, 13% writes, 3.5% locked updates, 3.5% atomic
        increments), sometimes followed by a probe write and a staleness check."""
        rng = self.rng
        roll = rng.random()
        key = f"k{rng.randrange(KEYS)}"
        if roll < 0.80:
            self._read(key)
        elif roll < 0.93:
            self._write(key)
        elif roll < 0.965:
            self._locked_update()
        else:
            self._atomic_increment()
        self.ops += 1
        if rng.random() < 0.02:
            self._probe()
        if roll < 0.80 and rng.random() < 0.05:
            self._check_staleness(f"probe:{rng.randrange(8)}")

    def _read(self, key: str) -> None:
        value = self.m.get(key)
        self.reads += 1
        if (
            isinstance(value, dict)
            and value.get("w") == self.node_id
            and value.get("n", 0) < self.own_last.get(key, 0)
        ):
            self.ryw_violations += 1

    def _write(self, key: str) -> None:
        self.writes_seq += 1
        self.m[key] = {"w": self.node_id, "n": self.writes_seq}
        self.own_last[key] = self.writes_seq
        self.writes += 1

    def _locked_update(self) -> None:
        m, lock = self.m, self.lock
        with lock:
            current = m.get("locked_counter", 0, fresh=True)
            owner = m.get("last_owner", None, fresh=True)
            m.set("locked_counter", int(current) + 1, guard=lock)
            if owner != self.node_id:
                m.set("last_owner", self.node_id, guard=lock)
                self.switches += 1
        self.locked += 1
        self.node.client.hincrby(self.progress_key, f"{self.node_id}:locked_acks", 1)

    def _atomic_increment(self) -> None:
        self.m.incr("atomic_counter")
        self.atomic += 1
        self.node.client.hincrby(self.progress_key, f"{self.node_id}:atomic_acks", 1)

    def _probe(self) -> None:
        """A probe: its value is the writer's clock before the write; the ack time goes to a
        side list, so readers can check the staleness bound (:meth:`_check_staleness`)."""
        t = _now_ns()
        self.m[self.my_slot] = {"w": self.node_id, "t": t}
        client = self.node.client
        client.lpush(self.acks_key + self.my_slot, f"{t} {_now_ns()}")
        client.ltrim(self.acks_key + self.my_slot, 0, 199)

    def _check_staleness(self, slot: str) -> None:
        """Bounded staleness: a local read must reflect every write acknowledged more than
        max_staleness before the read began."""
        if slot == self.my_slot:
            return
        began = _now_ns()
        seen = self.m.get(slot)
        seen_t = int(seen["t"]) if isinstance(seen, dict) else -1
        limit = began - int(MAX_STALENESS * 1e9)
        for raw in self.node.client.lrange(self.acks_key + slot, 0, 199):
            t_w, t_ack = (int(x) for x in raw.split())
            if t_ack < limit and t_w > seen_t:
                self.stale_reads += 1
                break
        self.stale_checks += 1

    def finish(self, expected: int) -> None:
        """Barrier: wait until every node stopped writing; then, by the contract, once
        max_staleness has passed every local read reflects every acknowledged write."""
        client = self.node.client
        client.incr(self.done_key)
        barrier_deadline = time.monotonic() + 20
        while int(client.get(self.done_key) or 0) < expected:
            if time.monotonic() > barrier_deadline:
                break
            time.sleep(0.02)
        time.sleep(MAX_STALENESS * 1.2)
        view = {k: self.m.get(k) for k in sorted(self.m.keys())}
        self.report(done=True, view=view)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.m.close()
        self.node.close()


def node_main(argv: list[str]) -> int:
    url, map_name, lock_name, node_id, seconds, expected = argv[:6]
    deadline = time.monotonic() + float(seconds)
    demo = _DemoNode(url, map_name, lock_name, node_id)
    watcher = threading.Thread(
        target=_watch_probes,
        args=(demo.m, node_id, float(seconds) + 1, demo.latencies),
        daemon=True,
    )
    watcher.start()
    last_report = time.monotonic()
    try:
        while time.monotonic() < deadline:
            demo.step()
            now = time.monotonic()
            if now - last_report >= 0.25:
                demo.report()
                last_report = now
        demo.finish(int(expected))
    finally:
        demo.close()
    return 0


def _watch_probes(m: Any, node_id: str, seconds: float, latencies: list[int]) -> None:
    """Propagation: from another node's write of a probe (its clock reading just before the
    write) until this node's listener got the change and a read returned the new value."""
    with contextlib.suppress(Exception):
        for change in m.watch(timeout=seconds):
            if change.op == "set" and change.key.startswith("probe:"):
                value = change.value
                if isinstance(value, dict) and value.get("w") != node_id:
                    latencies.append(_now_ns() - int(value["t"]))


# --------------------------------------------------------------------------- parent


@dataclass
class _Child:
    node_id: str
    proc: subprocess.Popen[bytes]
    killed: bool = False


def _spawn(
    url: str, map_name: str, lock_name: str, node_id: str, seconds: float, expected: int
) -> _Child:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncmap._demo",
            url,
            map_name,
            lock_name,
            node_id,
            str(seconds),
            str(expected),
        ],
        stdin=subprocess.DEVNULL,
    )
    return _Child(node_id, proc)


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def run_demo(url: str | None, nodes: int = 4, seconds: float = 10.0, as_json: bool = False) -> int:
    node = connect(url)
    target = node.url or url or ""
    if not target:
        target = f"redis://{node.address}"
    run = uuid.uuid4().hex[:8]
    map_name = f"demo-{run}"
    lock_name = f"{{{map_name}}}:lock"
    progress_key = f"syncmap-demo:{{{map_name}}}:progress"
    out = sys.stderr if as_json else sys.stdout
    print(
        f"syncmap demo: {nodes} node processes, {seconds:.0f} s, server {node.address}, "
        f"map {map_name!r}",
        file=out,
        flush=True,
    )
    children = [_spawn(target, map_name, lock_name, f"{i}-a", seconds, nodes) for i in range(nodes)]
    started = time.monotonic()
    kill_at = started + seconds * 0.4
    killed_id: str | None = None
    tty = out.isatty()
    last_ops: dict[str, tuple[float, int]] = {}
    try:
        while any(c.proc.poll() is None for c in children):
            time.sleep(0.5)
            now = time.monotonic()
            if killed_id is None and now >= kill_at and nodes > 1:
                killed_id = _kill(children[0])
                remaining = max(1.0, seconds - (now - started))
                children.append(_spawn(target, map_name, lock_name, "0-b", remaining, nodes))
                print(f"  killed node {killed_id} (SIGKILL); started node 0-b", file=out)
            line = _progress_line(node, progress_key, now - started, killed_id, last_ops)
            if tty:
                print("\r" + line, end="", file=out, flush=True)
            else:
                print(line, file=out, flush=True)
        if tty:
            print(file=out)
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
    report = _report(node, map_name, progress_key, children, killed_id, time.monotonic() - started)
    _clean_up(node, map_name, progress_key)
    node.close()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out)
    return 0 if report["ok"] else 1


def _kill(victim: _Child) -> str:
    """SIGKILL one node process (mid-run, as a crash); its node id."""
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    victim.killed = True
    return victim.node_id


def _clean_up(node: Node, map_name: str, progress_key: str) -> None:
    """Delete the demo's own keys (progress, barrier, probe acks)."""
    node.client.delete(
        progress_key,
        f"syncmap-demo:{{{map_name}}}:done",
        *(f"syncmap-demo:{{{map_name}}}:acks:probe:{i}" for i in range(8)),
    )


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _progress_line(
    node: Node,
    progress_key: str,
    elapsed: float,
    killed: str | None,
    last_ops: dict[str, tuple[float, int]],
) -> str:
    """One line of progress: each node's operations per second since the previous line (a
    node's first line: since the demo began), and its local hit ratio so far."""
    raw = node.client.hgetall(progress_key)
    parts = []
    for k, v in sorted(raw.items()):
        name = _text(k)
        if ":" in name:
            continue
        if name == killed:
            parts.append(f"{name}: killed")
            continue
        d = json.loads(v)
        hits, misses = d.get("hits", 0), d.get("misses", 0)
        ratio = hits / (hits + misses) if hits + misses else 0.0
        then, ops_then = last_ops.get(name, (0.0, 0))
        rate = (d["ops"] - ops_then) / max(elapsed - then, 1e-3)
        last_ops[name] = (elapsed, d["ops"])
        parts.append(f"{name}: {rate:,.0f} ops/s hit {ratio:.0%}")
    return f"[{elapsed:5.1f}s] " + " | ".join(parts)


def _report(
    node: Node,
    map_name: str,
    progress_key: str,
    children: list[_Child],
    killed_id: str | None,
    elapsed: float,
) -> dict[str, Any]:
    raw = {_text(k): v for k, v in node.client.hgetall(progress_key).items()}
    per_node = {k: json.loads(v) for k, v in raw.items() if ":" not in k}
    acks = {k: int(v) for k, v in raw.items() if ":" in k}
    server_view, locked_counter, atomic_counter = _server_state(node, map_name)
    locked_acked = sum(v for k, v in acks.items() if k.endswith(":locked_acks"))
    atomic_acked = sum(v for k, v in acks.items() if k.endswith(":atomic_acks"))
    in_flight = 1 if killed_id else 0
    latencies = [x for d in per_node.values() for x in d.get("latencies_us", [])]
    finished = [d for k, d in per_node.items() if d.get("done")]
    views_equal = all(d.get("view") == server_view for d in finished)
    exits_ok = all(c.proc.returncode == 0 for c in children if not c.killed)
    total = _totals(per_node)
    hits, misses = total("hits"), total("misses")
    checks = {
        "locked counter == acknowledged increments": locked_acked
        <= locked_counter
        <= locked_acked + in_flight,
        "atomic counter == acknowledged increments": atomic_acked
        <= atomic_counter
        <= atomic_acked + in_flight,
        "no read older than the node's own acknowledged write": total("ryw_violations") == 0,
        "no read staler than max_staleness": total("stale_reads") == 0,
        "all nodes end with identical maps": views_equal and len(finished) >= 1,
        "every surviving node exited cleanly": exits_ok,
    }
    return {
        "ok": all(checks.values()),
        "seconds": round(elapsed, 2),
        "nodes": len(per_node),
        "killed": killed_id,
        "operations": total("ops"),
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "propagation_us": {
            "samples": len(latencies),
            "p50": round(_pct(latencies, 50), 1) if latencies else None,
            "p99": round(_pct(latencies, 99), 1) if latencies else None,
        },
        "staleness_checks": total("stale_checks"),
        "lock": {"acquisitions": total("locked"), "owner_switches": total("switches")},
        "counters": {
            "locked": {"value": locked_counter, "acknowledged": locked_acked},
            "atomic": {"value": atomic_counter, "acknowledged": atomic_acked},
            "in_flight_allowance": in_flight,
        },
        "checks": checks,
    }


def _server_state(node: Node, map_name: str) -> tuple[dict[str, Any], int, int]:
    """The map as the server holds it, and its two counters (fresh reads)."""
    m = node.map(map_name)
    try:
        server_view = {k: m.get(k, fresh=True) for k in sorted(m.keys())}
        locked_counter = int(m.get("locked_counter", 0, fresh=True))
        atomic_counter = int(m.get("atomic_counter", 0, fresh=True))
    finally:
        m.close()
    return server_view, locked_counter, atomic_counter


def _totals(per_node: dict[str, dict[str, Any]]) -> Callable[[str], int]:
    """``total(field)``: the sum of a counter over every node's last report."""
    return lambda field: sum(d.get(field, 0) for d in per_node.values())


def _print_report(r: dict[str, Any], out: Any) -> None:
    p = r["propagation_us"]
    print(
        f"\nsyncmap demo report ({r['seconds']} s, {r['nodes']} nodes, killed {r['killed']})",
        file=out,
    )
    print(f"  operations         {r['operations']:,}", file=out)
    if r["hit_ratio"] is not None:
        print(f"  local hit ratio    {r['hit_ratio']:.1%}", file=out)
    print(
        f"  propagation        p50 {p['p50']} us, p99 {p['p99']} us ({p['samples']} samples)",
        file=out,
    )
    print(
        f"  staleness checks   {r['staleness_checks']:,} reads checked against max_staleness",
        file=out,
    )
    print(
        f"  lock               {r['lock']['acquisitions']:,} acquisitions, "
        f"{r['lock']['owner_switches']:,} hand-offs",
        file=out,
    )
    c = r["counters"]
    lk, at = c["locked"], c["atomic"]
    print(
        f"  locked counter     {lk['value']:,} (acknowledged {lk['acknowledged']:,})",
        file=out,
    )
    print(
        f"  atomic counter     {at['value']:,} (acknowledged {at['acknowledged']:,})",
        file=out,
    )
    for name, ok in r["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}", file=out)
    print("PASS" if r["ok"] else "FAIL", file=out, flush=True)


if __name__ == "__main__":
    raise SystemExit(node_main(sys.argv[1:]))
