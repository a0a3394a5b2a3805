"""A node's listener as a flow: one subscriber connection for every map of the node on one
server (one master on a Cluster), the maps' change messages dispatched by channel to each
map's :class:`~syncmap._core.coherence.Coherence`, one freshness probe per interval for all
of them, reconnect with backoff. The blocking runner (a thread) and the asyncio runner (a
task) in ``syncmap._listener`` differ only in how they wait and send; every decision is here
or in ``Coherence``. What they enforce: docs/contract.md §4 and §5.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .._errors import SyncMapError
from .coherence import Coherence
from .keys import MapKeys
from .ops import Op, Sleep

__all__ = [
    "FLUSH_CHANNEL",
    "Event",
    "Hub",
    "ListenFlow",
    "ListenOp",
    "Member",
    "PubsubPing",
    "ReadMetas",
    "Receive",
    "Resubscribe",
    "Subscribe",
    "Unsubscribe",
    "apply_event",
    "listen",
]

log = logging.getLogger("syncmap.map")
T = TypeVar("T")

FLUSH_CHANNEL = b"__redis__:invalidate"
"""Where the subscriber connection hears of FLUSHALL / FLUSHDB (``CLIENT TRACKING`` redirected
to itself, OPTIN with nothing tracked: the server sends a null invalidation on a flush)."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Open a fresh subscriber connection: turn on ``CLIENT TRACKING`` (flush notices), then
    SSUBSCRIBE every channel registered with the hub (the runner asks :meth:`Hub.channels`
    under its lock, so that a map registering meanwhile is subscribed exactly once)."""


@dataclass(frozen=True, slots=True)
class Resubscribe:
    """SSUBSCRIBE again the maps whose subscription the server dropped (``Hub.take_lost``) on
    the live connection, or, on a Cluster, hand those whose slot moved to the listener of
    their new master. The other maps of the connection are not disturbed."""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Close the subscriber connection (errors are swallowed by the runner)."""


@dataclass(frozen=True, slots=True)
class Receive:
    """Wait up to ``timeout`` seconds for the subscriber connection to have data, then apply
    every event already there, in order (dispatched by :meth:`Hub.event`); returns how many.
    (The runner applies them itself, in one go, so that a reading thread may apply them too:
    see ``syncmap._listener``.)"""

    timeout: float


@dataclass(frozen=True, slots=True)
class PubsubPing:
    """Send PING ``token`` over the subscriber connection (answered by a ``pong`` event)."""

    token: str


@dataclass(frozen=True, slots=True)
class ReadMetas:
    """Read ``HMGET <meta> epoch seq`` of each key, on a connection other than the
    subscriber's (pipelined where the runner can); the result is one ``(epoch, seq)`` reply
    or one exception per key. Raises only if none could be read (the connection failed)."""

    keys: tuple[str, ...]


Event = tuple[str, bytes, Any]
"""(kind, channel, data): ("message", channel, payload) | ("subscribe", channel, None) |
("unsubscribe", channel, None) | ("pong", b"", token) | ("flush", b"", None)."""


class Member:
    """One map registered with a node's listener: its coherence state and channel.
    ``confirmed``: the server confirmed the map's subscription on the current connection.
    ``slot``: the map's Cluster slot (``None`` on a single server). ``relisten``: called with
    the listener that takes the map over (a Cluster map whose slot now lives elsewhere)."""

    __slots__ = ("channel", "confirmed", "keys", "relisten", "slot", "state")

    def __init__(self, state: Coherence, keys: MapKeys, slot: int | None = None) -> None:
        self.state = state
        self.keys = keys
        self.channel = keys.channel.encode()
        self.slot = slot
        self.confirmed = False
        self.relisten: Callable[[Any], None] | None = None

    def __repr__(self) -> str:
        return f"<Member {self.keys.name!r}>"


class Hub:
    """The listener's state for every map it serves (no I/O): who listens on which channel,
    and the one freshness probe in flight for all of them.

    The probe: every ``interval`` (the smallest ``max_staleness / 3`` of the maps), one PING
    ``token`` over the subscriber connection. Its PONG arrives after every message the server
    published to any channel of the connection before it processed the PING, so each map
    whose copy is synced is then proven current as of the probe's start (``fresh_until`` per
    map, by its own ``max_staleness``). A map with no base yet (just subscribed, or dropped)
    also reads its (epoch, seq) between the probe's start and the PING (``ReadMetas``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.by_channel: dict[bytes, tuple[Member, ...]] = {}
        self.members: tuple[Member, ...] = ()
        self.interval = math.inf
        self.timeout = math.inf
        self.token: str | None = None  # the probe in flight
        self.t0 = 0.0
        self.last_probe = -math.inf
        self.base_retry_at = -math.inf  # a failed base read is retried from then on
        self.unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBE sent, confirmation due
        self.wanted = False  # a map awaits its base: the runner ends its wait early
        self.lost: dict[int, Member] = {}  # maps whose subscription the server dropped
        # (a Cluster) told of a MOVED answer: the slot's new owner, "host:port"
        self.learn: Callable[[int, str], None] | None = None
        # the server sends flush notices (CLIENT TRACKING); if not, every probe reads every
        # synced map's seq (the only other way to notice a flush in time)
        self.flush_notices = True
        self._counter = 0
        self._audited = 0  # the synced maps' (epoch, seq) are read in turn, one per probe

    # ---- membership (the runner holds its lock) ----

    def add(self, member: Member) -> bool:
        """Register ``member``; whether its channel is new (to SSUBSCRIBE). A channel already
        confirmed on the connection confirms the newcomer at once."""
        others = self.by_channel.get(member.channel, ())
        self.by_channel[member.channel] = (*others, member)
        self._changed()
        if any(m.confirmed for m in others):
            member.confirmed = True
            member.state.on_subscribed()
            self.wanted = True
        return not others

    def remove(self, member: Member) -> bool:
        """Unregister ``member``; whether its channel has no listener left (to SUNSUBSCRIBE)."""
        others = tuple(m for m in self.by_channel.get(member.channel, ()) if m is not member)
        if others:
            self.by_channel[member.channel] = others
        else:
            self.by_channel.pop(member.channel, None)
        self._changed()
        member.confirmed = False
        return not others

    def _changed(self) -> None:
        self.members = tuple(m for ms in self.by_channel.values() for m in ms)
        states = [m.state for m in self.members]
        self.interval = min((s.probe_interval for s in states), default=math.inf)
        self.timeout = min((s.probe_timeout for s in states), default=math.inf)

    def channels(self) -> list[bytes]:
        """The channels to subscribe on a new connection (no member is confirmed on it)."""
        for member in self.members:
            member.confirmed = False
        self.unsubscribing.clear()
        self.lost.clear()
        self.token = None
        return list(self.by_channel)

    # ---- events of the subscriber connection ----

    def event(self, kind: str, channel: bytes, data: Any) -> None:
        if kind == "message":
            for member in self.by_channel.get(channel, ()):
                member.state.on_message(data)
        elif kind == "pong":
            self.on_pong(data)
        elif kind == "subscribe":
            for member in self.by_channel.get(channel, ()):
                if not member.confirmed:
                    member.state.on_subscribed()  # (first: a probe starting now must see
                    member.confirmed = True  # the copy reset, not reset it mid-way)
                    self.wanted = True
        elif kind == "unsubscribe":
            self.on_unsubscribed(channel)
        elif kind == "flush":
            self.resync("flush")

    def on_pong(self, token: str) -> None:
        if token != self.token:
            return  # a stale or foreign PONG
        self.token = None
        for member in self.members:
            member.state.on_pong(token)

    def on_unsubscribed(self, channel: bytes) -> None:
        pending = self.unsubscribing.get(channel, 0)
        if pending:
            if pending == 1:
                del self.unsubscribing[channel]
            else:
                self.unsubscribing[channel] = pending - 1
            return
        # the server dropped a map's channel (on a Cluster: the map's slot moved)
        self._lose(self.by_channel.get(channel, ()))

    def on_moved(self, slot: int) -> None:
        """The server answered an SSUBSCRIBE with MOVED: that slot lives elsewhere now."""
        self._lose([m for m in self.members if m.slot == slot])

    def _lose(self, members: Iterable[Member]) -> None:
        """These maps lost their subscription (the connection lives on): each drops its copy,
        and the runner subscribes it again (``Resubscribe``), where its slot lives."""
        for member in members:
            member.confirmed = False
            member.state.on_disconnect()
            self.lost[id(member)] = member

    def take_lost(self) -> list[Member]:
        """The maps to subscribe again (still registered), once each."""
        lost, self.lost = self.lost, {}
        return [m for m in lost.values() if m in self.by_channel.get(m.channel, ())]

    def resync(self, cause: str | None) -> None:
        """Drop every map's copy (a flush on the server, a stalled or failed listener)."""
        self.token = None
        self.wanted = True
        for member in self.members:
            member.state.resync(cause)

    def on_disconnect(self) -> None:
        self.token = None
        for member in self.members:
            member.confirmed = False
            member.state.on_disconnect()

    # ---- the probe ----

    def _needs_base(self, member: Member) -> bool:
        state = member.state
        return member.confirmed and not state.synced and state.probe_token is None

    def probe_due(self) -> bool:
        if self.token is not None or not self.members:
            return False
        now = self.clock()
        if now - self.last_probe >= self.interval:
            return True
        return now >= self.base_retry_at and any(map(self._needs_base, self.members))

    def probe_overdue(self) -> bool:
        return self.token is not None and self.clock() - self.t0 > self.timeout

    def start_probe(self) -> tuple[str, list[Member]]:
        """Start a probe: its token, and the members that read their (epoch, seq) for it:
        those with no base, and one synced map in turn (the audit: docs/contract.md §5)."""
        self._counter += 1
        self.wanted = False
        token = self.token = f"syncmap-probe-{self._counter}"
        self.t0 = self.last_probe = self.clock()
        reading: list[Member] = []
        synced: list[Member] = []
        for member in self.members:
            if not member.confirmed:
                continue  # its subscription confirmation resets it anyway
            state = member.state
            if state.synced or state.probe_token is None:
                state.start_probe(token)
                (synced if state.synced else reading).append(member)
        if synced and not self.flush_notices:
            reading.extend(synced)
        elif synced:
            self._audited += 1
            reading.append(synced[self._audited % len(synced)])
        return token, reading

    def wait(self) -> float:
        """How long the flow may wait for events before it has something to do."""
        left = self.interval - (self.clock() - self.last_probe)
        return max(0.001, min(MAX_WAIT, left))

    def synced(self) -> bool:
        return any(m.state.synced for m in self.members)


def apply_event(hub: Hub, event: Event | None) -> None:
    """One event of the subscriber connection, applied to the hub's maps."""
    if event is not None:
        hub.event(*event)


ListenOp = Op | Subscribe | Unsubscribe | Receive | PubsubPing | ReadMetas | Resubscribe
ListenFlow = Generator[ListenOp, Any, T]

MAX_WAIT = 0.05  # the runner checks for close() at least this often
BASE_RETRY = 0.05  # s: a failed base read is retried after this pause


def listen(hub: Hub, *, max_backoff: float = 2.0) -> ListenFlow[None]:
    """Run until closed (the runner stops sending). Never ends on bad data or lost servers."""
    backoff = 0.02
    while True:
        try:
            yield Subscribe()
            while True:
                if hub.lost:
                    yield Resubscribe()
                if hub.probe_overdue():
                    log.warning("syncmap: no PONG from the subscriber connection; reconnecting")
                    hub.resync("probe_timeout")
                    break
                if hub.probe_due():
                    yield from _probe(hub)
                got = yield Receive(hub.wait())
                if got or hub.synced():
                    backoff = 0.02  # the subscription works (events may be applied elsewhere)
        except SyncMapError as exc:
            log.warning("syncmap: subscriber connection lost: %s", exc)
            hub.on_disconnect()
        yield Unsubscribe()
        yield Sleep(backoff)
        backoff = min(backoff * 2, max_backoff)


def _probe(hub: Hub) -> ListenFlow[None]:
    """One probe for every map: the (epoch, seq) of those that have no base and of one
    synced map (in turn), then PING."""
    token, reading = hub.start_probe()
    if reading:
        try:
            replies = yield ReadMetas(tuple(m.keys.meta for m in reading))
        except SyncMapError as exc:
            log.debug("syncmap: freshness probe: reading %d seqs failed: %s", len(reading), exc)
            replies = [exc] * len(reading)
        for member, reply in zip(reading, replies, strict=True):
            state = member.state
            if isinstance(reply, BaseException):
                if not state.synced:  # read its base again after a pause (the copy stays
                    hub.base_retry_at = hub.clock() + BASE_RETRY  # dropped; the others go
                    state.cancel_probe()  # on being proven fresh meanwhile)
                log.debug("syncmap: freshness probe: reading %r's seq failed: %s", member, reply)
                continue
            epoch, seq = reply
            text = epoch.decode("utf-8", "replace") if isinstance(epoch, bytes) else epoch
            state.probe_read(token, text, int(seq or 0))
    yield PubsubPing(token)
