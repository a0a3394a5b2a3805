"""SyncMap across real processes: atomic counters, single-flight loading, propagation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import syncmap

pytestmark = pytest.mark.slow

_PRELUDE = """
import json, sys, time
import redis, syncmap
url, name, go = sys.argv[1], sys.argv[2], sys.argv[3]
raw = redis.Redis.from_url(url)
deadline = time.monotonic() + 20
while not raw.exists(go):  # start together
    assert time.monotonic() < deadline
    time.sleep(0.001)
"""


def run_procs(code: str, n: int, url: str, name: str, client) -> list:
    go = f"{name}:go"
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, name, go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(n)
    ]
    client.set(go, 1)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def test_counter_across_processes_is_exact(server, ns, client):
    n, m = 4, 150
    code = f"""
    with syncmap.connect(url) as node, node.map(name) as m:
        last = [m.incr("counter") for _ in range({m})]
        for _ in range({m}):
            m.update_item("items", lambda v: v + 1, default=0)
        assert all(b > a for a, b in zip(last, last[1:]))
        print(json.dumps(m.get("counter", fresh=True)))
    """
    run_procs(code, n, server.url, ns, client)
    with syncmap.connect(server.url) as node, node.map(ns) as check:
        assert check.get("counter", fresh=True) == n * m
        assert check.get("items", fresh=True) == n * m


def test_get_or_load_runs_once_across_processes(server, ns, client):
    code = """
    def loader():
        raw.incr(name + ":loads")
        time.sleep(0.3)
        return {"loaded": True, "pid": __import__("os").getpid()}

    with syncmap.connect(url) as node, node.map(name) as m:
        print(json.dumps(m.get_or_load("key", loader, timeout=10)))
    """
    results = run_procs(code, 6, server.url, ns, client)
    assert int(client.get(f"{ns}:loads")) == 1
    assert len({json.dumps(r, sort_keys=True) for r in results}) == 1


def test_get_or_load_failure_lets_another_node_load(server, ns, client):
    code = """
    def loader():
        if raw.incr(name + ":loads") == 1:
            time.sleep(0.1)
            raise RuntimeError("the first loader fails")
        return "second"

    with syncmap.connect(url) as node, node.map(name) as m:
        try:
            print(json.dumps(m.get_or_load("key", loader, timeout=10)))
        except RuntimeError:
            print(json.dumps("failed"))
    """
    results = run_procs(code, 4, server.url, ns, client)
    assert sorted(results).count("failed") == 1
    assert [r for r in results if r != "failed"] == ["second"] * 3
    assert int(client.get(f"{ns}:loads")) == 2


def test_propagation_to_another_process(server, ns, client):
    code = """
    with syncmap.connect(url) as node, node.map(name) as m:
        seen = []
        while len(seen) < 20:
            v = m.get("k")
            if v is not None and (not seen or v != seen[-1]):
                seen.append(v)
                raw.set(name + ":ack", v)
            assert time.monotonic() < deadline + 30
        print(json.dumps(seen))
    """
    import threading

    out: list = []
    t = threading.Thread(target=lambda: out.extend(run_procs(code, 1, server.url, ns, client)))
    t.start()
    from servers import wait_until

    with syncmap.connect(server.url) as node, node.map(ns) as m:
        for i in range(20):
            m.set("k", i)
            wait_until(lambda i=i: client.get(f"{ns}:ack") == str(i).encode(), 10, what=f"ack {i}")
    t.join(30)
    assert out == [list(range(20))]
