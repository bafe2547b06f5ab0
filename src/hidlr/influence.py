"""Group influence (the loss decrease a group's own step buys) and which groups to freeze.

The quadratic fitted along group k's direction, ``L0 - b xi + A xi^2 / 2``, predicts that
the group's own optimal step lowers the loss by ``b^2 / (2 A)`` (zero when the group's step
does not descend or the fit is not convex). Averaged over probe steps it ranks the groups;
the ones whose share of the total stays small can be frozen: a parameter-efficient
fine-tuning that picks its trainable parameters from the task itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["choose_frozen", "predicted_decrease", "update_influence"]


def predicted_decrease(b: float, a: float) -> float:
    """``b^2 / (2A)`` for a convex, descending fit; 0 otherwise (NaN inputs give 0)."""
    return b * b / (2.0 * a) if (a > 0 and b > 0) else 0.0


def update_influence(value: float, n_before: int, decrease: float, smoothing: float) -> float:
    """Bias-corrected exponential average: the first sample replaces ``value``."""
    weight = (1.0 - smoothing) / (1.0 - smoothing ** (n_before + 1))
    return value + weight * (decrease - value)


def choose_frozen(
    influence: Sequence[float],
    frozen: Sequence[bool],
    *,
    threshold: float | None,
    budget: int | None,
) -> list[int]:
    """Indices of the groups to freeze now.

    ``threshold``: freeze every unfrozen group whose share of the unfrozen groups' total
    influence is below it. ``budget``: keep only the ``budget`` most influential unfrozen
    groups. The most influential group is never frozen; ties keep the earlier group.
    """
    live = [k for k, f in enumerate(frozen) if not f]
    if len(live) <= 1:
        return []
    ranked = sorted(live, key=lambda k: (-influence[k], k))
    keep = set(ranked[:1])
    out: set[int] = set()
    total = sum(max(influence[k], 0.0) for k in live)
    if threshold is not None and total > 0 and math.isfinite(total):
        out |= {k for k in live if influence[k] / total < threshold}
    if budget is not None:
        out |= set(ranked[max(budget, 1) :])
    return sorted(out - keep)
