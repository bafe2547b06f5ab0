"""Cheaper probing, measured: fewer probe points, a fraction of the batch, batched forwards.

Each variant is timed like the main overhead grid (interleaved arms in one process, paired
with the adjacent base-optimizer measurements) and its fitted rates are compared with the
default 4-point fit's in two ways:

- *same step*: at every probe step of a default run, copies of the model and optimizer (same
  weights, gradients, state and rates) take the step with each variant; their fitted rates
  ``b/A`` and updated rates are compared with the default's on that very step. The default
  fit on a different batch of the same size gives the noise floor: how much any fit moves
  from one batch to the next;
- *whole run*: each variant trains on its own and its rates are compared with the default
  run's at the same steps, with the final validation loss beside them.

Batching the probes of a group into one vectorised call (``torch.func.vmap`` over the
probe offsets with ``functional_call``) is timed against the same probes run one by one.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from hidlr.experiments.overhead_timing import _Arm, _median, _run_sequence, _settle, _warm
from hidlr.experiments.overhead_workloads import make_base, make_workload, split_groups
from hidlr.optimizer import HiDLR

__all__ = [
    "VARIANTS",
    "ProbeVariant",
    "batched_probe_speed",
    "format_probe_options",
    "inference_mode_speed",
    "rate_quality",
    "time_variants",
]


@dataclass(frozen=True)
class ProbeVariant:
    """A way to probe: the multipliers and the fraction of the batch the probes see."""

    name: str
    multipliers: tuple[float, ...] = (-2.0, -1.0, 1.0, 2.0)
    fraction: float = 1.0

    def forwards(self, k: int, policy: str) -> int:
        """Forward passes of one probe step: the unperturbed point's (a 0 multiplier, or the
        robust policy's measured loss at ``w0``) and the combined step's (robust, K >= 2)
        included."""
        nonzero = sum(c != 0 for c in self.multipliers)
        robust = policy == "robust"
        return k * nonzero + (0.0 in self.multipliers or robust) + (robust and k >= 2)


VARIANTS = (
    ProbeVariant("default (-2,-1,1,2)"),
    ProbeVariant("3 points (-1,1,2)", (-1.0, 1.0, 2.0)),
    ProbeVariant("2 points + 0 (-2,0,2)", (-2.0, 0.0, 2.0)),
    ProbeVariant("default, 1/2 batch", fraction=0.5),
    ProbeVariant("default, 1/4 batch", fraction=0.25),
    ProbeVariant("3 points, 1/4 batch", (-1.0, 1.0, 2.0), 0.25),
    ProbeVariant("2 points + 0, 1/4 batch", (-2.0, 0.0, 2.0), 0.25),
)


# -- speed ---------------------------------------------------------------------------------


def time_variants(
    model: str,
    base: str,
    k: int,
    phi: int,
    *,
    variants: Sequence[ProbeVariant] = VARIANTS,
    policy: str = "robust",
    repeats: int = 5,
    size: str = "full",
) -> list[dict[str, Any]]:
    """Relative speed (base / HiDLR) of each variant and its limit
    ``S / (S + n_fwd / Phi * F_fraction)``, from interleaved arms in one process."""
    w = make_workload(model, size=size)
    groups = split_groups(w.params, k)
    base_arm = _Arm("base", make_base(base, groups), calls=4)
    fractions = sorted({v.fraction for v in variants})
    forward_arms = {f: _Arm("forward", calls=8, fraction=f) for f in fractions}
    arms = [
        _Arm(
            "hidlr",
            HiDLR(
                make_base(base, groups),
                update_every=phi,
                policy=policy,
                probe_multipliers=v.multipliers,
            ),
            policy=policy,
            phi=phi,
            calls=phi,
            fraction=v.fraction,
        )
        for v in variants
    ]
    for arm in (base_arm, *arms):
        assert arm.opt is not None
        _warm(w, arm.opt)
    _settle()
    for r in range(repeats):
        shift = r % len(arms)
        order = arms[shift:] + arms[:shift]
        seq: list[_Arm] = [base_arm, *forward_arms.values()]
        for i, arm in enumerate(order):
            seq.append(arm)
            if i % 2 == 1 or i == len(order) - 1:
                seq.append(base_arm)
        _run_sequence(w, seq, base_arm)
    base_t = _median(base_arm.samples)
    records = []
    for v, arm in zip(variants, arms, strict=True):
        fwd_t = _median(forward_arms[v.fraction].samples)
        n_fwd = v.forwards(k, policy)
        limit = base_t / (base_t + n_fwd / phi * fwd_t)
        speed = _median(arm.ratios)
        records.append(
            {
                "variant": v.name,
                "multipliers": list(v.multipliers),
                "fraction": v.fraction,
                "model": model,
                "base": base,
                "K": k,
                "phi": phi,
                "policy": policy,
                "forwards_per_probe_step": n_fwd,
                "base_step_s": base_t,
                "forward_s": fwd_t,
                "speed": speed,
                "limit": limit,
                "speed_vs_limit": speed / limit,
                "repeats": len(arm.ratios),
            }
        )
    return records


def batched_probe_speed(
    model: str, *, points: int = 4, repeats: int = 9, size: str = "full"
) -> dict[str, Any]:
    """One group's ``points`` probe forwards (half of the model's tensors moved) one by one
    against one ``torch.func.vmap`` call over the offsets; ``error`` says why a model cannot
    be vectorised (BatchNorm updating its running statistics, for one)."""
    import time

    from torch.func import functional_call, vmap

    w = make_workload(model, size=size)
    x, y = w.batches[0]
    params = {n: p.detach() for n, p in w.model.named_parameters()}
    moved = list(params)[: len(params) // 2]
    gen = torch.Generator().manual_seed(0)
    delta = {n: 1e-3 * torch.randn(params[n].shape, generator=gen) for n in moved}
    offsets = torch.linspace(-2.0, 2.0, points)

    def loss_at(c: torch.Tensor) -> torch.Tensor:
        at = dict(params)
        for n in moved:
            at[n] = params[n] + c * delta[n]
        return nn.functional.cross_entropy(functional_call(w.model, at, (x,)), y)

    def one_by_one() -> torch.Tensor:
        return torch.stack([loss_at(c) for c in offsets])

    batched = vmap(loss_at)
    out: dict[str, Any] = {"model": model, "points": points}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notes: measured below
        reference = one_by_one()
        try:
            same = torch.allclose(batched(offsets), reference, rtol=1e-4, atol=1e-6)
        except RuntimeError as err:
            out.update(error=str(err).splitlines()[0], speedup=math.nan)
            return out
        times: dict[str, list[float]] = {"one_by_one": [], "vmap": []}
        for _ in range(repeats):
            for name, fn in (("one_by_one", one_by_one), ("vmap", lambda: batched(offsets))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    w.reset()
    seq, vec = statistics.median(times["one_by_one"]), statistics.median(times["vmap"])
    out.update(same_losses=bool(same), one_by_one_s=seq, vmap_s=vec, speedup=seq / vec)
    return out


def inference_mode_speed(model: str, *, repeats: int = 15, size: str = "full") -> dict[str, Any]:
    """The closure's forward pass under ``torch.no_grad`` (what the probes use) and under
    ``torch.inference_mode``, interleaved, medians over ``repeats``."""
    import time

    w = make_workload(model, size=size)
    times: dict[str, list[float]] = {"no_grad": [], "inference_mode": []}
    modes = (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode))
    for i in range(repeats + 1):
        for name, mode in modes if i % 2 else modes[::-1]:
            with mode():
                t0 = time.perf_counter()
                w.loss(0)
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    w.reset()
    no_grad, inference = (statistics.median(times[k]) for k in ("no_grad", "inference_mode"))
    return {
        "model": model,
        "no_grad_s": no_grad,
        "inference_mode_s": inference,
        "speedup": no_grad / inference,
    }


# -- quality of the fitted rates -------------------------------------------------------------


def _task(steps: int, seed: int, size: str) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The benchmark transformer on a learnable labelling: the class is how many of the
    sequence's tokens lie in the lowest tenth of the vocabulary (capped at the last class).
    ``steps + 2`` training batches and 4 validation batches."""
    w = make_workload("transformer", size=size, n_batches=steps + 6, seed=seed)
    n_classes, vocab = (3, 20) if size == "tiny" else (10, 1000)  # as make_workload
    batches = [(x, (x < vocab // 10).sum(dim=1).clamp(max=n_classes - 1)) for x, _ in w.batches]
    return w, batches


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], fraction: float) -> Any:
    x, y = batch
    keep = max(1, math.ceil(fraction * x.shape[0]))
    return nn.functional.cross_entropy(model(x[:keep]), y[:keep])


def _shadow_step(
    model: nn.Module,
    opt: HiDLR,
    multipliers: Sequence[float],
    batch: tuple[torch.Tensor, torch.Tensor],
    fraction: float,
) -> tuple[list[float], list[float]]:
    """The probe step a copy of (model, opt) would take with other probes: fitted ``b/A`` per
    group (NaN when the fit is not accepted) and the rates after the update."""
    twin_model, twin = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    twin.options["probe_multipliers"] = tuple(float(c) for c in multipliers)
    twin.step(lambda: _loss(twin_model, batch, fraction))
    record = twin.history[-1]
    return [g.proposed for g in record.groups], twin.lrs


def _relative_gaps(values: list[float], reference: list[float]) -> list[float]:
    return [
        abs(v / r - 1.0)
        for v, r in zip(values, reference, strict=True)
        if math.isfinite(v) and math.isfinite(r) and r > 0
    ]


def _summarize_gaps(gaps: list[float]) -> dict[str, Any]:
    return {
        "n": len(gaps),
        "median_gap": statistics.median(gaps) if gaps else math.nan,
        "within_10pct": (sum(g <= 0.10 for g in gaps) / len(gaps)) if gaps else math.nan,
    }


def rate_quality(
    *,
    variants: Sequence[ProbeVariant] = VARIANTS,
    k: int = 2,
    phi: int = 4,
    steps: int = 200,
    seed: int = 0,
    size: str = "full",
) -> dict[str, Any]:
    """Fitted and updated rates of each variant against the default fit's (see the module
    docstring), on the benchmark transformer with AdamW, K groups, probing every ``phi``."""
    default = variants[0]
    w, batches = _task(steps, seed, size)
    train, valid = batches[: steps + 2], batches[steps + 2 :]

    def run(variant: ProbeVariant, shadows: bool) -> dict[str, Any]:
        w.reset()
        torch.manual_seed(seed)
        opt = HiDLR(
            make_base("adamw", split_groups(w.params, k)),
            update_every=phi,
            probe_multipliers=variant.multipliers,
        )
        same: dict[str, dict[str, list[float]]] = {
            v.name: {"fit": [], "rate": []} for v in (*variants, _FLOOR)
        }
        rates: list[list[float]] = []
        for t in range(steps):
            opt.zero_grad()
            _loss(w.model, train[t], 1.0).backward()
            if shadows and opt.is_probe_step():
                ref_fit, ref_rate = _shadow_step(
                    w.model, opt, default.multipliers, train[t + 1], 1.0
                )
                floor = _shadow_step(w.model, opt, default.multipliers, train[t + 2], 1.0)
                pairs = [
                    (v, _shadow_step(w.model, opt, v.multipliers, train[t + 1], v.fraction))
                    for v in variants[1:]
                ]
                for v, (fit, rate) in [(_FLOOR, floor), *pairs]:
                    same[v.name]["fit"] += _relative_gaps(fit, ref_fit)
                    same[v.name]["rate"] += _relative_gaps(rate, ref_rate)
            probing = opt.is_probe_step()
            opt.step(partial(_loss, w.model, train[t + 1], variant.fraction))
            if probing:
                rates.append(opt.lrs)
        with torch.no_grad():
            val = statistics.fmean(_loss(w.model, b, 1.0).item() for b in valid)
        return {"rates": rates, "valid_loss": val, "same_step": same}

    with torch.no_grad():
        w.reset()
        initial = statistics.fmean(_loss(w.model, b, 1.0).item() for b in valid)
    reference = run(default, shadows=True)
    out: dict[str, Any] = {
        "task": "benchmark transformer, class = number of tokens < 100 (max 9); AdamW (lr0 "
        f"1e-3), K={k}, Phi={phi}, {steps} steps, seed {seed}",
        "valid_loss_initial": initial,
        "valid_loss_default": reference["valid_loss"],
        "noise_floor": {
            "fit": _summarize_gaps(reference["same_step"][_FLOOR.name]["fit"]),
            "rate": _summarize_gaps(reference["same_step"][_FLOOR.name]["rate"]),
        },
        "variants": [],
    }
    for v in variants:
        own = reference if v is default else run(v, shadows=False)
        half = len(reference["rates"]) // 2
        traj = [
            gap
            for mine, ref in zip(own["rates"][half:], reference["rates"][half:], strict=True)
            for gap in _relative_gaps(mine, ref)
        ]
        same = reference["same_step"][v.name]
        out["variants"].append(
            {
                "variant": v.name,
                "same_step_fit": _summarize_gaps(same["fit"]),
                "same_step_rate": _summarize_gaps(same["rate"]),
                "run_rates_second_half": _summarize_gaps(traj),
                "valid_loss": own["valid_loss"],
                "valid_loss_vs_default": own["valid_loss"] / reference["valid_loss"],
            }
        )
    return out


_FLOOR = ProbeVariant("default on another batch (noise floor)")


# -- output ----------------------------------------------------------------------------------


def format_probe_options(result: dict[str, Any]) -> str:
    """The speed table, the batched-probe timings and the rate-quality table."""
    lines: list[str] = []
    speed = result.get("speed", [])
    if speed:
        first = speed[0]
        lines.append(
            f"cheaper probing, speed: {first['model']} + {first['base']}, K={first['K']}, "
            f"Phi={first['phi']}, policy={first['policy']} (measured / limit)"
        )
        lines.append(f"{'variant':<26} {'fwd':>4} {'speed':>6} {'limit':>6} {'meas/lim':>8}")
        for r in speed:
            lines.append(
                f"{r['variant']:<26} {r['forwards_per_probe_step']:>4} {r['speed']:>6.3f} "
                f"{r['limit']:>6.3f} {r['speed_vs_limit']:>8.3f}"
            )
    for b in result.get("batched", []):
        if "error" in b:
            lines.append(
                f"vmap over {b['points']} probes, {b['model']}: not possible ({b['error']})"
            )
        else:
            lines.append(
                f"vmap over {b['points']} probes, {b['model']}: {1e3 * b['vmap_s']:.1f} ms vs "
                f"{1e3 * b['one_by_one_s']:.1f} ms one by one (speed-up {b['speedup']:.2f}x, "
                f"same losses: {b['same_losses']})"
            )
    for m in result.get("inference_mode", []):
        lines.append(
            f"forward under inference_mode, {m['model']}: {1e3 * m['inference_mode_s']:.2f} ms vs "
            f"{1e3 * m['no_grad_s']:.2f} ms under no_grad (speed-up {m['speedup']:.3f}x)"
        )
    quality = result.get("quality")
    if quality:
        lines.append("")
        lines.append(f"cheaper probing, rates against the default fit: {quality['task']}")
        lines.append(
            f"validation loss {quality['valid_loss_initial']:.3f} at the start, "
            f"{quality['valid_loss_default']:.3f} after the default run"
        )
        lines.append(
            "gap = |rate / default's rate - 1|: median, and share of gaps <= 10% "
            "(same step: fitted b/A and the updated rate; run: the rates of a separate run, "
            "second half)"
        )
        lines.append(
            f"{'variant':<40} {'same-step fit':>14} {'same-step rate':>15} "
            f"{'run rates':>14} {'valid loss':>11}"
        )

        def cell(s: dict[str, Any]) -> str:
            return f"{s['median_gap']:.3f} {s['within_10pct']:5.0%}" if s["n"] else "n/a"

        floor = quality["noise_floor"]
        lines.append(
            f"{_FLOOR.name:<40} {cell(floor['fit']):>14} {cell(floor['rate']):>15} {'':>14} {'':>11}"
        )
        for v in quality["variants"]:
            lines.append(
                f"{v['variant']:<40} {cell(v['same_step_fit']):>14} "
                f"{cell(v['same_step_rate']):>15} {cell(v['run_rates_second_half']):>14} "
                f"{v['valid_loss_vs_default']:>10.3f}x"
            )
    return "\n".join(lines)
