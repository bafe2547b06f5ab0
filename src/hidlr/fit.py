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

__all__ = [
    "QuadraticFit",
    "RateDecision",
    "coupling_ratio",
    "fit_quadratic",
    "log_average",
    "propose_rates",
    "robust_rate",
    "smooth_rate",
    "spike",
    "step_scale",
]


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


def smooth_rate(
    old: float,
    proposed: float,
    *,
    smoothing: float,
    max_change: float | None,
    space: str = "linear",
) -> float:
    """Algorithm 1, line 15: ``smoothing * old + (1 - smoothing) * proposed`` (``space="linear"``)
    or the same average of logarithms (``space="log"``: a geometric mean, which noisy
    proposals of very different sizes cannot drag upward), then the ratio to the old rate
    clipped to ``[1 / max_change, max_change]`` when a bound is set."""
    if space == "log":
        new = math.exp(smoothing * math.log(old) + (1.0 - smoothing) * math.log(proposed))
    else:
        new = smoothing * old + (1.0 - smoothing) * proposed
    if max_change is not None:
        new = min(max(new, old / max_change), old * max_change)
    return new


def log_average(current: float, new: float, n_before: int, smoothing: float) -> float:
    """Bias-corrected exponential average of logarithms: the ``(n_before + 1)``-th value of
    ``exp(EMA(log x))`` when ``current`` is the average of the first ``n_before`` values (the
    first value replaces ``current`` outright, as in Adam's bias correction)."""
    weight = (1.0 - smoothing) / (1.0 - smoothing ** (n_before + 1))
    return math.exp(math.log(current) + weight * (math.log(new) - math.log(current)))


WARMUP_UPDATES = 4  # accepted fits during which an overshooting initial rate is cut at once
WARMUP_GROWTH = 1.5  # and a longer proposal is taken at once, up to this factor per update


@dataclass(frozen=True)
class RobustStep:
    """The outcome of :func:`robust_rate` for one group."""

    rate: float
    n_updates: int
    action: str  # "update", "grow", "shrink" or "keep"


def robust_rate(
    rate: float,
    n_updates: int,
    decision: RateDecision,
    b: float,
    a: float,
    *,
    smoothing: float,
    probe_reach: float,
    resolved: bool = True,
    growth: float = 2.0,
    shrink: float = 0.5,
) -> RobustStep:
    """Hi-DLR's rate update with safeguards for what the fit cannot answer.

    - an accepted fit moves the rate toward its proposal ``b/A`` by an exponential average
      of log-rates, ``log new = smoothing * log rate + (1 - smoothing) * log(b/A)`` (no bias
      correction: the first updates are as cautious as the later ones), the ratio clipped to
      ``[1 / growth, growth]``. Shorter and longer proposals count alike: the rate tracks the
      geometric mean of the proposals, not their lower envelope. (Taking shorter proposals at
      once annealed the rates 10-100x below the best constant rate on the robustness
      benchmark: each one-step optimum is noisy and its minima pile up.) Without the bias
      correction, the rate cannot follow the huge proposals of a loss plateau within a few
      probe steps, which with heavy momentum diverged once the plateau ended. Only during
      the first ``WARMUP_UPDATES`` accepted fits is a proposal below half the rate (the
      current step overshoots the minimum) taken at once, and a longer one taken up to
      ``WARMUP_GROWTH`` times the rate: an initial rate far too large would otherwise blow
      the loss up while the average comes down, and one far too small would take dozens of
      probe steps to climb;
    - a poor fit whose minimiser ``b/A`` lies below the current rate still lowers it, to the
      geometric mean of the two (a shorter step is the safe side of a doubtful model);
    - probes that saw no curvature (``A <= 0``, ``|A| * probe_reach <= 0.1 b``: the loss was
      linear over the probes, ``probe_reach`` being the largest probe offset in rate units)
      while descending, or whose losses differ by less than float32 can resolve
      (``resolved=False``), mean the rate is too small to measure: it grows by ``growth``;
    - probes that ascend (``b <= 0``, ``A > 0``) count as a proposal of ``shrink * rate`` in
      the same average (a factor ``shrink ** (1 - smoothing)``): with probes on the next
      batch, an ascent is as often the noise of one batch as a step that is too long, and
      halving the rate on each one drove rates toward zero; a step that is really too long
      keeps ascending, or blows up, or spikes;
    - probes that blow up (a non-finite loss) shrink the rate by ``shrink`` at once.

    ``n_updates`` counts the accepted fits since the start or since the rate last had to grow
    without a fit (which starts the warm-up again).
    """
    if decision.accepted:
        if n_updates < WARMUP_UPDATES and decision.proposed < 0.5 * rate:
            return RobustStep(decision.proposed, n_updates + 1, "update")
        if n_updates < WARMUP_UPDATES and decision.proposed > rate:
            return RobustStep(min(decision.proposed, WARMUP_GROWTH * rate), n_updates + 1, "update")
        new = smooth_rate(
            rate, decision.proposed, smoothing=smoothing, max_change=growth, space="log"
        )
        return RobustStep(new, n_updates + 1, "update")
    if decision.reason == "poor_fit" and a > 0 and b > 0 and b / a < rate:
        return RobustStep(math.sqrt(rate * b / a), n_updates, "shrink")
    if not resolved or (
        decision.reason == "not_convex" and b > 0 and abs(a) * probe_reach <= 0.1 * b
    ):
        # grown without evidence: the warm-up starts again, so the first fits that see
        # curvature can bring the rate back at once (a plateau that ends in a cliff)
        return RobustStep(rate * growth, 0, "grow")
    if decision.reason == "not_descent" and a > 0:
        return RobustStep(rate * shrink ** (1.0 - smoothing), n_updates, "shrink")
    if decision.reason == "nonfinite_probe":
        return RobustStep(rate * shrink, n_updates, "shrink")
    return RobustStep(rate, n_updates, "keep")


def coupling_ratio(fit: QuadraticFit, steps: Sequence[float], loss_at_step: float) -> float | None:
    """How much the diagonal model of eq. 3.1 over-estimates a combined step, from one probe.

    ``steps[k]`` is group k's step in rate units (0 for a group that does not move) and
    ``loss_at_step`` the loss measured at the combined step. Along it the loss is
    ``L0 - B + C / 2`` with ``B = sum_k b_k steps_k``; the measurement gives the true ``C``,
    the diagonal model predicts ``C_diag = sum_k A_kk steps_k^2``. Returns ``C_diag / C``:
    1 for groups that do not interact, ``1/K`` for K groups whose steps act alike (LoRA A and B,
    the sub-networks of an additive model); scaling diagonal rates by it is the Newton step
    along the combined direction. ``None`` when the measurement says nothing usable.
    """
    moving = [(fit.b[k], fit.A[k][k], s) for k, s in enumerate(steps) if s != 0]
    values = [loss_at_step, fit.intercept] + [v for m in moving for v in m[:2]]
    if len(moving) < 2 or not all(math.isfinite(v) for v in values):
        return None
    slope = sum(b * s for b, _, s in moving)
    predicted = sum(a * s * s for _, a, s in moving)
    measured = 2.0 * (loss_at_step - fit.intercept + slope)
    if predicted <= 0 or measured <= 0:
        return None
    return predicted / measured


def step_scale(fit: QuadraticFit, steps: Sequence[float], loss_at_step: float) -> float:
    """The fraction of a combined step to take now, from the loss measured at its end.

    With ``B = sum_k b_k steps_k`` and the measured curvature ``C`` along the step (see
    :func:`coupling_ratio`), the minimiser is at ``B / C`` of the step. Returns that fraction
    when it is below 1, 0.5 when the step ascends (``B <= 0`` and a higher loss at its end),
    and 1 otherwise (including when nothing usable was measured).
    """
    moving = [(fit.b[k], s) for k, s in enumerate(steps) if s != 0]
    values = [loss_at_step, fit.intercept] + [b for b, _ in moving]
    if not moving or not all(math.isfinite(v) for v in values):
        return 0.5 if moving and not math.isfinite(loss_at_step) else 1.0
    slope = sum(b * s for b, s in moving)
    if slope <= 0:
        return 0.5 if loss_at_step > fit.intercept else 1.0
    curvature = 2.0 * (loss_at_step - fit.intercept + slope)
    if curvature <= 0:
        return 1.0
    return min(1.0, slope / curvature)


SPIKE_FACTOR = 4.0  # a fitted loss this many times its recent floor is a spike
SPIKE_CUT = 0.1  # and cuts the rates by this factor
SPIKE_WINDOW = 10  # probe steps the floor looks back over


def spike(loss: float, recent: Sequence[float], factor: float = SPIKE_FACTOR) -> bool:
    """Whether the unperturbed loss of this probe step is a spike: ``factor`` times the last
    probe step's, or (with three steps of history) ``factor`` times the lowest recent one,
    or not finite. The first rule also guards the probe steps just after a cut, when the
    history starts again: a loss that keeps multiplying is cut again at once."""
    if not recent:
        return False
    if not math.isfinite(loss) or (recent[-1] > 0 and loss > factor * recent[-1]):
        return True
    floor = min(recent)
    return len(recent) >= 3 and floor > 0 and loss > factor * floor
