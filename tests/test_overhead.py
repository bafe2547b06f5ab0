"""The overhead benchmark: its formulas, its accounting and one tiny end-to-end run.

Nothing here asserts a timing: only that the measurements are well formed."""

import json
import math

import pytest
import torch
from torch import nn

from hidlr import HiDLR
from hidlr.experiments.overhead import expected_speed_vs_limit, run_overhead
from hidlr.experiments.overhead_breakdown import _memory, allocation_peak
from hidlr.experiments.overhead_report import format_overhead
from hidlr.experiments.overhead_workloads import (
    MODELS,
    Workload,
    forwards_per_probe_step,
    implementation_limit,
    make_base,
    make_workload,
    paper_bound,
    snapshot_bytes,
    split_groups,
)
from hidlr.experiments.probe_options import VARIANTS, ProbeVariant


def test_paper_bound_and_forward_count():
    assert paper_bound(2, 8) == pytest.approx(0.75)  # the paper's K=2, Phi=8 example
    assert paper_bound(1, 1) == pytest.approx(3 / 7)
    assert paper_bound(40, 16) == pytest.approx(1 / (1 + 160 / 48))
    assert forwards_per_probe_step(1, "paper") == 4
    assert forwards_per_probe_step(1, "robust") == 5  # the measured loss at w0
    assert forwards_per_probe_step(2, "paper") == 8
    assert forwards_per_probe_step(2, "robust") == 10  # and the combined step's extra probe


def test_implementation_limit():
    # S = 3 ms, F = 1 ms, K = 2, Phi = 8: 8 forwards every 8 steps -> 3 / (3 + 1)
    assert implementation_limit(3.0, 1.0, 2, 8, "paper") == pytest.approx(0.75)
    assert implementation_limit(3.0, 1.0, 2, 10, "robust") == pytest.approx(0.75)  # 10 forwards
    # with B = 2F and C = 0 the limit is the paper's bound
    assert implementation_limit(3.0, 1.0, 4, 2, "paper") == pytest.approx(paper_bound(4, 2))
    # the forward passes a probe step really made (a group not probed: 4 fewer)
    assert implementation_limit(3.0, 1.0, 2, 8, "paper", forwards=4) == pytest.approx(6 / 7)


def test_within_3pct_of_the_limit_counts_both_sides():
    from hidlr.experiments.overhead import _summary

    rows = [
        {
            "policy": "paper",
            "speed_vs_limit": c,
            "expected_speed_vs_limit": 0.99,
            "speed": 1.0,
            "paper_bound": 0.5,
        }
        for c in (0.98, 1.02, 1.10, 0.90)
    ]
    summary = _summary({"config": {"policies": ["paper"]}, "speed": rows})["paper"]
    assert summary["within_3pct_of_limit"] == 2  # 1.10 is above the limit: something miscounted


def test_expected_speed_vs_limit():
    assert expected_speed_vs_limit(3.0, 1.0, 0.0, 8, 8) == 1.0
    # a cycle of 8 steps of 3 plus 8 forwards of 1 is 32; 0.32 of bookkeeping costs 1%
    assert expected_speed_vs_limit(3.0, 1.0, 0.32, 8, 8) == pytest.approx(32 / 32.32)


def test_split_groups_contiguous_and_balanced():
    params = [nn.Parameter(torch.zeros(i + 1)) for i in range(42)]
    groups = split_groups(params, 40)
    assert [len(g) for g in groups] == [2, 2] + [1] * 38
    assert [p for g in groups for p in g] == params
    assert len(split_groups(params, 1)) == 1
    with pytest.raises(ValueError, match="between 1 and"):
        split_groups(params, 43)


@pytest.mark.parametrize("name", MODELS)
def test_workloads_have_enough_tensors_for_k40(name):
    w = make_workload(name, size="tiny", n_batches=2)
    assert len(w.params) >= 40
    assert math.isfinite(w.loss(1).item())
    before = [p.detach().clone() for p in w.params]
    with torch.no_grad():
        for p in w.params:
            p.add_(1.0)
    w.reset()
    assert all(torch.equal(a, b) for a, b in zip(before, w.params, strict=True))


def test_snapshot_bytes_counts_parameters_with_gradients():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2).double())
    model[0].bias.requires_grad_(False)
    opt = HiDLR(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert snapshot_bytes(opt) == 0  # no gradient yet: nothing to snapshot
    x = torch.randn(5, 3)
    model[2](model[1](model[0](x)).double()).sum().backward()
    assert snapshot_bytes(opt) == 12 * 4 + (8 + 2) * 8


def test_allocation_peak_sees_cpu_allocations():
    kept = []

    def work():
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # 2000 bytes, while a is alive
        del a, b
        kept.append(torch.empty(250, dtype=torch.float64))  # 2000 bytes, kept

    peak, net = allocation_peak(work)
    assert peak == 6000
    assert net == 2000


def test_memory_extra_of_a_probe_step_is_the_snapshot():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
    batch = (torch.randn(4, 128), torch.randint(0, 3, (4,)))
    w = Workload("mlp", model, [batch], "test")
    m = _memory(w, "sgd", "robust")
    params = (128 * 128 + 128 + 128 * 3 + 3) * 4
    assert m["param_bytes"] == m["snapshot_bytes"] == params
    # the probe step's optimizer.step holds the snapshot beside the base step or a forward,
    # plus a few small tensors (the saved RNG state, the probes' losses) and, on the first
    # probe steps, one chunk of scratch for the gradient's own slope (here the largest weight)
    from hidlr._own_batch import STEP_DOT_CHUNK

    scratch = min(128 * 128, STEP_DOT_CHUNK) * 4
    assert params <= m["opt_step_extra_probe"] <= params + scratch + 16 * 1024
    # a plain step holds only the gradient watch's norms: one float32 scalar per parameter
    # tensor, their stack and the total
    watch = 2 * 4 * len(list(model.parameters())) + 4
    assert 0 < m["opt_step_extra_plain"] <= watch + 16 and m["step_extra_plain"] <= watch + 16
    assert m["retained_extra_probe"] == m["retained_extra_plain"] == 0


def test_make_base_rejects_unknown():
    groups = split_groups([nn.Parameter(torch.zeros(2))], 1)
    assert isinstance(make_base("adamw", groups), torch.optim.AdamW)
    with pytest.raises(ValueError, match="base must be"):
        make_base("lion", groups)


def test_run_overhead_end_to_end(tmp_path):
    ks, phis = (1, 2), (1, 2)
    result = run_overhead(
        tmp_path,
        quick=True,
        size="tiny",
        bases=("sgd",),
        ks=ks,
        phis=phis,
        repeats=1,
        table4_phis=(None, 2, 1),
        table4_repeats=1,
        epoch_batches=2,
        plot=False,
    )
    assert set(result) >= {
        "config",
        "workloads",
        "speed",
        "table4",
        "memory",
        "profile",
        "probe_options",
    }
    options = result["probe_options"]
    assert [r["variant"] for r in options["speed"]] == [v.name for v in VARIANTS]
    for r in options["speed"]:
        assert 0 < r["limit"] < 1 and r["speed"] > 0
    assert [b["model"] for b in options["batched"]] == ["mlp", "transformer", "cnn"]
    assert "error" in options["batched"][2]  # BatchNorm's running statistics cannot be vmapped
    assert options["batched"][0]["same_losses"] is True
    assert [m["model"] for m in options["inference_mode"]] == ["mlp", "transformer", "cnn"]
    assert all(m["no_grad_s"] > 0 and m["inference_mode_s"] > 0 for m in options["inference_mode"])
    assert options["quality"]["variants"][0]["valid_loss_vs_default"] == 1.0
    assert result["config"]["threads"] == 1
    assert len(result["speed"]) == len(ks) * len(phis) * 2  # two policies
    keys = {
        "model",
        "base",
        "K",
        "phi",
        "policy",
        "forwards_per_probe_step",
        "forwards_planned",
        "base_step_s",
        "forward_s",
        "hidlr_step_s",
        "probe_step_s",
        "plain_step_s",
        "probe_forward_s",
        "bookkeeping_per_probe_step_s",
        "speed",
        "speed_decomposed",
        "limit",
        "paper_bound",
        "speed_vs_limit",
        "speed_vs_paper_bound",
        "repeats",
        "expected_speed_vs_limit",
    }
    for r in result["speed"]:
        assert set(r) == keys
        for key in ("base_step_s", "forward_s", "hidlr_step_s", "speed", "limit"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 0 < r["limit"] < 1
        assert r["paper_bound"] == pytest.approx(paper_bound(r["K"], r["phi"]))
        assert r["forwards_planned"] == forwards_per_probe_step(r["K"], r["policy"])
        # measured: groups whose step did not move their weights are not probed
        assert 0 < r["forwards_per_probe_step"] <= r["forwards_planned"]
    assert [(r["phi"], r["policy"]) for r in result["table4"]] == [
        (None, "base"),
        (2, "paper"),
        (2, "robust"),
        (1, "paper"),
        (1, "robust"),
    ]
    assert result["table4"][0]["relative_speed"] == 1.0
    assert all(r["epoch_s"] > 0 for r in result["table4"])
    (mem,) = result["memory"]
    assert mem["snapshot_bytes"] == mem["param_bytes"] == result["workloads"]["mlp"]["param_bytes"]
    assert [p["K"] for p in result["profile"]] == [1, 2]
    assert all(p["breakdown_ms"]["total"] > 0 for p in result["profile"])
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["config"]["K"] == list(ks)
    text = format_overhead(result)
    assert (tmp_path / "overhead.txt").read_text() == text + "\n"
    assert "Phi=1" in text and "mlp + sgd, policy=robust" in text
    assert "Table 4" in text and "memory" in text and "bookkeeping" in text
    assert "cheaper probing, speed" in text and "noise floor" in text
    assert text.count("\n") > 20


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from hidlr.experiments.overhead_report import plot_overhead

    row = {
        "model": "mlp",
        "base": "sgd",
        "policy": "paper",
        "K": 1,
        "speed": 0.5,
        "limit": 0.6,
        "paper_bound": 0.43,
    }
    result = {
        "config": {"K": [1], "phi": [1, 2]},
        "speed": [dict(row, phi=1), dict(row, phi=2, speed=0.7)],
    }
    png = plot_overhead(result, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("policy", ["paper", "robust"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_probe_variant_counts_the_forwards_hidlr_runs(variant, policy):
    w = make_workload("mlp", size="tiny")
    k = 3
    opt = HiDLR(
        make_base("sgd", split_groups(w.params, k)),
        policy=policy,
        probe_multipliers=variant.multipliers,
    )
    calls = []

    def closure():
        calls.append(1)
        return w.loss(0, variant.fraction)

    opt.zero_grad()
    w.loss(0).backward()
    opt.step(closure)
    assert len(calls) == variant.forwards(k, policy) == opt.history[0].n_probes
    assert ProbeVariant("x", (-2.0, 0.0, 2.0)).forwards(2, "paper") == 5
