"""The two drivers that run core flows: one blocking, one asyncio. Everything else is shared.

How a flow runs (perform, the EVAL fallback, the resend of an idempotent operation) is written
once, for asyncio; the blocking driver's is generated from it (``scripts/unasync.py``). Only
the I/O differs, in two small per-kind classes (``_DriverIO``, ``_AsyncDriverIO``).

Each turns an :mod:`~syncmap._core.ops` operation into a server round trip and feeds the
result (or the translated error) back into the flow. redis-py errors become syncmap errors here.

Commands run on connections kept aside from the client's pool (:class:`_Connections`): each
command borrows one and gives it back, skipping redis-py's per-command pool bookkeeping, which
costs more than the round trip itself on loopback. No redis-py ``Retry`` is involved (a user's
client may come with one that resends any command). Instead:

* a kept connection is checked before use (a closed or dirty socket is reconnected first), so a
  server restart or ``CLIENT KILL`` costs nothing visible;
* when a connection fails after the request was sent, an *idempotent* operation is resent once
  on a new connection, and any other one raises :class:`~syncmap.OutcomeUnknown`: it may or may
  not have been applied, and resending it could apply it twice (an increment counted twice).

A :class:`~syncmap._core.ops.Batch` is one write of several scripts and one read of their
answers. Each answer is kept (an error answer as the translated error); a script answered
NOSCRIPT, MOVED, ASK or TRYAGAIN did not run, and is then performed alone (``EVAL``, the
cluster's redirects).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import select
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection
from redis.exceptions import AskError, NoScriptError, TryAgainError

from ._core.ops import Batch, Command, Flow, Op, Script, Sleep
from ._errors import OutcomeUnknown, translated
from ._redis_compat import (
    HIREDIS_PARSER,
    NOT_ENOUGH_DATA,
    PLAIN_ASYNC_READ,
    PLAIN_ASYNC_SEND,
    parser_connected,
    parser_of,
    parser_reader,
    push_type,
    sock_of,
    writer_of,
)
from ._scripts import eval_instead, script_command

__all__ = ["AsyncDriver", "SyncDriver"]

T = TypeVar("T")

_KEEP_IDLE = 4

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    _hiredis_pack = None


def _pack(conn: Any, *commands: tuple[Any, ...]) -> Any:
    """The commands in RESP, as one buffer to send: hiredis packs str/int/bytes arguments a
    few times faster than redis-py's encoder does."""
    if _hiredis_pack is not None:
        if len(commands) == 1:
            return [_hiredis_pack(commands[0])]
        return [b"".join(map(_hiredis_pack, commands))]
    return conn.pack_commands(commands)


def _blocking_wait(conn: Any, args: tuple[Any, ...]) -> float | None:
    """How long to wait for the answer of a blocking command (``None``: not one)."""
    if args[0] != "BLPOP":
        return None
    return float(args[-1]) + (conn.socket_timeout or 5.0)


class _Process:
    """This process's id, kept current by a fork hook: read on every borrow and give-back
    (``os.getpid()`` is a system call)."""

    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.pid = os.getpid()


os.register_at_fork(after_in_child=_Process.forked)


class _Connections:
    """Connections set aside from one client's pool (per process)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.pid = _Process.pid
        self.idle: list[Any] = []


_KEPT: weakref.WeakKeyDictionary[Any, _Connections] = weakref.WeakKeyDictionary()


def _connections(client: Any) -> _Connections:
    kept = _KEPT.get(client)
    if kept is None or kept.pid != _Process.pid:
        kept = _KEPT[client] = _Connections(client.connection_pool)
    return kept


def _readable(conn: Any) -> bool:
    """Whether the connection's socket has something to read, or is closed: one ``poll(0)``
    on a poll object kept with the connection, a few times cheaper than redis-py's
    ``can_read``. ``False`` without a socket."""
    return _polled(conn, sock_of(conn))


def _polled(conn: Any, sock: Any) -> bool:
    """Whether ``sock`` (``conn``'s socket, or the one under an asyncio connection's
    transport) has something to read, or is closed. ``False`` for ``None``."""
    if sock is None:
        return False
    watch = conn.__dict__.get("_syncmap_watch")
    if watch is None or watch[0] is not sock:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        watch = conn._syncmap_watch = (sock, poller)
    try:
        return bool(watch[1].poll(0))
    except (OSError, ValueError):
        return True


_NOT_RUN = (NoScriptError, AskError, TryAgainError)  # (MovedError is an AskError)


def _unknown_scripts(replies: list[Any]) -> list[int]:
    """The scripts of a batch the server answered NOSCRIPT (not run)."""
    return [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def _then(op: Command | Script | Batch) -> tuple[Any, ...] | None:
    """The blocking command sent behind a script in the same write, if any."""
    return op.then if isinstance(op, Script) else None


def _command(op: Op) -> Any:
    """The command to send for a server operation (a batch: the list of its commands)."""
    if isinstance(op, Command):
        return op.args
    if isinstance(op, Script):
        return script_command(op)
    if isinstance(op, Batch):
        return [script_command(script) for script in op.scripts]
    raise TypeError(f"unknown operation {op!r}")


def _packed(conn: Any, args: Any) -> Any:
    """``args`` (one command, or a batch's list of them) as one buffer. A batch's answers are
    settled by the driver: a cluster connection must not follow a redirect of one of them by
    resending the whole buffer (``syncmap_sent``: see ``_cluster``)."""
    if isinstance(args, list):
        return _pack(conn, *args)
    return _pack(conn, args)


def _sent(conn: Any, args: Any) -> None:
    if isinstance(args, list) and "syncmap_sent" in conn.__dict__:
        conn.syncmap_sent = None


def _unknown(op: Command | Script | Batch, exc: Exception, address: str) -> OutcomeUnknown:
    if isinstance(op, Batch):
        what = f"a batch of {len(op.scripts)} {op.scripts[0].name} scripts"
    else:
        what = op.name if isinstance(op, Script) else str(op.args[0])
    return OutcomeUnknown(
        f"lost the connection to {address} after sending {what}; it may or may not have "
        f"been applied ({exc})",
        address,
    )


class _DriverBase:
    def __init__(self, client: Any, address: str) -> None:
        self.client = client
        self.address = address
        self._conns = _connections(client)

    @property
    def conns(self) -> _Connections:
        """This process's connections: a forked child never borrows those its parent set
        aside (both would write on one socket and read each other's answers)."""
        conns = self._conns
        if conns.pid != _Process.pid:
            conns = self._conns = _connections(self.client)
        return conns

    def _keep(self, conn: Any) -> bool:
        """Whether a connection given back is kept aside (else it goes back to the pool): at
        most ``_KEEP_IDLE`` of them, in this process's connections (:attr:`conns`)."""
        conns = self.conns
        if len(conns.idle) < _KEEP_IDLE:
            conns.idle.append(conn)
            return True
        return False

    def _settled(self, batch: Batch, replies: list[Any]) -> tuple[list[Any], list[int]]:
        """A batch's answers with the errors translated, and the scripts that did not run."""
        again = [i for i, reply in enumerate(replies) if isinstance(reply, _NOT_RUN)]
        return [
            translated(r, self.address) if isinstance(r, Exception) else r for r in replies
        ], again


class _DriverIO(_DriverBase):
    """The blocking driver's I/O: connections borrowed and given back in the calling
    thread."""

    def __init__(
        self, client: Any, address: str, sleep: Callable[[float], object] | None = None
    ) -> None:
        super().__init__(client, address)
        self.sleep = sleep
        # called between sending a command and reading its answer, with a check of whether
        # the answer is there already: work that can overlap the server's (a map applies its
        # waiting change messages there, unless the answer is in). Must not raise.
        self.while_waiting: Callable[[Callable[[], bool]], object] | None = None

    def _borrow(self) -> Any:
        """A connected connection: a kept one (reconnected if the server closed it or it holds
        unread data), else one from the pool. Connecting sends nothing of the command, so its
        errors are plain :class:`ServerUnavailable`."""
        conns = self.conns
        try:
            conn = conns.idle.pop()
        except IndexError:
            return conns.pool.get_connection()
        if _readable(conn):  # idle, yet readable: the server closed it or sent something unasked
            conn.disconnect()
        if sock_of(conn) is None:
            try:
                conn.connect()
            except BaseException:
                self._give_back(conn)
                raise
        return conn

    def _roundtrip(self, conn: Any, args: Any, then: tuple[Any, ...] | None) -> Any:
        if isinstance(args, list):  # a batch: every answer, errors included
            conn.send_packed_command(_packed(conn, args), check_health=False)
            _sent(conn, args)
            if self.while_waiting is not None:
                self.while_waiting(lambda: _readable(conn))
            replies: list[Any] = []
            for _ in args:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        if then is not None:
            conn.send_packed_command(_pack(conn, args, then), check_health=False)
            try:
                first = conn.read_response()
            except redis.ResponseError:
                conn.disconnect()  # (the server drops the blocked command with it)
                raise
            try:
                return first, conn.read_response(timeout=_blocking_wait(conn, then))
            except redis.ConnectionError:
                conn.disconnect()
                return first, None  # the wait's answer is lost: as if it had timed out
        conn.send_packed_command(_pack(conn, args), check_health=False)
        wait = _blocking_wait(conn, args)
        if wait is None:
            if self.while_waiting is not None:
                self.while_waiting(lambda: _readable(conn))
            return conn.read_response()
        return conn.read_response(timeout=wait)

    def _give_back(self, conn: Any) -> None:
        if not self._keep(conn):
            self._release(conn)

    def _release(self, conn: Any) -> None:
        self.conns.pool.release(conn)

    def _sleep(self, seconds: float) -> None:
        if self.sleep is not None:
            self.sleep(seconds)
        else:
            time.sleep(max(0.0, seconds))

    @staticmethod
    def _disconnect(conn: Any) -> None:
        conn.disconnect()

    def _discard(self, conn: Any) -> None:
        """A connection interrupted mid-command: closed, then given back."""
        conn.disconnect()
        self._give_back(conn)


_CANCELS: contextvars.ContextVar[int] = contextvars.ContextVar("syncmap_cancels", default=0)


def _raise_swallowed_cancel() -> None:
    """Re-raise a cancellation that redis-py swallowed.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py wraps around every send) returns the
    result instead of raising when the task is cancelled just as the send completes; the
    cancel request stays pending (``Task.cancelling()``) but nothing raises it, and a
    cancelled call would go on. Compared with the count when the flow started, so a flow run
    while a cancellation is already propagating (a release in ``async with``) proceeds.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > _CANCELS.get():
        raise asyncio.CancelledError


def _send(conn: Any, packed: Any) -> Awaitable[None] | None:
    """``conn.send_packed_command(packed, check_health=False)``, without what it costs per
    write on Python 3.11: its ``asyncio.wait_for`` runs the write in a new task (two more
    turns of the event loop for the caller). The write goes to the transport, which never
    blocks: ``None`` when it is done, else what to await (``if (sending := _send(...)) is not
    None: await sending``; no coroutine on the common path). Only a write that leaves data in
    the transport's buffer (a big batch) waits for it to drain, within the connection's
    ``socket_timeout``. A connection class with a send of its own (a cluster's: see
    ``_cluster``) or not connected yet goes through redis-py."""
    if type(conn).send_packed_command is not PLAIN_ASYNC_SEND or not conn.is_connected:
        return conn.send_packed_command(packed, check_health=False)  # type: ignore[no-any-return]
    writer = writer_of(conn)
    transport = writer.transport
    if transport.is_closing():  # (uvloop refuses such a write with a bare RuntimeError)
        return _closed_before_write(conn)
    transport.write(packed[0] if len(packed) == 1 else b"".join(packed))
    if transport.get_write_buffer_size():
        return _drain(conn, writer)
    return None


async def _closed_before_write(conn: Any) -> None:
    await conn.disconnect(nowait=True)
    raise redis.asyncio.ConnectionError("Connection closed by the server before write")


async def _drain(conn: Any, writer: Any) -> None:
    try:
        async with asyncio.timeout(conn.socket_timeout):
            await writer.drain()
    except (OSError, TimeoutError) as exc:
        await conn.disconnect(nowait=True)
        if isinstance(exc, TimeoutError):
            raise redis.asyncio.TimeoutError("Timeout writing to socket") from None
        raise redis.asyncio.ConnectionError(f"Error while writing to socket: {exc}") from exc


class _ReadTimer:
    """What ``asyncio.timeout`` does for a connection's reads, for a fraction of its cost:
    one timer per connection, armed once and moved forward only when it comes due (a read
    writes its deadline; it creates and cancels no timer of its own). When it comes due
    during a read whose deadline has passed, it cancels the reading task; ``expired(exc)``
    tells that cancellation from any other one (and makes the task's cancel count whole
    again)."""

    __slots__ = ("base", "deadline", "fired", "handle", "loop", "task", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None  # the task reading now
        self.base = 0
        self.deadline = self.when = 0.0
        self.fired = False
        self.handle: asyncio.TimerHandle | None = None

    @staticmethod
    def of(conn: Any) -> _ReadTimer | None:
        """The connection's timer, started for a read within its ``socket_timeout``
        (``None``: no timeout, or not in a task)."""
        seconds = conn.socket_timeout
        task = asyncio.current_task()
        if seconds is None or task is None:
            return None
        loop = task.get_loop()
        timer: _ReadTimer | None = conn.__dict__.get("_syncmap_timer")
        if timer is None or timer.loop is not loop:
            timer = conn._syncmap_timer = _ReadTimer(loop)
        timer.start(task, loop.time() + seconds)
        return timer

    def start(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.base = task.cancelling()
        self.fired = False
        self.deadline = deadline
        if self.handle is None or deadline < self.when:
            if self.handle is not None:
                self.handle.cancel()
            self.when = deadline
            self.handle = self.loop.call_at(deadline, self._due)

    def _due(self) -> None:
        self.handle = None
        task = self.task
        if task is None:  # no read now: the next one arms it again
            return
        if self.loop.time() < self.deadline:  # a later read's: wait until its deadline
            self.when = self.deadline
            self.handle = self.loop.call_at(self.deadline, self._due)
            return
        self.fired = True
        task.cancel()

    def expired(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this timer's cancellation (and no one else's as well)."""
        if not self.fired or not isinstance(exc, asyncio.CancelledError):
            return False
        assert self.task is not None
        return self.task.uncancel() <= self.base

    def stop(self) -> None:
        """The read is over (the timer stays armed for the next one)."""
        self.task = None


async def _reply(conn: Any) -> Any:
    """``await conn.read_response()``, with fewer layers on its common path: a connection of
    redis-py's own class with the hiredis parser is read straight from the parser, within the
    connection's ``socket_timeout`` (:class:`_ReadTimer`; a push frame in between goes to the
    parser's push handler, as redis-py does); on any failure the connection is closed and the
    error is redis-py's (``ConnectionError``, ``TimeoutError``), as ``read_response`` does.
    Any other connection goes through ``read_response``."""
    parser = parser_of(conn)
    if (
        type(parser) is not HIREDIS_PARSER
        or type(conn).read_response is not PLAIN_ASYNC_READ
        or not parser_connected(parser)
    ):
        return await conn.read_response()
    reader = parser_reader(parser)
    push = push_type(parser)
    try:
        reply = reader.gets()  # (a batch's later answers are often in already)
    except BaseException:  # (a protocol error: what is left in the buffer cannot be used)
        await conn.disconnect(nowait=True)
        raise
    if reply is NOT_ENOUGH_DATA or (push is not None and isinstance(reply, push)):
        timer = _ReadTimer.of(conn)
        try:
            while True:
                if reply is NOT_ENOUGH_DATA:
                    await parser.read_from_socket()
                elif push is not None and isinstance(reply, push):
                    await parser.handle_push_response(reply)
                else:
                    break
                reply = reader.gets()
        except BaseException as exc:
            expired = timer is not None and timer.expired(exc)
            await conn.disconnect(nowait=True)
            if expired:
                raise redis.asyncio.TimeoutError(f"Timeout reading from {conn.host}") from None
            if isinstance(exc, OSError):
                raise redis.asyncio.ConnectionError(f"Error while reading: {exc}") from exc
            raise
        finally:
            if timer is not None:
                timer.stop()
    if isinstance(reply, redis.asyncio.ResponseError | redis.asyncio.ConnectionError):
        raise reply
    return reply


class _AsyncDriverIO(_DriverBase):
    """The asyncio driver's I/O: connections borrowed and given back awaiting, the transport
    written and the hiredis parser read directly (``_send``, ``_reply``)."""

    check: Callable[[], object] | None = None
    """Called before each flow runs (a lock's: its asyncio node's fork check)."""

    async def _give_back(self, conn: Any) -> None:
        if not self._keep(conn):
            await self._release(conn)

    async def _release(self, conn: Any) -> None:
        await self.conns.pool.release(conn)

    async def _borrow(self) -> Any:
        conns = self.conns
        try:
            conn = conns.idle.pop()
        except IndexError:
            # checked too: redis-py 8.1's asyncio pool skips its own check while its
            # maintenance notifications are "auto" (the default), and hands out connections
            # the server has closed
            conn = await conns.pool.get_connection()
        try:
            # can_read() sees only what the loop has read already: a close the loop has not
            # processed yet (it arrived while the loop ran other callbacks) is found by polling
            # the transport's socket itself. A closing transport drops what is written: never
            # an EOF after a reset, and on uvloop's TLS transport none before connection_lost.
            # Checked after can_read(), which may yield to the loop: from here to the send
            # nothing does, so the transport cannot start closing in between (uvloop would then
            # refuse the write with a bare RuntimeError)
            dirty = conn.is_connected and (
                await conn.can_read()
                or (transport := writer_of(conn).transport).is_closing()
                or _polled(conn, transport.get_extra_info("socket"))
            )
        except (redis.asyncio.ConnectionError, OSError):
            dirty = True
        if dirty:
            await conn.disconnect(nowait=True)
        if conn.is_connected:
            return conn
        try:
            await conn.connect()
        except BaseException:
            await conns.pool.release(conn)
            raise
        return conn

    @staticmethod
    async def _roundtrip(conn: Any, args: Any, then: tuple[Any, ...] | None) -> Any:
        if isinstance(args, list):  # a batch: every answer, errors included
            if (sending := _send(conn, _packed(conn, args))) is not None:
                await sending
            _sent(conn, args)
            replies: list[Any] = []
            for _ in args:
                try:
                    replies.append(await _reply(conn))
                except redis.asyncio.ResponseError as exc:
                    replies.append(exc)
            return replies
        if then is not None:
            if (sending := _send(conn, _pack(conn, args, then))) is not None:
                await sending
            try:
                first = await _reply(conn)
            except redis.asyncio.ResponseError:
                await conn.disconnect(nowait=True)  # (the server drops the blocked command)
                raise
            try:
                return first, await AsyncDriver._read(conn, then)
            except redis.asyncio.ConnectionError:
                await conn.disconnect(nowait=True)
                return first, None  # the wait's answer is lost: as if it had timed out
        if (sending := _send(conn, _pack(conn, args))) is not None:
            await sending
        if args[0] != "BLPOP":  # (the common case: no layer of _read's in between)
            return await _reply(conn)
        return await AsyncDriver._read(conn, args)

    @staticmethod
    async def _read(conn: Any, args: tuple[Any, ...]) -> Any:
        """The answer to ``args``, sent already (a blocking command's within its wait)."""
        wait = _blocking_wait(conn, args)
        if wait is None:
            return await _reply(conn)
        try:
            async with asyncio.timeout(wait):
                return await conn.read_response(timeout=math.inf)
        except TimeoutError:
            message = f"no answer to {args[0]} within {wait:.1f} s"
            raise redis.asyncio.TimeoutError(message) from None

    @staticmethod
    async def _sleep(seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    @staticmethod
    async def _disconnect(conn: Any) -> None:
        await conn.disconnect(nowait=True)

    async def _discard(self, conn: Any) -> None:
        """A connection interrupted mid-command: back to the pool (redis-py closes the
        connection on any error mid-command, cancellation too)."""
        await self.conns.pool.release(conn)


# The drivers' flow running: written once for asyncio; the blocking one is generated from it.


# unasync: source driver
class AsyncDriver(_AsyncDriverIO):
    """The asyncio twin of :class:`SyncDriver` (same connection handling, awaited)."""

    async def perform(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            await self._sleep(op.seconds)
            return None
        first = _command(op)
        if isinstance(op, Batch):
            try:
                replies = await self._call(op, first)
                unknown = _unknown_scripts(replies)
                if unknown:  # (a restarted server, say) all sent again at once, as EVAL
                    evals = [eval_instead(op.scripts[i], first[i]) for i in unknown]
                    for i, reply in zip(unknown, await self._call(op, evals), strict=True):
                        replies[i] = reply
            except Exception as exc:
                raise translated(exc, self.address) from exc
            replies, again = self._settled(op, replies)
            for i in again:  # redirected: on their own (see _cluster)
                try:
                    replies[i] = await self.perform(op.scripts[i])
                except Exception as exc:
                    replies[i] = exc
            return replies
        try:
            try:
                return await self._call(op, first)
            except NoScriptError:
                if not isinstance(op, Script):
                    raise
                return await self._call(op, eval_instead(op, first))
        except Exception as exc:
            raise translated(exc, self.address) from exc

    async def _call(self, op: Command | Script | Batch, args: Any) -> Any:
        conn = await self._borrow()
        try:
            try:
                reply = await self._roundtrip(conn, args, _then(op))
            except (redis.asyncio.ConnectionError, redis.asyncio.TimeoutError) as exc:
                await self._disconnect(conn)
                if not op.idempotent:
                    raise _unknown(op, exc, self.address) from exc
                if isinstance(exc, redis.asyncio.TimeoutError):
                    raise
                reply = await self._roundtrip(conn, args, _then(op))
        except redis.asyncio.ResponseError:
            await self._give_back(conn)
            raise
        except BaseException:
            await self._discard(conn)
            raise
        if not self._keep(conn):  # (_give_back, without a coroutine on the common path)
            await self._release(conn)
        _raise_swallowed_cancel()  # unasync: drop
        return reply

    async def run(self, flow: Flow[T]) -> T:
        """Run ``flow``: perform each operation it yields, send back the result (or throw
        the error), until it returns."""
        if self.check is not None:  # unasync: drop
            self.check()  # unasync: drop
        task = asyncio.current_task()  # unasync: drop
        baseline = _CANCELS.set(task.cancelling() if task is not None else 0)  # unasync: drop
        try:
            op = next(flow)
            while True:
                try:
                    result = await self.perform(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:  # unasync: drop
            _CANCELS.reset(baseline)  # unasync: drop


# unasync: end


# unasync: generated driver (from the asyncio code by scripts/unasync.py: do not edit)
class SyncDriver(_DriverIO):
    """Runs flows in the calling thread. ``sleep`` replaces ``Sleep`` (e.g. a watchdog waits
    on an event that a release sets)."""

    def perform(self, op: Op) -> Any:
        if isinstance(op, Sleep):
            self._sleep(op.seconds)
            return None
        first = _command(op)
        if isinstance(op, Batch):
            try:
                replies = self._call(op, first)
                unknown = _unknown_scripts(replies)
                if unknown:  # (a restarted server, say) all sent again at once, as EVAL
                    evals = [eval_instead(op.scripts[i], first[i]) for i in unknown]
                    for i, reply in zip(unknown, self._call(op, evals), strict=True):
                        replies[i] = reply
            except Exception as exc:
                raise translated(exc, self.address) from exc
            replies, again = self._settled(op, replies)
            for i in again:  # redirected: on their own (see _cluster)
                try:
                    replies[i] = self.perform(op.scripts[i])
                except Exception as exc:
                    replies[i] = exc
            return replies
        try:
            try:
                return self._call(op, first)
            except NoScriptError:
                if not isinstance(op, Script):
                    raise
                return self._call(op, eval_instead(op, first))
        except Exception as exc:
            raise translated(exc, self.address) from exc

    def _call(self, op: Command | Script | Batch, args: Any) -> Any:
        conn = self._borrow()
        try:
            try:
                reply = self._roundtrip(conn, args, _then(op))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._disconnect(conn)
                if not op.idempotent:
                    raise _unknown(op, exc, self.address) from exc
                if isinstance(exc, redis.TimeoutError):
                    raise
                reply = self._roundtrip(conn, args, _then(op))
        except redis.ResponseError:
            self._give_back(conn)
            raise
        except BaseException:
            self._discard(conn)
            raise
        if not self._keep(conn):  # (_give_back, without a coroutine on the common path)
            self._release(conn)
        return reply

    def run(self, flow: Flow[T]) -> T:
        """Run ``flow``: perform each operation it yields, send back the result (or throw
        the error), until it returns."""
        try:
            op = next(flow)
            while True:
                try:
                    result = self.perform(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


# unasync: end
