"""A node: one process's connection to the syncmap server, and the factory of maps and locks.

``connect()`` / ``connect_async()`` resolve where the server is (argument, ``$SYNCMAP_URL``, or
the embedded Valkey), check the URL, reach the server once, and return a :class:`Node` /
:class:`AsyncNode`. Both share :class:`_NodeBase`; only the driver differs.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import RedisClusterException

from ._cluster import ClusterRouter, key_slot
from ._core.hooks import Hooks, new_hooks
from ._core.keys import MapKeys, hash_tag
from ._core.ops import Command, Flow
from ._driver import AsyncDriver, SyncDriver
from ._errors import (
    InvalidArgument,
    InvalidURL,
    NodeForked,
    ServerUnavailable,
    SyncMapError,
    translated,
)
from ._redis_compat import connection_options

if TYPE_CHECKING:
    from ._lock import AsyncLock, Lock
    from ._map import AsyncSyncMap, SyncMap

__all__ = ["AsyncNode", "Node", "connect", "connect_async", "describe_url", "resolve_url"]

T = TypeVar("T")

_PLAIN_SCHEMES = {"redis", "rediss", "unix", "valkey", "valkeys"}
_CLUSTER_SUFFIX = "+cluster"
_SCHEMES = _PLAIN_SCHEMES | {s + _CLUSTER_SUFFIX for s in ("redis", "rediss", "valkey", "valkeys")}


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://host:port`` (or rediss+, valkey+, valkeys+): a Cluster seed node."""
    return url.split("://", 1)[0].lower().endswith(_CLUSTER_SUFFIX)


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
            "use redis://, rediss://, valkey://, valkeys:// or unix:// (a Cluster: "
            "redis+cluster://host:port, also rediss+, valkey+, valkeys+)"
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
    if scheme.endswith(_CLUSTER_SUFFIX) and db not in ("", "0"):
        raise InvalidURL(f"a Cluster has only database 0, not {db} ({_redact(url)!r})")
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
    if is_cluster_url(url):
        scheme, rest = url.split("://", 1)
        url = f"{scheme[: -len(_CLUSTER_SUFFIX)]}://{rest}"
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
    """What a sync and an async node share: where the server is, and, on a Cluster, which
    master runs a map or a lock (``router``; ``None`` for a single server).

    The node's maps share one listener per server (per master on a Cluster): one subscriber
    connection, one thread (one task under asyncio), one freshness probe (see
    ``syncmap._listener`` and docs/contract.md §5). The listeners belong to the
    node the user made (``_root``; the per-master nodes of a Cluster use their root's)."""

    client: Any
    url: str | None
    address: str
    router: ClusterRouter | None
    _shards: dict[int, Any]
    _root: Any
    _listeners: dict[Any, Any]
    _hooks: Hooks[Any]  # the tests' sabotage points, given to the node's maps and listeners

    def _init_listeners(self) -> None:
        self._root = self
        self._listeners = {}
        self._listeners_lock = threading.Lock()
        _NODES.add(self)

    def _new_listener(self, client: Any, address: str, timeout: float, home: Any) -> Any:
        raise NotImplementedError

    def _listener_for(self, slot: int | None, timeout: float) -> Any:
        """The listener for a map (on a Cluster: the one of the master owning ``slot`` now),
        made on first use; ``timeout``: its connections' socket timeout, if it is new."""
        root = self._root
        with root._listeners_lock:
            if root.router is None:
                home, client, address = None, self.client, self.address
            else:
                home = root.router.table.owner(slot)
                client = root.router.master_client(home)
                address = f"{home[0]}:{home[1]}"
            listener = root._listeners.get(home)
            if listener is None or _closing(listener):
                listener = root._new_listener(client, address, timeout, home)
                root._listeners[home] = listener
            return listener

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"

    def _shard(self, key: str, is_map: bool) -> tuple[Any, str] | None:
        """(client, address) for a map's or lock's slot on a Cluster; ``None`` otherwise."""
        if self.router is None:
            return None
        slot = key_slot(key)
        return self.router.for_map(slot) if is_map else self.router.for_lock(slot)

    def _on(self, key: str, is_map: bool) -> Self:
        """The node a map or lock runs on: this one, or on a Cluster, one of its masters
        (made once per master, of this node's kind)."""
        shard = self._shard(key, is_map)
        if shard is None:
            return self
        node = self._shards.get(id(shard[0]))
        if node is None:
            node = self._shards[id(shard[0])] = type(self)(shard[0], shard[1], self.url)  # type: ignore[call-arg]
            node._root = self
        return node

    def _no_driver(self) -> SyncMapError:
        return InvalidArgument(
            f"{self.address} is a Cluster: flows run on a map's or lock's own master"
        )


# The nodes: written once for asyncio; the blocking one is generated from it.


# unasync: source node
class AsyncNode(_NodeBase):
    """An asyncio connection to the server. Make one with :func:`connect_async`."""

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
        address: str,
        url: str | None = None,
        router: ClusterRouter | None = None,
    ) -> None:
        self.client: Any = client
        self.address = address
        self.url = url
        self.router = router
        self._shards = {}
        self.driver = None if router is not None else AsyncDriver(client, address)
        self._hooks = new_hooks(asyncio.Event, threading.Event)
        self._init_listeners()
        self.forked = False  # made before os.fork(), and this is the child  # unasync: drop

    def _new_listener(self, client: Any, address: str, timeout: float, home: Any) -> Any:
        from ._listener import AsyncListener

        return AsyncListener(client, address, timeout, self.router, home, self._hooks)

    # unasync: drop begin
    def _check_fork(self) -> None:
        """Raise :class:`NodeForked` in a forked child (an asyncio node does not cross a fork:
        its connections and task belong to the parent's event loop)."""
        if self._root.forked:
            raise NodeForked(
                f"{self.address}: this asyncio node was made before os.fork(); "
                "call connect_async() in the child process"
            )

    # unasync: drop end
    async def run(self, flow: Flow[T]) -> T:
        self._check_fork()  # unasync: drop
        if self.driver is None:
            raise self._no_driver()
        return await self.driver.run(flow)

    async def ping(self) -> bool:
        self._check_fork()  # unasync: drop
        if self.driver is not None:  # (its connections are checked before use)
            return bool(await self.driver.run(_ping()))
        try:
            return bool(await self.client.ping())
        except Exception as exc:
            raise translated(exc, self.address) from exc

    def lock(self, name: str, **options: Any) -> AsyncLock:
        """A distributed lock named ``name`` for asyncio; not yet acquired."""
        from ._lock import AsyncLock

        self._check_fork()  # unasync: drop
        return AsyncLock(self._on(_lock_key(name), False), name, **options)

    async def obtain(self, key: str, ttl: float, **options: Any) -> AsyncLock:
        """redislock's Obtain: a held :class:`AsyncLock`, or :class:`NotObtained`. Options:
        those of :meth:`lock`, ``retry`` (a retry strategy), ``timeout``, and ``token`` (your
        own token instead of a random one: its holder may obtain the lock again)."""
        from ._lock import obtain_async

        self._check_fork()  # unasync: drop
        return await obtain_async(self._on(_lock_key(key), False), key, ttl, **options)

    async def obtain_multi(self, keys: list[str], ttl: float, **options: Any) -> AsyncLock:
        """Obtain several keys atomically (all or none)."""
        from ._lock import obtain_multi_async

        self._check_fork()  # unasync: drop
        return await obtain_multi_async(self._on(_lock_key(keys), False), keys, ttl, **options)

    async def map(self, name: str, **options: Any) -> AsyncSyncMap:
        """The shared map ``name`` for asyncio, started (subscribed) before it is returned."""
        from ._map import AsyncSyncMap

        self._check_fork()  # unasync: drop
        return await AsyncSyncMap.open(self._on(MapKeys(name).meta, True), name, **options)

    async def close(self) -> None:
        """Close the node's listeners (every map's copy is dropped) and connections."""
        with self._listeners_lock:
            listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            await listener.close()
        # unasync: drop begin
        if self._root.forked:
            return  # (the parent's connections: nothing to close here)
        # unasync: drop end
        self._shards.clear()
        if self.router is not None:
            for client in self.router.clients():
                await client.aclose()
        await self.client.aclose()

    async def __aenter__(self) -> AsyncNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# unasync: end


# unasync: generated node (from the asyncio code by scripts/unasync.py: do not edit)
class Node(_NodeBase):
    """A blocking connection to the server. Make one with :func:`connect`."""

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        address: str,
        url: str | None = None,
        router: ClusterRouter | None = None,
    ) -> None:
        self.client: Any = client
        self.address = address
        self.url = url
        self.router = router
        self._shards = {}
        self.driver = None if router is not None else SyncDriver(client, address)
        self._hooks = new_hooks(threading.Event, threading.Event)
        self._init_listeners()

    def _new_listener(self, client: Any, address: str, timeout: float, home: Any) -> Any:
        from ._listener import SyncListener

        return SyncListener(client, address, timeout, self.router, home, self._hooks)

    def run(self, flow: Flow[T]) -> T:
        if self.driver is None:
            raise self._no_driver()
        return self.driver.run(flow)

    def ping(self) -> bool:
        if self.driver is not None:  # (its connections are checked before use)
            return bool(self.driver.run(_ping()))
        try:
            return bool(self.client.ping())
        except Exception as exc:
            raise translated(exc, self.address) from exc

    def lock(self, name: str, **options: Any) -> Lock:
        """A distributed lock named ``name`` (see :class:`syncmap.Lock`); not yet acquired."""
        from ._lock import Lock

        return Lock(self._on(_lock_key(name), False), name, **options)

    def obtain(self, key: str, ttl: float, **options: Any) -> Lock:
        """redislock's Obtain: a held :class:`Lock`, or :class:`NotObtained`. Options:
        those of :meth:`lock`, ``retry`` (a retry strategy), ``timeout``, and ``token`` (your
        own token instead of a random one: its holder may obtain the lock again)."""
        from ._lock import obtain

        return obtain(self._on(_lock_key(key), False), key, ttl, **options)

    def obtain_multi(self, keys: list[str], ttl: float, **options: Any) -> Lock:
        """Obtain several keys atomically (all or none)."""
        from ._lock import obtain_multi

        return obtain_multi(self._on(_lock_key(keys), False), keys, ttl, **options)

    def map(self, name: str, **options: Any) -> SyncMap:
        """The shared map ``name``, with a local copy in this process (see :class:`SyncMap`)."""
        from ._map import SyncMap

        return SyncMap.open(self._on(MapKeys(name).meta, True), name, **options)

    def close(self) -> None:
        """Close the node's listeners (every map's copy is dropped) and connections."""
        with self._listeners_lock:
            listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            listener.close()
        self._shards.clear()
        if self.router is not None:
            for client in self.router.clients():
                client.close()
        self.client.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# unasync: end


def _closing(listener: Any) -> bool:
    closing = listener.closing
    return bool(closing.is_set() if isinstance(closing, threading.Event) else closing)


_NODES: weakref.WeakSet[_NodeBase] = weakref.WeakSet()


def _nodes_forked() -> None:
    """In a forked child: locks a thread of the parent may have held are new; an asyncio
    node is marked (see :class:`~syncmap.NodeForked`)."""
    for node in list(_NODES):
        node._listeners_lock = threading.Lock()
        if isinstance(node, AsyncNode):
            node.forked = True
        if node.router is not None:
            node.router.lock = threading.Lock()
            node.router._refreshing = threading.Lock()


os.register_at_fork(after_in_child=_nodes_forked)


def _ping() -> Flow[Any]:
    return (yield Command(("PING",)))


def _lock_key(name: Any) -> str:
    """The key whose slot a lock (or a multi-key lock: its keys share one slot) lives in; a
    bad name is left for the lock itself to refuse."""
    if isinstance(name, list | tuple) and name:
        name = name[0]
    if not isinstance(name, str) or not name:
        return "-"
    try:
        hash_tag(name)
    except SyncMapError:
        return "-"
    return name


def _client_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"socket_connect_timeout": 5.0, "health_check_interval": 0}
    opts.update(kwargs)
    return opts


def _prepare(url: Any, kind: type[Any], options: dict[str, Any]) -> tuple[Any, str, str | None]:
    """(client, address, url) for a URL, ``None`` or a ready client of ``kind`` (``redis.Redis``
    or the asyncio one)."""
    if isinstance(url, kind):
        kw = connection_options(url.connection_pool)
        address = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
        return url, str(address), None
    resolved = resolve_url(url)
    address = describe_url(resolved)
    try:
        client = kind.from_url(_redis_url(resolved), **_client_options(options))
    except (ValueError, TypeError) as exc:
        raise InvalidURL(f"bad server URL {address!r}: {exc}") from None
    return client, address, resolved


def _cluster_router(client: Any) -> ClusterRouter:
    """A router for a ready ``RedisCluster`` (sync or asyncio; initialized): its primaries are
    the seeds, and their connection options (password, TLS, timeouts) are every master's."""
    is_async = isinstance(client, redis.asyncio.cluster.RedisCluster)
    primaries = client.get_primaries()
    if not primaries:
        raise ServerUnavailable("the cluster client knows no primary node")
    first = primaries[0]
    redis_client = getattr(first, "redis_connection", None)
    if redis_client is not None:  # sync: each node has a redis.Redis
        pool = redis_client.connection_pool
        kwargs, conn_class = connection_options(pool), pool.connection_class
    else:  # asyncio: each node keeps its connection class and options
        kwargs, conn_class = connection_options(first), first.connection_class
    options = {k: v for k, v in kwargs.items() if k not in ("host", "port")}
    options["connection_class"] = conn_class
    options.setdefault("socket_connect_timeout", 5.0)
    options["health_check_interval"] = 0
    seeds = [(str(n.host), int(n.port)) for n in primaries]
    return ClusterRouter(seeds, options, is_async)


def _prepare_cluster(url: Any, options: dict[str, Any], kind: Any) -> tuple[Any, str, Any]:
    """(RedisCluster, address, URL or None) for a ``+cluster`` URL or a ready RedisCluster of
    ``kind`` (sync or asyncio); the router is made by the caller (the asyncio client must be
    initialized first)."""
    is_async = kind is redis.asyncio.cluster.RedisCluster
    if isinstance(url, kind):
        first = url.get_default_node() if not is_async else None
        where = f"{first.host}:{first.port}" if first is not None else "a ready client"
        return url, f"cluster via {where}", None
    address = describe_url(url)
    opts = {"socket_connect_timeout": 5.0, **options}
    try:
        client = kind.from_url(_redis_url(url), **opts)
    except (ValueError, TypeError) as exc:
        raise InvalidURL(f"bad server URL {address!r}: {exc}") from None
    except (redis.RedisError, RedisClusterException) as exc:  # the sync client discovers
        raise translated(exc, address) from exc  # the cluster at once
    return client, address, url


# unasync: generated connect (from the asyncio code by scripts/unasync.py: do not edit)
def connect(
    url: str | redis.Redis | redis.cluster.RedisCluster | None = None,
    **client_options: Any,
) -> Node:
    """Connect to the server at ``url`` (or ``$SYNCMAP_URL``, or the embedded Valkey).

    ``url`` may also be a ready ``redis.Redis``; ``client_options`` go to redis-py.
    Raises :class:`InvalidURL` for a malformed URL and :class:`ServerUnavailable` (naming the
    address) when the server does not answer.

    A Redis/Valkey Cluster: ``redis+cluster://host:port`` (any node; also ``rediss+cluster``,
    ``valkey+cluster``, ``valkeys+cluster``) or a ready ``redis.cluster.RedisCluster``.
    Each map and lock then runs on the master owning its slot (see ``syncmap._cluster``).
    """
    if isinstance(url, redis.cluster.RedisCluster) or (
        isinstance(url, str) and is_cluster_url(url)
    ):
        kind = redis.cluster.RedisCluster
        client, address, resolved = _prepare_cluster(url, client_options, kind)
        try:
            router = _cluster_router(client)
            router.refresh()
        except BaseException as exc:
            if resolved is not None:
                client.close()
            if isinstance(exc, redis.RedisError | RedisClusterException):
                raise translated(exc, address) from exc
            raise
        return Node(client, address, resolved, router)
    prepared = _prepare(url, redis.Redis, client_options)
    node = Node(*prepared)
    try:
        node.ping()
    except ServerUnavailable:
        node.close()
        raise
    return node


# unasync: end


# unasync: source connect
async def connect_async(
    url: str | redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | None = None,
    **client_options: Any,
) -> AsyncNode:
    """Connect an asyncio node to the server at ``url`` (or ``$SYNCMAP_URL``, or the embedded
    Valkey, found in a thread).

    ``url`` may also be a ready ``redis.asyncio.Redis``; ``client_options`` go to redis-py.
    Raises :class:`InvalidURL` for a malformed URL and :class:`ServerUnavailable` (naming the
    address) when the server does not answer.

    A Redis/Valkey Cluster: ``redis+cluster://host:port`` (any node; also ``rediss+cluster``,
    ``valkey+cluster``, ``valkeys+cluster``) or a ready ``redis.asyncio.cluster.RedisCluster``.
    Each map and lock then runs on the master owning its slot (see ``syncmap._cluster``).
    """
    if isinstance(url, redis.asyncio.cluster.RedisCluster) or (
        isinstance(url, str) and is_cluster_url(url)
    ):
        kind = redis.asyncio.cluster.RedisCluster
        client, address, resolved = _prepare_cluster(url, client_options, kind)
        try:
            await client.initialize()  # unasync: drop
            router = _cluster_router(client)
            await asyncio.to_thread(router.refresh)
        except BaseException as exc:
            if resolved is not None:
                await client.aclose()
            if isinstance(exc, redis.RedisError | RedisClusterException):
                raise translated(exc, address) from exc
            raise
        return AsyncNode(client, address, resolved, router)
    prepared = await asyncio.to_thread(_prepare, url, redis.asyncio.Redis, client_options)
    node = AsyncNode(*prepared)
    try:
        await node.ping()
    except ServerUnavailable:
        await node.close()
        raise
    return node


# unasync: end
