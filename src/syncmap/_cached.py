"""``@m.cached(...)``: a function's results in a map, computed once across all processes.

The key of a call is the function's module and qualified name plus its arguments, bound to
its signature (so ``f(1, b=2)``, ``f(a=1, b=2)`` and ``f(1)`` with ``b=2`` the default are one
key) and written out canonically: the same call makes the same key in every process, after
every restart. Arguments of these types make keys: None, bool, int, float, str, bytes,
tuple, list, dict, set and frozenset of them, Enum members, datetime/date/time, Decimal,
UUID. Anything else raises :class:`~syncmap.InvalidArgument` before anything runs (``repr()``
and ``hash()`` of arbitrary objects differ between processes or runs); pass ``key=`` then: a
``str.format`` template over the parameter names (``"user:{user_id}"``) or a callable taking
the function's arguments and returning the key. Those keys are used as given.

A call is :meth:`SyncMap.get_or_load`: a local hit when cached; else the function runs in one
process while the others wait for its result (single flight). A cached ``None`` is a hit.
``f.invalidate(*args, **kwargs)`` deletes the entry on every node, ``f.refresh(...)`` runs the
function and stores its result, ``f.key(...)`` is the key of a call.

``early_refresh=beta`` (with a ``ttl``): a hit close to the entry's expiry starts one
recompute in the background (per process and key), with XFetch's probability (see
:class:`_XFetch`), so a hot key is refreshed before it expires and callers keep hitting. The
entry is then stored as ``[value, expiry, delta]``, not as the bare value.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Generic, ParamSpec, TypeVar

from ._core.validate import check_seconds
from ._errors import InvalidArgument

if TYPE_CHECKING:
    from ._map import AsyncSyncMap, SyncMap

__all__ = ["AsyncCachedFunction", "CachedFunction", "KeyMaker", "cached", "cached_async"]

log = logging.getLogger("syncmap.cached")
P = ParamSpec("P")
R = TypeVar("R")
MAX_PLAIN_KEY: Final = 200  # characters: a longer generated key becomes name + SHA-256 of it
KeyOption = str | Callable[..., str] | None


class _Unstable(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


def _encode(value: Any) -> str:
    """One argument's canonical text; :class:`_Unstable` for a type without one."""
    cls = value.__class__
    if value is None or cls is bool or cls is int or cls is str:
        return json.dumps(value, ensure_ascii=False)
    if cls is float:
        return repr(value)  # (shortest round-trip repr: 1.0, 0.1, inf, nan)
    if cls is bytes:
        return f"b'{value.hex()}'"
    if cls is tuple:
        return "(" + ",".join(_encode(v) for v in value) + ")"
    if cls is list:
        return "[" + ",".join(_encode(v) for v in value) + "]"
    if cls is dict:
        items = sorted((_encode(k), _encode(v)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if cls is set or cls is frozenset:
        return (
            "{"
            + ",".join(sorted(_encode(v) for v in value))
            + "}"
            + ("f" if cls is frozenset else "")
        )
    if isinstance(value, enum.Enum):
        return f"{cls.__module__}.{cls.__qualname__}.{value.name}"
    if cls in (datetime.datetime, datetime.date, datetime.time):
        return f"{cls.__name__}({value.isoformat()})"
    if cls is decimal.Decimal or cls is uuid.UUID:
        return f"{cls.__name__}({value})"
    raise _Unstable(value)


class KeyMaker:
    """The keys of one function's calls (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], key: KeyOption) -> None:
        if not callable(fn):
            raise InvalidArgument(f"cached() decorates a function, not {type(fn).__name__}")
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.signature = inspect.signature(fn)
        self.key = key

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        key = self.key
        if callable(key):
            made = key(*args, **kwargs)
            if not isinstance(made, str):
                raise InvalidArgument(
                    f"the key callable of {self.name} returned {type(made).__name__}, not str"
                )
            return made
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"{self.name}: {exc}") from None
        bound.apply_defaults()
        if key is not None:
            try:
                return key.format(**bound.arguments)
            except (KeyError, IndexError, AttributeError, ValueError) as exc:
                raise InvalidArgument(
                    f"key template {key!r} of {self.name} does not fit its arguments: {exc!r}"
                ) from None
        parts = []
        for name, value in bound.arguments.items():
            try:
                parts.append(f"{name}={_encode(value)}")
            except _Unstable as exc:
                raise InvalidArgument(
                    f"{self.name}: argument {name!r} holds a value of type "
                    f"{type(exc.value).__name__}, which makes no key that is stable across "
                    "processes; pass key= (a template or a callable) to cached()"
                ) from None
        text = f"{self.name}({','.join(parts)})"
        if len(text) > MAX_PLAIN_KEY:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            return f"{self.name}#{digest}"
        return text


class _Plain:
    """Results stored as they are."""

    def wrap(self, value: Any, delta: float) -> Any:
        return value

    def unwrap(self, stored: Any) -> tuple[Any, bool]:
        """``(value, due for an early refresh)``."""
        return stored, False


class _XFetch:
    """Early refresh (XFetch: Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache
    Stampede Prevention", VLDB 2015): each entry is stored as ``[value, expiry, delta]``
    (expiry: wall-clock seconds; delta: how long computing it took), and a hit is due for a
    refresh when ``now - delta * beta * ln(rand()) >= expiry``: more likely the closer the
    expiry and the slower the function, so a hot key is recomputed, in the background, before
    it expires."""

    def __init__(self, beta: float, ttl: float) -> None:
        self.beta, self.ttl = beta, ttl

    def wrap(self, value: Any, delta: float) -> Any:
        return [value, time.time() + self.ttl, delta]

    def unwrap(self, stored: Any) -> tuple[Any, bool]:
        if (
            stored.__class__ in (list, tuple)
            and len(stored) == 3
            and stored[1].__class__ in (int, float)
            and stored[2].__class__ in (int, float)
        ):
            value, expiry, delta = stored
            gap = -delta * self.beta * math.log(1.0 - random.random())  # (1 - random(): > 0)
            return value, time.time() + gap >= expiry
        return stored, False  # (written by something else than this decorator)


class _CachedBase(Generic[P, R]):
    """What the blocking and asyncio decorated functions share: the key, the map, the
    options and how results are stored."""

    def __init__(
        self,
        m: Any,
        fn: Callable[P, Any],
        ttl: float | None,
        key: KeyOption,
        timeout: float,
        early_refresh: float | None,
    ) -> None:
        self._map, self._fn, self._ttl, self._timeout = m, fn, ttl, timeout
        self._key = KeyMaker(fn, key)
        self._stored: _Plain | _XFetch = (
            _Plain() if early_refresh is None or ttl is None else _XFetch(early_refresh, ttl)
        )
        self._early: set[str] = set()  # keys being refreshed early by this process
        self._early_lock = threading.Lock()
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]  # (subclasses are called)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The map key of this call."""
        return self._key(args, kwargs)

    def _claim(self, k: str) -> bool:
        """True if this process is not refreshing ``k`` early already (and now is)."""
        with self._early_lock:
            if k in self._early:
                return False
            self._early.add(k)
            return True

    def _failed(self, k: str) -> None:
        log.warning("early refresh of %r failed; the entry stays until it expires", k,
                    exc_info=True)  # fmt: skip


class CachedFunction(_CachedBase[P, R]):
    """A function whose results live in a :class:`~syncmap.SyncMap` (``@m.cached(...)``)."""

    _map: SyncMap

    def __init__(
        self,
        m: SyncMap,
        fn: Callable[P, R],
        ttl: float | None,
        key: KeyOption,
        timeout: float,
        early_refresh: float | None = None,
    ) -> None:
        if inspect.iscoroutinefunction(fn):
            raise InvalidArgument(
                f"{fn.__qualname__} is a coroutine function: cache it with an AsyncSyncMap"
            )
        super().__init__(m, fn, ttl, key, timeout, early_refresh)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._key(args, kwargs)
        stored = self._map.get_or_load(
            k, lambda: self._compute(args, kwargs)[1], self._ttl, self._timeout
        )
        value, due = self._stored.unwrap(stored)
        if due and self._claim(k):
            threading.Thread(
                target=self._refresh_early, args=(k, args, kwargs), daemon=True,
                name=f"syncmap-early-refresh:{k[:40]}",
            ).start()  # fmt: skip
        result: R = value
        return result

    def _compute(self, args: Any, kwargs: Any) -> tuple[R, Any]:
        """The function's result, and what is stored for it."""
        started = time.monotonic()
        value = self._fn(*args, **kwargs)
        return value, self._stored.wrap(value, time.monotonic() - started)

    def _refresh_early(self, k: str, args: Any, kwargs: Any) -> None:
        try:
            self._map.set(k, self._compute(args, kwargs)[1], self._ttl)
        except Exception:
            self._failed(k)
        finally:
            self._early.discard(k)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete this call's entry on every node; True if it was cached."""
        return self._map.delete(self._key(args, kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function now and store its result (for every node)."""
        k = self._key(args, kwargs)
        value, stored = self._compute(args, kwargs)
        self._map.set(k, stored, self._ttl)
        return value


class AsyncCachedFunction(_CachedBase[P, R]):
    """An ``async def`` whose results live in an :class:`~syncmap.AsyncSyncMap`."""

    _map: AsyncSyncMap

    def __init__(
        self,
        m: AsyncSyncMap,
        fn: Callable[P, Awaitable[R]],
        ttl: float | None,
        key: KeyOption,
        timeout: float,
        early_refresh: float | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise InvalidArgument(
                f"an AsyncSyncMap caches coroutine functions (async def), not "
                f"{getattr(fn, '__qualname__', type(fn).__name__)}"
            )
        super().__init__(m, fn, ttl, key, timeout, early_refresh)
        self._tasks: set[asyncio.Task[None]] = set()  # (a running task needs a reference)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._key(args, kwargs)

        async def load() -> Any:
            return (await self._compute(args, kwargs))[1]

        stored = await self._map.get_or_load(k, load, self._ttl, self._timeout)
        value, due = self._stored.unwrap(stored)
        if due and self._claim(k):
            task = asyncio.create_task(
                self._refresh_early(k, args, kwargs), name=f"syncmap-early-refresh:{k[:40]}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        result: R = value
        return result

    async def _compute(self, args: Any, kwargs: Any) -> tuple[R, Any]:
        started = time.monotonic()
        value: R = await self._fn(*args, **kwargs)
        return value, self._stored.wrap(value, time.monotonic() - started)

    async def _refresh_early(self, k: str, args: Any, kwargs: Any) -> None:
        try:
            await self._map.set(k, (await self._compute(args, kwargs))[1], self._ttl)
        except Exception:
            self._failed(k)
        finally:
            self._early.discard(k)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        return await self._map.delete(self._key(args, kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._key(args, kwargs)
        value, stored = await self._compute(args, kwargs)
        await self._map.set(k, stored, self._ttl)
        return value


def _check(ttl: object, key: object, timeout: object, early_refresh: object) -> None:
    if early_refresh is not None:
        if (
            isinstance(early_refresh, bool)
            or not isinstance(early_refresh, int | float)
            or not 0 < early_refresh < math.inf
        ):
            raise InvalidArgument(
                f"cached(): early_refresh must be a number > 0 (XFetch's beta; 1.0 is the "
                f"usual choice), not {early_refresh!r}"
            )
        if ttl is None:
            raise InvalidArgument("cached(): early_refresh needs a ttl (it refreshes before it)")
    if key is not None and not isinstance(key, str) and not callable(key):
        raise InvalidArgument(
            f"key must be a format string or a callable, not {type(key).__name__}"
        )
    if ttl is not None:
        check_seconds(ttl, "cached(): ttl", or_none=True)
    check_seconds(timeout, "cached(): timeout")


def cached(
    m: SyncMap, ttl: float | None, key: KeyOption, timeout: float, early_refresh: float | None
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    _check(ttl, key, timeout, early_refresh)

    def decorate(fn: Callable[P, R]) -> CachedFunction[P, R]:
        return CachedFunction(m, fn, ttl, key, timeout, early_refresh)

    return decorate


def cached_async(
    m: AsyncSyncMap,
    ttl: float | None,
    key: KeyOption,
    timeout: float,
    early_refresh: float | None,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], AsyncCachedFunction[P, R]]:
    _check(ttl, key, timeout, early_refresh)

    def decorate(fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncCachedFunction[P, R]:
        return AsyncCachedFunction(m, fn, ttl, key, timeout, early_refresh)

    return decorate
