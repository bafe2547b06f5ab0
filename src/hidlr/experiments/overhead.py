"""Hi-DLR's price in time and memory (``hidlr bench overhead``; appendix C, Table 4 of the paper).

A probe step costs ``len(probe_multipliers) * K`` extra forward passes (one more for the combined
step of the robust policy when K >= 2), so with probing every Phi steps a step costs
``(1 + 4K / Phi) F + B + C`` instead of ``F + B + C``. With ``B = 2F`` and a negligible
optimizer cost ``C`` the relative speed is at least ``1 / (1 + 4K / (3 Phi))`` (the paper's
lower bound). With the measured time ``S`` of a base training step and ``F`` of one no-grad
forward pass (the closure), the best this implementation can do is
``S / (S + n_fwd / Phi * F)`` (the *limit*); what is measured above the limit is bookkeeping.

Timing: every configuration runs in one process on one shared model, the arms (the base
optimizer, the no-grad forward, HiDLR for each policy and Phi) interleaved in an order that
rotates from repeat to repeat, with a base measurement between every two HiDLR arms. A HiDLR
arm is one cycle of Phi full training steps (``zero_grad``, forward, backward,
``step(closure)``), so its probe step is amortized; a base arm is a few training steps of the
base optimizer (``step()`` without closure: torch optimizers would run it). Each HiDLR sample
is paired with the mean of the base samples next to it; the reported speed is the median over
repeats of those paired ratios. Python's garbage collector is off inside an arm.

Parameter groups for K: the model's parameter tensors, in ``model.parameters()`` order, are
split into K contiguous groups of near-equal count (layer-wise blocks); the base optimizer gets
the same K groups, so K changes only what HiDLR does. The closures evaluate the batch the step
trains on (this measures cost, not rates): every HiDLR here has ``on_own_batch="warn"``, so
its probe steps stay what is timed instead of turning into deferred probes. All three models have at least 40
tensors (20 linear layers; 3 encoder layers; 10 conv-BatchNorm blocks), so K = 40 needs no
splitting of tensors.

Memory: torch's CPU allocator reports every allocation and free to the profiler
(``profile_memory=True``); the peak of their running sum is the most a step held above what was
live when it began. Compared for the base optimizer, a HiDLR probe step and a HiDLR plain step,
for the whole training step and for ``optimizer.step`` alone; the resident-set high-water mark
(``/proc/self/clear_refs``, Linux) is a coarse cross-check (the C allocator reuses freed pages).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from hidlr.experiments.overhead_timing import (
    _Arm,
    _median,
    _run_arm,
    _run_sequence,
    _settle,
    _train_step,
    _warm,
)
from hidlr.experiments.overhead_workloads import (
    BASES,
    K_VALUES,
    MODELS,
    PHI_VALUES,
    POLICIES,
    TABLE4_K,
    TABLE4_PHIS,
    Workload,
    forwards_per_probe_step,
    implementation_limit,
    make_base,
    make_workload,
    paper_bound,
    split_groups,
    trainable_bytes,
)
from hidlr.optimizer import HiDLR

__all__ = ["expected_speed_vs_limit", "run_overhead"]


def _time_config(
    w: Workload,
    base: str,
    k: int,
    phis: Sequence[int],
    policies: Sequence[str],
    repeats: int,
    base_calls: int,
    forward_calls: int,
) -> list[dict[str, Any]]:
    """Interleaved timing of one (model, base optimizer, K): one record per (policy, Phi)."""
    groups = split_groups(w.params, k)
    base_arm = _Arm("base", make_base(base, groups), calls=base_calls)
    fwd_arm = _Arm("forward", calls=forward_calls)  # run next to every base arm
    arms = [
        _Arm(
            "hidlr",
            HiDLR(make_base(base, groups), update_every=phi, policy=policy, on_own_batch="warn"),
            policy=policy,
            phi=phi,
            calls=phi,
        )
        for policy in policies
        for phi in phis
    ]
    for arm in (base_arm, *arms):
        assert arm.opt is not None
        _warm(w, arm.opt)
    _settle()
    _run_arm(w, fwd_arm)
    for r in range(repeats):
        shift = (r * 3) % len(arms)
        order = arms[shift:] + arms[:shift]
        if r % 2:
            order.reverse()
        seq: list[_Arm] = [base_arm, fwd_arm]
        for i, arm in enumerate(order):
            seq.append(arm)
            if i % 2 == 1 or i == len(order) - 1:
                seq += [base_arm, fwd_arm]
        _run_sequence(w, seq, base_arm)
    base_t, fwd_t = _median(base_arm.samples), _median(fwd_arm.samples)
    records = []
    for arm in arms:
        pooled = [a for a in arms if a.policy == arm.policy]
        probe_t = _median([t for a in pooled for t in a.probe])
        plain_t = _median([t for a in pooled for t in a.plain])
        probe_net = _median([t for a in pooled for t in a.probe_net])
        probe_fwd = _median([t for a in pooled for t in a.probe_forward])
        planned = forwards_per_probe_step(k, arm.policy)
        # the forward passes its probe steps made: fewer than planned where a group's step did
        # not move its weights (no gradient reached it), which is then not probed
        n_fwd = statistics.fmean(arm.probe_calls) if arm.probe_calls else planned
        speed = _median(arm.ratios)
        limit = implementation_limit(base_t, fwd_t, k, arm.phi, arm.policy, n_fwd)
        bound = paper_bound(k, arm.phi)
        decomposed = (probe_t + (arm.phi - 1) * plain_t) / arm.phi
        records.append(
            {
                "model": w.name,
                "base": base,
                "K": k,
                "phi": arm.phi,
                "policy": arm.policy,
                "forwards_per_probe_step": n_fwd,
                "forwards_planned": planned,
                "base_step_s": base_t,
                "forward_s": fwd_t,
                "hidlr_step_s": _median(arm.samples),
                "probe_step_s": probe_t,
                "plain_step_s": plain_t,
                "probe_forward_s": probe_fwd,
                "bookkeeping_per_probe_step_s": probe_net - plain_t,
                "speed": speed,
                "speed_decomposed": base_t / decomposed,
                "limit": limit,
                "paper_bound": bound,
                "speed_vs_limit": speed / limit,
                "speed_vs_paper_bound": speed / bound,
                "expected_speed_vs_limit": expected_speed_vs_limit(
                    base_t, fwd_t, probe_net - plain_t, n_fwd, arm.phi
                ),
                "repeats": len(arm.ratios),
            }
        )
    return records


def _table4(
    w: Workload, base: str, phis: Sequence[int | None], policies: Sequence[str], repeats: int
) -> list[dict[str, Any]]:
    """Time per epoch (all of ``w.batches`` once) at K = 2 for each Phi; ``None`` is the base
    optimizer alone (Phi = inf). Interleaved like the step timings, medians over repeats."""
    groups = split_groups(w.params, TABLE4_K)
    epoch = len(w.batches)
    arms: list[tuple[int | None, str, Optimizer]] = []
    for phi in phis:
        if phi is None:
            arms.append((None, "", make_base(base, groups)))
        else:
            if epoch % phi:
                raise ValueError(f"an epoch of {epoch} batches is not a whole number of Phi={phi}")
            for policy in policies:
                arms.append(
                    (
                        phi,
                        policy,
                        HiDLR(
                            make_base(base, groups),
                            update_every=phi,
                            policy=policy,
                            on_own_batch="warn",
                        ),
                    )
                )
    for _, _, opt in arms:
        _warm(w, opt)
    _settle()
    times: list[list[float]] = [[] for _ in arms]
    for r in range(repeats):
        order = list(range(len(arms)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            opt = arms[i][2]
            w.reset()
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                for b in range(epoch):
                    _train_step(w, opt, b)
                times[i].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    base_times = [t for (phi, _, _), t in zip(arms, times, strict=True) if phi is None]
    base_epoch = _median(base_times[0]) if base_times else math.nan
    out = []
    for (phi, policy, _), t in zip(arms, times, strict=True):
        epoch_s = _median(t)
        out.append(
            {
                "model": w.name,
                "base": base,
                "K": TABLE4_K,
                "phi": phi,
                "policy": policy or "base",
                "epoch_batches": epoch,
                "epoch_s": epoch_s,
                "relative_speed": base_epoch / epoch_s,
                "paper_bound": 1.0 if phi is None else paper_bound(TABLE4_K, phi),
            }
        )
    return out


# -- the benchmark ---------------------------------------------------------------------------


def run_overhead(
    out_dir: str | Path | None,
    *,
    quick: bool,
    size: str = "full",
    models: Sequence[str] | None = None,
    bases: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
    phis: Sequence[int] | None = None,
    policies: Sequence[str] = POLICIES,
    repeats: int | None = None,
    table4: bool = True,
    table4_phis: Sequence[int | None] = TABLE4_PHIS,
    table4_repeats: int | None = None,
    epoch_batches: int = 16,
    memory: bool = True,
    profile: bool = True,
    probe_options: bool = True,
    plot: bool = True,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the overhead benchmark; returns the results and, when ``out_dir`` is given, writes
    ``overhead.json``, ``overhead.txt`` and (``plot``, needs matplotlib) ``overhead.png``.

    ``quick``: the MLP only, K in {1, 2, 8}, Phi in {1, 2, 4, 8}, Table 4 for SGD only (about
    1-2 minutes on one core); otherwise every model, K in {1, 2, 4, 8, 40}, Phi in
    {1, 2, 4, 8, 16} (about 15 minutes). Any of the lists can be given explicitly. Runs with
    ``threads`` intra-op threads (restored afterwards) and flushes denormals.

    ``probe_options``: the cheaper probing variants of :mod:`hidlr.experiments.probe_options`
    on the transformer with AdamW at K = 2, Phi = 8 (speed, and their rates against the
    default fit's), and vectorised probes on each model.
    """
    models = tuple(models or (("mlp",) if quick else MODELS))
    bases = tuple(bases or BASES)
    ks = tuple(ks or ((1, 2, 8) if quick else K_VALUES))
    phis = tuple(phis or ((1, 2, 4, 8) if quick else PHI_VALUES))
    repeats = repeats or (3 if quick else 4)
    table4_repeats = table4_repeats or (2 if quick else 3)
    from hidlr.experiments.overhead_breakdown import _memory, profile_probe_step

    started = time.perf_counter()

    def say(message: str) -> None:
        if progress is not None:
            progress(f"[{time.perf_counter() - started:6.1f} s] {message}")

    result: dict[str, Any] = {
        "config": {
            "quick": quick,
            "size": size,
            "models": list(models),
            "bases": list(bases),
            "K": list(ks),
            "phi": list(phis),
            "policies": list(policies),
            "repeats": repeats,
            "table4_phi": [p for p in table4_phis],
            "table4_repeats": table4_repeats,
            "epoch_batches": epoch_batches,
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": _cpu_count(),
            "grouping": "contiguous blocks of parameter tensors, sizes differing by at most one",
            "timing": (
                "interleaved arms in one process, rotating order; HiDLR arm = one cycle of Phi "
                "training steps; speed = median over repeats of base/HiDLR paired with the "
                "adjacent base measurements; gc off inside arms"
            ),
        },
        "workloads": {},
        "speed": [],
        "table4": [],
        "memory": [],
        "profile": [],
        "probe_options": {},
    }
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    _settle()
    try:
        for name in models:
            w = make_workload(name, size=size, n_batches=epoch_batches)
            result["workloads"][name] = {
                "description": w.description,
                "parameters": sum(p.numel() for p in w.params),
                "tensors": len(w.params),
                "param_bytes": trainable_bytes(w.params),
            }
            for base in bases:
                for k in ks:
                    say(f"timing {name} + {base}, K={k}")
                    result["speed"] += _time_config(
                        w,
                        base,
                        k,
                        phis,
                        policies,
                        repeats,
                        base_calls=4,
                        forward_calls=8,
                    )
                if table4 and (not quick or base == bases[0]):
                    say(f"table 4: {name} + {base}")
                    result["table4"] += _table4(w, base, table4_phis, policies, table4_repeats)
                if memory:
                    say(f"memory: {name} + {base}")
                    result["memory"].append(_memory(w, base, "robust"))
            if profile:
                for k in sorted({ks[0], ks[-1], *(kk for kk in ks if kk == 8)}):
                    say(f"profile: {name}, K={k}")
                    result["profile"].append(profile_probe_step(w, bases[0], k, "robust"))
        if probe_options:
            from hidlr.experiments import probe_options as po

            say("cheaper probing: speed")
            result["probe_options"]["speed"] = po.time_variants(
                "transformer", "adamw", 2, 8, repeats=repeats + 1, size=size
            )
            say("cheaper probing: vectorised probes")
            result["probe_options"]["batched"] = [
                po.batched_probe_speed(name, size=size) for name in MODELS
            ]
            say("cheaper probing: forward passes under inference mode")
            result["probe_options"]["inference_mode"] = [
                po.inference_mode_speed(name, size=size) for name in MODELS
            ]
            say("cheaper probing: rates against the default fit")
            result["probe_options"]["quality"] = po.rate_quality(
                steps=60 if quick else 200, size=size
            )
    finally:
        gc.unfreeze()
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)
    result["seconds"] = time.perf_counter() - started
    result["summary"] = _summary(result)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": str(out / "overhead.json"), "text": str(out / "overhead.txt")}
        from hidlr.experiments.overhead_report import format_overhead, plot_overhead

        if plot and result["speed"]:
            files["plot"] = str(plot_overhead(result, out / "overhead.png"))
        result["files"] = files
        Path(files["json"]).write_text(json.dumps(result, indent=1, default=_json_default))
        Path(files["text"]).write_text(format_overhead(result) + "\n")
    return result


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def expected_speed_vs_limit(
    base_step: float, forward: float, bookkeeping: float, n_fwd: float, phi: float
) -> float:
    """The fraction of the limit reached when each probe step adds ``bookkeeping`` seconds to
    its forwards: ``(Phi S + n F) / (Phi S + n F + bookkeeping)``. Less noisy than the measured
    ratio: the bookkeeping is timed inside the probe steps themselves."""
    cycle = phi * base_step + n_fwd * forward
    return cycle / (cycle + bookkeeping)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy in result["config"]["policies"]:
        rows = [r for r in result["speed"] if r["policy"] == policy]
        closeness = [r["speed_vs_limit"] for r in rows if math.isfinite(r["speed_vs_limit"])]
        if not closeness:
            continue
        expected = [r["expected_speed_vs_limit"] for r in rows]
        out[policy] = {
            "median_speed_vs_limit": statistics.median(closeness),
            "min_speed_vs_limit": min(closeness),
            "within_3pct_of_limit": sum(abs(c - 1.0) <= 0.03 for c in closeness),
            "configs": len(closeness),
            "above_paper_bound": sum(r["speed"] >= r["paper_bound"] for r in rows),
            "median_expected_speed_vs_limit": statistics.median(expected),
            "expected_within_3pct_of_limit": sum(e >= 0.97 for e in expected),
        }
    return out
