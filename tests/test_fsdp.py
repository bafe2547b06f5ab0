"""DistributedHiDLR under FSDP2 (``fully_shard``): 2 processes on gloo (127.0.0.1).

Each rank probes its own shard of the parameters in place and the loss on its own shard of the
batch; the ranks fit and take the same rates, their gathered weights match a single process on
the full batch, a checkpoint (torch.distributed.checkpoint) resumes bit for bit, and a rank
that fails while probing makes the other fail with a clear error instead of hanging.
"""

from __future__ import annotations

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

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
    pytest.mark.skipif(fully_shard is None, reason="needs torch.distributed.fsdp.fully_shard"),
]

F64 = torch.float64
STEPS = 12
RESUME_AT = 5  # the resumed run is checkpointed after this many steps (the next one probes)
LR = 0.05
LOSS_BELOW = 0.35  # held-out loss after STEPS steps (0.69 at the initial weights)
OPTIONS = {
    "paper": {"policy": "paper", "update_every": 2, "smoothing": 0.5, "min_r2": 0.5},
    "robust": {"policy": "robust", "update_every": 2},
}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)


def _held_out_loss(weights: list[torch.Tensor]) -> float:
    """The loss of the model with these (full) weights on 512 examples no step has seen."""
    model = _model()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(512, 6, generator=gen, dtype=F64)
    y = torch.sin(x[:, :1] * 1.5) + 0.3 * x[:, 1:2] * x[:, 2:3]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
        return nn.functional.mse_loss(model(x), y).item()


def _optimizer(model: nn.Module, policy: str, cls: type = DistributedHiDLR, **kw) -> hidlr.HiDLR:
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    base = torch.optim.SGD(groups, lr=LR, momentum=0.5)
    return cls(base, **OPTIONS[policy], **kw)


def _train(model, opt, rows, steps) -> list[float]:
    """Train on ``rows`` of each step's batch and probe on ``rows`` of the next one."""
    loss_fn = nn.MSELoss()
    losses = []
    for t in steps:
        x, y = step_batch(t)
        px, py = step_batch(t + 1)
        opt.zero_grad()
        loss = loss_fn(model(x[rows]), y[rows])
        loss.backward()
        opt.step(lambda px=px[rows], py=py[rows]: loss_fn(model(px), py))
        losses.append(loss.item())
    return losses


def _single(policy: str) -> dict:
    model = _model()
    opt = _optimizer(model, policy, cls=hidlr.HiDLR)
    losses = _train(model, opt, slice(None), range(STEPS))
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "lrs": opt.lrs,
        "losses": losses,
    }


# -- what each rank runs ---------------------------------------------------------------------


def _sharded(seed: int = 0, mesh=None) -> nn.Sequential:
    """The model under FSDP2: the first layer its own unit, the last one left in the root,
    whose parameters FSDP keeps gathered after a forward. The last layer's weight has one row,
    so rank 1 holds none of that group's elements."""
    model = _model(seed)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _snapshot(model: nn.Module) -> dict:
    params = list(model.parameters())  # the sharded parameters (DTensors) between steps
    return {
        "full": [p.full_tensor().detach().clone() for p in params],
        "local": [p.to_local().detach().clone() for p in params],
    }


def _worker(rank: int, port: int, out: str, scenario: str) -> None:
    result: dict = {}
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=30),
        )
        if scenario == "train":
            result = _scenario_train(rank, out)
        elif scenario == "hang":
            result = _scenario_hang(rank)
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if scenario == "train":
        dist.destroy_process_group()
    os._exit(0)  # after a failure the process group cannot be shut down cleanly


def _scenario_train(rank: int, out: str) -> dict:
    rows = slice(rank * SHARD, (rank + 1) * SHARD)
    result = {}
    for policy in OPTIONS:
        model = _sharded()
        opt = _optimizer(model, policy)
        losses = _train(model, opt, rows, range(STEPS))
        result[policy] = {
            **_snapshot(model),
            "lrs": opt.lrs,
            "losses": losses,
            "reductions": opt.reductions,
            "accepted": sum(r.accepted for rec in opt.history for r in rec.groups),
            "agree": rates_agree(opt),
            "history": [r.as_dict() for r in opt.history],
        }
    result["resumed"] = _resume(rows, os.path.join(out, "checkpoint"))
    try:  # plain HiDLR would probe sharded parameters without reducing: refused
        _optimizer(_sharded(), "paper", cls=hidlr.HiDLR)
        result["plain_refused"] = ""
    except TypeError as exc:
        result["plain_refused"] = str(exc)
    return result


def _resume(rows: slice, path: str) -> dict:
    """The robust run again, checkpointed with torch.distributed.checkpoint after RESUME_AT
    steps and finished by a fresh model and optimizer (other initial weights) loaded from it."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded()
    opt = _optimizer(model, "robust")
    _train(model, opt, rows, range(RESUME_AT))
    msd, osd = get_state_dict(model, opt.optimizer)  # the base optimizer: a standard one
    blob = io.BytesIO()
    torch.save(opt.state_dict()["hidlr"], blob)  # HiDLR's own state, the same on every rank
    dcp.save({"model": msd, "optim": osd, "hidlr": blob}, checkpoint_id=path)
    del model, opt, msd, osd

    model = _sharded(seed=1)
    opt = _optimizer(model, "robust")
    msd, osd = get_state_dict(model, opt.optimizer)
    state = {"model": msd, "optim": osd, "hidlr": io.BytesIO()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, opt.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    state["hidlr"].seek(0)  # DCP stores the buffer itself, as an object
    hidlr_state = torch.load(state["hidlr"], weights_only=True)
    opt.load_state_dict({"base": opt.optimizer.state_dict(), "hidlr": hidlr_state})
    _train(model, opt, rows, range(RESUME_AT, STEPS))
    return {
        **_snapshot(model),
        "lrs": opt.lrs,
        "steps": opt.steps,
        "history": [r.as_dict() for r in opt.history],
    }


def _scenario_hang(rank: int) -> dict:
    """Rank 1's closure raises during the second probe step; rank 0 is then waiting in FSDP's
    all-gather of its next probe, which only the process group's timeout (3 s) bounds."""
    group = dist.new_group(timeout=timedelta(seconds=3))  # after every rank has started
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(group, "cpu")
    model = _sharded(mesh=mesh)
    opt = _optimizer(model, "paper", process_group=group, timeout=3.0)
    loss_fn = nn.MSELoss()
    rows = slice(rank * SHARD, (rank + 1) * SHARD)
    calls = 0

    def closure(px, py):
        nonlocal calls
        calls += 1
        if rank == 1 and opt.steps > 2 and calls > 10:
            raise ValueError("bad batch on rank 1")
        return loss_fn(model(px), py)

    dist.barrier(group)
    started, lrs = time.monotonic(), opt.lrs
    try:
        for t in range(STEPS):
            x, y = step_batch(t)
            px, py = step_batch(t + 1)
            opt.zero_grad()
            loss_fn(model(x[rows]), y[rows]).backward()
            started, lrs = time.monotonic(), opt.lrs
            opt.step(lambda px=px[rows], py=py[rows]: closure(px, py))
    except Exception as exc:
        elapsed = time.monotonic() - started
        if rank == 1:
            time.sleep(5.0)  # alive but not taking part: rank 0 must give up by the timeout
        return {
            "raised": type(exc).__name__,
            "message": str(exc),
            "elapsed": elapsed,
            "lrs_kept": opt.lrs == lrs,
        }
    return {"raised": None}


LIMIT = 90.0  # seconds a scenario may take before its ranks are killed


def _spawn(scenario: str, tmp_path) -> list[dict]:
    return spawn(_worker, scenario, tmp_path, WORLD, LIMIT)


# -- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict]:
    return spawn_clean(_worker, "train", tmp_path_factory.mktemp("fsdp"), LIMIT)


@pytest.mark.parametrize("policy", list(OPTIONS))
def test_ranks_agree_and_train(trained, policy):
    a, b = trained[0][policy], trained[1][policy]
    assert a["lrs"] == b["lrs"] and a["agree"] and b["agree"]
    assert repr(a["history"]) == repr(b["history"])  # exact floats, and NaN equals NaN
    for wa, wb in zip(a["full"], b["full"], strict=True):
        assert torch.equal(wa, wb)
    assert a["lrs"] != [LR, LR], "no rate moved"
    # probes that saw no perturbation would be flat and fit nothing
    assert a["accepted"] >= 2, "no fit accepted: the probes did not change the loss"
    initial = [p.detach() for p in _model().parameters()]
    assert _held_out_loss(a["full"]) < LOSS_BELOW < _held_out_loss(initial)


def test_plain_hidlr_refuses_sharded_parameters(trained):
    message = trained[0]["plain_refused"]
    assert "DTensor" in message and "DistributedHiDLR" in message


def test_last_layer_has_an_empty_shard_on_rank_1(trained):
    # the case the all-reduced "moved" flags exist for: rank 1 probes a group it holds none of
    local = trained[1]["paper"]["local"]
    assert local[2].numel() == 0 and local[3].numel() == 0
    assert trained[0]["paper"]["local"][2].numel() == 16


@pytest.mark.parametrize("policy", list(OPTIONS))
def test_matches_single_process_on_full_batch(trained, policy):
    ref = _single(policy)
    got = trained[0][policy]
    torch.testing.assert_close(
        torch.tensor(got["lrs"]), torch.tensor(ref["lrs"]), rtol=1e-9, atol=0
    )
    for w, wr in zip(got["full"], ref["weights"], strict=True):
        torch.testing.assert_close(w, wr, rtol=1e-9, atol=1e-12)
    for rank in range(WORLD):  # each rank's shard is its chunk of the full weights
        for w, wr in zip(trained[rank][policy]["local"], ref["weights"], strict=True):
            chunk = wr.chunk(WORLD)[rank] if rank < len(wr.chunk(WORLD)) else wr[:0]
            torch.testing.assert_close(w, chunk, rtol=1e-9, atol=1e-12)


def test_reductions_per_probe_step(trained):
    probe_steps = STEPS // OPTIONS["paper"]["update_every"]
    assert trained[0]["paper"]["reductions"] == 2 * probe_steps  # flags, losses
    assert trained[0]["robust"]["reductions"] == 3 * probe_steps  # and the combined step


def test_checkpoint_resumes_bit_for_bit(trained):
    for rank in range(WORLD):
        done, resumed = trained[rank]["robust"], trained[rank]["resumed"]
        assert resumed["steps"] == STEPS
        assert resumed["lrs"] == done["lrs"]
        assert repr(resumed["history"]) == repr(done["history"])
        for w, wr in zip(resumed["local"], done["local"], strict=True):
            assert torch.equal(w, wr)
        for w, wr in zip(resumed["full"], done["full"], strict=True):
            assert torch.equal(w, wr)


def test_failing_rank_does_not_hang_the_others(tmp_path):
    started = time.monotonic()
    rank0, rank1 = _spawn("hang", tmp_path)
    assert "error" not in rank0, rank0.get("error")
    assert "error" not in rank1, rank1.get("error")
    assert rank1["raised"] == "ValueError"
    assert rank0["raised"] == ProbeSyncError.__name__, rank0
    assert "probe step 2" in rank0["message"] and "another rank" in rank0["message"]
    assert 2.5 < rank0["elapsed"] < 3.0 + 5.0  # gave up at the group's 3 s
    assert rank0["lrs_kept"] and rank1["lrs_kept"]
    assert time.monotonic() - started < 90
