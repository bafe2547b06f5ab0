"""The pure math of the fit, against closed forms and an outside answer key (numpy)."""

import math

import numpy as np
import pytest
import torch

from hidlr.fit import fit_quadratic, propose_rates
from hidlr.rates import smooth_rate

MULTS = (-2.0, -1.0, 1.0, 2.0)


def diagonal_offsets(k_groups, mults=MULTS):
    rows = []
    for k in range(k_groups):
        for c in mults:
            row = [0.0] * k_groups
            row[k] = c
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def quadratic(offsets, rates, c0, b, a):
    xi = offsets * torch.tensor(rates, dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    a = torch.tensor(a, dtype=torch.float64)
    return c0 - xi @ b + 0.5 * ((xi @ a) * xi).sum(dim=1)


def test_diagonal_fit_recovers_exact_quadratic():
    rates = [1e-3, 0.3, 7.0]
    b, a = [2.0, -0.5, 1e-2], [[5.0, 0, 0], [0, -3.0, 0], [0, 0, 0.02]]
    off = diagonal_offsets(3)
    fit = fit_quadratic(off, quadratic(off, rates, 1.25, b, a), rates)
    assert fit.intercept == pytest.approx(1.25, abs=1e-12)
    for k in range(3):
        assert fit.b[k] == pytest.approx(b[k], rel=1e-10)
        assert fit.A[k][k] == pytest.approx(a[k][k], rel=1e-10)
        assert fit.r2[k] == pytest.approx(1.0, abs=1e-12)
    decisions = propose_rates(fit, min_r2=0.95)
    assert decisions[0].accepted and decisions[0].proposed == pytest.approx(2.0 / 5.0, rel=1e-10)
    assert decisions[1].reason == "not_convex"
    assert decisions[2].proposed == pytest.approx(0.5, rel=1e-10)


def test_coupled_fit_recovers_cross_terms_and_solves_newton():
    rates = [0.1, 0.01]
    b, a = [2.0, 2.0], [[4.0, 1.5], [1.5, 2.0]]
    rows = diagonal_offsets(2).tolist() + [[-1.0, -1.0], [1.0, 1.0]]
    off = torch.tensor(rows, dtype=torch.float64)
    fit = fit_quadratic(off, quadratic(off, rates, 0.0, b, a), rates, coupled=True)
    assert fit.A[0][1] == pytest.approx(1.5, rel=1e-9)
    decisions = propose_rates(fit, min_r2=0.95)
    expected = np.linalg.solve(np.array(a), np.array(b))
    assert [d.proposed for d in decisions] == pytest.approx(expected.tolist(), rel=1e-9)
    assert all(d.accepted for d in decisions)
    # the same curvature with a gradient whose joint minimiser steps backwards in group 1
    y = quadratic(off, rates, 0.0, [3.0, 1.0], a)
    backwards = propose_rates(fit_quadratic(off, y, rates, coupled=True), min_r2=0.95)
    assert [d.reason for d in backwards] == ["not_descent", "not_descent"]


def test_coupled_fit_rejects_indefinite_hessian():
    rates = [1.0, 1.0]
    b, a = [1.0, 1.0], [[1.0, 2.0], [2.0, 1.0]]
    off = torch.tensor(
        diagonal_offsets(2).tolist() + [[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64
    )
    decisions = propose_rates(
        fit_quadratic(off, quadratic(off, rates, 0.0, b, a), rates, coupled=True), min_r2=0.9
    )
    assert [d.reason for d in decisions] == ["not_convex", "not_convex"]


def test_one_group_fit_matches_numpy_polyfit_on_noisy_data():
    gen = np.random.default_rng(0)
    xs = np.array(MULTS) * 0.05
    ys = 3.0 - 2.0 * xs + 0.5 * 30 * xs**2 + gen.normal(0, 1e-3, size=4)
    fit = fit_quadratic(torch.tensor(np.array(MULTS)[:, None]), torch.tensor(ys), [0.05])
    c2, c1, c0 = np.polyfit(xs, ys, 2)
    assert fit.b[0] == pytest.approx(-c1, rel=1e-9)
    assert fit.A[0][0] == pytest.approx(2 * c2, rel=1e-9)
    pred = np.polyval([c2, c1, c0], xs)
    r2 = 1 - ((ys - pred) ** 2).sum() / ((ys - ys.mean()) ** 2).sum()
    assert fit.r2[0] == pytest.approx(r2, rel=1e-9)


@pytest.mark.parametrize(
    ("b", "a", "noise", "reason"),
    [
        (1.0, 2.0, 0.0, "accepted"),
        (1.0, -2.0, 0.0, "not_convex"),
        (-1.0, 2.0, 0.0, "not_descent"),
        (1e-4, 1e-4, 1.0, "poor_fit"),
    ],
)
def test_guards(b, a, noise, reason):
    off = diagonal_offsets(1)
    y = quadratic(off, [1.0], 0.0, [b], [[a]]) + noise * torch.tensor(
        [1.0, -1.0, -1.0, 1.0], dtype=torch.float64
    ).flip(0) * torch.tensor([1.0, 0.3, -0.7, 0.2], dtype=torch.float64)
    (decision,) = propose_rates(fit_quadratic(off, y, [1.0]), min_r2=0.95)
    assert decision.reason == reason
    assert decision.accepted == (reason == "accepted")


def test_flat_probes_are_rejected():
    off = diagonal_offsets(1)
    (decision,) = propose_rates(
        fit_quadratic(off, torch.full((4,), 2.0, dtype=torch.float64), [1.0]), min_r2=0.5
    )
    assert decision.reason == "flat"


def test_nonfinite_probe_drops_only_its_group():
    rates = [0.5, 0.5]
    off = diagonal_offsets(2)
    y = quadratic(off, rates, 1.0, [1.0, 2.0], [[2.0, 0], [0, 8.0]])
    y[5] = float("nan")
    fit = fit_quadratic(off, y, rates)
    decisions = propose_rates(fit, min_r2=0.95)
    assert decisions[0].accepted and decisions[0].proposed == pytest.approx(0.5, rel=1e-10)
    assert decisions[1].reason == "nonfinite_probe" and not decisions[1].accepted
    assert math.isnan(fit.b[1])


def test_smooth_rate_and_bound():
    assert smooth_rate(1.0, 3.0, smoothing=0.9, max_change=None) == pytest.approx(1.2)
    assert smooth_rate(1.0, 100.0, smoothing=0.0, max_change=2.0) == 2.0
    assert smooth_rate(1.0, 0.01, smoothing=0.0, max_change=2.0) == 0.5


def test_with_probe_batch_pairs_each_batch_with_the_next():
    from hidlr import with_probe_batch

    assert list(with_probe_batch([1, 2, 3])) == [(1, 2), (2, 3), (3, 3)]
    assert list(with_probe_batch([])) == []
    assert list(with_probe_batch(iter([7]))) == [(7, 7)]


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_python_and_lapack_least_squares_agree(k, coupled):
    from hidlr import fit as fit_module

    gen = torch.Generator().manual_seed(k)
    rows = [[c if j == i else 0.0 for j in range(k)] for i in range(k) for c in MULTS]
    if coupled:
        rows += [
            [s if j in (i, l) else 0.0 for j in range(k)]
            for i in range(k)
            for l in range(i + 1, k)
            for s in (-1.0, 1.0)
        ]
    off = torch.tensor(rows, dtype=torch.float64)
    rates = (0.5 + torch.rand(k, generator=gen, dtype=torch.float64)).tolist()
    y = 3.0 + torch.randn(len(rows), generator=gen, dtype=torch.float64)
    groups = list(range(k))
    x = [fit_module._design_row(r, groups, coupled) for r in rows]
    lapack = torch.linalg.lstsq(
        torch.tensor(x, dtype=torch.float64), y[:, None], driver="gelsd"
    ).solution[:, 0]
    python = fit_module._solve_householder(x, y.tolist())
    assert python is not None
    torch.testing.assert_close(
        torch.tensor(python, dtype=torch.float64), lapack, rtol=1e-12, atol=1e-12
    )
    # which path fit_quadratic takes depends on the size only; both give the same fit
    fit = fit_quadratic(off, y, rates, coupled=coupled)
    assert fit.intercept == pytest.approx(lapack[0].item(), rel=1e-12)
    assert [fit.b[j] * rates[j] for j in groups] == pytest.approx(
        lapack[1 : 1 + k].tolist(), rel=1e-10
    )


def test_python_least_squares_refuses_a_rank_deficient_design():
    from hidlr.fit import _solve_householder

    x = [[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]  # second column = 2 x first
    assert _solve_householder(x, [1.0, 2.0, 3.0]) is None
    assert _solve_householder(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, 2.0, 3.0]
    ) == pytest.approx([1.0, 2.0])


def test_a_group_whose_only_probes_move_a_dropped_group_is_not_fitted():
    # group 0 moves only together with group 1, whose probe blew up: no row is left to fit
    off = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    fit = fit_quadratic(
        off, torch.tensor([1.0, float("nan")], dtype=torch.float64), [1.0, 1.0], coupled=True
    )
    assert all(math.isnan(v) for v in (*fit.b, *fit.r2, fit.intercept))
