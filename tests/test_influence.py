"""Group influence (b^2 / 2A) and automatic freezing."""

import pytest
import torch
from torch import nn

import hidlr
from hidlr.influence import choose_frozen, predicted_decrease, update_influence

F64 = torch.float64


def test_predicted_decrease_and_average():
    assert predicted_decrease(2.0, 4.0) == 0.5
    assert predicted_decrease(-2.0, 4.0) == 0.0 and predicted_decrease(2.0, -1.0) == 0.0
    assert predicted_decrease(float("nan"), 1.0) == 0.0
    assert update_influence(123.0, 0, 2.0, 0.9) == 2.0  # the first sample replaces
    assert update_influence(2.0, 1, 4.0, 0.5) == pytest.approx(2.0 + (0.5 / 0.75) * 2.0)


def test_choose_frozen():
    infl = [10.0, 0.1, 5.0, 0.0]
    assert choose_frozen(infl, [False] * 4, threshold=0.05, budget=None) == [1, 3]
    assert choose_frozen(infl, [False] * 4, threshold=None, budget=2) == [1, 3]
    assert choose_frozen(infl, [False, False, True, False], threshold=None, budget=1) == [1, 3]
    assert choose_frozen([0.0, 0.0], [False, False], threshold=0.5, budget=None) == []  # no signal
    assert (
        choose_frozen(infl, [False, True, True, True], threshold=0.9, budget=1) == []
    )  # keeps one


def test_influence_is_b_squared_over_2a_on_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen, dtype=F64)
    h = m @ m.T + torch.eye(5, dtype=F64)
    w = nn.Parameter(torch.randn(5, generator=gen, dtype=F64))
    loss = lambda: 0.5 * w @ h @ w  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.01))
    opt.zero_grad()
    loss().backward()
    g = w.grad.clone()
    opt.step(loss)
    expected = (g @ g) ** 2 / (2 * g @ h @ g)
    assert opt.influence[0] == pytest.approx(expected.item(), rel=1e-9)
    assert opt.influence_share == [1.0]
    rec = opt.history[0].groups[0]
    assert rec.influence == opt.influence[0] and rec.share == 1.0


def two_part_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({"useful": nn.Linear(6, 1), "useless": nn.Linear(6, 1, bias=False)})
    with torch.no_grad():
        model["useless"].weight.fill_(1e-3)
    return model


def forward(model, x):
    # the "useless" branch sees noise unrelated to the target: at best it fits a little noise
    return model["useful"](x[:, :6]) + model["useless"](x[:, 6:])


def make(model, **options):
    base = torch.optim.Adam(
        [{"params": model["useful"].parameters()}, {"params": model["useless"].parameters()}],
        lr=0.01,
    )
    return hidlr.HiDLR(base, update_every=2, freeze_threshold=0.02, freeze_warmup=3, **options)


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 12, generator=gen)
    return x, x[:, :6] @ torch.arange(6.0)[:, None] / 6


def run(model, opt, steps, calls=None):
    x, y = data()

    def closure():
        if calls is not None:
            calls.append(1)
        return nn.functional.mse_loss(forward(model, x), y)

    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(forward(model, x), y).backward()
        opt.step(closure)


def test_low_influence_group_is_frozen_for_real(tmp_path):
    model = two_part_model()
    opt = make(model)
    run(model, opt, 6)  # three probe steps: the warm-up
    assert opt.frozen == [False, True]
    assert opt.influence_share[1] == 0.0 and opt.influence_share[0] == 1.0
    useless = list(model["useless"].parameters())
    assert all(not p.requires_grad and p.grad is None for p in useless)
    assert all(p not in opt.optimizer.state for p in useless)
    before = [p.detach().clone() for p in useless]
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, tmp_path / "after.pt")
    calls: list[int] = []
    run(model, opt, 4, calls)
    assert len(calls) == 2 * 5  # two probe steps: the loss at w0 and the live group's probes
    assert all(p.grad is None for p in useless)  # no gradient is computed for it
    assert all(torch.equal(p, q) for p, q in zip(useless, before, strict=True))
    assert opt.history[-1].groups[1].reason == "frozen"

    model2 = two_part_model()
    opt2 = make(model2)
    ckpt = torch.load(tmp_path / "after.pt", weights_only=False)
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    assert opt2.frozen == [False, True] and not model2["useless"].weight.requires_grad
    run(model2, opt2, 4)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_from_before_freezing_restores_the_group(tmp_path):
    model = two_part_model()
    opt = make(model)
    run(model, opt, 2)
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, tmp_path / "before.pt")
    run(model, opt, 4)
    assert opt.frozen == [False, True]
    ckpt = torch.load(tmp_path / "before.pt", weights_only=False)
    model.load_state_dict(ckpt["m"])
    opt.load_state_dict(ckpt["o"])
    assert opt.frozen == [False, False]
    assert all(p.requires_grad for p in model.parameters())


def test_parameters_the_user_froze_stay_frozen(tmp_path):
    def build():
        model = two_part_model()
        mine = [nn.Parameter(torch.zeros(2), requires_grad=False) for _ in range(2)]
        base = torch.optim.Adam(
            [
                {"params": [*model["useful"].parameters(), mine[0]]},
                {"params": [*model["useless"].parameters(), mine[1]]},
            ],
            lr=0.01,
        )
        opt = hidlr.HiDLR(base, update_every=2, freeze_threshold=0.02, freeze_warmup=3)
        return model, mine, opt

    model, mine, opt = build()
    run(model, opt, 2)
    torch.save(opt.state_dict(), tmp_path / "before.pt")
    run(model, opt, 4)
    assert opt.frozen == [False, True] and not model["useless"].weight.requires_grad
    opt.unfreeze(1)
    assert model["useless"].weight.requires_grad and not mine[1].requires_grad
    opt.freeze(1)
    opt.freeze(1)  # twice: what unfreeze puts back is still what the first freeze found
    opt.load_state_dict(torch.load(tmp_path / "before.pt", weights_only=True))
    assert opt.frozen == [False, False] and model["useless"].weight.requires_grad
    assert not mine[0].requires_grad and not mine[1].requires_grad

    # a fresh process resuming: groups Hi-DLR never froze are left as the user set them
    _, mine2, opt2 = build()
    opt2.load_state_dict(torch.load(tmp_path / "before.pt", weights_only=True))
    assert not mine2[0].requires_grad and not mine2[1].requires_grad


def test_freezing_logs_the_share_the_group_had(caplog):
    model = two_part_model()
    opt = make(model)
    with caplog.at_level("INFO", logger="hidlr.optimizer"):
        run(model, opt, 6)
    assert opt.frozen == [False, True]
    (message,) = [r.getMessage() for r in caplog.records if "froze group 1" in r.getMessage()]
    share = opt.history[-1].groups[1].share  # recorded at the probe step that froze it
    assert 0 < share < 0.02 and message.endswith(f"(influence share {share:.3g})")


def test_budget_keeps_the_most_influential():
    model = two_part_model()
    opt = make(model, freeze_budget=1)
    run(model, opt, 6)
    assert opt.frozen == [False, True]
    opt.unfreeze(1)
    assert opt.frozen == [False, False] and model["useless"].weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"freeze_threshold": 0.0},
            r"freeze_threshold must be a finite float > 0.0 and < 1.0, got 0.0",
        ),
        ({"freeze_threshold": 1.0}, r"freeze_threshold must be .* got 1.0"),
        ({"freeze_budget": 0}, r"freeze_budget must be an int >= 1, got 0"),
        ({"freeze_warmup": -1}, r"freeze_warmup must be an int >= 0, got -1"),
    ],
)
def test_bad_freeze_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hidlr.HiDLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), **kwargs)
