"""Table 2 on data that installs here: full-model fine-tuning of a CNN on Fashion-MNIST.

No pretrained vision weights can be had offline, so each seed pre-trains a small CNN (with
BatchNorm) on classes 0-4, then fine-tunes the whole model, with a fresh head, on classes 5-9
from 5,000 images. Two-group Hi-DLR (head / bias / norm against the rest, as in Table 2) is
compared with Hi-ULR, Prodigy, D-Adaptation and constant, linear-decay and cosine-decay rates.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from typing import Any

import torch
from torch import nn

from hidlr.baselines import build
from hidlr.experiments.models import SmallCNN
from hidlr.experiments.results import RunSpec
from hidlr.groups import by_role

__all__ = ["METHODS", "run", "specs"]

METHODS = (
    "constant",
    "linear",
    "cosine",
    "prodigy",
    "dadaptation",
    "gen",
    "hidlr_head",
    "hidlr_bias",
    "hidlr_norm",
    "gen_paper",  # Algorithm 1 as written (policy="paper") beside the default policy
    "hidlr_head_paper",
)


def _subset(
    data: dict[str, torch.Tensor], classes: range, n: int | None, seed: int, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (data["x"], data["y"]) if split == "train" else (data["x_test"], data["y_test"])
    keep = (y >= classes.start) & (y < classes.stop)
    x, y = x[keep], y[keep] - classes.start
    if n is not None:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[idx], y[idx]
    return x, y


def _loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _train(
    model: nn.Module, built: Any, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
) -> float:
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, x.shape[0], (64,), generator=gen) for _ in range(steps + 1)]
    start = time.perf_counter()
    for step in range(steps):
        idx, nxt = batches[step], batches[step + 1]
        built.optimizer.zero_grad()
        _loss_on(model, x[idx], y[idx]).backward()
        built.step(lambda nxt=nxt: _loss_on(model, x[nxt], y[nxt]))
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(x[i : i + 1000]) for i in range(0, x.shape[0], 1000)])
    model.train()
    return nn.functional.cross_entropy(logits, y).item(), (
        logits.argmax(dim=1) == y
    ).float().mean().item()


def specs(quick: bool, seeds: int) -> list[RunSpec]:
    cfg = {
        "pretrain_steps": 60 if quick else 200,
        "steps": 60 if quick else 200,
        "n_train": 5000,
        "lr": 1e-3,
    }
    return [
        RunSpec("fashion_mnist", m, s, cfg) for m in METHODS for s in range(1 if quick else seeds)
    ]


def run(spec: RunSpec) -> dict[str, Any]:
    from hidlr.experiments.data import fashion_mnist

    cfg = spec.config
    torch.set_num_threads(1)
    data = fashion_mnist()
    torch.manual_seed(spec.seed)
    # no conv biases before BatchNorm (as in the paper's ResNets): see SmallCNN
    model = SmallCNN(5, conv_bias=False)
    x, y = _subset(data, range(0, 5), 12000, spec.seed, "train")
    pre = build(
        "constant",
        [{"params": list(model.parameters())}],
        lr=3e-3,
        base="adamw",
        total_steps=cfg["pretrain_steps"],
    )
    _train(model, pre, x, y, cfg["pretrain_steps"], spec.seed)
    source = _accuracy(model, *_subset(data, range(0, 5), 2000, 0, "test"))
    model.head = nn.Linear(model.head.in_features, 5)  # a fresh head for the new classes
    method = spec.method.removesuffix("_paper")
    if method.startswith("hidlr_"):
        role = method.split("_")[1]
        groups = by_role(model, roles=(role,), head="head" if role == "head" else None)
        name = "hidlr"
    else:
        groups = [{"params": list(model.parameters())}]
        name = method
    config: dict[str, Any] = {
        "lr": cfg["lr"],
        "total_steps": cfg["steps"],
        "base": "adamw",
        "weight_decay": 0.01,
    }
    if spec.method.endswith("_paper"):
        config["hidlr_options"] = {"policy": "paper"}
    if name in ("linear", "cosine"):
        config["warmup_steps"] = max(1, cfg["steps"] // 33)  # the paper's 3% warm-up
    with contextlib.redirect_stdout(io.StringIO()):  # dadaptation prints on construction
        built = build(name, groups, **config)
    xt, yt = _subset(data, range(5, 10), cfg["n_train"], spec.seed, "train")
    step_seconds = _train(model, built, xt, yt, cfg["steps"], 100 + spec.seed)
    with built.evaluating():
        loss, acc = _accuracy(model, *_subset(data, range(5, 10), None, 0, "test"))
    out = {
        "test_loss": loss,
        "test_accuracy": acc,
        "source_accuracy": source[1],
        "step_seconds": step_seconds,
        "groups": [g.get("name", "all") for g in groups],
        "diverged": not math.isfinite(loss),
    }
    opt = built.optimizer
    if hasattr(opt, "lrs") and hasattr(opt, "history"):
        out["final_lrs"] = opt.lrs
        out["lrs"] = [[g.lr_after for g in r.groups] for r in opt.history]
    return out
