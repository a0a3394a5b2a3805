"""The points where tests sabotage or stall syncmap (to show what a mechanism prevents), as one
object per map and one per listener, given to it when it is made. Production code leaves
the defaults, which do nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["ListenerHooks", "MapHooks", "asyncio_listener_hooks", "blocking_listener_hooks"]

E = TypeVar("E", threading.Event, asyncio.Event)


@dataclass(eq=False, slots=True)
class MapHooks:
    """A map's (its :class:`~syncmap._core.coherence.Coherence` and
    :class:`~syncmap._core.map_flows.MapCore` share it)."""

    fill_guard: bool = True
    """``False``: no fill-race placeholder (a fetch's answer is installed even when a change
    of its key was applied meanwhile): the race the placeholder prevents."""
    fill_hook: Callable[[str], Any] | None = None
    """Called with the key between a fetch's answer and its install (its result is awaited
    on an asyncio map): widens or holds the window of the fill race."""


@dataclass(eq=False, slots=True)
class ListenerHooks(Generic[E]):
    """A listener's stall point. Clearing ``running`` stalls the listener before its next
    operation, and reading threads (or the raw reader's callback) apply nothing meanwhile;
    ``parked`` is set while it waits. An asyncio listener's ``running`` is an
    :class:`asyncio.Event` (cleared and set in its loop)."""

    running: E
    parked: threading.Event = field(default_factory=threading.Event)


def blocking_listener_hooks() -> ListenerHooks[threading.Event]:
    running = threading.Event()
    running.set()
    return ListenerHooks(running)


def asyncio_listener_hooks() -> ListenerHooks[asyncio.Event]:
    running = asyncio.Event()
    running.set()
    return ListenerHooks(running)
