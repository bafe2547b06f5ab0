"""The quadratic fit of Hi-DLR (eq. 3.1) and the rates it proposes (eq. 3.2), as pure functions.

Notation (paper, eqs. 2.3-3.2). Group k moves along its base-optimizer direction ``u_k`` (the
parameter change of one base step at unit rate). Probing evaluates the loss at

    L(w + sum_k xi_k u_k) ~= L0 - sum_k b_k xi_k + 1/2 sum_kl A_kl xi_k xi_l,

so ``b_k = -G_k' u_k`` (the descent along group k's direction) and ``A_kl = u_k' H_kl u_l``.
The diagonal model (eq. 3.1) keeps ``A_kk`` only and is minimised per group at
``eta_k* = b_k / A_kk`` (eq. 3.2); the coupled model (eq. 2.4) solves ``A eta* = b``.

Probe offsets are given in units of the current rate (``xi_k = s_k * eta_k``) so that the
least-squares problem is well conditioned whatever the scale of the rates; the results are
mapped back to rate units. Everything here runs in float64 on the CPU: K is small.
How a proposal moves a rate (the paper's smoothing, the robust policy) is :mod:`hidlr.rates`.
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
    spread: tuple[float, ...] = ()


@dataclass(frozen=True)
class RateDecision:
    """What the fit proposes for one group and whether it is taken."""

    proposed: float
    accepted: bool
    reason: str


SMALL_FIT = 9  # unknowns up to which the fit runs in Python floats (K <= 4 groups, diagonal)


def _design_row(row: Sequence[float], groups: Sequence[int], coupled: bool) -> list[float]:
    """Columns: intercept, -s_k (b), s_k^2 / 2 (A_kk), s_k s_l for k < l (A_kl, coupled)."""
    out = [1.0] + [-row[k] for k in groups] + [0.5 * row[k] * row[k] for k in groups]
    if coupled:
        out += [row[k] * row[l] for i, k in enumerate(groups) for l in groups[i + 1 :]]
    return out


def _solve_householder(x: list[list[float]], y: list[float]) -> list[float] | None:
    """Least squares by Householder QR in Python floats (backward stable, as LAPACK's);
    ``None`` when the design is (nearly) rank deficient. For the few unknowns of a default
    probe step this costs tens of microseconds where a LAPACK call costs a fraction of a
    millisecond."""
    n, p = len(x), len(x[0])
    cols = [[row[j] for row in x] for j in range(p)] + [list(y)]  # column-major, y last
    scale = max(math.sqrt(sum(v * v for v in c)) for c in cols[:p])
    for j in range(p):
        head = cols[j]
        norm = math.sqrt(sum(head[i] * head[i] for i in range(j, n)))
        if not norm > 1e-12 * scale:
            return None
        alpha = -norm if head[j] > 0 else norm
        v = [0.0] * j + [head[j] - alpha] + head[j + 1 :]
        vv = sum(v[i] * v[i] for i in range(j, n))
        for c in cols[j:]:
            f = 2.0 * sum(v[i] * c[i] for i in range(j, n)) / vv
            for i in range(j, n):
                c[i] -= f * v[i]
    coef = [0.0] * p
    for i in reversed(range(p)):
        rest = sum(cols[k][i] * coef[k] for k in range(i + 1, p))
        coef[i] = (cols[p][i] - rest) / cols[i][i]
    return coef


def _lstsq(x: list[list[float]], y: list[float]) -> list[float]:
    """Minimum-norm least squares: Python floats for small problems, LAPACK's SVD-based
    ``gelsd`` for large or rank-deficient ones."""
    if len(x[0]) <= SMALL_FIT:
        coef = _solve_householder(x, y)
        if coef is not None:
            return coef
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(xt, yt, driver="gelsd").solution[:, 0].tolist()


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
    rows = offsets.to(torch.float64).tolist()
    ys = losses.to(torch.float64).tolist()
    n_groups = offsets.shape[1]
    finite = [math.isfinite(v) for v in ys]
    movers = [[k for k in range(n_groups) if r[k] != 0] for r in rows]
    bad = {k for r, ok in zip(movers, finite, strict=True) if not ok for k in r}
    moved = {k for r in movers for k in r}
    groups = [k for k in range(n_groups) if k in moved and k not in bad]
    nan = float("nan")
    empty = QuadraticFit(
        nan,
        (nan,) * n_groups,
        tuple((nan,) * n_groups for _ in range(n_groups)),
        (nan,) * n_groups,
        coupled,
        (nan,) * n_groups,
    )
    if not groups:
        return empty
    fitted = set(groups)
    keep = [
        i for i, (r, ok) in enumerate(zip(movers, finite, strict=True)) if ok and set(r) <= fitted
    ]
    x = [_design_row(rows[i], groups, coupled) for i in keep]
    y = [ys[i] for i in keep]
    if len(x) < len(_design_row([0.0] * n_groups, groups, coupled)):
        return empty
    coef = _lstsq(x, y)
    pred = [sum(c * v for c, v in zip(coef, r, strict=True)) for r in x]
    m = len(groups)
    b = [nan] * n_groups
    a = [[nan] * n_groups for _ in range(n_groups)]
    r2 = [nan] * n_groups
    spread = [nan] * n_groups
    pairs = iter(coef[1 + 2 * m :])
    for i, k in enumerate(groups):
        b[k] = coef[1 + i] / rates[k]
        a[k][k] = coef[1 + m + i] / rates[k] ** 2
        if coupled:
            for l in groups[i + 1 :]:
                a[k][l] = a[l][k] = next(pairs) / (rates[k] * rates[l])
        else:
            for l in groups:
                if l != k:
                    a[k][l] = 0.0
        own = [j for j, row in enumerate(keep) if movers[row] == [k]]
        if own:
            mean = sum(y[j] for j in own) / len(own)
            ss_tot = sum((y[j] - mean) ** 2 for j in own)
            ss_res = sum((y[j] - pred[j]) ** 2 for j in own)
            r2[k] = 1.0 - ss_res / ss_tot if ss_tot > 0 else nan
            spread[k] = max(y[j] for j in own) - min(y[j] for j in own)
    return QuadraticFit(
        coef[0], tuple(b), tuple(tuple(row) for row in a), tuple(r2), coupled, tuple(spread)
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
