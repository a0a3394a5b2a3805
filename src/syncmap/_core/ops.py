"""The requests a core flow can make of its driver.

A *flow* is a generator: it yields an operation, the driver performs it and sends the result
back in (or throws the translated error in), until the flow returns its answer. The sync and
asyncio drivers are each a few lines (``syncmap._driver``); all decisions stay in the flow.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Batch", "Command", "Flow", "Op", "Script", "Sleep"]

T = TypeVar("T")


# Command and Script are made for every server round trip: plain (not frozen) dataclasses,
# whose __init__ costs a fifth of a frozen one's. Treat every operation as immutable.


@dataclass(slots=True)
class Command:
    """Run one server command, e.g. ``Command(("GET", key))``.

    ``idempotent``: running it twice has the effect of running it once, so a driver may resend
    it when the connection fails before the answer. Otherwise the driver raises
    :class:`~syncmap.OutcomeUnknown` instead of guessing."""

    args: tuple[Any, ...]
    idempotent: bool = True


@dataclass(slots=True)
class Script:
    """Run the Lua script ``lua/<name>.lua`` with ``keys`` and ``args`` (EVALSHA, loaded once).
    ``idempotent`` as for :class:`Command`.

    ``then``: a blocking command (``BLPOP``) sent in the same write, right behind the script,
    so that running the script and starting to wait cost one round trip; the result is then
    the pair (the script's reply, the command's reply). When the script fails, the driver drops
    the connection rather than wait out the command behind it; when the connection fails
    during the wait, after the script's reply, the wait is answered ``None`` (as if it timed
    out): the script's effect is known, and the flow's next attempt finds what a lost answer
    would have said."""

    name: str
    keys: tuple[Any, ...]
    args: tuple[Any, ...]
    idempotent: bool = True
    then: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Run several scripts in one round trip (sent in one write, answered in order). The
    result is a list with one entry per script: its reply, or the (translated) error it
    answered, so the flow can settle each one. A script answered NOSCRIPT, MOVED, ASK or
    TRYAGAIN did not run: the driver runs it again on its own. When the connection fails,
    the batch is resent once if every script in it is idempotent, else
    :class:`~syncmap.OutcomeUnknown` is raised for the whole batch."""

    scripts: tuple[Script, ...]

    @property
    def idempotent(self) -> bool:
        return all(s.idempotent for s in self.scripts)


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` (a thread sleeps; a task awaits)."""

    seconds: float


Op = Command | Script | Batch | Sleep
Flow = Generator[Op, Any, T]
