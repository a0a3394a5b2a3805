"""Retry strategies for obtaining a lock, as small values (bsm/redislock's four, in Python).

A strategy is any *iterable of backoff seconds*: each attempt sequence calls ``iter()`` on it
and so gets fresh state; the sequence ends (the obtain gives up) when the iterator is exhausted.
So a plain list ``[0.01, 0.05, 0.2]`` is a strategy too, and writing your own is writing
``__iter__``. (A one-shot generator object works once only; pass a class with ``__iter__``.)

With syncmap's locks a backoff is an *upper bound* on the wait before the next attempt: a
waiter is woken as soon as the lock is handed to it, so backoffs only pace the polling
fallback and the number of attempts.

``ExponentialBackoff`` follows redislock: the n-th backoff is ``2**(n+1)`` ms (4, 8, 16 ms...),
clamped to ``[min, max]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, repeat

from .._errors import InvalidArgument
from .validate import check_seconds

__all__ = [
    "ExponentialBackoff",
    "LimitRetry",
    "LinearBackoff",
    "NoRetry",
    "RetryStrategy",
    "check_strategy",
]

RetryStrategy = Iterable[float]
"""Anything iterable whose items are backoff seconds (finite, >= 0)."""


def check_strategy(strategy: object) -> RetryStrategy:
    """``strategy`` if it is iterable (a string is not), else :class:`InvalidArgument`."""
    if isinstance(strategy, str | bytes) or not isinstance(strategy, Iterable):
        raise InvalidArgument(
            f"retry must be a retry strategy (an iterable of backoff seconds), "
            f"not {type(strategy).__name__}"
        )
    return strategy


@dataclass(frozen=True, slots=True)
class NoRetry:
    """Try once."""

    def __iter__(self) -> Iterator[float]:
        return iter(())


@dataclass(frozen=True, slots=True)
class LinearBackoff:
    """Retry every ``interval`` seconds (until the obtain's deadline)."""

    interval: float

    def __post_init__(self) -> None:
        check_seconds(self.interval, "LinearBackoff interval", low_ok=True)

    def __iter__(self) -> Iterator[float]:
        return repeat(float(self.interval))


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """Back off 4 ms, 8 ms, 16 ms... clamped to ``[min, max]`` seconds."""

    min: float
    max: float

    def __post_init__(self) -> None:
        low = check_seconds(self.min, "ExponentialBackoff min", low_ok=True)
        high = check_seconds(self.max, "ExponentialBackoff max", low_ok=True)
        if high < low:
            raise InvalidArgument(f"ExponentialBackoff max ({high}) is below min ({low})")

    def __iter__(self) -> Iterator[float]:
        n = 1
        while True:
            yield min(max(2.0 ** min(n + 1, 40) / 1000.0, self.min), self.max)
            n += 1


@dataclass(frozen=True, slots=True)
class LimitRetry:
    """At most ``limit`` retries of ``strategy``."""

    strategy: RetryStrategy
    limit: int

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise InvalidArgument(f"LimitRetry limit must be an int >= 0, not {self.limit!r}")

    def __iter__(self) -> Iterator[float]:
        return islice(iter(self.strategy), self.limit)
