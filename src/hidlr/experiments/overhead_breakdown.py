"""Where a probe step's time and memory go: allocator peaks and a per-piece profile."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from hidlr.experiments.overhead_timing import _backward_and_step, _forward, _train_step, _warm
from hidlr.experiments.overhead_workloads import (
    TABLE4_K,
    Workload,
    forwards_per_probe_step,
    make_base,
    snapshot_bytes,
    split_groups,
    trainable_bytes,
)
from hidlr.optimizer import HiDLR

__all__ = ["allocation_peak", "profile_probe_step"]


# -- memory ----------------------------------------------------------------------------------


def allocation_peak(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, net)``: the most bytes that ``fn()`` held allocated on the CPU at once above what
    was live when it began, and what it still holds at its end (negative if it freed more).

    From the allocation and free events that torch's CPU allocator reports to the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    live = peak = 0
    for _, _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _rss_growth(fn: Callable[[], object]) -> int | None:
    """Growth of the resident-set high-water mark during ``fn()`` (Linux), else ``None``."""
    try:
        before = _proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None
    fn()
    return _proc_status("VmHWM") - before


def _memory(w: Workload, base: str, policy: str) -> dict[str, Any]:
    """Peak CPU memory of the base optimizer and of HiDLR (K = 2, Phi = 2) on the same model."""
    groups = split_groups(w.params, TABLE4_K)
    base_opt = make_base(base, groups)
    hid = HiDLR(make_base(base, groups), update_every=2, policy=policy, on_own_batch="warn")
    for _ in range(2):  # optimizer state allocated, HiDLR back at a probe step
        _train_step(w, base_opt)
        _train_step(w, hid)
    out: dict[str, Any] = {"model": w.name, "base": base, "policy": policy, "K": TABLE4_K}
    out["param_bytes"] = trainable_bytes(w.params)
    hid.zero_grad()
    w.loss().backward()
    out["snapshot_bytes"] = snapshot_bytes(hid)

    # zero_grad runs before measuring: the profiler does not see blocks freed that were
    # allocated before it started, so the step's own frees must be of its own allocations
    def step(opt: Optimizer) -> tuple[int, int]:
        opt.zero_grad()
        return allocation_peak(partial(_backward_and_step, w, opt))

    def rss(opt: Optimizer) -> int | None:
        opt.zero_grad()
        return _rss_growth(partial(_backward_and_step, w, opt))

    def step_only(opt: Optimizer) -> int:
        opt.zero_grad()
        w.loss().backward()
        fn = partial(opt.step, partial(w.loss, 0)) if isinstance(opt, HiDLR) else opt.step
        return allocation_peak(fn)[0]

    (out["step_peak_base"], net_base) = step(base_opt)
    (out["step_peak_hidlr_probe"], net_probe) = step(hid)
    (out["step_peak_hidlr_plain"], net_plain) = step(hid)
    out["retained_extra_probe"] = net_probe - net_base
    out["retained_extra_plain"] = net_plain - net_base
    out["opt_step_peak_base"] = step_only(base_opt)
    out["opt_step_peak_hidlr_probe"] = step_only(hid)
    out["opt_step_peak_hidlr_plain"] = step_only(hid)
    out["forward_peak"] = allocation_peak(partial(_forward, w))[0]
    out["step_extra_probe"] = out["step_peak_hidlr_probe"] - out["step_peak_base"]
    out["step_extra_plain"] = out["step_peak_hidlr_plain"] - out["step_peak_base"]
    # during a probe step the snapshot lives alongside the base step and the probes' forwards
    out["opt_step_extra_probe"] = out["opt_step_peak_hidlr_probe"] - max(
        out["opt_step_peak_base"], out["forward_peak"]
    )
    out["opt_step_extra_plain"] = out["opt_step_peak_hidlr_plain"] - out["opt_step_peak_base"]
    out["rss_growth_base"] = rss(base_opt)
    out["rss_growth_hidlr_probe"] = rss(hid)
    out["rss_growth_hidlr_plain"] = rss(hid)
    return out


# -- profile ---------------------------------------------------------------------------------


class _Timers:
    """Exclusive wall time per category of the functions patched in (a tiny profiler whose
    cost is two clock reads per call: cProfile would inflate the Python-heavy parts)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._stack: list[float] = []
        self._patched: list[tuple[Any, str, Any]] = []

    def wrap(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                inner = self._stack.pop()
                self.total[category] = self.total.get(category, 0.0) + dt - inner
                if self._stack:
                    self._stack[-1] += dt

        return timed

    def patch(self, owner: Any, name: str, category: str) -> None:
        original = owner.__dict__[name]
        self._patched.append((owner, name, original))
        setattr(owner, name, self.wrap(category, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def _patch_hidlr(timers: _Timers) -> None:
    import hidlr._probing as probing
    import hidlr.optimizer as optimizer

    for owner, name, category in (
        (HiDLR, "_probe_step", "snapshot (clone) + setup"),
        (HiDLR, "_probe_and_update", "moved flags, records, Python"),
        (HiDLR, "_base_step", "base optimizer step"),
        (HiDLR, "_fit", "fit + rate policy"),
        (optimizer, "diagonal_rates", "fit + rate policy"),
        (optimizer, "propose_rates", "fit + rate policy"),
        (optimizer, "step_scale", "fit + rate policy"),
        (optimizer, "coupling_ratio", "fit + rate policy"),
        (optimizer, "_exchange", "exchanges (pointer or XOR swaps)"),
        (probing, "_exchange", "exchanges (pointer or XOR swaps)"),
        (probing.GroupMover, "move", "moves (lerp, copy)"),
        (probing.GroupMover, "finish", "moves (lerp, copy)"),
        (probing.BufferGuard, "cover", "buffer guard (hooks, restore)"),
        (probing.BufferGuard, "restore", "buffer guard (hooks, restore)"),
        (probing.RngReplay, "__enter__", "RNG save/replay"),
        (probing.RngReplay, "replay", "RNG save/replay"),
    ):
        timers.patch(owner, name, category)


def profile_probe_step(
    w: Workload, base: str, k: int, policy: str, *, steps: int = 3, top: int = 12
) -> dict[str, Any]:
    """Where a probe step's ``optimizer.step`` spends its time, median over ``steps`` probe
    steps: the closure's forward passes, the base optimizer's step and each piece of HiDLR's
    bookkeeping (exclusive times of its functions, patched in for the measurement only); then
    the ``top`` torch operators by self CPU time (``torch.profiler``, over the same number of
    probe steps)."""
    groups = split_groups(w.params, k)
    hid = HiDLR(make_base(base, groups), update_every=1, policy=policy, on_own_batch="warn")
    _warm(w, hid)
    timers = _Timers()
    closure = timers.wrap("forward passes (closure)", partial(w.loss, 0))

    def prepared() -> Callable[[], None]:
        w.reset()
        hid.zero_grad()
        w.loss().backward()
        return partial(hid.step, closure)

    prepared()()  # the first probe step allocates what later ones reuse
    samples: list[dict[str, float]] = []
    _patch_hidlr(timers)
    try:
        for _ in range(steps):
            fn = prepared()
            timers.total.clear()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fn()
                total = time.perf_counter() - t0
            finally:
                gc.enable()
            sample = dict(timers.total)
            sample["other (HiDLR.step, wrappers)"] = total - sum(sample.values())
            sample["total"] = total
            samples.append(sample)
    finally:
        timers.restore()
    breakdown = {
        key: 1e3 * statistics.median(s.get(key, 0.0) for s in samples) for key in samples[0]
    }

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        for _ in range(steps):
            prepared()()
    ops = [
        {"op": e.key, "calls": e.count / steps, "self_ms": e.self_cpu_time_total / 1e3 / steps}
        for e in tprof.key_averages()
    ]
    ops.sort(key=lambda r: -r["self_ms"])
    return {
        "model": w.name,
        "base": base,
        "K": k,
        "policy": policy,
        "forwards_per_probe_step": forwards_per_probe_step(k, policy),
        "param_bytes": trainable_bytes(w.params),
        "breakdown_ms": breakdown,
        "ops": ops[:top],
    }
