"""A Django cache backend on a SyncMap: ``BACKEND = "syncmap.django.SyncMapCache"``.

::

    CACHES = {
        "default": {
            "BACKEND": "syncmap.django.SyncMapCache",
            "LOCATION": "redis://127.0.0.1:6379/0",  # "" : $SYNCMAP_URL, else the embedded server
            "TIMEOUT": 300,
            "OPTIONS": {"name": "django", "max_staleness": 1.0, "maxsize": 100_000},
        }
    }

Every process keeps a coherent local copy of the cache (its contract: docs/contract.md): a
``get`` of a cached key is served from memory, and a write anywhere reaches every process's
copy within ``max_staleness``.

* Django makes a backend instance per thread (and async context) and calls ``close()`` after
  each request. All instances of one process with the same LOCATION and OPTIONS share one
  node and one map, opened at their first use (not at import: a ``--preload``-ed gunicorn
  master forks before any connection exists, unless the app uses the cache while it loads);
  a forked child opens its own. ``close()`` does nothing.
* Values are pickled, as by every Django backend, except ints (up to 2**53), which are stored
  as decimal text so that ``incr``/``decr`` run on the server. The local copy keeps values of
  mutable types pickled and every read unpickles a fresh object, as Django's backends return
  one: changing what ``get`` returned never changes the cache. Anyone who can write to the
  server can therefore run code in every process that reads from it: use a server only your
  application can write to (a password, ACLs, TLS across machines).
* ``add``, ``incr``/``decr`` and ``touch`` are atomic on the server; ``get_or_set`` with a
  callable runs it once across all processes (``SyncMap.get_or_load``).
* Timeouts follow Django's rules: ``DEFAULT_TIMEOUT`` is the cache's ``TIMEOUT``, ``None``
  never expires, 0 or negative expires at once (``set`` deletes the key). Fractions of a
  second are kept (ms).
* ``clear()`` removes this cache's map only (not the server's other data).
* The keys Django makes (KEY_FUNCTION, KEY_PREFIX, VERSION) are remembered per instance, up
  to 4096 without a validation warning: a KEY_FUNCTION must be a pure function of its
  arguments (as Django assumes; a key it made is never checked again).

OPTIONS (all optional): ``name`` (the map's name, default ``"django"``), ``max_staleness``,
``maxsize``, ``push_values``, ``on_stale``, ``max_key_bytes`` (default 16384),
``max_value_bytes`` (default 16 MiB), ``codec`` (default: pickle with int counters),
``load_timeout`` (``get_or_set``'s single flight, default 10 s); any other option goes to
redis-py's client (e.g. ``socket_timeout``, ``password``).

Importing this module imports Django; the rest of syncmap never does.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, memcache_key_warnings

from ._codec import Codec, PickleCodec, get_codec
from ._core.validate import check_seconds
from ._errors import InvalidArgument
from ._map import SyncMap
from ._node import Node, connect

__all__ = ["DjangoCodec", "Pickled", "SyncMapCache", "close_all"]

_MISSING: Any = object()
_INT: Final = re.compile(rb"-?[0-9]{1,16}")
_IMMUTABLE: Final = frozenset({str, bytes, int, float, bool, complex, type(None)})
_COUNTER_LIMIT: Final = 2**53  # the server's incr works on ints below this (Lua numbers)
MADE_KEYS: Final = 4096  # per instance: (key, version) -> the key made and validated

# the map options a cache's OPTIONS may set, and the backend's defaults for some
_MAP_OPTIONS: Final = (
    "max_staleness",
    "maxsize",
    "push_values",
    "on_stale",
    "max_key_bytes",
    "max_value_bytes",
)
_MAP_DEFAULTS: Final[dict[str, Any]] = {"max_key_bytes": 16384, "max_value_bytes": 16 << 20}


class Pickled:
    """A cached value kept pickled in the local copy: every read unpickles a fresh object,
    as every Django backend returns one (a caller may change what ``get`` returned)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class DjangoCodec:
    """Pickle, as Django's backends store values, except an ``int`` (not a bool) below 2**53
    in magnitude, stored as its decimal text: the server's ``incr`` works on it (as Django's
    Redis backend stores ints unpickled for INCRBY). Decoded values of immutable types are
    kept as they are; others as :class:`Pickled` (see :meth:`value`)."""

    name = "django"
    counters = "json"  # ints are JSON numbers on the server: incr runs there

    def __init__(self) -> None:
        self._pickle = PickleCodec()

    def encode(self, value: Any) -> bytes:
        if value.__class__ is int and -_COUNTER_LIMIT < value < _COUNTER_LIMIT:
            return b"%d" % value
        return self._pickle.encode(value)

    def decode(self, data: bytes) -> Any:
        if _INT.fullmatch(data):  # (a pickle starts with its PROTO opcode, 0x80)
            return int(data)
        value = self._pickle.decode(data)  # (checked here: corrupt data fails the fetch)
        if value.__class__ in _IMMUTABLE:
            return value
        return Pickled(bytes(data))

    def value(self, cached: Any) -> Any:
        """What a read returns for a value of the local copy: a fresh object."""
        if cached.__class__ is Pickled:
            return self._pickle.decode(cached.data)
        return cached


class _Shared:
    """The process's maps, one per (LOCATION, OPTIONS), and their nodes. A forked child
    forgets its parent's (it never uses, nor closes, their connections) and opens its own;
    ``generation`` tells instances that what they hold is gone (a fork, :func:`close_all`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.maps: dict[tuple[Any, ...], tuple[Node, SyncMap]] = {}
        self.generation = 0

    def get(self, key: tuple[Any, ...], open_map: Callable[[], tuple[Node, SyncMap]]) -> SyncMap:
        with self.lock:
            found = self.maps.get(key)
            if found is None:
                found = self.maps[key] = open_map()
        return found[1]

    def forget(self) -> None:
        """In a forked child: the parent's maps are not ours."""
        self.lock = threading.Lock()
        self.maps = {}
        self.generation += 1

    def close_all(self) -> None:
        with self.lock:
            opened = list(self.maps.values())
            self.maps.clear()
            self.generation += 1
        for node, m in opened:
            m.close()
            node.close()


_shared = _Shared()
os.register_at_fork(after_in_child=_shared.forget)


def close_all() -> None:
    """Close every map and node this process's :class:`SyncMapCache` instances opened (at
    shutdown, or between tests); the next use opens them again."""
    _shared.close_all()


def _same(value: Any) -> Any:
    return value


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class SyncMapCache(BaseCache):  # type: ignore[misc]  # (Django ships no types)
    """Django's cache API on a :class:`~syncmap.SyncMap` (see the module docstring)."""

    def __init__(self, server: str | None, params: dict[str, Any]) -> None:
        super().__init__(params)
        if isinstance(server, list | tuple):
            if len(server) > 1:
                raise InvalidArgument(
                    "SyncMapCache takes one LOCATION URL (a Cluster: redis+cluster://host:port)"
                )
            server = server[0] if server else ""
        if server is not None and not isinstance(server, str):
            raise InvalidArgument(f"LOCATION must be a URL string, not {type(server).__name__}")
        self._url = server or None
        options = dict(params.get("OPTIONS") or {})
        self._name = options.pop("name", "django")
        if not isinstance(self._name, str) or not self._name:
            raise InvalidArgument(f"OPTIONS['name'] must be a non-empty str, not {self._name!r}")
        self._load_timeout = options.pop("load_timeout", 10.0)
        codec = options.pop("codec", None)
        self._codec: Codec = DjangoCodec() if codec is None else get_codec(codec)
        # what a read returns for a cached value: a fresh object (the default codec)
        self._value: Callable[[Any], Any] = getattr(self._codec, "value", _same)
        self._map_options = dict(_MAP_DEFAULTS)
        for name in _MAP_OPTIONS:
            if name in options:
                self._map_options[name] = options.pop(name)
        self._client_options = options
        self._shared_key = (
            self._url,
            self._name,
            self._codec.name,
            _frozen(self._map_options),
            _frozen(self._client_options),
        )
        self._map: SyncMap | None = None
        self._generation = -1  # of _shared, when _map was looked up
        self._made: dict[tuple[Any, Any], str] = {}

    # ---- the process's map -----------------------------------------------------------------

    @property
    def map(self) -> SyncMap:
        """The process's map behind this cache (shared by every instance of this cache)."""
        if self._generation == _shared.generation and self._map is not None:
            return self._map
        generation = _shared.generation
        m = self._map = _shared.get(self._shared_key, self._open)
        self._generation = generation
        return m

    def _open(self) -> tuple[Node, SyncMap]:
        node = connect(self._url, **self._client_options)
        try:
            return node, node.map(self._name, codec=self._codec, **self._map_options)
        except BaseException:
            node.close()
            raise

    def _ttl(self, timeout: Any) -> tuple[bool, float | None]:
        """Django's timeout as ``(expired, ttl)``: ``expired`` for 0 or negative."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return False, None
        seconds = check_seconds(
            timeout, "timeout", low=-math.inf, low_ok=True, or_none=True,
            expected="a finite number of seconds or None",
        )  # fmt: skip
        if seconds <= 0:
            return True, None
        return False, seconds

    def make_and_validate_key(self, key: Any, version: int | None = None) -> str:
        """Django's key (KEY_FUNCTION, KEY_PREFIX, VERSION) and its validation warnings. The
        keys that raised no warning are remembered (up to MADE_KEYS per instance): Django's
        key handling costs several times a local hit, and its result never changes."""
        try:
            return self._made[key, version]
        except KeyError:
            pass
        except TypeError:  # an unhashable key: Django's key function decides
            return str(super().make_and_validate_key(key, version=version))
        made = super().make_and_validate_key(key, version=version)
        if isinstance(made, str) and not any(memcache_key_warnings(made)):
            if len(self._made) >= MADE_KEYS:
                self._made.clear()
            self._made[key, version] = made
        return str(made)

    def _keys(self, keys: Iterable[Any], version: int | None) -> dict[str, Any]:
        return {self.make_and_validate_key(key, version=version): key for key in keys}

    # ---- BaseCache -------------------------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        value = self.map.get(self.make_and_validate_key(key, version=version), _MISSING)
        return default if value is _MISSING else self._value(value)

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        k = self.make_and_validate_key(key, version=version)
        expired, ttl = self._ttl(timeout)
        if expired:
            self.map.delete(k)
        else:
            self.map.set(k, value, ttl)

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        k = self.make_and_validate_key(key, version=version)
        expired, ttl = self._ttl(timeout)
        added = self.map.add(k, value, ttl)
        if expired and added:  # as Django's backends: stored, and expired at once
            self.map.delete(k)
        return added

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        k = self.make_and_validate_key(key, version=version)
        expired, ttl = self._ttl(timeout)
        if expired:
            return self.map.delete(k)
        return self.map.touch(k, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self.map.delete(self.make_and_validate_key(key, version=version))

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self.make_and_validate_key(key, version=version) in self.map

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        k = self.make_and_validate_key(key, version=version)
        try:
            return self.map.incr(k, delta, create=False)
        except KeyError:
            raise ValueError(f"Key '{k}' not found") from None

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        k = self.make_and_validate_key(key, version=version)
        m = self.map
        value = m.get(k, _MISSING)
        if value is not _MISSING:
            return self._value(value)
        expired, ttl = self._ttl(timeout)
        if expired:  # nothing is stored: as Django's backends, the default is returned
            return default() if callable(default) else default
        if callable(default):  # runs on one node; the others wait for its value
            return self._value(m.get_or_load(k, default, ttl, self._load_timeout))
        m.add(k, default, ttl)
        value = m.get(k, _MISSING)
        return default if value is _MISSING else self._value(value)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        keys = self._keys(keys, version)  # cached keys locally, the others in one round trip
        found = self.map.get_many(keys)
        return {keys[k]: self._value(value) for k, value in found.items()}

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        if not data:
            return []
        keys = self._keys(data, version)
        expired, ttl = self._ttl(timeout)
        if expired:  # as Django's backends: written and expired at once, i.e. deleted
            self.map.delete_many(keys)
        else:
            self.map.set_many([(k, data[key]) for k, key in keys.items()], ttl)
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        made = self._keys(keys, version)
        if made:
            self.map.delete_many(made)

    def clear(self) -> None:
        self.map.clear()

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: the process's node and map outlive requests (see the module doc)."""

    # ---- async: a local hit without a thread hop; atomic operations stay atomic ------------

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        value = self.map.get_local(self.make_and_validate_key(key, version=version), _MISSING)
        if value is not _MISSING:
            return self._value(value)
        return await sync_to_async(self.get, thread_sensitive=True)(key, default, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await sync_to_async(self.incr, thread_sensitive=True)(key, delta, version)

    async def aget_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        value = await self.aget(key, _MISSING, version)
        if value is not _MISSING:
            return value
        return await sync_to_async(self.get_or_set, thread_sensitive=True)(
            key, default, timeout, version
        )

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return await sync_to_async(self.get_many, thread_sensitive=True)(keys, version)

    async def aset_many(
        self,
        data: dict[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        return await sync_to_async(self.set_many, thread_sensitive=True)(data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        await sync_to_async(self.delete_many, thread_sensitive=True)(keys, version)
