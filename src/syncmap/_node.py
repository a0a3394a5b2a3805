"""A node: one process's connection to the syncmap server, and the factory of maps and locks.

``connect()`` / ``connect_async()`` resolve where the server is (argument, ``$SYNCMAP_URL``, or
the embedded Valkey), check the URL, reach the server once, and return a :class:`Node` /
:class:`AsyncNode`. Both share :class:`_NodeBase`; only the driver differs.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio

from ._core.ops import Flow
from ._driver import AsyncDriver, SyncDriver
from ._errors import InvalidURL, ServerUnavailable, SyncMapError, translate_redis_error

if TYPE_CHECKING:
    from ._lock import AsyncLock, Lock
    from ._map import AsyncSyncMap, SyncMap

__all__ = ["AsyncNode", "Node", "connect", "connect_async", "describe_url", "resolve_url"]

T = TypeVar("T")

_SCHEMES = {"redis", "rediss", "unix", "valkey", "valkeys"}


def describe_url(url: str) -> str:
    """The address of ``url`` without credentials, for messages; raises :class:`InvalidURL`."""
    if not isinstance(url, str) or not url:
        raise InvalidURL(f"a server URL must be a non-empty str, not {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidURL(f"cannot parse server URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidURL(
            f"unsupported URL scheme {parts.scheme!r} in {_redact(url)!r}; "
            "use redis://, rediss://, valkey://, valkeys:// or unix://"
        )
    if scheme == "unix":
        if not parts.path:
            raise InvalidURL(f"unix URL {_redact(url)!r} has no socket path")
        return f"unix://{parts.path}"
    try:
        port = parts.port or 6379
    except ValueError:
        raise InvalidURL(f"bad port in server URL {_redact(url)!r}") from None
    host = parts.hostname
    if not host:
        raise InvalidURL(f"server URL {_redact(url)!r} has no host")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise InvalidURL(f"database in server URL {_redact(url)!r} must be a number")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}" + (f"/{db}" if db else "")


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = unquote(parts.username or "")
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _redis_url(url: str) -> str:
    """redis-py speaks redis://; valkey:// is the same protocol."""
    low = url.lower()
    if low.startswith("valkeys://"):
        return "rediss://" + url[len("valkeys://") :]
    if low.startswith("valkey://"):
        return "redis://" + url[len("valkey://") :]
    return url


def resolve_url(url: str | None) -> str:
    """Argument, else ``$SYNCMAP_URL``, else the embedded server (started if needed)."""
    if url is None:
        url = os.environ.get("SYNCMAP_URL") or None
    if url is None:
        from ._embedded import ensure_embedded

        return ensure_embedded().url
    describe_url(url)
    return url


class _NodeBase:
    """What a sync and an async node share: where the server is, and option checking."""

    url: str | None
    address: str

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"


class Node(_NodeBase):
    """A blocking connection to the server. Make one with :func:`connect`."""

    def __init__(self, client: redis.Redis, address: str, url: str | None = None) -> None:
        self.client = client
        self.address = address
        self.url = url
        self.driver = SyncDriver(client, address)

    def run(self, flow: Flow[T]) -> T:
        return self.driver.run(flow)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception as exc:
            raise _translated(exc, self.address) from exc

    def lock(self, name: str, **options: Any) -> Lock:
        """A distributed lock named ``name`` (see :class:`syncmap.Lock`); not yet acquired."""
        from ._lock import Lock

        return Lock(self, name, **options)

    def obtain(self, key: str, ttl: float, **options: Any) -> Lock:
        """redislock's Obtain: a held :class:`Lock`, or :class:`NotObtained`."""
        from ._lock import obtain

        return obtain(self, key, ttl, **options)

    def obtain_multi(self, keys: list[str], ttl: float, **options: Any) -> Lock:
        """Obtain several keys atomically (all or none)."""
        from ._lock import obtain_multi

        return obtain_multi(self, keys, ttl, **options)

    def map(self, name: str, **options: Any) -> SyncMap:
        """The shared map ``name``, with a local copy in this process (see :class:`SyncMap`)."""
        from ._map import SyncMap

        return SyncMap(self, name, **options)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncNode(_NodeBase):
    """An asyncio connection to the server. Make one with :func:`connect_async`."""

    def __init__(self, client: redis.asyncio.Redis, address: str, url: str | None = None) -> None:
        self.client = client
        self.address = address
        self.url = url
        self.driver = AsyncDriver(client, address)

    async def run(self, flow: Flow[T]) -> T:
        return await self.driver.run(flow)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception as exc:
            raise _translated(exc, self.address) from exc

    def lock(self, name: str, **options: Any) -> AsyncLock:
        """A distributed lock named ``name`` for asyncio; not yet acquired."""
        from ._lock import AsyncLock

        return AsyncLock(self, name, **options)

    async def obtain(self, key: str, ttl: float, **options: Any) -> AsyncLock:
        from ._lock import obtain_async

        return await obtain_async(self, key, ttl, **options)

    async def obtain_multi(self, keys: list[str], ttl: float, **options: Any) -> AsyncLock:
        from ._lock import obtain_multi_async

        return await obtain_multi_async(self, keys, ttl, **options)

    async def map(self, name: str, **options: Any) -> AsyncSyncMap:
        """The shared map ``name`` for asyncio, started (subscribed) before it is returned."""
        from ._map import AsyncSyncMap

        return await AsyncSyncMap.open(self, name, **options)

    async def close(self) -> None:
        await self.client.aclose()

    async def __aenter__(self) -> AsyncNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _translated(exc: Exception, address: str) -> Exception:
    if isinstance(exc, SyncMapError):
        return exc
    return translate_redis_error(exc, address) or exc


def _client_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"socket_connect_timeout": 5.0, "health_check_interval": 0}
    opts.update(kwargs)
    return opts


def _prepare(
    url: Any, ready_type: type[Any], factory: Any, options: dict[str, Any]
) -> tuple[Any, str, str | None]:
    """(client, address, url) for a URL, ``None`` or a ready client of ``ready_type``."""
    if isinstance(url, ready_type):
        kw = url.connection_pool.connection_kwargs
        address = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
        return url, str(address), None
    resolved = resolve_url(url)
    address = describe_url(resolved)
    try:
        client = factory(_redis_url(resolved), **_client_options(options))
    except (ValueError, TypeError) as exc:
        raise InvalidURL(f"bad server URL {address!r}: {exc}") from None
    return client, address, resolved


def connect(url: str | redis.Redis | None = None, **client_options: Any) -> Node:
    """Connect to the server at ``url`` (or ``$SYNCMAP_URL``, or the embedded Valkey).

    ``url`` may also be a ready ``redis.Redis``; ``client_options`` go to redis-py. Raises
    :class:`InvalidURL` for a malformed URL and :class:`ServerUnavailable` (naming the
    address) when the server does not answer.
    """
    node = Node(*_prepare(url, redis.Redis, redis.Redis.from_url, client_options))
    try:
        node.ping()
    except ServerUnavailable:
        node.close()
        raise
    return node


async def connect_async(
    url: str | redis.asyncio.Redis | None = None, **client_options: Any
) -> AsyncNode:
    """The asyncio form of :func:`connect` (finding the embedded server runs in a thread)."""
    client, address, resolved = await asyncio.to_thread(
        _prepare, url, redis.asyncio.Redis, redis.asyncio.Redis.from_url, client_options
    )
    node = AsyncNode(client, address, resolved)
    try:
        await node.ping()
    except ServerUnavailable:
        await node.close()
        raise
    return node
