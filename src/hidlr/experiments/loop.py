"""The training loop the paper's small experiments share: one method (a constant rate, a grid
point, static DLR, LoRA+ or Hi-DLR / Hi-ULR with either policy) on (x, y) tensors, full-batch
or in mini-batches, with the test loss after every epoch. Hi-DLR probes the next mini-batch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from hidlr.experiments.results import RunSpec
from hidlr.optimizer import HiDLR

__all__ = ["HI", "fit", "fit_spec", "grid_specs"]

HI = ("hi_ulr", "hi_dlr", "hi_ulr_paper", "hi_dlr_paper")


def _loss_on(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return loss_fn(model(x), y)


def _optimizer(method: str, groups: list[dict[str, Any]], cfg: dict[str, Any]) -> Any:
    base_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[cfg["base"]]
    if method in ("constant", "hi_ulr", "hi_ulr_paper"):
        params: list[dict[str, Any]] = [{"params": [p for g in groups for p in g["params"]]}]
    elif method in ("dlr", "loraplus"):
        lrs = cfg["lrs"] if method == "dlr" else [cfg["lr"], cfg["lr"] * cfg.get("ratio", 16.0)]
        params = [{"params": g["params"], "lr": lr} for g, lr in zip(groups, lrs, strict=True)]
    else:
        params = [{"params": g["params"]} for g in groups]
    base = base_cls(params, lr=cfg["lr"])
    if method in HI:
        policy = "paper" if method.endswith("_paper") else "robust"
        return HiDLR(base, update_every=cfg.get("update_every", 4), policy=policy)
    return base


def fit_spec(
    spec: RunSpec,
    model: nn.Module,
    groups: list[dict[str, Any]],
    data: dict[str, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, Any]:
    """:func:`_fit` with the method a spec names (a grid point's method is its grid's)."""
    return fit(model, groups, spec.config.get("grid") or spec.method, spec.config, data, loss_fn)


def fit(
    model: nn.Module,
    groups: list[dict[str, Any]],
    method: str,
    cfg: dict[str, Any],
    data: dict[str, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, Any]:
    x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    # a validation split (the last ``val_fraction`` of the training data, never trained on)
    # for choosing a grid's point: the test split only reports
    held = round(x.shape[0] * cfg.get("val_fraction", 0.0))
    xv, yv = x[x.shape[0] - held :], y[x.shape[0] - held :]
    x, y = x[: x.shape[0] - held], y[: x.shape[0] - held]
    torch.set_num_threads(1)
    opt = _optimizer(method, groups, cfg)
    gen = torch.Generator().manual_seed(cfg.get("batch_seed", 0))
    n, bs = x.shape[0], cfg.get("batch_size", x.shape[0])
    train_curve, test_curve, val_curve, lrs = [], [], [], []
    start = time.perf_counter()
    step = 0
    for _epoch in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        batches = [perm[i : i + bs] for i in range(0, n - bs + 1, bs)]
        for b, idx in enumerate(batches):
            probe = batches[(b + 1) % len(batches)]
            if step >= cfg.get("max_steps", math.inf):
                break
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            if not math.isfinite(loss.item()):
                break
            loss.backward()
            if isinstance(opt, HiDLR):
                opt.step(partial(_loss_on, model, loss_fn, x[probe], y[probe]))
            else:
                opt.step()
            step += 1
        with torch.no_grad():
            train_curve.append(loss_fn(model(x), y).item())
            test_curve.append(loss_fn(model(xt), yt).item())
            if held:
                val_curve.append(loss_fn(model(xv), yv).item())
        if isinstance(opt, HiDLR):
            lrs.append(opt.lrs)
        if not math.isfinite(train_curve[-1]):
            break
    out = {
        "train_loss": train_curve[-1],
        "test_loss": test_curve[-1],
        "train_curve": train_curve,
        "test_curve": test_curve,
        "val_curve": val_curve,
        "lrs": lrs,
        "steps": step,
        "seconds": time.perf_counter() - start,
    }
    out["diverged"] = not math.isfinite(test_curve[-1])
    return out


def grid_specs(
    experiment: str,
    grid: list[float] | list[list[float]],
    cfg: dict[str, Any],
    seed: int,
    method: str = "constant",
) -> list[RunSpec]:
    out = []
    for value in grid:
        key = "lrs" if isinstance(value, list) else "lr"
        tag = "_".join(f"{v:.2e}" for v in value) if isinstance(value, list) else f"{value:.2e}"
        out.append(
            RunSpec(experiment, f"{method}_grid_{tag}", seed, {**cfg, key: value, "grid": method})
        )
    return out
