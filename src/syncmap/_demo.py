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
from dataclasses import dataclass
from typing import Any

from ._node import Node, connect

__all__ = ["run_demo"]

KEYS = 64
MAX_STALENESS = 1.0


def _now_ns() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process on the machine


# --------------------------------------------------------------------------- node process


def node_main(argv: list[str]) -> int:
    url, map_name, lock_name, node_id, seconds, expected = argv[:6]
    deadline = time.monotonic() + float(seconds)
    node = connect(url)
    progress_key = f"syncmap-demo:{{{map_name}}}:progress"
    m = node.map(map_name, max_staleness=MAX_STALENESS)
    lock = node.lock(lock_name, ttl=1.0)
    rng = random.Random(f"{node_id}-{os.getpid()}")
    own_last: dict[str, int] = {}
    ops = reads = writes = locked = atomic = switches = ryw_violations = 0
    stale_checks = stale_reads = 0
    my_slot = f"probe:{int(node_id.split('-')[0]) % 8}"
    acks_key = f"syncmap-demo:{{{map_name}}}:acks:"
    latencies: list[int] = []
    watcher = threading.Thread(
        target=_watch_probes, args=(m, node_id, float(seconds) + 1, latencies), daemon=True
    )
    watcher.start()
    writes_seq = 0
    last_report = time.monotonic()

    def report(**extra: Any) -> None:
        stats = m.stats
        counts = {
            "pid": os.getpid(),
            "ops": ops,
            "reads": reads,
            "writes": writes,
            "locked": locked,
            "atomic": atomic,
            "switches": switches,
            "hits": stats.hits,
            "misses": stats.misses,
            "ryw_violations": ryw_violations,
            "stale_checks": stale_checks,
            "stale_reads": stale_reads,
            "latencies_us": [x / 1000 for x in latencies[-2000:]],
        }
        node.client.hset(progress_key, node_id, json.dumps({**counts, **extra}))

    try:
        while time.monotonic() < deadline:
            roll = rng.random()
            key = f"k{rng.randrange(KEYS)}"
            if roll < 0.80:
                value = m.get(key)
                reads += 1
                if (
                    isinstance(value, dict)
                    and value.get("w") == node_id
                    and value.get("n", 0) < own_last.get(key, 0)
                ):
                    ryw_violations += 1
            elif roll < 0.93:
                writes_seq += 1
                m[key] = {"w": node_id, "n": writes_seq}
                own_last[key] = writes_seq
                writes += 1
            elif roll < 0.965:
                with lock:
                    current = m.get("locked_counter", 0, fresh=True)
                    owner = m.get("last_owner", None, fresh=True)
                    m.set("locked_counter", int(current) + 1, guard=lock)
                    if owner != node_id:
                        m.set("last_owner", node_id, guard=lock)
                        switches += 1
                locked += 1
                node.client.hincrby(progress_key, f"{node_id}:locked_acks", 1)
            else:
                m.incr("atomic_counter")
                atomic += 1
                node.client.hincrby(progress_key, f"{node_id}:atomic_acks", 1)
            ops += 1
            if rng.random() < 0.02:
                # probe: its value is the writer's clock before the write; the ack time goes
                # to a side list, so readers can check the staleness bound (below)
                t = _now_ns()
                m[my_slot] = {"w": node_id, "t": t}
                node.client.lpush(acks_key + my_slot, f"{t} {_now_ns()}")
                node.client.ltrim(acks_key + my_slot, 0, 199)
            if roll < 0.80 and rng.random() < 0.05:
                # bounded staleness: a local read must reflect every write acknowledged more
                # than max_staleness before the read began
                slot = f"probe:{rng.randrange(8)}"
                if slot != my_slot:
                    began = _now_ns()
                    seen = m.get(slot)
                    seen_t = int(seen["t"]) if isinstance(seen, dict) else -1
                    limit = began - int(MAX_STALENESS * 1e9)
                    for raw in node.client.lrange(acks_key + slot, 0, 199):
                        t_w, t_ack = (int(x) for x in raw.split())
                        if t_ack < limit and t_w > seen_t:
                            stale_reads += 1
                            break
                    stale_checks += 1
            now = time.monotonic()
            if now - last_report >= 0.25:
                report()
                last_report = now
        # Barrier: wait until every node stopped writing; then, by the contract, once
        # max_staleness has passed every local read reflects every acknowledged write.
        done_key = f"syncmap-demo:{{{map_name}}}:done"
        node.client.incr(done_key)
        barrier_deadline = time.monotonic() + 20
        while int(node.client.get(done_key) or 0) < int(expected):
            if time.monotonic() > barrier_deadline:
                break
            time.sleep(0.02)
        time.sleep(MAX_STALENESS * 1.2)
        view = {k: m.get(k) for k in sorted(m.keys())}
        report(done=True, view=view)
    finally:
        with contextlib.suppress(Exception):
            m.close()
        node.close()
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
    replacement: _Child | None = None
    tty = out.isatty()
    last_ops: dict[str, tuple[float, int]] = {}
    try:
        while any(c.proc.poll() is None for c in children):
            time.sleep(0.5)
            now = time.monotonic()
            if killed_id is None and now >= kill_at and nodes > 1:
                victim = children[0]
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                victim.killed = True
                killed_id = victim.node_id
                remaining = max(1.0, seconds - (now - started))
                replacement = _spawn(target, map_name, lock_name, "0-b", remaining, nodes)
                children.append(replacement)
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
    node.client.delete(
        progress_key,
        f"syncmap-demo:{{{map_name}}}:done",
        *(f"syncmap-demo:{{{map_name}}}:acks:probe:{i}" for i in range(8)),
    )
    node.close()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out)
    return 0 if report["ok"] else 1


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
    m = node.map(map_name)
    try:
        server_view = {k: m.get(k, fresh=True) for k in sorted(m.keys())}
        locked_counter = int(m.get("locked_counter", 0, fresh=True))
        atomic_counter = int(m.get("atomic_counter", 0, fresh=True))
    finally:
        m.close()
    locked_acked = sum(v for k, v in acks.items() if k.endswith(":locked_acks"))
    atomic_acked = sum(v for k, v in acks.items() if k.endswith(":atomic_acks"))
    in_flight = 1 if killed_id else 0
    latencies = [x for d in per_node.values() for x in d.get("latencies_us", [])]
    finished = [d for k, d in per_node.items() if d.get("done")]
    views_equal = all(d.get("view") == server_view for d in finished)
    exits_ok = all(c.proc.returncode == 0 for c in children if not c.killed)
    hits = sum(d.get("hits", 0) for d in per_node.values())
    misses = sum(d.get("misses", 0) for d in per_node.values())
    checks = {
        "locked counter == acknowledged increments": locked_acked
        <= locked_counter
        <= locked_acked + in_flight,
        "atomic counter == acknowledged increments": atomic_acked
        <= atomic_counter
        <= atomic_acked + in_flight,
        "no read older than the node's own acknowledged write": sum(
            d.get("ryw_violations", 0) for d in per_node.values()
        )
        == 0,
        "no read staler than max_staleness": sum(d.get("stale_reads", 0) for d in per_node.values())
        == 0,
        "all nodes end with identical maps": views_equal and len(finished) >= 1,
        "every surviving node exited cleanly": exits_ok,
    }
    return {
        "ok": all(checks.values()),
        "seconds": round(elapsed, 2),
        "nodes": len(per_node),
        "killed": killed_id,
        "operations": sum(d.get("ops", 0) for d in per_node.values()),
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "propagation_us": {
            "samples": len(latencies),
            "p50": round(_pct(latencies, 50), 1) if latencies else None,
            "p99": round(_pct(latencies, 99), 1) if latencies else None,
        },
        "staleness_checks": sum(d.get("stale_checks", 0) for d in per_node.values()),
        "lock": {
            "acquisitions": sum(d.get("locked", 0) for d in per_node.values()),
            "owner_switches": sum(d.get("switches", 0) for d in per_node.values()),
        },
        "counters": {
            "locked": {"value": locked_counter, "acknowledged": locked_acked},
            "atomic": {"value": atomic_counter, "acknowledged": atomic_acked},
            "in_flight_allowance": in_flight,
        },
        "checks": checks,
    }


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
