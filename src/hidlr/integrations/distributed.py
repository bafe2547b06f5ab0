"""HiDLR under ``torch.distributed`` data parallelism (DDP): replicas stay bit-identical.

Every rank probes the loss on its own shard of the probe batch; the probe losses of one probe
step are averaged across the process group with a single all-reduce before the quadratic is
fitted, so every rank fits the same quadratic, takes the same rates and, since DDP has already
averaged the gradients, the same step. The shared-intercept fit is linear in the losses, so with
equal shards this is the fit of the loss on the whole batch (a single-process run on the full
batch, up to floating-point rounding).

With ``policy="robust"`` and two or more groups that moved, the extra probe at the combined
step (whose position depends on the fit) is averaged by a second all-reduce: two per probe step.
Plain steps need no communication beyond DDP's.

Use::

    model = DistributedDataParallel(net)
    opt = DistributedHiDLR(torch.optim.AdamW(groups, lr=1e-3), update_every=4)
    ...
    loss_fn(model(x), y).backward()
    opt.step(lambda: loss_fn(model.module(px), py))  # this rank's shard of the probe batch

Probe through ``model.module`` (the wrapped module): a DDP forward may broadcast buffers, one
more collective per probe. Every rank must call :meth:`~hidlr.HiDLR.step` the same number of
times with the same ``update_every``, and its shard should have the same size as the others'
for the average to be the full batch's loss.

Failures: if a rank fails while probing (its closure raises), the other ranks wait in the
reduction for at most ``timeout`` (or the process group's own timeout) and then raise
:class:`ProbeSyncError`; a rank whose process died is usually noticed at once (connection
closed). As with any failed HiDLR probe step, every rank is left exactly after the plain base
step with its rates unchanged, but the replicas may no longer agree on the step count: treat
the error as fatal for the job and restart from a checkpoint.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from hidlr.optimizer import Closure, HiDLR, _scalar_loss

__all__ = ["DistributedHiDLR", "ProbeSyncError", "rates_agree"]


class ProbeSyncError(RuntimeError):
    """The probe losses could not be averaged across ranks (a rank failed or timed out)."""


def _as_timedelta(value: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if value is None or isinstance(value, datetime.timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"timeout must be a positive number of seconds or a timedelta, got {value!r}"
        )
    return datetime.timedelta(seconds=float(value))


class DistributedHiDLR(HiDLR):
    """:class:`~hidlr.HiDLR` whose probe losses are averaged across a process group.

    Args:
        optimizer: the base optimizer, as for :class:`~hidlr.HiDLR`.
        process_group: the group to average over (default: the default group). It must be
            initialised before the first probe step.
        timeout: longest wait, in seconds (or a ``timedelta``), for the other ranks' probe
            losses before :class:`ProbeSyncError`; ``None`` uses the process group's timeout.
        **options: every keyword of :class:`~hidlr.HiDLR`.

    :attr:`reductions` counts the all-reduces made so far (one per probe step, two with the
    robust policy's combined-step probe).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        process_group: Any = None,
        timeout: float | datetime.timedelta | None = None,
        **options: Any,
    ) -> None:
        super().__init__(optimizer, **options)
        self.process_group = process_group
        self.timeout = _as_timedelta(timeout)
        self.reductions = 0
        self._fitted = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["process_group"] = None  # process groups do not pickle; the default is used
        return state

    # -- the reduction ---------------------------------------------------------------------

    def _all_mean(self, losses: torch.Tensor, what: str) -> torch.Tensor:
        """The mean over the ranks of ``losses`` (float64), by one all-reduce."""
        if not dist.is_available() or not dist.is_initialized():
            raise ProbeSyncError(
                "DistributedHiDLR needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group) before its first probe step"
            )
        group = self.process_group
        if dist.get_backend(group) != "nccl":
            losses = losses.cpu()
        buf = losses.to(torch.float64).contiguous().clone()
        step = self._steps - 1
        try:
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)
            if work is None:  # not a member of the group: nothing to wait for
                raise ProbeSyncError(
                    "this rank is not a member of DistributedHiDLR's process group"
                )
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except ProbeSyncError:
            raise
        except Exception as exc:
            limit = (
                f"{self.timeout.total_seconds():g} s"
                if self.timeout is not None
                else "the process group's timeout"
            )
            raise ProbeSyncError(
                f"DistributedHiDLR (rank {dist.get_rank(group)} of {dist.get_world_size(group)}) "
                f"could not average the {what} of probe step {step} across ranks within {limit}: "
                "another rank probably failed while probing (look for its error) or stopped "
                f"calling step(). The error was: {type(exc).__name__}: {exc}"
            ) from exc
        self.reductions += 1
        return buf / dist.get_world_size(group)

    def step(self, closure: Closure | None = None) -> None:  # type: ignore[override]
        if closure is None or not callable(closure) or not self.is_probe_step():
            return super().step(closure)

        def synced() -> Any:
            value = closure()
            if not self._fitted:
                return value  # a probe of the fit: averaged all at once in _fit
            # the combined-step probe of the robust policy, after the fit
            loss = _scalar_loss(value)
            return self._all_mean(loss.reshape(1), "combined-step probe")[0].to(loss.device)

        self._fitted = False
        try:
            return super().step(synced)
        finally:
            self._fitted = False

    def _reduce_losses(self, losses: torch.Tensor) -> torch.Tensor:
        mean = self._all_mean(losses, f"{losses.numel()} probe losses")
        self._fitted = True
        return mean


def rates_agree(opt: HiDLR, process_group: Any = None) -> bool:
    """Whether every rank holds exactly the same adapted rates (a check: two all-reduces)."""
    rates = torch.tensor(opt.lrs, dtype=torch.float64)
    lo, hi = rates.clone(), rates.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=process_group)
    return bool(torch.equal(lo, hi))
