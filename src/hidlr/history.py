"""Typed diagnostics of probe steps, and their export to CSV and JSON."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["GroupProbe", "ProbeRecord", "history_rows", "save_history"]

REASONS = (
    "accepted",
    "zero_direction",
    "stalled",
    "empty_group",
    "frozen",
    "nonfinite_probe",
    "flat",
    "not_convex",
    "not_descent",
    "poor_fit",
)


@dataclass(frozen=True)
class GroupProbe:
    """One group's fit on one probe step.

    ``b`` and ``A`` are the fitted slope and curvature along the group's direction in rate
    units, ``r2`` the fit quality on the group's own probes, ``proposed`` the rate ``b / A``
    (or the coupled solution), ``lr_before`` / ``lr_after`` the adapted rate around the
    update, and ``decrease`` the loss decrease the fit predicts for the group's own optimal
    step, ``b^2 / (2 A)`` (NaN unless the group is convex and descending). ``action`` is what
    the rate policy did (``update``, ``grow``, ``shrink``, ``keep``); ``influence`` the smoothed
    predicted decrease after this step and ``share`` its share among the unfrozen groups.
    ``own_b`` is the slope ``b`` on the gradient's own batch, from the gradient itself (NaN
    where it is not measured: deferred probes, sparse gradients, sharded parameters); ``b``
    equals it when the probes see that batch.
    """

    group: int
    lr_before: float
    lr_after: float
    proposed: float
    b: float
    A: float
    r2: float
    decrease: float
    accepted: bool
    reason: str
    action: str = "keep"
    influence: float = float("nan")
    share: float = float("nan")
    own_b: float = float("nan")

    @classmethod
    def of(
        cls,
        group: int,
        lrs: tuple[float, float],
        proposed: float,
        fitted: tuple[float, float, float],
        reason: str,
        action: str,
        influence: tuple[float, float],
        own_b: float = math.nan,
    ) -> GroupProbe:
        """The record of one group's fit: ``lrs`` before and after, ``fitted`` its ``(b, A,
        R^2)``, ``influence`` its smoothed influence and share after this step."""
        b, a, r2 = fitted
        decrease = b * b / (2 * a) if (a > 0 and b > 0) else math.nan
        return cls(
            group,
            *lrs,
            proposed,
            b,
            a,
            r2,
            decrease,
            reason == "accepted",
            reason,
            action,
            *influence,
            own_b,
        )


@dataclass(frozen=True)
class ProbeRecord:
    """All groups of one probe step.

    ``loss`` is the unperturbed loss: measured at ``w0`` under the robust policy, the fit's
    intercept under the paper policy. With the joint check: ``step_loss`` is the loss
    measured at the combined step of all groups, ``coupling_ratio`` the ratio of the diagonal
    model's curvature along it to the measured one, and ``coupling`` the smoothed factor applied
    to every group's diagonal rate (1 without the joint check).
    """

    step: int
    loss: float
    n_probes: int
    groups: tuple[GroupProbe, ...]
    step_loss: float = float("nan")
    coupling_ratio: float = float("nan")
    coupling: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "n_probes": self.n_probes,
            "groups": [asdict(g) for g in self.groups],
            "step_loss": self.step_loss,
            "coupling_ratio": self.coupling_ratio,
            "coupling": self.coupling,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeRecord:
        return cls(
            int(data["step"]),
            float(data["loss"]),
            int(data["n_probes"]),
            tuple(GroupProbe(**g) for g in data["groups"]),
            float(data.get("step_loss", float("nan"))),
            float(data.get("coupling_ratio", float("nan"))),
            float(data.get("coupling", 1.0)),
        )


def _step_fields(record: ProbeRecord) -> dict[str, float]:
    return {
        "step_loss": record.step_loss,
        "coupling_ratio": record.coupling_ratio,
        "coupling": record.coupling,
    }


def history_rows(records: Iterable[ProbeRecord]) -> list[dict[str, Any]]:
    """One flat row per (probe step, group)."""
    return [
        {"step": r.step, "loss": r.loss, "n_probes": r.n_probes, **_step_fields(r), **asdict(g)}
        for r in records
        for g in r.groups
    ]


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def save_history(records: Iterable[ProbeRecord], path: str | Path) -> Path:
    """Write the history as CSV (``.csv``) or JSON (any other suffix); returns the path."""
    path = Path(path)
    rows = history_rows(records)
    if path.suffix == ".csv":
        names = ["step", "loss", "n_probes", "step_loss", "coupling_ratio", "coupling"]
        names += [f.name for f in fields(GroupProbe)]
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(
            json.dumps([{k: _clean(v) for k, v in row.items()} for row in rows], indent=1)
        )
    return path
