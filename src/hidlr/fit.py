"""The math of Hi-DLR as small pure functions: the quadratic fit and the rate update.

Notation (paper, eqs. 2.3-3.2). Group k moves along its base-optimizer direction ``u_k`` (the
parameter change of one base step at unit rate). Probing evaluates the loss at

    L(w + sum_k xi_k u_k) ~= L0 - sum_k b_k xi_k + 1/2 sum_kl A_kl xi_k xi_l,

so ``b_k = -G_k' u_k`` (the descent along group k's direction) and ``A_kl = u_k' H_kl u_l``.
The diagonal model (eq. 3.1) keeps ``A_kk`` only and is minimised per group at
``eta_k* = b_k / A_kk`` (eq. 3.2); the coupled model (eq. 2.4) solves ``A eta* = b``.

Probe offsets are given in units of the current rate (``xi_k = s_k * eta_k``) so that the
least-squares problem is well conditioned whatever the scale of the rates; the results are
mapped back to rate units. Everything here runs in float64 on the CPU: K is small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["QuadraticFit", "RateDecision", "fit_quadratic", "propose_rates"]


@dataclass(frozen=True)
class QuadraticFit:
    """Least-squares quadratic model of the loss along the groups' directions, in rate units.

    ``b[k]`` and ``A[k][l]`` are NaN for groups that took no part in the fit; ``r2[k]`` is
    the coefficient of determination on group k's own probes (NaN when they are all equal).
    """

    intercept: float
    b: tuple[float, ...]
    A: tuple[tuple[float, ...], ...]
    r2: tuple[float, ...]
    coupled: bool


@dataclass(frozen=True)
class RateDecision:
    """What the fit proposes for one group and whether it is taken."""

    proposed: float
    accepted: bool
    reason: str


def _design(offsets: torch.Tensor, groups: Sequence[int], coupled: bool) -> torch.Tensor:
    """Columns: intercept, -s_k (b), s_k^2 / 2 (A_kk), s_k s_l for k < l (A_kl, coupled)."""
    cols = [torch.ones(offsets.shape[0], dtype=torch.float64)]
    cols += [-offsets[:, k] for k in groups]
    cols += [0.5 * offsets[:, k] ** 2 for k in groups]
    if coupled:
        cols += [
            offsets[:, k] * offsets[:, l] for i, k in enumerate(groups) for l in groups[i + 1 :]
        ]
    return torch.stack(cols, dim=1)


def fit_quadratic(
    offsets: torch.Tensor,
    losses: torch.Tensor,
    rates: Sequence[float],
    *,
    coupled: bool = False,
) -> QuadraticFit:
    """Fit ``L(s) = c - sum_k b_k s_k + 1/2 sum_kl A_kl s_k s_l`` to probe losses.

    Args:
        offsets: ``(n, K)`` probe offsets in units of each group's rate (the multipliers).
        losses: ``(n,)`` probe losses; rows with a non-finite loss are left out, and so is
            every group that has such a row.
        rates: the K rates the offsets are measured in; results are returned in rate units.
        coupled: fit the off-diagonal ``A_kl`` too (needs probes that move two groups).

    The intercept is shared by all groups, so no unperturbed loss is needed.
    """
    offsets = offsets.to(torch.float64)
    losses = losses.to(torch.float64)
    n_groups = offsets.shape[1]
    moved = offsets != 0
    finite = torch.isfinite(losses)
    bad = (moved & ~finite[:, None]).any(dim=0)
    groups = [k for k in range(n_groups) if moved[:, k].any() and not bad[k]]
    nan = float("nan")
    empty = QuadraticFit(
        nan,
        (nan,) * n_groups,
        tuple((nan,) * n_groups for _ in range(n_groups)),
        (nan,) * n_groups,
        coupled,
    )
    if not groups:
        return empty
    keep = finite & ~(moved[:, [k for k in range(n_groups) if k not in groups]].any(dim=1))
    x, y = _design(offsets[keep], groups, coupled), losses[keep]
    if x.shape[0] < x.shape[1]:
        return empty
    coef = torch.linalg.lstsq(x, y[:, None], driver="gelsd").solution[:, 0]
    pred = x @ coef
    m = len(groups)
    b = [nan] * n_groups
    a = [[nan] * n_groups for _ in range(n_groups)]
    r2 = [nan] * n_groups
    pairs = iter(coef[1 + 2 * m :].tolist())
    for i, k in enumerate(groups):
        b[k] = coef[1 + i].item() / rates[k]
        a[k][k] = coef[1 + m + i].item() / rates[k] ** 2
        if coupled:
            for l in groups[i + 1 :]:
                a[k][l] = a[l][k] = next(pairs) / (rates[k] * rates[l])
        else:
            for l in groups:
                if l != k:
                    a[k][l] = 0.0
        own = moved[keep][:, k] & (moved[keep].sum(dim=1) == 1)
        ss_tot = ((y[own] - y[own].mean()) ** 2).sum().item()
        ss_res = ((y[own] - pred[own]) ** 2).sum().item()
        r2[k] = 1.0 - ss_res / ss_tot if ss_tot > 0 else nan
    return QuadraticFit(
        coef[0].item(), tuple(b), tuple(tuple(row) for row in a), tuple(r2), coupled
    )


def _check(b: float, a: float, r2: float, min_r2: float) -> str:
    if math.isnan(b):
        return "nonfinite_probe"
    if math.isnan(r2):
        return "flat"
    if not a > 0:
        return "not_convex"
    if not b > 0:
        return "not_descent"
    if not r2 > min_r2:
        return "poor_fit"
    return "accepted"


def propose_rates(fit: QuadraticFit, *, min_r2: float) -> list[RateDecision]:
    """The rates the fit proposes and whether each passes the guards of Algorithm 1.

    Diagonal: ``b_k / A_kk`` when ``A_kk > 0``, ``b_k > 0`` and ``R^2_k > min_r2``.
    Coupled: ``A^{-1} b`` over the fitted groups when every group passes the same checks
    on its own probes, ``A`` is positive definite and every proposed rate is positive;
    otherwise no group of the fit is updated.
    """
    n = len(fit.b)
    checks = [_check(fit.b[k], fit.A[k][k], fit.r2[k], min_r2) for k in range(n)]
    if not fit.coupled:
        return [
            RateDecision(
                fit.b[k] / fit.A[k][k] if c == "accepted" else float("nan"), c == "accepted", c
            )
            for k, c in enumerate(checks)
        ]
    fitted = [k for k in range(n) if checks[k] != "nonfinite_probe"]
    nan = float("nan")
    decisions = [RateDecision(nan, False, c) for c in checks]
    if not fitted or any(checks[k] != "accepted" for k in fitted):
        return decisions
    a = torch.tensor([[fit.A[k][l] for l in fitted] for k in fitted], dtype=torch.float64)
    b = torch.tensor([fit.b[k] for k in fitted], dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:
        return [
            RateDecision(nan, False, "not_convex" if k in fitted else c)
            for k, c in enumerate(checks)
        ]
    eta = torch.cholesky_solve(b[:, None], chol)[:, 0].tolist()
    if not all(e > 0 and math.isfinite(e) for e in eta):
        return [
            RateDecision(nan, False, "not_descent" if k in fitted else c)
            for k, c in enumerate(checks)
        ]
    for k, e in zip(fitted, eta, strict=True):
        decisions[k] = RateDecision(e, True, "accepted")
    return decisions


def smooth_rate(
    old: float, proposed: float, *, smoothing: float, max_change: float | None
) -> float:
    """Algorithm 1, line 15: ``smoothing * old + (1 - smoothing) * proposed``, then the ratio to
    the old rate clipped to ``[1 / max_change, max_change]`` when a bound is set."""
    new = smoothing * old + (1.0 - smoothing) * proposed
    if max_change is not None:
        new = min(max(new, old / max_change), old * max_change)
    return new
