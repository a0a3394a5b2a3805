"""The points where tests sabotage or stall syncmap (to show what a mechanism prevents): one
:class:`Hooks` object per node, made with it and given to everything the node makes (each
map's :class:`~syncmap._core.coherence.Coherence` and :class:`~syncmap._core.map_flows.MapCore`,
each of its listeners). Tests reach it as ``node._hooks`` (or through any of those). Production
code never changes it, and as made it does nothing: no sabotage, ``running`` set (no stall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Flag", "Hooks", "new_hooks"]


class Flag(Protocol):
    """What the stall point's events offer (``threading.Event``, ``asyncio.Event``)."""

    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...


E = TypeVar("E", bound=Flag)


@dataclass(eq=False, slots=True)
class Hooks(Generic[E]):
    """A node's sabotage and stall points (``E``: the node's kind of event, a
    ``threading.Event`` or an ``asyncio.Event``)."""

    running: E
    """Set as made. Cleared: the node's listeners stall before their next operation, and
    reading threads (or the raw reader's callback) apply nothing meanwhile."""
    parked: Flag
    """Set while a listener waits on ``running`` (a ``threading.Event``: other threads wait on
    it)."""
    fill_guard: bool = True
    """``False``: no fill-race placeholder (a fetch's answer is installed even when a change
    of its key was applied meanwhile): the race the placeholder prevents."""
    fill_hook: Callable[[str], Any] | None = None
    """Called with the key between a fetch's answer and its install (its result is awaited
    on an asyncio map): widens or holds the window of the fill race."""
    answered: Callable[[], bool] | None = None
    """Replaces a blocking map's check of whether a command's answer is in already (then the
    writer does not apply waiting change messages meanwhile): ``lambda: True`` acts as a
    machine where the server always answers before the writer looks (one CPU)."""

    def restart(self, running: Callable[[], E], parked: Callable[[], Flag]) -> None:
        """New events (``running`` set), as made: in a forked child, whose copies of the
        parent's may hold a lock a thread of the parent held."""
        self.running, self.parked = _set(running()), parked()


def new_hooks(running: Callable[[], E], parked: Callable[[], Flag]) -> Hooks[E]:
    """Hooks that do nothing, their events made by ``running`` (``threading.Event`` or
    ``asyncio.Event``: the node's kind) and ``parked`` (``threading.Event``)."""
    return Hooks(_set(running()), parked())


def _set(flag: E) -> E:
    flag.set()
    return flag
