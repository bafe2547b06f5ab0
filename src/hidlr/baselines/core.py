"""What every baseline builder shares: the :class:`Built` record, :class:`MethodConfig`,
warm-up/decay schedules, param-group handling and optional-dependency imports."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from hidlr._validation import check_choice, check_float, check_int

__all__ = [
    "BASES",
    "EXTRA_HINT",
    "SCHEDULES",
    "Built",
    "MethodConfig",
    "as_param_groups",
    "lr_multiplier",
    "require",
]

EXTRA_HINT = "pip install 'hidlr[baselines]'"
SCHEDULES = ("constant", "linear", "cosine")
BASES = ("adamw", "adam", "sgd")


def require(module: str, *, package: str, needed_by: str) -> ModuleType:
    """Import an optional dependency, or fail with the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{needed_by} needs the optional package {package!r}; install it with: {EXTRA_HINT}"
        ) from exc


def _noop() -> None:
    return None


@dataclass(frozen=True)
class Built:
    """A built method: what a training loop needs to drive it.

    ``needs_closure``: ``step`` must be given ``closure()`` returning the loss at the current
    weights without calling backward (Hi-DLR's probes). ``eval_mode`` swaps in the weights to
    evaluate (schedule-free's x, DoG's polynomial average) and ``train_mode`` swaps back.
    """

    name: str
    optimizer: Any
    scheduler: LRScheduler | None = None
    needs_closure: bool = False
    averager: Any | None = None
    train_mode: Callable[[], None] = _noop
    eval_mode: Callable[[], None] = _noop

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """One optimizer step (gradients already computed), then averager and scheduler."""
        if self.needs_closure:
            if closure is None:
                raise ValueError(f"closure must be a callable for method {self.name!r}, got None")
            self.optimizer.step(closure)
        else:
            self.optimizer.step()
        if self.averager is not None:
            self.averager.step()
        if self.scheduler is not None:
            self.scheduler.step()

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluation weights inside the block, training weights restored after it."""
        self.eval_mode()
        try:
            yield
        finally:
            self.train_mode()


@dataclass(frozen=True)
class MethodConfig:
    """Everything a builder may read; each method ignores what it has no use for.

    lr: the uniform rate (LoRA+: eta_A; Hi-DLR/GeN/SAGE: the starting rate).
    base: 'adamw', 'adam' or 'sgd', the optimizer under the uniform, manual, LoRA+, GeN and
        Hi-DLR methods; D-Adaptation takes DAdaptAdam or DAdaptSGD after it, Schedule-Free
        its AdamW or SGD variant, Prodigy accepts 'adamw' or 'adam' (decoupled decay or not).
    schedule: the decay for every method but 'constant', 'linear' and 'cosine' (their names fix
        it), DoG (none) and 'schedulefree' (none; its own warm-up); warm-up is linear. For the
        Hi-DLR family it scales the adapted rates.
    free_lr: the ``lr`` given to the parameter-free methods (Prodigy, D-Adaptation, DoG), a
        multiplier on their estimated step; 1.0 as their authors recommend.
    momentum: SGD's momentum (Schedule-Free SGD needs one: 0 gives it its default 0.9).
    lrs: one rate per group for 'manual' (else each group's own ``"lr"`` entry is used).
    model: the module for 'loraplus' (its LoRA B tensors have 'lora_B' in their names, as in a
        peft ``PeftModel``) and, when given, the module DoG's averager copies. ``build`` fills
        it in when ``params`` is a module.

    Methods with one uniform rate (the three schedules, Prodigy, D-Adaptation, DoG,
    Schedule-Free, GeN) merge the groups into one, dropping per-group options; 'manual',
    'hidlr', 'sage' and 'hidlr_sage' keep every group with its options.
    """

    lr: float = 1e-3
    total_steps: int = 1000
    warmup_steps: int = 0
    schedule: str = "constant"
    base: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    free_lr: float = 1.0
    lrs: Sequence[float] | None = None
    loraplus_lr_ratio: float = 16.0
    model: nn.Module | None = None
    hidlr_options: Mapping[str, Any] = field(default_factory=dict)
    sage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_int("total_steps", self.total_steps, minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps must be <= total_steps ({self.total_steps}), got {self.warmup_steps}"
            )
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("base", self.base, BASES)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_float("free_lr", self.free_lr, low=0.0, low_open=True)
        check_float("loraplus_lr_ratio", self.loraplus_lr_ratio, low=0.0, low_open=True)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            check_float(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        if self.lrs is not None:
            if isinstance(self.lrs, (str, bytes)) or not isinstance(self.lrs, Sequence):
                raise TypeError(f"lrs must be a sequence of floats > 0, got {self.lrs!r}")
            for i, lr in enumerate(self.lrs):
                check_float(f"lrs[{i}]", lr, low=0.0, low_open=True)


def lr_multiplier(step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0) -> float:
    """Factor on the peak rate at 0-based ``step``: linear warm-up, then the decay to 0."""
    check_int("step", step, minimum=0)
    check_choice("schedule", schedule, SCHEDULES)
    check_int("total_steps", total_steps, minimum=1)
    check_int("warmup_steps", warmup_steps, minimum=0)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _scheduler(opt: torch.optim.Optimizer, cfg: MethodConfig, schedule: str) -> LRScheduler | None:
    if schedule == "constant" and cfg.warmup_steps == 0:
        return None
    return LambdaLR(
        opt,
        lambda step: lr_multiplier(
            step, schedule=schedule, total_steps=cfg.total_steps, warmup_steps=cfg.warmup_steps
        ),
    )


def as_param_groups(params: nn.Module | Iterable[Any]) -> list[dict[str, Any]]:
    """Copies of the param groups (the caller's dicts are left as they were)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors or param-group dicts, or a module, got a "
            f"{type(params).__name__}: wrap a single tensor in a list"
        )
    if isinstance(params, nn.Module):
        groups = [
            {"name": n, "params": [p]} for n, p in params.named_parameters() if p.requires_grad
        ]
    else:
        items = list(params)
        if items and all(isinstance(x, torch.Tensor) for x in items):
            groups = [{"params": items}]
        else:
            groups = []
            for g in items:
                if not isinstance(g, Mapping) or "params" not in g:
                    raise TypeError(
                        f"params must be param-group dicts, tensors or a module, got {g!r}"
                    )
                p = g["params"]
                groups.append({**g, "params": [p] if isinstance(p, torch.Tensor) else list(p)})
    if not groups or not any(g["params"] for g in groups):
        raise ValueError(f"params must hold at least one trainable tensor, got {params!r}")
    return groups


def _merged(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"params": [p for g in groups for p in g["params"]]}]


def _base_class(cfg: MethodConfig) -> tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]:
    if cfg.base == "sgd":
        return torch.optim.SGD, {"momentum": cfg.momentum}
    cls = torch.optim.AdamW if cfg.base == "adamw" else torch.optim.Adam
    return cls, {"betas": cfg.betas}


def _base(groups: list[dict[str, Any]], cfg: MethodConfig) -> torch.optim.Optimizer:
    cls, kwargs = _base_class(cfg)
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
