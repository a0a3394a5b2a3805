"""The points where tests sabotage or stall syncmap (to show what a mechanism prevents), as one
object per map and one per listener, given to it when it is made. Production code never
changes them, and as made they do nothing (no sabotage; ``running`` set: no stall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Flag", "ListenerHooks", "MapHooks"]


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


class Flag(Protocol):
    """What the listener hooks' events offer (``threading.Event``, ``asyncio.Event``)."""

    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...


E = TypeVar("E", bound=Flag)


@dataclass(eq=False, slots=True)
class ListenerHooks(Generic[E]):
    """A listener's stall point (the listener makes its events: a ``threading.Event`` for
    ``parked``, and one of its own kind for ``running``, set). Clearing ``running`` stalls the
    listener before its next operation, and reading threads (or the raw reader's callback)
    apply nothing meanwhile; ``parked`` is set while it waits."""

    running: E
    parked: Flag
