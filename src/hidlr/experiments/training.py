"""One training run of one method on one task: the loop every experiment shares."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from hidlr.baselines import Built, build
from hidlr.experiments.tasks import Problem, Task
from hidlr.optimizer import HiDLR

__all__ = ["BASES", "RunResult", "evaluate", "train_run"]

# a task's base optimizer -> the registry's configuration for it
BASES: dict[str, dict[str, Any]] = {
    "sgd": {"base": "sgd"},
    "momentum": {"base": "sgd", "momentum": 0.9},
    "adam": {"base": "adam"},
    "adamw": {"base": "adamw", "weight_decay": 0.01},
}


@dataclass
class RunResult:
    """What one run measured: final validation loss, divergence, time, curves and rates."""

    task: str
    method: str
    seed: int
    lr: float
    val_loss: float
    initial_val_loss: float
    diverged: bool
    seconds: float
    probe_batch: str = "next"
    train_curve: list[float] = field(default_factory=list)
    lrs: list[list[float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(problem: Problem) -> float:
    """Validation loss in eval mode."""
    was = problem.model.training
    problem.model.eval()
    loss = problem.loss_fn(problem.model(problem.val[0]), problem.val[1]).item()
    problem.model.train(was)
    return loss


def _probe_loss(problem: Problem, idx: torch.Tensor) -> torch.Tensor:
    x, y = problem.train
    return problem.loss_fn(problem.model(x[idx]), y[idx])


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps + 1:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[: steps + 1]


def build_method(
    task: Task,
    problem: Problem,
    method: str,
    lr: float,
    steps: int,
    hidlr_options: dict[str, Any] | None,
    schedule: str = "constant",
) -> Built:
    """The registry's method ``method`` for this task's groups and base optimizer; ``schedule``
    (a decay over the run, multiplying the adapted rates) applies to Hi-DLR and GeN only."""
    groups = [{"params": g["params"], "name": g["name"]} for g in problem.groups]
    # the model too: DoG's weight average covers its BatchNorm statistics, as its package does
    config: dict[str, Any] = dict(BASES[task.base], lr=lr, total_steps=steps, model=problem.model)
    if method in ("gen", "hidlr"):
        config["hidlr_options"] = dict(hidlr_options or {})
        config["schedule"] = schedule
    if method == "prodigy" and config["base"] == "sgd":  # Prodigy is Adam-based only
        config = {"base": "adam", "lr": lr, "total_steps": steps, "model": problem.model}
    return build(method, groups, **config)


RECORD_EVERY = 10  # steps between two records of the training loss and the rates


def train_run(
    task: Task,
    seed: int,
    method: str,
    lr: float,
    *,
    hidlr_options: dict[str, Any] | None = None,
    probe_batch: str = "next",
    steps: int | None = None,
    record_every: int = RECORD_EVERY,
    schedule: str = "constant",
) -> RunResult:
    """Train ``task`` with registry method ``method`` from rate ``lr`` and evaluate it.

    ``probe_batch``: which batch Hi-DLR's closure evaluates, ``"next"`` (the following
    training batch, which is then also the next step's batch), ``"previous"`` (the last
    step's batch; the gradient's own on the first step), ``"same"`` (the gradient's own),
    ``"both"`` (the gradient's and the next), ``"deferred"`` (``defer_probes=True`` with the
    gradient's own batch: a probe step is probed at the next step, on that step's batch) or
    ``"heldout"`` (a batch drawn at random from the last tenth of the training set, which the
    methods built on Hi-DLR then never train on, while the other methods train on all of it: the
    comparison includes what probing on held-out data costs in training data; where a batch is
    larger than that tenth, the probes see all of it). A run diverged if a training loss is not finite or the final validation loss is
    above the initial one.
    """
    if probe_batch == "deferred":
        hidlr_options = {**(hidlr_options or {}), "defer_probes": True}
    problem = task.problem(seed)
    model, (x, y) = problem.model, problem.train
    steps = task.steps if steps is None else steps
    built = build_method(task, problem, method, lr, steps, hidlr_options, schedule)
    # held-out probes cost the methods that probe (Hi-DLR in any form) a tenth of the data; the
    # others train on all of it
    probing = isinstance(built.optimizer, HiDLR)
    held = x.shape[0] // 10 if probe_batch == "heldout" and probing else 0
    batches = _batches(x.shape[0] - held, task.batch_size, steps, seed + 1000)
    held_gen = torch.Generator().manual_seed(seed + 2000)
    initial = evaluate(problem)
    result = RunResult(task.name, method, seed, lr, math.nan, initial, False, 0.0, probe_batch)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = batches[step]
        if probe_batch == "heldout":
            draw = torch.randperm(held, generator=held_gen)[: task.batch_size]
            probe_idx = x.shape[0] - held + draw
        else:
            probe_idx = {
                "next": batches[step + 1],
                "same": idx,
                "both": torch.cat([idx, batches[step + 1]]),
                "previous": batches[step - 1] if step > 0 else idx,
                "deferred": idx,
            }[probe_batch]
        built.optimizer.zero_grad()
        loss = problem.loss_fn(model(x[idx]), y[idx])
        if not math.isfinite(loss.item()):
            result.diverged = True
            break
        loss.backward()
        built.step(partial(_probe_loss, problem, probe_idx))
        if step % record_every == 0:
            result.train_curve.append(loss.item())
            if isinstance(built.optimizer, HiDLR):
                result.lrs.append(built.optimizer.lrs)
    result.seconds = time.perf_counter() - start
    with built.evaluating():
        result.val_loss = evaluate(problem) if not result.diverged else math.inf
    if not math.isfinite(result.val_loss) or result.val_loss > initial:
        result.diverged = True
    return result
