"""Runners of a map's listener flow (``syncmap._core.map_listen.listen``): a daemon thread for
:class:`~syncmap.SyncMap`, a task for :class:`~syncmap.AsyncSyncMap`. They only perform the
flow's operations on a dedicated connection (a subscriber connection plus a client for the
freshness probe, both with a socket timeout) and restart the flow if it ever fails: the
listener never dies from bad data or a lost server.

Why a reading thread applies change messages too (blocking map): a thread spinning on
``m.get`` holds the GIL, and the listener thread, woken by a message, waits up to the switch
interval (5 ms) for it, every time. So the map's read path calls :meth:`SyncListener.poll`
about once a millisecond: it applies, in the reading thread, every event already waiting on
the subscriber connection. One lock orders the two: whoever holds it reads *and* applies a
whole batch, in the connection's order. The listener thread waits for data without the lock
(``poll(2)`` on the socket), then takes it; a reading thread waits for it at most 2 ms.

Applying a batch must be cheap, since a reading or writing thread pays for it: on a plain
TCP or Unix socket the subscriber connection is read by :class:`_RawSubscriber` (one
non-blocking ``recv`` into a hiredis reader per batch) rather than through redis-py's
layers (several ``poll`` calls and dict-building per message). TLS connections use
redis-py's reader. The asyncio listener reads the same way (its task shares the loop with
the map's writers, and receives their own change messages): redis-py's transport is paused
and the loop watches the socket for it (``add_reader``) instead of several timed
``get_message`` awaits per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
import time
from typing import Any

import hiredis
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import MovedError
from redis.retry import Retry

from ._core.coherence import Coherence
from ._core.keys import MapKeys
from ._core.map_listen import (
    MAX_WAIT,
    Event,
    ListenFlow,
    ListenOp,
    PubsubPing,
    Receive,
    Subscribe,
    Unsubscribe,
    apply_event,
    listen,
)
from ._core.ops import Command, Sleep
from ._driver import AsyncDriver
from ._errors import SyncMapError, translate_redis_error

__all__ = ["AsyncListener", "SyncListener"]

log = logging.getLogger("syncmap.map")


def _pool_options(pool: Any, socket_timeout: float, is_async: bool = False) -> dict[str, Any]:
    options = dict(pool.connection_kwargs)
    retry = AsyncRetry(NoBackoff(), 0) if is_async else Retry(NoBackoff(), 0)
    options.update(
        socket_timeout=socket_timeout,
        retry=retry,  # a lost connection is the flow's to notice, not retried
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
    if kind == "smessage" and message.get("channel") == channel and isinstance(data, bytes):
        return ("message", data)
    if kind == "ssubscribe" and message.get("channel") == channel:
        return ("subscribe", b"")
    if kind == "sunsubscribe" and message.get("channel") == channel:
        raise _lost_subscription()
    if kind == "pong":
        return ("pong", data if isinstance(data, bytes) else str(data).encode())
    return None


def _lost_subscription() -> redis.ConnectionError:
    """The server dropped our shard channel (on a Cluster: the map's slot moved to another
    master): the flow reconnects, and the connection finds the slot's new owner."""
    return redis.ConnectionError("the server unsubscribed the map's channel (slot moved?)")


def _learn(client: Any, exc: BaseException) -> None:
    """On a Cluster, a subscription answered with MOVED names the slot's owner: tell the slot
    table, so that the next subscriber connection goes there (``syncmap._cluster``)."""
    if isinstance(exc, MovedError):
        router = client.connection_pool.connection_kwargs.get("syncmap_router")
        if router is not None:
            router.table.moved(exc.slot_id, (exc.host, int(exc.port)))


def _error(exc: Exception, address: str) -> Exception:
    if isinstance(exc, SyncMapError):
        return exc
    return translate_redis_error(exc, address) or exc


class _ListenerBase:
    client: Any  # the subscriber's redis-py client (set by each listener)

    def __init__(self, state: Coherence, keys: MapKeys, address: str) -> None:
        self.state = state
        self.keys = keys
        self.address = address
        self.channel = keys.channel.encode()
        self.restarts = 0
        self.parked = threading.Event()  # tests: set while a stalled listener waits

    def _flow(self) -> ListenFlow[None]:
        return listen(self.state, self.keys)

    def _resume(self, flow: ListenFlow[None], result: Any, exc: Exception | None) -> ListenOp:
        """Feed the flow its operation's result, or the (translated) error; its next one."""
        if exc is None:
            return flow.send(result)
        _learn(self.client, exc)
        return flow.throw(_error(exc, self.address))

    def _failed(self, exc: BaseException) -> float:
        """The flow itself raised (a bug or unexpected data): log, drop the copy, restart."""
        self.restarts += 1
        log.error("syncmap: listener of %r failed; restarting it", self.keys.name, exc_info=exc)
        self.state.resync("listener_error")
        return min(0.02 * 2.0 ** min(self.restarts, 7), 2.0)


DRAIN_LIMIT = 10_000  # events applied in one go at most (the rest: next time)
PROBE_STEP = 0.002  # redis-py's reader, during a probe's read: waits this long at a time
READERS_ACTIVE = 0.002  # s: a map thread polled this recently: it applies the events
LOCK_WAIT = 0.002  # s: how long poll() waits for the lock
BUSY_NAP = 0.01  # s: the listener thread's first nap while map threads apply the events;
BUSY_NAP_MAX = 0.05  # s: each further one twice as long, up to this (and its Receive's end).
# Every wake-up costs a thread spinning on hits a GIL hand-off: measured, 10 ms naps gave
# such a thread ~100 pauses of over 50 µs per second, against ~40 with 50 ms naps.


class SyncListener(_ListenerBase):
    """The listener of a blocking map: one daemon thread, helped by reading threads
    (:meth:`poll`). ``lock`` guards the subscriber connection: held to read and apply events,
    to send on it, and to replace it; never while waiting for data."""

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
        self.lock = threading.Lock()
        self.failure: Exception | None = None  # a reading thread's drain failed: reconnect
        self.last_poll = -1.0  # when a reading thread last called poll()
        self._poller: tuple[Any, Any, Any] | None = None
        self._raw: _RawSubscriber | None = None
        self._cut_short = False  # redis-py's reader: the last drain stopped at DRAIN_LIMIT
        self.closing = threading.Event()
        self.running = threading.Event()  # cleared by tests to stall the listener
        self.running.set()
        self._nap = BUSY_NAP  # the next nap while map threads apply the events
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
        self.client.connection_pool.disconnect()  # its own pool (the freshness probe's)

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
                    result, error = self._perform(op), None
                except Exception as exc:
                    result, error = None, exc
                op = self._resume(flow, result, error)
        finally:
            flow.close()

    def _perform(self, op: ListenOp) -> Any:
        if isinstance(op, Receive):
            return self._receive(op.timeout)
        if isinstance(op, Command):
            return self.client.execute_command(*op.args)
        if isinstance(op, PubsubPing):
            # On a plain socket, sent without the lock (a send may wait for the GIL: readers
            # would be locked out); sending while another thread reads the socket is fine. Not
            # on TLS (redis-py's reader): one SSL object must not be used by two threads at once.
            with contextlib.nullcontext() if self._raw is not None else self.lock:
                return self.pubsub.connection.send_command("PING", op.token, check_health=False)
        if isinstance(op, Sleep):
            self.closing.wait(op.seconds)
            return None
        if isinstance(op, Subscribe):
            with self.lock:
                self._unsubscribe_locked()
                self.pubsub = self.client.pubsub()
                self.pubsub.ssubscribe(op.channel)
                self._poller = _poller_of(self.pubsub)
                self._raw = _RawSubscriber.of(self._poller)
            return None
        if isinstance(op, Unsubscribe):
            self._unsubscribe()
            return None
        raise TypeError(f"unknown listener operation {op!r}")

    def _receive(self, timeout: float) -> int:
        """Wait (without the lock) up to ``timeout`` for data, then apply all there is.

        While other threads of the map are busy (reads, writes: they call :meth:`poll`), they
        apply what arrives, and this thread stays out of their way: it does not even watch the
        socket (waking up per message costs the busy thread a GIL hand-off), and it never
        takes the lock from them (every system call of its drain would hand the GIL to a busy
        thread and wait up to a switch interval to get it back, the lock held all along)."""
        end = time.monotonic() + timeout
        while self.failure is None:
            now = time.monotonic()
            if now - self.last_poll < READERS_ACTIVE:  # busy threads apply the events
                # (and need the GIL: waking up often here would compete with them for it)
                nap = self._nap
                self._nap = min(2 * nap, BUSY_NAP_MAX)
                if now >= end or self.closing.wait(min(end - now, nap)):
                    return 0
                continue
            self._nap = BUSY_NAP
            poller = self._poller
            if poller is not None and poller[1] is not getattr(self.pubsub.connection, "_sock", 0):
                poller = self._poller = _poller_of(self.pubsub)  # redis-py reconnected it
            if poller is None:  # no poll(2) (or no socket: the drain below raises)
                self.closing.wait(min(timeout, 0.001))
                break
            if self._backlog():
                break  # events left over by a drain that hit DRAIN_LIMIT
            try:
                ready = poller[0].poll(max(0.0, end - now) * 1000)
            except (OSError, ValueError):  # closed: the drain below says so
                break
            if not ready or time.monotonic() - self.last_poll >= READERS_ACTIVE:
                break
        with self.lock:
            failure, self.failure = self.failure, None
            if failure is not None:
                raise failure
            return self._drain()

    def poll(self, now: float) -> None:
        """Apply the events already waiting on the subscriber connection, in the calling
        (reading) thread; ``now``: ``time.monotonic()``. Waits at most ``LOCK_WAIT`` for the
        lock (skipped if another thread holds it longer: it reconnects)."""
        self.last_poll = now
        # A short wait, not none: if the listener thread holds the lock, it is in a drain and
        # may be waiting for the GIL; waiting here hands it over, so it finishes at once. (A
        # plain try first: a timed acquire costs several times more, and this runs often.)
        lock = self.lock
        if not self.running.is_set() or (
            not lock.acquire(False) and not lock.acquire(timeout=LOCK_WAIT)
        ):
            return
        try:
            poller = self._poller
            if poller is None:
                waiting = self.failure is None and self.pubsub is not None
            else:
                waiting = not self._nothing_waiting(poller[2])
            if waiting:
                self._drain()
        except Exception as exc:
            _learn(self.client, exc)
            error = _error(exc, self.address)
            self.failure = error  # the listener thread reconnects
            if isinstance(error, SyncMapError):
                self.state.on_disconnect()
            else:
                log.error("syncmap: applying change messages failed", exc_info=error)
                self.state.resync("listener_error")
        finally:
            self.lock.release()

    def _nothing_waiting(self, poller: Any) -> bool:
        """True if the socket has no data (lock held; a drain that was not cut short leaves
        nothing buffered above the socket, so the socket says it all). Cheaper than
        redis-py's ``can_read``."""
        if self.failure is not None:
            return True
        if self._backlog():
            return False  # left over by a drain that hit DRAIN_LIMIT
        try:
            return not poller.poll(0)
        except (OSError, ValueError):
            return False  # closed: the drain says so

    def _backlog(self) -> bool:
        """The last drain stopped at DRAIN_LIMIT: events may wait where polling the socket
        does not see them (the raw reader's buffer; over TLS, redis-py's parser or the
        ``SSLSocket``, which hold whole TLS records)."""
        raw = self._raw
        return raw.backlog if raw is not None else self._cut_short

    def _drain(self) -> int:
        """Read and apply every event already on the connection (lock held)."""
        if self._raw is not None:
            return self._raw.drain(self.state, self.channel)
        pubsub = self.pubsub
        conn = pubsub.connection
        if conn is None or getattr(conn, "_sock", True) is None:
            raise redis.ConnectionError("the subscriber connection is closed")
        state, channel, handle = self.state, self.channel, pubsub.handle_message
        count = 0
        while count < DRAIN_LIMIT and conn.can_read(timeout=0):
            response = conn.read_response(disconnect_on_error=False, push_request=True)
            apply_event(state, _event(handle(response), channel))
            count += 1
        self._cut_short = count >= DRAIN_LIMIT
        return count

    def _unsubscribe(self) -> None:
        with self.lock:
            self._unsubscribe_locked()

    def _unsubscribe_locked(self) -> None:
        pubsub, self.pubsub, self._poller = self.pubsub, None, None
        raw, self._raw, self._cut_short = self._raw, None, False
        if raw is not None:
            raw.sock.close()
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a dead connection: nothing to do
                log.debug("syncmap: closing a subscriber connection failed", exc_info=True)


class _RawSubscriber:
    """Reads a subscriber connection's socket directly: a non-blocking duplicate of it feeds
    a hiredis reader. redis-py only connects, subscribes and sends; it never reads this
    socket again (every read is under the listener's lock, by this object)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock.dup()  # same connection; timeout 0: recv never waits
        self.sock.settimeout(0.0)
        self.reader = hiredis.Reader()
        self.buffer = bytearray(1 << 16)
        self.backlog = False  # the last drain stopped at DRAIN_LIMIT: events may be buffered

    @classmethod
    def of(cls, poller: tuple[Any, Any, Any] | None) -> _RawSubscriber | None:
        """For the polled socket if it is a plain one (TLS keeps redis-py's reader)."""
        sock = None if poller is None else poller[1]
        if type(sock) is not socket.socket:
            return None
        return cls(sock)

    @classmethod
    def of_stream(cls, writer: Any) -> _RawSubscriber | None:
        """For an asyncio connection (redis-py's ``StreamWriter``) on a plain TCP or Unix
        socket, with nothing received yet: pauses its transport (which would otherwise read
        the socket), so that only this object reads it. ``None`` for TLS (or any transport
        without such a socket, or a loop without ``add_reader``): redis-py reads it."""
        transport = getattr(writer, "transport", None)
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return None
        sock = transport.get_extra_info("socket")
        families = (socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", None))
        if sock is None or sock.family not in families or sock.type != socket.SOCK_STREAM:
            return None
        if not _watches_fds(asyncio.get_running_loop()):
            return None
        if getattr(getattr(writer, "_reader", None), "_buffer", None):
            return None  # (data before the subscription: none expected; redis-py reads it)
        transport.pause_reading()
        return cls(sock)

    def drain(self, state: Coherence, channel: bytes) -> int:
        """Apply every complete event already received (RESP2 or RESP3); returns how many."""
        reader, sock, buffer = self.reader, self.sock, self.buffer
        count = 0
        self.backlog = True  # until this drain ends before its limit
        more = True  # the socket may hold more (else: what we read emptied it, no new recv)
        while count < DRAIN_LIMIT:
            reply = reader.gets()
            if reply is False:  # nothing complete buffered: read what the socket has
                if not more:
                    self.backlog = False
                    return count
                try:
                    size = sock.recv_into(buffer)
                except (BlockingIOError, InterruptedError):
                    self.backlog = False
                    return count
                except OSError as exc:
                    raise redis.ConnectionError(f"subscriber connection: {exc}") from exc
                if not size:
                    raise redis.ConnectionError("the server closed the subscriber connection")
                reader.feed(buffer, 0, size)  # type: ignore[arg-type]  # (accepts buffers)
                more = size == len(buffer)
                continue
            count += 1
            if isinstance(reply, list) and len(reply) >= 2:
                kind = reply[0]
                if kind == b"smessage" and len(reply) == 3:
                    if reply[1] == channel and isinstance(reply[2], bytes):
                        state.on_message(reply[2])
                elif kind == b"pong":
                    state.on_pong(bytes(reply[1]).decode("utf-8", "replace"))
                elif kind == b"ssubscribe" and reply[1] == channel:
                    state.on_subscribed()
                elif kind == b"sunsubscribe" and reply[1] == channel:
                    raise _lost_subscription()
            elif isinstance(reply, bytes):  # RESP3: PING's answer is its argument
                state.on_pong(reply.decode("utf-8", "replace"))
            elif isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith("MOVED "):  # a Cluster: the slot's owner is another master
                    raise MovedError(text[len("MOVED ") :])
                raise redis.ResponseError(f"subscriber connection: {text}")
        return count


def _watches_fds(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` watches file descriptors with ``add_reader`` and its transports can
    pause reading: asyncio's selector loops, and uvloop's (whose transports hand out a
    pseudo-socket whose ``dup()`` is a real socket). Not the proactor loop (Windows)."""
    return isinstance(loop, asyncio.SelectorEventLoop) or type(loop).__module__.startswith("uvloop")


def _poller_of(pubsub: Any) -> tuple[Any, Any, Any] | None:
    """``(poll object for the listener thread, socket, poll object for the lock holder)`` for
    the subscriber socket (a poll object must not be used by two threads at once); ``None``
    if there is no socket to poll (or no poll(2))."""
    sock = getattr(pubsub.connection, "_sock", None)
    if sock is None or not hasattr(select, "poll"):
        return None
    pollers = select.poll(), select.poll()
    for poller in pollers:
        poller.register(sock, select.POLLIN)
    return pollers[0], sock, pollers[1]


class AsyncListener(_ListenerBase):
    """The listener of an asyncio map: one task on the map's event loop. On a plain TCP or
    Unix socket it reads the subscriber connection itself (:class:`_RawSubscriber`, waiting
    for data with ``loop.add_reader``): redis-py's transport is paused before the
    subscription is sent and only sends from then on. Other connections (TLS) are read
    through redis-py's ``PubSub.get_message``."""

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
                connection_class=pool.connection_class, **_pool_options(pool, timeout, True)
            )
        )
        self._driver = AsyncDriver(self.client, address)  # the freshness probe's reads
        self.pubsub: Any = None
        self._raw: _RawSubscriber | None = None
        self._raw_writer: Any = None  # the redis-py stream whose socket _raw reads
        self._watching = False  # _raw's socket is watched by the loop (add_reader)
        self._waiter: asyncio.Future[None] | None = None  # set while _receive_raw waits
        self._failure: Exception | None = None  # met away from a Receive: the next one raises it
        self._applied = 0  # events applied for the current _receive_raw
        self.closing = False
        self.running = asyncio.Event()  # cleared by tests to stall the listener
        self.running.set()
        self.task: asyncio.Task[None] | None = None

    @property
    def reader(self) -> str:
        """Which reader serves the subscriber connection: "raw", "redis-py" or "none"."""
        if self._raw is not None:
            return "raw"
        return "none" if self.pubsub is None else "redis-py"

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
        await self.client.aclose(close_connection_pool=True)  # (its own pool: the probe's)

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
                    result, error = await self._perform(op), None
                except Exception as exc:
                    result, error = None, exc
                op = self._resume(flow, result, error)
        finally:
            flow.close()

    async def _perform(self, op: ListenOp) -> Any:
        if isinstance(op, Receive):
            return await self._receive(op.timeout)
        if isinstance(op, Command):
            # through the driver, as every map and lock command: its connection is checked
            # before use (redis-py 8.1's asyncio pool hands out ones the server has closed),
            # and a read whose connection is lost is sent once more, at once
            command = asyncio.ensure_future(self._driver.perform(op))
            try:
                await self._apply_until(command)
                return await command
            finally:
                command.cancel()  # (when the listener is closed meanwhile; else a no-op)
        if isinstance(op, PubsubPing):
            return await self.pubsub.ping(op.token)
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        if isinstance(op, Subscribe):
            await self._unsubscribe()
            self.pubsub = self.client.pubsub()
            await self.pubsub.connect()
            # before the subscription is sent: from here on, every reply is _raw's to read
            self._raw_writer = self.pubsub.connection._writer
            self._raw = _RawSubscriber.of_stream(self._raw_writer)
            await self.pubsub.ssubscribe(op.channel)
            return None
        if isinstance(op, Unsubscribe):
            await self._unsubscribe()
            return None
        raise TypeError(f"unknown listener operation {op!r}")

    async def _receive(self, timeout: float, until: asyncio.Future[Any] | None = None) -> int:
        """Wait ``timeout`` (or until ``until`` is done), applying the events as they arrive;
        returns how many."""
        failure, self._failure = self._failure, None
        if failure is not None:  # (met while the task was elsewhere: see poll, _apply_until)
            raise failure
        if self._raw is not None:
            return await self._receive_raw(self._raw, timeout, until)
        if until is not None:  # redis-py's reader cannot be woken early: wait in short steps
            timeout = min(timeout, PROBE_STEP)
        message = await self.pubsub.get_message(timeout=timeout)
        count = 0
        while message is not None:  # the whole batch at once
            apply_event(self.state, _event(message, self.channel))
            count += 1
            if count >= DRAIN_LIMIT:  # (not one more read: it would be dropped)
                break
            message = await self.pubsub.get_message(timeout=0)
        return count

    async def _apply_until(self, command: asyncio.Future[Any]) -> None:
        """Go on applying change messages until ``command`` is done: the freshness probe's
        read, on a connection of its own. The task would otherwise not read the subscriber
        connection meanwhile, and a slow answer (a reconnect after a killed connection, a
        busy server) held back every change for as long, while reads were still served as
        fresh. (A reading thread does this for the blocking map.) An unsynced copy has no use
        for the changes. A failure of the subscriber connection is left for the next Receive
        to raise."""
        try:
            while self.state.synced and not command.done():
                await self._receive(MAX_WAIT, command)
        except Exception as exc:
            log.debug("syncmap: reading the subscriber connection failed", exc_info=True)
            self._failure = exc

    async def _receive_raw(
        self, raw: _RawSubscriber, timeout: float, until: asyncio.Future[Any] | None = None
    ) -> int:
        """Wait ``timeout``, applying the events as they arrive; returns how many.

        The events are applied by the loop's reader callback (:meth:`_readable`), while this
        Receive waits: a message costs the loop one callback (a ``recv`` and a hiredis
        parse), not a wake-up of the listener task and a step of its flow. (As a reading
        thread does for the blocking map, during its listener thread's wait.)"""
        conn = self.pubsub.connection
        if conn is None or conn._writer is not self._raw_writer:  # redis-py dropped it
            raise redis.ConnectionError("the subscriber connection was closed")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._applied = 0
        if not self._watching:
            loop.add_reader(raw.sock.fileno(), self._readable)
            self._watching = True
        if raw.backlog:  # events left over by a drain that hit DRAIN_LIMIT
            loop.call_soon(self._readable)
        timer = loop.call_later(timeout, _wake, waiter)

        def done(_: object) -> None:
            _wake(waiter)

        if until is not None:
            until.add_done_callback(done)
        try:
            await waiter
        finally:
            timer.cancel()
            if until is not None:
                until.remove_done_callback(done)
            self._waiter = None
        return self._applied

    def _readable(self) -> None:
        """The subscriber socket has data: apply what is there, for the waiting Receive (a
        failure is its to raise). With none waiting (the task is busy, sleeping or
        stalled), stop watching: the loop would spin on the unread data (level-triggered)
        until the next Receive watches again, and applies it."""
        waiter, raw = self._waiter, self._raw
        if waiter is None or waiter.done() or raw is None:
            self._unwatch()
            return
        try:
            self._applied += raw.drain(self.state, self.channel)
        except Exception as exc:
            waiter.set_exception(exc)
            return
        if raw.backlog:  # the rest after the loop's other callbacks
            asyncio.get_running_loop().call_soon(self._readable)

    def poll(self) -> bool:
        """Apply, now, the events already waiting on the subscriber socket; whether it could.
        For a map read after the loop ran nothing else for a while (a GC pause, a blocking
        call): the loop would run the reader callback only after that read, which would
        serve the values those events change. Only the raw reader. While a Receive waits,
        through its callback; while the listener task is elsewhere (its probe, a step of its
        flow), here, and a failure is left for its next Receive to raise."""
        raw = self._raw
        if raw is None or self.closing or not self.running.is_set() or self._failure:
            return False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._readable()
            return True
        try:
            raw.drain(self.state, self.channel)
        except Exception as exc:
            self._failure = exc
        return True

    def _unwatch(self) -> None:
        if self._watching and self._raw is not None:
            asyncio.get_running_loop().remove_reader(self._raw.sock.fileno())
        self._watching = False

    async def _unsubscribe(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        self._unwatch()
        raw, self._raw, self._raw_writer = self._raw, None, None
        self._failure = None  # (the connection it came from is gone)
        if raw is not None:
            raw.sock.close()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # closing a dead connection: nothing to do
                log.debug("syncmap: closing a subscriber connection failed", exc_info=True)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
