"""The ``syncmap`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._errors import SyncMapError

__all__ = ["main"]


def _cmd_server(args: argparse.Namespace) -> int:
    from ._embedded import find_embedded, state_dir, stop_embedded, supervise

    if args.stop:
        print("stopped" if stop_embedded() else "no embedded server was running")
        return 0
    if args.status:
        info = find_embedded()
        print(info.url if info else "no embedded server is running")
        return 0 if info else 1
    running = find_embedded()
    if running is not None:
        print(f"the embedded server already runs at {running.url}", file=sys.stderr)
        return 1
    return supervise(state_dir(), idle_seconds=0, foreground=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._node import connect

    node = connect(args.url)
    print(f"connected to {node.address}")
    node.client.set("syncmap:demo:hello", "world")
    print("hello ->", node.client.get("syncmap:demo:hello"))
    node.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the multi-process demo")
    demo.add_argument("--url", default=None, help="server URL (default: $SYNCMAP_URL or embedded)")
    demo.set_defaults(func=_cmd_demo)

    server = sub.add_parser("server", help="run the embedded Valkey in the foreground")
    server.add_argument("--stop", action="store_true", help="stop the running embedded server")
    server.add_argument("--status", action="store_true", help="print its URL if it runs")
    server.set_defaults(func=_cmd_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SyncMapError as exc:
        print(f"syncmap: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
