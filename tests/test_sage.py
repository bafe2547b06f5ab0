"""Tests for hidlr.sage (SAGE, Liang et al. 2022).

The expected values are computed here from the formulas in the module docstring with plain
torch ops, independently of the implementation.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from hidlr.sage import SAGE, sage_param_groups

DT = torch.float64

# A small quadratic 0.5 * ||A theta - b||^2 gives the gradients; they are set by hand so the
# optimizer and the reference see bit-identical gradients.
_gen = torch.Generator().manual_seed(1234)
A = torch.randn(3, 3, generator=_gen, dtype=DT)
B = torch.randn(3, generator=_gen, dtype=DT)
THETA0 = torch.tensor([[0.8, -1.3, 0.4], [-0.2, 1.1, -0.7]], dtype=DT)


def quad_grad(theta: torch.Tensor) -> torch.Tensor:
    """Gradient of 0.5 * sum_rows ||A row - B||^2 for a (k, 3) parameter."""
    return (theta @ A.T - B) @ A


def reference_trajectory(
    theta0: torch.Tensor,
    steps: int,
    *,
    variant: str,
    sage: bool,
    bias_correction: bool,
    lr: float,
    betas: tuple[float, float],
    beta3: float,
    eps: float,
    weight_decay: float,
) -> list[torch.Tensor]:
    """The SAGE recursion written out step by step from the documented formula."""
    beta1, beta2 = betas
    theta = theta0.clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)  # adamw: second moment
    u = torch.zeros_like(theta)  # adamax: infinity norm
    ibar = torch.zeros_like(theta)
    out = []
    for t in range(1, steps + 1):
        g = quad_grad(theta)
        if sage:
            sens = torch.abs(theta * g)
            ibar = beta3 * ibar + (1 - beta3) * sens
            ihat = ibar / (1 - beta3**t) if bias_correction else ibar
            scale = torch.abs(sens - ihat) / (ihat + eps**2)
        else:
            scale = torch.ones_like(theta)
        m = beta1 * m + (1 - beta1) * g
        m_hat = m / (1 - beta1**t)
        if variant == "adamw":
            v = beta2 * v + (1 - beta2) * g * g
            direction = m_hat / (torch.sqrt(v) / math.sqrt(1 - beta2**t) + eps)
            theta = theta - lr * weight_decay * theta - lr * scale * direction
        else:
            u = torch.maximum(beta2 * u, torch.abs(g) + eps)
            direction = m_hat / u
            theta = theta - lr * scale * (direction + weight_decay * theta)
        out.append(theta.clone())
    return out


HYPER = {"lr": 0.05, "betas": (0.8, 0.95), "beta3": 0.7, "eps": 1e-3, "weight_decay": 0.1}


@pytest.mark.parametrize("variant", ["adamw", "adamax"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_steps_match_hand_computed_formula(variant: str, bias_correction: bool) -> None:
    # A large eps makes the placement of eps (Adam's and the eps**2 of SAGE) visible.
    p_sage = THETA0.clone().requires_grad_(True)
    p_plain = (THETA0.flip(0) * 0.5).requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": [p_sage]}, {"params": [p_plain], "sage": False}]
    opt = SAGE(
        groups,
        variant=variant,
        sensitivity_bias_correction=bias_correction,
        **HYPER,  # type: ignore[arg-type]
    )
    common = {"variant": variant, "bias_correction": bias_correction, **HYPER}
    expected_sage = reference_trajectory(THETA0, 3, sage=True, **common)  # type: ignore[arg-type]
    expected_plain = reference_trajectory(
        THETA0.flip(0) * 0.5,
        3,
        sage=False,
        **common,  # type: ignore[arg-type]
    )
    for t in range(3):
        for p in (p_sage, p_plain):
            p.grad = quad_grad(p.detach())
        opt.step()
        torch.testing.assert_close(p_sage.detach(), expected_sage[t], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p_plain.detach(), expected_plain[t], rtol=1e-12, atol=1e-15)
    # SAGE actually changed the trajectory compared with the plain step.
    plain_from_same_start = reference_trajectory(THETA0, 3, sage=False, **common)  # type: ignore[arg-type]
    assert not torch.allclose(p_sage.detach(), plain_from_same_start[-1], atol=1e-6)


@pytest.mark.parametrize(
    ("variant", "bias_correction", "expected"),
    [
        # I = |2 * 0.5| = 1; Ibar = 0.15; Adam direction = 0.5 / (0.5 + 1e-8) at t = 1.
        ("adamw", False, 2.0 - 0.1 * 0.01 * 2.0 - 0.1 * (0.85 / 0.15) * 0.5 / (0.5 + 1e-8)),
        # Bias-corrected Ihat = I on the first step: the scale is 0, only decay acts.
        ("adamw", True, 2.0 * (1 - 0.1 * 0.01)),
        # Adamax: u = |g| + eps, direction = 0.5 / (0.5 + 1e-8); decay inside the scaled step.
        ("adamax", False, 2.0 - 0.1 * (0.85 / 0.15) * (0.5 / (0.5 + 1e-8) + 0.01 * 2.0)),
        ("adamax", True, 2.0),
    ],
)
def test_first_step_literal_numbers(variant: str, bias_correction: bool, expected: float) -> None:
    p = torch.tensor([2.0], dtype=DT, requires_grad=True)
    opt = SAGE(
        [p],
        lr=0.1,
        beta3=0.85,
        weight_decay=0.01,
        variant=variant,
        sensitivity_bias_correction=bias_correction,
    )
    p.grad = torch.tensor([0.5], dtype=DT)
    opt.step()
    assert p.item() == pytest.approx(expected, rel=1e-13, abs=1e-15)


def test_default_sensitivity_bias_correction_follows_the_authors() -> None:
    # adamw: corrected (first-step scale 0); adamax: uncorrected (scale beta3 / (1 - beta3)).
    for variant, moved in (("adamw", False), ("adamax", True)):
        p = torch.tensor([2.0, -1.0], dtype=DT, requires_grad=True)
        opt = SAGE([p], lr=0.1, variant=variant)
        assert opt.param_groups[0]["sensitivity_bias_correction"] is None
        p.grad = torch.tensor([0.5, 0.25], dtype=DT)
        opt.step()
        change = (p.detach() - torch.tensor([2.0, -1.0], dtype=DT)).abs().max().item()
        # corrected: the first scale is exactly 0 (no weight decay by default): no move at all
        assert moved or change == 0.0, (variant, change)
        assert (change > 0.1) is moved, (variant, change)


def _set_grads(params: list[torch.Tensor], t: int) -> None:
    for i, p in enumerate(params):
        p.grad = torch.sin(p.detach() * (1.7 + i) + 0.3 * t) + 0.1 * (i + 1)


def test_plain_group_equals_torch_adamw_bitwise() -> None:
    kw = {"lr": 0.01, "betas": (0.85, 0.99), "eps": 1e-7, "weight_decay": 0.05}
    ours = [THETA0.clone().requires_grad_(True), torch.randn(4, dtype=DT).requires_grad_(True)]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = SAGE([{"params": ours, "sage": False}], variant="adamw", **kw)  # type: ignore[arg-type]
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)  # type: ignore[arg-type]
    for t in range(6):
        _set_grads(ours, t)
        _set_grads(ref, t)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a, b)


def test_plain_group_equals_torch_adamax_bitwise() -> None:
    # torch's Adamax couples weight decay into the gradient, so compare without decay.
    kw = {"lr": 0.02, "betas": (0.85, 0.99), "eps": 1e-7}
    ours = [THETA0.clone().requires_grad_(True), torch.randn(4, dtype=DT).requires_grad_(True)]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = SAGE([{"params": ours, "sage": False}], variant="adamax", **kw)  # type: ignore[arg-type]
    ref_opt = torch.optim.Adamax(ref, foreach=False, **kw)  # type: ignore[arg-type]
    for t in range(6):
        _set_grads(ours, t)
        _set_grads(ref, t)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["adamw", "adamax"])
@pytest.mark.parametrize("sage", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_step_is_linear_in_lr(variant: str, sage: bool, bias_correction: bool) -> None:
    p = THETA0.clone().requires_grad_(True)
    opt = SAGE(
        [{"params": [p], "sage": sage}],
        lr=0.03,
        weight_decay=0.2,
        variant=variant,
        sensitivity_bias_correction=bias_correction,
    )
    for t in range(3):  # build up non-trivial state
        _set_grads([p], t)
        opt.step()
    saved = opt.state_dict()

    deltas = []
    for lr in (0.01, 0.02):
        q = p.detach().clone().requires_grad_(True)
        twin = SAGE([{"params": [q], "sage": sage}], variant=variant)
        # load_state_dict may alias the saved tensors, so give each twin its own copy.
        twin.load_state_dict(copy.deepcopy(saved))
        twin.param_groups[0]["lr"] = lr
        _set_grads([q], 3)
        before = q.detach().clone()
        twin.step()
        deltas.append(q.detach() - before)
    assert deltas[0].abs().max() > 1e-4
    torch.testing.assert_close(deltas[1], 2 * deltas[0], rtol=1e-12, atol=1e-15)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


@pytest.mark.parametrize("variant", ["adamw", "adamax"])
def test_state_dict_round_trip_is_bitwise(variant: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=DT)
    y = torch.randn(16, 1, dtype=DT)

    def make(model: nn.Module) -> SAGE:
        groups = sage_param_groups(model, lambda name, p: name.startswith("0."))
        groups[0]["weight_decay"] = 0.01
        return SAGE(groups, lr=0.01, variant=variant)

    def train(model: nn.Module, opt: SAGE, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model = _model()
    opt = make(model)
    train(model, opt, 3)
    first, last = model[0], model[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    assert "exp_avg_sensitivity" in opt.state[first.weight]
    assert "exp_avg_sensitivity" not in opt.state[last.weight]

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model()  # different initialisation, overwritten by the checkpoint
    fresh.load_state_dict(saved["model"])
    fresh_opt = make(fresh)
    fresh_opt.load_state_dict(saved["opt"])

    train(model, opt, 2)
    train(fresh, fresh_opt, 2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), fresh.parameters(), strict=True):
        sa, sb = opt.state[pa], fresh_opt.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key
    assert opt.state_dict()["param_groups"] == fresh_opt.state_dict()["param_groups"]


@pytest.mark.parametrize(
    ("kwargs", "group", "exc", "message"),
    [
        ({"lr": -0.1}, {}, ValueError, r"^lr must be a finite float >= 0\.0, got -0\.1$"),
        ({"lr": math.nan}, {}, ValueError, r"^lr must be a finite float >= 0\.0, got nan$"),
        ({"lr": "1e-3"}, {}, TypeError, r"^lr must be a finite float"),
        (
            {"beta3": 1.5},
            {},
            ValueError,
            r"^beta3 must be a finite float >= 0\.0 and < 1\.0, got 1\.5$",
        ),
        ({"beta3": 1.0}, {}, ValueError, r"^beta3 must be .* < 1\.0, got 1\.0$"),
        ({"beta3": -0.1}, {}, ValueError, r"^beta3 must be"),
        ({"beta3": True}, {}, TypeError, r"^beta3 must be a finite float"),
        ({"betas": (1.0, 0.9)}, {}, ValueError, r"^betas\[0\] must be .* < 1\.0, got 1\.0$"),
        ({"betas": (0.9, -0.5)}, {}, ValueError, r"^betas\[1\] must be .* >= 0\.0"),
        ({"betas": (0.9,)}, {}, TypeError, r"^betas must be a pair of floats, got \(0\.9,\)$"),
        ({"betas": 0.9}, {}, TypeError, r"^betas must be a pair of floats"),
        ({"eps": 0.0}, {}, ValueError, r"^eps must be a finite float > 0\.0, got 0\.0$"),
        ({"weight_decay": -1.0}, {}, ValueError, r"^weight_decay must be a finite float >= 0"),
        (
            {"variant": "sgd"},
            {},
            ValueError,
            r"^variant must be one of 'adamw', 'adamax', got 'sgd'$",
        ),
        ({"variant": ["adamw"]}, {}, TypeError, r"^variant must be one of"),
        (
            {"sensitivity_bias_correction": 1},
            {},
            TypeError,
            r"^sensitivity_bias_correction must be a bool or None, got 1$",
        ),
        ({}, {"sage": "yes"}, TypeError, r"^sage must be a bool, got 'yes'$"),
        ({}, {"beta3": 2.0}, ValueError, r"^beta3 must be .*, got 2\.0$"),
        ({}, {"lr": -1.0}, ValueError, r"^lr must be .*, got -1\.0$"),
        ({"momentum": 0.9}, {}, TypeError, r"unexpected keyword argument 'momentum'"),
    ],
)
def test_bad_inputs(
    kwargs: dict[str, object], group: dict[str, object], exc: type[Exception], message: str
) -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(exc, match=message):
        SAGE([{"params": [p], **group}], **kwargs)  # type: ignore[arg-type]


def test_options_are_keyword_only() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError):
        SAGE([p], 1e-3)  # type: ignore[misc]


def test_params_without_grad_are_skipped() -> None:
    a = THETA0.clone().requires_grad_(True)
    b = THETA0.clone().requires_grad_(True)
    opt = SAGE([a, b], lr=0.1, variant="adamax")
    a.grad = quad_grad(a.detach())
    opt.step()
    assert torch.equal(b, THETA0)
    assert not torch.equal(a, THETA0)
    assert len(opt.state[b]) == 0
    assert opt.state[a]["step"] == 1


def test_closure_runs_with_grad_enabled_and_returns_loss() -> None:
    p = THETA0.clone().requires_grad_(True)
    opt = SAGE([p], lr=0.1, variant="adamax")

    def closure() -> float:
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = (p**2).sum()
        loss.backward()
        return float(loss.detach())

    assert opt.step(closure) == pytest.approx(float((THETA0**2).sum()))
    assert not torch.equal(p, THETA0)


def test_zero_entries_are_frozen_by_sage_but_not_by_the_plain_step() -> None:
    # I = |0 * g| = 0 forever, so the scale is 0: a documented property of SAGE.
    p = torch.tensor([0.0, 1.0], dtype=DT, requires_grad=True)
    q = torch.tensor([0.0, 1.0], dtype=DT, requires_grad=True)
    groups: list[dict[str, Any]] = [{"params": [p]}, {"params": [q], "sage": False}]
    opt = SAGE(groups, lr=0.1, variant="adamax")
    for _ in range(3):
        p.grad = torch.tensor([1.0, 1.0], dtype=DT)
        q.grad = torch.tensor([1.0, 1.0], dtype=DT)
        opt.step()
    assert p[0].item() == 0.0
    assert q[0].item() != 0.0


@pytest.mark.parametrize("variant", ["adamw", "adamax"])
def test_zero_entries_stay_put_in_float16(variant: str) -> None:
    # eps**2 = 1e-16 underflows to 0 in float16: the scale of a zero entry was 0 / 0 = NaN
    p = torch.tensor([0.0, 1.0], dtype=torch.float16, requires_grad=True)
    opt = SAGE([p], lr=1e-2, variant=variant, sensitivity_bias_correction=False)
    for _ in range(3):
        p.grad = torch.tensor([0.5, 0.5], dtype=torch.float16)
        opt.step()
    assert p[0].item() == 0.0 and math.isfinite(p[1].item()) and p[1].item() < 1.0


def test_sage_param_groups_split_and_skip_frozen() -> None:
    model = _model()
    model[2].bias.requires_grad_(False)
    groups = sage_param_groups(model, lambda name, p: p.dim() == 2)
    assert [g["sage"] for g in groups] == [True, False]
    assert groups[0]["params"] == [model[0].weight, model[2].weight]
    assert groups[1]["params"] == [model[0].bias]
    assert sage_param_groups(model, lambda name, p: True)[0]["sage"] is True
    assert len(sage_param_groups(model, lambda name, p: True)) == 1


@pytest.mark.parametrize(
    ("variant", "steps", "threshold"), [("adamw", 300, 1e-6), ("adamax", 500, 1e-4)]
)
def test_converges_on_stochastic_least_squares(variant: str, steps: int, threshold: float) -> None:
    # Consistent system, mini-batches of 8 rows: the mini-batch noise keeps the
    # sensitivity fluctuating, which is what SAGE's scale feeds on. Initial loss ~ 14.7.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=gen, dtype=DT)
    b = a @ torch.randn(8, generator=gen, dtype=DT)
    x = torch.full((8,), 0.5, dtype=DT, requires_grad=True)
    opt = SAGE([x], lr=0.1, variant=variant)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 64, (8,), generator=batches)
        opt.zero_grad()
        ((a[idx] @ x - b[idx]) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        final = ((a @ x - b) ** 2).mean().item()
    assert final < threshold


def test_a_rejected_param_group_is_not_kept() -> None:
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = SAGE([a])
    with pytest.raises(ValueError, match=r"^beta3 must be .*, got 1\.0$"):
        opt.add_param_group({"params": [b], "beta3": 1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "beta3": 0.5})  # the same tensor can be added after
    assert opt.param_groups[1]["beta3"] == 0.5
