"""Distributed locks on Redis/Valkey: :class:`Lock` (blocking) and :class:`AsyncLock` (asyncio).

Both are thin shells over the flows in :mod:`syncmap._core.lock` (wire format, fencing, fair
hand-off and the waiter queue are documented there). What differs between the two shells is
only how they wait: a blocked thread vs. an awaiting task, a watchdog thread vs. a task, and
how an interrupted call (KeyboardInterrupt, task cancellation) cleans up.

Lock commands run through :mod:`syncmap._driver` (kept connections, no redis-py pool per
command). Every lock script is idempotent for a given value, so the driver may resend one
whose connection failed before the answer: a retry cannot take or release twice.

Semantics worth knowing:

* ``release()`` forgets the token only after the server answered. A release interrupted by a
  lost connection or by cancellation can be retried; if the first attempt did reach the
  server, the retry sees the ``released`` marker of that token and succeeds.
* ``acquire(blocking=True)`` queues: locks are handed over in arrival order, directly from
  releaser to waiter. ``acquire(blocking=False)`` and ``obtain()`` without retries take a free
  lock only if no live waiter is queued before them.
* ``obtain()`` follows bsm/redislock: a :mod:`retry strategy <syncmap._core.retry>`, and by
  default it gives up when the TTL has passed; it raises :class:`NotObtained`.
* Auto-renew (``auto_renew=True``) renews every TTL/3, at most until ``max_hold`` seconds
  after the acquisition; a lock found gone sets :attr:`Lock.lost` and calls ``on_lost(lock)``
  (from the watchdog thread or task). Leaving a ``with`` block whose lock was lost or had
  expired raises :class:`LockLost` (unless the block is already raising).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._core.keys import PREFIX, validate_name
from ._core.lock import (
    TOKEN_LENGTH,
    LockKeys,
    LockState,
    acquire_flow,
    check_metadata,
    check_names,
    check_timeout,
    check_token,
    check_ttl,
    leave_flow,
    locked_flow,
    new_token,
    owned_flow,
    pttl_flow,
    refresh_flow,
    release_flow,
    watchdog_flow,
)
from ._core.ops import Flow
from ._core.retry import NoRetry, RetryStrategy, check_strategy
from ._core.validate import check_seconds
from ._driver import AsyncDriver, SyncDriver
from ._errors import InvalidArgument, LockLost, LockNotHeld, NotObtained
from ._stats import registry

if TYPE_CHECKING:
    from ._node import AsyncNode, Node

__all__ = [
    "AsyncLock",
    "Lock",
    "list_locks",
    "obtain",
    "obtain_async",
    "obtain_multi",
    "obtain_multi_async",
]

T = TypeVar("T")
N = TypeVar("N")
L = TypeVar("L", bound="_LockBase[Any]")

DEFAULT_TTL = 30.0
DEFAULT_POLL_INTERVAL = 0.25


# -- the shared shell --------------------------------------------------------------------------


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a bool, not {type(value).__name__}")
    return value


class _LockBase(Generic[N]):
    """What :class:`Lock` and :class:`AsyncLock` share: options, checks, state and flows."""

    def __init__(
        self,
        node: N,
        name: str | tuple[str, ...],
        ttl: float = DEFAULT_TTL,
        *,
        metadata: str = "",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        auto_renew: bool = False,
        max_hold: float | None = None,
        on_lost: Callable[[Any], object] | None = None,
    ) -> None:
        names = (
            check_names(name) if isinstance(name, tuple) else (validate_name(name, "lock name"),)
        )
        self._state = LockState(LockKeys(names), check_ttl(ttl), check_metadata(metadata))
        self._poll = check_seconds(poll_interval, "poll_interval")
        self._auto_renew = _check_bool(auto_renew, "auto_renew")
        if max_hold is not None:
            check_ttl(max_hold, "max_hold")
        if on_lost is not None and not callable(on_lost):
            raise InvalidArgument(f"on_lost must be callable, not {type(on_lost).__name__}")
        self._max_hold = max_hold
        self._on_lost = on_lost
        self._node = node
        self._last_token: str | None = None  # the latest acquisition's token
        self._lost_token: str | None = None  # the latest acquisition the watchdog found lost
        # what stops the running watchdog, if any (its thread's event, or its task's cancel)
        self._stop_watch: Callable[[], object] | None = None
        _LOCKS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent holds the lock, not the child. The child forgets the
        acquisition (it cannot release or renew it: ``LockNotHeld``; ``owned()`` is False;
        ``locked()`` still tells whether anyone holds it), and no watchdog runs here (the
        parent's thread or task: none runs in the child)."""
        token = self._state.token
        if token is not None:
            self._state.forget(token)
        self._last_token = None
        self._stop_watch = None

    # -- what a holder (and a guarded map write) reads --

    @property
    def key(self) -> str:
        """The server key of the lock (the name as given; the first one of a multi-key lock)."""
        return self._state.keys.names[0]

    @property
    def keys(self) -> tuple[str, ...]:
        return self._state.keys.names

    @property
    def token(self) -> str | None:
        """The current acquisition's token (the value's prefix), ``None`` when not held."""
        return self._state.token

    @property
    def metadata(self) -> str:
        return self._state.metadata

    @property
    def fence(self) -> int | None:
        """The current acquisition's fencing number: larger than every earlier one."""
        return self._state.fence

    @property
    def fences(self) -> tuple[int, ...]:
        """One fencing number per key (multi-key locks)."""
        return self._state.fences

    @property
    def lost(self) -> bool:
        """Whether the watchdog found the latest acquisition lost (expired or taken)."""
        return self._lost_token is not None and self._lost_token == self._last_token

    def __repr__(self) -> str:
        held = f"held, fence={self.fence}" if self.token else "not held"
        return f"<{type(self).__name__} {self.key!r} {held}>"

    # -- flows --

    def _plan(
        self,
        blocking: bool,
        timeout: float,
        retry: RetryStrategy | None = None,
        token: str | None = None,
    ) -> tuple[str, Iterator[float], float | None]:
        """The acquisition's token (``token``, else a new random one), its backoffs, its
        deadline."""
        wait = check_timeout(blocking, timeout)
        if retry is not None:
            backoffs: Iterator[float] = iter(retry)
        else:
            backoffs = repeat(self._poll) if blocking else iter(())
        deadline = None if wait is None else time.monotonic() + wait
        return token or new_token(), backoffs, deadline

    def _acquire_flow(
        self, token: str, backoffs: Iterator[float], deadline: float | None
    ) -> Flow[bool]:
        return acquire_flow(self._state, token, backoffs, deadline, time.monotonic)

    def _watch(self, token: str) -> Flow[None]:
        """The watchdog of the acquisition ``token`` (run by a thread or a task): renew it
        until it is released; mark it lost if it was, or if renewals stopped (an error: the
        lease will run out)."""
        try:
            lost = yield from watchdog_flow(self._state, token, time.monotonic, self._max_hold)
        except Exception:
            lost = True
        if lost:
            self._mark_lost(token)

    def _stopper(self) -> Callable[[], object] | None:
        """What stops the running watchdog, if any."""
        return self._stop_watch

    def _mark_lost(self, token: str) -> None:
        if self._state.token != token:
            return
        self._lost_token = token
        registry.lock(self.key).lost_hold()
        if self._on_lost is not None:
            self._on_lost(self)

    def _acquired(self, token: str, started: float) -> None:
        self._last_token = token
        registry.lock_acquired(self.key, time.monotonic() - started)

    def _found_gone(self, token: str | None) -> None:
        """A release (of the acquisition ``token``) found the hold gone (expired or taken): a
        lost hold, unless the watchdog counted it already."""
        if token is not None and self._lost_token != token:
            registry.lock(self.key).lost_hold()

    def _left(self, token: str | None, exc: BaseException | None, gone: bool) -> None:
        """After the release that ends a ``with`` block (``gone``: it raised LockNotHeld):
        :class:`LockLost` if the lock was lost meanwhile (only when the block itself is not
        raising). ``token`` is the acquisition held on entering the release: another thread
        (task) sharing this object may take the lock as soon as it is released."""
        if exc is not None:
            return
        if gone:
            raise LockLost(f"lock {self.key!r} expired or was taken during the block") from None
        if token is not None and self._lost_token == token:
            raise LockLost(f"lock {self.key!r} was lost during the block")


class _LockShell(_LockBase["Node"]):
    """How a blocking lock waits: in the calling thread, with a watchdog thread."""

    def __init__(
        self, node: Node, name: str | tuple[str, ...], ttl: float = DEFAULT_TTL, **options: Any
    ) -> None:
        super().__init__(node, name, ttl, **options)
        self._run = SyncDriver(node.client, node.address).run

    def _leave(self, token: str) -> None:
        """An interrupted acquisition leaves the queue (best effort)."""
        with contextlib.suppress(Exception):
            self._run(leave_flow(self._state, token))

    def _start_watchdog(self, token: str) -> None:
        stop = threading.Event()
        self._stop_watch = stop.set
        run = SyncDriver(self._node.client, self._node.address, stop.wait).run
        threading.Thread(
            target=run,
            args=(self._watch(token),),
            name=f"syncmap-lock-watchdog:{self.key}",
            daemon=True,
        ).start()


class _AsyncLockShell(_LockBase["AsyncNode"]):
    """How an asyncio lock waits: awaiting, with a watchdog task."""

    def __init__(
        self, node: AsyncNode, name: str | tuple[str, ...], ttl: float = DEFAULT_TTL, **options: Any
    ) -> None:
        super().__init__(node, name, ttl, **options)
        driver = AsyncDriver(node.client, node.address)
        driver.check = node._check_fork  # an asyncio node does not cross a fork: NodeForked
        self._run = driver.run

    async def _leave(self, token: str) -> None:
        """An interrupted acquisition leaves the queue (best effort), even when the
        interruption is a cancellation."""
        cleanup = asyncio.ensure_future(self._run(leave_flow(self._state, token)))
        with contextlib.suppress(BaseException):
            await asyncio.shield(cleanup)

    def _start_watchdog(self, token: str) -> None:
        task = asyncio.create_task(self._run(self._watch(token)))
        self._stop_watch = task.cancel  # (and a reference: the loop keeps only a weak one)


# The public locks: written once for asyncio; the blocking one is generated from it.


# unasync: source lock
class AsyncLock(_AsyncLockShell):
    """The asyncio form of :class:`Lock`: ``await lock.acquire()``, ``async with lock:``."""

    async def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; with ``blocking`` wait (in queue order) up to ``timeout`` seconds."""
        return await self._acquire(*self._plan(blocking, timeout))

    async def _acquire(self, token: str, backoffs: Iterator[float], deadline: float | None) -> bool:
        started = time.monotonic()
        try:
            got = await self._run(self._acquire_flow(token, backoffs, deadline))
        except BaseException:
            if len(self.keys) == 1:
                await self._leave(token)
            raise
        if got:
            self._acquired(token, started)
            if self._auto_renew:
                self._start_watchdog(token)
        return got

    async def release(self) -> None:
        """Release; raises :class:`LockNotHeld` if it expired or was taken meanwhile."""
        stop = self._stopper()
        token = self._state.token
        try:
            await self._run(release_flow(self._state))
        except LockNotHeld:
            self._found_gone(token)
            raise
        if stop is not None:
            stop()

    async def refresh(self, ttl: float | None = None) -> None:
        """Extend the lock to ``ttl`` seconds (default: its TTL) from now."""
        await self._run(refresh_flow(self._state, None if ttl is None else check_ttl(ttl)))

    async def ttl(self) -> float:
        """Remaining seconds of the lock; 0.0 when it is not held (by this holder)."""
        return max(0, await self._run(pttl_flow(self._state))) / 1000

    async def owned(self) -> bool:
        """Whether this holder holds it now (asks the server)."""
        return await self._run(owned_flow(self._state))

    async def locked(self) -> bool:
        """Whether anyone holds it now (asks the server)."""
        return await self._run(locked_flow(self._state))

    async def __aenter__(self) -> AsyncLock:
        await self.acquire()
        return self

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        token = self._state.token
        try:
            await self.release()
        except LockNotHeld:
            self._left(token, exc, gone=True)
            return
        self._left(token, exc, gone=False)


# unasync: end


# unasync: generated lock (from the asyncio code by scripts/unasync.py: do not edit)
class Lock(_LockShell):
    """A distributed lock with ``threading.Lock``'s protocol (``acquire``/``release``/``with``).

    Make one with ``node.lock(name, ttl=30.0, ...)``; ``node.obtain(name, ttl)`` returns one
    already held. Options: ``metadata`` (stored after the token, as redislock does),
    ``poll_interval`` (fallback poll while queued; wake-ups are pushed on release),
    ``auto_renew``/``max_hold``/``on_lost`` (watchdog).
    """

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; with ``blocking`` wait (in queue order) up to ``timeout`` seconds."""
        return self._acquire(*self._plan(blocking, timeout))

    def _acquire(self, token: str, backoffs: Iterator[float], deadline: float | None) -> bool:
        started = time.monotonic()
        try:
            got = self._run(self._acquire_flow(token, backoffs, deadline))
        except BaseException:
            if len(self.keys) == 1:
                self._leave(token)
            raise
        if got:
            self._acquired(token, started)
            if self._auto_renew:
                self._start_watchdog(token)
        return got

    def release(self) -> None:
        """Release; raises :class:`LockNotHeld` if it expired or was taken meanwhile."""
        stop = self._stopper()
        token = self._state.token
        try:
            self._run(release_flow(self._state))
        except LockNotHeld:
            self._found_gone(token)
            raise
        if stop is not None:
            stop()

    def refresh(self, ttl: float | None = None) -> None:
        """Extend the lock to ``ttl`` seconds (default: its TTL) from now."""
        self._run(refresh_flow(self._state, None if ttl is None else check_ttl(ttl)))

    def ttl(self) -> float:
        """Remaining seconds of the lock; 0.0 when it is not held (by this holder)."""
        return max(0, self._run(pttl_flow(self._state))) / 1000

    def owned(self) -> bool:
        """Whether this holder holds it now (asks the server)."""
        return self._run(owned_flow(self._state))

    def locked(self) -> bool:
        """Whether anyone holds it now (asks the server)."""
        return self._run(locked_flow(self._state))

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        token = self._state.token
        try:
            self.release()
        except LockNotHeld:
            self._left(token, exc, gone=True)
            return
        self._left(token, exc, gone=False)


# unasync: end


_LOCKS: weakref.WeakSet[_LockBase[Any]] = weakref.WeakSet()


def _locks_forked() -> None:
    for lock in list(_LOCKS):
        lock._after_fork()


os.register_at_fork(after_in_child=_locks_forked)


# -- redislock's Obtain ------------------------------------------------------------------------
# obtain*(node, key(s), ttl, retry=NoRetry(), timeout=<ttl>, **lock options): a held lock, or
# NotObtained. ``retry`` paces further attempts until ``timeout`` seconds have passed (by
# default the TTL, as in redislock); a queued attempt is woken as soon as it is its turn.


def _obtaining(
    kind: type[L], node: Any, name: str | tuple[str, ...], ttl: float, options: dict[str, Any]
) -> tuple[L, tuple[str, Iterator[float], float | None]]:
    retry = check_strategy(options.pop("retry", None) or NoRetry())
    timeout = options.pop("timeout", None)
    token = check_token(options.pop("token", None))
    lock = kind(node, name, ttl, **options)
    wait = lock._state.ttl_ms / 1000 if timeout is None else timeout
    return lock, lock._plan(True, wait, retry, token)


def _multi(keys: object) -> tuple[str, ...]:
    if isinstance(keys, str | bytes) or not isinstance(keys, list | tuple):
        raise InvalidArgument(f"keys must be a list of str, not {type(keys).__name__}")
    return tuple(keys)


def _obtained(lock: L, got: bool) -> L:
    if not got:
        raise NotObtained(f"lock {lock.key!r} is held by someone else")
    return lock


# unasync: source obtain
async def obtain_async(node: AsyncNode, key: str, ttl: float, **options: Any) -> AsyncLock:
    """The asyncio form of :func:`obtain`."""
    lock, plan = _obtaining(AsyncLock, node, key, ttl, options)
    return _obtained(lock, await lock._acquire(*plan))


async def obtain_multi_async(
    node: AsyncNode, keys: list[str], ttl: float, **options: Any
) -> AsyncLock:
    """The asyncio form of :func:`obtain_multi`."""
    lock, plan = _obtaining(AsyncLock, node, _multi(keys), ttl, options)
    return _obtained(lock, await lock._acquire(*plan))


# unasync: end


# unasync: generated obtain (from the asyncio code by scripts/unasync.py: do not edit)
def obtain(node: Node, key: str, ttl: float, **options: Any) -> Lock:
    """redislock's Obtain: a held :class:`Lock`, or :class:`NotObtained`."""
    lock, plan = _obtaining(Lock, node, key, ttl, options)
    return _obtained(lock, lock._acquire(*plan))


def obtain_multi(node: Node, keys: list[str], ttl: float, **options: Any) -> Lock:
    """Obtain every key or none (all in one hash slot, e.g. ``{order:42}:a``)."""
    lock, plan = _obtaining(Lock, node, _multi(keys), ttl, options)
    return _obtained(lock, lock._acquire(*plan))


# unasync: end


# -- listing (the ``syncmap locks`` command) ---------------------------------------------------


def list_locks(node: Node, pattern: str = "*") -> list[dict[str, Any]]:
    """Locks taken through syncmap (they have a fence key) and held now, whose name matches
    the glob ``pattern``: ``name``, ``ttl`` (seconds), ``fence``, ``token``, ``metadata``."""
    prefix = f"{PREFIX}:fence:{{"
    names: list[tuple[str, str]] = []
    for raw in node.client.scan_iter(match=prefix + "*", count=1000):
        fence_key = raw.decode() if isinstance(raw, bytes) else str(raw)
        name = fence_key[fence_key.index("}", len(prefix)) + 2 :]
        if fnmatch.fnmatchcase(name, pattern):
            names.append((name, fence_key))
    names.sort()
    pipe = node.client.pipeline(transaction=False)
    for name, fence_key in names:
        pipe.get(name)
        pipe.pttl(name)
        pipe.hget(fence_key, "n")
    replies = pipe.execute()
    rows: list[dict[str, Any]] = []
    for i, (name, _) in enumerate(names):
        value, pttl, fence = replies[3 * i : 3 * i + 3]
        if value is None:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        rows.append(
            {
                "name": name,
                "ttl": pttl / 1000 if pttl >= 0 else None,
                "fence": int(fence) if fence is not None else None,
                "token": text[:TOKEN_LENGTH],
                "metadata": text[TOKEN_LENGTH:],
            }
        )
    return rows
