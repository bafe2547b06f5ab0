"""Timing primitives shared by the overhead benchmarks: one training step, one forward pass,
the interleaved arms of a measurement, and how the machine is settled before one.

An arm is what one sample times: a few base-optimizer steps, a no-grad forward pass, or one
cycle of Phi HiDLR steps (see :mod:`hidlr.experiments.overhead` for how they are paired).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.optim import Optimizer

from hidlr.experiments.overhead_workloads import Workload
from hidlr.optimizer import HiDLR


def _train_step(
    w: Workload,
    opt: Optimizer,
    batch: int = 0,
    closure: Callable[[], torch.Tensor] | None = None,
) -> None:
    opt.zero_grad()
    _backward_and_step(w, opt, batch, closure)


def _backward_and_step(
    w: Workload,
    opt: Optimizer,
    batch: int = 0,
    closure: Callable[[], torch.Tensor] | None = None,
) -> None:
    w.loss(batch).backward()
    if isinstance(opt, HiDLR):
        opt.step(closure or partial(w.loss, batch))
    else:
        opt.step()


def _forward(w: Workload, fraction: float = 1.0) -> None:
    with torch.no_grad():
        w.loss(0, fraction)


@dataclass
class _Arm:
    """One thing that is timed: a HiDLR (policy, Phi), the base optimizer, or the forward."""

    kind: str  # "hidlr", "base" or "forward"
    opt: Optimizer | None = None
    policy: str = ""
    phi: int = 0
    calls: int = 1
    fraction: float = 1.0  # of the batch the probes (or the timed forward) use
    samples: list[float] = field(default_factory=list)  # per-step (per-call) means, by repeat
    probe: list[float] = field(default_factory=list)  # single probe-step times
    probe_net: list[float] = field(default_factory=list)  # the same less their closure calls
    probe_forward: list[float] = field(default_factory=list)  # closure calls inside probes
    probe_calls: list[int] = field(default_factory=list)  # closure calls per probe step
    plain: list[float] = field(default_factory=list)  # single plain-step times
    ratios: list[float] = field(default_factory=list)  # paired base / hidlr, by repeat


def _run_arm(w: Workload, arm: _Arm) -> float:
    """Run ``arm`` once; returns its mean time per step (per forward call)."""
    w.reset()
    gc.collect()
    gc.disable()
    try:
        times = []
        if arm.kind == "forward":
            for _ in range(arm.calls):
                t0 = time.perf_counter()
                _forward(w, arm.fraction)
                times.append(time.perf_counter() - t0)
        else:
            assert arm.opt is not None
            opt = arm.opt
            calls: list[float] = []

            def closure() -> torch.Tensor:
                t = time.perf_counter()
                loss = w.loss(0, arm.fraction)
                calls.append(time.perf_counter() - t)
                return loss

            for _ in range(arm.calls):
                probing = isinstance(opt, HiDLR) and opt.is_probe_step()
                calls.clear()
                t0 = time.perf_counter()
                _train_step(w, opt, closure=closure)
                dt = time.perf_counter() - t0
                times.append(dt)
                if arm.kind == "hidlr" and probing:
                    arm.probe.append(dt)
                    arm.probe_net.append(dt - sum(calls))
                    arm.probe_forward += calls
                    arm.probe_calls.append(len(calls))
                elif arm.kind == "hidlr":
                    arm.plain.append(dt)
    finally:
        gc.enable()
    return statistics.fmean(times)


def _run_sequence(w: Workload, seq: Sequence[_Arm], base_arm: _Arm) -> None:
    """Run the arms in order; each HiDLR sample is paired with the mean of the base samples
    just before and after it (``seq`` starts and ends with ``base_arm``)."""
    timeline = [(arm, _run_arm(w, arm)) for arm in seq]
    for pos, (arm, t) in enumerate(timeline):
        arm.samples.append(t)
        if arm.kind != "hidlr":
            continue
        before = next(s for a, s in reversed(timeline[:pos]) if a is base_arm)
        after = next(s for a, s in timeline[pos + 1 :] if a is base_arm)
        arm.ratios.append(0.5 * (before + after) / t)


def _warm(w: Workload, opt: Optimizer) -> None:
    """Allocate the base optimizer's state without advancing HiDLR's step count."""
    w.reset()
    opt.zero_grad()
    w.loss(0).backward()
    (opt.optimizer if isinstance(opt, HiDLR) else opt).step()
    opt.zero_grad()


def _settle() -> None:
    """Collect, then freeze what is alive (undone at the end of :func:`run_overhead`) so that
    the collection before each arm only walks objects created since."""
    gc.collect()
    gc.freeze()


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan
