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
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import json
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Generic, ParamSpec, TypeVar

from ._errors import InvalidArgument

if TYPE_CHECKING:
    from ._map import AsyncSyncMap, SyncMap

__all__ = ["AsyncCachedFunction", "CachedFunction", "KeyMaker", "cached", "cached_async"]

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
                    f"{self.name}: argument {name!r} holds a {type(exc.value).__name__}, which "
                    "makes no key that is stable across processes; pass key= (a template or "
                    "a callable) to cached()"
                ) from None
        text = f"{self.name}({','.join(parts)})"
        if len(text) > MAX_PLAIN_KEY:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            return f"{self.name}#{digest}"
        return text


class CachedFunction(Generic[P, R]):
    """A function whose results live in a :class:`~syncmap.SyncMap` (``@m.cached(...)``)."""

    def __init__(
        self,
        m: SyncMap,
        fn: Callable[P, R],
        ttl: float | None,
        key: KeyOption,
        timeout: float,
    ) -> None:
        if inspect.iscoroutinefunction(fn):
            raise InvalidArgument(
                f"{fn.__qualname__} is a coroutine function: cache it with an AsyncSyncMap"
            )
        self._map, self._fn, self._ttl, self._timeout = m, fn, ttl, timeout
        self._key = KeyMaker(fn, key)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._key(args, kwargs)
        result: R = self._map.get_or_load(
            k, lambda: self._fn(*args, **kwargs), self._ttl, self._timeout
        )
        return result

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The map key of this call."""
        return self._key(args, kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete this call's entry on every node; True if it was cached."""
        return self._map.delete(self._key(args, kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function now and store its result (for every node)."""
        k = self._key(args, kwargs)
        value = self._fn(*args, **kwargs)
        self._map.set(k, value, self._ttl)
        return value


class AsyncCachedFunction(Generic[P, R]):
    """An ``async def`` whose results live in an :class:`~syncmap.AsyncSyncMap`."""

    def __init__(
        self,
        m: AsyncSyncMap,
        fn: Callable[P, Awaitable[R]],
        ttl: float | None,
        key: KeyOption,
        timeout: float,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise InvalidArgument(
                f"an AsyncSyncMap caches coroutine functions (async def), not "
                f"{getattr(fn, '__qualname__', type(fn).__name__)}"
            )
        self._map, self._fn, self._ttl, self._timeout = m, fn, ttl, timeout
        self._key = KeyMaker(fn, key)
        functools.update_wrapper(self, fn)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._key(args, kwargs)
        result: R = await self._map.get_or_load(
            k, lambda: self._fn(*args, **kwargs), self._ttl, self._timeout
        )
        return result

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._key(args, kwargs)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        return await self._map.delete(self._key(args, kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        k = self._key(args, kwargs)
        value = await self._fn(*args, **kwargs)
        await self._map.set(k, value, self._ttl)
        return value


def _check(ttl: object, key: object, timeout: object) -> None:
    if key is not None and not isinstance(key, str) and not callable(key):
        raise InvalidArgument(
            f"key must be a format string or a callable, not {type(key).__name__}"
        )
    for name, value in (("ttl", ttl), ("timeout", timeout)):
        if value is None and name == "ttl":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidArgument(
                f"cached(): {name} must be a number of seconds > 0, not {value!r}"
            )


def cached(
    m: SyncMap, ttl: float | None, key: KeyOption, timeout: float
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    _check(ttl, key, timeout)

    def decorate(fn: Callable[P, R]) -> CachedFunction[P, R]:
        return CachedFunction(m, fn, ttl, key, timeout)

    return decorate


def cached_async(
    m: AsyncSyncMap, ttl: float | None, key: KeyOption, timeout: float
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], AsyncCachedFunction[P, R]]:
    _check(ttl, key, timeout)

    def decorate(fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncCachedFunction[P, R]:
        return AsyncCachedFunction(m, fn, ttl, key, timeout)

    return decorate
