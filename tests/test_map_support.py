"""Shared by the SyncMap tests: one test body runs against the blocking and the asyncio map.

``maps`` (parametrized ``sync``/``async``) opens maps through a uniform blocking handle: the
asyncio map runs on an event loop in a background thread and each call is awaited there.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from typing import Any

import pytest

import syncmap
from servers import wait_until


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class SyncHandle:
    """The blocking map, plus the names the asyncio handle has (length, keys)."""

    kind = "sync"

    def __init__(self, node: syncmap.Node, m: syncmap.SyncMap) -> None:
        self.node, self.m = node, m

    def __getattr__(self, name: str) -> Any:
        return getattr(self.m, name)

    def length(self) -> int:
        return len(self.m)

    def keys(self) -> list[str]:
        return list(self.m)

    def stall_listener(self) -> None:
        self.m._listener.hooks.running.clear()
        wait_until(self.m._listener.hooks.parked.is_set, 5, what="listener parked")

    def resume_listener(self) -> None:
        self.m._listener.hooks.running.set()

    def close(self) -> None:
        self.m.close()
        self.node.close()


class AsyncHandle:
    """The asyncio map, each call awaited on the background loop."""

    kind = "async"

    def __init__(self, loop: _Loop, node: syncmap.AsyncNode, m: syncmap.AsyncSyncMap) -> None:
        self.loop, self.node, self.m = loop, node, m

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.m, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            return self.loop.run(result) if inspect.isawaitable(result) else result

        return call

    def stall_listener(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.m._listener.hooks.running.clear)
        wait_until(self.m._listener.hooks.parked.is_set, 5, what="listener parked")

    def resume_listener(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.m._listener.hooks.running.set)

    def close(self) -> None:
        self.loop.run(self.m.close())
        self.loop.run(self.node.close())


class MapFactory:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.opened: list[Any] = []
        self._loop: _Loop | None = None

    def __call__(self, url: str, name: str, **options: Any) -> SyncHandle | AsyncHandle:
        if self.kind == "sync":
            node = syncmap.connect(url, socket_timeout=5)
            handle: Any = SyncHandle(node, node.map(name, **options))
        else:
            if self._loop is None:
                self._loop = _Loop()
            loop = self._loop

            async def open_() -> tuple[syncmap.AsyncNode, syncmap.AsyncSyncMap]:
                anode = await syncmap.connect_async(url, socket_timeout=5)
                return anode, await anode.map(name, **options)

            handle = AsyncHandle(loop, *loop.run(open_()))
        self.opened.append(handle)
        return handle

    def close(self) -> None:
        for handle in self.opened:
            with contextlib.suppress(Exception):
                handle.close()
        if self._loop is not None:
            self._loop.stop()


@pytest.fixture(params=["sync", "async"])
def maps(request):
    """``maps(url, name, **options)`` opens a map (a distinct node each call)."""
    factory = MapFactory(request.param)
    yield factory
    factory.close()
