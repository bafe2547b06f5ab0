"""``defer_probes``: a probe step's probes run at the next step, with that step's closure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import hidlr

F64 = torch.float64


def _quadratic():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=gen, dtype=F64)
    h = m @ m.T + 4 * torch.eye(4, dtype=F64)
    q = torch.randn(4, generator=gen, dtype=F64)
    a = nn.Parameter(torch.zeros(2, dtype=F64))
    b = nn.Parameter(torch.zeros(2, dtype=F64))

    def loss():
        w = torch.cat([a, b])
        return 0.5 * w @ h @ w - q @ w

    return a, b, loss


def _opt(a, b, **options):
    base = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.01)
    return hidlr.HiDLR(base, policy="paper", smoothing=0.0, update_every=2, **options)


def _step(opt, loss, closure=True):
    opt.zero_grad()
    loss().backward()
    grads = [p.grad.clone() for g in opt.param_groups for p in g["params"]]
    opt.step(loss if closure else None)
    return grads


def test_deferred_fit_is_the_immediate_fit_one_step_later():
    a, b, loss = _quadratic()
    now = _opt(a, b)
    _step(now, loss)
    immediate = [_without_own_b(r) for r in now.history]
    assert math.isfinite(now.history[0].groups[0].own_b)  # (measured where the gradient is)
    rates = now.lrs
    assert rates != [0.01, 0.01]

    a, b, loss = _quadratic()
    later = _opt(a, b, defer_probes=True)
    assert not later.needs_closure()
    (ga, gb) = _step(later, loss, closure=False)  # the probe step needs no closure
    assert later.history == () and later.lrs == [0.01, 0.01]
    # its update is the base optimizer's with the old rates, and stays
    assert torch.equal(a.detach(), -0.01 * ga) and torch.equal(b.detach(), -0.01 * gb)
    w1 = [a.detach().clone(), b.detach().clone()]
    assert later.needs_closure()
    (ga, gb) = _step(later, loss)
    # the same probes around the same w0 along the same step: the same fit, bit for bit (but
    # the gradient at hand is the next one: the slope on its own batch is not measured)
    assert [_without_own_b(r) for r in later.history] == immediate
    assert math.isnan(later.history[0].groups[0].own_b)
    assert later.lrs == rates
    # and this step is taken from w1 with the new rates (to rounding: SGD's fused add)
    assert torch.allclose(a.detach(), w1[0] - rates[0] * ga, rtol=1e-14, atol=1e-16)
    assert torch.allclose(b.detach(), w1[1] - rates[1] * gb, rtol=1e-14, atol=1e-16)
    assert not torch.allclose(b.detach(), w1[1] - 0.01 * gb, rtol=1e-6)


def _without_own_b(record) -> str:
    data = record.as_dict()
    for g in data["groups"]:
        g.pop("own_b")
    return json.dumps(data)


def test_the_step_after_a_deferred_probe_step_needs_the_closure():
    a, b, loss = _quadratic()
    opt = _opt(a, b, defer_probes=True)
    needs = []
    for _ in range(5):
        needs.append(opt.needs_closure())
        _step(opt, loss, closure=needs[-1])
    assert needs == [False, True, False, True, False]
    assert [r.step for r in opt.history] == [0, 2]  # recorded as the probe steps they fit
    opt.zero_grad()
    loss().backward()
    with pytest.raises(ValueError, match="the step after a probe step with defer_probes=True"):
        opt.step()


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1)
    )


def _run(seed=0):
    model = _model(seed)
    base = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[1:].parameters()}], lr=0.02
    )
    return model, hidlr.HiDLR(base, update_every=2, defer_probes=True)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y))


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, 3, generator=gen)
    return [(xb, xb.sum(dim=1, keepdim=True) ** 2) for xb in x]


def test_a_checkpoint_between_a_probe_step_and_its_probes_resumes_bit_identically(tmp_path):
    batches = _batches(12)
    model, opt = _run()
    torch.manual_seed(11)
    _train(model, opt, batches[:5])  # step 4 is a probe step: its probes are pending
    assert opt.needs_closure()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
        tmp_path / "ckpt.pt",
    )
    _train(model, opt, batches[5:])

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2, opt2 = _run(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.needs_closure()
    torch.set_rng_state(ckpt["rng"])
    _train(model2, opt2, batches[5:])
    for x, y in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert opt.lrs == opt2.lrs and opt.steps == opt2.steps == 12
    assert [json.dumps(r.as_dict()) for r in opt.history] == [
        json.dumps(r.as_dict()) for r in opt2.history
    ]
    assert len(opt.history) == 6 and any(g.accepted for r in opt.history for g in r.groups)


class Boom(RuntimeError):
    pass


def test_a_failing_closure_keeps_the_probe_steps_update_and_the_rates():
    batches = _batches(3)
    model, opt = _run()
    _train(model, opt, batches[:1])
    after = [p.detach().clone() for p in model.parameters()]
    state = json.dumps({k: str(v) for k, v in opt.optimizer.state_dict()["state"].items()})
    x, y = batches[1]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    buffers = [b.clone() for b in model.buffers()]  # as this step's forward left them
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise Boom("probe failed")
        return nn.functional.mse_loss(model(x), y)

    with pytest.raises(Boom):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert json.dumps({k: str(v) for k, v in opt.optimizer.state_dict()["state"].items()}) == state
    assert opt.steps == 1 and opt.lrs == [0.02, 0.02] and opt.history == ()
    assert not opt.needs_closure()  # the failed probes are dropped; training goes on
    _train(model, opt, batches[1:])
    assert opt.steps == 3


def test_a_closure_failing_in_the_blow_up_check_changes_nothing_and_drops_the_probes():
    batches = _batches(8)
    model, opt = _run()
    _train(model, opt, batches[:7])  # probe step 6's probes pending, a rollback copy kept
    assert opt.needs_closure()
    before = [p.detach().clone() for p in model.parameters()]
    lrs, records = opt.lrs, len(opt.history)
    state = json.dumps({k: str(v) for k, v in opt.optimizer.state_dict()["state"].items()})
    x, y = batches[7]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    buffers = [b.clone() for b in model.buffers()]

    def closure():  # fails at its first call: the check of the loss at the current weights
        raise Boom("closure failed")

    with pytest.raises(Boom):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert json.dumps({k: str(v) for k, v in opt.optimizer.state_dict()["state"].items()}) == state
    assert opt.steps == 7 and opt.lrs == lrs and len(opt.history) == records
    assert not opt.needs_closure()


def test_distributed_refuses_deferred_probes():
    from hidlr.integrations.distributed import DistributedHiDLR

    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="defer_probes=True is not supported by DistributedHiDLR"):
        DistributedHiDLR(torch.optim.SGD([w], lr=0.1), defer_probes=True)


def test_a_group_added_between_a_probe_step_and_its_probes():
    a, b, loss = _quadratic()
    opt = _opt(a, b, defer_probes=True)
    _step(opt, loss, closure=False)
    c = nn.Parameter(torch.ones(2, dtype=F64))
    opt.add_param_group({"params": [c], "lr": 0.01})

    def loss_c():
        return loss() + (c**2).sum()

    opt.zero_grad()
    loss_c().backward()
    opt.step(loss_c)
    assert opt.steps == 2 and [g.reason for g in opt.history[0].groups][2] == "zero_direction"
    assert opt.history[0].groups[0].accepted and torch.equal(
        c.detach(), torch.full((2,), 0.98, dtype=F64)
    )


def test_distributed_refuses_a_deferral_it_was_handed():
    from hidlr.integrations.distributed import DistributedHiDLR

    a, b, loss = _quadratic()
    plain = _opt(a, b, defer_probes=True)
    _step(plain, loss, closure=False)
    state = plain.state_dict()
    dist = DistributedHiDLR(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.01))
    dist.load_state_dict(state)
    with pytest.raises(ValueError, match="came with a loaded state dict"):
        dist.step(loss)
