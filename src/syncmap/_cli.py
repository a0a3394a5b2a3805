"""The ``syncmap`` command.

Every command works on the embedded Valkey when no URL is given, and against any server with
``--url`` or ``$SYNCMAP_URL``. Errors print one line on stderr, never a traceback.

Exit codes
    0   success (``lock``: the command's own code is passed through)
    1   a check failed (``demo``), a key or map was not found (``get``), nothing is running
    2   bad arguments, unreachable server, or another syncmap error
    75  ``lock``: the lock is held elsewhere and ``--wait`` ran out (``--wait 0``: at once)
    76  ``lock``: the lock was lost while the command ran; the command was stopped
        (SIGTERM, then SIGKILL after ``--grace`` seconds)
    127 ``lock``: the command could not be started
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._errors import InvalidArgument, LockNotHeld, SyncMapError

__all__ = ["EXIT_LOCK_BUSY", "EXIT_LOCK_LOST", "main"]

EXIT_LOCK_BUSY = 75
EXIT_LOCK_LOST = 76
EXIT_NOT_STARTED = 127


class _Fail(Exception):
    """A one-line failure with an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, default=str))
    else:
        print(text)


# --------------------------------------------------------------------------- server / demo / bench


def _cmd_server(args: argparse.Namespace) -> int:
    from ._embedded import find_embedded, state_dir, stop_embedded, supervise

    if args.stop:
        stopped = stop_embedded()
        _emit(
            args, {"stopped": stopped}, "stopped" if stopped else "no embedded server was running"
        )
        return 0
    running = find_embedded()
    if args.status:
        _emit(
            args,
            {"running": running is not None, "url": running.url if running else None},
            running.url if running else "no embedded server is running",
        )
        return 0 if running else 1
    if running is not None:
        raise _Fail(f"the embedded server already runs at {running.url}", 1)
    return supervise(state_dir(), idle_seconds=0, foreground=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.nodes < 1 or args.nodes > 32:
        raise _Fail("--nodes must be between 1 and 32")
    if not 1 <= args.seconds <= 600:
        raise _Fail("--seconds must be between 1 and 600")
    return run_demo(args.url, nodes=args.nodes, seconds=args.seconds, as_json=args.json)


def _cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "__main__.py").exists():
        raise _Fail("the benchmarks ship with the source checkout; run this from a clone")
    cmd = [sys.executable, "-m", "benchmarks", *args.names]
    if args.quick:
        cmd.append("--quick")
    return subprocess.call(cmd, cwd=root)


# --------------------------------------------------------------------------- maps


def _parse_value(raw: str, as_json: bool) -> Any:
    if not as_json:
        return raw
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _Fail(f"value is not valid JSON: {exc}") from None


def _require_map(node: Any, name: str) -> None:
    """A map exists on the server once it has been written to (it has its metadata)."""
    from ._core.keys import MapKeys

    if not node.client.exists(MapKeys(name).meta):
        raise _Fail(f"no map {name!r} on the server at {node.address}", 1)


def _cmd_get(args: argparse.Namespace) -> int:
    from ._node import connect

    with connect(args.url) as node:
        _require_map(node, args.map)
    with connect(args.url) as node, node.map(args.map) as m:
        missing = object()
        value = m.get(args.key, missing, fresh=True)
        if value is missing:
            raise _Fail(f"no key {args.key!r} in map {args.map!r}", 1)
        _emit(args, {"map": args.map, "key": args.key, "value": value}, _show(value))
    return 0


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cmd_set(args: argparse.Namespace) -> int:
    from ._node import connect

    value = _parse_value(args.value, args.value_json)
    with connect(args.url) as node, node.map(args.map) as m:
        m.set(args.key, value, ttl=args.ttl)
        _emit(args, {"map": args.map, "key": args.key, "value": value}, "OK")
    return 0


def _cmd_del(args: argparse.Namespace) -> int:
    from ._node import connect

    with connect(args.url) as node, node.map(args.map) as m:
        deleted = m.delete(args.key)
    _emit(args, {"map": args.map, "key": args.key, "deleted": deleted}, "1" if deleted else "0")
    return 0 if deleted else 1


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._node import connect

    with connect(args.url) as node:
        _require_map(node, args.map)
    with connect(args.url) as node, node.map(args.map) as m:
        items = {k: m.get(k, fresh=True) for k in sorted(m.keys())}
    if args.json:
        print(json.dumps({"map": args.map, "items": items}, default=str))
    else:
        for k, v in items.items():
            print(f"{k}\t{_show(v)}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from ._node import connect

    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    with connect(args.url) as node, node.map(args.map) as m:
        for change in m.watch(timeout=None if deadline is None else args.seconds):
            key, value, op = change.key, change.value, change.op
            if args.json:
                print(json.dumps({"op": op, "key": key, "value": value}, default=str), flush=True)
            elif op == "del":
                print(f"del {key}", flush=True)
            elif op == "clear":
                print("clear", flush=True)
            else:
                print(f"{op} {key} = {_show(value)}", flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
    return 0


# --------------------------------------------------------------------------- locks


def _cmd_lock(args: argparse.Namespace) -> int:
    from ._node import connect

    command = list(args.cmd)
    if not command:
        raise _Fail("give the command to run after --, e.g. syncmap lock NAME -- ./job.sh")
    if args.ttl <= 0:
        raise _Fail("--ttl must be positive")
    if args.wait is not None and args.wait < 0:
        raise _Fail("--wait must be >= 0")
    with connect(args.url) as node:
        lost = threading.Event()
        lock = node.lock(
            args.name,
            ttl=args.ttl,
            auto_renew=True,
            on_lost=lambda *_: lost.set(),
            metadata=_lock_metadata(command),
        )
        if not _acquire(lock, args.wait):
            print(f"syncmap: lock {args.name!r} is held elsewhere", file=sys.stderr)
            return EXIT_LOCK_BUSY
        try:
            return _run_holding(command, args, lambda: lost.is_set() or lock.lost)
        finally:
            try:
                if lock.owned():
                    lock.release()
            except LockNotHeld:
                pass


def _lock_metadata(command: list[str]) -> str:
    """Who holds the lock (``syncmap locks`` shows it): host, pid, since when, the command."""
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "cmd": " ".join(command)[:200],
        },
        separators=(",", ":"),
    )


def _acquire(lock: Any, wait: float | None) -> bool:
    """``--wait``: none given, wait for ever; 0, fail at once; else wait that long."""
    if wait is None:
        return bool(lock.acquire())
    if wait == 0:
        return bool(lock.acquire(blocking=False))
    return bool(lock.acquire(timeout=wait))


def _run_holding(command: list[str], args: argparse.Namespace, lost: Callable[[], bool]) -> int:
    """Run ``command`` while the lock is held, forwarding SIGTERM and SIGINT to it; stop it
    (``--grace``) if the lock is lost. Its exit code (a signal's: 128 + the signal)."""
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"syncmap: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return EXIT_NOT_STARTED

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if lost():
                _stop_child(child, args.grace)
                print(
                    f"syncmap: lock {args.name!r} was lost; the command was stopped",
                    file=sys.stderr,
                )
                return EXIT_LOCK_LOST
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if lost():
        print(f"syncmap: lock {args.name!r} was lost while the command ran", file=sys.stderr)
        return EXIT_LOCK_LOST
    return code if code >= 0 else 128 - code


def _stop_child(child: subprocess.Popen[bytes], grace: float) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _cmd_locks(args: argparse.Namespace) -> int:
    from ._lock import list_locks
    from ._node import connect

    with connect(args.url) as node:
        rows = list_locks(node, args.pattern)
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    if not rows:
        print("no locks held")
        return 0
    print(f"{'NAME':30} {'TTL(s)':>8} {'FENCE':>8}  HOLDER")
    for r in rows:
        meta = r.get("metadata") or ""
        holder = meta
        try:
            d = json.loads(meta)
            since = time.strftime("%H:%M:%S", time.localtime(float(d["since"])))
            holder = f"{d.get('host')} pid {d.get('pid')} since {since}"
        except (ValueError, TypeError, KeyError):
            pass
        ttl = r.get("ttl")
        ttl_s = "-" if ttl is None else f"{ttl:.1f}"
        print(f"{r['name']:30} {ttl_s:>8} {r.get('fence') or '-':>8}  {holder}")
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        raise _Fail(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--url", default=None, help="server URL (default: $SYNCMAP_URL or embedded)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = _Parser(prog="syncmap", description="A hash-map cache shared by many processes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", parents=[common], help="run the multi-process demo")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("lock", parents=[common], help="run a command while holding a lock")
    p.add_argument("name")
    p.add_argument("--ttl", type=float, default=10.0, help="lock TTL, renewed automatically")
    p.add_argument("--wait", type=float, default=None, help="seconds to wait (0: fail at once)")
    p.add_argument("--grace", type=float, default=5.0, help="SIGTERM→SIGKILL grace on loss")
    p.set_defaults(cmd=[])
    p.set_defaults(func=_cmd_lock)

    p = sub.add_parser("locks", parents=[common], help="list held locks")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_cmd_locks)

    p = sub.add_parser("get", parents=[common], help="read a key of a map")
    p.add_argument("map")
    p.add_argument("key")
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("set", parents=[common], help="write a key of a map")
    p.add_argument("map")
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--ttl", type=float, default=None)
    p.add_argument("--value-json", action="store_true", help="parse VALUE as JSON")
    p.set_defaults(func=_cmd_set)

    p = sub.add_parser("del", parents=[common], help="delete a key of a map")
    p.add_argument("map")
    p.add_argument("key")
    p.set_defaults(func=_cmd_del)

    p = sub.add_parser("ls", parents=[common], help="list a map's keys and values")
    p.add_argument("map")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("watch", parents=[common], help="print a map's changes live")
    p.add_argument("map")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("server", parents=[common], help="run the embedded Valkey in the foreground")
    p.add_argument("--stop", action="store_true", help="stop the running embedded server")
    p.add_argument("--status", action="store_true", help="print its URL if it runs")
    p.set_defaults(func=_cmd_server)

    p = sub.add_parser("bench", help="run the benchmarks and print the ratio tables")
    p.add_argument(
        "names", nargs="*", help="local, lock, map, django, throughput, scale (default: all)"
    )
    p.add_argument("--quick", action="store_true")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv and argv[0] == "lock" and "--" in argv:  # everything after "--" is the command
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    try:
        args = build_parser().parse_args(argv)
        if command:
            args.cmd = command
        if args.command != "demo":  # the demo reports faults itself; elsewhere show warnings
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
        return int(args.func(args))
    except _Fail as exc:
        print(f"syncmap: {exc}", file=sys.stderr)
        return exc.code
    except InvalidArgument as exc:
        print(f"syncmap: {exc}", file=sys.stderr)
        return 2
    except SyncMapError as exc:
        print(f"syncmap: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
