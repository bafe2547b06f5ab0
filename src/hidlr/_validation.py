"""One place for argument checks, so every error reads the same way.

Messages have the shape ``"<name> must be <what is accepted>, got <value>"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn


def _fail(name: str, accepted: str, value: Any, exc: type[Exception] = ValueError) -> NoReturn:
    raise exc(f"{name} must be {accepted}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    accepted = "an int" + (f" >= {minimum}" if minimum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, accepted, value, TypeError)
    if minimum is not None and value < minimum:
        _fail(name, accepted, value)
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check a finite real number in an interval; open ends are excluded."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    accepted = "a finite float" + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, accepted, value, TypeError)
    x = float(value)
    if not math.isfinite(x):
        _fail(name, accepted, value)
    if low is not None and (x < low or (low_open and x == low)):
        _fail(name, accepted, value)
    if high is not None and (x > high or (high_open and x == high)):
        _fail(name, accepted, value)
    return x


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    options = tuple(choices)
    if value not in options:
        _fail(name, "one of " + ", ".join(repr(c) for c in options), value)
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, "a bool", value, TypeError)
    return value


def check_multipliers(value: Any) -> tuple[float, ...]:
    accepted = (
        "a sequence of distinct finite numbers, one of them > 0: at least 3 non-zero, or 2 "
        "non-zero and 0"
    )
    try:
        mults = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"probe_multipliers must be {accepted}, got {value!r}") from None
    nonzero = [m for m in mults if m != 0]
    ok = (
        len(set(mults)) == len(mults)
        and all(math.isfinite(m) for m in mults)
        and any(m > 0 for m in mults)
        and (len(nonzero) >= 3 or (len(nonzero) == 2 and len(mults) == 3))
    )
    if not ok:
        raise ValueError(f"probe_multipliers must be {accepted}, got {value!r}")
    return mults
