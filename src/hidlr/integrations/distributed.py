"""HiDLR under ``torch.distributed`` data parallelism: DDP, and FSDP2 (``fully_shard``).

Every rank probes the loss on its own shard of the probe batch; the probe losses of one probe
step are averaged across the process group with a single all-reduce before the quadratic is
fitted, so every rank fits the same quadratic, takes the same rates and the same step. The
shared-intercept fit is linear in the losses, so with equal shards this is the fit of the loss
on the whole batch (a single-process run on the full batch, up to floating-point rounding).
Before probing, the ranks also agree on which groups moved in the base step (an all-reduce of
one flag per group): under FSDP a rank may hold no elements of a group.

Collectives per probe step: the flags, the losses, and with ``policy="robust"`` and two or
more groups that moved, the extra probe at the combined step (whose position depends on the
fit): two, or three. Plain steps need no communication beyond DDP's or FSDP's own.

DDP::

    model = DistributedDataParallel(net)
    opt = DistributedHiDLR(torch.optim.AdamW(groups, lr=1e-3), update_every=4)
    ...
    loss_fn(model(x), y).backward()
    opt.step(lambda: loss_fn(model.module(px), py))  # this rank's shard of the probe batch

Probe through ``model.module`` (the wrapped module): a DDP forward may broadcast buffers, one
more collective per probe.

FSDP2::

    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)
    opt = DistributedHiDLR(torch.optim.AdamW(groups, lr=1e-3), update_every=4)
    ...
    loss_fn(net(x), y).backward()
    opt.step(lambda: loss_fn(net(px), py))

The parameters are ``DTensor`` shards; each rank perturbs and restores its own shard in place
and every probe's forward all-gathers them, as a training forward does. FSDP keeps the root
module's parameters gathered after a forward (it expects a backward next); during a probe step
every FSDP module is therefore resharded before the first forward of each probe and once more
at the end, so that each probe, and the next training step, gathers the current shards.

Every rank must call :meth:`~hidlr.HiDLR.step` the same number of times with the same
``update_every``, and its shard should have the same size as the others' for the average to be
the full batch's loss.

Failures: if a rank fails while probing (its closure raises), the other ranks wait in the
reduction for at most ``timeout`` (or the process group's own timeout) and then raise
:class:`ProbeSyncError`; a rank whose process died is usually noticed at once (connection
closed). Under FSDP the others may instead be waiting in a probe's own all-gather, which only
the process group's timeout bounds (``init_process_group(timeout=...)``); that error is raised
as a :class:`ProbeSyncError` too. As with any failed HiDLR probe step, every rank is left
exactly after the plain base step with its rates unchanged, but the ranks may no longer agree
on the step count: treat the error as fatal for the job and restart from a checkpoint.

Checkpoints: :meth:`~hidlr.HiDLR.state_dict` holds the base optimizer's state dict, whose
tensors under FSDP are this rank's shards: save one file per rank (``torch.save``) and load
each into the same sharding. With ``torch.distributed.checkpoint``, pass the base optimizer
(``opt.optimizer``) to its ``get_state_dict``/``set_state_dict`` and save the ``"hidlr"``
entry of :meth:`~hidlr.HiDLR.state_dict` beside it (see the README).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from hidlr.optimizer import Closure, HiDLR, _scalar_loss

__all__ = ["DistributedHiDLR", "ProbeSyncError", "rates_agree"]

logger = logging.getLogger(__name__)


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


def _fsdp_module_class() -> type | None:
    """FSDP2's ``FSDPModule`` if it is loaded (no module can be one otherwise)."""
    for name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        cls = getattr(sys.modules.get(name), "FSDPModule", None)
        if cls is not None:
            return cls  # type: ignore[no-any-return]
    return None


def _raised_in_collective(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a collective of the forward (such as FSDP's all-gather) that
    timed out or lost its peer, rather than from the model or loss. gloo reports such failures
    as plain ``RuntimeError``s: the frame that raised tells. Only that innermost frame counts:
    a model's own error often passes through other ``torch.distributed`` code on its way
    (activation checkpointing's wrapper, DTensor's sharding rules) and stays the model's."""
    if isinstance(exc, dist.DistError):
        return True
    modules = []
    tb = exc.__traceback__
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    # the innermost frame past torch's operator dispatch (functional collectives raise from
    # torch.ops._c10d_functional, called by torch.distributed._functional_collectives)
    module = next((m for m in reversed(modules) if m != "torch._ops"), "")
    last = module.rpartition(".")[2]
    return module.startswith("torch.distributed.") and (
        last == "distributed_c10d" or "collectives" in last
    )


class _FreshShards:
    """Reshards FSDP2 modules so that every probe's forward gathers the current shards.

    A global forward pre-hook (it runs before FSDP's own pre-forward) reshards, the first time
    in each probe that an FSDP module is entered, every FSDP module below it that is not yet
    resharded in this probe; :meth:`close` reshards all of them once more.
    """

    def __init__(self) -> None:
        self._cls = _fsdp_module_class()
        self._seen: dict[int, nn.Module] = {}
        self._done: set[int] = set()
        self._below: dict[int, list[nn.Module]] = {}  # the FSDP modules under each entered one
        self._handle = (
            None
            if self._cls is None
            else nn.modules.module.register_module_forward_pre_hook(self._hook)
        )

    def _hook(self, module: nn.Module, args: object) -> None:
        if id(module) in self._done or not isinstance(module, self._cls):  # type: ignore[arg-type]
            return
        below = self._below.get(id(module))
        if below is None:
            below = [m for m in module.modules() if isinstance(m, self._cls)]  # type: ignore[arg-type]
            self._below[id(module)] = below
        for m in below:
            if id(m) not in self._done:
                m.reshard()  # type: ignore[operator]
                self._done.add(id(m))
                self._seen[id(m)] = m

    def next_probe(self) -> None:
        self._done.clear()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for m in self._seen.values():
            m.reshard()  # type: ignore[operator]


@contextlib.contextmanager
def _fresh_shards() -> Iterator[_FreshShards]:
    fresh = _FreshShards()
    try:
        yield fresh
    except BaseException:
        try:
            fresh.close()
        except Exception:  # the error that got us here is the one to report
            logger.debug("hidlr: resharding after a failed probe step failed", exc_info=True)
        raise
    fresh.close()


class DistributedHiDLR(HiDLR):
    """:class:`~hidlr.HiDLR` whose probe losses are averaged across a process group.

    Works with DDP and with FSDP2 (``fully_shard``: parameters are ``DTensor`` shards, probed
    shard-wise); see :mod:`hidlr.integrations.distributed`.

    Args:
        optimizer: the base optimizer, as for :class:`~hidlr.HiDLR`.
        process_group: the group to average over (default: the default group). It must be
            initialised before the first probe step.
        timeout: longest wait, in seconds (or a ``timedelta``), for the other ranks' probe
            losses before :class:`ProbeSyncError`; ``None`` uses the process group's timeout.
        **options: every keyword of :class:`~hidlr.HiDLR`.

    Freezing (``freeze_threshold``, ``freeze_budget``) turns ``requires_grad`` off during
    training; DDP then needs ``DistributedDataParallel(model, find_unused_parameters=True)``.
    The check for a closure on the gradient's own batch (``on_own_batch``) does not run here
    (it would need the gradient's slope reduced across ranks): give each rank the next batch.

    :attr:`reductions` counts the all-reduces made so far (two per probe step: moved flags
    and probe losses; three with the robust policy's combined-step probe).
    """

    _sharded_parameters = True
    _defers_on_own_batch = False  # (deferred probes are not supported here)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        process_group: Any = None,
        timeout: float | datetime.timedelta | None = None,
        **options: Any,
    ) -> None:
        if options.get("defer_probes"):
            raise ValueError(
                "defer_probes=True is not supported by DistributedHiDLR (its probes reduce "
                "across ranks within one step); give each rank the next batch's closure instead"
            )
        super().__init__(optimizer, **options)
        self.process_group = process_group
        self.timeout = _as_timedelta(timeout)
        self.reductions = 0
        self._fitted = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["process_group"] = None  # process groups do not pickle; the default is used
        return state

    # -- the reductions --------------------------------------------------------------------

    def _all_reduce(self, values: torch.Tensor, op: Any, what: str) -> torch.Tensor:
        """``values`` reduced over the ranks with ``op``, by one all-reduce (on a copy)."""
        if not dist.is_available() or not dist.is_initialized():
            raise ProbeSyncError(
                "DistributedHiDLR needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group) before its first probe step"
            )
        group = self.process_group
        if group is not None and dist.get_rank(group) < 0:
            raise ProbeSyncError("this rank is not a member of DistributedHiDLR's process group")
        if dist.get_backend(group) != "nccl":
            values = values.cpu()
        elif (
            values.device.type == "cpu"
        ):  # NCCL reduces CUDA tensors only (the flags are on the CPU)
            values = values.to(torch.device("cuda", torch.cuda.current_device()))
        buf = values.contiguous().clone()
        try:
            work = dist.all_reduce(buf, op=op, group=group, async_op=True)
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
            step = self._steps - 1
            raise self._sync_error(
                f"could not combine the {what} of probe step {step} across ranks within {limit}",
                exc,
            ) from exc
        self.reductions += 1
        return buf

    def _sync_error(self, failed: str, exc: BaseException) -> ProbeSyncError:
        group = self.process_group
        return ProbeSyncError(
            f"DistributedHiDLR (rank {dist.get_rank(group)} of {dist.get_world_size(group)}) "
            f"{failed}: another rank probably failed while probing (look for its error) or "
            f"stopped calling step(). The error was: {type(exc).__name__}: {exc}"
        )

    def _all_mean(self, losses: torch.Tensor, what: str) -> torch.Tensor:
        """The mean over the ranks of ``losses`` (float64), by one all-reduce."""
        total = self._all_reduce(losses.to(torch.float64), dist.ReduceOp.SUM, what)
        return total / dist.get_world_size(self.process_group)

    def _reduce_flags(self, flags: torch.Tensor) -> torch.Tensor:
        moved = self._all_reduce(flags.to(torch.int32), dist.ReduceOp.MAX, "moved flags")
        return moved > 0

    def _reduce_losses(self, losses: torch.Tensor) -> torch.Tensor:
        mean = self._all_mean(losses, f"{losses.numel()} probe losses")
        self._fitted = True
        return mean

    def step(self, closure: Closure | None = None) -> None:  # type: ignore[override]
        if self.options.get("defer_probes") or self._pending is not None:
            raise ValueError(
                "defer_probes=True is not supported by DistributedHiDLR (it came with a loaded "
                "state dict or a changed option); give each rank the next batch's closure instead"
            )
        if closure is None or not callable(closure) or not self.needs_closure():
            return self._hidlr_step(closure)

        def synced() -> Any:
            fresh.next_probe()
            try:
                value = closure()
            except Exception as exc:
                if not _raised_in_collective(exc):
                    raise  # this rank's own failure, unchanged
                raise self._sync_error(
                    f"could not run a probe of probe step {self._steps - 1}: a collective in "
                    "its forward failed",
                    exc,
                ) from exc
            if not self._fitted:
                return value  # a probe of the fit: averaged all at once in _reduce_losses
            # the combined-step probe of the robust policy, after the fit
            loss = _scalar_loss(value)
            return self._all_mean(loss.reshape(1), "combined-step probe")[0].to(loss.device)

        self._fitted = False
        try:
            with _fresh_shards() as fresh:
                return self._hidlr_step(synced)
        finally:
            self._fitted = False


def rates_agree(opt: HiDLR, process_group: Any = None) -> bool:
    """Whether every rank holds exactly the same adapted rates (a check: two all-reduces),
    over ``process_group`` (default: the optimizer's own, else the whole world)."""
    if process_group is None:
        process_group = getattr(opt, "process_group", None)
    rates = torch.tensor(opt.lrs, dtype=torch.float64)
    if dist.get_backend(process_group) == "nccl":  # NCCL reduces CUDA tensors only
        rates = rates.to(torch.device("cuda", torch.cuda.current_device()))
    lo, hi = rates.clone(), rates.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=process_group)
    return bool(torch.equal(lo, hi))
