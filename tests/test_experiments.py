"""The experiment machinery: result files, resume, every experiment at a tiny size, reports."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hidlr.experiments import finetune
from hidlr.experiments.paper import EXPERIMENTS
from hidlr.experiments.report import _value, build_report, summarize_experiment
from hidlr.experiments.results import RunSpec, SettingsMismatch, load_results, run_specs
from hidlr.experiments.robustness import (
    GRID_EXTENSIONS,
    REUSABLE,
    edge_jobs,
    format_summary,
    jobs_for,
    run_benchmark,
    summarize,
)
from hidlr.experiments.tasks import SPLITS, TASKS


def test_run_specs_writes_once_and_resumes(tmp_path):
    calls = []

    def runner(spec):
        calls.append(spec.run_id)
        if spec.seed == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # interrupted in the middle of the second run
        return {"value": spec.seed}

    specs = [RunSpec("exp", "m", s) for s in range(3)]
    with pytest.raises(KeyboardInterrupt):
        run_specs(specs, tmp_path, runner)
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["m__seed0.json"]
    run_specs(specs, tmp_path, runner)
    assert calls == ["m__seed0", "m__seed1", "m__seed1", "m__seed2"]  # seed 0 was not redone
    results = load_results(tmp_path)
    assert [r["train"]["value"] for r in results] == [0, 1, 2]
    assert set(results[0]) == {"run", "train", "meta"}
    assert results[0]["meta"]["torch"] and results[0]["run"]["experiment"] == "exp"


def test_run_specs_refuses_a_stored_run_with_other_settings(tmp_path):
    quick = [RunSpec("exp", "m", 0, {"epochs": 30, "grid": (1, 2)})]
    run_specs(quick, tmp_path, lambda spec: {"value": 1})
    run_specs(quick, tmp_path, lambda spec: {"value": 2})  # the same settings: resumed
    assert load_results(tmp_path)[0]["train"]["value"] == 1
    full = [RunSpec("exp", "m", 0, {"epochs": 100, "grid": (1, 2)})]
    with pytest.raises(SettingsMismatch, match=r"\{'epochs': 30\} there, \{'epochs': 100\} now"):
        run_specs(full, tmp_path, lambda spec: {"value": 3})
    assert load_results(tmp_path)[0]["train"]["value"] == 1
    keyed = [RunSpec("exp2", "m", 0, {"lrs": {0: 1e-3, 1: 1e-2}, "x": math.nan})]
    run_specs(keyed, tmp_path, lambda spec: {"value": 4})
    run_specs(keyed, tmp_path, lambda spec: {"value": 5})  # equal settings, as JSON stores them


def tiny(spec):
    cfg = dict(spec.config)
    for key, value in (("epochs", 1), ("steps", 6), ("pretrain_steps", 4)):
        if key in cfg:
            cfg[key] = value
    cfg["max_steps"] = 8
    return dataclasses.replace(spec, config=cfg)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_runs_end_to_end_at_a_tiny_size(name, tmp_path):
    exp = EXPERIMENTS[name]
    if exp.requires() is not None:
        pytest.skip(f"its data is not installed: {exp.requires()}")
    specs = exp.specs(True, 1)
    picked = (
        specs[:2]
        + [s for s in specs if s.method.endswith(("hi_dlr", "Hi-DLR", "hidlr_budget2"))][:1]
    )
    paths = run_specs([tiny(s) for s in picked], tmp_path, exp.run)
    assert all(p.exists() for p in paths)
    for result in load_results(tmp_path):
        assert name == "figure2" or math.isfinite(_value(result, exp.metric))
    report = build_report(tmp_path).read_text()
    assert f"| {name} (" in report and "reproduced?" in report
    assert (tmp_path / f"{name}.png").exists()


def stored(experiment, method, seed, value, grid=None, val=None, **config):
    return {
        "run": {
            "experiment": experiment,
            "method": method,
            "seed": seed,
            "config": {"lr": 0.1, **({"grid": grid} if grid else {}), **config},
        },
        "train": {
            "test_loss": value,
            "test_curve": [value],
            "val_curve": [value if val is None else val],
            "seconds": 1.0,
            "diverged": False,
        },
        "meta": {"wall_seconds": 1.0, "torch": "x", "hidlr": "y", "git": "z"},
    }


def test_report_is_built_from_stored_result_files(tmp_path):
    folder = tmp_path / "nam_synthetic"
    folder.mkdir()
    records = [
        stored("nam_synthetic", "constant_grid_a", 0, 3.0, "constant"),
        stored("nam_synthetic", "constant_grid_b", 0, 2.0, "constant"),
        stored("nam_synthetic", "hi_ulr", 0, 2.5),
        stored("nam_synthetic", "hi_dlr", 0, 1.0),
    ]
    for i, r in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(r))
    summary = summarize_experiment(load_results(tmp_path), "test_auc", False)
    assert summary["ULR (grid)"]["mean"] == 2.0 and summary["ULR (grid)"]["runs"] == 2
    text = build_report(tmp_path).read_text()
    assert "| nam_synthetic (Figures 5, 12, 13) |" in text
    assert "hi_dlr 1 vs ULR (grid) 2, hi_ulr 2.5 | yes |" in text
    (folder / "r3.json").write_text(json.dumps(stored("nam_synthetic", "hi_dlr", 0, 2.2)))
    assert (
        "| no |" in build_report(tmp_path).read_text()
        or "| partly |" in build_report(tmp_path).read_text()
    )


def test_a_grid_point_is_picked_on_validation_and_reported_on_test(tmp_path):
    folder = tmp_path / "nam_synthetic"
    folder.mkdir()
    records = [
        stored("nam_synthetic", "constant_grid_a", 0, 2.0, "constant", val=3.0),
        stored("nam_synthetic", "constant_grid_b", 0, 3.0, "constant", val=1.0),
        stored("nam_synthetic", "hi_dlr", 0, 2.5),
    ]
    for i, r in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(r))
    summary = summarize_experiment(load_results(tmp_path), "test_auc", False, "val_auc")
    assert summary["ULR (grid)"]["mean"] == 3.0  # b: best on validation, worse on test
    assert "hi_dlr 2.5 vs ULR (grid) 3 | yes |" in build_report(tmp_path).read_text()


def test_one_run_at_the_papers_rate_is_not_called_a_grid(tmp_path):
    folder = tmp_path / "moe"
    folder.mkdir()
    records = [
        stored("moe", "ulr", 0, 0.8, "constant", paper_rate=True),
        stored("moe", "hi_dlr", 0, 0.9),
    ]
    for i, r in enumerate(records):
        r["train"]["test_accuracy"] = r["train"]["test_loss"]
        (folder / f"r{i}.json").write_text(json.dumps(r))
    summary = summarize_experiment(load_results(tmp_path), "test_accuracy", True)
    assert set(summary) == {"ULR (paper's rate)", "hi_dlr"}
    text = build_report(tmp_path).read_text()
    assert "hi_dlr 0.9 vs ULR (paper's rate) 0.8 | yes |" in text


def test_the_shared_loop_holds_out_a_validation_split():
    from hidlr.experiments.loop import fit

    torch.manual_seed(0)
    x, xt = torch.randn(100, 3), torch.randn(20, 3)
    data = {"x": x, "y": x.sum(1, keepdim=True), "x_test": xt, "y_test": xt.sum(1, keepdim=True)}
    model = torch.nn.Linear(3, 1)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    cfg = {"base": "sgd", "epochs": 2, "batch_size": 40, "lr": 0.1, "val_fraction": 0.2}
    out = fit(
        model,
        [{"params": list(model.parameters())}],
        "constant",
        cfg,
        data,
        torch.nn.functional.mse_loss,
    )
    assert len(out["val_curve"]) == 2 and out["steps"] == 4  # 80 training rows: 2 batches of 40
    assert 100 not in seen and 80 in seen and 20 in seen  # the full train set, test and validation
    held = x[80:]
    with torch.no_grad():
        assert out["val_curve"][-1] == pytest.approx(
            torch.nn.functional.mse_loss(model(held), held.sum(1, keepdim=True)).item()
        )


def test_report_needs_result_files_and_skips_other_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result files in"):
        build_report(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "summary.json").write_text(json.dumps({"tasks": {}}))
    (tmp_path / "nam_synthetic").mkdir()
    (tmp_path / "nam_synthetic" / "r.json").write_text(
        json.dumps(stored("nam_synthetic", "hi_dlr", 0, 1.0))
    )
    assert [r["run"]["method"] for r in load_results(tmp_path)] == ["hi_dlr"]
    assert "nam_synthetic" in build_report(tmp_path).read_text()


def test_verdicts_compare_like_with_like_and_a_diverged_seed_ranks_last(tmp_path):
    folder = tmp_path / "nam_synthetic"
    folder.mkdir()
    records = [
        stored("nam_synthetic", "constant_grid_a", 0, 2.0, "constant"),
        stored("nam_synthetic", "hi_ulr", 0, 1.5),
        stored("nam_synthetic", "hi_dlr", 0, 1.8),
        stored("nam_synthetic", "hi_ulr_paper", 0, 1.2),
        stored("nam_synthetic", "hi_dlr_paper", 0, 1.0),
    ]
    for i, r in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(r))
    text = build_report(tmp_path).read_text()
    assert (
        "| hi_dlr 1.8 vs ULR (grid) 2, hi_ulr 1.5; paper policy: hi_dlr_paper 1 vs ULR (grid) 2, "
        "hi_ulr_paper 1.2 | partly (paper policy: yes) |"
    ) in text
    survivor, lost = (
        stored("nam_synthetic", "hi_dlr", 1, 0.5),
        stored("nam_synthetic", "hi_dlr", 2, 0.5),
    )
    lost["train"]["diverged"] = True
    (folder / "r5.json").write_text(json.dumps(survivor))
    (folder / "r6.json").write_text(json.dumps(lost))
    summary = summarize_experiment(load_results(tmp_path), "test_auc", False)
    assert summary["hi_dlr"]["mean"] == math.inf and summary["hi_dlr"]["diverged"] == 1


@pytest.mark.skipif(
    EXPERIMENTS["fashion_mnist"].requires() is not None, reason="Fashion-MNIST not installed"
)
@pytest.mark.parametrize("role", ["bias", "norm"])
def test_fashion_two_group_variants_build(role):
    from hidlr.experiments import image

    spec = tiny(
        RunSpec(
            "fashion_mnist",
            f"hidlr_{role}",
            0,
            {"pretrain_steps": 2, "steps": 2, "n_train": 256, "lr": 1e-3},
        )
    )
    out = image.run(spec)
    assert out["groups"] == [role, "rest"] and len(out["final_lrs"]) == 2


@pytest.mark.parametrize("conv_bias", [True, False])
def test_small_cnn_without_conv_biases_has_no_parameter_the_training_loss_ignores(conv_bias):
    # a conv bias right before BatchNorm is cancelled in training mode: its gradient is
    # rounding noise, which Adam turns into full-size steps (the image experiment's models
    # leave those biases out)
    from hidlr.experiments.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(5, conv_bias=conv_bias)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 5, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    ignored = [n for n, p in model.named_parameters() if p.grad.abs().max().item() < 1e-4 * scale]
    assert ignored == (["body.0.bias", "body.4.bias"] if conv_bias else [])


def test_finetune_methods_train_what_they_claim():
    spec = tiny(
        RunSpec(
            "peft_autofreeze",
            "lora",
            0,
            {"pretrain_steps": 5, "steps": 5, "n_train": 64, "lr": 3e-3},
        )
    )
    lora = finetune.run_inline(spec)
    bitfit = finetune.run_inline(dataclasses.replace(spec, method="bitfit"))
    full = finetune.run(dataclasses.replace(spec, method="full"))  # in its own process
    assert full["peak_rss_mib"] > 50
    assert full["trainable_end"] == full["params_total"]
    assert bitfit["trainable_end"] < 0.1 * bitfit["params_total"]
    assert lora["trainable_end"] < 0.1 * lora["params_total"]
    assert full["training_state_bytes"] > 10 * bitfit["training_state_bytes"]


def test_robustness_benchmark_tiny(tmp_path):
    path = run_benchmark(
        tmp_path, tasks=["logistic_wide"], seeds=(0,), sweep=False, steps_scale=0.05, workers=1
    )
    summary = summarize(path)
    row = summary["tasks"]["logistic_wide"]
    # 7 points, and one more at a time past an edge where the best lies (at most a decade)
    assert row["grid_runs"] == row["grid_points"] >= 7
    assert not row["grid_best_at_edge"] or row["grid_points"] == 7 + GRID_EXTENSIONS
    assert set(row["methods"]) == {
        "prodigy",
        "dadaptation",
        "dog",
        "gen",
        "hidlr",
    }
    assert all(m["ratio"] > 0 for m in row["methods"].values())
    text = format_summary(summary)
    assert "logistic_wide" in text and "Hi-DLR within 5%" in text
    assert "initial-rate sweep not run" in text and "sweep within 10%" not in text
    n_lines = len(path.read_text().splitlines())
    run_benchmark(
        tmp_path, tasks=["logistic_wide"], seeds=(0,), sweep=False, steps_scale=0.05, workers=1
    )
    assert len(path.read_text().splitlines()) == n_lines  # resumed: nothing ran twice


def test_robustness_benchmark_reuses_what_does_not_depend_on_hidlr(tmp_path):
    source, screen = tmp_path / "source", tmp_path / "screen"
    tiny = dict(tasks=["logistic_wide"], seeds=(0,), sweep=False, steps_scale=0.05, workers=1)
    run_benchmark(source, **tiny)
    ran = []
    path = run_benchmark(
        screen, probe_batch="same", reuse=source, progress=lambda i, n, r: ran.append(r), **tiny
    )
    assert sorted(r["method"] for r in ran) == ["gen", "hidlr"]  # nothing else was run again
    records = [json.loads(line) for line in path.read_text().splitlines()]
    copied = {r["key"]: r for r in records if r["method"] in REUSABLE}
    originals = [json.loads(line) for line in (source / "runs.jsonl").read_text().splitlines()]
    assert copied == {r["key"]: r for r in originals if r["method"] in REUSABLE}
    assert {r["method"] for r in copied.values()} == {"constant", "prodigy", "dadaptation", "dog"}
    assert summarize(path)["tasks"]["logistic_wide"]["grid_runs"] >= 7
    run_benchmark(screen, probe_batch="same", reuse=source, **tiny)  # resumed: nothing copied twice
    assert len(path.read_text().splitlines()) == len(records)
    with pytest.raises(SettingsMismatch, match=r"steps_scale 0\.05, not 0\.1"):
        run_benchmark(tmp_path / "other", reuse=source, **{**tiny, "steps_scale": 0.1})
    with pytest.raises(SettingsMismatch, match="is not a results folder"):
        run_benchmark(tmp_path / "other2", reuse=tmp_path / "nowhere", **tiny)


def _record(method, seed, lr, role, val_loss, diverged=False):
    return {
        "key": f"t|{method}|{seed}|{lr}|{role}",
        "role": role,
        "task": "friedman_mlp",
        "method": method,
        "seed": seed,
        "lr": lr,
        "val_loss": val_loss,
        "diverged": diverged,
        "seconds": 0.0,
        "lrs": [],
    }


def test_sweep_spread_is_over_seed_means(tmp_path):
    records = [_record("constant", s, 0.1, "grid", 1.0) for s in (0, 1)]
    records += [
        _record("hidlr", 0, 0.01, "default", 1.0),
        _record("hidlr", 1, 0.01, "default", 1.5),
    ]
    # first seed alone: 1.0 vs 2.0 (100%); means over both seeds: 1.5 vs 1.65 (10%)
    sweep = {(0, 1e-5): 1.0, (1, 1e-5): 2.0, (0, 1e-1): 2.0, (1, 1e-1): 1.3}
    records += [_record("hidlr", s, lr, "sweep", v) for (s, lr), v in sweep.items()]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = summarize(path)["tasks"]["friedman_mlp"]["sweep"]
    assert row["val_losses"] == {1e-5: pytest.approx(1.5), 1e-1: pytest.approx(1.65)}
    assert row["spread"] == pytest.approx(0.1)
    assert row["spread_first_seed"] == pytest.approx(1.0)
    assert row["seed_spread"] == pytest.approx(0.5)
    assert row["seeds"] == 2 and row["diverged"] == 0
    records.append(_record("hidlr", 2, 1e-5, "sweep", 1.4))
    records.append(_record("hidlr", 2, 1e-1, "sweep", math.inf, diverged=True))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = summarize(path)["tasks"]["friedman_mlp"]["sweep"]
    assert row["spread"] == math.inf and row["spread_first_seed"] == pytest.approx(1.0)
    assert row["diverged"] == 1 and row["seeds"] == 3


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_grid_grows_past_an_edge_where_its_best_lies(tmp_path):
    grid = {0.01: 1.0, 0.0215443: 1.2, 0.0464159: 1.5}  # best at the low edge
    records = [_record("constant", s, lr, "grid", v) for lr, v in grid.items() for s in (0, 1)]
    path = _write(tmp_path / "runs.jsonl", records)
    jobs = edge_jobs(path, ["friedman_mlp"], (0, 1))
    assert [(j.method, j.seed, j.role) for j in jobs] == [
        ("constant", 0, "grid"),
        ("constant", 1, "grid"),
    ]
    assert jobs[0].lr == pytest.approx(10 ** (-7 / 3)) and jobs[0].key.endswith("|0.00464159|grid")
    assert edge_jobs(path, ["friedman_mlp"], (0, 1, 2)) == []  # seed 2's grid has not run
    records += [_record("constant", s, 0.00464159, "grid", 1.1) for s in (0, 1)]
    path = _write(path, records)
    assert edge_jobs(path, ["friedman_mlp"], (0, 1)) == []  # bracketed now
    row = summarize(path)["tasks"]["friedman_mlp"]
    assert row["grid_best_lr"] == 0.01 and not row["grid_best_at_edge"] and row["grid_points"] == 4
    high = [_record("constant", s, lr, "grid", 2.0 - v) for lr, v in grid.items() for s in (0, 1)]
    (job,) = edge_jobs(_write(path, high), ["friedman_mlp"], (0,))
    assert job.lr == pytest.approx(0.1)  # best at the high edge: the next point up
    assert summarize(path)["tasks"]["friedman_mlp"]["grid_best_at_edge"]
    assert "0.046* " in format_summary(summarize(path))


def test_a_run_that_ends_above_its_start_counts_with_its_loss_not_as_diverged(tmp_path):
    records = [_record("constant", 0, 0.1, "grid", 1.0)]
    records += [_record("dog", 0, 1.0, "free", 3.0, diverged=True)]  # stalled: finite, flagged
    records += [_record("prodigy", 0, 1.0, "free", math.inf, diverged=True)]
    records += [_record("hidlr", 0, 0.01, "default", 1.0)]
    records[-1]["train_curve"] = [2.0, 9.0, 1.0]  # blew up 4.5x on the way and recovered
    records[-1]["seconds"], records[0]["seconds"] = 3.0, 2.0
    summary = summarize(_write(tmp_path / "runs.jsonl", records))
    methods = summary["tasks"]["friedman_mlp"]["methods"]
    assert methods["dog"]["ratio"] == 3.0 and (
        methods["dog"]["diverged"],
        methods["dog"]["stalled"],
    ) == (0, 1)
    assert methods["prodigy"]["ratio"] == math.inf and methods["prodigy"]["diverged"] == 1
    assert methods["hidlr"]["rise"] == 4.5 and methods["hidlr"]["time_ratio"] == 1.5
    assert summary["summary"]["all"]["hidlr_largest_rise"] == 4.5
    text = format_summary(summary)
    assert "3.000S1" in text and "infD1" in text and "largest training-loss rise 4.5x" in text


def test_summary_reports_the_rates_along_the_default_runs(tmp_path):
    records = [_record("constant", 0, 0.1, "grid", 1.0)]
    for seed, scale in ((0, 1.0), (1, 4.0)):
        run = _record("hidlr", seed, 0.01, "default", 1.0)
        run["lrs"] = [[scale * 0.01 * (i + 1), 0.5] for i in range(9)]  # 9 records
        records.append(run)
    row = summarize(_write(tmp_path / "runs.jsonl", records))["tasks"]["friedman_mlp"]
    info = row["hidlr_rates"]
    assert info["steps"] == [0, 20, 40, 60, 80]  # records 0, 2, 4, 6, 8 (every 10 steps)
    # geometric mean over the seeds: 2x the first seed's
    assert info["rates"][0] == pytest.approx([0.02 * (i + 1) for i in (0, 2, 4, 6, 8)])
    assert info["rates"][1] == pytest.approx([0.5] * 5)


def test_sweep_compares_only_seeds_every_initial_rate_has(tmp_path):
    from hidlr.experiments.robustness import _spread

    records = [_record("constant", 0, 0.1, "grid", 1.0)]
    records += [_record("hidlr", 0, 1e-5, "sweep", 9.0)]  # seed 0 ran one initial rate only
    records += [_record("hidlr", 1, lr, "sweep", v) for lr, v in ((1e-5, 1.0), (1e-1, 1.2))]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = summarize(path)["tasks"]["friedman_mlp"]["sweep"]
    assert row["seeds"] == 1 and row["val_losses"] == {1e-5: 1.0, 1e-1: 1.2}
    assert row["spread"] == pytest.approx(0.2) and row["spread_first_seed"] == pytest.approx(0.2)
    assert math.isnan(row["seed_spread"])  # no default runs to compare with
    assert _spread([0.0, 1.0]) == math.inf and _spread([0.0, 0.0]) == 0.0
    assert _spread([-1.0, -0.8]) == pytest.approx(0.2)  # a loss below zero: 0.2 above -1
    assert math.isnan(_spread([1.0]))


def test_benchmark_settings_compare_as_they_read_back():
    from hidlr.experiments.robustness import _settings

    plain = _settings(None, "next", "constant", 1)
    assert _settings({"policy": "robust", "update_every": 4}, "next", "constant", 1.0) == plain
    tupled = _settings({"probe_multipliers": (-1, 1, 2)}, "next", "constant", 1.0)
    assert tupled == json.loads(json.dumps(tupled)) != plain
    assert _settings({"policy": "paper"}, "next", "constant", 1.0)["hidlr_options"] == {
        "policy": "paper"
    }


def test_benchmark_refuses_a_folder_whose_settings_are_unknown(tmp_path):
    from hidlr.experiments.robustness import SettingsMismatch

    (tmp_path / "runs.jsonl").write_text("")
    with pytest.raises(SettingsMismatch, match="does not say with which settings"):
        run_benchmark(tmp_path, tasks=["logistic_wide"])
    assert not (tmp_path / "config.json").exists()


def test_benchmark_refuses_to_mix_settings(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"hidlr_options": {}, "probe_batch": "next", "schedule": "constant", "steps_scale": 1.0}
        )
    )
    with pytest.raises(ValueError, match=r"other settings \(hidlr_options, probe_batch"):
        run_benchmark(
            tmp_path, tasks=["logistic_wide"], hidlr_options={"policy": "paper"}, probe_batch="same"
        )
    assert not (tmp_path / "runs.jsonl").exists()  # refused before running anything


def test_cli_robustness_passes_the_policy(monkeypatch, tmp_path, capsys):
    from hidlr import cli
    from hidlr.experiments import robustness

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)
        raise robustness.SettingsMismatch("stop here")

    monkeypatch.setattr(robustness, "run_benchmark", fake)
    args = ["bench", "robustness", "--out", str(tmp_path), "--policy", "paper", "--no-sweep"]
    assert cli.main(args) == 2
    assert seen["hidlr_options"] == {"policy": "paper"} and seen["sweep"] is False
    assert "stop here" in capsys.readouterr().err
    assert cli.main(args[:-3]) == 2 and seen["hidlr_options"] is None and seen["reuse"] is None
    assert cli.main([*args, "--reuse", "results/robustness"]) == 2
    assert seen["reuse"] == "results/robustness"


def test_tasks_are_well_formed():
    assert len(TASKS) >= 10
    assert {t.split for t in TASKS.values()} == set(SPLITS)
    assert {t.base for t in TASKS.values()} == {"sgd", "momentum", "adam", "adamw"}
    assert (
        min(t.batch_size for t in TASKS.values()) <= 16
        and max(t.batch_size for t in TASKS.values()) >= 512
    )


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_builds_groups_covering_its_model_and_a_finite_scalar_loss(name):
    task = TASKS[name]
    assert len(task.grid) == 7
    if not task.available():  # real data not installed (Fashion-MNIST comes from apt)
        pytest.skip(f"{name}: its data is not installed")
    problem = task.problem(0)
    covered = [p for g in problem.groups for p in g["params"]]
    trainable = [p for p in problem.model.parameters() if p.requires_grad]
    assert len(covered) == len(trainable) and {id(p) for p in covered} == {id(p) for p in trainable}
    x, y = problem.train
    assert len(x) == len(y) >= task.batch_size and len(problem.val[0]) == len(problem.val[1])
    loss = problem.loss_fn(problem.model(x[: task.batch_size]), y[: task.batch_size])
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in trainable)


def test_the_cli_offers_every_split():
    from hidlr import cli

    parser = cli.build_parser()
    for split in (*SPLITS, "all"):
        args = parser.parse_args(["bench", "robustness", "--split", split])
        assert args.split == split
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "robustness", "--split", "nosuchsplit"])


def test_missing_data_gives_the_install_command(tmp_path):
    from hidlr.experiments.data import fashion_mnist

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path)


def _record_probes(monkeypatch) -> list[torch.Tensor]:
    """The example indices of every probe ``train_run`` evaluates, in order."""
    from hidlr.experiments import training

    seen: list[torch.Tensor] = []
    probe_loss = training._probe_loss

    def spy(problem, idx):
        seen.append(idx.clone())
        return probe_loss(problem, idx)

    monkeypatch.setattr(training, "_probe_loss", spy)
    return seen


@pytest.mark.parametrize("probe_batch", ["next", "previous", "same", "both", "deferred"])
def test_train_run_probes_the_chosen_batch(monkeypatch, probe_batch):
    from hidlr.experiments import training

    seen = _record_probes(monkeypatch)
    task = TASKS["logistic_wide"]
    training.train_run(
        task,
        0,
        "hidlr",
        task.grid[3],
        probe_batch=probe_batch,
        steps=6,
        # (on the gradient's own batch the default would look at the next step's closure once)
        hidlr_options={"update_every": 4, "on_own_batch": "warn"},
    )
    n = task.problem(0).train[0].shape[0]
    batches = training._batches(n, task.batch_size, 6, 1000)
    expected = {
        "next": (batches[1], batches[5]),
        "previous": (batches[0], batches[3]),  # step 0 has no previous batch: its own
        "same": (batches[0], batches[4]),
        "both": (torch.cat([batches[0], batches[1]]), torch.cat([batches[4], batches[5]])),
        "deferred": (batches[1], batches[5]),  # probed at steps 1 and 5, with their closures
    }[probe_batch]
    if probe_batch == "deferred":
        # the rollback's blow-up checks, one forward pass each at probe step 4 (its own
        # batch) and at step 5 before its probes; none at steps 0 and 1 (no weights kept yet)
        first = sum(torch.equal(x, batches[1]) for x in seen)
        assert torch.equal(seen[first], batches[4]) and torch.equal(seen[first + 1], batches[5])
        seen = seen[:first] + seen[first + 2 :]
    per_step = len(seen) // 2  # probe steps 0 and 4
    assert len(seen) == 2 * per_step > 0
    assert all(torch.equal(x, expected[0]) for x in seen[:per_step])
    assert all(torch.equal(x, expected[1]) for x in seen[per_step:])


def test_train_run_heldout_probes_never_train_on_the_probe_data(monkeypatch):
    from hidlr.experiments import training

    probed = _record_probes(monkeypatch)
    trained: list[torch.Tensor] = []
    batches = training._batches

    def spy_batches(n, batch_size, steps, seed):
        out = batches(n, batch_size, steps, seed)
        trained.extend(out[:steps])
        return out

    monkeypatch.setattr(training, "_batches", spy_batches)
    task = TASKS["friedman_mlp"]
    training.train_run(
        task,
        0,
        "hidlr",
        task.grid[3],
        probe_batch="heldout",
        steps=9,
        hidlr_options={"update_every": 4},
    )
    n = task.problem(0).train[0].shape[0]
    start = n - n // 10
    assert len(trained) == 9 and all(int(b.max()) < start for b in trained)
    assert probed and all(int(p.min()) >= start and int(p.max()) < n for p in probed)
    assert all(len(p) == task.batch_size for p in probed)
    assert not torch.equal(probed[0], probed[-1])  # a fresh draw at each probe step
    trained.clear()
    training.train_run(task, 0, "constant", task.grid[3], probe_batch="heldout", steps=9)
    assert any(int(b.max()) >= start for b in trained)  # methods that do not probe: all the data
    probed.clear()
    training.train_run(task, 0, "hidlr_sage", task.grid[3], probe_batch="heldout", steps=5)
    assert probed and all(len(p) == task.batch_size and int(p.min()) >= start for p in probed)


def test_greedy_multipliers_are_the_exact_line_search_on_a_linear_model():
    from torch import nn

    from hidlr.experiments.greedy import format_trace, greedy_multipliers
    from hidlr.experiments.tasks import Problem, Task
    from hidlr.experiments.training import _batches

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3

    def build(seed: int) -> Problem:
        torch.manual_seed(seed)
        model = nn.Linear(3, 1).double()
        groups = [
            {"params": [model.weight], "name": "weight"},
            {"params": [model.bias], "name": "bias"},
        ]
        loss = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731
        return Problem(model, groups, (x[:64], y[:64]), (x[64:], y[64:]), loss)

    lr = 0.05
    task = Task("linear", "regression", "sgd", 16, 3, (lr,), "tune", "weight/bias", build)
    trace = greedy_multipliers(task, lr, every=100)
    assert trace.steps == [0, 2] and trace.groups == ["weight", "bias"]
    # closed form at step 0: u = -lr * g on batch 0; along group k the next batch's loss is
    # mean((r + c X_k u_k)^2), minimised at c* = -mean(r * d) / mean(d * d) with d = X_k u_k
    model = build(0).model
    xb, yb = x[:64], y[:64]
    first, nxt = _batches(64, 16, 3, 1000)[:2]
    loss = ((model(xb[first]) - yb[first]) ** 2).mean()
    gw, gb = torch.autograd.grad(loss, [model.weight, model.bias])
    r = (model(xb[nxt]) - yb[nxt]).detach()
    for d, got in (
        (xb[nxt] @ (-lr * gw).T, trace.multipliers[0][0]),
        ((-lr * gb).expand(len(nxt), 1), trace.multipliers[0][1]),
    ):
        assert got == pytest.approx((-(r * d).mean() / (d * d).mean()).item(), rel=1e-9)
    assert trace.multipliers[0][0] > 1.5  # a small rate: the fit asks for a longer step
    assert math.isfinite(trace.val_loss)
    assert "weight" in format_trace(trace).splitlines()[1]


def test_a_schedule_scales_hidlr_and_gen_only():
    from hidlr.experiments.training import build_method

    task = TASKS["logistic_wide"]
    for method in ("hidlr", "gen", "constant"):
        built = build_method(task, task.problem(0), method, 0.1, 10, {}, "cosine")
        if method == "constant":
            assert built.scheduler is None  # the grid keeps its constant rate
            continue
        assert built.scheduler is not None
        factors = [built.scheduler.lr_lambdas[0](t) for t in (0, 5, 10)]
        assert factors == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_interrupting_the_benchmark_stops_its_workers(tmp_path):
    # Ctrl-C reaches the workers too: the pool must be terminated, not joined
    out = tmp_path / "rob"
    command = [sys.executable, "-m", "hidlr", "bench", "robustness", "--out", str(out)]
    command += ["--tasks", "friedman_mlp", "--seeds", "3", "--steps-scale", "0.3"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # a shell that runs this in the background ignores SIGINT, and the child would inherit it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    runs = out / "runs.jsonl"
    deadline = time.monotonic() + 120
    while not (runs.exists() and runs.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert runs.read_text().count("\n") < len(jobs_for(["friedman_mlp"], range(3), True))  # stopped


def test_dog_is_evaluated_with_averaged_batchnorm_statistics():
    pytest.importorskip("dog", reason="optional package 'dog-optimizer' is not installed")
    from torch import nn

    from hidlr.experiments.training import build_method

    task = TASKS["bars_cnn_bn"]
    problem = task.problem(0)
    built = build_method(task, problem, "dog", 1.0, 10, None)
    (x, y), model = problem.train, problem.model
    for i in range(3):
        built.optimizer.zero_grad()
        problem.loss_fn(model(x[32 * i : 32 * (i + 1)]), y[32 * i : 32 * (i + 1)]).backward()
        built.step()
    bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    live = bn.running_mean.clone()
    with built.evaluating():  # the package's average covers the statistics, not only weights
        assert not torch.equal(bn.running_mean, live)
    assert torch.equal(bn.running_mean, live)


def test_the_grid_grows_at_most_a_decade_past_the_tasks_own_however_often_resumed(tmp_path):
    from hidlr.experiments.tasks import TASKS

    low = min(TASKS["friedman_mlp"].grid)
    rates = [
        *TASKS["friedman_mlp"].grid,
        *(low / 10 ** (k / 3) for k in range(1, GRID_EXTENSIONS + 1)),
    ]
    # the best keeps lying at the lowest point tried
    records = [_record("constant", 0, lr, "grid", 1.0 + lr) for lr in rates]
    path = _write(tmp_path / "runs.jsonl", records)
    assert edge_jobs(path, ["friedman_mlp"], (0,)) == []
    path = _write(tmp_path / "runs.jsonl", records[:-1])  # one extension fewer: one more to run
    (job,) = edge_jobs(path, ["friedman_mlp"], (0,))
    assert job.lr == pytest.approx(rates[-1])


def test_rates_and_wall_time_leave_out_runs_that_stopped_early(tmp_path):
    records = [
        _record("constant", 0, 0.1, "grid", 1.0),
        _record("constant", 0, 1.0, "grid", math.inf, True),
    ]
    records[0]["seconds"], records[1]["seconds"] = 4.0, 0.1  # a diverged run stops at once
    full = _record("hidlr", 0, 0.01, "default", 1.0)
    full["lrs"], full["seconds"] = [[0.01 * (i + 1)] for i in range(9)], 8.0
    short = _record("hidlr", 1, 0.01, "default", math.inf, True)
    short["lrs"], short["seconds"] = [[5.0], [50.0]], 8.0
    row = summarize(_write(tmp_path / "runs.jsonl", records + [full, short]))["tasks"][
        "friedman_mlp"
    ]
    assert row["methods"]["hidlr"]["time_ratio"] == 2.0  # against the finished grid run only
    info = row["hidlr_rates"]
    assert info["runs"] == 1 and info["steps"] == [0, 20, 40, 60, 80]
    assert info["rates"][0] == pytest.approx([0.01, 0.03, 0.05, 0.07, 0.09])


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_builds_the_same_data_whatever_the_global_random_state(name):
    # a task's data comes from its own generator: the benchmark builds tasks in worker
    # processes whose global random state differs from run to run
    task = TASKS[name]
    if not task.available():
        pytest.skip(f"{name}: its data is not installed")
    torch.manual_seed(1)
    first = task.problem(0)
    if task.data is not None:  # a real task's data is cached: load it again
        task.data.cache_clear()  # type: ignore[attr-defined]
    torch.manual_seed(2)
    torch.rand(7)
    second = task.problem(0)
    for a, b in zip((*first.train, *first.val), (*second.train, *second.val), strict=True):
        assert torch.equal(a, b), name


def test_a_task_whose_data_is_missing_is_left_out_with_a_message(monkeypatch, capsys):
    from dataclasses import replace

    from hidlr import cli
    from hidlr.experiments import robustness, tasks

    def missing() -> None:
        raise FileNotFoundError("Fashion-MNIST is not in /nowhere: apt-get install ...")

    def present() -> None:
        return None

    monkeypatch.setitem(tasks.TASKS, "fashion_cnn", replace(TASKS["fashion_cnn"], data=missing))
    monkeypatch.setitem(
        tasks.TASKS, "california_mlp", replace(TASKS["california_mlp"], data=present)
    )
    assert not tasks.TASKS["fashion_cnn"].available()
    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)
        raise robustness.SettingsMismatch("stop here")

    monkeypatch.setattr(robustness, "run_benchmark", fake)
    args = ["bench", "robustness", "--out", "unused", "--tasks"]
    assert cli.main([*args, "fashion_cnn", "california_mlp"]) == 2
    assert "left out, their data is not installed: fashion_cnn" in capsys.readouterr().err
    assert seen["tasks"] == ["california_mlp"]
    seen.clear()
    # nothing left to run: no benchmark at all (an empty list is not "every task")
    assert cli.main([*args, "fashion_cnn"]) == 2
    assert "fashion_cnn" in capsys.readouterr().err and not seen


def test_a_loss_below_zero_is_judged_by_its_excess_over_the_grid_best(tmp_path):
    # a negative log-likelihood: the grid-best is -1.0, Hi-DLR's -0.75 is worse by 25% of it
    records = [_record("constant", 0, lr, "grid", v) for lr, v in ((0.01, -0.5), (0.1, -1.0))]
    records += [
        _record("hidlr", 0, 0.01, "default", -0.75),
        _record("gen", 0, 0.01, "default", -1.02),
    ]
    summary = summarize(_write(tmp_path / "runs.jsonl", records))
    row = summary["tasks"]["friedman_mlp"]
    assert row["grid_best"] == -1.0
    assert row["methods"]["hidlr"]["ratio"] == pytest.approx(1.25)
    assert row["methods"]["gen"]["ratio"] == pytest.approx(0.98)
    assert summary["summary"]["all"]["hidlr_within_5pct"] == 0
    assert summary["summary"]["all"]["hidlr_beats_gen"] == 0
