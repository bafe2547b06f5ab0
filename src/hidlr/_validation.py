"""One place for argument checks, so every error reads the same way.

Messages have the shape ``"<name> must be <what is accepted>, got <value>"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn

import torch
from torch.optim import Optimizer

from hidlr._probing import byte_span, overlap


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


# packages whose optimizers use one step size for all param groups: they refuse different lr
# values per group (Prodigy, DAdaptAdam, DAdaptSGD, DAdaptLion) or read the first group's
# only (DAdaptAdaGrad, DAdaptAdan), so Hi-DLR can only give them one rate (one group)
_SHARED_STEP_SIZE = ("prodigyopt", "dadaptation")


def check_no_shared_memory(groups: list[dict[str, Any]]) -> None:
    """Hi-DLR moves each parameter on its own: two that overlap in memory (tied by sharing
    ``.data`` rather than by being one ``Parameter``) would be moved twice and come apart."""
    spans = []
    for i, group in enumerate(groups):
        for j, p in enumerate(group["params"]):
            if (span := byte_span(p)) is not None:
                spans.append((*span, i, j, p))
    spans.sort(key=lambda s: s[:2])
    open_spans: list[tuple[int, int, int, int, torch.Tensor]] = []
    for start, end, k, l, q in spans:  # a sweep: only spans whose ranges overlap are compared
        open_spans = [s for s in open_spans if s[1] > start]
        for _, _, i, j, p in open_spans:
            if not overlap(p, q):  # interleaved views: no element in common
                continue
            raise ValueError(
                f"param_groups[{i}]['params'][{j}] and param_groups[{k}]['params'][{l}] share "
                "memory: Hi-DLR moves each parameter on its own; tie them as one Parameter "
                "(e.g. decoder.weight = encoder.weight) instead of sharing .data"
            )
        open_spans.append((start, end, k, l, q))


def check_per_group_rates(optimizer: Optimizer) -> None:
    cls = type(optimizer)
    shared = any(c.__module__.partition(".")[0] in _SHARED_STEP_SIZE for c in cls.__mro__)
    if shared and len(optimizer.param_groups) > 1:
        raise ValueError(
            f"optimizer must accept a different lr per param group for Hi-DLR to adapt them; "
            f"{cls.__name__} shares one step size across groups and refuses that, got "
            f"{len(optimizer.param_groups)} groups: give it a single param group (one adapted "
            "rate, Hi-ULR), or use a base optimizer with per-group rates (SGD, Adam(W), ...)"
        )
