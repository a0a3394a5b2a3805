"""SyncMap in a real prefork server: gunicorn ``--preload`` with 3 sync workers, serving
tests/prefork_app.py, which makes its node and map at import time in the master (and reads
the key there) before gunicorn forks the workers; and the same without ``--preload``, where
each worker imports the app and makes its own node.

Every worker must serve the map from its local copy (hit ratio >= 90% after warm-up) and see
another node's writes (this test's); with ``--preload``, no worker serves the value the
master cached before the fork once it was overwritten, and the master keeps its own hits and
its listener (it reports from gunicorn's ``on_exit`` hook, after the workers are gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import syncmap
from servers import free_port, wait_until

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
WORKERS = 3
STALENESS = 2.0  # the app's max_staleness, s
KEY = "greeting"


class Gunicorn:
    """A real gunicorn serving tests/prefork_app.py (once :meth:`start` is called), and an
    HTTP client for it."""

    def __init__(self, url: str, name: str, tmp: Path, preload: bool) -> None:
        self.preload = preload
        self.port = free_port()
        self.report = tmp / "master.json"
        self.log = tmp / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
            "PREFORK_URL": url,
            "PREFORK_MAP": name,
            "PREFORK_KEY": KEY,
            "PREFORK_STALENESS": str(STALENESS),
            "PREFORK_REPORT": str(self.report),
        }
        self.cmd = [
            sys.executable, "-m", "gunicorn",
            *(["--preload"] if preload else []),
            "--workers", str(WORKERS),
            "--worker-class", "sync",
            "--bind", f"127.0.0.1:{self.port}",
            "--config", str(TESTS / "prefork_gunicorn.py"),
            "--graceful-timeout", "10",
            "--timeout", "60",
            "--no-control-socket",  # (else every gunicorn of the user shares ~/.gunicorn/)
            "prefork_app:app",
        ]  # fmt: skip

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, cwd=TESTS
            )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-4000:]
        return ""

    def get(self, path: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:  # the app raised: its traceback is in the log
            raise AssertionError(f"GET {path}: {exc}\n{self.log_tail()}") from None

    def wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None, "start() first"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{self.log_tail()}")
            try:
                self.get("/health")
            except OSError:
                return False
            return True

        wait_until(up, timeout=60, interval=0.05, what="gunicorn to answer")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (graceful: the master's ``on_exit`` writes its report), then SIGKILL if
        it has not exited after ``timeout`` seconds. Its exit code (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def gunicorn(server, ns, tmp_path, request) -> Iterator[Gunicorn]:
    """A gunicorn, not started yet; ``request.param``: with ``--preload``."""
    g = Gunicorn(server.url, ns, tmp_path, request.param)
    try:
        yield g
    finally:
        g.stop()  # (workers left by a SIGKILLed master exit when they see their parent change)


def _reads(answer: dict[str, Any]) -> int:
    return int(answer["hits"] + answer["misses"])


class Traffic:
    """Concurrent ``/read`` requests (6 client threads; each request holds its worker 2 ms,
    so that the workers share the load), the latest answer of each worker kept."""

    def __init__(self, g: Gunicorn) -> None:
        self.g = g
        self.pool = ThreadPoolExecutor(6)
        self.lock = threading.Lock()
        self.latest: dict[int, dict[str, Any]] = {}
        self.answers: list[tuple[float, dict[str, Any]]] = []  # (sent at, answer)

    def burst(self, n: int = 30) -> list[tuple[float, dict[str, Any]]]:
        def one(_: int) -> tuple[float, dict[str, Any]]:
            sent = time.monotonic()
            return sent, self.g.get("/read?hold=0.002")

        got = list(self.pool.map(one, range(n)))
        with self.lock:
            for _sent, answer in got:  # (a worker's answers may come back out of order)
                known = self.latest.get(answer["pid"])
                if known is None or _reads(answer) > _reads(known):
                    self.latest[answer["pid"]] = answer
            self.answers += got
        return got

    def until(self, predicate: Any, timeout: float, what: str) -> None:
        """Bursts until ``predicate(self)`` holds; fail after ``timeout`` seconds."""
        wait_until(lambda: self.burst() and predicate(self), timeout, interval=0, what=what)

    def close(self) -> None:
        self.pool.shutdown()


@pytest.mark.parametrize("gunicorn", [True, False], ids=["preload", "no-preload"], indirect=True)
def test_the_map_is_a_near_cache_in_every_gunicorn_worker(gunicorn, server, ns):
    """With ``--preload`` the map is made in the master and inherited by the workers across
    the fork; without, each worker imports the app and makes its own node."""
    with syncmap.connect(server.url) as node, node.map(ns) as writer:
        writer[KEY] = "v0"  # what the master (--preload; else each worker) reads at import
        gunicorn.start()
        gunicorn.wait_ready()
        writer[KEY] = "v1"  # after the fork: the value every worker must serve from now on
        v1_acked = time.monotonic()
        traffic = Traffic(gunicorn)
        try:
            # warm-up: every worker has answered at least 5 times, then 0.5 s more traffic
            traffic.until(
                lambda t: (
                    len(t.latest) == WORKERS and all(_reads(a) >= 5 for a in t.latest.values())
                ),
                timeout=60,
                what=f"{WORKERS} distinct workers to answer",
            )
            warm_end = time.monotonic() + 0.5
            while time.monotonic() < warm_end:
                traffic.burst()
            if gunicorn.preload:  # nothing inherited across the fork is trusted
                stale = [a for _, a in traffic.answers if a["value"] != "v1"]
                assert not stale, f"a worker served the value cached before the fork: {stale[:3]}"
                assert {a["master"] for a in traffic.latest.values()} == {gunicorn.proc.pid}
            else:  # each worker made its own node (and may serve v0 until v1's message)
                late = [a for t, a in traffic.answers if t > v1_acked + STALENESS]
                assert all(a["value"] == "v1" for a in late), late[:3]
                assert all(a["master"] == a["pid"] for a in traffic.latest.values())

            # hit ratio per worker after warm-up: >= 90%, over >= 50 reads each
            base = {pid: dict(a) for pid, a in traffic.latest.items()}

            def reads_since(t: Traffic, pid: int) -> int:
                return _reads(t.latest[pid]) - _reads(base[pid])

            traffic.until(
                lambda t: all(reads_since(t, pid) >= 50 for pid in base),
                timeout=60,
                what="50 reads in every worker after warm-up",
            )
            assert set(traffic.latest) == set(base), "a worker was replaced (crashed?)"
            for pid, a in traffic.latest.items():
                hits = a["hits"] - base[pid]["hits"]
                ratio = hits / reads_since(traffic, pid)
                assert ratio >= 0.9, (
                    f"worker {pid}: hit ratio {ratio:.0%} after warm-up ({a}); "
                    f"gunicorn log:\n{gunicorn.log_tail()}"
                )

            # another node's writes: every worker serves each one (by max_staleness at the
            # latest, per the contract), and keeps serving hits
            for value in ("v2", "v3", "v4"):
                writer[KEY] = value
                acked = time.monotonic()
                seen: set[int] = set()

                def all_seen(
                    t: Traffic, value: str = value, seen: set[int] = seen, acked: float = acked
                ) -> bool:
                    for sent, a in t.answers[-30:]:
                        if a["value"] == value:
                            seen.add(a["pid"])
                        else:
                            assert sent <= acked + STALENESS, (
                                f"worker {a['pid']} served {a['value']!r} more than "
                                f"max_staleness={STALENESS}s after {value!r} was written"
                            )
                    return seen == set(base)

                traffic.until(all_seen, timeout=STALENESS + 10, what=f"every worker to see {value}")
            after = {pid: dict(a) for pid, a in traffic.latest.items()}
            for pid, a in after.items():
                b = base[pid]
                hits, reads = a["hits"] - b["hits"], reads_since(traffic, pid)
                assert hits / reads >= 0.9, f"worker {pid}: hit ratio {hits / reads:.0%} ({a})"
                assert a["invalidations"] > b["invalidations"], f"worker {pid} heard nothing"
        finally:
            traffic.close()

        # the master (the process that preloaded the app and forked): still a near cache
        # with its own listener, and it has seen the last write
        code = gunicorn.stop()
        assert code == 0, f"gunicorn exited with {code}:\n{gunicorn.log_tail()}"
        if not gunicorn.preload:
            assert not gunicorn.report.exists()  # (the master never imported the app)
            return
        assert gunicorn.report.exists(), f"no master report:\n{gunicorn.log_tail()}"
        master = json.loads(gunicorn.report.read_text())
        assert master["preloaded"] == "v0"
        assert master["values"] == [json.dumps("v4")], master
        assert master["hits"] >= 0.9 * (master["hits"] + master["misses"]), master
        assert master["invalidations"] >= 4, master  # v1..v4, heard by its own listener
