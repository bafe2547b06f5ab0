"""How the fits move the rates, as pure functions: Algorithm 1's smoothed update, the robust
policy's safeguards, the joint check of the combined step, and loss spikes.

The inputs are :class:`~hidlr.fit.QuadraticFit` and :class:`~hidlr.fit.RateDecision` from
:mod:`hidlr.fit`; the optimizer (:class:`hidlr.HiDLR`) only keeps the state these functions
read and return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hidlr.fit import QuadraticFit, RateDecision

__all__ = [
    "RobustStep",
    "applied_rates",
    "blown_up",
    "coupling_ratio",
    "diagonal_rates",
    "gradient_blew_up",
    "log_average",
    "on_plateau",
    "overshoot",
    "rising",
    "robust_rate",
    "smooth_rate",
    "spike",
    "spike_cuts",
    "step_scale",
    "track_descent",
    "track_spikes",
]


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
DESCENT_WEIGHT = 0.1  # weight of the newest probe step in a group's descent frequency
NOISE_GATE = 0.7  # below this descent frequency a group's fits are treated as noise-dominated
PLATEAU_PROGRESS = 0.05  # a loss less than this fraction below the first is still on its plateau


def on_plateau(loss: float, first: float | None) -> bool:
    """Whether ``loss`` (at a probe step's ``w0``) is still on the plateau it started on:
    less than ``PLATEAU_PROGRESS`` of the first such loss (in absolute value) below it. There
    a rate too small to move the loss is the likely reading of probes that see no curvature,
    whatever the sign of their slopes: the runs of the robustness benchmark that started low
    and never left a saddle (a pooling CNN at ln 4 from 1e-3, DistMult at ln 2 from 1e-5) had
    noise-dominated groups whose growth was suspended (:func:`robust_rate`). No first loss, or
    a loss that is not finite: not on a plateau."""
    if first is None or not math.isfinite(loss) or not math.isfinite(first):
        return False
    return first - loss < PLATEAU_PROGRESS * abs(first)


def track_descent(frequency: float, b: float) -> float:
    """A group's descent frequency after one more probe step: the exponential average
    (weight ``DESCENT_WEIGHT``, starting at 1) of whether its probes descended (``b > 0``).
    A direction that descends on the probe batch about as often as it ascends is one whose
    slope there is mostly noise. A non-finite slope (probes that blew up) is no measurement
    of noise and leaves the frequency as it was."""
    if not math.isfinite(b):
        return frequency
    return (1.0 - DESCENT_WEIGHT) * frequency + DESCENT_WEIGHT * float(b > 0)


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
    rising: bool = False,
    noisy: bool = False,
    reach: float | None = None,
    plateau: bool = False,
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
      (``resolved=False``), mean the rate is too small to measure: it grows by ``growth``,
      unless the loss rose since the last probe step (``rising``). Growth without a fit is
      for a plateau or a rate too small to move the loss, and a rising loss is neither: with
      momentum SGD the one-step probes along the velocity can look linear at a rate already
      past what the dynamics bear (a Poisson regression on the robustness benchmark
      diverged from an initial rate of 0.1 right after such a growth);
    - probes that ascend (``b <= 0``, ``A > 0``) count as a proposal of ``shrink * rate`` in
      the same average (a factor ``shrink ** (1 - smoothing)``): with probes on the next
      batch, an ascent is as often the noise of one batch as a step that is too long, and
      halving the rate on each one drove rates toward zero; a step that is really too long
      keeps ascending, or blows up, or spikes;
    - probes that blow up (a non-finite loss) shrink the rate by ``shrink`` at once;
    - while the group is ``noisy`` (its probes descend on fewer than ``NOISE_GATE`` of its
      probe steps, :func:`track_descent`), an accepted proposal after the warm-up counts as
      no more than ``reach`` times the rate and no less than the rate divided by ``reach``
      (the largest probe multiplier; by default ``probe_reach / rate``, which is the same
      where the probes were placed at ``rate`` itself), and growth without a fit is
      suspended (``"keep"``) once the loss has left the plateau it started on (``plateau``,
      :func:`on_plateau`; on it, a rate too small to move the loss is what linear probes
      most likely mean, noisy or not). The bound is about ``rate``, the group's own (diagonal) rate,
      not about where the probes were placed: with two or more groups those sit at the
      coupling factor times it, and a bound at the farthest probe then lay below the rate
      whenever that factor was under ``1 / reach``, so that every accepted proposal cut it
      (session 19: seven residual blocks at a factor of 0.19 had their rates fall 200x
      while their fits proposed 20-100x). There the
      slope's sign is mostly noise, and a minimiser far past the probes is an extrapolation
      of noise: on MovieLens under momentum SGD, half the probe steps ascended while the
      accepted fits proposed 10-500x the rate, and the rate drifted up until the loss blew
      up. The bound is symmetric in log-rate: a cap on the long side only let noisy short
      proposals (and the ascents, each a proposal of half the rate) pull the rates down
      without a counterweight, well below the grid-best constant rate on the robustness
      benchmark.

    ``n_updates`` counts the accepted fits since the start or since the rate last had to grow
    without a fit (which starts the warm-up again).
    """
    if decision.accepted:
        if n_updates < WARMUP_UPDATES and decision.proposed < 0.5 * rate:
            return RobustStep(decision.proposed, n_updates + 1, "update")
        if n_updates < WARMUP_UPDATES and decision.proposed > rate:
            return RobustStep(min(decision.proposed, WARMUP_GROWTH * rate), n_updates + 1, "update")
        proposed = decision.proposed
        if noisy:  # no further from the rate than the probes reach, on either side
            span = probe_reach / rate if reach is None else reach
            proposed = min(max(proposed, rate / span), rate * span)
        new = smooth_rate(rate, proposed, smoothing=smoothing, max_change=growth, space="log")
        return RobustStep(new, n_updates + 1, "update")
    if decision.reason == "poor_fit" and a > 0 and b > 0 and b / a < rate:
        return RobustStep(math.sqrt(rate * b / a), n_updates, "shrink")
    if not resolved or (
        decision.reason == "not_convex" and b > 0 and abs(a) * probe_reach <= 0.1 * b
    ):
        if rising or (noisy and not plateau):
            return RobustStep(rate, n_updates, "keep")
        # grown without evidence: the warm-up starts again, so the first fits that see
        # curvature can bring the rate back at once (a plateau that ends in a cliff)
        return RobustStep(rate * growth, 0, "grow")
    if decision.reason == "not_descent" and a > 0:
        return RobustStep(rate * shrink ** (1.0 - smoothing), n_updates, "shrink")
    if decision.reason == "nonfinite_probe":
        return RobustStep(rate * shrink, n_updates, "shrink")
    return RobustStep(rate, n_updates, "keep")


def diagonal_rates(
    fit: QuadraticFit,
    decisions: Sequence[RateDecision],
    active: Sequence[int],
    rates: Sequence[float],
    diag: Sequence[float],
    counts: Sequence[int],
    *,
    policy: str,
    smoothing: float,
    reach: float,
    max_rate_change: float | None,
    rising: bool = False,
    noisy: Sequence[bool] | None = None,
    plateau: bool = False,
) -> tuple[list[float], list[int], list[str]]:
    """Each group's own (diagonal) rate after one fit, by ``policy`` (``"robust"``:
    :func:`robust_rate`; ``"paper"``: :func:`smooth_rate` on accepted fits only).

    ``rates`` are the rates the probes were placed at, ``diag`` and ``counts`` each group's
    diagonal rate and count of accepted fits before this one, ``reach`` the largest probe
    multiplier in absolute value, ``rising`` whether the loss rose since the last probe step,
    ``noisy`` which groups' probes are noise-dominated (:func:`robust_rate`; none if not
    given), ``plateau`` whether the loss is still on its starting plateau
    (:func:`on_plateau`). Groups not in ``active`` keep theirs. ``max_rate_change``
    bounds the paper policy's update here; the robust policy's rate is bounded after its
    coupling factor and spike cuts (by the optimizer). Returns the new diagonal rates, counts
    and the action taken per group.
    """
    diag, counts = list(diag), list(counts)
    actions = ["keep"] * len(diag)
    if policy == "paper" and not all(decisions[k].accepted for k in active):
        # Algorithm 1, line 14 (and section 3): the rates move together or not at all
        return diag, counts, actions
    for k in active:
        dec = decisions[k]
        if policy == "robust":
            out = robust_rate(
                diag[k],
                counts[k],
                dec,
                fit.b[k],
                fit.A[k][k],
                smoothing=smoothing,
                probe_reach=reach * rates[k],
                resolved=not fit.spread[k] < 1e-5 * abs(fit.intercept),
                rising=rising,
                noisy=noisy is not None and noisy[k],
                reach=reach,
                plateau=plateau,
            )
            diag[k], counts[k], actions[k] = out.rate, out.n_updates, out.action
        elif dec.accepted:
            diag[k] = smooth_rate(
                diag[k], dec.proposed, smoothing=smoothing, max_change=max_rate_change
            )
            counts[k] += 1
            actions[k] = "update"
    return diag, counts, actions


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
SPIKE_UNDO = 0.1  # and a spike undoes more than this fraction of the progress since the start
DOUBT_CUT = 0.5  # a spike batch noise may explain cuts a group its fit does not confirm by this
BLOWUP_FACTOR = 10.0  # a loss this many loss scales above its floor has blown up


def spike(
    loss: float,
    recent: Sequence[float],
    factor: float = SPIKE_FACTOR,
    start: float | None = None,
) -> bool:
    """Whether the unperturbed loss of this probe step is a spike: ``factor`` times the last
    probe step's, or (with three steps of history) ``factor`` times the lowest recent one,
    or not finite. The first rule also guards the probe steps just after a cut, when the
    history starts again: a loss that keeps multiplying is cut again at once.

    Given ``start``, the first probe step's loss, a finite spike must also undo more than
    ``SPIKE_UNDO`` of the progress from ``start`` down to the recent floor. A loss trained
    down to its noise floor differs from batch to batch by far more than ``factor`` (a deep
    MLP at a training loss of 1e-3 saw 1e-4 to 6e-2 on the robustness benchmark): judged by
    ratios alone, every hard batch was a spike, and ten 10x cuts drove the rates to 1e-10,
    which ended training. A real blow-up soon rises by that much (each probe step it goes on
    growing it is judged again), and the combined-step check (:func:`overshoot`) compares
    losses on one batch, where no batch-to-batch noise enters.

    A loss that can be zero or negative (a log-likelihood without its constant, a Gaussian
    NLL with a learned variance) has no scale for a ratio: with three steps of history and a
    floor at or below zero, a spike is a rise above the floor of ``factor - 1`` times the
    recent range (highest less lowest), the ratio rule's ``factor - 1`` times the floor with
    the range as the scale."""
    if not recent:
        return False
    if not math.isfinite(loss):
        return True
    floor = min(recent)
    if start is not None and start > floor and loss - floor <= SPIKE_UNDO * (start - floor):
        return False
    if recent[-1] > 0 and loss > factor * recent[-1]:
        return True
    if len(recent) < 3:
        return False
    if floor > 0:
        return loss > factor * floor
    return loss - floor > (factor - 1.0) * (max(recent) - floor) > 0.0


def spike_cuts(
    loss: float,
    recent: Sequence[float],
    groups: Sequence[tuple[int, RateDecision, float]],
    *,
    start: float | None,
    detect: bool = True,
) -> tuple[list[tuple[int, float]], list[float]]:
    """Which groups a loss spike cuts and by what factor, and the recent losses to judge the
    next probe step by.

    ``groups`` holds each probed group's index, its fit's decision and the rate its probes
    were placed at. A group's fit confirms that its step is too long when it is accepted with
    its minimiser below half the rate; such a group is cut by ``SPIKE_CUT`` at any spike.
    The others are cut by how sure the spike is:

    - a :func:`spike` (judged with the run's first loss ``start``: it undoes a tenth of the
      progress) that takes the loss back to ``start`` or above: by ``SPIKE_CUT``, every group;
    - one that undoes a tenth of the progress but stays below ``start``: by ``DOUBT_CUT``.
      Near a loss's noise floor one hard batch does that (a 1-D CNN saw 0.009 to 0.42 from
      a start of 1.08 with its weights all but frozen), and ten 10x cuts there took its rates
      to 1e-9; halving still restrains a rate that drifts up while the loss sits near zero;
    - a jump that only the ratios call a spike (less than a tenth undone): not at all. (On a
      deterministic problem the jump is no noise, and the fit sees the overshoot: an
      ill-conditioned quadratic whose rate drifted past stability was cut at a 9x rise
      instead of at a tenth of its progress undone.)

    After any cut the floor starts again (:func:`track_spikes`).
    """
    spiked, kept = track_spikes(loss, recent, detect=detect, start=start)

    def confirmed(dec: RateDecision, rate: float) -> bool:
        return dec.accepted and dec.proposed < 0.5 * rate

    if spiked:
        doubt = SPIKE_CUT if start is None or loss >= start else DOUBT_CUT
        return [(k, SPIKE_CUT if confirmed(d, r) else doubt) for k, d, r in groups], kept
    if not (detect and math.isfinite(loss) and spike(loss, recent)):
        return [], kept
    cut = [(k, SPIKE_CUT) for k, d, r in groups if confirmed(d, r)]
    return cut, [loss] if cut else kept


def blown_up(loss: float, seen: Sequence[float]) -> bool:
    """Whether a probe step's loss at ``w0`` has blown up against the losses ``seen`` at the
    earlier probe steps (the first and the recent ones): not finite, or above their lowest
    by more than ``BLOWUP_FACTOR`` times their scale, the larger of their range and the
    size of their highest (so a positive loss is judged against 10x the largest loss since
    the start, and one near or below zero by its range). A spike is a rate too long for the
    loss; this is weights that the steps since the last probe step have wrecked (a SwiGLU
    net under small-batch SGD went from 1.7 to 7e6 within one probe interval), and from
    which no cut of the rates comes back."""
    if not math.isfinite(loss):
        return True
    if not seen:
        return False
    low, high = min(seen), max(seen)
    scale = max(high - low, abs(high))
    return scale > 0 and loss - low > BLOWUP_FACTOR * scale


GRADIENT_BLOWUP = 100.0  # a gradient norm this many times the largest at a probe step


def gradient_blew_up(norm: float, largest: float) -> bool:
    """Whether a step's gradient norm says the weights are blowing up between two probe steps:
    not finite, or more than ``GRADIENT_BLOWUP`` times ``largest``, the largest norm at a probe
    step so far (none yet: ``largest <= 0``, no verdict but a non-finite norm). Probes see a
    loss only every ``update_every`` steps, and within one interval a SwiGLU net under SGD at
    batch 16 went from a loss of 1.6 to a non-finite one (session 20: gradient norms 4.7, 14,
    27, 101, 424, 3.5e3, 1.7e18 on successive steps, never above 1.34x the largest at a probe
    step before). On the robustness benchmark's default runs the ratio stays under 6 but for
    a chaotic deep MLP (12, and 43 from an initial rate of 0.1) and runs started far too high
    (14-58 in their first steps), so a blow-up is judged at 100x."""
    if not math.isfinite(norm):
        return True
    return largest > 0 and norm > GRADIENT_BLOWUP * largest


def overshoot(loss: float, step_loss: float, backtrack: float) -> float:
    """The factor that cuts the rates when their own combined step overshoots: 1 unless the
    loss measured at the end of that step, ``step_loss``, is a :func:`spike` against the
    loss at ``w0`` (4x it, or not finite) on the same batch, where no batch-to-batch noise
    can explain it; then the spike cut, or the step's line-minimum fraction ``backtrack``
    (:func:`step_scale`) where that is smaller. (A plain step that shortens only this one
    step left SGD with inputs at 100x different scales diverging within the probe interval:
    the rates themselves were several times too long.)"""
    if backtrack < 1.0 and spike(step_loss, [loss]):
        return min(backtrack, SPIKE_CUT)
    return 1.0


RISE_MARGIN = 0.1  # a rising loss sits this fraction above its recent floor (of its size)


def rising(loss: float, recent: Sequence[float]) -> bool:
    """Whether the loss rose: above the last probe step's and more than ``RISE_MARGIN`` of
    the floor's size above the recent floor (so that a loss on a plateau, going up and down
    by a little, is not rising half the time)."""
    if not recent or not math.isfinite(loss):
        return False
    floor = min(recent)
    return loss > recent[-1] and loss - floor > RISE_MARGIN * abs(floor)


def track_spikes(
    loss: float, recent: Sequence[float], *, detect: bool = True, start: float | None = None
) -> tuple[bool, list[float]]:
    """Whether this probe step's unperturbed (fitted) loss is a :func:`spike` (only when
    ``detect``; ``start``: the first probe step's loss), and the recent losses to judge the
    next one by: the last ``SPIKE_WINDOW`` finite ones, started afresh after a spike, so a
    loss that stays up (or a noisy one near zero) does not cut again at every probe step
    until the rates are too small for a float32 step to move the weights. A loss that is not finite is no measurement (every group's
    probes blew up, which halves the rates by itself): neither a spike nor remembered."""
    finite = math.isfinite(loss)
    spiked = detect and finite and spike(loss, recent, start=start)
    kept = [] if spiked else list(recent)
    return spiked, (kept + [loss])[-SPIKE_WINDOW:] if finite else kept


def applied_rates(
    rates: Sequence[float],
    diag: Sequence[float],
    counts: Sequence[int],
    actions: Sequence[str],
    active: Sequence[int],
    stalled: Sequence[int],
    peaks: Sequence[float],
    *,
    coupling: float,
    max_rate_change: float | None,
) -> tuple[list[float], list[float], list[int], list[str]]:
    """The rates applied from this probe step on: each active group's diagonal rate times the
    ``coupling`` factor, its ratio to the old rate clipped to ``[1 / max_rate_change,
    max_rate_change]`` when a bound is set (the diagonal rate scaled alike), and each
    ``stalled`` group's rate (one whose step no longer changes its weights) doubled, no further
    than its ``peaks`` value or the bound, with its count of accepted fits reset. Other groups
    keep their rates. Returns the new rates, diagonal rates, counts and actions."""
    new = list(rates)
    diag, counts, actions = list(diag), list(counts), list(actions)
    for k in active:
        new[k] = coupling * diag[k]
        if max_rate_change is not None:
            clipped = min(max(new[k], rates[k] / max_rate_change), rates[k] * max_rate_change)
            diag[k] *= clipped / new[k]
            new[k] = clipped
    for k in stalled:
        growth = min(2.0, peaks[k] / rates[k], max_rate_change or 2.0)
        if growth > 1.0:
            new[k], diag[k], counts[k], actions[k] = rates[k] * growth, diag[k] * growth, 0, "grow"
    return new, diag, counts, actions
