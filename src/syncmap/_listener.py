"""Runners of a map's listener flow (``syncmap._core.map_listen.listen``): a daemon thread for
:class:`~syncmap.SyncMap`, a task for :class:`~syncmap.AsyncSyncMap`. They only perform the
flow's operations on a dedicated connection (a subscriber connection plus a client for the
freshness probe, both with a socket timeout) and restart the flow if it ever fails: the
listener never dies from bad data or a lost server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._core.coherence import Coherence
from ._core.keys import MapKeys
from ._core.map_listen import (
    Event,
    ListenFlow,
    ListenOp,
    PubsubPing,
    Receive,
    Subscribe,
    Unsubscribe,
    listen,
)
from ._core.ops import Command, Sleep
from ._errors import SyncMapError, translate_redis_error

__all__ = ["AsyncListener", "SyncListener"]

log = logging.getLogger("syncmap.map")


def _pool_options(pool: Any, socket_timeout: float) -> dict[str, Any]:
    options = dict(pool.connection_kwargs)
    options.update(
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),  # a lost connection is the flow's to notice, not retried
        health_check_interval=0,
    )
    options.pop("retry_on_timeout", None)
    return options


def _event(message: dict[str, Any] | None, channel: bytes) -> Event | None:
    if message is None:
        return None
    kind = message.get("type")
    if isinstance(kind, bytes):
        kind = kind.decode()
    data = message.get("data")
    if kind == "message" and message.get("channel") == channel and isinstance(data, bytes):
        return ("message", data)
    if kind == "subscribe" and message.get("channel") == channel:
        return ("subscribe", b"")
    if kind == "pong":
        return ("pong", data if isinstance(data, bytes) else str(data).encode())
    return None


def _error(exc: Exception, address: str) -> Exception:
    if isinstance(exc, SyncMapError):
        return exc
    return translate_redis_error(exc, address) or exc


class _ListenerBase:
    def __init__(self, state: Coherence, keys: MapKeys, address: str) -> None:
        self.state = state
        self.keys = keys
        self.address = address
        self.channel = keys.channel.encode()
        self.restarts = 0
        self.parked = threading.Event()  # tests: set while a stalled listener waits

    def _flow(self) -> ListenFlow[None]:
        return listen(self.state, self.keys)

    def _failed(self, exc: BaseException) -> float:
        """The flow itself raised (a bug or unexpected data): log, drop the copy, restart."""
        self.restarts += 1
        log.error("syncmap: listener of %r failed; restarting it", self.keys.name, exc_info=exc)
        self.state.resync("listener_error")
        return min(0.02 * 2.0 ** min(self.restarts, 7), 2.0)


class SyncListener(_ListenerBase):
    """The listener of a blocking map: one daemon thread."""

    def __init__(
        self, state: Coherence, keys: MapKeys, client: redis.Redis, address: str, timeout: float
    ) -> None:
        super().__init__(state, keys, address)
        pool = client.connection_pool
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **_pool_options(pool, timeout)
            )
        )
        self.pubsub: Any = None
        self.closing = threading.Event()
        self.running = threading.Event()  # cleared by tests to stall the listener
        self.running.set()
        self.thread = threading.Thread(
            target=self._main, name=f"syncmap-listener-{keys.name}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self.closing.set()
        self.running.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self._unsubscribe()
        self.client.close()

    def _main(self) -> None:
        while not self.closing.is_set():
            try:
                self._drive(self._flow())
            except Exception as exc:
                self.closing.wait(self._failed(exc))

    def _drive(self, flow: ListenFlow[None]) -> None:
        op = next(flow)
        try:
            while not self.closing.is_set():
                if not self.running.is_set():
                    self.parked.set()
                    self.running.wait()
                    self.parked.clear()
                try:
                    result = self._perform(op)
                except Exception as exc:
                    op = flow.throw(_error(exc, self.address))
                else:
                    op = flow.send(result)
        finally:
            flow.close()

    def _perform(self, op: ListenOp) -> Any:
        if isinstance(op, Receive):
            return _event(self.pubsub.get_message(timeout=op.timeout), self.channel)
        if isinstance(op, Command):
            return self.client.execute_command(*op.args)  # type: ignore[no-untyped-call]
        if isinstance(op, PubsubPing):
            return self.pubsub.ping(op.token)
        if isinstance(op, Sleep):
            self.closing.wait(op.seconds)
            return None
        if isinstance(op, Subscribe):
            self._unsubscribe()
            self.pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
            self.pubsub.subscribe(op.channel)
            return None
        if isinstance(op, Unsubscribe):
            self._unsubscribe()
            return None
        raise TypeError(f"unknown listener operation {op!r}")

    def _unsubscribe(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a dead connection: nothing to do
                log.debug("syncmap: closing a subscriber connection failed", exc_info=True)


class AsyncListener(_ListenerBase):
    """The listener of an asyncio map: one task on the map's event loop."""

    def __init__(
        self,
        state: Coherence,
        keys: MapKeys,
        client: redis.asyncio.Redis,
        address: str,
        timeout: float,
    ) -> None:
        super().__init__(state, keys, address)
        pool = client.connection_pool
        self.client = redis.asyncio.Redis(
            connection_pool=redis.asyncio.ConnectionPool(
                connection_class=pool.connection_class, **_pool_options(pool, timeout)
            )
        )
        self.pubsub: Any = None
        self.closing = False
        self.running = asyncio.Event()  # cleared by tests to stall the listener
        self.running.set()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._main())

    async def close(self) -> None:
        self.closing = True
        self.running.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self._unsubscribe()
        await self.client.aclose()

    async def _main(self) -> None:
        while not self.closing:
            try:
                await self._drive(self._flow())
            except Exception as exc:
                await asyncio.sleep(self._failed(exc))

    async def _drive(self, flow: ListenFlow[None]) -> None:
        op = next(flow)
        try:
            while not self.closing:
                if not self.running.is_set():
                    self.parked.set()
                    await self.running.wait()
                    self.parked.clear()
                try:
                    result = await self._perform(op)
                except Exception as exc:
                    op = flow.throw(_error(exc, self.address))
                else:
                    op = flow.send(result)
        finally:
            flow.close()

    async def _perform(self, op: ListenOp) -> Any:
        if isinstance(op, Receive):
            message = await self.pubsub.get_message(timeout=op.timeout)
            return _event(message, self.channel)
        if isinstance(op, Command):
            return await self.client.execute_command(*op.args)  # type: ignore[no-untyped-call]
        if isinstance(op, PubsubPing):
            return await self.pubsub.ping(op.token)
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        if isinstance(op, Subscribe):
            await self._unsubscribe()
            self.pubsub = self.client.pubsub()
            await self.pubsub.subscribe(op.channel)
            return None
        if isinstance(op, Unsubscribe):
            await self._unsubscribe()
            return None
        raise TypeError(f"unknown listener operation {op!r}")

    async def _unsubscribe(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # closing a dead connection: nothing to do
                log.debug("syncmap: closing a subscriber connection failed", exc_info=True)
