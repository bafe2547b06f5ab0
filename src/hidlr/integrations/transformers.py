"""Hi-DLR in the Hugging Face ``transformers.Trainer``.

:class:`HiDLRTrainer` is a ``Trainer`` whose optimizer is a :class:`ClosureHiDLR` around the
optimizer the Trainer would have built (same class and arguments from ``TrainingArguments``),
with one param group per group of a grouping function (default: :func:`hidlr.by_lora` for
``peft`` LoRA models, :func:`hidlr.by_role` otherwise). Everything else is the Trainer's own:

* **Probe batch**: the Trainer calls ``optimizer.step()`` without a closure; the trainer
  keeps the micro-batches of the current optimizer step and installs, before each step, a
  closure that returns the model's loss on them (no ``backward``, under the Trainer's
  autocast). With gradient accumulation, ``probe_micro_batches="all"`` (default) probes the
  mean loss over all micro-batches of the step, the objective whose gradient was
  accumulated; ``"last"`` probes the last micro-batch only (``gradient_accumulation_steps``
  times cheaper); ``probe_fraction`` probes the first fraction of each micro-batch
  (:func:`hidlr.probe_subset`). By default (``probe_batch="next"``) the probes see the
  micro-batches of the *next* optimizer step, which the trainer loads one step ahead: rates
  fitted on the batch the step was made for are systematically too long (the README's
  robustness benchmark: next batch 9/12 tasks within 5% of the grid-best rate, previous 5/12,
  own 4/12). The last step of an epoch, which has no next one, probes the previous step's.
  ``probe_batch="previous"`` probes the previous step's micro-batches (the first step its
  own; checkpoints keep them, in ``optimizer.pt``), ``"same"`` the step's own (which the
  optimizer's own-batch check warns about once, where its fits find it: rates fitted there
  run long; it does not defer the probes here, the trainer chose their batch).
* **Gradient clipping** happens in the Trainer before the step; Hi-DLR's direction is the
  base optimizer's step on the clipped gradient.
* **Mixed precision**: probes call the model as prepared by ``accelerate`` (autocast) inside
  :meth:`transformers.Trainer.compute_loss_context_manager`. With a ``GradScaler`` (fp16 on
  GPU) a skipped step (inf / NaN gradients) skips Hi-DLR's step too.
* **Scheduler**: the Trainer's scheduler multiplies the adapted rates (the rate used is
  ``lrs[k] * lr / initial_lr``).
* **Checkpoints**: ``optimizer.pt`` holds ``HiDLR.state_dict()`` (base state, rates, step
  count, history); ``resume_from_checkpoint`` continues bit-identically (tested on CPU).
* **Logging**: every Trainer log of the training loss gains ``hidlr/lr/<group>`` (adapted
  rate, before the scheduler's factor: the rate used is it times ``learning_rate /
  args.learning_rate``), ``hidlr/r2/<group>`` and ``hidlr/accepted/<group>`` of the latest
  probe step, so every ``report_to`` logger (TensorBoard, W&B, ...) records them.

DeepSpeed, FSDP and SageMaker manage their own optimizers and are not supported, nor is more
than one process (``torchrun``): the probe losses would have to be averaged across processes,
which :class:`hidlr.integrations.distributed.DistributedHiDLR` does in a loop of your own.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from hidlr._validation import check_float
from hidlr.batches import probe_subset
from hidlr.groups import by_lora, by_role
from hidlr.groups._common import _LORA_A, _LORA_B, ROLES
from hidlr.integrations import find_hidlr, group_names
from hidlr.optimizer import HiDLR

__all__ = ["ClosureHiDLR", "HiDLRTrainer", "default_groups", "hidlr_log_values"]

GroupFn = Callable[[nn.Module], Sequence[Mapping[str, Any]]]


class ClosureHiDLR(HiDLR):
    """:class:`hidlr.HiDLR` that falls back on :attr:`default_closure` when :meth:`step` is
    called without one (as ``transformers.Trainer`` and ``accelerate`` do).

    ``default_closure`` is set by whoever owns the batch (:class:`HiDLRTrainer` before every
    optimizer step); it is not saved in checkpoints. A closure passed to :meth:`step` wins.

    :attr:`step_batches` (the current step's micro-batches), :attr:`previous_batches` (the
    last step's) and :attr:`next_batches` (the next step's) are where :class:`HiDLRTrainer`
    keeps the batches its probes see. With :attr:`save_step_batches` the current step's are
    saved in :meth:`state_dict` (key ``"probe_batches"``), so a run resumed from a checkpoint
    probes the batch an uninterrupted one would (in a multi-process run, the batches of the
    process that saved the checkpoint).

    Whoever owns the batch chooses the probes' batch: a closure on the gradient's own batch is
    warned about (``on_own_batch``), never switched to deferred probes.
    """

    _defers_on_own_batch = False

    def __init__(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.default_closure: Callable[[], Any] | None = None
        self.step_batches: list[Any] = []
        self.previous_batches: list[Any] = []
        self.next_batches: list[Any] = []
        self.save_step_batches = False
        self._built_by_trainer = False  # made by HiDLRTrainer from its hidlr_kwargs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.save_step_batches and self.step_batches:
            state["probe_batches"] = [dict(b) for b in self.step_batches]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        batches = state.pop("probe_batches", None)
        super().load_state_dict(state)
        self.step_batches, self.previous_batches = list(batches or []), []

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        # (not super().step: the optimizer hooks would run twice)
        return self._hidlr_step(closure if closure is not None else self.default_closure)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["default_closure"] = None
        return state


def _is_peft_lora(model: nn.Module) -> bool:
    return any(
        p.requires_grad and (_LORA_A | _LORA_B) & set(n.split("."))
        for n, p in model.named_parameters()
    )


def default_groups(model: nn.Module) -> list[dict[str, Any]]:
    """:func:`hidlr.by_lora` (``lora_A`` / ``lora_B`` / ``head``) for a LoRA model, else
    :func:`hidlr.by_role` (``head`` / ``norm`` / ``bias`` / ``rest``) with the roles the model
    has (Llama has no biases, for one); one group when it has none of them."""
    if _is_peft_lora(model):
        return by_lora(model)
    present: list[str] = []
    for role in ROLES:  # in order: a role is empty when the ones before took its parameters
        with contextlib.suppress(ValueError):  # none left for it, no head found, or no rest
            by_role(model, [*present, role])
            present.append(role)
    if present:
        return by_role(model, present)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]


def hidlr_log_values(optimizer: Any) -> dict[str, float]:
    """What :class:`HiDLRTrainer` adds to each training log: per group the adapted rate
    (``hidlr/lr/<name>``) and, once a probe step happened, the latest fit's ``R^2``
    (``hidlr/r2/<name>``, NaN if the group was not probed) and whether its proposal was
    accepted (``hidlr/accepted/<name>``, 0 or 1)."""
    opt = find_hidlr(optimizer)
    names = group_names(opt)
    logs: dict[str, float] = {}
    for name, lr in zip(names, opt.lrs, strict=True):
        logs[f"hidlr/lr/{name}"] = float(lr)
    history = opt.history
    if history:
        for g in history[-1].groups:
            logs[f"hidlr/r2/{names[g.group]}"] = float(g.r2)
            logs[f"hidlr/accepted/{names[g.group]}"] = float(g.accepted)
    return logs


class HiDLRTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with Hi-DLR (see the module docstring).

    Args (keywords, besides every ``Trainer`` argument):
        hidlr_groups: a function of the model returning param groups (dicts with
            ``"params"``, optionally ``"name"`` and other per-group options such as
            ``"weight_decay"``); default :func:`default_groups`. Only trainable parameters
            may appear. A group without ``"weight_decay"`` gets ``args.weight_decay``,
            or 0 when none of its parameters is one the Trainer decays (biases, norms).
        hidlr_kwargs: keyword arguments of :class:`hidlr.HiDLR` (``update_every``,
            ``policy``, ...).
        probe_micro_batches: ``"all"`` (default) or ``"last"``: which micro-batches of a
            step the probes' loss averages over under gradient accumulation.
        probe_fraction: the probes see the first ``ceil(probe_fraction * n)`` examples of
            each of those micro-batches (default 1: all); smaller is cheaper and noisier
            (``hidlr bench overhead`` measures both).
        probe_batch: ``"next"`` (default): the probes see the next optimizer step's
            micro-batches (the previous step's at the end of an epoch); ``"previous"``: the
            previous step's; ``"same"``: the current step's (the gradient's own).

    An optimizer passed through ``optimizers=(opt, scheduler)`` is used as the base and
    wrapped, unless it already is a :class:`ClosureHiDLR`. The Hi-DLR optimizer is
    :attr:`hidlr_optimizer` (``trainer.optimizer`` is ``accelerate``'s wrapper around it).
    """

    def __init__(
        self,
        *args: Any,
        hidlr_groups: GroupFn | None = None,
        hidlr_kwargs: Mapping[str, Any] | None = None,
        probe_micro_batches: str = "all",
        probe_fraction: float = 1.0,
        probe_batch: str = "next",
        **kwargs: Any,
    ) -> None:
        if probe_micro_batches not in ("all", "last"):
            raise ValueError(
                f"probe_micro_batches must be 'all' or 'last', got {probe_micro_batches!r}"
            )
        if probe_batch not in ("next", "previous", "same"):
            raise ValueError(
                f"probe_batch must be 'next', 'previous' or 'same', got {probe_batch!r}"
            )
        self.probe_batch = probe_batch
        self._lookahead: list[Any] = []
        self._lookahead_source: Any = None
        self._probe_cache: tuple[list[Any], list[dict[str, Any]], Any] | None = None
        self.probe_fraction = check_float(
            "probe_fraction", probe_fraction, low=0.0, high=1.0, low_open=True
        )
        if hidlr_groups is not None and not callable(hidlr_groups):
            raise TypeError(f"hidlr_groups must be callable, got {hidlr_groups!r}")
        self.hidlr_groups: GroupFn = hidlr_groups or default_groups
        self.hidlr_kwargs: dict[str, Any] = dict(hidlr_kwargs or {})
        if self.hidlr_kwargs.get("defer_probes"):
            raise ValueError(
                "hidlr_kwargs defer_probes=True is not for HiDLRTrainer: it hands the probes the "
                "batch it chose itself (probe_batch='next', 'previous' or 'same')"
            )
        self.probe_micro_batches = probe_micro_batches
        self._hidlr_model: nn.Module | None = None
        self._hidlr_stash_step = -1
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("HiDLRTrainer supports neither DeepSpeed nor FSDP")
        if self.args.world_size > 1:
            # each process would fit its own rates on its own probe batch, and the replicas
            # would drift apart: the probe losses must be averaged (DistributedHiDLR)
            raise ValueError(
                f"HiDLRTrainer runs in one process (world_size is {self.args.world_size}); "
                "for several, use hidlr.integrations.distributed.DistributedHiDLR in a "
                "training loop of your own"
            )

    # -- the optimizer ---------------------------------------------------------------------

    @property
    def hidlr_optimizer(self) -> ClosureHiDLR:
        """The Hi-DLR optimizer (inside ``accelerate``'s wrapper)."""
        opt = find_hidlr(self.optimizer)
        if not isinstance(opt, ClosureHiDLR):
            raise TypeError("the trainer's optimizer is not a ClosureHiDLR")
        return opt

    def _existing_hidlr(self) -> ClosureHiDLR | None:
        """:attr:`hidlr_optimizer` if there is one yet (``None`` before the first train())."""
        try:
            return self.hidlr_optimizer
        except TypeError:
            return None

    def _base_param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        decay = set(self.get_decay_parameter_names(model))
        decayed = {id(p) for n, p in model.named_parameters() if n in decay}
        groups = []
        for i, group in enumerate(self.hidlr_groups(model)):
            if "params" not in group:
                raise ValueError(f"hidlr_groups(model)[{i}] has no 'params'")
            out = dict(group)
            params = out["params"]  # a single tensor is allowed, as in torch.optim
            out["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            if "weight_decay" not in out:
                any_decayed = any(id(p) in decayed for p in out["params"])
                out["weight_decay"] = self.args.weight_decay if any_decayed else 0.0
            groups.append(out)
        covered = {id(p) for g in groups for p in g["params"]}
        left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if left:
            warnings.warn(
                f"hidlr_groups(model) leaves out {len(left)} trainable parameter(s) (e.g. "
                f"{left[0]!r}): they get gradients but no optimizer updates them",
                stacklevel=2,
            )
        return groups

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model: Any = self.model if model is None else model
        if self.optimizer is None:
            # Trainer(optimizer_cls_and_kwargs=...), absent in old transformers
            given = getattr(self, "optimizer_cls_and_kwargs", None)
            if given is not None:
                cls, kwargs = given
            else:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = dict(kwargs)
            if any(k in kwargs for k in ("params", "model", "optimizer_dict")) or not (
                isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
            ):
                raise ValueError(
                    f"HiDLRTrainer needs a plain torch optimizer, got optim={self.args.optim!r}"
                )
            base = cls(self._base_param_groups(opt_model), **kwargs)
            self.optimizer = ClosureHiDLR(base, **self.hidlr_kwargs)
            self.optimizer._built_by_trainer = True
        elif isinstance(self.optimizer, ClosureHiDLR) and not getattr(
            self.optimizer, "_built_by_trainer", False
        ):  # one passed in (optimizers=(ClosureHiDLR(...), None)): checked, kept as it is
            if self.optimizer.options.get("defer_probes"):
                raise ValueError(
                    "the ClosureHiDLR passed to HiDLRTrainer has defer_probes=True: the trainer "
                    "hands the probes the batch it chose itself (probe_batch=...)"
                )
            if self.hidlr_kwargs:
                warnings.warn(
                    f"hidlr_kwargs {sorted(self.hidlr_kwargs)} are not applied: the ClosureHiDLR "
                    "passed in keeps its own options",
                    stacklevel=2,
                )
        elif not isinstance(self.optimizer, ClosureHiDLR):
            if self._existing_hidlr() is not None:
                return self.optimizer  # a second train(): accelerate's wrapper around ours
            if isinstance(self.optimizer, HiDLR):
                raise TypeError(
                    "pass the base optimizer (or a ClosureHiDLR) to HiDLRTrainer, not a HiDLR: "
                    "the Trainer calls step() without a closure"
                )
            self.optimizer = ClosureHiDLR(self.optimizer, **self.hidlr_kwargs)
            self.optimizer._built_by_trainer = True
        return self.optimizer

    # -- the probe closure -----------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._hidlr_stash_step = -1  # every run (a resumed one too) starts its stash afresh
        opt = self._existing_hidlr()
        if opt is not None:
            opt.step_batches, opt.previous_batches, opt.next_batches = [], [], []
        try:
            return super().train(*args, **kwargs)
        finally:  # let go of the last epoch's iterator (and its worker processes)
            self._lookahead, self._lookahead_source = [], None
            self._probe_cache = None

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, *args: Any
    ) -> tuple[list[Any], Any]:
        """The Trainer's prefetch of one optimizer step's micro-batches, one step ahead with
        ``probe_batch="next"``: this step's come from the lookahead, and the next step's are
        loaded now so that this step's probes can see them."""
        if self.probe_batch != "next":
            return super().get_batch_samples(epoch_iterator, num_batches, *args)
        if self._lookahead_source is not epoch_iterator:  # a new epoch
            self._lookahead_source, self._lookahead = epoch_iterator, []
        current = self._lookahead or list(itertools.islice(epoch_iterator, num_batches))
        self._lookahead = list(itertools.islice(epoch_iterator, num_batches))
        opt = find_hidlr(self.optimizer)
        if isinstance(opt, ClosureHiDLR):
            opt.next_batches = list(self._lookahead)
        # the Trainer's own count of items (loss scaling), on the batches already loaded
        return super().get_batch_samples(iter(current), len(current), *args)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        opt = self.hidlr_optimizer
        # "next" falls back on the previous step's batches at an epoch's end: keep them too
        opt.save_step_batches = self.probe_batch != "same"
        # global_step advances after every optimizer step (taken or skipped by a scaler):
        # a new value means a new step's first micro-batch
        if self._hidlr_stash_step != self.state.global_step:
            opt.previous_batches = opt.step_batches or opt.previous_batches
            opt.step_batches = []
        elif self.probe_micro_batches == "last":
            opt.step_batches = []
        self._hidlr_stash_step = self.state.global_step
        opt.step_batches.append(inputs)
        self._hidlr_model = model
        opt.default_closure = self._probe_loss
        return super().training_step(model, inputs, num_items_in_batch)

    def _probe_loss(self) -> torch.Tensor:
        """The mean loss of the model on the stashed micro-batches of the next step (or the
        previous one's, or this one's: see ``probe_batch``), without backward."""
        opt, model = self.hidlr_optimizer, self._hidlr_model
        batches = opt.step_batches
        if self.probe_batch == "next" and opt.next_batches:
            batches = opt.next_batches
        elif self.probe_batch != "same" and opt.previous_batches:
            batches = opt.previous_batches
        if self.probe_micro_batches == "last":
            batches = batches[-1:]
        if not batches or model is None:
            raise RuntimeError("HiDLRTrainer: no batch stashed for the probe closure")
        prepared, items = self._probe_inputs(batches)
        # the loss the step's gradient came from: with a token-normalised loss (a model that
        # takes num_items_in_batch, or compute_loss_func) the sum over the micro-batches of
        # each one's loss over the items of all, else the mean of their losses
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and items is not None
            ) or self.compute_loss_func is not None
        total = torch.zeros((), dtype=torch.float32)
        for inputs in prepared:
            with self.compute_loss_context_manager():  # (a copy: compute_loss may pop labels)
                out = self.compute_loss(model, dict(inputs), num_items_in_batch=items)
            loss = out[0] if isinstance(out, tuple) else out
            if self.args.n_gpu > 1:
                loss = loss.mean()
            total = total.to(loss.device) + loss.detach().float()
        return total if scaled else total / len(prepared)

    def _probe_inputs(self, batches: list[Any]) -> tuple[list[dict[str, Any]], Any]:
        """The probe batches on the device (each cut to ``probe_fraction``) and their count of
        items, prepared once per probe step: every probe of a step sees the same batches
        (the cache holds them, so their identity is not reused while it is kept)."""
        cached = self._probe_cache
        if (
            cached is not None
            and len(cached[0]) == len(batches)
            and all(a is b for a, b in zip(cached[0], batches, strict=True))
        ):
            return cached[1], cached[2]
        prepared = [
            self._prepare_inputs(probe_subset(dict(inputs), self.probe_fraction))
            for inputs in batches
        ]
        items = self._get_num_items_in_batch(prepared, self.args.device)
        self._probe_cache = (list(batches), prepared, items)
        return prepared, items

    # -- logging ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.optimizer is not None:
            with contextlib.suppress(TypeError):
                extra = hidlr_log_values(self.optimizer)
                logs = {**logs, **{k: v for k, v in extra.items() if not math.isnan(v)}}
        super().log(logs, start_time)
