"""Self-selecting PEFT: full fine-tuning, BitFit, LoRA and Hi-DLR with automatic freezing.

No pretrained model can be downloaded here, so the experiment pre-trains its own: a small
transformer learns to tell which of tokens 0, 1, 2 is most frequent in a sequence (source
task), then is fine-tuned on a shifted task, which of tokens 3, 4, 5 is most frequent, from
few examples. Each method starts from the same pre-trained weights (per seed).
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import torch
from torch import nn

from hidlr.experiments.models import LoRALinear, TokenTransformer
from hidlr.experiments.results import RunSpec, training_state_bytes
from hidlr.optimizer import HiDLR

__all__ = ["METHODS", "run", "run_inline", "specs", "specs_for_suite"]

METHODS = ("full", "bitfit", "lora", "hidlr_freeze", "hidlr_budget2")
VOCAB, LENGTH = 12, 16


def _task(classes: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    counts = torch.stack([(tokens == c).sum(dim=1) for c in classes], dim=1).float()
    counts += 0.1 * torch.rand(counts.shape, generator=gen)  # break ties at random
    return tokens, counts.argmax(dim=1)


def _loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _train(
    model: nn.Module,
    opt: Any,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch: int,
    seed: int,
) -> float:
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.functional.cross_entropy
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        probe = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        if isinstance(opt, HiDLR):
            opt.step(partial(_loss_on, model, x[probe], y[probe]))
        else:
            opt.step()
    return (time.perf_counter() - start) / steps


def pretrained(seed: int, steps: int) -> TokenTransformer:
    torch.manual_seed(seed)
    model = TokenTransformer(VOCAB, 3, d_model=32, heads=2, layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _train(model, opt, _task((0, 1, 2), 4000, 1000 + seed), steps, 64, seed)
    return model


def _groups_by_block(model: TokenTransformer) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = [
        {"name": "embedding", "params": [model.embed.weight, model.pos]}
    ]
    for i, layer in enumerate(model.encoder.layers):
        groups.append(
            {"name": f"block{i}", "params": [p for p in layer.parameters() if p.requires_grad]}
        )
    groups.append({"name": "norm", "params": list(model.norm.parameters())})
    groups.append({"name": "head", "params": list(model.head.parameters())})
    return groups


def _prepare(method: str, model: TokenTransformer, lr: float) -> tuple[Any, list[str]]:
    """Freeze what the method does not train; return its optimizer and group names."""
    if method == "full":
        return torch.optim.AdamW(model.parameters(), lr=lr), ["all"]
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "bitfit":
        params: list[torch.Tensor] = [q for n, q in model.named_parameters() if n.endswith("bias")]
        params += [model.head.weight]
        for q in params:
            q.requires_grad_(True)
        return torch.optim.AdamW(params, lr=lr), ["biases+head"]
    if method == "lora":
        for layer in model.encoder.layers:
            layer.linear1 = LoRALinear(layer.linear1, rank=4)
            layer.linear2 = LoRALinear(layer.linear2, rank=4)
        for p in model.head.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr), ["lora+head"]
    for p in model.parameters():
        p.requires_grad_(True)
    groups = _groups_by_block(model)
    base = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=lr)
    if method == "hidlr_budget2":  # keep the two most influential groups
        opt = HiDLR(base, update_every=4, freeze_budget=2, freeze_warmup=10)
    else:  # freeze what contributes less than 5% of the predicted decrease
        opt = HiDLR(base, update_every=4, freeze_threshold=0.05, freeze_warmup=10)
    return opt, [g["name"] for g in groups]


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    model.eval()
    logits = model(data[0])
    model.train()
    loss = nn.functional.cross_entropy(logits, data[1]).item()
    return loss, (logits.argmax(dim=1) == data[1]).float().mean().item()


def specs_for_suite(quick: bool, seeds: int) -> list[RunSpec]:
    return specs(quick, seeds)


def specs(quick: bool, seeds: int = 3) -> list[RunSpec]:
    config = {
        "pretrain_steps": 150 if quick else 600,
        "steps": 100 if quick else 400,
        "n_train": 400,
    }
    lrs = {"full": 1e-3, "bitfit": 3e-3, "lora": 3e-3, "hidlr_freeze": 1e-3, "hidlr_budget2": 1e-3}
    return [
        RunSpec("peft_autofreeze", m, s, {**config, "lr": lrs[m]})
        for m in METHODS
        for s in range(seeds)
    ]


def run(spec: RunSpec) -> dict[str, Any]:
    """One fine-tuning run in a fresh process, so that its peak resident memory is its own."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_run_measured, spec).result()


def _run_measured(spec: RunSpec) -> dict[str, Any]:
    out = run_inline(spec)
    # peak resident set of this process (interpreter and torch included: compare differences)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_inline(spec: RunSpec) -> dict[str, Any]:
    cfg = spec.config
    torch.set_num_threads(1)
    base = pretrained(spec.seed, cfg["pretrain_steps"])
    source_val = _evaluate(base, _task((0, 1, 2), 1000, 2000 + spec.seed))
    model = copy.deepcopy(base)
    opt, names = _prepare(spec.method, model, cfg["lr"])
    total = sum(p.numel() for p in model.parameters())
    trainable_start = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = _task((3, 4, 5), cfg["n_train"], 3000 + spec.seed)
    val = _task((3, 4, 5), 2000, 4000 + spec.seed)
    zero_shot = _evaluate(model, val)
    step_seconds = _train(model, opt, train, cfg["steps"], 32, spec.seed)
    loss, acc = _evaluate(model, val)
    out: dict[str, Any] = {
        "val_loss": loss,
        "val_accuracy": acc,
        "zero_shot_accuracy": zero_shot[1],
        "source_accuracy": source_val[1],
        "params_total": total,
        "trainable_start": trainable_start,
        "trainable_end": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_seconds": step_seconds,
        "training_state_bytes": training_state_bytes(
            model, opt.optimizer if isinstance(opt, HiDLR) else opt
        ),
        "groups": names,
    }
    if isinstance(opt, HiDLR):
        out["frozen"] = opt.frozen
        out["influence_share"] = opt.influence_share
        out["final_lrs"] = opt.lrs
        out["freeze_steps"] = _freeze_steps(opt)
        out["influence_history"] = [[g.share for g in r.groups] for r in opt.history]
    out["diverged"] = not math.isfinite(loss)
    return out


def _freeze_steps(opt: HiDLR) -> list[int | None]:
    steps: list[int | None] = [None] * len(opt.param_groups)
    for record in opt.history:
        for g in record.groups:
            if g.reason == "frozen" and steps[g.group] is None:
                steps[g.group] = record.step
    return steps
