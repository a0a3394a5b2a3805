"""A real gunicorn for the tests (tests/test_prefork.py, tests/test_django_gunicorn.py): the
process (free port on 127.0.0.1, started and stopped for real), an HTTP client for it,
concurrent traffic spread over its workers, and the checks both tests make of every worker's
local copy: hit ratio after warm-up, and another node's write seen within ``max_staleness``.

The app's read endpoint answers JSON with at least the worker's ``pid``, the ``value`` read
and the map's stats ``hits``, ``misses`` and ``invalidations``; its load endpoint (see
:func:`check_single_flight`) answers ``pid`` and ``value``.
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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from servers import free_port, wait_until

TESTS = Path(__file__).resolve().parent
WORKERS = 3

Answer = dict[str, Any]


class Gunicorn:
    """A real gunicorn (once :meth:`start` is called) serving ``app`` (``module:callable``,
    imported from tests/) with ``WORKERS`` sync workers, and an HTTP client for it. ``env``
    adds to this process's environment; ``health`` is a path it answers once up."""

    def __init__(
        self,
        app: str,
        env: Mapping[str, str],
        tmp: Path,
        *,
        preload: bool,
        config: Path | None = None,
        health: str = "/health",
    ) -> None:
        self.preload = preload
        self.health = health
        self.tmp = tmp
        self.port = free_port()
        self.log = tmp / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
            **env,
        }
        self.cmd = [
            sys.executable, "-m", "gunicorn",
            *(["--preload"] if preload else []),
            "--workers", str(WORKERS),
            "--worker-class", "sync",
            "--bind", f"127.0.0.1:{self.port}",
            *(["--config", str(config)] if config else []),
            "--graceful-timeout", "10",
            "--timeout", "60",
            "--no-control-socket",  # (else every gunicorn of the user shares ~/.gunicorn/)
            app,
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

    def get(self, path: str) -> Answer:
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
                self.get(self.health)
            except OSError:
                return False
            return True

        wait_until(up, timeout=60, interval=0.05, what="gunicorn to answer")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (graceful: the master runs its ``on_exit`` hook), then SIGKILL if it has
        not exited after ``timeout`` seconds. Its exit code (None: never started)."""
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


def reads(answer: Answer) -> int:
    return int(answer["hits"] + answer["misses"])


class Traffic:
    """Concurrent requests to ``path`` (6 client threads; the path should hold its worker a
    few ms, so that the workers share the load), the latest answer of each worker kept."""

    def __init__(self, g: Gunicorn, path: str) -> None:
        self.g = g
        self.path = path
        self.pool = ThreadPoolExecutor(6)
        self.lock = threading.Lock()
        self.latest: dict[int, Answer] = {}
        self.answers: list[tuple[float, Answer]] = []  # (sent at, answer)

    def burst(self, n: int = 30) -> list[tuple[float, Answer]]:
        def one(_: int) -> tuple[float, Answer]:
            sent = time.monotonic()
            return sent, self.g.get(self.path)

        got = list(self.pool.map(one, range(n)))
        with self.lock:
            for _sent, answer in got:  # (a worker's answers may come back out of order)
                known = self.latest.get(answer["pid"])
                if known is None or reads(answer) > reads(known):
                    self.latest[answer["pid"]] = answer
            self.answers += got
        return got

    def until(self, predicate: Callable[[Traffic], bool], timeout: float, what: str) -> None:
        """Bursts until ``predicate(self)`` holds; fail after ``timeout`` seconds."""
        wait_until(lambda: self.burst() and predicate(self), timeout, interval=0, what=what)

    def warm_up(self) -> dict[int, Answer]:
        """Traffic until every worker has answered at least 5 times, then 0.5 s more; the
        latest answer of each worker (the base of :meth:`check_hit_ratios`)."""
        self.until(
            lambda t: len(t.latest) == WORKERS and all(reads(a) >= 5 for a in t.latest.values()),
            timeout=60,
            what=f"{WORKERS} distinct workers to answer",
        )
        warm_end = time.monotonic() + 0.5
        while time.monotonic() < warm_end:
            self.burst()
        return {pid: dict(a) for pid, a in self.latest.items()}

    def check_hit_ratios(self, base: dict[int, Answer], min_reads: int = 50) -> None:
        """Every worker of ``base`` (and no other) served at least 90% of its reads since
        ``base`` from its local copy, over at least ``min_reads`` reads each."""

        def reads_since(pid: int) -> int:
            return reads(self.latest[pid]) - reads(base[pid])

        self.until(
            lambda t: all(reads_since(pid) >= min_reads for pid in base),
            timeout=60,
            what=f"{min_reads} reads in every worker after warm-up",
        )
        assert set(self.latest) == set(base), "a worker was replaced (crashed?)"
        for pid, a in self.latest.items():
            ratio = (a["hits"] - base[pid]["hits"]) / reads_since(pid)
            assert ratio >= 0.9, (
                f"worker {pid}: hit ratio {ratio:.0%} after warm-up ({a}); "
                f"gunicorn log:\n{self.g.log_tail()}"
            )

    def wait_every_worker_serves(self, value: Any, acked: float, staleness: float) -> None:
        """Traffic until every worker has served ``value`` (written by another node, its
        write acknowledged at ``acked``, a ``time.monotonic()``); no worker may serve another
        value to a request sent more than ``staleness`` seconds after ``acked``."""
        seen: set[int] = set()

        def all_seen(t: Traffic) -> bool:
            for sent, a in t.answers[-30:]:
                if a["value"] == value:
                    seen.add(a["pid"])
                else:
                    assert sent <= acked + staleness, (
                        f"worker {a['pid']} served {a['value']!r} more than "
                        f"max_staleness={staleness}s after {value!r} was written"
                    )
            return seen == set(t.latest)

        self.until(all_seen, timeout=staleness + 10, what=f"every worker to serve {value!r}")

    def check_writes_seen(
        self,
        write: Callable[[Any], object],
        values: list[Any],
        staleness: float,
        base: dict[int, Answer],
    ) -> None:
        """Each of ``values`` written in turn by another node (``write(value)``) is served by
        every worker (by ``staleness`` at the latest); the workers keep their hit ratios
        since ``base`` (see :meth:`check_hit_ratios`) and each has heard invalidations."""
        for value in values:
            write(value)
            self.wait_every_worker_serves(value, time.monotonic(), staleness)
        self.check_hit_ratios(base)
        for pid, a in self.latest.items():
            assert a["invalidations"] > base[pid]["invalidations"], f"worker {pid}: {a}"

    def close(self) -> None:
        self.pool.shutdown()


def check_single_flight(g: Gunicorn, path: str, client: Any, counter: str) -> list[Answer]:
    """``2 * WORKERS`` concurrent requests to ``path``, a get-or-load of a missing key whose
    loader holds its worker a while (0.5 s) and counts its runs on the server (``client``,
    key ``counter``, deleted after): every worker takes part, all get one value, and the
    loader ran once."""
    with ThreadPoolExecutor(2 * WORKERS) as pool:
        answers = list(pool.map(lambda _: g.get(path), range(2 * WORKERS)))
    loads = int(client.get(counter) or 0)
    client.delete(counter)
    assert len({a["pid"] for a in answers}) == WORKERS, answers
    assert len({a["value"] for a in answers}) == 1, answers
    assert loads == 1, f"the loader ran {loads} times: {answers}"
    return answers
