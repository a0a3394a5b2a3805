"""The listener of one SyncMap as a flow: subscribe, apply change messages, prove freshness,
reconnect with backoff. The blocking runner (a thread) and the asyncio runner (a task) in
``syncmap._listener`` differ only in how they wait; every decision is here or in
:class:`~syncmap._core.coherence.Coherence`.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from .._errors import SyncMapError
from .coherence import Coherence
from .keys import MapKeys
from .ops import Command, Op, Sleep

__all__ = [
    "Event",
    "ListenFlow",
    "ListenOp",
    "PubsubPing",
    "Receive",
    "Subscribe",
    "Unsubscribe",
    "apply_event",
    "listen",
]

log = logging.getLogger("syncmap.map")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Open a fresh subscriber connection and SUBSCRIBE to ``channel``."""

    channel: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Close the subscriber connection (errors are swallowed by the runner)."""


@dataclass(frozen=True, slots=True)
class Receive:
    """Wait up to ``timeout`` seconds for the subscriber connection to have data, then apply
    every event already there, in order, with :func:`apply_event`; returns how many. (The
    runner applies them itself, in one go, so that a reading thread may apply them too: see
    ``syncmap._listener``.)"""

    timeout: float


@dataclass(frozen=True, slots=True)
class PubsubPing:
    """Send PING ``token`` over the subscriber connection (answered by a ``pong`` event)."""

    token: str


Event = tuple[str, bytes]
"""("message", data) | ("subscribe", b"") | ("pong", token) — anything else is dropped."""


def apply_event(state: Coherence, event: Event | None) -> None:
    """One event of the subscriber connection, applied to the coherence state."""
    if event is None:
        return
    kind, data = event
    if kind == "message":
        state.on_message(data)
    elif kind == "pong":
        state.on_pong(data.decode("utf-8", "replace"))
    elif kind == "subscribe":
        state.on_subscribed()


ListenOp = Op | Subscribe | Unsubscribe | Receive | PubsubPing
ListenFlow = Generator[ListenOp, Any, T]

MAX_WAIT = 0.05  # the runner checks for close() at least this often


def listen(state: Coherence, keys: MapKeys, *, max_backoff: float = 2.0) -> ListenFlow[None]:
    """Run until closed (the runner stops sending). Never ends on bad data or lost servers."""
    backoff = 0.02
    while True:
        try:
            yield Subscribe(keys.channel)
            while True:
                if state.probe_overdue():
                    log.warning("syncmap: no PONG from the subscriber connection; reconnecting")
                    state.resync("probe_timeout")
                    break
                if state.probe_due():
                    ok = yield from _probe(state, keys)
                    if not ok:  # retried after a pause, or at the next interval if synced
                        pause = min(0.05, state.probe_interval)
                        # (the probe's connection is not the subscriber's: a synced copy goes
                        # on applying change messages meanwhile; an unsynced one has no use
                        # for them, and its next probe is due at once)
                        yield Receive(pause) if state.synced else Sleep(pause)
                        continue
                wait = state.probe_interval - (state.clock() - state.last_probe)
                got = yield Receive(max(0.001, min(MAX_WAIT, wait)))
                if got or state.synced:
                    backoff = 0.02  # the subscription works (events may be applied elsewhere)
        except SyncMapError as exc:
            log.warning("syncmap: subscriber connection for map %r lost: %s", keys.name, exc)
            state.on_disconnect()
        yield Unsubscribe()
        yield Sleep(backoff)
        backoff = min(backoff * 2, max_backoff)


def _probe(state: Coherence, keys: MapKeys) -> ListenFlow[bool]:
    """Read the server's (epoch, seq), then PING through the subscriber connection: its PONG
    (``state.on_pong``) arrives after every message published before the read."""
    token = state.start_probe()
    try:
        epoch, seq = yield Command(("HMGET", keys.meta, "epoch", "seq"))
    except SyncMapError as exc:
        log.debug("syncmap: freshness probe of %r failed: %s", keys.name, exc)
        state.cancel_probe()
        return False
    text = epoch.decode("utf-8", "replace") if isinstance(epoch, bytes) else epoch
    state.probe_read(token, text, int(seq or 0))
    yield PubsubPing(token)
    return True
