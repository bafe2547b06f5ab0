"""Whether the closure evaluates the gradient's own batch: the slope the gradient itself gives
along the step, compared with the probes' fitted slope over the first probe steps."""

from __future__ import annotations

import math
import os
import sys
import warnings
from types import FrameType

import torch

from hidlr._probing import GroupMover

OWN_BATCH_CHECKS = 16  # fitted slopes compared with the gradient's own, at most
OWN_BATCH_EVIDENCE = 4  # agreeing fits that, as a majority of those compared, decide it
SAME_DATA_TOLERANCE = 1e-5  # two closures' losses at one point this close read the same data
OWN_BATCH_STEP = 1e-3  # the step down the gradient that measures a closure's slope: this
# fraction of the loss, were the slope the gradient's own
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


def warn_own_batch(agreed: int, n: int, *, deferring: bool) -> None:
    """The warning that ``agreed`` of the first ``n`` probe fits reproduced the gradient's
    own slope; ``deferring``: Hi-DLR defers its probes from now on."""
    found = (
        f"HiDLR: {agreed} of the first {n} probe fits reproduced the slope of the gradient's "
        "own batch: the closure seems to evaluate the batch the gradient was computed on, "
        "where fitted rates run long (on the robustness benchmark 3 of 16 tasks within 5% of "
        "the best constant rate and 3 diverged runs; the next batch: 11, none). "
    )
    if deferring:
        advice = (
            "From the next probe step on, Hi-DLR defers its probes (defer_probes=True): each "
            "probe step is probed at the following step, with that step's closure and batch. "
            "Giving the closure the next batch (hidlr.with_probe_batch) is better still; in "
            "full-batch training, where every step sees all the data, on_own_batch='warn' "
            "keeps the probes where they are"
        )
    else:
        advice = (
            "Probe the next batch (hidlr.with_probe_batch) or pass defer_probes=True; in "
            "full-batch training, where every step sees all the data, this is expected and "
            "the warning can be ignored"
        )
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
