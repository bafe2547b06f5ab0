"""Whether the closure evaluates the gradient's own batch: the slope the gradient itself gives
along the step, compared with the probes' fitted slope over the first probe steps, and, once
that says so, which batch the closure reads at the step after (:func:`own_batch_verdict`)."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from types import FrameType

import torch

from hidlr._probing import GroupMover, snapshot

OWN_BATCH_CHECKS = 16  # fitted slopes compared with the gradient's own, at most
OWN_BATCH_EVIDENCE = 4  # agreeing fits that, as a majority of those compared, decide it
SAME_DATA_TOLERANCE = 1e-5  # two losses at one point this close are one data set's
SLOPE_STEP = 0.1  # the steps along the gradient that measure a closure's slope change the
# gradient's own loss by this fraction of one training step's change, and by at least
SLOPE_RESOLUTION = 1e-4  # this fraction of the loss (float32 resolves its change to 0.1%)
SLOPE_TOLERANCE = 1e-2  # a closure whose slope is this close to g's own reads g's batch
STEP_DOT_CHUNK = 1 << 16  # elements: the scratch memory of step_dot (256 KB in float32)
OWN_BATCH_TOLERANCE = 0.1  # a fitted slope within 10% of the gradient's own reproduces it


def reproduces_own_slope(b: float, own_b: float) -> bool | None:
    """Whether a fitted slope ``b`` reproduces ``own_b``, the slope the gradient itself gives
    on its own batch, within ``OWN_BATCH_TOLERANCE`` (``None`` without both). Probes on the
    gradient's own batch reproduce it up to the loss's higher-order terms: on the robustness
    benchmark (the first 16 fits of 3 seeds) 79-100% of probe fits do on 15 of its 16 tasks,
    35% on the one whose dropout masks differ between the training step and the probes.
    Probes on the next batch see that batch's gradient: 4-44% agree, 94% with large batches
    early in training (11 groups at batch 256), which the next step tells apart."""
    if not (math.isfinite(b) and math.isfinite(own_b)) or own_b == 0.0:
        return None
    return abs(b / own_b - 1.0) <= OWN_BATCH_TOLERANCE


def step_dot(g: torch.Tensor, w1: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """``g . (w1 - w0)`` as a float64 scalar, a chunk at a time: no more scratch memory than
    one chunk, beside the snapshot every probe step holds."""
    gf, w1f, w0f = g.reshape(-1), w1.reshape(-1), w0.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for i in range(0, gf.numel(), STEP_DOT_CHUNK):
        j = i + STEP_DOT_CHUNK
        total += (w1f[i:j] - w0f[i:j]).mul_(gf[i:j]).sum()  # (dtype=float64 would copy)
    return total


def own_slopes(movers: list[GroupMover], sharded: bool) -> list[torch.Tensor | None]:
    """Per group, ``g . (w1 - w0)`` for the gradient ``g`` the step was made from (a float64
    scalar on the parameters' device), while the parameters hold ``w0``; ``None`` where it
    is not measured (no parameters, sparse gradients, sharded parameters, whose shards would
    need a reduction). Divided by minus the rate, it is ``b`` on the gradient's own batch."""
    out: list[torch.Tensor | None] = []
    for m in movers:
        grads = [p.grad for p in m.params]
        if not m.params or sharded or m.sharded or any(g is None or g.is_sparse for g in grads):
            out.append(None)
            continue
        terms = [
            step_dot(g, w1, p)  # type: ignore[arg-type]
            for g, p, w1 in zip(grads, m.params, m.w1, strict=True)
        ]
        out.append(torch.stack(terms).sum() if len(terms) > 1 else terms[0])
    return out


def own_batch_slopes(
    own: list[torch.Tensor | None] | None, active: list[int], used: list[float]
) -> list[float]:
    """``b`` on the gradient's own batch per group, from :func:`own_slopes` and the rates the
    step was taken with (NaN where not measured or not probed); one host sync."""
    out = [float("nan")] * len(used)
    if own is None:
        return out
    measured = [k for k in active if own[k] is not None and used[k] > 0]
    if measured:
        device = own[measured[0]].device  # type: ignore[union-attr]
        slopes = torch.stack([own[k].to(device) for k in measured]).tolist()  # type: ignore[union-attr]
        for k, s in zip(measured, slopes, strict=True):
            out[k] = -s / used[k]
    return out


def own_batch_found(agreed: int, n: int) -> bool:
    """Whether ``agreed`` of ``n`` compared fits (:func:`reproduces_own_slope`) say the
    closure evaluates the gradient's own batch: at least ``OWN_BATCH_EVIDENCE`` of them, and
    more than half. On the robustness benchmark (seeds 0-2 at the default initial rate) this
    finds 46 of the 48 runs probing the gradient's own batch (not the 1-D CNN with dropout,
    which ends within 1% of the next batch's loss there), and 6 of the 48 probing the next
    batch, which the step after tells apart (:meth:`hidlr.HiDLR._confirm_own_batch`)."""
    return agreed >= OWN_BATCH_EVIDENCE and 2 * agreed > n


def own_batch_verdict(
    params: list[torch.Tensor],
    reference: float,
    scale: float,
    now: Callable[[], float],
    before: Callable[[], float],
) -> str:
    """Which batch the closure evaluates, at the step after the fits found the gradient's own
    (:func:`own_batch_found`). ``reference`` is the probe step's closure's loss at the end of
    that step, ``scale`` the loss change of that step's update by the fits (the sum over
    groups of ``b`` times the rate); the parameters have not moved since. ``now`` and
    ``before`` evaluate this step's closure and the probe step's again (the latter may read
    new data by now: a ``lambda`` over the loop's variables). ``params`` have this step's
    gradient ``g``.

    ``now`` gives ``reference``: one data set at every step, ``"full_batch"``. Otherwise each
    closure's loss is measured a small step either way along ``g`` (one that changes the
    gradient's own loss by ``SLOPE_STEP`` of ``scale``, at least ``SLOPE_RESOLUTION`` of the
    loss: a rate far too small would leave float32 nothing to resolve; two forward passes
    each) and its change set against ``g``'s dot product with the displacement actually made
    (float64), the change the gradient's own batch would show. The probe step's closure takes
    part only where it still reads its data (it gives ``reference`` again). The closer one,
    within ``SLOPE_TOLERANCE`` of it and at least 3x closer than the other (early in training
    another batch's slope can come within a few percent), reads this step's batch: ``now``
    (``"own"``: the closure evaluates each step's own batch) or ``before`` (``"next_batch"``:
    it held the batch this step trains on, whose slope looked like the gradient's by chance
    or low noise). Neither, or both: ``"unknown"``, as when nothing can be measured (a
    gradient missing or sparse, a non-finite loss). The parameters end exactly where they
    were."""
    grads = [p.grad for p in params if p.grad is not None]
    if not params or len(grads) < len(params) or any(g.is_sparse for g in grads):
        return "unknown"
    at_now = now()
    if not math.isfinite(at_now) or not math.isfinite(reference):
        return "unknown"
    if abs(at_now - reference) <= SAME_DATA_TOLERANCE * abs(reference):
        return "full_batch"
    at_before = before()
    still = abs(at_before - reference) <= SAME_DATA_TOLERANCE * abs(reference)
    g_squared = math.fsum(float(n) ** 2 for n in torch._foreach_norm(grads))
    target = max(SLOPE_STEP * scale, SLOPE_RESOLUTION * abs(at_now))  # loss change on g's batch
    h = target / g_squared if g_squared > 0 else 0.0
    if h == 0.0 or not math.isfinite(h):
        return "unknown"
    closures = (now, before) if still else (now,)
    copies = snapshot(params)
    moved = []  # g . (w_moved - w), float64, down then up
    losses = []
    try:
        for sign in (-1.0, 1.0):
            torch._foreach_add_(params, grads, alpha=sign * h)
            moved.append(
                math.fsum(
                    float(step_dot(g, p, w)) for g, p, w in zip(grads, params, copies, strict=True)
                )
            )
            losses.append([fn() for fn in closures])
            torch._foreach_copy_(params, copies)
    finally:
        torch._foreach_copy_(params, copies)
    change = moved[1] - moved[0]  # (what g's own batch would show)
    if not all(math.isfinite(v) for v in losses[0] + losses[1]) or not change > 0:
        return "unknown"
    off = [abs((u - d) / change - 1.0) for d, u in zip(losses[0], losses[1], strict=True)]
    best = min(range(len(off)), key=off.__getitem__)
    if off[best] > SLOPE_TOLERANCE or any(
        o < 3.0 * off[best] for i, o in enumerate(off) if i != best
    ):
        return "unknown"
    return "own" if best == 0 else "next_batch"


def warn_own_batch(
    agreed: int,
    n: int,
    *,
    deferring: bool,
    can_defer: bool = True,
    failed: BaseException | None = None,
) -> None:
    """The warning that ``agreed`` of the first ``n`` probe fits reproduced the gradient's
    own slope; ``deferring``: Hi-DLR defers its probes from now on; ``can_defer``: whether
    ``defer_probes=True`` is advice this optimizer can take; ``failed``: the error that ended
    the check."""
    found = (
        f"HiDLR: {agreed} of the first {n} probe fits reproduced the slope of the gradient's "
        "own batch: the closure seems to evaluate the batch the gradient was computed on, "
        "where fitted rates run long (probing it, 3 of the robustness benchmark's first 16 "
        "tasks ended within 5% of the best constant rate, with 3 diverged runs; probing the "
        "next batch, 14 of its 20, none). "
    )
    if deferring:
        advice = (
            "From the next probe step on, Hi-DLR defers its probes (defer_probes=True): each "
            "probe step is probed at the following step, with that step's closure and batch. "
            "Giving the closure the next batch (hidlr.with_probe_batch) is better still"
        )
    else:
        advice = (
            "Probe the next batch (hidlr.with_probe_batch)"
            + (" or pass defer_probes=True" if can_defer else "")
            + "; in full-batch training, where every step sees all the data, this is "
            "expected and the warning can be ignored"
        )
    if failed is not None:
        advice += f" (the check could not finish: the closure raised {failed!r})"
    warnings.warn(found + advice, UserWarning, stacklevel=_outside_stacklevel())


def _outside_stacklevel() -> int:
    """The ``warnings`` stacklevel, seen from the caller of this function, of the first frame
    outside hidlr and torch (the user's call of ``step``, through whatever wrappers)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
