"""Redis/Valkey Cluster: run each map and lock on a plain client of the master owning its slot.

Every script of a map touches keys of one hash tag (``{<map name>}``), and a lock's keys share
its name's slot, so a map or a lock needs exactly one master: :class:`ClusterRouter` keeps
the slot table (``CLUSTER SLOTS``) and hands out per-master ``redis.Redis`` clients whose
connections are :func:`redirecting <connection_class>`:

* a reply ``-MOVED <slot> <host>:<port>`` means the command was *not* executed, so it is
  resent where the server says (safe for non-idempotent writes too); the slot table learns the
  new owner. A map's connections are bound to the map's slot: on MOVED they reconnect to the
  new owner, so after a resharding a map pays one extra round trip per kept connection, once.
  A lock's connections belong to its master: a lock made before a resharding takes the extra
  hop on every command (new locks go straight to the new owner);
* ``-ASK <slot> <host>:<port>`` (a slot being migrated): the command is resent there,
  preceded by ``ASKING``; the table is not changed;
* ``-TRYAGAIN`` (a multi-key command while its slot is being migrated and some of its keys are
  missing: a map write declares keys that rarely exist, so map writes get it for the whole
  migration of their slot): not executed either; resent on the original connection after a
  short pause (10 ms, doubling up to 100 ms), for at most :data:`TRYAGAIN_WAIT` seconds;
* up to :data:`MAX_REDIRECTS` MOVED / ASK hops in a row are resent at once (a resharding
  costs one). More mean the nodes disagree about the slot while a resharding or a failover
  settles (a node told of a move redirects to one still importing the slot, which redirects
  back until it is told): the router re-reads ``CLUSTER SLOTS`` once (for the other slots of
  the move too; rate-limited as after a lost connection), and each further hop waits first
  (10 ms, doubling up to 100 ms), for at most :data:`REDIRECT_WAIT` seconds in all; then
  :class:`~syncmap.ServerError` naming the slot (also when TRYAGAIN lasts longer than
  :data:`TRYAGAIN_WAIT`). Every redirect is an answer, so the command was not executed and
  resending it keeps it at most once (contract §11).

A map's listener subscribes (``SSUBSCRIBE``) through a connection bound to the map's slot, so
a reconnect finds the slot's current owner; a master that loses the slot unsubscribes it
(``sunsubscribe``), and a resubscription answered with MOVED teaches the table (see
``syncmap._listener``).

**Failover** (a master dies, its replica is promoted): nothing answers MOVED, so the table
learns it otherwise. When a connection cannot be made (connect or handshake fails: the old
connections broke, and every command or subscription reconnects first) or breaks or times
out while waiting for an answer, the router re-reads ``CLUSTER SLOTS`` from the other nodes
(:meth:`ClusterRouter.lost`: at most once per :data:`REFRESH_INTERVAL`, each node
:data:`REFRESH_TIMEOUT`, all :data:`REFRESH_BUDGET`); a failed connect tries once more if the
table now names another master. A map's connections follow its slot; a lock's (bound to a
master) follow the master that took over the dead one's slots. A connection still open to a
master the table no longer names (a frozen one) reconnects before it sends. Until the
promotion, commands raise ``ServerUnavailable`` (each after up to one refresh interval);
what happens to a command whose connection breaks after it was sent is the driver's
decision, unchanged (``OutcomeUnknown`` for a map write; reads and lock operations are
resent once).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import AskError, MovedError, TryAgainError

from ._errors import ServerError, ServerUnavailable
from ._redis_compat import sock_of

__all__ = [
    "MAX_REDIRECTS",
    "REFRESH_BUDGET",
    "REFRESH_INTERVAL",
    "REFRESH_TIMEOUT",
    "REDIRECT_WAIT",
    "TRYAGAIN_WAIT",
    "ClusterRouter",
    "SlotTable",
    "key_slot",
]

SLOTS = 16384
MAX_REDIRECTS = 5
TRYAGAIN_WAIT = 2.0  # s
REDIRECT_WAIT = 2.0  # s: a streak of more than MAX_REDIRECTS redirects, with pauses
REFRESH_INTERVAL = 0.2  # s: after failures, the slot table is re-read at most this often
REFRESH_TIMEOUT = 1.0  # s: to connect to and hear from one node, in such a refresh
REFRESH_BUDGET = 3.0  # s: for all the nodes asked, in such a refresh


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: str | bytes) -> int:
    """The Cluster slot of ``key`` (CRC16-XMODEM of its hash tag, mod 16384)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    crc = 0
    for byte in raw:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc % SLOTS


Address = tuple[str, int]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SlotTable:
    """Which master owns each slot: filled from ``CLUSTER SLOTS``, corrected by MOVED."""

    def __init__(self) -> None:
        self.owners: list[Address | None] = [None] * SLOTS
        self.lock = threading.Lock()

    def load(self, reply: Any) -> list[Address]:
        """Replace the table with a raw ``CLUSTER SLOTS`` reply (``[start, end, [host, port,
        id], replicas...]`` per range; a dict if redis-py parsed it). Returns every node the
        reply names, masters and replicas."""
        owners: list[Address | None] = [None] * SLOTS
        if isinstance(reply, dict):  # redis-py's parsed form: {(start, end): {"primary": ...}}
            ranges = [(s, e, v["primary"], v.get("replicas", [])) for (s, e), v in reply.items()]
        else:
            ranges = [(r[0], r[1], r[2], r[3:]) for r in reply]
        nodes: dict[Address, None] = {}
        for start, end, primary, replicas in ranges:
            host, port = _text(primary[0]), int(primary[1])
            for slot in range(int(start), int(end) + 1):
                owners[slot] = (host, port)
            nodes[(host, port)] = None
            for replica in replicas:
                nodes[(_text(replica[0]), int(replica[1]))] = None
        with self.lock:
            self.owners = owners
        return list(nodes)

    def owner(self, slot: int) -> Address:
        found = self.owners[slot]
        if found is None:
            raise ServerUnavailable(f"no master of the cluster serves slot {slot}")
        return found

    def moved(self, slot: int, address: Address) -> None:
        with self.lock:
            self.owners[slot] = address

    def masters(self) -> list[Address]:
        return sorted({a for a in self.owners if a is not None})


_FOLLOWED = (AskError, TryAgainError)  # MovedError is an AskError


class _Redirects:
    """The decisions of one command's redirects (shared by the sync and asyncio connections):
    :meth:`next` says where to resend after a MOVED / ASK / TRYAGAIN answer."""

    def __init__(self, table: SlotTable, address: str) -> None:
        self.table = table
        self.address = address
        self.hops = 0
        self.pauses = 0
        self.tryagain_until = self.moving_until = 0.0

    def next(self, exc: Exception) -> tuple[Address | None, bool, float, bool]:
        """``(target or None for the original connection, ASKING first?, pause before,
        re-read the slot table first?)``."""
        now = time.monotonic()
        if isinstance(exc, TryAgainError):
            if not self.tryagain_until:
                self.tryagain_until = now + TRYAGAIN_WAIT
            elif now >= self.tryagain_until:
                raise ServerError(
                    f"a cluster slot is being migrated: {self.address} answered TRYAGAIN for "
                    f"{TRYAGAIN_WAIT}s ({exc})"
                ) from exc
            self.hops = 0
            return None, False, self._pause(), False
        assert isinstance(exc, AskError)
        self.hops += 1
        refresh, pause = False, 0.0
        if self.hops > MAX_REDIRECTS:  # the nodes disagree: a resharding or failover settling
            if self.hops == MAX_REDIRECTS + 1:
                self.moving_until, refresh = now + REDIRECT_WAIT, True
            elif now >= self.moving_until:
                raise ServerError(
                    f"cluster slot {exc.slot_id} kept moving (last: {exc}, from "
                    f"{self.address}); gave up after {self.hops - 1} redirects in "
                    f"{REDIRECT_WAIT}s"
                ) from exc
            pause = self._pause()
        return (exc.host, int(exc.port)), not isinstance(exc, MovedError), pause, refresh

    def _pause(self) -> float:
        """10 ms, doubling up to 100 ms."""
        self.pauses += 1
        return min(0.01 * 2.0 ** (self.pauses - 1), 0.1)

    def learn(self, exc: Exception) -> None:
        """A MOVED answer names the slot's owner (newer than any table re-read before it)."""
        if isinstance(exc, MovedError):
            self.table.moved(exc.slot_id, (exc.host, int(exc.port)))


_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def _same_slot(exc: Exception, slot: int | None) -> bool:
    return slot is not None and getattr(exc, "slot_id", None) == slot


class _Redirecting:
    """What both mixins keep: the router, the slot the connection is bound to (if any), and the
    command being sent (to resend it after a redirect)."""

    host: str
    port: int

    def __init__(
        self, *, syncmap_router: ClusterRouter, syncmap_slot: int | None = None, **kw: Any
    ) -> None:
        self.syncmap_router = syncmap_router
        self.syncmap_slot = syncmap_slot
        self.syncmap_sent: Any = None
        self.syncmap_connecting = False
        super().__init__(**kw)

    def _elsewhere(self) -> bool:
        """Whether the table now sends this connection to another master than the one it is
        connected to (a failover or a move learnt through another connection): it reconnects
        before sending, rather than wait on a frozen master or take a MOVED hop. Not for a
        subscriber connection (its listener notices and subscribes again itself)."""
        if self._connect_callbacks:  # type: ignore[attr-defined]  # (a PubSub's connection)
            return False
        here = (self.host, self.port)
        return self.syncmap_router.target(self.syncmap_slot, here) != here


class _RedirectingIO(_Redirecting):
    """What a blocking connection does its own way: whether it is connected, and telling the
    router of a lost master (in the calling thread)."""

    def _syncmap_connected(self) -> bool:
        return sock_of(self) is not None

    def _syncmap_lost(self, address: Address | None, since: float) -> None:
        self.syncmap_router.lost(address, since)


class _AsyncRedirectingIO(_Redirecting):
    """What an asyncio connection does its own way: whether it is connected, and telling the
    router of a lost master (blocking: in a thread)."""

    def _syncmap_connected(self) -> bool:
        return bool(self.is_connected)  # type: ignore[attr-defined]

    async def _syncmap_lost(self, address: Address | None, since: float) -> None:
        await asyncio.to_thread(self.syncmap_router.lost, address, since)


# The redirecting connections: written once for asyncio; the blocking one is generated from it.


# unasync: source redirecting
class _AsyncRedirecting(_AsyncRedirectingIO):
    """Mixin for a redis-py asyncio ``Connection`` class (see the module docstring)."""

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        """Connect where the slot table says (see :meth:`ClusterRouter.target`); if that
        fails, let the router re-read the table and, if it names another master, try there
        once."""
        if self._syncmap_connected():
            return None
        router, slot = self.syncmap_router, self.syncmap_slot
        self.host, self.port = router.target(slot, (self.host, self.port))
        since = time.monotonic()
        try:
            return await self._connect_here(args, kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            failed = (self.host, self.port)
            await self._syncmap_lost(failed, since)
            target = router.target(slot, failed)
            if target == failed:
                raise
        self.host, self.port = target
        return await self._connect_here(args, kwargs)

    async def _connect_here(self, args: Any, kwargs: Any) -> Any:
        self.syncmap_connecting = True  # (the handshake's commands stay on this connection)
        try:
            return await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.syncmap_connecting = False

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.syncmap_connecting and self._syncmap_connected() and self._elsewhere():
            await self.disconnect()  # type: ignore[attr-defined]
        await super().send_packed_command(command, check_health)  # type: ignore[misc]
        self.syncmap_sent = command  # (after: a reconnect's handshake reads forget it)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _FOLLOWED as exc:
            return await self._redirect(exc, args, kwargs)
        except (redis.ConnectionError, redis.TimeoutError):  # broke (or froze): the master
            await self._syncmap_lost((self.host, self.port), time.monotonic())  # may be gone
            raise
        finally:
            self.syncmap_sent = None

    async def _plain_read(self, args: Any, kwargs: Any) -> Any:
        return await super().read_response(*args, **kwargs)  # type: ignore[misc]

    async def _redirect(self, exc: Exception, args: Any, kwargs: Any) -> Any:
        packed, router = self.syncmap_sent, self.syncmap_router
        if packed is None:  # not a command of ours (a subscriber's read): the caller's
            raise exc
        packed = [packed] if isinstance(packed, str | bytes) else list(packed)
        plan = _Redirects(router.table, f"{self.host}:{self.port}")
        while True:
            target, asking, pause, refresh = plan.next(exc)
            if refresh:  # (for the other slots moved with this one too)
                await self._syncmap_lost(None, time.monotonic())
            plan.learn(exc)
            await asyncio.sleep(pause)
            # MOVED of a connection bound to the slot: reconnect it to the new owner
            here = target is None or (not asking and _same_slot(exc, self.syncmap_slot))
            pool = None if here or target is None else router.async_pool(target)
            conn: Any = self if pool is None else await pool.get_connection()
            try:
                if target is not None and conn is self:  # reconnects to the owner
                    await conn.disconnect()  # type: ignore[attr-defined]
                await conn.send_packed_command([_ASKING, *packed] if asking else packed, False)
                conn.syncmap_sent = None
                if asking:
                    await conn._plain_read((), {})
                return await conn._plain_read(args, kwargs)
            except _FOLLOWED as again:
                exc = again
            finally:
                if pool is not None:
                    await pool.release(conn)


# unasync: end


# unasync: generated redirecting (from the asyncio code by scripts/unasync.py: do not edit)
class _SyncRedirecting(_RedirectingIO):
    """Mixin for a redis-py ``Connection`` class (see the module docstring)."""

    def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        """Connect where the slot table says (see :meth:`ClusterRouter.target`); if that
        fails, let the router re-read the table and, if it names another master, try there
        once."""
        if self._syncmap_connected():
            return None
        router, slot = self.syncmap_router, self.syncmap_slot
        self.host, self.port = router.target(slot, (self.host, self.port))
        since = time.monotonic()
        try:
            return self._connect_here(args, kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            failed = (self.host, self.port)
            self._syncmap_lost(failed, since)
            target = router.target(slot, failed)
            if target == failed:
                raise
        self.host, self.port = target
        return self._connect_here(args, kwargs)

    def _connect_here(self, args: Any, kwargs: Any) -> Any:
        self.syncmap_connecting = True  # (the handshake's commands stay on this connection)
        try:
            return super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.syncmap_connecting = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.syncmap_connecting and self._syncmap_connected() and self._elsewhere():
            self.disconnect()  # type: ignore[attr-defined]
        super().send_packed_command(command, check_health)  # type: ignore[misc]
        self.syncmap_sent = command  # (after: a reconnect's handshake reads forget it)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _FOLLOWED as exc:
            return self._redirect(exc, args, kwargs)
        except (redis.ConnectionError, redis.TimeoutError):  # broke (or froze): the master
            self._syncmap_lost((self.host, self.port), time.monotonic())  # may be gone
            raise
        finally:
            self.syncmap_sent = None

    def _plain_read(self, args: Any, kwargs: Any) -> Any:
        return super().read_response(*args, **kwargs)  # type: ignore[misc]

    def _redirect(self, exc: Exception, args: Any, kwargs: Any) -> Any:
        packed, router = self.syncmap_sent, self.syncmap_router
        if packed is None:  # not a command of ours (a subscriber's read): the caller's
            raise exc
        packed = [packed] if isinstance(packed, str | bytes) else list(packed)
        plan = _Redirects(router.table, f"{self.host}:{self.port}")
        while True:
            target, asking, pause, refresh = plan.next(exc)
            if refresh:  # (for the other slots moved with this one too)
                self._syncmap_lost(None, time.monotonic())
            plan.learn(exc)
            time.sleep(pause)
            # MOVED of a connection bound to the slot: reconnect it to the new owner
            here = target is None or (not asking and _same_slot(exc, self.syncmap_slot))
            pool = None if here or target is None else router.sync_pool(target)
            conn: Any = self if pool is None else pool.get_connection()
            try:
                if target is not None and conn is self:  # reconnects to the owner
                    conn.disconnect()  # type: ignore[attr-defined]
                conn.send_packed_command([_ASKING, *packed] if asking else packed, False)
                conn.syncmap_sent = None
                if asking:
                    conn._plain_read((), {})
                return conn._plain_read(args, kwargs)
            except _FOLLOWED as again:
                exc = again
            finally:
                if pool is not None:
                    pool.release(conn)


# unasync: end


_CLASSES: dict[tuple[type, type], type] = {}


def connection_class(base: type, mixin: type) -> type:
    """``base`` (a redis-py connection class, plain or TLS) with redirects."""
    cls = _CLASSES.get((base, mixin))
    if cls is None:
        cls = _CLASSES[(base, mixin)] = type(f"Redirecting{base.__name__}", (mixin, base), {})
    return cls


class ClusterRouter:
    """The slot table of one cluster, and the per-master / per-slot clients of one node.

    ``options``: redis-py connection keyword arguments shared by every master (password,
    timeouts, TLS class as ``connection_class``), without host and port."""

    def __init__(self, seeds: list[Address], options: dict[str, Any], is_async: bool) -> None:
        self.seeds = list(seeds)
        self.options = dict(options)
        self.is_async = is_async
        self.table = SlotTable()
        self.lock = threading.Lock()
        self.masters: dict[Address, Any] = {}  # address -> client (locks)
        self.slots: dict[int, Any] = {}  # slot -> client bound to the slot (maps)
        self.nodes: list[Address] = []  # every node the last CLUSTER SLOTS named
        self.replaced: dict[Address, Address] = {}  # a lost master -> who took its slots
        self._refreshing = threading.Lock()
        self._refresh_began = self._refreshed_at = -math.inf

    # ---- the slot table ----

    def target(self, slot: int | None, address: Address) -> Address:
        """Where a connection goes: the current owner of the slot it is bound to (a map's),
        else (a lock's: bound to a master) the master that took over ``address``'s slots if
        ``address`` lost them (a failover), else ``address``."""
        if slot is not None:
            return self.table.owner(slot)
        for _ in range(MAX_REDIRECTS):  # (a chain of failovers)
            successor = self.replaced.get(address)
            if successor is None:
                break
            address = successor
        return address

    def lost(self, address: Address | None, since: float) -> None:
        """A connection to ``address``, tried at ``since`` (``time.monotonic()``), could not
        be made or broke: re-read the slot table, asking the other nodes before ``address``,
        unless a refresh began after ``since`` (its table is as new as any). Refreshes are at
        least :data:`REFRESH_INTERVAL` apart: a caller waits for the next one (or the one in
        progress) rather than go on with a stale table, so each failed connection costs at
        most that wait plus one refresh (bounded by :data:`REFRESH_BUDGET`). Blocking: the
        asyncio connections run it in a thread."""
        with self._refreshing:
            if self._refresh_began >= since:
                return
            pause = self._refreshed_at + REFRESH_INTERVAL - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with contextlib.suppress(ServerUnavailable):  # no node answered: the
                self.refresh(avoid=address, quick=True)  # connection's own error stands

    def refresh(self, avoid: Address | None = None, quick: bool = False) -> None:
        """Load the slot table from the first node that answers: the seeds, the known masters,
        then their replicas, ``avoid`` (a node that just failed) last (blocking: the asyncio
        node runs it in a thread). ``quick``: each node gets :data:`REFRESH_TIMEOUT` at most
        to connect and answer, and all of them :data:`REFRESH_BUDGET`."""
        self._refresh_began = time.monotonic()
        try:
            self._refresh(avoid, quick)
        finally:
            self._refreshed_at = time.monotonic()

    def _refresh(self, avoid: Address | None, quick: bool) -> None:
        errors: list[str] = []
        base = {k: v for k, v in self.options.items() if k != "connection_class"}
        if quick:
            for key in ("socket_connect_timeout", "socket_timeout"):
                base[key] = min(base.get(key) or REFRESH_TIMEOUT, REFRESH_TIMEOUT)
        conn_class = self.options.get("connection_class", redis.Connection)
        if self.is_async:  # the sync twin of the async TLS class, for this one query
            conn_class = redis.SSLConnection if "SSL" in conn_class.__name__ else redis.Connection
        nodes = list(dict.fromkeys([*self.seeds, *self.table.masters(), *self.nodes]))
        if avoid in nodes:
            nodes.remove(avoid)
            nodes.append(avoid)
        deadline = time.monotonic() + REFRESH_BUDGET
        for host, port in nodes:
            if quick and time.monotonic() > deadline:
                errors.append(f"gave up after {REFRESH_BUDGET}s")
                break
            pool = redis.ConnectionPool(connection_class=conn_class, host=host, port=port, **base)
            client = redis.Redis(connection_pool=pool)
            try:
                reply = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except redis.RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            finally:
                client.close()
                pool.disconnect()
            self._load(reply)
            return
        detail = "; ".join(errors)
        raise ServerUnavailable(f"no node of the cluster answered CLUSTER SLOTS: {detail}")

    def _load(self, reply: Any) -> None:
        """Take a ``CLUSTER SLOTS`` reply; a master that lost all its slots is replaced, for
        the connections bound to it (locks), by the one that now owns its first slot."""
        before = self.table.owners
        self.nodes = self.table.load(reply)
        after = self.table.owners
        masters = set(self.table.masters())
        first: dict[Address, int] = {}
        for slot, owner in enumerate(before):
            if owner is not None and owner not in masters:
                first.setdefault(owner, slot)
        with self.lock:
            for old, slot in first.items():
                new = after[slot]
                if new is not None:
                    self.replaced[old] = new
            for address in masters:
                self.replaced.pop(address, None)

    # ---- clients ----

    def _pool_kwargs(self, address: Address, slot: int | None) -> dict[str, Any]:
        options = dict(self.options)
        default = redis.asyncio.Connection if self.is_async else redis.Connection
        base = options.pop("connection_class", default)
        mixin = _AsyncRedirecting if self.is_async else _SyncRedirecting
        options.update(
            connection_class=connection_class(base, mixin),
            host=address[0],
            port=address[1],
            syncmap_router=self,
            syncmap_slot=slot,
        )
        return options

    def _client(self, address: Address, slot: int | None) -> Any:
        kwargs = self._pool_kwargs(address, slot)
        if self.is_async:
            return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(**kwargs))
        return redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))

    def master_client(self, address: Address) -> Any:
        with self.lock:
            client = self.masters.get(address)
            if client is None:
                client = self.masters[address] = self._client(address, None)
            return client

    def sync_pool(self, address: Address) -> Any:
        return self.master_client(address).connection_pool

    def async_pool(self, address: Address) -> Any:
        return self.master_client(address).connection_pool

    def for_map(self, slot: int) -> tuple[Any, str]:
        """A client bound to ``slot`` (its connections follow the slot), and an address."""
        owner = self.table.owner(slot)
        with self.lock:
            client = self.slots.get(slot)
            if client is None:
                client = self.slots[slot] = self._client(owner, slot)
        return client, f"{owner[0]}:{owner[1]} (cluster slot {slot})"

    def for_lock(self, slot: int) -> tuple[Any, str]:
        """The client of the master owning ``slot`` now."""
        owner = self.table.owner(slot)
        return self.master_client(owner), f"{owner[0]}:{owner[1]}"

    def clients(self) -> list[Any]:
        with self.lock:
            found = [*self.masters.values(), *self.slots.values()]
            self.masters.clear()
            self.slots.clear()
        return found
