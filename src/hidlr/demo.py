"""Figure 2 of the paper: grid-searched constant rate, Hi-ULR (GeN) and Hi-DLR on 2-D functions.

Both coordinates start from the paper's points and are trained with SGD for 100 iterations.
The constant rate is the best of the paper's grid ``1e-5 * 10^(k/2), k = 0..11`` by final loss
(12 runs); Hi-ULR uses one group, Hi-DLR one group per coordinate, each a single run from
``initial_lr`` (default 1e-3), probing every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hidlr.functions import FUNCTIONS
from hidlr.optimizer import HiDLR

__all__ = ["PAPER_GRID", "Trace", "run_2d", "run_figure2", "save_figure2"]

PAPER_GRID = tuple(1e-5 * 10 ** (k / 2) for k in range(12))


@dataclass
class Trace:
    """One optimisation run: its losses, path and (for Hi-*) rates per iteration."""

    method: str
    losses: list[float] = field(default_factory=list)
    path: list[tuple[float, float]] = field(default_factory=list)
    lrs: list[list[float]] = field(default_factory=list)
    lr: float | None = None

    @property
    def final(self) -> float:
        return self.losses[-1]


def run_2d(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: tuple[float, float],
    iterations: int,
    method: str,
    lr: float,
    **hidlr_options: Any,
) -> Trace:
    """Minimise ``fn(x, y)`` from ``start`` with SGD: ``method`` is ``"constant"`` (rate ``lr``),
    ``"Hi-ULR"`` (one group) or ``"Hi-DLR"`` (one group per coordinate), starting at ``lr``."""
    x = torch.nn.Parameter(torch.tensor(start[0], dtype=torch.float64))
    y = torch.nn.Parameter(torch.tensor(start[1], dtype=torch.float64))
    groups = [{"params": [x]}, {"params": [y]}] if method == "Hi-DLR" else [{"params": [x, y]}]
    base = torch.optim.SGD(groups, lr=lr)
    opt: torch.optim.Optimizer = base if method == "constant" else HiDLR(base, **hidlr_options)  # type: ignore[arg-type]
    trace = Trace(method, lr=lr if method == "constant" else None)

    def loss() -> torch.Tensor:
        return fn(x, y)

    for _ in range(iterations):
        trace.path.append((x.item(), y.item()))
        opt.zero_grad()
        value = loss()
        trace.losses.append(value.item())
        if not math.isfinite(value.item()):
            break
        value.backward()
        if isinstance(opt, HiDLR):
            opt.step(loss)
            trace.lrs.append(opt.lrs)
        else:
            opt.step()
    trace.path.append((x.item(), y.item()))
    trace.losses.append(loss().item())
    return trace


def run_figure2(
    iterations: int = 100, initial_lr: float = 1e-3, update_every: int = 1, smoothing: float = 0.9
) -> dict[str, list[Trace]]:
    """Run the three methods on both functions; the constant rate is the grid's best."""
    out: dict[str, list[Trace]] = {}
    options = {"update_every": update_every, "smoothing": smoothing}
    for name, (fn, start, _) in FUNCTIONS.items():
        grid = [run_2d(fn, start, iterations, "constant", lr) for lr in PAPER_GRID]
        best = min(grid, key=lambda t: t.final if math.isfinite(t.final) else math.inf)
        out[name] = [
            best,
            run_2d(fn, start, iterations, "Hi-ULR", initial_lr, **options),
            run_2d(fn, start, iterations, "Hi-DLR", initial_lr, **options),
        ]
    return out


def save_figure2(results: dict[str, list[Trace]], path: str | Path) -> Path:
    """Loss curves and paths for each function (needs ``pip install 'hidlr[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("saving the figure needs matplotlib: pip install 'hidlr[plot]'") from err
    fig, axes = plt.subplots(1, 2 * len(results), figsize=(5 * 2 * len(results), 4))
    for i, (name, traces) in enumerate(results.items()):
        fn, _, minimum = FUNCTIONS[name]
        loss_ax, path_ax = axes[2 * i], axes[2 * i + 1]
        xs = [p[0] for t in traces for p in t.path] + [minimum[0]]
        ys = [p[1] for t in traces for p in t.path] + [minimum[1]]
        pad_x, pad_y = 0.1 * (max(xs) - min(xs)) + 0.5, 0.1 * (max(ys) - min(ys)) + 0.5
        gx = torch.linspace(min(xs) - pad_x, max(xs) + pad_x, 200, dtype=torch.float64)
        gy = torch.linspace(min(ys) - pad_y, max(ys) + pad_y, 200, dtype=torch.float64)
        mx, my = torch.meshgrid(gx, gy, indexing="xy")
        path_ax.contour(
            mx.numpy(), my.numpy(), torch.log1p(fn(mx, my)).numpy(), levels=20, alpha=0.5
        )
        for t in traces:
            label = f"{t.method} (lr={t.lr:.1e})" if t.lr else t.method
            loss_ax.semilogy([max(v, 1e-30) for v in t.losses], label=label)
            path_ax.plot([p[0] for p in t.path], [p[1] for p in t.path], ".-", ms=3, label=label)
        path_ax.plot(*minimum, "k*", ms=12)
        loss_ax.set_title(f"{name}: loss")
        loss_ax.set_xlabel("iteration")
        path_ax.set_title(f"{name}: path")
        loss_ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
