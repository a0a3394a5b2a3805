"""The one check of a duration argument (TTL, timeout, backoff, staleness bound): every call
site states its own bounds, and every error reads the same way."""

from __future__ import annotations

import math
import numbers

from .._errors import InvalidArgument

__all__ = ["check_seconds"]

_INF = math.inf
_EXACT = 2**53  # ints below this convert to float exactly (and never overflow)


def _number(bound: float) -> str:
    bound = float(bound)
    return str(int(bound)) if bound.is_integer() else repr(bound)


def check_seconds(
    value: object,
    what: str,
    *,
    low: float = 0.0,
    low_ok: bool = False,
    high: float = math.inf,
    or_none: bool = False,
    expected: str | None = None,
) -> float:
    """``value`` as float seconds: a real number (not a bool), finite, above ``low`` (or equal
    to it when ``low_ok``) and at most ``high``; else :class:`InvalidArgument` naming ``what``.

    ``or_none`` says, in the message, that the call site also takes ``None`` (it handles
    ``None`` itself); ``expected`` replaces the message's description of the accepted range.
    """
    kind = type(value)
    if kind is float:  # the hot paths
        if low < value <= high and value < _INF:  # type: ignore[operator]
            return value  # type: ignore[return-value]
    elif kind is int and low < value <= high and value < _EXACT:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    if (kind is not float and kind is not int) and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        nullable = " or None" if or_none else ""
        raise InvalidArgument(
            f"{what} must be a number of seconds{nullable}, not {type(value).__name__}"
        )
    try:
        seconds = float(value)  # type: ignore[arg-type]  # (a numbers.Real, checked above)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if seconds > low or (low_ok and seconds == low):
        if seconds <= high and seconds != math.inf:
            return seconds
        if seconds != math.inf:
            raise InvalidArgument(f"{what} of {value!r} s is over the limit of {_number(high)} s")
    if expected is None:
        expected = f"a finite number of seconds {'>=' if low_ok else '>'} {_number(low)}"
    raise InvalidArgument(f"{what} must be {expected}, not {value!r}")
