"""DistributedHiDLR: 2 processes on gloo (127.0.0.1), DDP replicas stay bit-identical and match
a single process on the full batch; a failing rank makes the other fail fast with a clear error."""

from __future__ import annotations

import copy
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hidlr
from hidlr.integrations.distributed import DistributedHiDLR, ProbeSyncError, rates_agree
from launch import SHARD, WORLD, spawn, spawn_clean, step_batch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
]

F64 = torch.float64
STEPS = 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": model[0].parameters()}, {"params": model[2].parameters()}]


OPTIONS = {
    "paper": {"policy": "paper", "update_every": 2, "smoothing": 0.5, "min_r2": 0.5},
    "robust": {"policy": "robust", "update_every": 2},
}


def _train(model, ddp, opt, shard) -> None:
    loss_fn = nn.MSELoss()
    for t in range(STEPS):
        x, y = step_batch(t)
        px, py = step_batch(t + 1)
        x, y, px, py = x[shard], y[shard], px[shard], py[shard]
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step(lambda px=px, py=py: loss_fn(model(px), py))


# freezing turns requires_grad off mid-run: DDP then needs find_unused_parameters=True
FREEZE = {"policy": "robust", "update_every": 2, "freeze_budget": 1, "freeze_warmup": 1}


def _single(options: dict) -> dict:
    model = _model()
    opt = hidlr.HiDLR(torch.optim.SGD(_groups(model), lr=0.05), **options)
    _train(model, model, opt, slice(None))
    return {"weights": [p.detach().clone() for p in model.parameters()], "lrs": opt.lrs}


# -- what each rank runs ---------------------------------------------------------------------


def _init(rank: int, port: int, timeout_s: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=timeout_s),
    )


def _worker(rank: int, port: int, out: str, scenario: str) -> None:
    result: dict = {}
    try:
        _init(rank, port, 20.0)
        if scenario == "train":
            result = _scenario_train(rank)
        elif scenario == "hang":
            result = _scenario_fail(rank, exit_on_failure=False)
        elif scenario == "crash":
            result = _scenario_fail(rank, exit_on_failure=True)
        elif scenario == "nonmember":
            result = _scenario_nonmember(rank)
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if scenario == "train":
        dist.destroy_process_group()
    os._exit(0)  # after a failure the process group cannot be shut down cleanly


def _scenario_nonmember(rank: int) -> dict:
    group = dist.new_group([0])  # rank 1 is not a member
    if rank == 0:
        return {}
    model = _model()
    opt = DistributedHiDLR(torch.optim.SGD(model.parameters(), lr=0.1), process_group=group)
    x = torch.ones(2, 6, dtype=F64)
    model(x).sum().backward()
    try:
        opt.step(lambda: model(x).sum())
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {}


def _scenario_train(rank: int) -> dict:
    shard = slice(rank * SHARD, (rank + 1) * SHARD)
    result = {}
    for policy in OPTIONS:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = DistributedHiDLR(torch.optim.SGD(_groups(model), lr=0.05), **OPTIONS[policy])
        _train(model, ddp, opt, shard)
        result[policy] = {
            "weights": [p.detach().clone() for p in model.parameters()],
            "lrs": opt.lrs,
            "reductions": opt.reductions,
            "updates": sum(r.accepted for rec in opt.history for r in rec.groups),
            "agree": rates_agree(opt),
            "state": opt.state_dict()["hidlr"]["steps"],
        }
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = DistributedHiDLR(torch.optim.SGD(_groups(model), lr=0.05), **FREEZE)
    _train(model, ddp, opt, shard)
    result["freeze"] = {
        "weights": [p.detach().clone() for p in model.parameters()],
        "lrs": opt.lrs,
        "frozen": opt.frozen,
    }
    return result


def _scenario_fail(rank: int, *, exit_on_failure: bool) -> dict:
    """Rank 1's closure raises at the second probe step; rank 0 must not hang."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = DistributedHiDLR(
        torch.optim.SGD(_groups(model), lr=0.05), timeout=3.0, **OPTIONS["paper"]
    )
    loss_fn = nn.MSELoss()
    shard = slice(rank * SHARD, (rank + 1) * SHARD)
    calls = 0

    def closure(px, py):
        nonlocal calls
        calls += 1
        if rank == 1 and opt.steps > 2 and calls > 10:
            raise ValueError("bad batch on rank 1")
        return loss_fn(model(px), py)

    started = time.monotonic()
    try:
        for t in range(STEPS):
            x, y = step_batch(t)
            px, py = step_batch(t + 1)
            opt.zero_grad()
            loss_fn(ddp(x[shard]), y[shard]).backward()
            started = time.monotonic()
            opt.step(lambda px=px[shard], py=py[shard]: closure(px, py))
    except Exception as exc:
        elapsed = time.monotonic() - started
        if rank == 1:
            if exit_on_failure:
                os._exit(3)  # the process dies, as under torchrun
            time.sleep(6.0)  # alive but not reducing: rank 0 must give up by its timeout
        return {"raised": type(exc).__name__, "message": str(exc), "elapsed": elapsed}
    return {"raised": None}


LIMIT = 60.0  # seconds a scenario may take before its ranks are killed


def _spawn(scenario: str, tmp_path) -> list[dict]:
    return spawn(_worker, scenario, tmp_path, WORLD, LIMIT)


# -- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict]:
    return spawn_clean(_worker, "train", tmp_path_factory.mktemp("train"), LIMIT)


@pytest.mark.parametrize("policy", list(OPTIONS))
def test_replicas_stay_bit_identical(trained, policy):
    a, b = trained[0][policy], trained[1][policy]
    assert a["lrs"] == b["lrs"]
    assert a["agree"] and b["agree"]
    for wa, wb in zip(a["weights"], b["weights"], strict=True):
        assert torch.equal(wa, wb)
    assert a["updates"] >= 2, "no rate was adapted: the test would prove nothing"
    assert a["lrs"] != [0.05, 0.05]


@pytest.mark.parametrize("policy", list(OPTIONS))
def test_matches_single_process_on_full_batch(trained, policy):
    ref = _single(OPTIONS[policy])
    got = trained[0][policy]
    torch.testing.assert_close(
        torch.tensor(got["lrs"]), torch.tensor(ref["lrs"]), rtol=1e-9, atol=0
    )
    for w, wr in zip(got["weights"], ref["weights"], strict=True):
        torch.testing.assert_close(w, wr, rtol=1e-9, atol=1e-12)


def test_freezing_under_ddp_matches_single_process(trained):
    a, b = trained[0]["freeze"], trained[1]["freeze"]
    assert a["frozen"] == b["frozen"] and sum(a["frozen"]) == 1
    ref = _single(FREEZE)
    assert a["lrs"] == b["lrs"] and a["lrs"] == pytest.approx(ref["lrs"], rel=1e-9)
    for wa, wb, wr in zip(a["weights"], b["weights"], ref["weights"], strict=True):
        assert torch.equal(wa, wb)
        torch.testing.assert_close(wa, wr, rtol=1e-9, atol=1e-12)


def test_all_reduces_per_probe_step(trained):
    probe_steps = STEPS // OPTIONS["paper"]["update_every"]
    # one for the moved flags, one for all the probe losses of the fit
    assert trained[0]["paper"]["reductions"] == 2 * probe_steps
    # robust, two groups: the combined-step probe needs its own (it depends on the fit)
    assert trained[0]["robust"]["reductions"] == 3 * probe_steps


def test_failing_rank_does_not_hang_the_others(tmp_path):
    started = time.monotonic()
    rank0, rank1 = _spawn("hang", tmp_path)
    assert "error" not in rank0, rank0.get("error")
    assert rank1["raised"] == "ValueError"
    assert rank0["raised"] == "ProbeSyncError"
    assert "probe step 2" in rank0["message"] and "another rank" in rank0["message"]
    assert "within 3 s" in rank0["message"]
    assert 2.5 < rank0["elapsed"] < 3.0 + 5.0  # gave up at its timeout, not the group's 20 s
    assert time.monotonic() - started < 60


def test_crashed_rank_is_noticed(tmp_path):
    rank0, _ = _spawn("crash", tmp_path)
    assert "error" not in rank0, rank0.get("error")
    assert rank0["raised"] == "ProbeSyncError"
    assert rank0["elapsed"] < 3.0  # a dead peer is noticed at once (connection reset)


def test_a_rank_outside_the_process_group_is_told_so(tmp_path):
    _, rank1 = _spawn("nonmember", tmp_path)
    assert rank1.get("raised") == "ProbeSyncError", rank1
    assert "not a member of DistributedHiDLR's process group" in rank1["message"]


def _raise_from(module: str, inner: str) -> BaseException:
    """An exception raised in a frame of module ``inner``, called from one of ``module``."""
    inner_globals = {"__name__": inner}
    exec("def inner():\n    raise RuntimeError('boom')\n", inner_globals)
    outer_globals = {"__name__": module, "inner": inner_globals["inner"]}
    exec("def outer():\n    inner()\n", outer_globals)
    try:
        outer_globals["outer"]()
    except RuntimeError as exc:
        return exc
    raise AssertionError("did not raise")


def test_only_the_frame_that_raised_decides_whether_a_collective_failed():
    from hidlr.integrations.distributed import _raised_in_collective

    # the model's own error, on its way through activation checkpointing or DTensor code
    wrapper = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
    assert not _raised_in_collective(_raise_from(wrapper, "torch.nn.modules.linear"))
    assert not _raised_in_collective(_raise_from("torch.distributed.tensor._ops", "my_model"))
    # a collective that lost its peer or timed out (gloo: a plain RuntimeError)
    c10d = "torch.distributed.distributed_c10d"
    assert _raised_in_collective(
        _raise_from("torch.distributed.fsdp._fully_shard._fsdp_state", c10d)
    )
    fsdp = "torch.distributed.fsdp._fully_shard._fsdp_collectives"
    assert _raised_in_collective(_raise_from("my_model", fsdp))


def test_needs_a_process_group():
    model = _model()
    opt = DistributedHiDLR(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = model(torch.ones(2, 6, dtype=F64)).sum()
    loss.backward()
    with pytest.raises(ProbeSyncError, match="init_process_group"):
        opt.step(lambda: model(torch.ones(2, 6, dtype=F64)).sum())
    # the failed probe step left the plain base step and unchanged rates
    assert opt.lrs == [0.1] and opt.steps == 1


def test_options_checked_and_state_round_trips():
    with pytest.raises(ValueError, match="timeout"):
        DistributedHiDLR(torch.optim.SGD(_model().parameters(), lr=0.1), timeout=-1)
    opt = DistributedHiDLR(torch.optim.SGD(_model().parameters(), lr=0.1), timeout=5)
    opt.param_groups[0]["hidlr_lr"], opt._steps, opt._coupling = 0.37, 3, 0.5  # as if trained
    other = DistributedHiDLR(torch.optim.SGD(_model().parameters(), lr=0.1))
    assert other.state_dict()["hidlr"] != opt.state_dict()["hidlr"]
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.state_dict()["hidlr"] == opt.state_dict()["hidlr"]
    assert other.lrs == [0.37] and other.steps == 3


def test_a_functional_collective_failing_in_operator_dispatch_is_a_collective_failure():
    from hidlr.integrations.distributed import _raised_in_collective

    # torch.distributed._functional_collectives calls torch.ops._c10d_functional, whose
    # Python frame (torch._ops) is the innermost one
    assert _raised_in_collective(
        _raise_from("torch.distributed._functional_collectives", "torch._ops")
    )
    assert not _raised_in_collective(_raise_from("my_model", "torch._ops"))  # any other op
