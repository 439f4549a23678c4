"""Allowed values of numeric options, stated once: the library refuses them, the CLI builds its ranges from them.

Pure rules, no I/O. A value is checked where the library receives it, so a Python caller
gets the same refusal as the command line.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .errors import AdapterHubError


class Range(NamedTuple):
    """min <= x <= max (x < max when max_open); None is unbounded. `also` is one value outside
    the range that means something of its own (-1: all)."""

    min: float | None
    max: float | None
    max_open: bool = False
    also: int | None = None


COUNT = Range(1, None)  # ranks, token counts, steps: at least one
WEIGHT = Range(None, None)  # any finite number


def problem(flag: str, value: object, allowed: Range, floating: bool = False) -> str | None:
    """Why `value` is not allowed for `flag`, or None when it is."""
    import numbers  # here, not at the top: the CLI imports this module for its ranges, and numbers costs 3 ms

    if floating:
        # bool is an int to Python, but `--scale true` is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{flag} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{flag} must be a finite number, got {value!r}"
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"{flag} must be a whole number, got {value!r}"
    if allowed.also is not None and value == allowed.also:
        return None
    low = allowed.min is not None and value < allowed.min
    high = allowed.max is not None and (value >= allowed.max if allowed.max_open else value > allowed.max)
    if not (low or high):
        return None
    if allowed.min is not None and allowed.max is not None and floating:
        wanted = f"in [{allowed.min}, {allowed.max}{')' if allowed.max_open else ']'}"
    elif low:
        wanted = f"at least {allowed.min}"
    else:
        wanted = f"{'below' if allowed.max_open else 'at most'} {allowed.max}"
    if allowed.also is not None:
        wanted += f", or {allowed.also} for all"
    return f"{flag} must be {wanted} (got {value!r})"


def require(flag: str, value: object, allowed: Range = COUNT, floating: bool = False, hint: str | None = None) -> None:
    """Raise AdapterHubError when `value` is not allowed for `flag`."""
    why = problem(flag, value, allowed, floating)
    if why:
        raise AdapterHubError(why, hint=hint or f"give {flag} a value in its range")
