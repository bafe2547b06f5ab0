"""HiDLR against closed forms, and its promises: one base step, no trace, nothing lost."""

import copy
import json
import math
import pickle
import warnings
from functools import partial

import pytest
import torch
from torch import nn

import hidlr
from hidlr.functions import beale_rosenbrock, ellipse
from hidlr.sage import SAGE

F64 = torch.float64
NEVER = 2.0  # min_r2 above 1: no update is ever accepted


def paper(base, **options):
    """Algorithm 1 as written: these tests check the paper's method and its bookkeeping."""
    return hidlr.HiDLR(base, policy="paper", **options)


def spd(d, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=gen, dtype=F64)
    return m @ m.T + torch.eye(d, dtype=F64), torch.randn(d, generator=gen, dtype=F64)


# -- closed forms ---------------------------------------------------------------------------


def test_one_group_on_quadratic_is_exact_line_search():
    h, q = spd(6, 0)
    w = nn.Parameter(torch.randn(6, dtype=F64))
    loss = lambda: 0.5 * w @ h @ w - q @ w  # noqa: E731
    opt = paper(torch.optim.SGD([w], lr=0.01), smoothing=0.0, update_every=1)
    opt.zero_grad()
    loss().backward()
    g = w.grad.clone()
    w0 = w.detach().clone()
    opt.step(loss)
    eta = (g @ g / (g @ h @ g)).item()
    assert abs(opt.lrs[0] - eta) < 1e-10
    assert torch.allclose(w.detach(), w0 - eta * g, rtol=0, atol=1e-12)
    (rec,) = opt.history[0].groups
    assert rec.accepted and rec.b == pytest.approx((g @ g).item(), rel=1e-10)
    assert pytest.approx((g @ h @ g).item(), rel=1e-10) == rec.A
    assert rec.decrease == pytest.approx(rec.b**2 / (2 * rec.A), rel=1e-12)


@pytest.mark.parametrize("mults", [(-1, 1, 2), (-2, 0, 2), (0, 1, 2), (-1, 0, 1, 2)])
def test_cheaper_probes_are_still_exact_line_search(mults):
    """Fewer points per group, or a shared probe at the unperturbed point (multiplier 0), fit
    the same quadratic: on a quadratic loss every choice gives the exact rates, and each costs
    one forward pass per non-zero multiplier and group plus one for a 0."""
    h, q = spd(8, 1)
    w = [nn.Parameter(torch.randn(4, dtype=F64)) for _ in range(2)]
    calls = []

    def loss():
        calls.append(1)
        v = torch.cat(w)
        return 0.5 * v @ h @ v - q @ v

    opt = paper(
        torch.optim.SGD([{"params": [w[0]]}, {"params": [w[1]]}], lr=0.01),
        smoothing=0.0,
        update_every=1,
        probe_multipliers=mults,
    )
    opt.zero_grad()
    loss().backward()
    g = [p.grad.clone() for p in w]
    calls.clear()
    opt.step(loss)
    nonzero = sum(c != 0 for c in mults)
    assert len(calls) == 2 * nonzero + (0 in mults)
    assert opt.history[0].n_probes == len(calls)
    # each group's fit is its own exact line search, the other group held at w0
    hk = [h[:4, :4], h[4:, 4:]]
    for k in range(2):
        exact = (g[k] @ g[k] / (g[k] @ hk[k] @ g[k])).item()
        assert opt.lrs[k] == pytest.approx(exact, rel=1e-9)
        assert opt.history[0].groups[k].r2 == pytest.approx(1.0, abs=1e-9)


def test_two_groups_on_ellipse_is_newton():
    x = nn.Parameter(torch.tensor(50.0, dtype=F64))
    y = nn.Parameter(torch.tensor(1.0, dtype=F64))
    loss = lambda: ellipse(x, y)  # noqa: E731
    opt = paper(
        torch.optim.SGD([{"params": [x]}, {"params": [y]}], lr=1e-3), smoothing=0.0, update_every=1
    )
    opt.zero_grad()
    loss().backward()
    opt.step(loss)
    assert opt.lrs[0] == pytest.approx(0.5, abs=1e-9)
    assert opt.lrs[1] == pytest.approx(0.005, abs=1e-12)
    assert loss().item() < 1e-12


def test_beale_plus_rosenbrock_reaches_minimum():
    x = nn.Parameter(torch.tensor(4.0, dtype=F64))
    y = nn.Parameter(torch.tensor(3.0, dtype=F64))
    loss = lambda: beale_rosenbrock(x, y)  # noqa: E731
    opt = paper(torch.optim.SGD([{"params": [x]}, {"params": [y]}], lr=1e-3), update_every=1)
    for _ in range(100):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    assert x.item() == pytest.approx(3.0, abs=1e-6)
    assert y.item() == pytest.approx(1.0, abs=1e-6)


def test_coupled_solves_joint_quadratic_exactly():
    h = torch.tensor(
        [[3.0, 0.5, 0.2, 0.0], [0.5, 2.0, 0.1, 0.3], [0.2, 0.1, 4.0, 0.4], [0.0, 0.3, 0.4, 1.0]],
        dtype=F64,
    )
    q = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=F64)
    a = nn.Parameter(torch.tensor([0.3, 0.7], dtype=F64))
    b = nn.Parameter(torch.tensor([-0.2, 0.1], dtype=F64))
    loss = lambda: 0.5 * torch.cat([a, b]) @ h @ torch.cat([a, b]) - q @ torch.cat([a, b])  # noqa: E731
    opt = paper(
        torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.01),
        smoothing=0.0,
        update_every=1,
        coupled=True,
    )
    opt.zero_grad()
    loss().backward()
    ga = torch.cat([a.grad, torch.zeros(2, dtype=F64)])
    gb = torch.cat([torch.zeros(2, dtype=F64), b.grad])
    bvec = torch.stack([ga @ ga, gb @ gb])
    amat = torch.stack(
        [torch.stack([ga @ h @ ga, ga @ h @ gb]), torch.stack([gb @ h @ ga, gb @ h @ gb])]
    )
    expected = torch.linalg.solve(amat, bvec)
    assert (expected > 0).all() and amat[0, 1].abs() > 0.1
    opt.step(loss)
    assert opt.lrs == pytest.approx(expected.tolist(), rel=1e-9)
    assert opt.history[0].n_probes == 8 + 2


# -- the base optimizer steps once, and its step is the direction ----------------------------

BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "sage": lambda p: SAGE(p, lr=0.01, weight_decay=0.01),
}


def third_party(name):
    if name == "prodigy":
        return pytest.importorskip("prodigyopt").Prodigy
    if name == "dadapt_adam":
        return pytest.importorskip("dadaptation").DAdaptAdam
    return pytest.importorskip("schedulefree").AdamWScheduleFree


def regression(seed=0, n=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=F64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return x, y


def small_mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def groups_of(model):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters()}]


def train(model, opt, data, steps, closure=True):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if closure:
            opt.step(lambda: nn.functional.mse_loss(model(x), y))
        else:
            opt.step()


def flat_state(opt):
    out = []
    for st in opt.state.values():
        for v in st.values():
            out.append(v.clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
    return out


@pytest.mark.parametrize("name", sorted(BASES))
def test_rejected_probes_leave_base_trajectory_bit_identical(name):
    data = regression()
    ref = small_mlp()
    ref_opt = BASES[name](groups_of(ref))
    train(ref, ref_opt, data, 9, closure=False)
    model = small_mlp()
    opt = paper(BASES[name](groups_of(model)), update_every=2, min_r2=NEVER)
    train(model, opt, data, 9)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)
    for s, r in zip(flat_state(opt), flat_state(ref_opt), strict=True):
        assert torch.equal(s, r)  # includes the step counters: stepped once per step
    assert len(opt.history) == 5
    assert not any(g.accepted for rec in opt.history for g in rec.groups)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam", "schedulefree"])
def test_rejected_probes_keep_third_party_optimizers_bit_identical(name):
    cls = third_party(name)
    data = regression()
    ref, model = small_mlp(), small_mlp()
    # Prodigy and D-Adaptation share one step size across groups: one group (Hi-ULR)
    groups = groups_of if name == "schedulefree" else lambda m: m.parameters()
    ref_opt = cls(groups(ref), lr=1.0 if name != "schedulefree" else 0.01)
    opt = paper(
        cls(groups(model), lr=1.0 if name != "schedulefree" else 0.01),
        update_every=2,
        min_r2=NEVER,
    )
    if name == "schedulefree":
        ref_opt.train()
        opt.optimizer.train()
    train(ref, ref_opt, data, 7, closure=False)
    train(model, opt, data, 7)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)
    for s, r in zip(flat_state(opt), flat_state(ref_opt), strict=True):
        assert torch.equal(s, r)
    assert len(opt.history) == 4


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam"])
def test_shared_step_size_optimizers_take_one_group(name):
    """Prodigy and D-Adaptation refuse different lr values per group (a RuntimeError at the
    first step whose rates differ): refused at construction, and for a group added later;
    with one group the rate adapts."""
    cls, data = third_party(name), regression()
    with pytest.raises(ValueError, match=r"optimizer must accept a different lr per param group"):
        hidlr.HiDLR(cls(groups_of(small_mlp()), lr=1.0))
    subclass = type("Mine", (cls,), {})  # a subclass shares the step size too
    with pytest.raises(ValueError, match="shares one step size"):
        hidlr.HiDLR(subclass(groups_of(small_mlp()), lr=1.0))
    model = small_mlp()
    opt = hidlr.HiDLR(cls(model[0].parameters(), lr=1.0), update_every=1)
    with pytest.raises(ValueError, match="single param group"):
        opt.add_param_group({"params": model[2].parameters()})
    assert len(opt.param_groups) == 1
    opt = hidlr.HiDLR(cls(model.parameters(), lr=1.0), update_every=1)
    train(model, opt, data, 6)
    assert opt.lrs[0] != 1.0 and any(r.groups[0].accepted for r in opt.history)


def test_dadaptation_variants_that_ignore_other_groups_lr_are_refused():
    """DAdaptAdaGrad and DAdaptAdan read only the first group's lr: with two groups the second
    would step at the first one's rate while Hi-DLR reports its own."""
    dadapt = pytest.importorskip("dadaptation")
    for cls in (dadapt.DAdaptAdaGrad, dadapt.DAdaptAdan):
        with pytest.raises(ValueError, match=cls.__name__):
            hidlr.HiDLR(cls(groups_of(small_mlp()), lr=1.0))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw", "adagrad", "sage"])
def test_accepted_update_rescales_the_base_step(name):
    data = regression()
    ref = small_mlp()
    ref_opt = BASES[name](groups_of(ref))
    w0 = [p.detach().clone() for p in ref.parameters()]
    train(ref, ref_opt, data, 1, closure=False)
    delta = [r.detach() - p for r, p in zip(ref.parameters(), w0, strict=True)]
    model = small_mlp()
    opt = paper(BASES[name](groups_of(model)), smoothing=0.5, min_r2=-1e9)
    before = opt.lrs
    train(model, opt, data, 1)
    ratios = [a / b for a, b in zip(opt.lrs, before, strict=True)]
    assert all(g.accepted for g in opt.history[0].groups)
    assert any(abs(r - 1) > 1e-3 for r in ratios)
    scale = [ratios[0]] * 2 + [ratios[1]] * 2
    for p, p0, d, s in zip(model.parameters(), w0, delta, scale, strict=True):
        torch.testing.assert_close(p.detach(), p0 + s * d, rtol=0, atol=1e-13)


# -- probes leave no trace -------------------------------------------------------------------


def bn_dropout_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1)
    ).to(F64)


def test_dropout_batchnorm_training_is_bit_identical_when_nothing_is_accepted():
    data = regression(n=48)
    ref = bn_dropout_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    torch.manual_seed(123)
    train(ref, ref_opt, data, 10, closure=False)
    ref_rng = torch.rand(3)
    model = bn_dropout_model()
    opt = paper(
        torch.optim.AdamW(
            [{"params": model[0].parameters()}, {"params": model[1:].parameters()}], lr=0.01
        ),
        update_every=3,
        min_r2=NEVER,
    )
    torch.manual_seed(123)
    train(model, opt, data, 10)
    assert torch.equal(torch.rand(3), ref_rng)  # the training random stream was not consumed
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # weights and BatchNorm buffers, num_batches_tracked too
    assert len(opt.history) == 4


class _Branches(nn.Module):
    """Branch ``a`` or, when ``use_b`` is set, branch ``b`` with its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 1).to(F64)
        self.b = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(F64)
        self.use_b = False

    def forward(self, x):
        return self.b(x) if self.use_b else self.a(x)


def test_probes_restore_modules_that_only_later_probes_run():
    """A branch taken only by later probes (an expert a router picks once the weights move),
    a separate module the closure calls only from the second probe on, and a buffer that a
    forward replaces (not modifies) all end as they were; the guard's hook is gone after."""
    x, y = regression(n=32)
    model = _Branches()
    aux = nn.BatchNorm1d(1).to(F64)
    aux.register_buffer("calls", torch.zeros((), dtype=torch.int64))
    aux.register_forward_pre_hook(lambda m, a: setattr(m, "calls", m.calls + 1))  # replaces
    before = {k: v.clone() for k, v in [*model.b.state_dict().items(), *aux.state_dict().items()]}
    calls_buffer = aux.calls
    opt = hidlr.HiDLR(torch.optim.SGD(model.parameters(), lr=0.01), update_every=1)
    calls = []

    def closure():
        later = len(calls) > 0
        model.use_b = later  # the first probe runs branch a, the later ones branch b and aux
        calls.append(1)
        out = model(x)
        return nn.functional.mse_loss(aux(out) if later else out, y)

    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    hooks = len(nn.modules.module._global_forward_pre_hooks)
    opt.step(closure)
    assert len(calls) == 5  # the loss at w0 and four probes
    after = dict([*model.b.state_dict().items(), *aux.state_dict().items()])
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # running statistics, num_batches_tracked, calls
    assert aux.calls is calls_buffer  # the replaced buffer's original tensor is back
    assert len(nn.modules.module._global_forward_pre_hooks) == hooks
    assert hidlr._probing._ACTIVE_GUARD is None


@pytest.mark.parametrize("mode", ["torch.compile", "module.compile"])
def test_compiled_models_keep_their_batchnorm_statistics_through_probes(mode):
    """Under torch.compile the buffer guard's hook is called as it is (never compiled): with a
    compiled wrapper (torch.compile) and with a module compiled in place (Module.compile),
    probes leave BatchNorm's statistics as the training step left them, and torch's warning
    about global hooks (the guard's) does not reach the user."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, y = regression(n=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1)).to(F64)
    if mode == "module.compile":
        model.compile()
        forward = model
    else:
        forward = torch.compile(model)
    opt = hidlr.HiDLR(
        torch.optim.SGD(
            [{"params": model[0].parameters()}, {"params": model[1:].parameters()}], lr=0.01
        ),
        update_every=2,
    )
    bn = model[1]
    with warnings.catch_warnings(record=True) as caught:  # the filters as the user has them
        for _ in range(6):
            opt.zero_grad()
            nn.functional.mse_loss(forward(x), y).backward()
            before = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
            opt.step(lambda: nn.functional.mse_loss(forward(x), y))
            after = bn.running_mean, bn.running_var, bn.num_batches_tracked
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not [w for w in caught if "global hooks" in str(w.message)]
    assert len(opt.history) == 3 and opt.lrs != [0.01, 0.01]
    # no recompilation per probe step (a new hook object each step recompiled until the limit)
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    assert counters["stats"]["unique_graphs"] <= 2


def test_probes_do_not_make_the_users_once_warnings_repeat():
    """Changing warning filters resets Python's record of warnings already shown: the guard
    adds its one filter once, not around every probe step."""

    class Noisy(nn.Linear):
        def forward(self, x):
            warnings.warn("mine", UserWarning, stacklevel=1)
            return super().forward(x)

    x, y = regression(n=16)
    model = Noisy(5, 1).to(F64)
    opt = hidlr.HiDLR(torch.optim.SGD(model.parameters(), lr=0.01), update_every=1)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step(lambda: nn.functional.mse_loss(model(x), y))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per location
        step()  # the guard adds its filter here
        caught.clear()
        for _ in range(5):
            step()
    assert [str(w.message) for w in caught] == []


def test_probes_share_random_numbers_and_do_not_consume_them():
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    seen = []

    def closure():
        seen.append(torch.rand(()).item())
        return (w**2).sum()

    opt = paper(torch.optim.SGD([w], lr=0.1))
    torch.manual_seed(7)
    expected = torch.rand(()).item()
    torch.manual_seed(7)
    opt.zero_grad()
    (w**2).sum().backward()
    opt.step(closure)
    assert seen == [expected] * 4
    assert torch.rand(()).item() == expected


# -- nothing lost ----------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3, 5])
def test_exception_in_closure_leaves_plain_base_step(fail_at):
    data = regression(n=32)
    ref = bn_dropout_model()
    ref_opt = torch.optim.Adam(
        [{"params": ref[0].parameters()}, {"params": ref[1:].parameters()}], lr=0.01
    )
    torch.manual_seed(5)
    train(ref, ref_opt, data, 1, closure=False)
    ref_rng = torch.get_rng_state()
    model = bn_dropout_model()
    opt = paper(
        torch.optim.Adam(
            [{"params": model[0].parameters()}, {"params": model[1:].parameters()}], lr=0.01
        )
    )
    x, y = data
    calls = []

    def closure():
        calls.append(1)
        if len(calls) - 1 == fail_at:
            raise Boom("probe failed")
        return nn.functional.mse_loss(model(x), y)

    torch.manual_seed(5)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(Boom):
        opt.step(closure)
    assert torch.equal(torch.get_rng_state(), ref_rng)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for s, r in zip(flat_state(opt), flat_state(ref_opt), strict=True):
        assert torch.equal(s, r)
    assert opt.lrs == [0.01, 0.01]
    assert opt.history == ()
    assert opt.steps == 1  # the base step happened; the next step is a plain one
    assert not opt.is_probe_step()


def test_nan_probe_rejects_that_group_and_the_paper_policy_keeps_every_rate():
    a = nn.Parameter(torch.tensor([3.0], dtype=F64))
    b = nn.Parameter(torch.tensor([2.0], dtype=F64))
    calls = []

    def closure():
        calls.append(1)
        value = (a**2).sum() + 2 * (b**2).sum()
        return value if len(calls) <= 4 else value * float("nan")

    opt = paper(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), smoothing=0.0)
    opt.zero_grad()
    closure().backward()
    calls.clear()
    opt.step(closure)
    ga, gb = opt.history[0].groups
    assert ga.accepted and ga.proposed == pytest.approx(0.5, rel=1e-10)  # its own fit stands
    assert gb.reason == "nonfinite_probe" and opt.lrs == [0.1, 0.1]  # but no rate moves alone
    assert torch.isfinite(b).all() and b.item() == pytest.approx(2.0 - 0.1 * 8.0, rel=1e-12)


def test_zero_gradient_missing_grad_and_empty_group_are_skipped_without_probes():
    a = nn.Parameter(torch.tensor([3.0], dtype=F64))
    z = nn.Parameter(torch.tensor([1.0], dtype=F64))  # zero gradient
    n = nn.Parameter(torch.tensor([5.0], dtype=F64))  # never gets a grad
    calls = []

    def closure():
        calls.append(1)
        return (a**2).sum() + 0 * z.sum()

    opt = paper(
        torch.optim.SGD([{"params": [a]}, {"params": [z]}, {"params": [n]}, {"params": []}], lr=0.1)
    )
    opt.zero_grad()
    closure().backward()
    calls.clear()
    opt.step(closure)
    assert len(calls) == 4
    reasons = [g.reason for g in opt.history[0].groups]
    assert reasons == ["accepted", "zero_direction", "zero_direction", "empty_group"]
    assert opt.lrs[1:] == [0.1, 0.1, 0.1]
    assert z.item() == 1.0 and n.item() == 5.0 and n.grad is None


def test_a_rate_too_small_to_move_the_weights_doubles_until_they_move():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))  # float32: a step below 6e-8 changes nothing
    calls = []

    def closure():
        calls.append(1)
        return ((w - 3.0) ** 2).sum()

    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1)
    opt.param_groups[0].update(hidlr_lr=1e-9, hidlr_diag_lr=1e-9)  # as after repeated cuts
    stalled = 0
    for _ in range(40):
        opt.zero_grad()
        closure().backward()
        calls.clear()
        before = w.detach().clone()
        opt.step(closure)
        rec = opt.history[-1].groups[0]
        if rec.reason != "stalled":
            break
        stalled += 1
        assert calls == [] and torch.equal(w, before)  # no probe spent, nothing moved
        assert (rec.action, rec.lr_before, rec.lr_after) == ("grow", opt.lrs[0] / 2, opt.lrs[0])
    # -1 moves toward 0 once its step, 8 * 1e-9 * 2^k, exceeds half the float32 spacing just
    # above -1 (2^-25 = 3e-8): at k = 2, after two stalled steps; then it is probed again
    assert stalled == 2 and rec.lr_before == pytest.approx(4e-9, rel=1e-12)
    assert rec.reason != "stalled" and len(calls) == 5 and not torch.equal(w, before)


def _stall(opt, w, steps):
    for _ in range(steps):
        opt.zero_grad()
        ((w - 3.0) ** 2).sum().backward()
        opt.step(lambda: ((w - 3.0) ** 2).sum())
    return [r.groups[0] for r in opt.history]


def test_a_schedule_that_stops_the_step_is_not_a_stall():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    base = torch.optim.SGD([w], lr=0.1)
    opt = hidlr.HiDLR(base, update_every=1)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda step: 0.0)
    opt.param_groups[0].update(hidlr_lr=0.01, hidlr_diag_lr=0.01)
    for _ in range(3):
        _stall(opt, w, 1)
        sched.step()
    assert [r.groups[0].reason for r in opt.history] == ["zero_direction"] * 3
    assert opt.lrs == [0.01] and w.tolist() == [1.0, -1.0]


def test_max_rate_change_bounds_the_applied_rate_of_coupled_groups():
    # y = (a + b) x: the two groups' steps act alike, the coupling factor goes to about 1/2
    def run(bound):
        torch.manual_seed(0)
        a, b = nn.Linear(10, 1, bias=False), nn.Linear(10, 1, bias=False)
        target = torch.randn(10, 1)
        batches = [
            (x := torch.randn(64, 10), x @ target + 0.1 * torch.randn(64, 1)) for _ in range(41)
        ]
        loss = lambda x, y: ((a(x) + b(x) - y) ** 2).mean()  # noqa: E731
        base = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters()}], lr=0.05)
        opt = hidlr.HiDLR(base, update_every=1, max_rate_change=bound)
        for s in range(40):
            opt.zero_grad()
            loss(*batches[s]).backward()
            opt.step(lambda s=s: loss(*batches[s + 1]))
        return opt

    free, loose, tight = run(None), run(3.0), run(1.05)
    assert free.history[-1].coupling < 0.7
    assert loose.lrs == free.lrs  # a bound that never binds changes nothing
    changes = [g.lr_after / g.lr_before for r in tight.history for g in r.groups]
    assert max(changes) <= 1.05 * (1 + 1e-12) and min(changes) >= (1 - 1e-12) / 1.05
    assert max(changes) > 1.04  # it bound (the rates did not only fall)


def test_stalled_growth_respects_max_rate_change_and_old_checkpoints():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1, max_rate_change=1.2)
    opt.param_groups[0].update(hidlr_lr=1e-9, hidlr_diag_lr=1e-9)
    rec = _stall(opt, w, 1)[-1]
    assert rec.reason == "stalled" and rec.lr_after / rec.lr_before == pytest.approx(1.2)
    # a checkpoint written before the peak rate was kept (its options come along): the
    # initial rate bounds the growth, which goes on
    w2 = nn.Parameter(torch.tensor([1.0, -1.0]))
    state = opt.state_dict()
    del state["base"]["param_groups"][0]["hidlr_peak_lr"]
    fresh = hidlr.HiDLR(torch.optim.SGD([w2], lr=0.1), update_every=1)
    with pytest.warns(UserWarning, match=r"max_rate_change=1.2 \(was None\)"):
        fresh.load_state_dict(state)
    rec = _stall(fresh, w2, 1)[-1]
    assert (rec.reason, rec.action) == ("stalled", "grow")
    assert rec.lr_after == pytest.approx(1.2 * rec.lr_before)


def test_the_paper_policy_leaves_a_stalled_rate_alone():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = paper(torch.optim.SGD([w], lr=0.1), update_every=1)
    opt.param_groups[0].update(hidlr_lr=1e-9, hidlr_diag_lr=1e-9)
    for _ in range(3):
        opt.zero_grad()
        ((w - 3.0) ** 2).sum().backward()
        opt.step(lambda: ((w - 3.0) ** 2).sum())
    assert [r.groups[0].reason for r in opt.history] == ["zero_direction"] * 3
    assert opt.lrs == [1e-9] and w.tolist() == [1.0, -1.0]


def test_a_stalled_group_grows_no_further_than_its_largest_rate():
    class SkipSecond(torch.optim.SGD):  # a base optimizer that never moves group 1
        def step(self, closure=None):
            lr = self.param_groups[1]["lr"]
            self.param_groups[1]["lr"] = 0.0
            try:
                super().step()
            finally:
                self.param_groups[1]["lr"] = lr

    a, b = (
        nn.Parameter(torch.tensor([1.0], dtype=F64)),
        nn.Parameter(torch.tensor([1.0], dtype=F64)),
    )

    def closure():
        return ((a - 3.0) ** 2).sum() + ((b - 3.0) ** 2).sum()

    opt = hidlr.HiDLR(SkipSecond([{"params": [a]}, {"params": [b]}], lr=0.1), update_every=1)
    opt.param_groups[1].update(hidlr_lr=0.03, hidlr_diag_lr=0.03)
    lrs = []
    for _ in range(4):
        opt.zero_grad()
        closure().backward()
        opt.step(closure)
        lrs.append(opt.lrs[1])
        assert opt.history[-1].groups[1].reason == "stalled"
    assert lrs == pytest.approx([0.06, 0.1, 0.1, 0.1])  # 0.1: the initial rate, its largest
    assert [r.groups[1].action for r in opt.history] == ["grow", "grow", "keep", "keep"]
    assert b.item() == 1.0


def test_gradient_accumulation_and_clipping():
    h, q = spd(5, 1)
    w = nn.Parameter(torch.randn(5, dtype=F64))
    halves = [lambda: 0.25 * w @ h @ w - 0.5 * q @ w] * 2
    full = lambda: 0.5 * w @ h @ w - q @ w  # noqa: E731
    opt = paper(torch.optim.SGD([w], lr=1.0), smoothing=0.0)
    opt.zero_grad()
    for half in halves:
        half().backward()
    torch.nn.utils.clip_grad_norm_([w], max_norm=0.5)
    g = w.grad.clone()
    assert g.norm().item() == pytest.approx(0.5)
    w0 = w.detach().clone()
    opt.step(full)
    # the clipped, accumulated gradient is the direction; the fit finds the exact line search on it
    exact = (g @ (h @ w0 - q) / (g @ h @ g)).item()
    assert opt.lrs[0] == pytest.approx(exact, rel=1e-9)


def test_autocast_bfloat16_closure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(256, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = paper(
        torch.optim.SGD(
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.01
        ),
        min_r2=0.5,
    )

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.mse_loss(model(x).float(), y)

    first = loss_fn().item()
    for _ in range(12):
        opt.zero_grad()
        loss_fn().backward()
        opt.step(loss_fn)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(opt.history) == 3 and all(r.n_probes == 8 for r in opt.history)
    assert any(g.accepted for r in opt.history for g in r.groups)
    assert loss_fn().item() < 0.7 * first


# -- checkpoints, schedulers, diagnostics ----------------------------------------------------


def make_run(seed=0):
    model = bn_dropout_model(seed)
    base = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[1:].parameters()}], lr=0.02
    )
    return model, paper(base, update_every=2, smoothing=0.5, min_r2=0.5)


def test_state_dict_round_trip_continues_bit_identically(tmp_path):
    data = regression(n=40)
    model, opt = make_run()
    torch.manual_seed(11)
    train(model, opt, data, 5)
    assert any(g.accepted for r in opt.history for g in r.groups)
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
        tmp_path / "ckpt.pt",
    )
    train(model, opt, data, 7)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2, opt2 = make_run(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    train(model2, opt2, data, 7)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt.lrs == opt2.lrs and opt.steps == opt2.steps == 12
    assert [json.dumps(r.as_dict()) for r in opt.history] == [
        json.dumps(r.as_dict()) for r in opt2.history
    ]


def test_load_state_dict_rejects_foreign_dict():
    _, opt = make_run()
    with pytest.raises(ValueError, match="keys 'base' and 'hidlr'"):
        opt.load_state_dict(opt.optimizer.state_dict())


def test_scheduler_scales_the_adapted_rate():
    h, q = spd(4, 2)
    w = nn.Parameter(torch.randn(4, dtype=F64))
    loss = lambda: 0.5 * w @ h @ w - q @ w  # noqa: E731
    opt = paper(torch.optim.SGD([w], lr=0.01), update_every=3, smoothing=0.0)
    warmup = lambda t: min(1.0, (t + 1) / 5)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    for t in range(8):
        opt.zero_grad()
        loss().backward()
        g = w.grad.clone()
        w0 = w.detach().clone()
        rate = opt.lrs[0]
        probe = opt.is_probe_step()
        opt.step(loss)
        if not probe:  # a plain step uses the adapted rate times the schedule's factor
            torch.testing.assert_close(w.detach(), w0 - rate * warmup(t) * g, rtol=0, atol=1e-14)
        else:  # the fit proposes the optimal step; the schedule still scales it
            eta = (g @ g / (g @ h @ g)).item()
            assert opt.lrs[0] == pytest.approx(eta, rel=1e-9)
            torch.testing.assert_close(w.detach(), w0 - eta * warmup(t) * g, rtol=0, atol=1e-14)
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * warmup(t + 1))


def test_warmup_scheduler_attached_to_the_base_first():
    # a warm-up built on the base optimizer sets lr to 0 before Hi-DLR wraps it
    h, q = spd(4, 2)
    w = nn.Parameter(torch.randn(4, dtype=F64))
    loss = lambda: 0.5 * w @ h @ w - q @ w  # noqa: E731
    base = torch.optim.SGD([w], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda t: t / 4)
    assert base.param_groups[0]["lr"] == 0.0
    opt = paper(base, update_every=2, smoothing=0.0)
    assert opt.lrs == [0.01]  # the rate Hi-DLR adapts is the schedule's initial_lr
    w0 = w.detach().clone()
    opt.zero_grad()
    loss().backward()
    opt.step(loss)  # factor 0: nothing moves and nothing is fitted
    assert torch.equal(w.detach(), w0) and opt.lrs == [0.01]
    for _ in range(3):
        sched.step()
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    assert opt.lrs[0] != 0.01 and not torch.equal(w.detach(), w0)
    base.param_groups[0]["initial_lr"] = 0.0
    with pytest.raises(ValueError, match=r"\['initial_lr'\] must be a finite float > 0"):
        hidlr.HiDLR(base)
    base.param_groups[0]["initial_lr"], base.param_groups[0]["lr"] = 0.01, -1.0
    with pytest.raises(ValueError, match=r"\['lr'\] must be a finite float >= 0"):
        hidlr.HiDLR(base)


def test_cosine_scheduler_with_rejected_fits_matches_base_alone():
    data = regression()
    ref = small_mlp()
    ref_opt = torch.optim.SGD(groups_of(ref), lr=0.05)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=10)
    model = small_mlp()
    opt = paper(torch.optim.SGD(groups_of(model), lr=0.05), min_r2=NEVER)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(10):
        train(ref, ref_opt, data, 1, closure=False)
        ref_sched.step()
        train(model, opt, data, 1)
        sched.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)


def test_history_is_bounded_and_exports(tmp_path):
    data = regression()
    model = small_mlp()
    opt = paper(
        torch.optim.Adam(groups_of(model), lr=0.01), update_every=1, history_size=3, min_r2=0.0
    )
    train(model, opt, data, 5)
    assert [r.step for r in opt.history] == [2, 3, 4]
    rows = hidlr.history_rows(opt.history)
    assert len(rows) == 6 and rows[-1]["lr_after"] == opt.lrs[1]
    saved = json.loads(hidlr.save_history(opt.history, tmp_path / "h.json").read_text())
    assert [r["group"] for r in saved] == [0, 1] * 3
    assert saved[0]["b"] == pytest.approx(opt.history[0].groups[0].b)
    robust = hidlr.HiDLR(torch.optim.Adam(groups_of(model), lr=0.01), update_every=1)
    train(model, robust, data, 2)
    last = robust.history[-1]  # the robust policy's joint check is exported too
    assert math.isfinite(last.step_loss) and math.isfinite(last.coupling)
    row = hidlr.history_rows(robust.history)[-1]
    assert [row[k] for k in ("step_loss", "coupling_ratio", "coupling")] == [
        last.step_loss,
        last.coupling_ratio,
        last.coupling,
    ]
    lines = hidlr.save_history(opt.history, tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith(
        "step,loss,n_probes,step_loss,coupling_ratio,coupling,group,lr_before,lr_after,proposed"
    )
    assert len(lines) == 7


# -- bad input -------------------------------------------------------------------------------


def sgd():
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"update_every": 0}, ValueError, r"update_every must be an int >= 1, got 0"),
        ({"update_every": 2.0}, TypeError, r"update_every must be an int >= 1, got 2.0"),
        (
            {"smoothing": 1.0},
            ValueError,
            r"smoothing must be a finite float >= 0.0 and < 1.0, got 1.0",
        ),
        ({"smoothing": -0.1}, ValueError, r"smoothing must be .* got -0.1"),
        (
            {"probe_multipliers": (1, 2)},
            ValueError,
            r"probe_multipliers must be .* at least 3 non-zero, or 2 non-zero and 0",
        ),
        (
            {"probe_multipliers": (0, 1)},
            ValueError,
            r"probe_multipliers must be .*2 non-zero and 0",
        ),
        ({"probe_multipliers": (0, -1, 1, 2, 0)}, ValueError, r"probe_multipliers .*distinct"),
        ({"probe_multipliers": (-1, 1, float("inf"))}, ValueError, r"probe_multipliers .*finite"),
        ({"probe_multipliers": (1, 1, 2)}, ValueError, r"probe_multipliers must be .*distinct"),
        ({"probe_multipliers": (-1, -2, -3)}, ValueError, r"probe_multipliers must be .*> 0"),
        ({"probe_multipliers": 3}, TypeError, r"probe_multipliers must be a sequence"),
        ({"min_r2": "high"}, TypeError, r"min_r2 must be a finite float, got 'high'"),
        ({"min_r2": float("nan")}, ValueError, r"min_r2 must be a finite float, got nan"),
        ({"coupled": 1}, TypeError, r"coupled must be a bool, got 1"),
        (
            {"max_rate_change": 1.0},
            ValueError,
            r"max_rate_change must be a finite float > 1.0, got 1.0",
        ),
        ({"history_size": -1}, ValueError, r"history_size must be an int >= 0, got -1"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        hidlr.HiDLR(sgd(), **kwargs)


def test_bad_optimizer_and_rates():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer .* got Linear"):
        hidlr.HiDLR(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="other than HiDLR"):
        hidlr.HiDLR(hidlr.HiDLR(sgd()))
    zero = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.0}], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be a finite float > 0"):
        hidlr.HiDLR(zero)
    tensor_lr = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.1))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] must be a float"):
        hidlr.HiDLR(tensor_lr)


def test_closure_errors_on_probe_steps():
    w = nn.Parameter(torch.ones(3))
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=2)
    (w**2).sum().backward()
    with pytest.raises(
        ValueError, match=r"closure must be a callable returning the loss .* update_every=2"
    ):
        opt.step()
    with pytest.raises(
        ValueError, match=r"closure must return a scalar loss, got a tensor of shape \(3,\)"
    ):
        opt.step(lambda: w**2)
    assert torch.equal(w.detach(), torch.ones(3) - 0.1 * 2)  # the base step stands, probes undone
    opt.step()  # a plain step needs no closure
    with pytest.raises(
        TypeError, match="closure must return a scalar loss tensor or float, got str"
    ):
        opt.step(lambda: "loss")


def test_add_param_group_and_repr():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = hidlr.HiDLR(torch.optim.SGD([a], lr=0.1))
    opt.add_param_group({"params": [b], "lr": 0.3})
    assert opt.lrs == [0.1, 0.3]
    assert "update_every=4" in repr(opt) and "SGD" in repr(opt)
    assert copy.deepcopy(opt).lrs == [0.1, 0.3]


def test_a_rejected_param_group_is_not_kept():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = hidlr.HiDLR(torch.optim.SGD([a], lr=0.1), update_every=1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite float > 0"):
        opt.add_param_group({"params": [b], "lr": 0.0})
    assert len(opt.param_groups) == 1
    a.grad = torch.ones(2)
    opt.step(lambda: (a**2).sum())  # still steps
    assert opt.lrs[0] > 0 and not torch.equal(a.detach(), torch.ones(2))


@pytest.mark.parametrize("accept", [True, False])
def test_parameters_keep_their_storage_and_shared_storage_stays_shared(accept):
    def make():
        flat = torch.zeros(8, dtype=F64)
        a = nn.Parameter(flat[:4])  # a view of a larger buffer: exchanged bitwise, in place
        b = nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=F64))  # owns its storage: by pointer
        with torch.no_grad():
            a.copy_(torch.arange(4.0, dtype=F64))
        return flat, a, b, lambda: ((a - 1.0) ** 2).sum() + 3 * ((b + 2.0) ** 2).sum()

    _, ra, rb, ref_loss = make()
    ref = torch.optim.SGD([{"params": [ra]}, {"params": [rb]}], lr=0.05)
    flat, a, b, loss = make()
    ptrs = (a.data_ptr(), b.data_ptr())
    opt = paper(
        torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.05),
        min_r2=-1.0 if accept else NEVER,
        smoothing=0.0,
    )
    for _ in range(3):
        for o, f in ((opt, loss), (ref, ref_loss)):
            o.zero_grad()
            f().backward()
            o.step(f) if o is opt else o.step()
    assert (a.data_ptr(), b.data_ptr()) == ptrs
    assert a.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    if accept:  # exact line search on separable quadratics: at the minimum after one step
        assert torch.allclose(a.detach(), torch.ones(4, dtype=F64))
        assert torch.allclose(b.detach(), torch.full((4,), -2.0, dtype=F64))
    else:
        assert torch.equal(a.detach(), ra.detach()) and torch.equal(b.detach(), rb.detach())


def test_mover_moves_on_from_a_near_zero_offset():
    """A probe a hair from the base step (c * rate / used - 1 rounding to ~1e-16) must not
    lose the direction: the next probe lands where it should, not on rounding noise."""
    from hidlr._probing import GroupMover

    p = torch.tensor([1.0], dtype=F64)  # w0; w1 = 2, so the direction is 1
    mover = GroupMover([p], [torch.tensor([2.0], dtype=F64)])
    mover.move(1e-17)
    assert torch.equal(p, torch.tensor([2.0], dtype=F64))  # taken as w1 itself
    mover.move(1.0)
    assert torch.equal(p, torch.tensor([3.0], dtype=F64))
    mover.finish(0.5)
    assert torch.equal(p, torch.tensor([2.5], dtype=F64))


def test_grad_scaler_steps_hidlr_with_a_positional_closure():
    """Mixed precision in a hand-written loop: ``scaler.step(opt, closure)`` (GradScaler refuses
    a ``closure=`` keyword, not a positional one). Power-of-two loss scaling is exact, so the run
    is bit-identical to one without the scaler; a step with an inf gradient is skipped whole."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randn(64, 1, generator=gen)

    def run(scaled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        base = torch.optim.Adam(
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2
        )
        opt = hidlr.HiDLR(base, update_every=2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for step in range(12):
            xb, yb = x[step * 5 % 60 :][:16], y[step * 5 % 60 :][:16]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            closure = partial(lambda a, b: nn.functional.mse_loss(model(a), b), xb, yb)
            if not scaled:
                loss.backward()
                opt.step(closure)
                continue
            scaler.scale(loss).backward()
            if step == 6:  # an overflow on a probe step: nothing may move, nothing is probed
                model[0].weight.grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
                steps, probes, rates = opt.steps, len(opt.history), opt.lrs
            scaler.step(opt, closure)
            scaler.update()
            if step == 6:
                assert (
                    opt.is_probe_step()
                    and opt.steps == steps
                    and len(opt.history) == probes
                    and opt.lrs == rates
                )
                for p, q in zip(model.parameters(), before, strict=True):
                    assert torch.equal(p, q)
                scaler.update(2.0**8)  # the unscaled run has no skipped step to catch up on
                opt.zero_grad()
                scaler.scale(nn.functional.mse_loss(model(xb), yb)).backward()
                scaler.step(opt, closure)
                scaler.update()
        return [p.detach() for p in model.parameters()], opt.lrs, len(opt.history)

    plain, scaled = run(False), run(True)
    assert plain[2] == scaled[2] == 6
    assert plain[1] == scaled[1]
    for p, q in zip(plain[0], scaled[0], strict=True):
        assert torch.equal(p, q)


# -- found by review: what the probes must not touch ---------------------------------------------


class _FlatLinear(nn.Module):
    """Parameters that are views of one registered buffer (a flat-parameter layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("flat", torch.randn(16, dtype=F64))
        self.weight = nn.Parameter(self.flat[:12].view(4, 3))
        self.bias = nn.Parameter(self.flat[12:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


class _Arena(nn.Module):
    """Parameters and BatchNorm statistics side by side in one flat tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        arena = torch.randn(28, dtype=F64)
        self.register_buffer("arena", arena)
        self.weight = nn.Parameter(arena[:12].view(4, 3))
        self.bn = nn.BatchNorm1d(4).to(F64)
        self.bn.weight, self.bn.bias = nn.Parameter(arena[12:16]), nn.Parameter(arena[16:20])
        with torch.no_grad():
            self.bn.weight.fill_(1.0)
            self.bn.bias.zero_()
            arena[20:24].zero_()
            arena[24:28].fill_(1.0)
        self.bn.running_mean, self.bn.running_var = arena[20:24], arena[24:28]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x @ self.weight.t())


class _Registers(nn.Module):
    """Registers a buffer the first time it sees a batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = f"seen_{x.shape[0]}"
        if not hasattr(self, name):
            self.register_buffer(name, torch.zeros((), dtype=F64))
        getattr(self, name).add_(1)
        return x


@pytest.mark.parametrize("layout", ["flat", "arena", "registers"])
def test_probes_leave_parameter_buffers_and_new_buffers_alone(layout):
    def make():
        torch.manual_seed(0)
        if layout == "flat":
            return _FlatLinear()
        if layout == "arena":
            return _Arena()
        return nn.Sequential(nn.Linear(3, 4).to(F64), _Registers())

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen, dtype=F64), torch.randn(8, 4, generator=gen, dtype=F64)
    px = 5 + torch.randn(6, 3, generator=gen, dtype=F64)  # another batch size and mean
    ref, model = make(), make()
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = paper(torch.optim.SGD(model.parameters(), lr=0.1), min_r2=NEVER)
    for m, o, closure in ((ref, plain, None), (model, opt, lambda: model(px).pow(2).mean())):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step(closure)
    assert len(opt.history[-1].groups) == 1 and opt.history[-1].n_probes >= 4
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), model.named_buffers(), strict=True):
        assert n1 == n2 and torch.equal(b1, b2)
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_parameters_sharing_data_are_refused():
    enc, dec = nn.Linear(3, 3), nn.Linear(3, 3)
    dec.weight.data = enc.weight.data  # two Parameters over one memory
    base = torch.optim.SGD([{"params": enc.parameters()}, {"params": dec.parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] and .* share memory"):
        hidlr.HiDLR(base)
    opt = hidlr.HiDLR(torch.optim.SGD(enc.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [dec.weight]})
    assert len(opt.param_groups) == 1
    flat = torch.zeros(8)  # views side by side in one storage are fine
    hidlr.HiDLR(torch.optim.SGD([nn.Parameter(flat[:4]), nn.Parameter(flat[4:])], lr=0.1))
    w = torch.zeros(4, 6)  # and interleaved ones that share no element
    halves = [nn.Parameter(w[:, :3]), nn.Parameter(w[:, 3:])]
    z = torch.zeros(3, dtype=torch.complex64)
    parts = [nn.Parameter(z.real), nn.Parameter(z.imag)]
    hidlr.HiDLR(torch.optim.SGD([{"params": [p]} for p in halves + parts], lr=0.1))
    overlapping = [nn.Parameter(w[:, :4]), nn.Parameter(w[:, 3:])]  # column 3 in both
    with pytest.raises(ValueError, match="share memory"):
        hidlr.HiDLR(torch.optim.SGD(overlapping, lr=0.1))


def test_one_probe_that_blows_up_halves_the_rate_and_is_no_spike():
    w = nn.Parameter(torch.tensor([1.0], dtype=F64))
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1)
    for step in range(3):
        calls = []

        def closure(step=step, calls=calls):
            calls.append(1)
            if step == 2 and len(calls) == 5:  # the farthest probe, at twice the step
                return torch.tensor(float("inf"))
            return ((w - 3.0) ** 2).sum()

        before = opt.lrs[0]
        opt.zero_grad()
        ((w - 3.0) ** 2).sum().backward()
        opt.step(closure)
    group = opt.history[-1].groups[0]
    assert (group.reason, group.action) == ("nonfinite_probe", "shrink")
    assert opt.lrs[0] == pytest.approx(0.5 * before, rel=1e-12)


def test_a_copy_after_a_scheduler_steps_only_itself():
    w = nn.Parameter(torch.ones(2))
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1000)
    torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # wraps opt.step on the instance
    clone = copy.deepcopy(opt)
    w2 = clone.param_groups[0]["params"][0]
    w.grad, w2.grad = torch.ones(2), torch.ones(2)
    clone.step(lambda: w2.sum())
    assert torch.equal(w.detach(), torch.ones(2)) and not torch.equal(w2.detach(), torch.ones(2))
    assert (opt.steps, clone.steps) == (0, 1)
    assert pickle.loads(pickle.dumps(opt)).steps == 0


def test_a_failing_deferred_closure_drops_the_probes_before_the_step():
    w = nn.Parameter(torch.tensor([1.0, -1.0], dtype=F64))
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=2, defer_probes=True)
    loss = lambda: ((w - 3.0) ** 2).sum()  # noqa: E731
    opt.zero_grad()
    loss().backward()
    opt.step(loss)  # the probe step: its update now, its probes at the next step
    after_probe_step, lrs = w.detach().clone(), opt.lrs
    opt.zero_grad()
    loss().backward()

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(fails)
    assert torch.equal(w.detach(), after_probe_step) and opt.lrs == lrs and opt.steps == 1
    assert not opt.needs_closure()  # the probes are gone; the retry is a plain step
    opt.step()
    assert torch.equal(w.detach(), after_probe_step.add(w.grad, alpha=-0.1))


def test_the_paper_policy_moves_all_rates_or_none():
    # group 0 convex along its step, group 1 concave: Algorithm 1 keeps every rate
    h = torch.diag(torch.tensor([2.0, 3.0, -1.0, -0.5], dtype=F64))
    q = torch.tensor([1.0, -1.0, 0.5, 0.2], dtype=F64)
    ps = [nn.Parameter(torch.tensor(v, dtype=F64)) for v in ([0.3, 0.2], [0.4, -0.1])]
    opt = paper(torch.optim.SGD([{"params": [p]} for p in ps], lr=0.1), smoothing=0.5)
    loss = lambda: 0.5 * torch.cat(ps) @ h @ torch.cat(ps) - q @ torch.cat(ps)  # noqa: E731
    opt.zero_grad()
    loss().backward()
    opt.step(loss)
    assert [g.reason for g in opt.history[0].groups] == ["accepted", "not_convex"]
    assert opt.lrs == [0.1, 0.1]


def test_probes_are_fitted_where_they_are_with_a_scheduler_factor_near_one():
    # offsets within 1e-3 of the base step are taken at it: the fit must use that position
    h, q = spd(4, 3)
    w = nn.Parameter(torch.randn(4, dtype=F64))
    loss = lambda: 0.5 * w @ h @ w - q @ w  # noqa: E731
    opt = paper(torch.optim.SGD([w], lr=0.3), update_every=100, smoothing=0.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9995)
    opt.zero_grad()
    loss().backward()
    g = w.grad.clone()
    opt.step(loss)
    group = opt.history[0].groups[0]
    assert group.b == pytest.approx((g @ g).item(), rel=1e-12)
    assert pytest.approx((g @ h @ g).item(), rel=1e-12) == group.A


def test_step_hooks_run_once_per_step_in_subclasses():
    # torch wraps each class's step with the hooks; a subclass's step calling HiDLR.step would
    # run them twice once any plain HiDLR exists (it wraps HiDLR.step too)
    from hidlr.integrations.transformers import ClosureHiDLR

    hidlr.HiDLR(sgd())
    w = nn.Parameter(torch.ones(2))
    opt = ClosureHiDLR(torch.optim.SGD([w], lr=0.1), update_every=2)
    opt.default_closure = lambda: (w**2).sum()
    calls = {"pre": 0, "post": 0}
    opt.register_step_pre_hook(lambda *a: calls.__setitem__("pre", calls["pre"] + 1))
    opt.register_step_post_hook(lambda *a: calls.__setitem__("post", calls["post"] + 1))
    for _ in range(4):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert calls == {"pre": 4, "post": 4} and opt.steps == 4


def test_group_names_are_distinct_for_logs():
    from hidlr.integrations import group_names

    ps = [nn.Parameter(torch.ones(1)) for _ in range(4)]
    groups = [{"params": [ps[0]], "name": "group1"}, {"params": [ps[1]]}]
    groups += [{"params": [ps[2]], "name": "x"}, {"params": [ps[3]], "name": "x"}]
    names = group_names(hidlr.HiDLR(torch.optim.SGD(groups, lr=0.1)))
    assert names == ["group1", "group1_1", "group2", "group3"] and len(set(names)) == 4


# -- found by review (session 7): hooks, base checkpoints, options, compile ------------------


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    x = torch.randn(16, 3, dtype=F64)
    y = x[:, :1].sin()
    loss = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    return model, loss, groups


def _train(opt, loss, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)


def test_state_dict_hooks_on_the_wrapper_run_as_torchs_do():
    _, loss, groups = _tiny()
    opt = hidlr.HiDLR(torch.optim.SGD(groups, lr=0.05), update_every=1)
    _train(opt, loss, 2)
    fired = []
    opt.register_state_dict_pre_hook(lambda o: fired.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})  # may replace it
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: fired.append("loaded"))
    state = opt.state_dict()
    assert fired == ["pre"] and state["extra"] == 1
    opt.load_state_dict(state)  # the pre-hook takes the extra key out again
    assert fired == ["pre", "loaded"]


def test_copies_and_pickles_drop_the_hooks_as_torchs_optimizers_do():
    _, loss, groups = _tiny()
    opt = hidlr.HiDLR(torch.optim.SGD(groups, lr=0.05), update_every=1)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))  # a lambda: unpicklable
    _train(opt, loss, 1)
    copied = pickle.loads(pickle.dumps(opt))
    deep = copy.deepcopy(opt)
    assert calls == [1] and not copied._optimizer_step_post_hooks
    assert not deep._optimizer_step_post_hooks and deep.lrs == opt.lrs


def test_a_checkpoint_of_the_base_optimizer_loads_into_it():
    _, pre_loss, pre_groups = _tiny()
    plain = torch.optim.Adam(pre_groups, lr=0.02)
    plain.zero_grad()
    pre_loss().backward()
    plain.step()
    model, loss, groups = _tiny()
    opt = hidlr.HiDLR(torch.optim.Adam(groups, lr=0.01), update_every=1)
    opt.optimizer.load_state_dict(plain.state_dict())  # e.g. a pre-training checkpoint
    assert opt.lrs == [0.02, 0.02]  # Hi-DLR starts afresh from the checkpoint's rates
    before = [p.detach().clone() for p in model.parameters()]
    _train(opt, loss, 2)
    assert len(opt.history) == 2 and opt.lrs != [0.02, 0.02]
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_loading_a_checkpoint_with_other_options_says_which():
    _, loss, groups = _tiny()
    saved = hidlr.HiDLR(torch.optim.SGD(groups, lr=0.05), update_every=3)
    _train(saved, loss, 1)
    opt = hidlr.HiDLR(torch.optim.SGD(_tiny()[2], lr=0.05), update_every=10, policy="paper")
    with pytest.warns(
        UserWarning, match=r"policy='robust' \(was 'paper'\).*update_every=3 \(was 10\)"
    ):
        opt.load_state_dict(saved.state_dict())
    assert opt.options["update_every"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(saved.state_dict())  # the same options: no warning


def test_maximize_and_meta_parameters_are_refused_by_name():
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['maximize'\] must be False"):
        hidlr.HiDLR(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, maximize=True))
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is on the meta device"
    ):
        hidlr.HiDLR(
            torch.optim.SGD(
                [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))], lr=0.1
            )
        )


def test_compiled_model_with_many_module_classes_does_not_recompile_the_guard():
    """The buffer guard's hook is not traced: traced, it recompiled once per module class
    it ran for, up to dynamo's limit."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    acts = [nn.Tanh(), nn.ReLU(), nn.GELU(), nn.SiLU(), nn.ELU(), nn.Sigmoid()]
    model = nn.Sequential(
        nn.Linear(4, 8), *[m for a in acts for m in (nn.Linear(8, 8), a)], nn.Linear(8, 1)
    )
    forward = torch.compile(model, backend="eager")
    opt = hidlr.HiDLR(torch.optim.AdamW(model.parameters(), lr=1e-2), update_every=2)
    x = torch.randn(16, 4)
    y = x.sum(1, keepdim=True)
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(forward(x), y).backward()
            opt.step(lambda: nn.functional.mse_loss(forward(x), y))
    assert len(opt.history) == 2


def test_a_base_checkpoint_loaded_after_a_freeze_trains_the_group_again():
    groups = _tiny()[2]
    plain_groups = _tiny()[2]
    plain = torch.optim.SGD(plain_groups, lr=0.02)
    opt = hidlr.HiDLR(torch.optim.SGD(groups, lr=0.01), update_every=1)
    params = list(opt.param_groups[0]["params"])
    opt.freeze(0)
    assert not any(p.requires_grad for p in params)
    opt.optimizer.load_state_dict(plain.state_dict())  # a checkpoint from before any freeze
    assert opt.frozen == [False, False] and all(p.requires_grad for p in params)
    opt.freeze(0)
    opt.optimizer.load_state_dict(opt.optimizer.state_dict())  # its own: stays frozen
    assert opt.frozen[0] and not any(p.requires_grad for p in params)
