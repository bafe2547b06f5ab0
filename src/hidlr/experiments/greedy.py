"""What the one-step fit proposes along a constant-rate trajectory.

Hi-DLR moves each group's rate toward the minimiser of a parabola fitted to the loss along the
base optimizer's step. Whether that greedy, one-step answer is a good constant rate is a
question about the task, not about Hi-DLR's safeguards, and this diagnostic asks it directly:
train a robustness task with its base optimizer at a constant uniform rate and, every ``every``
steps, take the base step's parameter change ``u`` without keeping it; for each group fit a
parabola to the next batch's loss at ``w + c u_k``, ``c`` in (-2, -1, 0, 1, 2), exactly, in
float64 arithmetic of the losses. Its minimiser ``c*`` is the multiple of the current rate that
the fit proposes for the group (NaN when the parabola is not convex).

Read it as: ``c*`` near 1 along the trajectory of the grid-best rate means the greedy rate and
the best constant rate agree there; ``c*`` near 1 along a trajectory at a much smaller rate too
means the greedy rate is neutral (any rate looks right from where it put the weights), so
whatever pushed the rates down early is never undone; ``c*`` far above 1 at the grid-best rate
(heavy momentum: the buffer keeps moving after the step) means the one-step optimum is far
longer than a stable constant rate.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from hidlr._probing import BufferGuard
from hidlr.experiments.tasks import Problem, Task
from hidlr.experiments.training import BASES, _batches, evaluate

__all__ = ["GreedyTrace", "format_trace", "greedy_multipliers"]

OFFSETS = (-2.0, -1.0, 0.0, 1.0, 2.0)


@dataclass
class GreedyTrace:
    """The one-step multipliers ``c*`` per probed step and group, and the run's outcome."""

    task: str
    lr: float
    seed: int
    groups: list[str]
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    multipliers: list[list[float]] = field(default_factory=list)
    val_loss: float = math.nan


def _parabola_minimiser(xs: tuple[float, ...], ys: list[float]) -> float:
    """Least-squares parabola through ``(xs, ys)``; its minimiser, or NaN if not convex."""
    x = torch.tensor(xs, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x, x * x], dim=1)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    _, b, a = torch.linalg.lstsq(design, y).solution[:, 0].tolist()
    return -b / (2 * a) if a > 0 else math.nan


def _base_optimizer(
    task: Task, groups: list[list[torch.Tensor]], lr: float
) -> torch.optim.Optimizer:
    cfg = BASES[task.base]
    params = [{"params": g} for g in groups]
    if cfg["base"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.get("momentum", 0.0))
    if cfg["base"] == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.get("weight_decay", 0.01))


@torch.no_grad()
def _probe(
    task_loss: Callable[[], float],
    groups: list[list[torch.Tensor]],
    step: list[list[torch.Tensor]],
) -> list[float]:
    """Each group's ``c*`` along its part of ``step``; buffers (BatchNorm statistics) are put
    back after every loss."""
    out = []
    with BufferGuard() as guard:
        for params, u in zip(groups, step, strict=True):
            w0 = [p.detach().clone() for p in params]
            losses = []
            for c in OFFSETS:
                torch._foreach_add_(params, u, alpha=c)
                losses.append(task_loss())
                guard.restore()
                torch._foreach_copy_(params, w0)
            out.append(_parabola_minimiser(OFFSETS, losses))
    return out


def _loss(problem: Problem, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(problem.loss_fn(problem.model(x), y).item())


def greedy_multipliers(task: Task, lr: float, *, seed: int = 0, every: int = 25) -> GreedyTrace:
    """Train ``task`` at the constant rate ``lr`` (its base optimizer, its batches) and record,
    every ``every`` steps and at the last one, each group's one-step multiplier ``c*`` fitted
    on the next batch."""
    problem = task.problem(seed)
    model, (x, y) = problem.model, problem.train
    groups = [list(g["params"]) for g in problem.groups]
    opt = _base_optimizer(task, groups, lr)
    batches = _batches(x.shape[0], task.batch_size, task.steps, seed + 1000)
    trace = GreedyTrace(task.name, lr, seed, [g["name"] for g in problem.groups])
    model.train()
    for step in range(task.steps):
        opt.zero_grad()
        loss = problem.loss_fn(model(x[batches[step]]), y[batches[step]])
        loss.backward()
        if step % every == 0 or step == task.steps - 1:
            nxt = batches[step + 1]
            next_loss = partial(_loss, problem, x[nxt], y[nxt])
            before = [[p.detach().clone() for p in g] for g in groups]
            state = copy.deepcopy(opt.state_dict())
            opt.step()
            step_dir = [
                [p.detach() - w for p, w in zip(g, b, strict=True)]
                for g, b in zip(groups, before, strict=True)
            ]
            opt.load_state_dict(state)
            with torch.no_grad():
                for g, b in zip(groups, before, strict=True):
                    torch._foreach_copy_(g, b)
            trace.steps.append(step)
            trace.losses.append(loss.item())
            trace.multipliers.append(_probe(next_loss, groups, step_dir))
        opt.step()
    trace.val_loss = evaluate(problem)
    return trace


def format_trace(trace: GreedyTrace) -> str:
    """One line per probed step: the training loss and each group's ``c*``."""
    lines = [
        f"{trace.task}: constant rate {trace.lr:g}, seed {trace.seed}, validation loss "
        f"{trace.val_loss:.4g}; c* = the one-step fit's multiple of the current rate",
        f"{'step':>5} {'loss':>9} " + " ".join(f"{n:>9}" for n in trace.groups),
    ]
    for step, loss, cs in zip(trace.steps, trace.losses, trace.multipliers, strict=True):
        lines.append(f"{step:>5} {loss:>9.4g} " + " ".join(f"{c:>9.3g}" for c in cs))
    return "\n".join(lines)
