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
* at most :data:`MAX_REDIRECTS` hops in a row, then :class:`~syncmap.ServerError` naming the
  slot (also when TRYAGAIN lasts longer than :data:`TRYAGAIN_WAIT`).

A map's listener subscribes (``SSUBSCRIBE``) through a connection bound to the map's slot, so
a reconnect finds the slot's current owner; a master that loses the slot unsubscribes it
(``sunsubscribe``), and a resubscription answered with MOVED teaches the table (see
``syncmap._listener``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import AskError, MovedError, TryAgainError

from ._errors import ServerError, ServerUnavailable

__all__ = ["MAX_REDIRECTS", "TRYAGAIN_WAIT", "ClusterRouter", "SlotTable", "key_slot"]

SLOTS = 16384
MAX_REDIRECTS = 5
TRYAGAIN_WAIT = 2.0  # s


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

    def load(self, reply: Any) -> None:
        """Replace the table with a raw ``CLUSTER SLOTS`` reply (``[start, end, [host, port,
        id], replicas...]`` per range; a dict if redis-py parsed it)."""
        owners: list[Address | None] = [None] * SLOTS
        if isinstance(reply, dict):  # redis-py's parsed form: {(start, end): {"primary": ...}}
            ranges = [(s, e, v["primary"]) for (s, e), v in reply.items()]
        else:
            ranges = [(r[0], r[1], r[2]) for r in reply]
        for start, end, primary in ranges:
            host, port = _text(primary[0]), int(primary[1])
            for slot in range(int(start), int(end) + 1):
                owners[slot] = (host, port)
        with self.lock:
            self.owners = owners

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
        self.deadline = 0.0

    def next(self, exc: Exception) -> tuple[Address | None, bool, float]:
        """``(target or None for the original connection, ASKING first?, pause before)``."""
        if isinstance(exc, TryAgainError):
            now = time.monotonic()
            if not self.pauses:
                self.deadline = now + TRYAGAIN_WAIT
            elif now >= self.deadline:
                raise ServerError(
                    f"a cluster slot is being migrated: {self.address} answered TRYAGAIN for "
                    f"{TRYAGAIN_WAIT}s ({exc})"
                ) from exc
            self.hops = 0
            self.pauses += 1
            return None, False, min(0.01 * 2 ** (self.pauses - 1), 0.1)
        assert isinstance(exc, AskError)
        self.hops += 1
        if self.hops > MAX_REDIRECTS:
            raise ServerError(
                f"cluster slot {exc.slot_id} kept moving (last: {exc}, from {self.address}); "
                f"gave up after {MAX_REDIRECTS} redirects"
            ) from exc
        target = (exc.host, int(exc.port))
        if isinstance(exc, MovedError):
            self.table.moved(exc.slot_id, target)
            return target, False, 0.0
        return target, True, 0.0


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
        super().__init__(**kw)


class _SyncRedirecting(_Redirecting):
    """Mixin for a redis-py ``Connection`` class (see the module docstring)."""

    def _connect(self) -> Any:
        if self.syncmap_slot is not None:  # bound to a slot: connect to its current owner
            self.host, self.port = self.syncmap_router.table.owner(self.syncmap_slot)
        return super()._connect()  # type: ignore[misc]

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.syncmap_sent = command
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _FOLLOWED as exc:
            return self._redirect(exc, args, kwargs)
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
            target, asking, pause = plan.next(exc)
            time.sleep(pause)
            # MOVED of a connection bound to the slot: reconnect it to the new owner
            here = target is None or (not asking and _same_slot(exc, self.syncmap_slot))
            pool = None if here or target is None else router.sync_pool(target)
            conn: Any = self if pool is None else pool.get_connection()
            try:
                if target is not None and conn is self:
                    conn.disconnect()  # type: ignore[attr-defined]  # reconnects to the owner
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


class _AsyncRedirecting(_Redirecting):
    """The asyncio twin of :class:`_SyncRedirecting` (same plan, awaited)."""

    async def _connect(self) -> Any:
        if self.syncmap_slot is not None:
            self.host, self.port = self.syncmap_router.table.owner(self.syncmap_slot)
        return await super()._connect()  # type: ignore[misc]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.syncmap_sent = command
        await super().send_packed_command(command, check_health)  # type: ignore[misc]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _FOLLOWED as exc:
            return await self._redirect(exc, args, kwargs)
        finally:
            self.syncmap_sent = None

    async def _plain_read(self, args: Any, kwargs: Any) -> Any:
        return await super().read_response(*args, **kwargs)  # type: ignore[misc]

    async def _redirect(self, exc: Exception, args: Any, kwargs: Any) -> Any:
        packed, router = self.syncmap_sent, self.syncmap_router
        if packed is None:
            raise exc
        packed = [packed] if isinstance(packed, str | bytes) else list(packed)
        plan = _Redirects(router.table, f"{self.host}:{self.port}")
        while True:
            target, asking, pause = plan.next(exc)
            await asyncio.sleep(pause)
            here = target is None or (not asking and _same_slot(exc, self.syncmap_slot))
            pool = None if here or target is None else router.async_pool(target)
            conn: Any = self if pool is None else await pool.get_connection()
            try:
                if target is not None and conn is self:
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

    # ---- the slot table ----

    def refresh(self) -> None:
        """Load the slot table from the first seed or known master that answers (blocking:
        the asyncio node runs it in a thread)."""
        errors: list[str] = []
        base = {k: v for k, v in self.options.items() if k != "connection_class"}
        conn_class = self.options.get("connection_class", redis.Connection)
        if self.is_async:  # the sync twin of the async TLS class, for this one query
            conn_class = redis.SSLConnection if "SSL" in conn_class.__name__ else redis.Connection
        for host, port in [*self.seeds, *self.table.masters()]:
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
            self.table.load(reply)
            return
        detail = "; ".join(errors)
        raise ServerUnavailable(f"no node of the cluster answered CLUSTER SLOTS: {detail}")

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
