"""The robustness benchmark: Hi-DLR on tasks nobody tuned it for, against the alternatives.

For every task and seed: a 7-point grid over a constant uniform rate (best by validation
loss), Prodigy, D-Adaptation, DoG, GeN and Hi-DLR with default options; plus a sweep of
Hi-DLR's initial rate over 1e-5 .. 1e-1 (every seed at every initial rate, so that the sweep's
spread compares means over the same seeds as every other number and is not one seed's noise). One JSON line per run in ``runs.jsonl`` (finished
runs are skipped when the benchmark is run again), and a summary built from that file only.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import math
import multiprocessing as mp
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hidlr.experiments.results import SettingsMismatch
from hidlr.experiments.tasks import SPLITS, TASKS
from hidlr.experiments.training import RECORD_EVERY, train_run
from hidlr.optimizer import HiDLR

__all__ = ["INIT_SWEEP", "Job", "SettingsMismatch", "run_benchmark", "summarize"]

logger = logging.getLogger(__name__)

INIT_SWEEP = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
GRID_EXTENSIONS = 3  # points (a decade) a grid may grow past an edge where its best lies


def _settings(
    hidlr_options: dict[str, Any] | None, probe_batch: str, schedule: str, steps_scale: float
) -> dict[str, Any]:
    """The settings that change a run, as they read back from JSON: Hi-DLR options equal to
    the defaults are left out, so ``{"policy": "robust"}`` and no options are the same."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(HiDLR.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    options = {
        k: v
        for k, v in json.loads(json.dumps(dict(hidlr_options or {}))).items()
        if k not in defaults or json.loads(json.dumps(defaults[k])) != v
    }
    return {
        "hidlr_options": options,
        "probe_batch": probe_batch,
        "schedule": schedule,
        "steps_scale": float(steps_scale),
    }


FREE_METHODS = ("prodigy", "dadaptation", "dog")
REUSABLE = ("constant", *FREE_METHODS)  # the runs that do not depend on Hi-DLR's settings


@dataclass(frozen=True)
class Job:
    task: str
    method: str  # constant | prodigy | dadaptation | dog | gen | hidlr
    seed: int
    lr: float
    role: str  # grid | free | default | sweep

    @property
    def key(self) -> str:
        return f"{self.task}|{self.method}|{self.seed}|{self.lr:.6g}|{self.role}"


def jobs_for(tasks: Sequence[str], seeds: Sequence[int], sweep: bool = True) -> list[Job]:
    """Every run of the benchmark. Hi-DLR and GeN start from the middle of the task's grid."""
    jobs = []
    for name in tasks:
        task = TASKS[name]
        for seed in seeds:
            jobs += [Job(name, "constant", seed, lr, "grid") for lr in task.grid]
            jobs += [Job(name, m, seed, 1.0, "free") for m in FREE_METHODS]
            jobs += [Job(name, m, seed, task.grid[3], "default") for m in ("gen", "hidlr")]
            if sweep:
                jobs += [Job(name, "hidlr", seed, lr, "sweep") for lr in INIT_SWEEP]
    return jobs


def _run(
    job: Job, hidlr_options: dict[str, Any], probe_batch: str, steps_scale: float, schedule: str
) -> dict[str, Any]:
    torch.set_num_threads(1)
    task = TASKS[job.task]
    steps = max(1, round(task.steps * steps_scale))
    with contextlib.redirect_stdout(io.StringIO()):  # dadaptation prints on construction
        result = train_run(
            task,
            job.seed,
            job.method,
            job.lr,
            hidlr_options=hidlr_options,
            probe_batch=probe_batch,
            steps=steps,
            schedule=schedule,
        )
    return {"key": job.key, "role": job.role, **result.as_dict()}


def _run_star(args: tuple[Job, dict[str, Any], str, float, str]) -> dict[str, Any]:
    return _run(*args)


def run_benchmark(
    out: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    sweep: bool = True,
    hidlr_options: dict[str, Any] | None = None,
    probe_batch: str = "next",
    schedule: str = "constant",
    steps_scale: float = 1.0,
    workers: int = 2,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    reuse: str | Path | None = None,
) -> Path:
    """Run what is missing from ``out/runs.jsonl``; returns that file's path.

    The settings that change a run (Hi-DLR's options, the probe batch, the schedule, the step
    scale) are kept in ``out/config.json``; resuming a folder with other settings is refused
    rather than mixing runs of two configurations in one summary. ``reuse``: another results
    folder whose runs that do not depend on Hi-DLR's settings (the constant-rate grid,
    Prodigy, D-Adaptation, DoG: :data:`REUSABLE`) are copied in first, for the same tasks
    and seeds, so that a study or a screen of a change to Hi-DLR runs only Hi-DLR and GeN. Its
    step scale must be this one's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    config = _settings(hidlr_options, probe_batch, schedule, steps_scale)
    config_path = out / "config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved != config:
            changed = sorted(
                k for k in config.keys() | saved.keys() if saved.get(k) != config.get(k)
            )
            raise SettingsMismatch(
                f"{out} holds runs made with other settings ({', '.join(changed)}: "
                f"{ {k: saved.get(k) for k in changed} } there, { {k: config.get(k) for k in changed} } "
                "now); choose another output folder or the same settings"
            )
    elif path.exists():
        raise SettingsMismatch(
            f"{path} has runs but {config_path} does not say with which settings; choose another "
            f"output folder, or write {config_path} with the settings those runs were made with"
        )
    else:
        config_path.write_text(json.dumps(config, indent=1) + "\n")
    settings = (dict(hidlr_options or {}), probe_batch, steps_scale, schedule)
    names = list(TASKS if tasks is None else tasks)
    if reuse is not None:
        _copy_reusable(Path(reuse), path, names, seeds, steps_scale)
    _execute(path, jobs_for(names, seeds, sweep), settings, workers, progress)
    for _ in range(GRID_EXTENSIONS):
        extra = edge_jobs(path, names, seeds)
        if not extra:
            break
        _execute(path, extra, settings, workers, progress)
    return path


def _copy_reusable(
    source: Path, path: Path, names: Sequence[str], seeds: Sequence[int], steps_scale: float
) -> None:
    """Append to ``path`` the :data:`REUSABLE` runs of ``source`` (a results folder) for
    ``names`` and ``seeds`` that ``path`` does not hold yet."""
    missing = [f for f in ("config.json", "runs.jsonl") if not (source / f).is_file()]
    if missing:
        raise SettingsMismatch(
            f"reuse={str(source)!r} is not a results folder of this benchmark (it has no "
            f"{' or '.join(missing)})"
        )
    saved = json.loads((source / "config.json").read_text())
    if saved.get("steps_scale") != steps_scale:
        raise SettingsMismatch(
            f"{source} holds runs made with steps_scale {saved.get('steps_scale')}, not "
            f"{steps_scale}: its runs cannot be reused here"
        )
    done = _done(path)
    wanted, wanted_seeds = set(names), set(seeds)
    with path.open("a") as fh:
        for line in (source / "runs.jsonl").read_text().splitlines():
            record = json.loads(line)
            if (
                record["method"] in REUSABLE
                and record["task"] in wanted
                and record["seed"] in wanted_seeds
                and record["key"] not in done
            ):
                fh.write(line + "\n")


def _done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines()}


def _execute(
    path: Path,
    jobs: Sequence[Job],
    settings: tuple[dict[str, Any], str, float, str],
    workers: int,
    progress: Callable[[int, int, dict[str, Any]], None] | None,
) -> None:
    """Run the jobs not yet in ``path``, appending one line per finished run."""
    done = _done(path)
    args = [(j, *settings) for j in jobs if j.key not in done]
    with path.open("a") as fh:
        results: Iterable[dict[str, Any]]
        if workers > 1 and len(args) > 1:
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(workers)
            results = pool.imap_unordered(_run_star, args)
        else:
            pool = None
            results = map(_run_star, args)
        try:
            for i, record in enumerate(results, 1):
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                if progress is not None:
                    progress(i, len(args), record)
        except BaseException:
            if pool is not None:
                pool.terminate()  # Ctrl-C also killed workers mid-task: join() alone would hang
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()


def _loss(record: dict[str, Any]) -> float:
    """A run's validation loss; infinite where it diverged (a loss that is not finite). A run
    that ended above its initial loss (``stalled``) counts with the loss it reached."""
    loss = record["val_loss"]
    return loss if math.isfinite(loss) else math.inf


def _stalled(record: dict[str, Any]) -> bool:
    """Finished with a finite validation loss above its initial one (training flags those
    runs as diverged too)."""
    return bool(record["diverged"]) and math.isfinite(record["val_loss"])


def _rise(record: dict[str, Any]) -> float:
    """The largest recorded training loss over the first: how far a run blew up on the way,
    even where it recovered."""
    curve = record.get("train_curve") or []
    if not curve or not all(math.isfinite(v) for v in curve):
        return math.inf if curve else math.nan
    return max(curve) / curve[0] if curve[0] > 0 else math.nan


def _largest(values: Iterable[float]) -> float:
    """The largest value that is not NaN (NaN if none is)."""
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def _grid(records: Iterable[dict[str, Any]]) -> dict[float, list[float]]:
    """One task's grid: validation losses per constant rate (see :func:`_loss`)."""
    grid: dict[float, list[float]] = {}
    for r in records:
        if r["role"] == "grid":
            grid.setdefault(r["lr"], []).append(_loss(r))
    return grid


def edge_jobs(path: str | Path, tasks: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """One more grid point, a third of a decade out, for every task whose grid-best rate is
    the smallest or largest of its grid so far: a best at the edge may not be the best constant
    rate, only the best of those tried. Nothing for a task whose grid has not run for every
    seed yet, nor beyond ``GRID_EXTENSIONS`` points past the task's own grid (however often
    the benchmark is resumed)."""
    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    jobs = []
    for name in tasks:
        grid = _grid(r for r in records if r["task"] == name and r["seed"] in seeds)
        if not grid or any(len(v) < len(seeds) for v in grid.values()):
            continue
        best = min(grid, key=lambda lr: _mean(grid[lr]))
        if not math.isfinite(_mean(grid[best])) or min(grid) < best < max(grid):
            continue
        out = -1 if best == min(grid) else 1
        k = round(3 * math.log10(best)) + out  # the new point, in thirds of a decade
        own = [round(3 * math.log10(v)) for v in TASKS[name].grid] if name in TASKS else [k]
        if k < min(own) - GRID_EXTENSIONS or k > max(own) + GRID_EXTENSIONS:
            continue
        lr = float(10 ** (k / 3))
        jobs += [Job(name, "constant", seed, lr, "grid") for seed in seeds]
    return jobs


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) else math.inf


def relative_loss(loss: float, best: float) -> float:
    """A loss against a best one as a ratio, ``1 + (loss - best) / |best|``: ``loss / best`` for
    a positive ``best``, and for a loss that can go below zero (a density's negative
    log-likelihood) the same excess over ``|best|``, so a higher loss is always a higher ratio
    (``loss / best`` of two negative losses ranks them the wrong way round). A zero ``best``
    gives 1 for a zero loss and infinity above it."""
    if best == 0:
        return 1.0 if loss == 0 else (math.inf if loss > 0 else -math.inf)
    return 1.0 + (loss - best) / abs(best)


def _spread(values: Sequence[float]) -> float:
    """``max / min - 1`` (:func:`relative_loss` where the lowest is not positive): infinite if
    any value is (a diverged run), NaN for fewer than two."""
    if len(values) < 2:
        return math.nan
    low, high = min(values), max(values)
    if not math.isfinite(high):
        return math.inf
    return relative_loss(high, low) - 1.0


def _sweep_row(sweep: list[dict[str, Any]], default: list[dict[str, Any]]) -> dict[str, Any]:
    """The initial-rate sweep of one task: the validation loss per initial rate (mean over the
    seeds that ran every initial rate), the spread of those means, the same spread on the
    first of those seeds alone, and, for scale, the spread over seeds of the default runs (one
    initial rate). Spreads are NaN when fewer than two initial rates share a seed."""
    by_lr: dict[float, dict[int, float]] = {}
    for r in sweep:
        by_lr.setdefault(r["lr"], {})[r["seed"]] = _loss(r)
    common = sorted(set.intersection(*(set(v) for v in by_lr.values())))
    means = {lr: _mean(v[s] for s in common) for lr, v in by_lr.items()} if common else {}
    return {
        "val_losses": means,
        "seeds": len(common),
        "spread": _spread(list(means.values())),
        "spread_first_seed": _spread([v[common[0]] for v in by_lr.values()])
        if common
        else math.nan,
        "seed_spread": _spread([_loss(r) for r in default]) if len(default) >= 2 else math.nan,
        "diverged": sum(not math.isfinite(_loss(r)) for r in sweep),
        "stalled": sum(_stalled(r) for r in sweep),
        "rise": _largest(_rise(r) for r in sweep),
    }


def summarize(path: str | Path) -> dict[str, Any]:
    """Per task: grid-best validation loss (mean over seeds of the best grid point), each
    method's ratio to it, divergences, wall time, and the initial-rate sweep's spread."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    tasks: dict[str, Any] = {}
    for name in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in records if r["task"] == name]
        grid = _grid(rs)
        best_lr = min(grid, key=lambda lr: _mean(grid[lr]))
        best = _mean(grid[best_lr])
        # (runs that finished: a diverged one stops at its first non-finite loss)
        grid_seconds = [r["seconds"] for r in rs if r["role"] == "grid" and not r["diverged"]]
        row: dict[str, Any] = {
            "split": TASKS[name].split if name in TASKS else "?",
            "grid_best": best,
            "grid_best_lr": best_lr,
            "grid_points": len(grid),
            "grid_best_at_edge": best_lr in (min(grid), max(grid)),
            "grid_runs": sum(len(v) for v in grid.values()),
            "grid_seconds": sum(r["seconds"] for r in rs if r["role"] == "grid"),
            "methods": {},
        }
        for method in (*FREE_METHODS, "gen", "hidlr"):
            mr = [r for r in rs if r["method"] == method and r["role"] in ("free", "default")]
            if not mr:
                continue
            losses = [_loss(r) for r in mr]
            row["methods"][method] = {
                "ratio": relative_loss(_mean(losses), best),
                "diverged": sum(not math.isfinite(v) for v in losses),
                "stalled": sum(_stalled(r) for r in mr),
                "rise": _largest(_rise(r) for r in mr),
                "runs": len(mr),
                "seconds": statistics.fmean(r["seconds"] for r in mr),
                # per seed: the rates at the last recorded step (every record_every steps)
                "last_lrs": [r["lrs"][-1] for r in mr if r["lrs"]],
            }
            if grid_seconds and statistics.fmean(grid_seconds) > 0:
                # wall time per run against a constant-rate run of the same task
                row["methods"][method]["time_ratio"] = row["methods"][method]["seconds"] / (
                    statistics.fmean(grid_seconds)
                )
        sweep = [r for r in rs if r["role"] == "sweep"]
        default = [r for r in rs if r["method"] == "hidlr" and r["role"] == "default"]
        if sweep:
            row["sweep"] = _sweep_row(sweep, default)
        if any(r["lrs"] for r in default):
            row["hidlr_rates"] = _rates_over_time(default)
        tasks[name] = row
    return {"tasks": tasks, "summary": _headline(tasks)}


RATE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fractions of a run at which rates are reported


def _rates_over_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Hi-DLR's rates along its default runs: per group, the geometric mean over the seeds of
    the rate recorded at each fraction of ``RATE_POINTS`` of each run (the nearest record,
    every ``record_every`` steps), with the steps of the longest run's records. Runs that
    diverged (and stopped early) are left out while any other ran to its end."""
    runs = [r for r in runs if r["lrs"]]
    finished = [r for r in runs if not r["diverged"]]
    runs = finished or runs
    groups = len(runs[0]["lrs"][0])

    # per run, the records nearest each fraction of its own length
    picked = [[r["lrs"][round(f * (len(r["lrs"]) - 1))] for f in RATE_POINTS] for r in runs]
    rates = [
        [
            math.exp(statistics.fmean(math.log(p[j][k]) for p in picked))
            for j in range(len(RATE_POINTS))
        ]
        for k in range(groups)
    ]
    n = max(len(r["lrs"]) for r in runs)
    steps = [round(f * (n - 1)) * RECORD_EVERY for f in RATE_POINTS]
    return {"steps": steps, "rates": rates, "runs": len(runs)}


def _headline(tasks: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in (*SPLITS, "all"):
        rows = [r for r in tasks.values() if split == "all" or r["split"] == split]
        if not rows or not all("hidlr" in r["methods"] for r in rows):
            continue
        hid = [r["methods"]["hidlr"] for r in rows]
        entry = {
            "tasks": len(rows),
            "hidlr_within_5pct": sum(h["ratio"] <= 1.05 for h in hid),
            "hidlr_diverged_runs": sum(h["diverged"] for h in hid)
            + sum(r.get("sweep", {}).get("diverged", 0) for r in rows),
            "hidlr_stalled_runs": sum(h["stalled"] for h in hid)
            + sum(r.get("sweep", {}).get("stalled", 0) for r in rows),
            "hidlr_largest_rise": _largest(
                [h["rise"] for h in hid] + [r["sweep"]["rise"] for r in rows if "sweep" in r]
            ),
            "swept": sum("sweep" in r for r in rows),
            "sweep_within_10pct": sum(
                r.get("sweep", {}).get("spread", math.inf) <= 0.10 for r in rows
            ),
            "sweep_within_10pct_first_seed": sum(
                r.get("sweep", {}).get("spread_first_seed", math.inf) <= 0.10 for r in rows
            ),
        }
        for m in (*FREE_METHODS, "gen"):
            entry[f"hidlr_beats_{m}"] = sum(
                r["methods"]["hidlr"]["ratio"] < r["methods"][m]["ratio"]
                for r in rows
                if m in r["methods"]
            )
        out[split] = entry
    return out


def _diverged_mark(info: dict[str, Any]) -> str:
    return (f"D{info['diverged']}" if info["diverged"] else "") + (
        f"S{info['stalled']}" if info.get("stalled") else ""
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: one line per task, then the headline per split. ``sweep`` is the
    spread (max / min - 1) of the mean validation loss over the initial rates, ``seeds`` the
    spread over seeds of the default runs: the noise the sweep's spread is to be read against;
    ``D<n>`` after a ratio: ``n`` of the method's runs diverged (a loss that is not finite: the
    run counts as infinite), ``S<n>``: ``n`` ended above their initial validation loss (they count
    with the loss they reached); ``*`` after the grid-best rate:
    it is still at an edge of the grid after the grid's extensions; ``time``: Hi-DLR's wall time
    per run over a constant-rate run's. Then Hi-DLR's rates along its default runs."""
    methods = ("prodigy", "dadaptation", "dog", "gen", "hidlr")
    lines = [
        f"{'task':<20} {'split':<8} {'grid best':>10} {'lr':>8}  "
        + " ".join(f"{m:>12}" for m in methods)
        + "   sweep   seeds   time"
    ]
    for name, row in summary["tasks"].items():
        cells = []
        for m in methods:
            info = row["methods"].get(m)
            cells.append(
                f"{'-':>12}" if info is None else f"{info['ratio']:>10.3f}{_diverged_mark(info):<2}"
            )
        sweep = row.get("sweep", {}).get("spread")
        seeds = row.get("sweep", {}).get("seed_spread", math.nan)
        edge = "*" if row.get("grid_best_at_edge") else " "
        time = row["methods"].get("hidlr", {}).get("time_ratio", math.nan)
        lines.append(
            f"{name:<20} {row['split']:<8} {row['grid_best']:>10.4g} {row['grid_best_lr']:>8.2g}{edge} "
            + " ".join(cells)
            + (
                f"   {sweep * 100:5.1f}%"
                if sweep is not None and math.isfinite(sweep)
                else "   div"
                if sweep is not None
                else ""
            )
            + (
                f"  {seeds * 100:5.1f}%"
                if math.isfinite(seeds)
                else "      div"
                if seeds == math.inf
                else ""
            )
            + (f"  {time:5.2f}x" if math.isfinite(time) else "")
        )
    for split, e in summary["summary"].items():
        swept = e.get("swept", e["tasks"])
        sweep = (
            f"initial-rate sweep within 10% on {e['sweep_within_10pct']}/{swept} (first seed "
            f"alone: {e['sweep_within_10pct_first_seed']}/{swept})"
            if swept
            else "initial-rate sweep not run"
        )
        lines.append(
            f"[{split}] Hi-DLR within 5% of grid-best on {e['hidlr_within_5pct']}/{e['tasks']} tasks; "
            f"diverged runs {e['hidlr_diverged_runs']}, ended above the initial loss "
            f"{e['hidlr_stalled_runs']}, largest training-loss rise {e['hidlr_largest_rise']:.3g}x; "
            f"{sweep}; beats Prodigy {e['hidlr_beats_prodigy']}, "
            f"D-Adaptation {e['hidlr_beats_dadaptation']}, DoG {e['hidlr_beats_dog']}, GeN {e['hidlr_beats_gen']}"
        )
    rated = {n: r for n, r in summary["tasks"].items() if "hidlr_rates" in r}
    if rated:
        lines.append(
            "\nHi-DLR's rates along its default runs (geometric mean over seeds), per group, "
            "after the first step, at 25%, 50% and 75% of the run and at its last record; "
            "then the grid-best constant rate"
        )
        for name, row in rated.items():
            info = row["hidlr_rates"]
            for k, rates in enumerate(info["rates"]):
                lines.append(
                    f"{name if k == 0 else '':<20} g{k:<3}"
                    + " ".join(f"{v:>9.3g}" for v in rates)
                    + (f"   {row['grid_best_lr']:>8.2g}" if k == 0 else "")
                )
    return "\n".join(lines)
