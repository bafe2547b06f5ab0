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
the same K groups, so K changes only what HiDLR does. All three models have at least 40
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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from hidlr.experiments.models import MLP, TokenTransformer
from hidlr.optimizer import HiDLR

__all__ = [
    "BASES",
    "K_VALUES",
    "MODELS",
    "PHI_VALUES",
    "POLICIES",
    "BNConvNet",
    "Workload",
    "allocation_peak",
    "expected_speed_vs_limit",
    "format_overhead",
    "forwards_per_probe_step",
    "implementation_limit",
    "make_base",
    "make_workload",
    "paper_bound",
    "profile_probe_step",
    "run_overhead",
    "snapshot_bytes",
    "split_groups",
    "trainable_bytes",
]

MODELS = ("mlp", "transformer", "cnn")
BASES = ("sgd", "adamw")
POLICIES = ("paper", "robust")
K_VALUES = (1, 2, 4, 8, 40)
PHI_VALUES = (1, 2, 4, 8, 16)
TABLE4_PHIS: tuple[int | None, ...] = (None, 8, 4, 2, 1)  # None: never probe (Phi = inf)
TABLE4_K = 2
PROBES_PER_GROUP = 4  # HiDLR's default probe_multipliers (-2, -1, 1, 2)

_MB = 2.0**20


# -- theory ----------------------------------------------------------------------------------


def paper_bound(k: int, phi: float) -> float:
    """The paper's lower bound on the relative speed: ``1 / (1 + 4K / (3 Phi))`` (B = 2F, C = 0)."""
    return 1.0 / (1.0 + PROBES_PER_GROUP * k / (3.0 * phi))


def forwards_per_probe_step(k: int, policy: str) -> int:
    """Forward passes of one probe step: ``4K``, plus the combined step's (robust, K >= 2)."""
    return PROBES_PER_GROUP * k + (1 if policy == "robust" and k >= 2 else 0)


def implementation_limit(
    base_step: float, forward: float, k: int, phi: float, policy: str
) -> float:
    """The relative speed with nothing but the probes' forward passes added to a base step:
    ``base_step / (base_step + n_fwd / Phi * forward)``."""
    return base_step / (base_step + forwards_per_probe_step(k, policy) / phi * forward)


# -- workloads -------------------------------------------------------------------------------


class BNConvNet(nn.Module):
    """``blocks`` conv3x3-BatchNorm-ReLU blocks at constant width, global pooling, a linear head
    (4 parameter tensors per block)."""

    def __init__(self, in_channels: int, channels: int, blocks: int, n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Workload:
    """A model with fixed batches; ``loss(i)`` is the cross-entropy on batch ``i``."""

    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    description: str
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def loss(self, i: int = 0, fraction: float = 1.0) -> torch.Tensor:
        x, y = self.batches[i]
        if fraction < 1.0:
            keep = max(1, math.ceil(fraction * x.shape[0]))
            x, y = x[:keep], y[:keep]
        return nn.functional.cross_entropy(self.model(x), y)

    def reset(self) -> None:
        """Back to the initial weights and buffers (in place)."""
        self.model.load_state_dict(self.initial)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def make_workload(name: str, *, size: str = "full", n_batches: int = 1, seed: int = 0) -> Workload:
    """The benchmark's model ``name`` (``mlp``, ``transformer`` or ``cnn``) with random data.

    ``size="full"``: a training step of 10-30 ms on one CPU thread; ``"tiny"``: for tests.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n_classes = 3 if tiny else 10
    model: nn.Module
    if name == "mlp":
        width, batch = (8, 4) if tiny else (320, 128)
        model = MLP([width] * 20 + [n_classes])
        shape: tuple[int, ...] = (batch, width)
        desc = f"MLP 20 linear layers x {width}, batch {batch}"
    elif name == "transformer":
        d, heads, seq, batch, vocab = (8, 2, 4, 2, 20) if tiny else (64, 4, 32, 48, 1000)
        model = TokenTransformer(vocab, n_classes, d_model=d, heads=heads, layers=3, max_len=seq)
        shape = (batch, seq)
        desc = f"pre-norm encoder 3 layers d={d} heads={heads}, batch {batch} x {seq} tokens"
    else:
        channels, side, batch = (2, 4, 2) if tiny else (20, 16, 32)
        model = BNConvNet(3, channels, 10, n_classes)
        shape = (batch, 3, side, side)
        desc = f"10 conv-BN-ReLU blocks x {channels} ch, batch {batch} x 3x{side}x{side}"
    batches = []
    for _ in range(n_batches):
        if name == "transformer":
            x = torch.randint(0, vocab, shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen)
        batches.append((x, torch.randint(0, n_classes, (shape[0],), generator=gen)))
    model.train()
    return Workload(name, model, batches, desc)


def split_groups(params: Sequence[nn.Parameter], k: int) -> list[list[nn.Parameter]]:
    """``params`` in order, cut into ``k`` contiguous groups whose sizes (in tensors) differ by
    at most one, the larger ones first."""
    params = list(params)
    if not 1 <= k <= len(params):
        raise ValueError(f"k must be between 1 and the number of tensors {len(params)}, got {k}")
    size, extra = divmod(len(params), k)
    groups, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        groups.append(params[start:end])
        start = end
    return groups


def make_base(name: str, groups: list[list[nn.Parameter]]) -> Optimizer:
    """The base optimizer ``name`` (``sgd``: lr 1e-2; ``adamw``: lr 1e-3, weight decay 0.01)
    over ``groups``, each a param group; torch's default implementation otherwise."""
    param_groups: list[dict[str, Any]] = [{"params": g} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=1e-3, weight_decay=0.01)
    raise ValueError(f"base must be one of {BASES}, got {name!r}")


def trainable_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of one copy of ``params``."""
    return sum(p.numel() * p.element_size() for p in params)


def snapshot_bytes(optimizer: HiDLR) -> int:
    """Bytes of the copy a probe step of ``optimizer`` would take now: every parameter of a
    param group that has a gradient (a frozen group has none)."""
    return trainable_bytes(
        [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    )


# -- measurement primitives ------------------------------------------------------------------


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
                elif arm.kind == "hidlr":
                    arm.plain.append(dt)
    finally:
        gc.enable()
    return statistics.fmean(times)


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
            HiDLR(make_base(base, groups), update_every=phi, policy=policy),
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
        timeline: list[tuple[_Arm, float]] = [(arm, _run_arm(w, arm)) for arm in seq]
        for pos, (arm, t) in enumerate(timeline):
            arm.samples.append(t)
            if arm.kind != "hidlr":
                continue
            before = next(s for a, s in reversed(timeline[:pos]) if a is base_arm)
            after = next(s for a, s in timeline[pos + 1 :] if a is base_arm)
            arm.ratios.append(0.5 * (before + after) / t)
    base_t, fwd_t = _median(base_arm.samples), _median(fwd_arm.samples)
    records = []
    for arm in arms:
        pooled = [a for a in arms if a.policy == arm.policy]
        probe_t = _median([t for a in pooled for t in a.probe])
        plain_t = _median([t for a in pooled for t in a.plain])
        probe_net = _median([t for a in pooled for t in a.probe_net])
        probe_fwd = _median([t for a in pooled for t in a.probe_forward])
        n_fwd = forwards_per_probe_step(k, arm.policy)
        speed = _median(arm.ratios)
        limit = implementation_limit(base_t, fwd_t, k, arm.phi, arm.policy)
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
                    (phi, policy, HiDLR(make_base(base, groups), update_every=phi, policy=policy))
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
    hid = HiDLR(make_base(base, groups), update_every=2, policy=policy)
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
        (HiDLR, "_diagonal_rates", "fit + rate policy"),
        (optimizer, "propose_rates", "fit + rate policy"),
        (optimizer, "step_scale", "fit + rate policy"),
        (optimizer, "coupling_ratio", "fit + rate policy"),
        (optimizer, "_exchange", "exchanges (pointer or XOR swaps)"),
        (probing, "_exchange", "exchanges (pointer or XOR swaps)"),
        (probing.GroupMover, "move", "moves (lerp, copy)"),
        (probing.GroupMover, "finish", "moves (lerp, copy)"),
        (probing.BufferGuard, "_hook", "buffer guard (hooks, restore)"),
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
    hid = HiDLR(make_base(base, groups), update_every=1, policy=policy)
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
    base_step: float, forward: float, bookkeeping: float, n_fwd: int, phi: float
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
            "within_3pct_of_limit": sum(c >= 0.97 for c in closeness),
            "configs": len(closeness),
            "above_paper_bound": sum(r["speed"] >= r["paper_bound"] for r in rows),
            "median_expected_speed_vs_limit": statistics.median(expected),
            "expected_within_3pct_of_limit": sum(e >= 0.97 for e in expected),
        }
    return out


# -- output ----------------------------------------------------------------------------------


def format_overhead(result: dict[str, Any]) -> str:
    """Plain-text tables: relative speed against the limit and the paper's bound per K and Phi,
    the memory comparison, Table 4 and the top of the probe-step profile."""
    cfg = result["config"]
    lines = [
        f"Hi-DLR overhead: torch {cfg['torch']}, {cfg['threads']} thread(s), "
        f"{cfg['repeats']} interleaved repeats (medians; the machine was shared, timings are noisy)",
    ]
    phis = cfg["phi"]
    if result["speed"]:
        lines.append("")
        lines.append("paper's lower bound 1/(1 + 4K/(3 Phi)):")
        lines.append(f"{'K':>4} | " + " ".join(f"{'Phi=' + str(p):>9}" for p in phis))
        for k in cfg["K"]:
            lines.append(f"{k:>4} | " + " ".join(f"{paper_bound(k, p):>9.3f}" for p in phis))
        lines.append("")
        lines.append(
            "relative speed base/HiDLR, measured / limit (limit = S / (S + n_fwd/Phi * F)); "
            "last column: bookkeeping per probe step"
        )
    blocks: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["speed"]:
        blocks.setdefault((r["model"], r["base"], r["policy"]), []).append(r)
    for (model, base, policy), rows in blocks.items():
        first = rows[0]
        plain = statistics.median(r["plain_step_s"] / r["base_step_s"] - 1 for r in rows)
        lines.append("")
        lines.append(
            f"{model} + {base}, policy={policy}: base step S={1e3 * first['base_step_s']:.1f} ms, "
            f"forward F={1e3 * first['forward_s']:.1f} ms (F/S={first['forward_s'] / first['base_step_s']:.2f}), "
            f"HiDLR plain step {plain:+.1%}"
        )
        lines.append(
            f"{'K':>4} | " + " ".join(f"{'Phi=' + str(p):>11}" for p in phis) + " | bookkeeping"
        )
        for k in cfg["K"]:
            by_phi = {r["phi"]: r for r in rows if r["K"] == k}
            if not by_phi:
                continue
            cells = [
                f"{by_phi[p]['speed']:.2f}/{by_phi[p]['limit']:.2f}".rjust(11)
                if p in by_phi
                else " " * 11
                for p in phis
            ]
            book = next(iter(by_phi.values()))
            lines.append(
                f"{k:>4} | "
                + " ".join(cells)
                + f" | {1e3 * book['bookkeeping_per_probe_step_s']:6.2f} ms"
            )
    if result.get("summary"):
        lines.append("")
        for policy, s in result["summary"].items():
            lines.append(
                f"[{policy}] measured/limit: median {s['median_speed_vs_limit']:.3f}, "
                f"worst {s['min_speed_vs_limit']:.3f}, within 3% in "
                f"{s['within_3pct_of_limit']}/{s['configs']}; at or above the paper's bound in "
                f"{s['above_paper_bound']}/{s['configs']}; from the bookkeeping timed inside probe "
                f"steps: median {s['median_expected_speed_vs_limit']:.3f}, within 3% in "
                f"{s['expected_within_3pct_of_limit']}/{s['configs']}"
            )
    if result["table4"]:
        lines.append("")
        lines.append("Table 4 (K=2): time per epoch, relative speed to the base optimizer")
        lines.append(
            f"{'model':<12} {'base':<6} {'policy':<7} {'Phi':>4} {'epoch s':>9} {'speed':>7} {'paper':>7}"
        )
        for r in result["table4"]:
            phi = "inf" if r["phi"] is None else str(r["phi"])
            lines.append(
                f"{r['model']:<12} {r['base']:<6} {r['policy']:<7} {phi:>4} {r['epoch_s']:>9.3f} "
                f"{r['relative_speed']:>7.3f} {r['paper_bound']:>7.3f}"
            )
    if result["memory"]:
        lines.append("")
        lines.append(
            "memory (MB above what was live at the step's start; K=2, Phi=2): "
            "peak of the whole training step and of optimizer.step alone"
        )
        lines.append(
            f"{'model':<12} {'base':<6} {'params':>7} {'snap':>7} | {'step:base':>9} "
            f"{'probe':>7} {'plain':>7} {'extra':>7} | {'opt.step extra probe':>20} "
            f"{'plain':>6} | {'retained':>8} | {'RSS base/probe':>15}"
        )
        for m in result["memory"]:
            rss = (
                f"{m['rss_growth_base'] / _MB:.1f}/{m['rss_growth_hidlr_probe'] / _MB:.1f}"
                if m["rss_growth_base"] is not None and m["rss_growth_hidlr_probe"] is not None
                else "n/a"
            )
            extra = m["opt_step_extra_probe"]
            lines.append(
                f"{m['model']:<12} {m['base']:<6} {m['param_bytes'] / _MB:>7.2f} "
                f"{m['snapshot_bytes'] / _MB:>7.2f} | {m['step_peak_base'] / _MB:>9.2f} "
                f"{m['step_peak_hidlr_probe'] / _MB:>7.2f} {m['step_peak_hidlr_plain'] / _MB:>7.2f} "
                f"{m['step_extra_probe'] / _MB:>7.2f} | "
                f"{extra / _MB:>9.2f} ({extra / max(m['param_bytes'], 1):5.3f}x) "
                f"{m['opt_step_extra_plain'] / _MB:>6.2f} | "
                f"{m['retained_extra_probe'] / _MB:>8.2f} | {rss:>15}"
            )
    if result["profile"]:
        profiles = result["profile"]
        lines.append("")
        lines.append(
            "probe step (optimizer.step with its closure) broken down, ms, median of "
            f"{len(profiles) and 3} probe steps; base {profiles[0]['base']}, policy "
            f"{profiles[0]['policy']}"
        )
        heads = [f"{p['model'][:5]} K={p['K']}" for p in profiles]
        lines.append(f"{'':<32}" + " ".join(f"{h:>13}" for h in heads))
        keys = list(dict.fromkeys(key for p in profiles for key in p["breakdown_ms"]))
        keys.sort(key=lambda key: (key == "total", key.startswith("other")))
        for key in keys:
            lines.append(
                f"{key:<32}"
                + " ".join(f"{p['breakdown_ms'].get(key, 0.0):>13.2f}" for p in profiles)
            )
        bookkeeping = [
            p["breakdown_ms"]["total"]
            - p["breakdown_ms"].get("forward passes (closure)", 0.0)
            - p["breakdown_ms"].get("base optimizer step", 0.0)
            for p in profiles
        ]
        lines.append(f"{'= bookkeeping':<32}" + " ".join(f"{b:>13.2f}" for b in bookkeeping))
        for p in profiles[-1:]:
            lines.append(f"top torch ops ({p['model']}, K={p['K']}), self CPU ms per probe step:")
            for row in p["ops"][:8]:
                lines.append(f"  {row['self_ms']:8.3f} ms {row['calls']:7.0f}x  {row['op']}")
    if result.get("probe_options"):
        from hidlr.experiments.probe_options import format_probe_options

        lines.append("")
        lines.append(format_probe_options(result["probe_options"]))
    return "\n".join(lines)


def plot_overhead(result: dict[str, Any], path: str | Path) -> Path:
    """Relative speed against Phi, one line per K (measured: solid, limit: dashed, the paper's
    bound: dotted), a panel per (model, base optimizer) and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    combos = list(dict.fromkeys((r["model"], r["base"]) for r in result["speed"]))
    policies = list(dict.fromkeys(r["policy"] for r in result["speed"]))
    fig, axes = plt.subplots(
        len(combos),
        len(policies),
        figsize=(4.5 * len(policies), 3.2 * len(combos)),
        squeeze=False,
        sharey=True,
    )
    colors = plt.get_cmap("viridis")
    ks = cfg["K"]
    for i, (model, base) in enumerate(combos):
        for j, policy in enumerate(policies):
            ax = axes[i][j]
            for n, k in enumerate(ks):
                rows = sorted(
                    (
                        r
                        for r in result["speed"]
                        if (r["model"], r["base"], r["policy"], r["K"]) == (model, base, policy, k)
                    ),
                    key=lambda r: r["phi"],
                )
                if not rows:
                    continue
                c = colors(n / max(len(ks) - 1, 1))
                x = [r["phi"] for r in rows]
                ax.plot(x, [r["speed"] for r in rows], "o-", color=c, label=f"K={k}")
                ax.plot(x, [r["limit"] for r in rows], "--", color=c, alpha=0.8)
                ax.plot(x, [r["paper_bound"] for r in rows], ":", color=c, alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["phi"], [str(p) for p in cfg["phi"]])
            ax.minorticks_off()
            ax.set_title(f"{model} + {base}, {policy}", fontsize=9)
            ax.set_xlabel("Phi (update_every)")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("speed vs base")
    axes[0][0].legend(fontsize=7, title="solid: measured\n--: limit, ..: paper", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
