"""A registry of training methods, keyed by name, that builds each one for a model and a budget.

``build(name, params, **config)`` returns a :class:`Built` record that a generic training loop
drives the same way for every method::

    built = build("cosine", groups, lr=1e-3, total_steps=1000, warmup_steps=50)
    built.train_mode()
    for batch in batches:
        built.optimizer.zero_grad()
        loss_fn(batch).backward()
        built.step(closure)          # closure() -> loss at the current weights, no backward
    with built.evaluating():         # schedule-free x / DoG's averaged weights swapped in
        evaluate(model)

``params`` is a list of torch param-group dicts (each may carry a ``"name"``), a list of
tensors (one group) or an ``nn.Module`` (one group per trainable tensor, named after it).
Uniform-rate methods merge the groups into one; differential-rate methods keep one per entry.
Third-party packages are optional: a missing one raises ``ImportError`` naming the extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hidlr._validation import check_choice, check_float
from hidlr.baselines.core import (
    SCHEDULES,
    Built,
    MethodConfig,
    _base,
    _base_class,
    _merged,
    _scheduler,
    as_param_groups,
    require,
)

__all__ = ["METHODS", "available_methods", "build"]

Builder = Callable[[list[dict[str, Any]], MethodConfig], Built]
METHODS: dict[str, Builder] = {}


def _register(*names: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for n in names:
            METHODS[n] = fn
        return fn

    return deco


def available_methods() -> list[str]:
    return list(METHODS)


def build(name: str, params: nn.Module | Iterable[Any], **config: Any) -> Built:
    """Build method ``name`` for ``params``; ``config`` holds :class:`MethodConfig` fields."""
    check_choice("method", name, METHODS)
    cfg = MethodConfig(**config)
    if isinstance(params, nn.Module) and cfg.model is None:
        cfg = dataclasses.replace(cfg, model=params)
    return dataclasses.replace(METHODS[name](as_param_groups(params), cfg), name=name)


# --- uniform and manual differential rates (torch only) -------------------------------------


def _uniform_builder(schedule: str) -> Builder:
    def builder(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
        opt = _base(_merged(groups), cfg)
        return Built(schedule, opt, _scheduler(opt, cfg, schedule))

    return builder


for _s in SCHEDULES:
    METHODS[_s] = _uniform_builder(_s)


@_register("manual")
def _manual(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    if cfg.lrs is not None:
        if len(cfg.lrs) != len(groups):
            raise ValueError(f"lrs must hold one rate per group ({len(groups)}), got {cfg.lrs!r}")
        groups = [
            {**g, "lr": check_float("lrs", r, low=0.0)}
            for g, r in zip(groups, cfg.lrs, strict=True)
        ]
    elif any("lr" not in g for g in groups):
        raise ValueError("lrs must be given when a group carries no 'lr', got None")
    opt = _base(groups, cfg)
    return Built("manual", opt, _scheduler(opt, cfg, cfg.schedule))


# --- LoRA+ (peft) ------------------------------------------------------------------------------


@_register("loraplus")
def _loraplus(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    """peft's ``create_loraplus_optimizer``: eta_B = loraplus_lr_ratio * eta_A (= lr).

    peft groups the model's trainable tensors itself (B matrices and 1-D tensors at the
    larger rate), so only ``model`` matters here, not the param groups.
    """
    if cfg.model is None:
        raise ValueError("model must be the LoRA model (an nn.Module) for 'loraplus', got None")
    peft_optimizers = require("peft.optimizers", package="peft", needed_by="method 'loraplus'")
    cls, kwargs = _base_class(cfg)
    opt = peft_optimizers.create_loraplus_optimizer(
        cfg.model,
        cls,
        lr=cfg.lr,
        loraplus_lr_ratio=cfg.loraplus_lr_ratio,
        loraplus_weight_decay=cfg.weight_decay,
        **kwargs,
    )
    return Built("loraplus", opt, _scheduler(opt, cfg, cfg.schedule))


# --- parameter-free and schedule-free methods ------------------------------------------------


@_register("prodigy")
def _prodigy(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    check_choice("base", cfg.base, ("adamw", "adam"))
    prodigyopt = require("prodigyopt", package="prodigyopt", needed_by="method 'prodigy'")
    opt = prodigyopt.Prodigy(
        _merged(groups),
        lr=cfg.free_lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        decouple=cfg.base == "adamw",
        # prodigyopt's advice with a warm-up: otherwise the small early steps inflate its d
        safeguard_warmup=cfg.warmup_steps > 0,
    )
    return Built("prodigy", opt, _scheduler(opt, cfg, cfg.schedule))


@_register("dadaptation")
def _dadaptation(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    """D-Adaptation: DAdaptAdam (decoupled decay for 'adamw') or DAdaptSGD."""
    dadapt = require("dadaptation", package="dadaptation", needed_by="method 'dadaptation'")
    merged, common = _merged(groups), {"lr": cfg.free_lr, "weight_decay": cfg.weight_decay}
    if cfg.base == "sgd":
        opt = dadapt.DAdaptSGD(merged, momentum=cfg.momentum, **common)
    else:
        opt = dadapt.DAdaptAdam(merged, betas=cfg.betas, decouple=cfg.base == "adamw", **common)
    return Built("dadaptation", opt, _scheduler(opt, cfg, cfg.schedule))


class _Holder(nn.Module):
    """A module over bare parameters, for the averager when no model is given."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class _WeightSwap:
    """Swap the averaged weights into ``target`` for evaluation and back for training."""

    def __init__(self, target: nn.Module, averaged: nn.Module) -> None:
        self.target, self.averaged = target, averaged
        self.saved: dict[str, torch.Tensor] | None = None

    def eval_mode(self) -> None:
        if self.saved is None:
            self.saved = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
            self.target.load_state_dict(self.averaged.state_dict())

    def train_mode(self) -> None:
        if self.saved is not None:
            self.target.load_state_dict(self.saved)
            self.saved = None


def _dog(groups: list[dict[str, Any]], cfg: MethodConfig, layerwise: bool) -> Built:
    """DoG / L-DoG with the package's polynomial-decay weight averager (Ivgi et al., 2023)."""
    name = "ldog" if layerwise else "dog"
    dog = require("dog", package="dog-optimizer", needed_by=f"method {name!r}")
    merged = _merged(groups)
    cls = dog.LDoG if layerwise else dog.DoG
    opt = cls(merged, lr=cfg.free_lr, weight_decay=cfg.weight_decay)
    target = cfg.model if cfg.model is not None else _Holder(merged[0]["params"])
    averager = dog.PolynomialDecayAverager(target)
    swap = _WeightSwap(target, averager.averaged_model)
    return Built(name, opt, averager=averager, train_mode=swap.train_mode, eval_mode=swap.eval_mode)


@_register("dog")
def _dog_global(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    return _dog(groups, cfg, layerwise=False)


@_register("ldog")
def _dog_layerwise(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    return _dog(groups, cfg, layerwise=True)


@_register("schedulefree")
def _schedulefree(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    """Schedule-Free AdamW (or SGD); its own warm-up; built in train mode."""
    sf = require("schedulefree", package="schedulefree", needed_by="method 'schedulefree'")
    merged = _merged(groups)
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps}
    if cfg.base == "sgd":
        opt = sf.SGDScheduleFree(merged, momentum=cfg.momentum or 0.9, **common)
    else:
        opt = sf.AdamWScheduleFree(merged, betas=cfg.betas, **common)
    opt.train()
    return Built("schedulefree", opt, train_mode=opt.train, eval_mode=opt.eval)


# --- Hi-DLR family (this package) ----------------------------------------------------------------


def _hidlr(base: torch.optim.Optimizer, cfg: MethodConfig, name: str) -> Built:
    """HiDLR around ``base``; a schedule (if any) scales the adapted rates, as HiDLR documents."""
    from hidlr.optimizer import HiDLR

    scheduler = _scheduler(base, cfg, cfg.schedule)
    opt = HiDLR(base, **dict(cfg.hidlr_options))
    return Built(name, opt, scheduler, needs_closure=True)


def _sage(groups: list[dict[str, Any]], cfg: MethodConfig) -> torch.optim.Optimizer:
    from hidlr.sage import SAGE

    opts = {"betas": cfg.betas, **cfg.sage_options}
    opt: torch.optim.Optimizer = SAGE(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **opts)
    return opt


@_register("gen")
def _gen(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    """GeN: Hi-DLR over a base optimizer with a single group (one adapted uniform rate)."""
    return _hidlr(_base(_merged(groups), cfg), cfg, "gen")


@_register("hidlr")
def _hidlr_groups(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    return _hidlr(_base(groups, cfg), cfg, "hidlr")


@_register("sage")
def _sage_method(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    opt = _sage(groups, cfg)
    return Built("sage", opt, _scheduler(opt, cfg, cfg.schedule))


@_register("hidlr_sage")
def _hidlr_sage(groups: list[dict[str, Any]], cfg: MethodConfig) -> Built:
    return _hidlr(_sage(groups, cfg), cfg, "hidlr_sage")
