"""The paper's experiments on data generated here: Figure 2 (2-D test functions), Figures 1/6
(LoRA synthetic regression), Figures 5/12/13 (NAM on synthetic additive data) and Figure 8
(mixture of experts on a noisy 2-D task). Each is a ``*_specs`` / ``*_run`` pair that
:mod:`hidlr.experiments.paper` registers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hidlr.demo import PAPER_GRID, run_2d
from hidlr.experiments.loop import HI, fit_spec, grid_specs
from hidlr.experiments.models import NAM, LoRALinear, MixtureOfExperts
from hidlr.experiments.results import RunSpec
from hidlr.functions import FUNCTIONS
from hidlr.groups import by_subnetwork

__all__ = [
    "figure2_run",
    "figure2_specs",
    "lora_run",
    "lora_specs",
    "moe_run",
    "moe_specs",
    "nam_run",
    "nam_specs",
    "nam_truth",
]

# -- Figure 2 ----------------------------------------------------------------------------------


def figure2_specs(quick: bool, seeds: int) -> list[RunSpec]:
    specs = []
    for fn in FUNCTIONS:
        specs += [
            RunSpec(
                "figure2",
                f"{fn}__constant_grid_{lr:.2e}",
                0,
                {"fn": fn, "lr": lr, "grid": "constant"},
            )
            for lr in PAPER_GRID
        ]
        specs += [
            RunSpec("figure2", f"{fn}__{m}", 0, {"fn": fn, "lr": 1e-3})
            for m in ("Hi-ULR", "Hi-DLR")
        ]
    return specs


def figure2_run(spec: RunSpec) -> dict[str, Any]:
    fn, start, _ = FUNCTIONS[spec.config["fn"]]
    method = spec.method.split("__")[1]
    method = "constant" if method.startswith("constant") else method
    trace = run_2d(
        fn, start, 100, method, spec.config["lr"], update_every=1, smoothing=0.9, policy="paper"
    )
    return {
        "final_loss": trace.final,
        "losses": trace.losses,
        "path": trace.path,
        "lrs": trace.lrs,
        "diverged": not math.isfinite(trace.final),
    }


# -- LoRA synthetic (Figures 1 and 6) ----------------------------------------------------------


def _lora_data(
    seed: int, n: int = 1000, d: int = 20, r: int = 2
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d, d, generator=gen) / math.sqrt(d)
    delta = torch.randn(d, r, generator=gen) @ torch.randn(r, d, generator=gen) / math.sqrt(d)
    x = torch.randn(2 * n, d, generator=gen)
    y = x @ (w0 + delta).T + 0.1 * torch.randn(2 * n, d, generator=gen)
    return {"x": x[:n], "y": y[:n], "x_test": x[n:], "y_test": y[n:]}, w0


def _past_the_edge(low: float, high: float, n: int, top: float) -> list[float]:
    """``n`` rates evenly in log scale from ``low`` to ``high``, then on at the same spacing up
    to ``top``."""
    step = (math.log10(high) - math.log10(low)) / (n - 1)
    count = n + math.floor((math.log10(top) - math.log10(high)) / step + 1e-9)
    return [float(10 ** (math.log10(low) + k * step)) for k in range(count)]


def lora_specs(quick: bool, seeds: int) -> list[RunSpec]:
    """The paper's ULR grid (20 points from 1e-4 to 1e-1); its 20 x 20 DLR grid is 10 x 10 here
    (CPU time). Both go on past the paper's edge at the same spacing, the ULR grid up to 10 and
    the DLR grid up to 100: their best point was the paper's largest rate, and constant rates
    up to about 4 converge faster still (5 diverges; B alone takes 10). Points are picked on a
    validation fifth of the training data."""
    cfg = {
        "base": "sgd",
        "epochs": 200 if quick else 1000,
        "batch_size": 800,
        "lr": 1e-3,
        "update_every": 4,
        "val_fraction": 0.2,
    }
    ulr = _past_the_edge(1e-4, 1e-1, 5 if quick else 20, 10.0)
    side = _past_the_edge(1e-4, 1e-1, 4 if quick else 10, 100.0)
    c = {**cfg, "data_seed": 10}
    specs = grid_specs("lora_synthetic", ulr, c, 0)
    specs += grid_specs("lora_synthetic", [[a, b] for a in side for b in side], c, 0, "dlr")
    specs += [RunSpec("lora_synthetic", m, 0, c) for m in HI]
    specs.append(RunSpec("lora_synthetic", "loraplus", 0, {**c, "lr": 1e-2, "ratio": 16.0}))
    return specs


def lora_run(spec: RunSpec) -> dict[str, Any]:
    cfg = spec.config
    data, w0 = _lora_data(cfg["data_seed"])
    torch.manual_seed(spec.seed)
    base = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    model = LoRALinear(base, rank=2)
    groups = [{"params": [model.lora_A]}, {"params": [model.lora_B]}]
    return fit_spec(spec, model, groups, data, nn.functional.mse_loss)


# -- NAM on synthetic additive data (Figures 5, 12, 13) ----------------------------------------


def nam_truth(x: torch.Tensor) -> torch.Tensor:
    """Six non-zero shape functions after appendix B.3 (features 7-10 have none), scaled to
    amplitudes of about 1-2 on [-1, 1] with unit noise: the paper's (``2 x^2 tanh x``,
    ``sin x cos x + x^2``, ``20 / (1 + exp(-5 sin x))``, ``20 sin^3 2x - 6 cos x + x^2``,
    ``x^3``, ``x``) reach 20, where the paper's SGD rates diverge."""
    f = torch.zeros_like(x)
    f[:, 0] = (2 / 3) * torch.tanh(2 * x[:, 0])
    f[:, 1] = torch.sin(math.pi * x[:, 1]) * torch.cos(math.pi * x[:, 1]) + 2 * x[:, 1] ** 2
    f[:, 2] = 2 / (1 + torch.exp(-5 * torch.sin(math.pi * x[:, 2])))
    f[:, 3] = 2 * torch.sin(3 * x[:, 3]) ** 2 - torch.cos(math.pi * x[:, 3])
    f[:, 4] = x[:, 4] ** 3
    f[:, 5] = x[:, 5]
    return f


def nam_specs(quick: bool, seeds: int) -> list[RunSpec]:
    cfg = {
        "base": "sgd",
        "epochs": 20 if quick else 100,
        "batch_size": 256,
        "lr": 1e-3,
        "update_every": 2,
        "val_fraction": 0.2,
    }
    grid = [5e-4, 7e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2]
    specs = []
    for s in range(1 if quick else seeds):
        specs += grid_specs("nam_synthetic", grid, cfg, s)
        specs += [RunSpec("nam_synthetic", m, s, cfg) for m in HI]
    return specs


def nam_run(spec: RunSpec) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(105)
    x = torch.rand(3000, 10, generator=gen) * 2 - 1
    truth = nam_truth(x)
    y = truth.sum(dim=1, keepdim=True) + torch.randn(3000, 1, generator=gen)
    data = {"x": x[:2400], "y": y[:2400], "x_test": x[2400:], "y_test": y[2400:]}
    torch.manual_seed(spec.seed)
    model = NAM(10, hidden=32)
    groups = by_subnetwork(model, "features", rest="bias")  # one group per feature's network
    out = fit_spec(spec, model, groups, data, nn.functional.mse_loss)
    grid_x = torch.linspace(-1, 1, 101)[:, None].repeat(1, 10)
    with torch.no_grad():
        learned = model.shape_functions(grid_x)
    learned = learned - learned.mean(dim=0)
    target = nam_truth(grid_x)
    target = target - target.mean(dim=0)
    out["shape_grid"] = grid_x[:, 0].tolist()
    out["shape_learned"] = learned.T.tolist()
    out["shape_truth"] = target.T.tolist()
    return out


# -- mixture of experts (Figure 8) -------------------------------------------------------------


def moe_specs(quick: bool, seeds: int) -> list[RunSpec]:
    cfg = {
        "base": "adam",
        "epochs": 30 if quick else 100,
        "batch_size": 128,
        "lr": 1e-3,
        "update_every": 4,
    }
    specs = []
    for s in range(1 if quick else seeds):
        specs.append(RunSpec("moe", "ulr", s, {**cfg, "grid": "constant", "paper_rate": True}))
        specs.append(
            RunSpec(
                "moe", "dlr", s, {**cfg, "lrs": [1e-3, 5e-3], "grid": "dlr", "paper_rate": True}
            )
        )
        specs += [RunSpec("moe", m, s, cfg) for m in HI]
    return specs


def moe_run(spec: RunSpec) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(106)
    x = torch.rand(1200, 2, generator=gen) * 6 - 3
    y = (torch.sin(x[:, 0]) + torch.cos(x[:, 1]) > 0).long()
    y = torch.where(torch.rand(1200, generator=gen) < 0.1, 1 - y, y)
    data = {"x": x[:1000], "y": y[:1000], "x_test": x[1000:], "y_test": y[1000:]}
    torch.manual_seed(spec.seed)
    model = MixtureOfExperts(2, 2, n_experts=6, hidden=64)
    groups = [
        {"params": list(model.gate.parameters())},
        {"params": list(model.experts.parameters())},
    ]
    out = fit_spec(spec, model, groups, data, nn.functional.cross_entropy)
    with torch.no_grad():
        out["test_accuracy"] = (
            (model(data["x_test"]).argmax(dim=1) == data["y_test"]).float().mean().item()
        )
    return out
