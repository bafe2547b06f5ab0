"""Experiments as data: one JSON result file per run, written once, read by reports.

A result file has three sections, ``run`` (experiment, method, seed, config), ``train``
(what the run measured) and ``meta`` (versions, git revision, device, wall time). Runs whose
file exists are skipped, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunSpec",
    "SettingsMismatch",
    "load_results",
    "meta",
    "run_specs",
    "training_state_bytes",
]


class SettingsMismatch(ValueError):
    """A results folder holds runs made with other settings than the ones asked for."""


@dataclass(frozen=True)
class RunSpec:
    """One run: an experiment, a method, a seed and the method's configuration."""

    experiment: str
    method: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.method}__seed{self.seed}"

    def path(self, out: Path) -> Path:
        return out / self.experiment / f"{self.run_id}.json"


def _git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def meta() -> dict[str, Any]:
    """Versions, git revision and device of this process."""
    from hidlr import __version__

    return {
        "hidlr": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": _git_revision(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run_specs(
    specs: Iterable[RunSpec],
    out: str | Path,
    run: Callable[[RunSpec], dict[str, Any]],
    progress: Callable[[int, int, RunSpec, bool], None] | None = None,
) -> list[Path]:
    """Run every spec whose result file is missing; returns all result paths. A result file
    written for another configuration of the same run (quick and full mode share names) is
    :class:`SettingsMismatch`, not a result."""
    out = Path(out)
    specs = list(specs)
    paths = []
    for i, spec in enumerate(specs, 1):
        path = spec.path(out)
        paths.append(path)
        skipped = path.exists()
        if skipped:
            saved = json.loads(path.read_text())["run"]
            wanted = json.loads(json.dumps(_clean(asdict(spec))))  # as stored (keys as str)
            if saved != wanted:
                changed = sorted(
                    k
                    for k in saved["config"].keys() | wanted["config"].keys()
                    if saved["config"].get(k) != wanted["config"].get(k)
                )
                raise SettingsMismatch(
                    f"{path} holds a run made with other settings "
                    f"({ {k: saved['config'].get(k) for k in changed} } there, "
                    f"{ {k: wanted['config'].get(k) for k in changed} } now; quick and full mode "
                    "write the same files): choose another --out, or remove it to rerun"
                )
        else:
            start = time.perf_counter()
            train = run(spec)
            record = {
                "run": asdict(spec),
                "train": train,
                "meta": {**meta(), "wall_seconds": time.perf_counter() - start},
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(_clean(record), indent=1))
            tmp.replace(path)  # a run is either fully written or absent
        if progress is not None:
            progress(i, len(specs), spec, skipped)
    return paths


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every result file under ``folder`` (sorted by path); other JSON files (a benchmark's
    summary) are not results and are left out."""
    found = (json.loads(p.read_text()) for p in sorted(Path(folder).rglob("*.json")))
    return [
        r
        for r in found
        if isinstance(r, dict) and all(isinstance(r.get(k), dict) for k in ("run", "train", "meta"))
    ]


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the trainable parameters, their gradients and the optimizer state: the memory
    a training method needs beyond the frozen model (the CPU build of torch keeps no
    allocator statistics, so this is counted, not sampled)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(2 * p.numel() * p.element_size() for p in params)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(
                v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)
            )
    return total
