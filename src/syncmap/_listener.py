"""Runners of a node's listener flow (``syncmap._core.map_listen.listen``), one per node and
server (per master on a Cluster), shared by the node's maps: a daemon thread for
:class:`~syncmap.SyncMap`, a task for :class:`~syncmap.AsyncSyncMap`. They only perform the
flow's operations on dedicated connections (a subscriber connection plus a client for the
freshness probe's reads, both with a socket timeout), send a map's SSUBSCRIBE/SUNSUBSCRIBE
when it opens or closes, and restart the flow if it ever fails: the listener never dies from
bad data or a lost server. Across ``os.fork()``, see ``_after_fork``.

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
import math
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import hiredis
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import MovedError
from redis.retry import Retry

from ._core.coherence import Coherence
from ._core.hooks import Hooks, new_hooks
from ._core.map_listen import (
    FLUSH_CHANNEL,
    MAX_WAIT,
    Event,
    Hub,
    ListenFlow,
    ListenOp,
    Member,
    PubsubPing,
    ReadMetas,
    Receive,
    Resubscribe,
    Subscribe,
    Unsubscribe,
    apply_event,
    listen,
)
from ._core.ops import Command, Sleep
from ._driver import AsyncDriver
from ._errors import ServerError, SyncMapError, translated
from ._redis_compat import connection_options, parser_of, sock_of, stream_buffered, writer_of

__all__ = ["AsyncListener", "SyncListener"]

log = logging.getLogger("syncmap.map")

_LISTENERS: weakref.WeakSet[Any] = weakref.WeakSet()  # every listener of this process


def _after_fork_in_child() -> None:
    for listener in list(_LISTENERS):
        listener._after_fork()


_ABANDONED: list[Any] = []  # a forked child's inherited asyncio objects (see AsyncListener)


def _forget_members(hub: Hub) -> None:
    """In a forked child: every map of ``hub`` drops its copy (nothing it holds was seen by a
    listener of the child), with fresh locks (a thread of the parent may have held one; no
    thread of the parent runs in the child), and waits for a new subscription: the child's
    first (the drop is counted once, as ``"fork"``, not again as a resubscribe)."""
    for member in hub.members:
        member.state.mutex = threading.RLock()
        member.state.subscribed_once = False
        member.state.forget_counts()  # (the child's counts are its own, as its metrics)
        store = member.state.store
        if hasattr(store, "_lock"):
            store._lock = threading.Lock()
        member.confirmed = False
    hub.unsubscribing.clear()
    hub.last_probe = -math.inf
    hub.resync("fork")


os.register_at_fork(after_in_child=_after_fork_in_child)


def _tracking(client_id: Any) -> tuple[Any, ...]:
    """The subscriber connection hears of FLUSHALL/FLUSHDB: tracking redirected to itself,
    OPTIN with nothing ever opted in (no key is tracked; a flush sends a null invalidation
    to every tracking client, on ``__redis__:invalidate``). Works with RESP2 and RESP3."""
    return ("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "OPTIN")


def _track_flushes(hub: Hub, address: str, send: Any, read: Any) -> None:
    """Turn on the flush notices (``hub.flush_notices``: whether the server agreed)."""
    try:
        send("CLIENT", "ID")
        send(*_tracking(read()))
        read()
    except redis.ResponseError as exc:
        _no_flush_notices(hub, address, exc)
    else:
        hub.flush_notices = True


async def _track_flushes_async(hub: Hub, address: str, conn: Any) -> None:
    try:
        await conn.send_command("CLIENT", "ID")
        await conn.send_command(*_tracking(await conn.read_response()))
        await conn.read_response()
    except redis.ResponseError as exc:
        _no_flush_notices(hub, address, exc)
    else:
        hub.flush_notices = True


def _no_flush_notices(hub: Hub, address: str, exc: Exception) -> None:
    hub.flush_notices = False
    log.warning(
        "syncmap: %s refuses CLIENT TRACKING (%s): no flush notices; each freshness probe "
        "reads every map's seq instead (one HMGET per map and interval)",
        address,
        exc,
    )


def _is_flush(reply: list[Any]) -> bool:
    """A flush notice: a null invalidation (RESP3: an ``invalidate`` push; RESP2: a message
    on ``__redis__:invalidate``)."""
    kind = reply[0].encode() if isinstance(reply[0], str) else reply[0]
    if kind == b"invalidate":
        return len(reply) > 1 and reply[1] is None
    return kind == b"message" and len(reply) > 2 and reply[1] == FLUSH_CHANNEL and reply[2] is None


def _on_invalidation(conn: Any, handler: Any) -> None:
    """Where redis-py's reader (TLS connections) hands a RESP3 ``invalidate`` push: it does
    not pass it on as a pub/sub message. (RESP2 sends it as a message on the flush channel.)"""
    setter = getattr(parser_of(conn), "set_invalidation_push_handler", None)
    if setter is not None:
        setter(handler)


def _channels_of(members: Iterable[Member]) -> list[bytes]:
    """The members' channels, once each, in order."""
    return list(dict.fromkeys(m.channel for m in members))


def _hmget(key: str) -> Command:
    return Command(("HMGET", key, "epoch", "seq"))


def _pool_options(pool: Any, socket_timeout: float, is_async: bool = False) -> dict[str, Any]:
    options = connection_options(pool)
    retry = AsyncRetry(NoBackoff(), 0) if is_async else Retry(NoBackoff(), 0)
    options.update(
        socket_timeout=socket_timeout,
        retry=retry,  # a lost connection is the flow's to notice, not retried
        health_check_interval=0,
    )
    options.pop("retry_on_timeout", None)
    return options


def _event(message: dict[str, Any] | None) -> Event | None:
    """redis-py's message (TLS connections) as an event of the hub."""
    if message is None:
        return None
    kind = message.get("type")
    if isinstance(kind, bytes):
        kind = kind.decode()
    channel = message.get("channel")
    data = message.get("data")
    if kind == "smessage" and isinstance(channel, bytes) and isinstance(data, bytes):
        return ("message", channel, data)
    if ((kind == "message" and channel == FLUSH_CHANNEL) or kind == "invalidate") and data is None:
        return ("flush", b"", None)
    if kind == "ssubscribe" and isinstance(channel, bytes):
        return ("subscribe", channel, None)
    if kind == "sunsubscribe" and isinstance(channel, bytes):
        return ("unsubscribe", channel, None)
    if kind == "pong":
        return ("pong", b"", data.decode() if isinstance(data, bytes) else str(data))
    return None


def _learn(client: Any, exc: BaseException) -> None:
    """On a Cluster, a subscription answered with MOVED names the slot's owner: tell the slot
    table, so that the map subscribes there (``syncmap._cluster``)."""
    if isinstance(exc, MovedError):
        router = connection_options(client.connection_pool).get("syncmap_router")
        if router is not None:
            router.table.moved(exc.slot_id, (exc.host, int(exc.port)))


def _meta_reply(reply: Any, address: str) -> Any:
    """One HMGET reply of a base read: ``(epoch, seq)``, or the (translated) error."""
    if isinstance(reply, Exception):
        return translated(reply, address)
    return tuple(reply)


class _ListenerBase:
    """What both runners share: the hub (every map's state), the flow, error handling, and
    the maps' (un)registration bookkeeping. ``home``: on a Cluster, the master this listener
    serves (its maps' slots belong there); ``router`` its slot table."""

    client: Any  # the redis-py client of the freshness probe (and the subscriber's pool)

    def __init__(
        self, client: Any, address: str, timeout: float, router: Any = None, home: Any = None
    ) -> None:
        self.hub = Hub(time.monotonic)
        self.address = address
        self.timeout = timeout
        self.router = router
        self.home = home
        self.restarts = 0
        self.started = False
        if router is not None:
            self.hub.learn = self._learn_moved
        _LISTENERS.add(self)

    def _learn_moved(self, slot: int, where: str) -> None:
        host, _, port = where.rpartition(":")
        if port.isdigit():
            self.router.table.moved(slot, (host, int(port)))

    def _elsewhere(self, member: Member) -> bool:
        """On a Cluster: whether the map's slot now lives on another master than ours."""
        if self.router is None or self.home is None or member.slot is None:
            return False
        return bool(self.router.table.owner(member.slot) != self.home)

    @property
    def states(self) -> list[Coherence]:
        return [m.state for m in self.hub.members]

    def _flow(self) -> ListenFlow[None]:
        return listen(self.hub)

    def _resume(self, flow: ListenFlow[None], result: Any, exc: Exception | None) -> ListenOp:
        """Feed the flow its operation's result, or the (translated) error; its next one."""
        if exc is None:
            return flow.send(result)
        _learn(self.client, exc)
        return flow.throw(translated(exc, self.address))

    def _failed(self, exc: BaseException) -> float:
        """The flow itself raised (a bug or unexpected data): log, drop the copies, restart."""
        self.restarts += 1
        log.error("syncmap: listener of %s failed; restarting it", self.address, exc_info=exc)
        self.hub.resync("listener_error")
        return min(0.02 * 2.0 ** min(self.restarts, 7), 2.0)

    def _strangers(self) -> list[Member]:
        """On a Cluster: the maps whose slot the table now gives to another master."""
        if self.router is None or self.home is None:
            return []
        return [m for m in self.hub.members if self._elsewhere(m)]

    def _hand_over(self, members: list[Member]) -> None:
        """Give each map whose slot moved to the listener of its new master (no lock held)."""
        for member in members:
            self._forget(member)
            if member.relisten is not None:
                member.relisten(member)

    def _forget(self, member: Member) -> None:
        self.hub.remove(member)

    def _read_meta(self, key: str) -> Any:
        return self.client.execute_command("HMGET", key, "epoch", "seq")

    def _pipeline(self, keys: tuple[str, ...]) -> Any:
        """The base reads of several maps, as one pipeline of the probe's client."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("HMGET", key, "epoch", "seq")
        return pipe


DRAIN_LIMIT = 10_000  # events applied in one go at most (the rest: next time)
PROBE_STEP = 0.002  # redis-py's reader, during a probe's read: waits this long at a time
READERS_ACTIVE = 0.002  # s: a map thread polled this recently: it applies the events
LOCK_WAIT = 0.002  # s: how long poll() waits for the lock
BUSY_NAP = 0.01  # s: the listener thread's first nap while map threads apply the events;
BUSY_NAP_MAX = 0.05  # s: each further one twice as long, up to this (and its Receive's end).
# Every wake-up costs a thread spinning on hits a GIL hand-off: measured, 10 ms naps gave
# such a thread ~100 pauses of over 50 µs per second, against ~40 with 50 ms naps.


class SyncListener(_ListenerBase):
    """The listener of a blocking node's maps on one server: one daemon thread, helped by
    reading threads (:meth:`poll`). ``lock`` guards the subscriber connection: held to read
    and apply events, to send on it, and to replace it; never while waiting for data."""

    def __init__(
        self,
        client: redis.Redis,
        address: str,
        timeout: float,
        router: Any = None,
        home: Any = None,
        hooks: Hooks[threading.Event] | None = None,
    ) -> None:
        super().__init__(client, address, timeout, router, home)
        pool = client.connection_pool
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **_pool_options(pool, timeout)
            )
        )
        self.pubsub: Any = None
        self._sock: Any = None  # the subscriber connection's socket when subscribed
        self.lock = threading.Lock()
        self.failure: Exception | None = None  # a reading thread's drain failed: reconnect
        self.last_poll = -1.0  # when a reading thread last called poll()
        self._poller: tuple[Any, Any, Any] | None = None
        self._raw: _RawSubscriber | None = None
        self._cut_short = False  # redis-py's reader: the last drain stopped at DRAIN_LIMIT
        self.closing = threading.Event()
        self.nudge = threading.Event()  # ends the listener thread's nap early
        self.hooks = new_hooks(threading.Event, threading.Event) if hooks is None else hooks
        self._nap = BUSY_NAP  # the next nap while map threads apply the events
        self.thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(
            target=self._main, name=f"syncmap-listener-{self.address}", daemon=True
        )

    def start(self) -> None:
        """Start the thread (once per process: see :meth:`_after_fork`)."""
        with self.lock:
            if self.started or self.closing.is_set():
                return
            self.started = True
        self.thread.start()

    def register(self, member: Member) -> None:
        """Listen for ``member``'s map: SSUBSCRIBE its channel on the connection (or on the
        next one, if there is none right now)."""
        with self.lock:
            if self.hub.add(member) and self.pubsub is not None:
                self._send_locked("SSUBSCRIBE", member.channel)
        if self.hub.wanted:
            self.nudge.set()  # (its channel was confirmed already: probe now)
        if not self.started:
            self.start()

    def unregister(self, member: Member) -> None:
        """Stop listening for ``member``'s map: SUNSUBSCRIBE its channel if no other map of
        the node listens to it. The map's copy is no longer kept."""
        with self.lock:
            if self.hub.remove(member) and self.pubsub is not None:
                hub = self.hub
                hub.unsubscribing[member.channel] = hub.unsubscribing.get(member.channel, 0) + 1
                self._send_locked("SUNSUBSCRIBE", member.channel)

    def _forget(self, member: Member) -> None:
        with self.lock:
            self.hub.remove(member)

    def _send_locked(self, *args: Any) -> None:
        """Send a command on the subscriber connection (lock held); a failure is the listener
        thread's to handle (it reconnects and subscribes every channel)."""
        try:
            conn = self.pubsub.connection
            if conn is None or sock_of(conn) is not self._sock:
                raise redis.ConnectionError("the subscriber connection was closed")
            conn.send_command(*args, check_health=False)
        except Exception as exc:
            if self.failure is None:
                self.failure = translated(exc, self.address)

    def close(self, timeout: float = 2.0) -> None:
        self.closing.set()
        self.nudge.set()
        self.hooks.running.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self._unsubscribe()
        self.hub.resync(None)
        self.client.close()
        self.client.connection_pool.disconnect()  # its own pool (the freshness probe's)

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connection without a word on it (its
        sockets are the parent's), drop every map's copy, and start a thread of the child's
        own on first use (a map's next server call, which every read now is)."""
        self.lock = threading.Lock()  # (another thread of the parent may have held it)
        if self._raw is not None:
            self._raw.sock.close()  # the child's descriptor only: nothing is sent
        self.pubsub = self._poller = self._raw = self._sock = None
        self.failure = None
        self.last_poll = -1.0
        self.started = False
        self.closing = threading.Event()
        self.nudge = threading.Event()
        self.hooks.restart(threading.Event, threading.Event)  # (in place: the node's)
        self.thread = self._new_thread()
        _forget_members(self.hub)

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
                hooks = self.hooks
                if not hooks.running.is_set():
                    hooks.parked.set()
                    hooks.running.wait()
                    hooks.parked.clear()
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
        if isinstance(op, ReadMetas):
            return self._read_metas(op.keys)
        if isinstance(op, PubsubPing):
            # On a plain socket, sent without the lock (a send may wait for the GIL: readers
            # would be locked out); sending while another thread reads the socket is fine. Not
            # on TLS (redis-py's reader): one SSL object must not be used by two threads at once.
            with contextlib.nullcontext() if self._raw is not None else self.lock:
                conn = self.pubsub.connection
                if conn is None or sock_of(conn) is not self._sock:  # (redis-py would reconnect
                    raise redis.ConnectionError("the subscriber connection was closed")  # it)
                return conn.send_command("PING", op.token, check_health=False)
        if isinstance(op, Sleep):
            self.closing.wait(op.seconds)
            return None
        if isinstance(op, Resubscribe):
            with self.lock:
                lost = self.hub.take_lost()
            self._hand_over([m for m in lost if self._elsewhere(m)])
            with self.lock:
                if self.pubsub is not None:
                    for channel in _channels_of(m for m in lost if not self._elsewhere(m)):
                        self._send_locked("SSUBSCRIBE", channel)
            return None
        if isinstance(op, Subscribe):
            self._hand_over(self._strangers())
            with self.lock:
                self._unsubscribe_locked()
                self.failure = None
                conn = self.client.connection_pool.get_connection()
                try:
                    _track_flushes(self.hub, self.address, conn.send_command, conn.read_response)
                except BaseException:
                    conn.disconnect()
                    self.client.connection_pool.release(conn)
                    raise
                self.pubsub = self.client.pubsub()
                self.pubsub.connection = conn
                conn.register_connect_callback(self.pubsub.on_connect)
                _on_invalidation(conn, self._invalidated)
                self._sock = sock_of(conn)
                self.pubsub.subscribe(FLUSH_CHANNEL)
                for channel in self.hub.channels():
                    self.pubsub.ssubscribe(channel)
                self._poller = _poller_of(self.pubsub)
                self._raw = _RawSubscriber.of(self._poller)
            return None
        if isinstance(op, Unsubscribe):
            self._unsubscribe()
            return None
        raise TypeError(f"unknown listener operation {op!r}")

    def _invalidated(self, push: Any) -> None:
        """redis-py's reader (TLS, RESP3) met an ``invalidate`` push (lock held)."""
        if _is_flush(list(push)):
            self.hub.resync("flush")

    def _read_metas(self, keys: tuple[str, ...]) -> list[Any]:
        """Each map's (epoch, seq): one pipeline on a single server; one read per map on a
        Cluster (each is redirected on its own if its slot moved)."""
        if self.router is None and len(keys) > 1:
            try:
                replies = self._pipeline(keys).execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError):  # reads: sent once more, at
                replies = self._pipeline(keys).execute(raise_on_error=False)  # once (as the
                # driver does: a pooled connection the server closed fails its first use)
        else:
            replies = []
            for key in keys:
                try:
                    replies.append(self._read_meta(key))
                except redis.ResponseError as exc:
                    replies.append(exc)
        return [_meta_reply(reply, self.address) for reply in replies]

    def _receive(self, timeout: float) -> int:
        """Wait (without the lock) up to ``timeout`` for data, applying all there is as it
        arrives; returns how many events. Ends early when the flow has something to do (a map
        awaits its base, or lost its subscription), or a reading thread's drain failed.

        One Receive serves every message of its time, as the asyncio listener's does: a
        message costs a wake-up and a drain, not a step of the flow as well.

        While other threads of the map are busy (reads, writes: they call :meth:`poll`), they
        apply what arrives, and this thread stays out of their way: it does not even watch the
        socket (waking up per message costs the busy thread a GIL hand-off), and it never
        takes the lock from them (every system call of its drain would hand the GIL to a busy
        thread and wait up to a switch interval to get it back, the lock held all along)."""
        end = time.monotonic() + timeout
        hub = self.hub
        count = 0
        while self.failure is None:
            now = time.monotonic()
            if now - self.last_poll < READERS_ACTIVE:  # busy threads apply the events
                # (and need the GIL: waking up often here would compete with them for it)
                nap = self._nap
                self._nap = min(2 * nap, BUSY_NAP_MAX)
                if hub.wanted or now >= end or self.nudge.wait(min(end - now, nap)):
                    self.nudge.clear()  # (a map awaits its base, or close())
                    return count
                continue
            self._nap = BUSY_NAP
            poller = self._poller
            if poller is not None and poller[1] is not _sock_or_none(self.pubsub):
                poller = self._poller = _poller_of(self.pubsub)  # redis-py reconnected it
            if poller is None:  # no poll(2) (or no socket: the drain below raises)
                self.closing.wait(min(timeout, 0.001))
                break
            if not self._backlog():  # (else: events left over by a drain that hit the limit)
                try:
                    ready = poller[0].poll(max(0.0, end - now) * 1000)
                except (OSError, ValueError):  # closed: the drain below says so
                    break
                if not ready:
                    break  # (its end)
                if time.monotonic() - self.last_poll < READERS_ACTIVE:
                    continue  # (a reading thread applies them)
            with self.lock:
                if self.failure is not None:
                    break
                count += self._drain()
            if hub.wanted or hub.lost or self.closing.is_set() or time.monotonic() >= end:
                return count
        with self.lock:
            failure, self.failure = self.failure, None
            if failure is not None:
                raise failure
            return count + self._drain()

    def poll(self, now: float) -> None:
        """Apply the events already waiting on the subscriber connection, in the calling
        (reading) thread; ``now``: ``time.monotonic()``. Waits at most ``LOCK_WAIT`` for the
        lock (skipped if another thread holds it longer: it reconnects)."""
        self.last_poll = now
        # A short wait, not none: if the listener thread holds the lock, it is in a drain and
        # may be waiting for the GIL; waiting here hands it over, so it finishes at once. (A
        # plain try first: a timed acquire costs several times more, and this runs often.)
        lock = self.lock
        if not self.hooks.running.is_set() or (
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
                if self.hub.wanted:  # a map awaits its base: the listener thread probes
                    self.nudge.set()
        except Exception as exc:
            _learn(self.client, exc)
            error = translated(exc, self.address)
            self.failure = error  # the listener thread reconnects
            if isinstance(error, SyncMapError):
                self.hub.on_disconnect()
            else:
                log.error("syncmap: applying change messages failed", exc_info=error)
                self.hub.resync("listener_error")
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
            return self._raw.drain(self.hub)
        pubsub = self.pubsub
        conn = pubsub.connection
        if conn is None or sock_of(conn) is not self._sock:
            raise redis.ConnectionError("the subscriber connection is closed")
        hub, handle = self.hub, pubsub.handle_message
        count = 0
        while count < DRAIN_LIMIT and conn.can_read(timeout=0):
            response = conn.read_response(disconnect_on_error=False, push_request=True)
            apply_event(hub, _event(handle(response)))
            count += 1
        self._cut_short = count >= DRAIN_LIMIT
        return count

    def _unsubscribe(self) -> None:
        with self.lock:
            self._unsubscribe_locked()

    def _unsubscribe_locked(self) -> None:
        pubsub, self.pubsub, self._poller, self._sock = self.pubsub, None, None, None
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
        if stream_buffered(writer):
            return None  # (data before the subscription: none expected; redis-py reads it)
        transport.pause_reading()
        return cls(sock)

    def drain(self, hub: Hub) -> int:
        """Apply every complete event already received (RESP2 or RESP3); returns how many."""
        reader, sock, buffer = self.reader, self.sock, self.buffer
        by_channel = hub.by_channel
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
                    data = reply[2]
                    if isinstance(data, bytes):
                        for member in by_channel.get(reply[1], ()):
                            member.state.on_message(data)
                elif kind == b"pong":
                    hub.on_pong(bytes(reply[1]).decode("utf-8", "replace"))
                elif kind == b"ssubscribe":
                    hub.event("subscribe", reply[1], None)
                elif kind == b"sunsubscribe":
                    hub.on_unsubscribed(reply[1])
                elif _is_flush(reply):
                    hub.resync("flush")
            elif isinstance(reply, bytes):  # RESP3: PING's answer is its argument
                hub.on_pong(reply.decode("utf-8", "replace"))
            elif isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith("MOVED "):  # a Cluster: the slot's owner is another master
                    slot, _, where = text[len("MOVED ") :].partition(" ")
                    if hub.learn is None or not slot.isdigit():
                        raise MovedError(text[len("MOVED ") :])
                    hub.learn(int(slot), where)  # (the map subscribes there: Resubscribe)
                    hub.on_moved(int(slot))
                    continue
                raise redis.ResponseError(f"subscriber connection: {text}")
        return count


def _watches_fds(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` watches file descriptors with ``add_reader`` and its transports can
    pause reading: asyncio's selector loops, and uvloop's (whose transports hand out a
    pseudo-socket whose ``dup()`` is a real socket). Not the proactor loop (Windows)."""
    return isinstance(loop, asyncio.SelectorEventLoop) or type(loop).__module__.startswith("uvloop")


def _sock_or_none(pubsub: Any) -> Any:
    """The socket of a pub/sub's connection (``None``: no connection, or not connected)."""
    conn = pubsub.connection
    return None if conn is None else sock_of(conn)


def _poller_of(pubsub: Any) -> tuple[Any, Any, Any] | None:
    """``(poll object for the listener thread, socket, poll object for the lock holder)`` for
    the subscriber socket (a poll object must not be used by two threads at once); ``None``
    if there is no socket to poll (or no poll(2))."""
    sock = _sock_or_none(pubsub)
    if sock is None or not hasattr(select, "poll"):
        return None
    pollers = select.poll(), select.poll()
    for poller in pollers:
        poller.register(sock, select.POLLIN)
    return pollers[0], sock, pollers[1]


class AsyncListener(_ListenerBase):
    """The listener of an asyncio node's maps on one server: one task on the node's event
    loop. On a plain TCP or Unix socket it reads the subscriber connection itself
    (:class:`_RawSubscriber`, waiting for data with ``loop.add_reader``): redis-py's
    transport is paused before the subscriptions are sent and only sends from then on.
    Other connections (TLS) are read through redis-py's ``PubSub.get_message``."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        address: str,
        timeout: float,
        router: Any = None,
        home: Any = None,
        hooks: Hooks[asyncio.Event] | None = None,
    ) -> None:
        super().__init__(client, address, timeout, router, home)
        pool = client.connection_pool
        self.client = redis.asyncio.Redis(
            connection_pool=redis.asyncio.ConnectionPool(
                connection_class=pool.connection_class, **_pool_options(pool, timeout, True)
            )
        )
        self._driver = AsyncDriver(self.client, address)  # the freshness probe's reads
        self.pubsub: Any = None
        self._raw: _RawSubscriber | None = None
        self._raw_writer: Any = None  # the redis-py stream the subscriptions were sent on
        self._watching = False  # _raw's socket is watched by the loop (add_reader)
        self._waiter: asyncio.Future[None] | None = None  # set while _receive_raw waits
        self._failure: Exception | None = None  # met away from a Receive: the next one raises it
        self._applied = 0  # events applied for the current _receive_raw
        self.closing = False
        self.forked = False  # made before os.fork(), and this is the child: unusable
        self.hooks = new_hooks(asyncio.Event, threading.Event) if hooks is None else hooks
        self.task: asyncio.Task[None] | None = None

    @property
    def reader(self) -> str:
        """Which reader serves the subscriber connection: "raw", "redis-py" or "none"."""
        if self._raw is not None:
            return "raw"
        return "none" if self.pubsub is None else "redis-py"

    def start(self) -> None:
        if not self.started and not self.closing:
            self.started = True
            self.task = asyncio.get_running_loop().create_task(self._main())

    async def register(self, member: Member) -> None:
        """Listen for ``member``'s map (as :meth:`SyncListener.register`)."""
        if self.hub.add(member) and self.pubsub is not None:
            await self._send("SSUBSCRIBE", member.channel)
        if self.hub.wanted and self._waiter is not None:
            _wake(self._waiter)  # (its channel was confirmed already: probe now)
        self.start()

    async def unregister(self, member: Member) -> None:
        """Stop listening for ``member``'s map (as :meth:`SyncListener.unregister`)."""
        if self.hub.remove(member) and self.pubsub is not None:
            hub = self.hub
            hub.unsubscribing[member.channel] = hub.unsubscribing.get(member.channel, 0) + 1
            await self._send("SUNSUBSCRIBE", member.channel)

    async def _send(self, *args: Any) -> None:
        """Send on the subscriber connection; a failure is left for the next Receive."""
        try:
            conn = self.pubsub.connection
            if conn is None or writer_of(conn) is not self._raw_writer:
                raise redis.ConnectionError("the subscriber connection was closed")
            await conn.send_command(*args, check_health=False)
        except Exception as exc:
            if self._failure is None:
                self._failure = translated(exc, self.address)

    async def close(self) -> None:
        if self.forked:
            return  # (the parent's connections and task: left alone, see _after_fork)
        self.closing = True
        self.hooks.running.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self._unsubscribe()
        self.hub.resync(None)
        await self.client.aclose(close_connection_pool=True)  # (its own pool: the probe's)

    def _after_fork(self) -> None:
        """In a forked child: an asyncio node does not cross a fork (its connections and task
        belong to the parent's event loop). Every map's copy is dropped, nothing is sent on
        the parent's connections, and every later call of the node, its maps and locks
        raises :class:`~syncmap.NodeForked`."""
        self.forked = True
        self.closing = True
        # Kept, never closed nor collected here: closing an asyncio transport unregisters
        # its socket from the loop's epoll instance, which the child shares with the parent.
        _ABANDONED.append((self.pubsub, self._raw, self._raw_writer, self.task, self.client))
        self._raw = self._raw_writer = self.pubsub = self.task = None
        self._waiter = None
        self._watching = False
        _forget_members(self.hub)

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
                hooks = self.hooks
                if not hooks.running.is_set():
                    hooks.parked.set()
                    await hooks.running.wait()
                    hooks.parked.clear()
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
        if isinstance(op, ReadMetas):
            # the maps' changes keep being applied while the read takes its time
            command = asyncio.ensure_future(self._read_metas(op.keys))
            try:
                await self._apply_until(command)
                return await command
            finally:
                command.cancel()  # (when the listener is closed meanwhile; else a no-op)
        if isinstance(op, PubsubPing):
            conn = self.pubsub.connection
            if conn is None or writer_of(conn) is not self._raw_writer:  # (redis-py would
                raise redis.ConnectionError("the subscriber connection was closed")  # reconnect)
            return await conn.send_command("PING", op.token, check_health=False)
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        if isinstance(op, Resubscribe):  # (as SyncListener's)
            lost = self.hub.take_lost()
            self._hand_over([m for m in lost if self._elsewhere(m)])
            if self.pubsub is not None:
                for channel in _channels_of(m for m in lost if not self._elsewhere(m)):
                    await self._send("SSUBSCRIBE", channel)
            return None
        if isinstance(op, Subscribe):
            self._hand_over(self._strangers())
            await self._unsubscribe()
            pool = self.client.connection_pool
            conn = await pool.get_connection()
            try:
                await _track_flushes_async(self.hub, self.address, conn)
            except BaseException:
                await conn.disconnect()
                await pool.release(conn)
                raise
            pubsub = self.client.pubsub()
            pubsub.connection = conn
            conn.register_connect_callback(pubsub.on_connect)
            _on_invalidation(conn, self._invalidated)
            # before any subscription is sent: from here on, every reply is _raw's to read
            self._raw_writer = writer_of(conn)
            self._raw = _RawSubscriber.of_stream(self._raw_writer)
            self._failure = None
            self.pubsub = pubsub  # (a map registering from here on sends its own SSUBSCRIBE)
            channels = self.hub.channels()
            await pubsub.subscribe(FLUSH_CHANNEL)
            for channel in channels:
                await pubsub.ssubscribe(channel)
            return None
        if isinstance(op, Unsubscribe):
            await self._unsubscribe()
            return None
        raise TypeError(f"unknown listener operation {op!r}")

    async def _invalidated(self, push: Any) -> None:
        """redis-py's reader (TLS, RESP3) met an ``invalidate`` push."""
        if _is_flush(list(push)):
            self.hub.resync("flush")

    async def _read_metas(self, keys: tuple[str, ...]) -> list[Any]:
        """As :meth:`SyncListener._read_metas`: on a single server, one pipeline of the
        probe's pool, whatever the number of maps, so the probe holds one connection (the
        driver would keep one of its own aside); on a Cluster, one read per map through the
        driver (its connections are checked before use, and a read is resent once if its
        connection is lost)."""
        if self.router is None:
            try:
                replies = await self._pipeline(keys).execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError):  # (as SyncListener's)
                replies = await self._pipeline(keys).execute(raise_on_error=False)
            return [_meta_reply(reply, self.address) for reply in replies]
        found: list[Any] = []
        for key in keys:
            try:
                found.append(tuple(await self._driver.perform(_hmget(key))))
            except ServerError as exc:
                found.append(exc)
        return found

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
            apply_event(self.hub, _event(message))
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
            while self.hub.synced() and not command.done():
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
        if conn is None or writer_of(conn) is not self._raw_writer:  # redis-py dropped it
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
            self._applied += raw.drain(self.hub)
        except Exception as exc:
            waiter.set_exception(exc)
            return
        if self.hub.wanted:  # a map awaits its base (just subscribed): probe now
            waiter.set_result(None)
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
        if raw is None or self.closing or not self.hooks.running.is_set() or self._failure:
            return False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._readable()
            return True
        try:
            raw.drain(self.hub)
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
