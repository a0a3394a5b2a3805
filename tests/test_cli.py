"""The syncmap command, end to end, as a subprocess against real Valkey."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from servers import free_port, wait_until


def run(*args: str, url: str | None = None, timeout: float = 60, env=None, **kw):
    cmd = [sys.executable, "-m", "syncmap", *args]
    if url is not None:
        cmd += ["--url", url] if args and args[0] not in ("lock",) else []
    full_env = {**os.environ, **(env or {})}
    if url is not None and args and args[0] == "lock":
        full_env["SYNCMAP_URL"] = url
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, **kw)


def one_clean_line(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("syncmap: ")


def test_bad_arguments_one_line():
    r = run("frobnicate")
    assert r.returncode == 2
    one_clean_line(r.stderr)
    r = run("demo", "--nodes", "0")
    assert r.returncode == 2
    one_clean_line(r.stderr)


def test_unreachable_server_one_line():
    port = free_port()
    r = run("get", "m", "k", url=f"redis://127.0.0.1:{port}/0")
    assert r.returncode == 2
    one_clean_line(r.stderr)
    assert f"127.0.0.1:{port}" in r.stderr


def test_bad_url_one_line():
    r = run("ls", "m", url="http://nope")
    assert r.returncode == 2
    one_clean_line(r.stderr)


def test_help_works():
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout


def test_server_status_when_none_runs(embedded_dir):
    r = run("server", "--status", env={"SYNCMAP_EMBEDDED_DIR": str(embedded_dir)})
    assert r.returncode == 1
    assert "no embedded server" in r.stdout


def test_server_foreground_prints_url_and_stops(embedded_dir):
    env = {**os.environ, "SYNCMAP_EMBEDDED_DIR": str(embedded_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncmap", "server"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("redis://127.0.0.1:")
        r = run("server", "--status", "--json", env={"SYNCMAP_EMBEDDED_DIR": str(embedded_dir)})
        assert json.loads(r.stdout) == {"running": True, "url": line}
        r = run("server", "--stop", env={"SYNCMAP_EMBEDDED_DIR": str(embedded_dir)})
        assert r.returncode == 0 and "stopped" in r.stdout
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- lock


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_lock_passes_exit_code_through(server, ns):
    r = run("lock", f"{ns}-job", "--", *_py("raise SystemExit(3)"), url=server.url)
    assert r.returncode == 3, r.stderr
    with server.client() as c:
        assert not c.exists(f"{ns}-job")  # released afterwards


def test_lock_is_held_while_command_runs(server, ns):
    key = f"{ns}-job"
    code = f"import redis,sys; r=redis.Redis(port={server.port}); "
    code += f"sys.exit(0 if r.exists({key!r}) else 9)"
    r = run("lock", f"{ns}-job", "--", *_py(code), url=server.url)
    assert r.returncode == 0, r.stderr


def test_lock_wait_zero_fails_at_once_when_held(server, ns):
    import syncmap

    with syncmap.connect(server.url) as node:
        held = node.lock(f"{ns}-job", ttl=30)
        assert held.acquire(blocking=False)
        try:
            r = run("lock", f"{ns}-job", "--wait", "0", "--", *_py("pass"), url=server.url)
            assert r.returncode == 75
            one_clean_line(r.stderr)
            r = run("lock", f"{ns}-job", "--wait", "0.3", "--", *_py("pass"), url=server.url)
            assert r.returncode == 75
        finally:
            held.release()
    r = run("lock", f"{ns}-job", "--wait", "0", "--", *_py("pass"), url=server.url)
    assert r.returncode == 0


def test_lock_command_not_found(server, ns):
    r = run("lock", f"{ns}-job", "--", "/nonexistent/cmd", url=server.url)
    assert r.returncode == 127
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_lock_lost_stops_command(server, ns, tmp_path):
    name = f"{ns}-job"
    pidfile = tmp_path / "pid"
    code = f"import os,time; open({str(pidfile)!r},'w').write(str(os.getpid())); time.sleep(60)"
    env = {**os.environ, "SYNCMAP_URL": server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncmap", "lock", name, "--ttl", "1", "--grace", "1",
         "--", *_py(code)],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="command started")
        child_pid = int(pidfile.read_text())
        with server.client() as c:
            c.set(name, "someone-else's-token")  # the lock is taken from under the holder
        rc = proc.wait(timeout=20)
        assert rc == 76, proc.stderr.read()
        err = proc.stderr.read()
        assert "lost" in err and "Traceback" not in err
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_locks_lists_holder(server, ns, tmp_path):
    name = f"{ns}-job"
    flag = tmp_path / "go"
    code = f"import os,time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.01)"
    env = {**os.environ, "SYNCMAP_URL": server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncmap", "lock", name, "--ttl", "5", "--", *_py(code)], env=env
    )
    try:

        def listed():
            r = run("locks", f"{ns}*", "--json", url=server.url)
            rows = json.loads(r.stdout) if r.returncode == 0 else []
            return [row for row in rows if row["name"] == name]

        rows = wait_until(listed, what="lock listed")
        row = rows[0]
        meta = json.loads(row["metadata"])
        assert meta["pid"] == proc.pid
        assert 0 < row["ttl"] <= 5
        assert row["fence"] >= 1
        r = run("locks", f"{ns}*", url=server.url)
        assert name in r.stdout and f"pid {proc.pid}" in r.stdout
    finally:
        flag.write_text("")
        assert proc.wait(timeout=20) == 0
    r = run("locks", f"{ns}*", "--json", url=server.url)
    assert [row for row in json.loads(r.stdout) if row["name"] == name] == []


# --------------------------------------------------------------------------- maps


def test_map_set_get_del_ls(server, ns):
    m = f"{ns}-m"
    assert run("set", m, "a", "hello", url=server.url).returncode == 0
    assert run("set", m, "b", '{"x": [1, 2]}', "--value-json", url=server.url).returncode == 0
    r = run("get", m, "a", url=server.url)
    assert r.returncode == 0 and r.stdout.strip() == "hello"
    r = run("get", m, "b", "--json", url=server.url)
    assert json.loads(r.stdout)["value"] == {"x": [1, 2]}
    r = run("ls", m, "--json", url=server.url)
    assert json.loads(r.stdout)["items"] == {"a": "hello", "b": {"x": [1, 2]}}
    r = run("del", m, "a", url=server.url)
    assert r.returncode == 0
    r = run("get", m, "a", url=server.url)
    assert r.returncode == 1
    one_clean_line(r.stderr)
    r = run("del", m, "a", url=server.url)
    assert r.returncode == 1


def test_map_set_bad_json_value(server, ns):
    r = run("set", f"{ns}-m", "a", "{not json", "--value-json", url=server.url)
    assert r.returncode == 2
    one_clean_line(r.stderr)
    r = run("ls", f"{ns}-m", "--json", url=server.url)
    assert r.returncode == 1  # nothing was written: the map does not even exist
    one_clean_line(r.stderr)


def test_missing_map_one_line(server, ns):
    for cmd in ("ls", "get"):
        r = run(cmd, f"{ns}-nothing", *(["k"] if cmd == "get" else []), url=server.url)
        assert r.returncode == 1
        one_clean_line(r.stderr)
        assert "no map" in r.stderr


def test_bench_prints_ratio_table():
    r = run("bench", "local", "--quick", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| hit: SafeHashMap.get |" in r.stdout
    assert "x dict.get" in r.stdout


def test_watch_prints_changes_live(server, ns):
    import syncmap

    m_name = f"{ns}-m"
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncmap", "watch", m_name, "--json", "--seconds", "20",
         "--url", server.url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with syncmap.connect(server.url) as node, node.map(m_name) as m:
            # the watcher's subscription time is unknown: write until it reports one change
            import selectors

            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = None
            deadline = time.monotonic() + 15
            i = 0
            while line is None and time.monotonic() < deadline:
                i += 1
                m[f"k{i}"] = {"i": i}
                if sel.select(timeout=0.1):
                    line = proc.stdout.readline()
            assert line, "watch printed nothing"
            first = json.loads(line)
            assert first["op"] == "set" and first["value"] == {"i": int(first["key"][1:])}
            del m[first["key"]]
            seen = []
            while not any(c["op"] == "del" for c in seen):
                seen.append(json.loads(proc.stdout.readline()))
            assert {"op": "del", "key": first["key"], "value": None} in seen
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_demo_passes_its_checks(server):
    r = run("demo", "--nodes", "3", "--seconds", "4", "--json", url=server.url, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and all(report["checks"].values())
    assert report["killed"] is not None
    assert report["counters"]["atomic"]["value"] > 0
    assert report["lock"]["acquisitions"] > 0
    assert report["staleness_checks"] > 0
