"""A real gunicorn for the tests (tests/test_prefork.py, tests/test_django_gunicorn.py): the
process (free port on 127.0.0.1, started and stopped for real), an HTTP client for it, and
concurrent traffic spread over its workers, with the checks both tests make of every
worker's local copy (tests/prefork_harness.py): hit ratio after warm-up, and another node's
write seen within ``max_staleness``.

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
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import prefork_harness
from prefork_harness import WORKERS, Answer
from servers import free_port, wait_until

TESTS = Path(__file__).resolve().parent


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


class Traffic(prefork_harness.Traffic):
    """Concurrent requests to ``path`` of the gunicorn ``g`` (see
    :class:`prefork_harness.Traffic`; the path should hold its worker a few ms)."""

    def __init__(self, g: Gunicorn, path: str) -> None:
        super().__init__(lambda: g.get(path), g.log_tail)
        self.g = g
        self.path = path


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
