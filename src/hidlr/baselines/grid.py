"""Grid search over rates, driven by Optuna's GridSampler, and the paper's grids as data.

``objective(params) -> final loss`` trains one run at the grid point ``params`` (a dict
``{name: value}``); the search evaluates every point once and reports the best one together
with its cost: the number of runs and the wall-clock seconds the search took.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hidlr._validation import check_float, check_int
from hidlr.baselines.core import require

__all__ = [
    "CALIFORNIA_ULR_GRID",
    "LORA_A_GRID",
    "LORA_B_GRID",
    "NAM_ULR_GRID",
    "PAPER_GRIDS",
    "ULR_GRID_2D",
    "GridSearchResult",
    "grid_search",
    "log_grid",
    "mantissa_grid",
    "per_group_grid",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSearchResult:
    """The best grid point, every run in the order it ran, and what the search cost.

    ``best_value`` is ``inf`` when every run ended non-finite (diverged); ties go to the point
    listed first in the grid.
    """

    best_params: dict[str, float]
    best_value: float
    trials: list[tuple[dict[str, float], float]]
    n_runs: int
    seconds: float

    def cost_steps(self, steps_per_run: int) -> int:
        """Training steps the whole search spent, for runs of ``steps_per_run`` steps."""
        return self.n_runs * check_int("steps_per_run", steps_per_run, minimum=0)


def _check_grid(grid: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    if not grid:
        raise ValueError(f"grid must map at least one name to values, got {grid!r}")
    out = {}
    for name, values in grid.items():
        vals = [check_float(f"grid[{name!r}]", v) for v in values]
        if not vals or len(set(vals)) != len(vals):
            raise ValueError(f"grid[{name!r}] must be distinct finite floats, got {values!r}")
        if str(name) in out:
            raise ValueError(
                f"grid names must be distinct as strings, got {name!r} twice (with {list(grid)})"
            )
        out[str(name)] = vals
    return out


def grid_search(
    objective: Callable[[dict[str, float]], float],
    grid: Mapping[str, Sequence[float]],
    *,
    seed: int = 0,
) -> GridSearchResult:
    """Evaluate ``objective`` once at every point of the product grid (minimisation)."""
    optuna = require("optuna", package="optuna", needed_by="grid search")
    space = _check_grid(grid)
    n_points = math.prod(len(v) for v in space.values())
    trials: list[tuple[dict[str, float], float]] = []

    def run(trial: Any) -> float:
        params = {k: float(trial.suggest_categorical(k, v)) for k, v in space.items()}
        value = float(objective(dict(params)))
        trials.append((params, value))
        return value if math.isfinite(value) else math.inf  # NaN would mark the trial failed

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.GridSampler(space, seed=seed)
        )
        start = time.perf_counter()
        study.optimize(run, n_trials=n_points)
        seconds = time.perf_counter() - start
    finally:
        optuna.logging.set_verbosity(verbosity)

    order = {p: i for i, p in enumerate(itertools.product(*space.values()))}

    def rank(item: tuple[dict[str, float], float]) -> tuple[float, int]:
        params, value = item
        return (value if math.isfinite(value) else math.inf, order[tuple(params.values())])

    best_params, best_value = min(trials, key=rank)
    best_value = best_value if math.isfinite(best_value) else math.inf
    logger.info(
        "grid search: %d runs in %.2f s, best %s -> %g",
        len(trials),
        seconds,
        best_params,
        best_value,
    )
    return GridSearchResult(dict(best_params), best_value, trials, len(trials), seconds)


def log_grid(low_exp: float, high_exp: float, n: int) -> tuple[float, ...]:
    """``n`` points ``10**k`` with ``k`` evenly spaced from ``low_exp`` to ``high_exp``."""
    check_int("n", n, minimum=2)
    return tuple(10.0 ** (low_exp + (high_exp - low_exp) * i / (n - 1)) for i in range(n))


def mantissa_grid(
    start: float, n: int = 7, mantissas: Sequence[int] = (1, 3, 5, 7)
) -> tuple[float, ...]:
    """``n`` rates climbing through ``mantissas`` per decade from ``start``.

    ``mantissa_grid(5e-4)`` is the paper's 7-point grid 5e-4, 7e-4, 1e-3, 3e-3, 5e-3, 7e-3, 1e-2.
    """
    check_float("start", start, low=0.0, low_open=True)
    check_int("n", n, minimum=1)
    exp = math.floor(math.log10(start))
    m = round(start / 10.0**exp)
    if m not in mantissas or not math.isclose(m * 10.0**exp, start, rel_tol=1e-9):
        raise ValueError(
            f"start must be one of {tuple(mantissas)} times a power of 10, got {start!r}"
        )
    i, out = list(mantissas).index(m), list[float]()
    while len(out) < n:
        out.append(float(f"{mantissas[i]}e{exp}"))
        i += 1
        if i == len(mantissas):
            i, exp = 0, exp + 1
    return tuple(out)


def per_group_grid(names: Sequence[str], values: Sequence[float]) -> dict[str, tuple[float, ...]]:
    """The same rate grid for every group, keyed ``lr_<name>`` (len(values)**len(names) runs)."""
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names!r}")
    return {f"lr_{n}": tuple(values) for n in names}


#: 2-D test functions: 1e-5 * 10**(k/2), k = 0..11.
ULR_GRID_2D = tuple(10.0 ** (k / 2 - 5) for k in range(12))
#: NAM on synthetic data.
NAM_ULR_GRID = mantissa_grid(5e-4)
#: NAM on California housing.
CALIFORNIA_ULR_GRID = mantissa_grid(5e-6)
#: Synthetic LoRA: eta_A = 10**k, k evenly from -4 to -3; eta_B from 1e-4 to 1e-1 (20 each).
LORA_A_GRID = log_grid(-4, -3, 20)
LORA_B_GRID = log_grid(-4, -1, 20)

PAPER_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "2d": {"lr": ULR_GRID_2D},
    "nam_synthetic": {"lr": NAM_ULR_GRID},
    "california_housing": {"lr": CALIFORNIA_ULR_GRID},
    "lora_synthetic": {"lr_A": LORA_A_GRID, "lr_B": LORA_B_GRID},
}
