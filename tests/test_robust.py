"""The robust rate policy: its rules one by one, the joint (coupling) correction, and its
behaviour where Algorithm 1 taken literally fails."""

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import hidlr
from hidlr.fit import QuadraticFit, RateDecision
from hidlr.rates import RobustStep, coupling_ratio, log_average, robust_rate, step_scale

F64 = torch.float64
ACCEPT = RateDecision(0.0, True, "accepted")


def accepted(p):
    return RateDecision(p, True, "accepted")


def rejected(reason):
    return RateDecision(float("nan"), False, reason)


def test_log_average_is_bias_corrected():
    assert log_average(1.0, 100.0, 0, 0.9) == pytest.approx(100.0)  # the first value replaces
    second = log_average(100.0, 1.0, 1, 0.9)  # (0.1*log 100 * 0.9 + 0.1 * log 1) / (1 - 0.81)
    assert math.log(second) == pytest.approx(0.9 * 0.1 * math.log(100.0) / 0.19, rel=1e-12)
    assert log_average(2.0, 8.0, 10**6, 0.5) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("decision", "b", "a", "resolved", "expected", "action"),
    [
        # accepted: log-average toward the proposal, both ways alike: rate * (p / rate)^0.1
        # (n_updates = 0 here: while warming up an overshoot is cut at once and a longer
        # proposal taken up to WARMUP_GROWTH; see the tests below for later updates)
        (accepted(0.1), 1.0, 10.0, True, 0.1, "update"),  # overshoot while warming up
        (accepted(100.0), 1.0, 0.01, True, 1.5, "update"),  # warming up: at most x1.5
        (accepted(1.2), 1.0, 1 / 1.2, True, 1.2, "update"),  # warming up: taken at once
        (accepted(0.6), 1.0, 1 / 0.6, True, 0.6**0.1, "update"),  # shorter, not at once
        (rejected("poor_fit"), 1.0, 4.0, True, 0.5, "shrink"),  # sqrt(1 * 0.25)
        (rejected("poor_fit"), 1.0, 0.5, True, 1.0, "keep"),  # a doubtful increase is not taken
        (rejected("not_convex"), 1.0, -1e-3, True, 2.0, "grow"),  # linear over the probes
        (rejected("not_convex"), 1.0, -5.0, True, 1.0, "keep"),  # concave: no evidence either way
        (rejected("flat"), float("nan"), float("nan"), False, 2.0, "grow"),  # unresolved: too small
        (rejected("not_descent"), -1.0, 3.0, True, 0.5**0.1, "shrink"),  # a proposal of 0.5
        (rejected("not_descent"), -1.0, -3.0, True, 1.0, "keep"),  # concave: no evidence
        (rejected("nonfinite_probe"), float("nan"), float("nan"), True, 0.5, "shrink"),
    ],
)
def test_robust_rate_rules(decision, b, a, resolved, expected, action):
    out = robust_rate(1.0, 3, decision, b, a, smoothing=0.9, probe_reach=2.0, resolved=resolved)
    assert out.rate == pytest.approx(expected)
    assert out.action == action
    # accepted fits count; a rate grown without a fit starts the warm-up again
    assert out.n_updates == (4 if decision.accepted else 0 if action == "grow" else 3)


def test_robust_rate_is_not_bias_corrected():
    # after the warm-up, updates move as cautiously as ever (a loss plateau's huge proposals
    # must not be followed at once), so the count of earlier updates does not matter
    from hidlr.rates import WARMUP_UPDATES

    kw = {"smoothing": 0.9, "probe_reach": 2.0}
    first = robust_rate(1.0, WARMUP_UPDATES, accepted(1.5), 1.0, 1.0, **kw)
    later = robust_rate(1.0, 50, accepted(1.5), 1.0, 1.0, **kw)
    assert first.rate == later.rate == pytest.approx(1.5**0.1, rel=1e-12)
    assert (first.n_updates, later.n_updates) == (WARMUP_UPDATES + 1, 51)
    huge = robust_rate(1.0, 50, accepted(1e6), 1.0, 1e-6, **kw)
    assert huge.rate == 2.0  # capped at growth


def test_a_rate_grown_blindly_is_cut_at_once_by_the_next_fit():
    # a plateau (no curvature: the rate doubles) ending in a cliff: the first fit that sees
    # curvature after the growth is taken at once, not averaged from a rate with no evidence
    from hidlr.rates import WARMUP_UPDATES

    kw = {"smoothing": 0.9, "probe_reach": 2.0}
    grown = robust_rate(8.0, 50, rejected("not_convex"), 1.0, -1e-4, **kw)
    assert (grown.rate, grown.n_updates, grown.action) == (16.0, 0, "grow")
    cut = robust_rate(grown.rate, grown.n_updates, accepted(0.5), 1.0, 2.0, **kw)
    assert cut.rate == 0.5
    settled = robust_rate(16.0, WARMUP_UPDATES, accepted(0.5), 1.0, 2.0, **kw)
    assert settled.rate == pytest.approx(16.0 * (0.5 / 16.0) ** 0.1)  # 11.3: the slow average


def test_warm_up_takes_longer_proposals_at_once_up_to_a_bound():
    from hidlr.rates import WARMUP_GROWTH, WARMUP_UPDATES

    kw = {"smoothing": 0.9, "probe_reach": 2.0}
    rate, n = 1.0, 0
    for _ in range(WARMUP_UPDATES):  # a rate 100x too small climbs by WARMUP_GROWTH per update
        out = robust_rate(rate, n, accepted(100.0), 1.0, 0.01, **kw)
        assert out.rate == pytest.approx(rate * WARMUP_GROWTH)
        rate, n = out.rate, out.n_updates
    out = robust_rate(rate, n, accepted(100.0), 1.0, 0.01, **kw)
    assert out.rate == pytest.approx(rate * (100.0 / rate) ** 0.1)  # then the slow average


def test_an_overshooting_initial_rate_is_cut_at_once_only_while_warming_up():
    from hidlr.rates import WARMUP_UPDATES

    early = robust_rate(1.0, 0, accepted(0.1), 1.0, 10.0, smoothing=0.9, probe_reach=2.0)
    assert early.rate == 0.1
    late = robust_rate(
        1.0, WARMUP_UPDATES, accepted(0.1), 1.0, 10.0, smoothing=0.9, probe_reach=2.0
    )
    assert late.rate == pytest.approx(0.1**0.1)
    capped = robust_rate(
        1.0, WARMUP_UPDATES, accepted(1e-6), 1.0, 1e6, smoothing=0.9, probe_reach=2.0
    )
    assert capped.rate == 0.5  # after warm-up a shorter proposal moves at most 1 / growth
    mild = robust_rate(1.0, 0, accepted(0.6), 1.0, 1 / 0.6, smoothing=0.9, probe_reach=2.0)
    assert mild.rate == pytest.approx(0.6**0.1)  # not an overshoot: averaged


def test_noisy_proposals_settle_at_their_geometric_mean():
    # proposals alternating 4x above and below: the lower envelope would sink to 0.25
    rate, n = 1.0, 0
    for i in range(400):
        out = robust_rate(
            rate, n, accepted(4.0 if i % 2 else 0.25), 1.0, 1.0, smoothing=0.9, probe_reach=2.0
        )
        rate, n = out.rate, out.n_updates
    assert math.log(rate) == pytest.approx(0.0, abs=0.2)  # within a factor e^0.2 of 1


def fit_of(b, a, intercept=1.0):
    n = len(b)
    return QuadraticFit(
        intercept,
        tuple(b),
        tuple(tuple(a[k] if k == l else 0.0 for l in range(n)) for k in range(n)),
        (1.0,) * n,
        False,
        (1.0,) * n,
    )


def test_coupling_ratio_and_step_scale_on_a_known_quadratic():
    # L(s1, s2) = 1 - s1 - s2 + (s1 + s2)^2 / 2: each group alone has b = 1, A = 1
    fit = fit_of([1.0, 1.0], [1.0, 1.0])
    steps = [1.0, 1.0]  # each group's own Newton step
    loss = 1 - 2 + 0.5 * 4  # measured at the combined step: 1.0
    assert coupling_ratio(fit, steps, loss) == pytest.approx(0.5)  # C_diag = 2, C = 4
    assert step_scale(fit, steps, loss) == pytest.approx(0.5)  # the minimiser is half-way
    assert coupling_ratio(fit, [1.0, 0.0], 0.5) is None  # one moving group: nothing to couple
    assert step_scale(fit, steps, float("inf")) == 0.5
    assert step_scale(fit_of([-1.0, -1.0], [1.0, 1.0]), steps, 2.0) == 0.5  # ascends: halve
    assert step_scale(fit, steps, 1 - 2 + 0.5 * 2) == 1.0  # no overshoot: take it all


def additive_problem():
    a = nn.Parameter(torch.tensor([0.0], dtype=F64))
    b = nn.Parameter(torch.tensor([0.0], dtype=F64))
    target = torch.tensor([3.0], dtype=F64)
    return a, b, lambda: 0.5 * ((a + b - target) ** 2).sum()


def test_groups_that_add_up_overshoot_with_the_diagonal_model_but_not_with_the_joint_check():
    a, b, loss = additive_problem()
    opt = hidlr.HiDLR(
        torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1),
        policy="paper",
        smoothing=0.0,
        update_every=1,
    )
    opt.zero_grad()
    loss().backward()
    opt.step(loss)
    assert opt.lrs == pytest.approx([1.0, 1.0])  # each group's own exact line search...
    assert loss().item() == pytest.approx(4.5)  # ...and together they jump to the mirror point

    a, b, loss = additive_problem()
    opt = hidlr.HiDLR(
        torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), smoothing=0.0, update_every=1
    )
    for _ in range(10):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        if loss().item() < 1e-12:  # beyond, the probes see float64 rounding only
            break
    rec = opt.history[0]
    assert rec.coupling_ratio == pytest.approx(0.5, rel=1e-9)  # C_diag / C for two equal steps
    assert loss().item() < 1e-12 and opt.steps == 5
    assert opt.lrs == pytest.approx([0.5, 0.5])  # the Newton step along the combined direction


@pytest.mark.parametrize("start", [1e-7, 1e-3, 0.5, 5.0])
def test_quadratic_from_any_initial_rate_never_diverges(start):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=gen, dtype=F64)
    h = m @ m.T / 8 + 0.1 * torch.eye(8, dtype=F64)
    w = nn.Parameter(torch.randn(8, generator=gen, dtype=F64))
    loss = lambda: 0.5 * w @ h @ w  # noqa: E731
    first = loss().item()
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=start), update_every=1)
    worst = first
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        worst = max(worst, loss().item())
    assert worst <= first * (1 + 1e-12)  # the loss never rose above its start
    assert loss().item() < 1e-2 * first
    eigs = torch.linalg.eigvalsh(h)
    assert opt.lrs[0] < 2 / eigs[0].item()  # a rate no larger than the flattest direction allows


def test_robust_checkpoint_resumes_bit_identically(tmp_path):
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)
        base = torch.optim.Adam(
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.01
        )
        return model, hidlr.HiDLR(base, update_every=2)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen, dtype=F64)
    y = torch.sin(x.sum(dim=1, keepdim=True))

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step(lambda: nn.functional.mse_loss(model(x), y))

    model, opt = make()
    train(model, opt, 5)
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, tmp_path / "c.pt")
    train(model, opt, 6)
    model2, opt2 = make()
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    train(model2, opt2, 6)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.lrs == opt2.lrs
    assert opt.state_dict()["hidlr"]["coupling"] == opt2.state_dict()["hidlr"]["coupling"]


def test_spike_detection():
    from hidlr.rates import spike

    assert not spike(5.0, [])  # nothing to judge by
    assert not spike(3.9, [1.2, 1.0])  # too little history for the floor rule
    assert spike(4.1, [1.0])  # x4 since the last probe step
    assert spike(5.0, [1.0, 1.2, 1.1])  # x4 above the floor
    assert not spike(3.9, [1.0, 1.2, 1.1])
    assert spike(4.5, [1.0, 1.2, 1.3])  # above the floor, not above the last x4
    assert spike(float("nan"), [1.0])


def test_a_hard_batch_at_the_noise_floor_is_no_spike():
    from hidlr.rates import spike, track_spikes

    # trained from 1.6 down to ~1e-3, where batches differ 10x: a rise of 0.05 undoes 3% of
    # the progress, no spike; without the start, the ratio alone calls it one
    floor = [1.5e-3, 1e-3, 4e-3]
    assert spike(5e-2, floor) and not spike(5e-2, floor, start=1.6)
    assert not track_spikes(5e-2, floor, start=1.6)[0]
    # a rise back to a fifth of the way is one, as is one from a recent floor of 0.5
    assert spike(0.3, floor, start=1.6) and spike(2.1, [0.52, 0.7, 0.6], start=1.6)
    assert spike(float("inf"), floor, start=1.6)
    # no progress since the start (or a loss below zero, by the range rule): the ratios judge
    assert spike(5.0, [1.0, 1.2, 1.1], start=1.0) and spike(
        -97.0, [-99.0, -99.5, -99.8], start=-99.0
    )
    assert not spike(-97.0, [-99.0, -99.5, -99.8], start=-70.0)  # 10% of 29.8 is 2.98


def test_a_jump_noise_could_explain_cuts_only_the_groups_whose_fit_sees_an_overshoot():
    from hidlr.rates import SPIKE_WINDOW, spike_cuts

    floor = [1.5e-3, 1e-3, 4e-3]
    over = RateDecision(0.2, True, "accepted")  # the minimiser at a fifth of the rate
    under = RateDecision(0.8, True, "accepted")
    noisy = RateDecision(0.1, False, "poor_fit")
    groups = [(0, over, 1.0), (1, under, 1.0), (2, noisy, 1.0)]
    cut, recent = spike_cuts(5e-2, floor, groups, start=1.6)
    assert cut == [(0, 0.1)] and recent == [5e-2]  # the floor starts again after the cut
    cut, recent = spike_cuts(5e-2, floor, groups[1:], start=1.6)
    assert cut == [] and recent == floor + [5e-2]
    # a tenth of the progress undone, still below the start: a hard batch can do that, so the
    # groups whose fits do not confirm it are only halved
    cut, recent = spike_cuts(0.3, floor, groups, start=1.6)
    assert cut == [(0, 0.1), (1, 0.5), (2, 0.5)] and recent == [0.3]
    # back at the start or above: every group 10x, whatever its fit says
    assert spike_cuts(1.7, floor, groups[1:], start=1.6)[0] == [(1, 0.1), (2, 0.1)]
    assert spike_cuts(3e-3, floor, groups, start=1.6) == ([], floor + [3e-3])  # no jump
    assert spike_cuts(5e-2, floor, groups, start=1.6, detect=False)[0] == []  # paper policy
    assert len(spike_cuts(1e-3, floor * SPIKE_WINDOW, groups, start=1.6)[1]) == SPIKE_WINDOW


def test_the_first_loss_the_spikes_are_judged_by_survives_a_checkpoint():
    w = nn.Parameter(torch.tensor([0.0, 0.0], dtype=F64))
    loss = lambda: ((w - 3.0) ** 2).sum()  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1)
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    assert opt.state_dict()["hidlr"]["first_loss"] == pytest.approx(18.0)
    other = hidlr.HiDLR(torch.optim.SGD([nn.Parameter(torch.zeros(2, dtype=F64))], lr=0.1))
    other.load_state_dict(opt.state_dict())
    assert other._first_loss == pytest.approx(18.0)


def test_spike_tracking_window_and_reset():
    from hidlr.rates import SPIKE_WINDOW, track_spikes

    recent: list[float] = []
    for v in range(1, SPIKE_WINDOW + 3):  # slowly rising losses: no spike, a sliding window
        spiked, recent = track_spikes(1.0 + 0.01 * v, recent)
        assert not spiked
    assert len(recent) == SPIKE_WINDOW and recent[0] == pytest.approx(1.03)
    spiked, after = track_spikes(10.0, recent)
    assert spiked and after == [10.0]  # the floor starts again from the spike
    spiked, after = track_spikes(10.0, recent, detect=False)  # paper policy: only remembered
    assert not spiked and after == (recent + [10.0])[-SPIKE_WINDOW:]
    spiked, after = track_spikes(float("nan"), recent)  # no measurement: neither
    assert not spiked and after == recent


def test_applied_rates_coupling_bound_and_stalled_growth():
    from hidlr.rates import applied_rates

    rates, diag, counts = [1.0, 1.0, 0.1, 5.0], [4.0, 0.9, 0.1, 5.0], [3, 3, 7, 2]
    actions = ["update", "update", "keep", "keep"]

    def apply(peaks, bound):
        return applied_rates(
            rates, diag, counts, actions, [0, 1], [2], peaks, coupling=0.5, max_rate_change=bound
        )

    new, d, c, a = apply([1.0, 1.0, 0.15, 5.0], None)
    assert new == [2.0, 0.45, 0.15, 5.0]  # coupling x diagonal; the stalled group up to its peak
    assert d == [4.0, 0.9, pytest.approx(0.15), 5.0] and c == [3, 3, 0, 2]
    assert a == ["update", "update", "grow", "keep"]
    new, d, _, _ = apply([1.0, 1.0, 1.0, 5.0], 1.5)
    # the applied rate is bounded (the diagonal one scaled alike); growth too
    assert new == [1.5, pytest.approx(1 / 1.5), pytest.approx(0.15), 5.0]
    assert d == [3.0, pytest.approx(4 / 3), pytest.approx(0.15), 5.0]


def test_a_loss_that_stays_up_is_cut_once_not_at_every_probe_step():
    w = nn.Parameter(torch.tensor([0.0, 0.0], dtype=F64))
    c = torch.tensor([1.0, 10.0], dtype=F64)  # ill-conditioned: no step lands on the minimum
    offset = [1.0]
    loss = lambda: (c * (w - 3.0) ** 2).sum() + offset[0]  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.01), update_every=1)
    for step in range(12):
        if step == 6:
            offset[0] = 1000.0  # the loss jumps and stays up (the curvature does not change)
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    actions = [rec.groups[0].action for rec in opt.history]
    assert actions[6] == "spike"
    assert "spike" not in actions[:6] + actions[7:]  # the floor starts again after the cut


def test_a_loss_that_keeps_multiplying_after_a_cut_is_cut_again():
    # the curvature jumps 100x: after the spike cut the step is still unstable (it would grow
    # the loss 10x per probe step; waiting for three steps of fresh history would let it
    # explode). The step just taken multiplied the loss, so the single group's new step is
    # measured too, and cut again at once, to its line minimum
    w = nn.Parameter(torch.tensor([0.0, 0.0], dtype=F64))
    c = torch.tensor([1.0, 10.0], dtype=F64)
    scale = [1.0]
    loss = lambda: scale[0] * ((c * (w - 3.0) ** 2).sum() + 1.0)  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1)
    for step in range(12):
        if step == 6:
            scale[0] = 100.0
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    actions = [rec.groups[0].action for rec in opt.history]
    losses = [rec.loss for rec in opt.history]
    assert actions[6] == "overshoot" and not {"spike", "overshoot"} & set(actions[7:])
    assert opt.history[6].step_loss > 4 * losses[6]  # the spike-cut step still multiplied it
    assert max(losses) == losses[6]  # caught at the first jump: the loss never grows past it
    assert all(b < a for a, b in itertools.pairwise(losses[6:]))  # and goes on downhill
    assert losses[-1] < 0.6 * losses[6]


@pytest.mark.parametrize("lr", [1.0, 1.5])
def test_a_single_group_whose_step_hits_a_cliff_measures_its_new_step(lr):
    # a quadratic bowl with a cubic wall past w = 1.5; from 0 the step at this rate lands on
    # the wall (the loss 3x-100x its start), the fit is poor and only shrinks the rate. Without
    # a combined step to measure (one group) that rate blew up within the probe interval; now
    # the new step is measured, ended at its line minimum and, where it still multiplies the
    # loss, cut
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    loss = lambda: ((w - 1) ** 2 + 50 * torch.relu(w - 1.5) ** 3).sum()  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=lr))
    seen = []
    for _ in range(9):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        seen.append(loss().item())
    assert opt.history[0].groups[0].reason == "not_descent"  # the fit alone says little
    assert not math.isnan(opt.history[0].step_loss)  # the new step was measured
    assert max(seen) < 1.0 and seen[-1] < 1e-3


# -- found by review: the combined step ----------------------------------------------------------


def test_an_overshooting_combined_step_ends_at_its_line_minimum():
    # L = (w1 + w2 - 1)^2 / 2 from 0: each group's own step goes to 1, together they overshoot
    w1, w2 = nn.Parameter(torch.zeros(1, dtype=F64)), nn.Parameter(torch.zeros(1, dtype=F64))
    loss = lambda: 0.5 * (w1 + w2 - 1.0).pow(2).sum()  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([{"params": [w1]}, {"params": [w2]}], lr=1.0))
    opt.zero_grad()
    loss().backward()
    opt.step(loss)
    rec = opt.history[0]
    assert rec.coupling_ratio == pytest.approx(0.5, rel=1e-12)  # B / C of the measured step
    # the step is shortened to the minimum along it, once (not by the new coupling as well)
    assert w1.item() == pytest.approx(0.5, abs=1e-12) and w2.item() == pytest.approx(0.5, abs=1e-12)
    assert loss().item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("policy", ["paper", "robust"])
def test_coupled_fit_is_newton_under_either_policy(policy):
    # L = w1^2 + w2^2 + w1 w2 - w1 - w2: one coupled Newton step from 0 reaches (1/3, 1/3)
    w1, w2 = nn.Parameter(torch.zeros(1, dtype=F64)), nn.Parameter(torch.zeros(1, dtype=F64))
    loss = lambda: (w1**2 + w2**2 + w1 * w2 - w1 - w2).sum()  # noqa: E731
    base = torch.optim.SGD([{"params": [w1]}, {"params": [w2]}], lr=0.3)  # (robust: the
    opt = hidlr.HiDLR(base, coupled=True, policy=policy, smoothing=0.0)  # warm-up takes 1/3)
    opt.zero_grad()
    loss().backward()
    opt.step(loss)
    assert opt.lrs == pytest.approx([1 / 3, 1 / 3], rel=1e-10)
    assert [w1.item(), w2.item()] == pytest.approx([1 / 3, 1 / 3], rel=1e-10)
    assert opt.history[0].coupling == 1.0  # no diagonal correction on top of the solve


# -- session 9: losses below zero, growth while the loss rises ---------------------------------


def test_spikes_of_a_loss_at_or_below_zero_are_judged_by_the_recent_range():
    from hidlr.rates import spike

    recent = [-99.0, -99.5, -99.8]  # floor -99.8, range 0.8: a spike rises 3 x 0.8 above it
    assert spike(-97.0, recent)
    assert not spike(-97.5, recent)  # within the noise the history shows
    assert not spike(-99.9, recent)
    assert not spike(5.0, [-1.0, -1.0, -1.0])  # no range: nothing to judge by
    assert not spike(5.0, [-1.0, -2.0])  # too little history
    assert spike(float("inf"), [-1.0])


@pytest.mark.parametrize("offset", [0.0, -1000.0])
def test_a_jump_of_the_loss_is_a_spike_wherever_zero_lies(offset):
    # a noisy quadratic plus a constant; at step 8 the loss jumps by 100 and stays up: a spike
    # whether the loss is positive or far below zero (before session 9: only if positive)
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.zeros(2, dtype=F64))
    shift = [offset]
    noise = [0.0]
    loss = lambda: ((w - 3.0) ** 2).sum() + shift[0] + noise[0]  # noqa: E731
    # (the closure is the gradient's own loss: on_own_batch="warn" keeps the probes on it)
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.05), update_every=1, on_own_batch="warn")
    for step in range(12):
        if step == 8:
            shift[0] += 100.0
        noise[0] = 0.1 * torch.rand((), generator=gen, dtype=F64).item()
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    actions = [rec.groups[0].action for rec in opt.history]
    assert actions[8] == "spike" and actions.count("spike") == 1


def test_a_rate_that_sees_no_curvature_grows_only_while_the_loss_does_not_rise():
    kw = {"smoothing": 0.9, "probe_reach": 2.0}
    linear = RateDecision(math.nan, False, "not_convex")
    assert robust_rate(0.1, 3, linear, 1.0, 0.0, **kw) == RobustStep(0.2, 0, "grow")
    assert robust_rate(0.1, 3, linear, 1.0, 0.0, rising=True, **kw) == RobustStep(0.1, 3, "keep")
    flat = RateDecision(math.nan, False, "flat")  # (too small to resolve: the same rule)
    assert robust_rate(0.1, 3, flat, 0.0, 0.0, resolved=False, rising=True, **kw).action == "keep"

    # in the optimizer: a loss (nearly) linear along the step, shifted up between probe steps or not
    assert _actions_on_a_linear_loss(rise=0.0) == ["grow"] * 4
    assert _actions_on_a_linear_loss(rise=1.0) == ["grow"] + ["keep"] * 3


def _actions_on_a_linear_loss(rise):
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    shift = [0.0]
    loss = lambda: -w.sum() - 1e-3 * (w**2).sum() + shift[0]  # noqa: E731 (slightly concave)
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.01), update_every=1)
    for _ in range(4):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        shift[0] += rise  # (each step lowers the loss by 0.03 x the rate's growth)
    return [rec.groups[0].action for rec in opt.history]


def test_a_loss_is_rising_above_its_last_value_and_a_margin_over_its_floor():
    from hidlr.rates import RISE_MARGIN, rising

    assert rising(1.2, [1.0, 1.1])
    assert not rising(1.0 + 0.9 * RISE_MARGIN, [1.0, 1.02])  # a plateau's wobble
    assert not rising(1.3, [1.0, 1.5])  # lower than the last probe step's
    assert rising(-0.8, [-1.0, -0.9])  # the margin is of the floor's size
    assert not rising(1.2, []) and not rising(float("nan"), [1.0])


# -- session 9: a closure on the gradient's own batch ------------------------------------------


def _least_squares(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 3, generator=gen, dtype=F64), torch.randn(32, generator=gen, dtype=F64)


def test_the_slope_on_the_gradients_own_batch_comes_from_the_gradient():
    # least squares under SGD: the step at unit rate is -g, so b on g's own batch is |g|^2;
    # probes on that batch fit it exactly (a quadratic), probes on another fit g2 . g
    (x, y), (x2, y2) = _least_squares(0), _least_squares(1)
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    loss_on = lambda a, t: 0.5 * ((a @ w - t) ** 2).mean()  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), update_every=1)
    for probe_x, probe_y in ((x, y), (x2, y2)):
        opt.zero_grad()
        loss_on(x2, y2).backward()
        g2 = w.grad.clone()
        opt.zero_grad()
        loss_on(x, y).backward()
        g = w.grad.clone()
        opt.step(lambda a=probe_x, t=probe_y: loss_on(a, t))
        probe = opt.history[-1].groups[0]
        assert probe.own_b == pytest.approx(g.dot(g).item(), rel=1e-12)
        assert probe.b == pytest.approx((g if probe_x is x else g2).dot(g).item(), rel=1e-9)
    assert opt.history[-1].groups[0].b != pytest.approx(opt.history[-1].groups[0].own_b, rel=0.1)


def test_a_fitted_slope_reproduces_the_gradients_own_within_the_tolerance():
    from hidlr._own_batch import OWN_BATCH_TOLERANCE, own_batch_found, reproduces_own_slope

    assert reproduces_own_slope(1.05, 1.0) is True
    assert reproduces_own_slope(1.2, 1.0) is False
    assert reproduces_own_slope(-1.0, -1.0 / (1 + 0.9 * OWN_BATCH_TOLERANCE)) is True
    assert reproduces_own_slope(-1.0, 1.0) is False
    assert reproduces_own_slope(math.nan, 1.0) is None  # not measured
    assert reproduces_own_slope(1.0, 0.0) is None
    # at least 4 agreeing fits, and a majority of those compared
    assert own_batch_found(4, 4) and own_batch_found(4, 7) and own_batch_found(9, 16)
    assert not own_batch_found(3, 3) and not own_batch_found(4, 8) and not own_batch_found(8, 16)


def _regression_run(
    probe, steps=30, update_every=1, gate=False, batch=16, late=False, cls=None, **options
):
    """Adam on least squares with ``batch`` examples per step; the closure evaluates
    ``probe``: "next" (the next batch), "own" (the gradient's), "full" (every step trains and
    probes all the data). ``gate``: the loop passes the closure only when ``needs_closure()``;
    ``late``: the closure reads the loop's current batch when called (a ``lambda`` over the
    loop variable), not the one it was made for."""
    gen = torch.Generator().manual_seed(3)
    w_true = torch.randn(4, generator=gen, dtype=F64)
    batches = []
    for _ in range(steps + 1):
        x = torch.randn(batch, 4, generator=gen, dtype=F64)
        batches.append((x, x @ w_true + 2.0 * torch.randn(batch, generator=gen, dtype=F64)))
    if probe == "full":
        whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        batches = [whole] * (steps + 1)
    w = nn.Parameter(torch.zeros(4, dtype=F64))
    loss_on = lambda b: ((b[0] @ w - b[1]) ** 2).mean()  # noqa: E731
    opt = (cls or hidlr.HiDLR)(torch.optim.Adam([w], lr=0.05), update_every=update_every, **options)
    weights, current = [], [None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            opt.zero_grad()
            loss_on(batches[i]).backward()
            current[0] = batches[i + 1 if probe == "next" else i]
            closure = lambda b=current[0]: loss_on(current[0] if late else b)  # noqa: E731
            opt.step(closure if opt.needs_closure() or not gate else None)
            weights.append(w.detach().clone())
    return opt, [w for w in caught if "gradient's own batch" in str(w.message)], weights


def test_a_closure_on_the_gradients_own_batch_switches_to_deferred_probes():
    from hidlr._own_batch import OWN_BATCH_EVIDENCE

    opt, caught, weights = _regression_run("own")
    assert len(caught) == 1 and caught[0].filename == __file__  # (the caller's line)
    assert "defers its probes" in str(caught[0].message)
    assert opt.options["defer_probes"] is True
    own = [g.own_b for r in opt.history for g in r.groups]
    assert all(math.isfinite(v) for v in own[:OWN_BATCH_EVIDENCE])  # measured until found,
    assert all(math.isnan(v) for v in own[OWN_BATCH_EVIDENCE:])  # then no more
    # the same as switching defer_probes on by hand before the step after the one that decided
    # (which compared the two closures' losses), and not the same as never switching
    manual = _replay_switching_at(OWN_BATCH_EVIDENCE)
    never = _replay_switching_at(None)
    assert all(torch.equal(a, b) for a, b in zip(manual, weights, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(never, weights, strict=True))


def _replay_switching_at(switch_step, steps=30):
    """:func:`_regression_run` on the gradient's own batch with ``on_own_batch="warn"``,
    ``defer_probes`` switched on by hand before step ``switch_step``; the weights per step."""
    gen = torch.Generator().manual_seed(3)
    w_true = torch.randn(4, generator=gen, dtype=F64)
    batches = []
    for _ in range(steps + 1):
        x = torch.randn(16, 4, generator=gen, dtype=F64)
        batches.append((x, x @ w_true + 2.0 * torch.randn(16, generator=gen, dtype=F64)))
    w = nn.Parameter(torch.zeros(4, dtype=F64))
    loss_on = lambda b: ((b[0] @ w - b[1]) ** 2).mean()  # noqa: E731
    opt = hidlr.HiDLR(torch.optim.Adam([w], lr=0.05), update_every=1, on_own_batch="warn")
    weights = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            if i == switch_step:
                opt.options["defer_probes"] = True
            opt.zero_grad()
            loss_on(batches[i]).backward()
            opt.step(lambda b=batches[i]: loss_on(b))
            weights.append(w.detach().clone())
    return weights


def test_own_batch_probes_only_warn_where_deferring_is_not_possible_or_not_wanted():
    for kwargs in (
        {"on_own_batch": "warn"},  # not wanted
        {"update_every": 4, "gate": True},  # the loop passes a closure only when asked
    ):
        opt, caught, _ = _regression_run("own", steps=60, **kwargs)
        assert len(caught) == 1 and "with_probe_batch" in str(caught[0].message), kwargs
        assert "defers" not in str(caught[0].message)
        assert opt.options["defer_probes"] is False
    # the Hugging Face trainer's optimizer: the trainer chose the batch, and refuses
    # defer_probes; the advice leaves it out
    from hidlr.integrations.transformers import ClosureHiDLR

    opt, caught, _ = _regression_run("own", steps=12, cls=ClosureHiDLR)
    assert len(caught) == 1 and opt.options["defer_probes"] is False
    assert "defer_probes" not in str(caught[0].message)
    # a loop that passes its closure at every step, with probe steps every 4: it defers
    opt, caught, _ = _regression_run("own", steps=60, update_every=4)
    assert len(caught) == 1 and opt.options["defer_probes"] is True
    with pytest.raises(ValueError, match="on_own_batch must be one of"):
        hidlr.HiDLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), on_own_batch="x")


def test_full_batch_training_keeps_its_probes_and_says_nothing():
    # every step sees all the data: the fits reproduce the gradient's slope by design, and the
    # next step's closure gives the probe step's loss at the same weights
    auto, caught, weights = _regression_run("full")
    assert caught == [] and auto.options["defer_probes"] is False
    _, caught, same = _regression_run("full", on_own_batch="warn")
    assert len(caught) == 1  # (it cannot tell full-batch training without looking)
    assert all(torch.equal(a, b) for a, b in zip(weights, same, strict=True))


def test_probes_on_the_next_batch_or_deferred_are_not_acted_on():
    for kwargs in ({}, {"defer_probes": True}):
        probe = "next" if not kwargs else "own"  # deferred: the next step's batch
        opt, caught, _ = _regression_run(probe, **kwargs)
        assert caught == [] and opt.options["defer_probes"] is bool(kwargs)
    assert opt._own_batch == (0, 0)  # deferred: nothing to compare (the gradient moved on)


def test_a_lambda_over_the_loop_variables_is_found_too():
    # opt.step(lambda: loss_fn(model(x), y)) reads the loop's x, y when called: at the step
    # after the probe step, the probe step's closure reads the new batch too
    opt, caught, _ = _regression_run("own", late=True)
    assert len(caught) == 1 and "defers its probes" in str(caught[0].message)
    assert opt.options["defer_probes"] is True and opt._own_batch_outcome == "own"
    full, caught, _ = _regression_run("full", late=True)
    assert caught == [] and full._own_batch_outcome == "full_batch"


@pytest.mark.parametrize("failing", [("now", 1), ("now", 2), ("now", 3), ("before", 1)])
def test_a_closure_that_raises_while_confirming_changes_nothing(failing):
    # a model with BatchNorm and dropout, the probe step's closure held; this step's closure
    # is called at the current weights, then a step down the gradient, then up (the probe
    # step's once: with dropout its loss at the same weights moved on with the random
    # state): whichever call raises, the weights, buffers, random state and optimizer state
    # are as before, the warning is given and the error propagates
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    x2, y2 = torch.randn(16, 3), torch.randn(16, 1)
    opt = hidlr.HiDLR(torch.optim.SGD(model.parameters(), lr=0.01), update_every=1)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    calls = {"now": 0, "before": 0}

    def closure(name, a, b):
        def loss():
            calls[name] += 1
            if (name, calls[name]) == failing:
                raise RuntimeError("data loader failed")
            return nn.functional.mse_loss(model(a), b)

        return loss

    before, now = closure("before", x, y), closure("now", x2, y2)
    opt._own_batch, opt._own_batch_outcome = (4, 4), "pending"
    reference = opt._loss_here(lambda: nn.functional.mse_loss(model(x), y))
    opt._own_batch_closure = (before, reference, 0.01)
    opt.zero_grad()
    nn.functional.mse_loss(model(x2), y2).backward()

    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    with (
        pytest.warns(UserWarning, match="gradient's own batch"),
        pytest.raises(RuntimeError, match="data loader failed"),
    ):
        opt.step(now)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and opt.steps == 0
    assert opt.options["defer_probes"] is False and opt._own_batch_outcome == "warned"
    assert opt._own_batch_closure is None


def test_next_batch_probes_that_look_like_the_gradients_own_are_told_apart(monkeypatch):
    # a loose tolerance makes the fits on the next batch look like the gradient's own (as a
    # batch with little noise can); the next step's gradient tells them apart (the probe
    # step's closure held the batch it trains on)
    import hidlr._own_batch as own_batch

    monkeypatch.setattr(own_batch, "OWN_BATCH_TOLERANCE", 0.9)
    opt, caught, _ = _regression_run("next", steps=12)
    assert own_batch.own_batch_found(*opt._own_batch)  # found by the fits
    assert caught == [] and opt.options["defer_probes"] is False
    own, caught, _ = _regression_run("own", steps=12)
    assert len(caught) == 1 and own.options["defer_probes"] is True


def test_a_checkpoint_from_before_an_option_existed_keeps_the_constructors_value():
    w = nn.Parameter(torch.zeros(2))
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.1), on_own_batch="warn")
    state = opt.state_dict()
    del state["hidlr"]["options"]["on_own_batch"]  # (saved before session 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(state)
    assert opt.options["on_own_batch"] == "warn"


def test_a_checkpoint_keeps_what_the_own_batch_check_found():
    opt, _, _ = _regression_run("own", steps=12)
    assert opt.options["defer_probes"] is True
    w = nn.Parameter(torch.zeros(4, dtype=F64))
    fresh = hidlr.HiDLR(torch.optim.Adam([w], lr=0.05), update_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the check switched defer_probes on: no warning)
        fresh.load_state_dict(opt.state_dict())
    assert fresh._own_batch == opt._own_batch and fresh.options["defer_probes"] is True
    assert fresh._own_batch_outcome == "own"
    # saved while the confirmation was pending: it needs the closure, so the warning comes
    from hidlr._own_batch import OWN_BATCH_EVIDENCE

    pending, _, _ = _regression_run("own", steps=OWN_BATCH_EVIDENCE)
    assert pending._own_batch_outcome == "pending"
    with pytest.warns(UserWarning, match="defer_probes=True; in full-batch"):
        fresh.load_state_dict(pending.state_dict())
    assert fresh._own_batch_outcome == "warned" and fresh.options["defer_probes"] is False


def test_a_closure_that_raises_after_the_probe_step_ends_the_check_not_the_step(monkeypatch):
    # the closure's loss at the end of the probe step that found the gradient's own batch is
    # the check's own extra call: if it raises, the step stands as a probe step leaves it,
    # the check ends with the warning, and training goes on (a closure that stays broken
    # fails at the next probe step, as any probe's would)
    def broken(self, closure):
        raise RuntimeError("data loader failed")

    monkeypatch.setattr(hidlr.HiDLR, "_loss_here", broken)
    opt, caught, weights = _regression_run("own", steps=12)
    assert len(caught) == 1 and "could not finish" in str(caught[0].message)
    assert opt.options["defer_probes"] is False and opt._own_batch_outcome == "warned"
    monkeypatch.undo()
    _, _, warned = _regression_run("own", steps=12, on_own_batch="warn")
    assert all(torch.equal(a, b) for a, b in zip(weights, warned, strict=True))


def _verdict_setup(offset=0.0, scale=1.0):
    """A BatchNorm MLP with the gradient of batch 0 (its loss times ``scale`` plus
    ``offset``), and closures on batches 0, 1 and 2."""
    from hidlr._own_batch import own_batch_verdict
    from hidlr._probing import probe_context

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    data = [(torch.randn(32, 3), torch.randn(32, 1)) for _ in range(3)]
    loss_of = [lambda b=b: scale * nn.functional.mse_loss(model(b[0]), b[1]) + offset for b in data]
    loss_of[0]().backward()
    params = list(model.parameters())
    # one SGD step at rate 0.05 / scale (a loss scaled down takes a larger rate) changes the
    # loss by about that rate times |g|^2
    step_change = 0.05 / scale * sum(float(p.grad.pow(2).sum()) for p in params)

    def verdict(now, before, reference):
        with probe_context([torch.device("cpu")], params) as (rng, guard):

            def ev(fn):
                rng.replay()
                value = fn().item()
                guard.restore()
                return value

            return own_batch_verdict(
                params, reference, step_change, lambda: ev(now), lambda: ev(before)
            )

    def loss_here(fn):
        with torch.no_grad():
            state = [b.clone() for b in model.buffers()]
            value = fn().item()
            for b, s in zip(model.buffers(), state, strict=True):
                b.copy_(s)
        return value

    return model, loss_of, verdict, loss_here


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (100.0, 1.0), (0.0, 1e-6), (-50.0, 1.0)])
def test_the_verdict_finds_the_gradients_batch_whatever_the_losss_offset_or_scale(offset, scale):
    # g is batch 0's gradient; "now" on batch 0 is the gradient's own batch, "now" on batch 2
    # with the probe step's closure still on batch 1 is neither; weights and buffers come back
    model, loss_of, verdict, loss_here = _verdict_setup(offset, scale)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    ref1 = loss_here(loss_of[1])
    assert verdict(loss_of[0], loss_of[1], ref1) == "own"
    assert verdict(loss_of[1], loss_of[0], loss_here(loss_of[0])) == "next_batch"
    assert verdict(loss_of[2], loss_of[1], ref1) == "unknown"  # neither reads g's batch
    assert verdict(loss_of[1], loss_of[1], ref1) == "full_batch"
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_an_optimizer_pickled_between_the_two_steps_of_the_check_drops_it():
    import pickle

    from hidlr._own_batch import OWN_BATCH_EVIDENCE

    opt, _, _ = _regression_run("own", steps=OWN_BATCH_EVIDENCE)
    assert opt._own_batch_outcome == "pending"
    copy = pickle.loads(pickle.dumps(opt))
    assert copy._own_batch_closure is None and copy._own_batch_outcome == "warned"
    assert opt._own_batch_closure is not None  # (the original keeps its check)


def test_the_descent_frequency_is_an_average_of_the_slopes_signs():
    from hidlr.rates import DESCENT_WEIGHT, NOISE_GATE, track_descent

    assert track_descent(1.0, 0.3) == 1.0
    assert track_descent(1.0, -0.3) == pytest.approx(1.0 - DESCENT_WEIGHT)
    assert track_descent(0.6, float("nan")) == 0.6  # probes that blew up measure no noise
    frequency, ascents = 1.0, 0
    while frequency >= NOISE_GATE:  # from a start at 1: four ascents in a row (0.9^4 = 0.66)
        frequency, ascents = track_descent(frequency, -1.0), ascents + 1
    assert ascents == 4
    # signs alternating: a two-cycle around one half, x = 0.1 / (1 - 0.81) after a descent
    for i in range(400):
        frequency = track_descent(frequency, 1.0 if i % 2 else -1.0)
    assert frequency == pytest.approx(0.1 / 0.19, rel=1e-9)


def test_a_noisy_group_takes_no_proposal_beyond_its_probes_and_does_not_grow_blindly():
    from hidlr.rates import WARMUP_UPDATES

    kw = {"smoothing": 0.9, "probe_reach": 2.0}
    n = WARMUP_UPDATES
    far = robust_rate(1.0, n, accepted(100.0), 1.0, 0.01, **kw)
    capped = robust_rate(1.0, n, accepted(100.0), 1.0, 0.01, noisy=True, **kw)
    assert far.rate == pytest.approx(100.0**0.1) and capped.rate == pytest.approx(2.0**0.1)
    # as far on the short side: a noisy minimiser at a quarter of the rate counts as half
    # of it (the probes' reach below the rate), one within the reach as itself
    short = robust_rate(1.0, n, accepted(0.25), 1.0, 4.0, **kw)
    assert short.rate == pytest.approx(0.25**0.1)
    for proposed, counted in [(0.25, 0.5), (0.7, 0.7), (1.9, 1.9)]:
        out = robust_rate(1.0, n, accepted(proposed), 1.0, 1.0 / proposed, noisy=True, **kw)
        assert out.rate == pytest.approx(counted**0.1)
    # the warm-up and the safeguards on the downside are as before
    assert robust_rate(1.0, 0, accepted(100.0), 1.0, 0.01, noisy=True, **kw).rate == 1.5
    linear = rejected("not_convex")
    assert robust_rate(1.0, n, linear, 1.0, 0.0, noisy=True, **kw) == RobustStep(1.0, n, "keep")
    up, down = (
        robust_rate(1.0, n, d, *ba, noisy=True, **kw).rate
        for d, ba in [(accepted(50.0), (1.0, 0.02)), (rejected("not_descent"), (-1.0, 3.0))]
    )
    assert up * down == pytest.approx(1.0)  # a capped rise and an ascent balance exactly


def test_the_starting_plateau_is_judged_by_the_progress_from_the_first_loss():
    from hidlr.rates import PLATEAU_PROGRESS, on_plateau

    assert PLATEAU_PROGRESS == 0.05
    assert on_plateau(0.96, 1.0) and not on_plateau(0.94, 1.0)
    assert on_plateau(3.0, 1.0)  # above the first loss: no progress at all
    assert on_plateau(-1.04, -1.0) and not on_plateau(-1.06, -1.0)  # the scale is |first|
    assert not on_plateau(1.0, None)  # no first loss yet
    assert not on_plateau(float("nan"), 1.0) and not on_plateau(float("inf"), 1.0)


def test_a_noisy_group_grows_without_a_fit_only_on_the_starting_plateau():
    from hidlr.rates import WARMUP_UPDATES

    kw = {"smoothing": 0.9, "probe_reach": 2.0, "noisy": True}
    n = WARMUP_UPDATES
    linear = rejected("not_convex")
    assert robust_rate(1.0, n, linear, 1.0, 0.0, **kw) == RobustStep(1.0, n, "keep")
    assert robust_rate(1.0, n, linear, 1.0, 0.0, plateau=True, **kw) == RobustStep(2.0, 0, "grow")
    # a rising loss keeps the rate on the plateau too, and an ascent is no reason to grow
    kept = robust_rate(1.0, n, linear, 1.0, 0.0, plateau=True, rising=True, **kw)
    assert kept == RobustStep(1.0, n, "keep")
    ascent = robust_rate(1.0, n, linear, -1.0, 0.0, plateau=True, **kw)
    assert ascent.action != "grow"


def _linear_noise_run(plateau_rule, monkeypatch, drop_at=None, steps=60):
    """A flat loss whose slope is pure noise, ``c + z_i w`` with random signs ``z_i``: no
    curvature at any rate, the slope on the next batch descends about half the time. ``c``
    is 10, and 5 from step ``drop_at`` on (progress, as the loss leaving its plateau)."""
    import hidlr.optimizer

    if not plateau_rule:
        monkeypatch.setattr(hidlr.optimizer, "on_plateau", lambda loss, first: False)
    gen = torch.Generator().manual_seed(0)
    z = torch.sign(torch.rand(steps + 1, generator=gen, dtype=F64) - 0.5)
    w = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=1e-3), update_every=1)

    def loss(i):
        c = 10.0 if drop_at is None or i < drop_at else 5.0
        return c + z[i] * w.sum()

    for i in range(steps):
        opt.zero_grad()
        loss(i).backward()
        opt.step(lambda i=i: loss(i + 1))
    return opt


def test_a_noisy_group_climbs_off_its_starting_plateau(monkeypatch):
    from hidlr.rates import NOISE_GATE

    climbed = _linear_noise_run(True, monkeypatch)
    assert climbed.param_groups[0]["hidlr_descent"] < NOISE_GATE  # noise-dominated
    left = _linear_noise_run(True, monkeypatch, drop_at=20)
    grows = [i for i, r in enumerate(left.history) if r.groups[0].action == "grow"]
    assert grows and max(grows) < 20  # none once the loss has left its plateau
    held = _linear_noise_run(False, monkeypatch)  # the rule off: the noise gate holds it
    assert climbed.lrs[0] > 5 * held.lrs[0]


def _noise_dominated_run(steps):
    """A loss whose slope along the step is pure noise: batch i's loss is
    ``10 + eps w^2 / 2 + z_i w`` with random signs ``z_i``. The step from batch i, probed on
    batch i + 1, descends half the time, and then the fit (exact: the loss is quadratic)
    proposes about ``1 / eps`` times the rate."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(steps + 1, generator=gen, dtype=F64) + 0.5) * torch.sign(
        torch.rand(steps + 1, generator=gen, dtype=F64) - 0.5
    )
    w = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=0.01), update_every=1)

    def loss(i):
        return 10.0 + 1e-4 * w.square().sum() / 2 + z[i] * w.sum()

    peak = 0.0
    for i in range(steps):
        opt.zero_grad()
        loss(i).backward()
        opt.step(lambda i=i: loss(i + 1))
        peak = max(peak, opt.lrs[0])
    return peak, opt.param_groups[0]["hidlr_descent"]


def test_noise_dominated_probes_do_not_drive_the_rate_up(monkeypatch):
    from hidlr.rates import NOISE_GATE

    # (the warm-up's four accepted fits take it to 0.05 at once; a streak of descents that
    # lifts the frequency over the gate lets a few doublings through: the gate is a brake,
    # not a bound; over 160 steps this run peaks at 3.2, the ungated one at 1.3e4)
    peak, descent = _noise_dominated_run(80)
    assert peak < 0.01 * 10 and descent < NOISE_GATE
    import hidlr.optimizer

    monkeypatch.setattr(hidlr.optimizer, "NOISE_GATE", 0.0)  # without the gate
    ungated, _ = _noise_dominated_run(80)
    assert ungated > 0.01 * 100  # accepted fits double it, ascents take off only 7% each


def test_an_overshoot_is_a_spike_of_the_rates_own_step_on_the_same_batch():
    from hidlr.rates import SPIKE_CUT, overshoot

    assert overshoot(1.0, 0.9, 1.0) == 1.0  # a descending step
    assert overshoot(1.0, 3.9, 0.4) == 1.0  # an ascent that noise could explain: kept
    assert overshoot(1.0, 4.1, 0.4) == SPIKE_CUT  # a spike: cut 10x ...
    assert overshoot(1.0, 400.0, 0.02) == 0.02  # ... or to the line minimum if shorter
    assert overshoot(1.0, float("inf"), 0.5) == SPIKE_CUT  # a step that blew up
    assert overshoot(-1.0, 5.0, 0.5) == 1.0  # no ratio for a loss at or below zero


def _poisson_two_scales(policy="robust"):
    """Poisson regression with two groups whose inputs differ 10x in scale, from a rate 0.1
    that is 20-50x too long for the second: the loss along its step is exponential, far from
    a quadratic over the probes."""
    g = torch.Generator().manual_seed(0)
    n = 512
    x1 = torch.randn(n, 4, generator=g, dtype=F64)
    x2 = 10 * torch.randn(n, 4, generator=g, dtype=F64)
    eta = x1 @ torch.randn(4, generator=g, dtype=F64) / 4
    y = torch.poisson(
        torch.exp(eta + x2 @ torch.randn(4, generator=g, dtype=F64) / 40), generator=g
    )
    w1, w2 = (torch.zeros(4, dtype=F64, requires_grad=True) for _ in range(2))
    base = torch.optim.SGD([{"params": [w1]}, {"params": [w2]}], lr=0.1)
    opt = hidlr.HiDLR(base, update_every=4, policy=policy)

    def loss(idx):
        eta = x1[idx] @ w1 + x2[idx] @ w2
        return (torch.exp(eta) - y[idx] * eta).mean()

    batches = [torch.randint(0, n, (64,), generator=g) for _ in range(41)]
    return opt, loss, batches, torch.arange(n)


def test_the_spike_rule_and_the_joint_check_judge_by_the_measured_loss_not_the_fitted():
    opt, loss, batches, _ = _poisson_two_scales()
    loss(batches[0]).backward()
    opt.step(lambda: loss(batches[1]))
    assert opt.history[-1].loss == 1.0  # exp(0) - y * 0 at w0 = 0, on the probe batch
    assert opt.history[-1].n_probes == 1 + 8 + 1  # w0, the probes, the combined step
    paper, loss, batches, _ = _poisson_two_scales("paper")
    loss(batches[0]).backward()
    paper.step(lambda: loss(batches[1]))
    fitted = paper.history[-1].loss
    assert abs(fitted - 1.0) > 1.0 and paper.history[-1].n_probes == 8  # the fit's intercept


@pytest.mark.parametrize("cut", [True, False])
def test_rates_whose_own_step_spikes_the_loss_are_cut_before_they_diverge(cut, monkeypatch):
    import hidlr.optimizer

    if not cut:  # (nor the gradient watch, which would roll it back: the test below)
        monkeypatch.setattr(hidlr.optimizer, "overshoot", lambda *_: 1.0)
        monkeypatch.setattr(hidlr.optimizer, "gradient_blew_up", lambda *_: False)
    opt, loss, batches, everything = _poisson_two_scales()
    losses = []
    for i in range(40):
        opt.zero_grad()
        value = loss(batches[i])
        losses.append(value.item())
        if not math.isfinite(value.item()):
            break
        value.backward()
        opt.step(lambda i=i: loss(batches[i + 1]))
    if cut:
        assert len(losses) == 40 and loss(everything).item() < 1.0  # below the initial loss
        assert opt.history[0].groups[1].action == "overshoot"
        # the rate whose step blew the loss up is a ceiling from then on
        ceiling = opt.history[0].groups[1].lr_before
        assert opt.param_groups[1]["hidlr_ceiling"] == ceiling
        assert max(r.groups[1].lr_after for r in opt.history) <= ceiling
    else:  # (within the first probe interval)
        assert not math.isfinite(losses[-1]) and len(losses) <= 4


def test_a_gradient_that_blows_up_between_probe_steps_rolls_back_before_the_loss_is_lost(
    monkeypatch,
):
    import hidlr.optimizer

    # the same run without the overshoot cut: its loss turns non-finite within the first probe
    # interval (the test above); the gradient norm sees the blow-up on its way, steps before
    monkeypatch.setattr(hidlr.optimizer, "overshoot", lambda *_: 1.0)
    opt, loss, batches, _ = _poisson_two_scales()
    w0 = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for i in range(40):
        opt.zero_grad()
        value = loss(batches[i])
        assert math.isfinite(value.item())
        value.backward()
        opt.step(lambda i=i: loss(batches[i + 1]))
        if any(g.action == "rollback" for r in opt.history for g in r.groups):
            break
    record = opt.history[-1]
    assert {g.action for g in record.groups} == {"rollback"} and 0 < record.step < 4
    assert math.isnan(record.loss)  # no loss was measured: the gradient's norm decided
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, q in zip(params, w0, strict=True):  # the first probe step's w0, up to rounding
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    assert all(g.lr_after == pytest.approx(0.1 * g.lr_before) for g in record.groups)
    assert all(not opt.optimizer.state.get(p) for p in params)  # the optimizer state is gone


def test_a_gradient_blows_up_at_a_hundred_times_the_largest_norm_at_a_probe_step():
    from hidlr.rates import gradient_blew_up

    assert gradient_blew_up(float("nan"), 0.0) and gradient_blew_up(float("inf"), 1.0)
    assert not gradient_blew_up(1e12, 0.0)  # no probe step yet: nothing to judge by
    assert not gradient_blew_up(100.0, 1.0) and gradient_blew_up(100.5, 1.0)


def test_a_blown_up_loss_is_ten_loss_scales_above_the_losses_seen():
    from hidlr.rates import blown_up

    assert blown_up(float("nan"), []) and blown_up(float("inf"), [1.0])
    assert not blown_up(1e9, [])  # nothing to judge by
    seen = [1.6, 0.5, 0.3]  # scale: the largest, 1.6; 10 scales above the floor: 16.3
    assert not blown_up(16.0, seen) and blown_up(17.0, seen)
    seen = [-0.5, -0.9]  # below zero: the scale is the range or the top's size, 0.5
    assert not blown_up(4.0, seen) and blown_up(4.2, seen)
    assert not blown_up(1.0, [0.0, 0.0])  # no scale at all: only a non-finite loss


def _regression(rollback=True, defer=False):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 6, generator=g, dtype=F64)
    y = x @ torch.randn(6, 1, generator=g, dtype=F64) + 0.1 * torch.randn(512, 1, generator=g)
    model = nn.Linear(6, 1).to(F64)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = hidlr.HiDLR(base, update_every=4, rollback=rollback, defer_probes=defer)
    batches = [torch.randint(0, 512, (32,), generator=g) for _ in range(61)]

    def loss(i):
        return ((model(x[batches[i]]) - y[batches[i]]) ** 2).mean()

    return model, opt, loss, lambda: ((model(x) - y) ** 2).mean().item()


@pytest.mark.parametrize("rollback", [True, False])
def test_weights_that_blow_up_between_probe_steps_go_back_to_the_last_probe_step(rollback):
    model, opt, loss, total = _regression(rollback)
    start = total()
    kept = None
    for i in range(60):
        if i == 8:  # the probe step whose w0 is kept
            kept = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss(i).backward()
        opt.step(lambda i=i: loss(i + 1))
        if i == 11:  # a step that wrecks the weights (as a huge gradient on one batch would)
            with torch.no_grad():  # (just before a probe step: earlier, the gradient watch
                model.weight.mul_(1e4)  # would roll back first, at the next step)
        if i == 12 and rollback:  # the probe step finds the loss blown up
            record = opt.history[-1]
            assert record.step == 12 and {g.action for g in record.groups} == {"rollback"}
            for p, q in zip(model.parameters(), kept, strict=True):  # (w0 up to rounding)
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
            assert all("momentum_buffer" not in opt.optimizer.state[p] for p in model.parameters())
            before = opt.history[-2].groups[0].lr_after
            assert opt.lrs[0] == pytest.approx(0.1 * before)
            assert opt.param_groups[0]["hidlr_ceiling"] == before
    if rollback:
        assert total() < 0.05 * start
        ceiling = opt.param_groups[0]["hidlr_ceiling"]  # the rate the weights blew up at
        assert max(r.groups[0].lr_after for r in opt.history[3:]) <= ceiling
    else:
        assert not all(g.action == "rollback" for r in opt.history for g in r.groups)
        assert not total() < 0.05 * start  # the wrecked weights stay far off


def test_rollback_is_checked():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="rollback"):
        hidlr.HiDLR(torch.optim.SGD(model.parameters(), lr=0.1), rollback="yes")


@pytest.mark.parametrize("ceiling", [0.01, math.inf])
def test_a_rate_never_grows_past_its_ceiling(ceiling):
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    loss = lambda: 0.5 * (w**2).sum()  # noqa: E731 (the one-step optimum: rate 1)
    opt = hidlr.HiDLR(torch.optim.SGD([w], lr=1e-3), update_every=1)
    opt.param_groups[0]["hidlr_ceiling"] = ceiling  # as an overshoot at 0.01 would have set
    rates = []
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        rates.append(opt.lrs[0])
    if math.isfinite(ceiling):
        assert max(rates) == ceiling
    else:
        assert max(rates) > 0.1  # the climb the ceiling stops


@pytest.mark.parametrize("gate", [False, True])
def test_deferred_probes_roll_back_too_and_skip_the_wrecked_gradient(gate):
    # probes deferred to the step after each probe step, on that step's own batch; with a
    # closure at every step (gate=False) probe step 12 finds the loss there blown up, with
    # one only where needs_closure() (gate=True) the step after does
    model, opt, loss, total = _regression(defer=True)
    start = total()
    found = 13 if gate else 12
    for i in range(60):
        if i == 8:  # the probe step whose w0 the next step keeps
            kept = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss(i).backward()
        opt.step((lambda i=i: loss(i)) if opt.needs_closure() or not gate else None)
        if i == 11:  # wrecked after the probes of step 8 were resolved at step 9, right
            with torch.no_grad():  # before probe step 12 (earlier, the gradient watch would
                model.weight.mul_(1e4)  # roll back first, at the next step)
        if i == found:
            record = opt.history[-1]
            assert record.step == found and {g.action for g in record.groups} == {"rollback"}
            for p, q in zip(model.parameters(), kept, strict=True):  # no update on top
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
            assert opt.steps == found + 1 and not opt.optimizer.state[model.weight]
    assert total() < 0.05 * start


@pytest.mark.parametrize("gate", [False, True])
def test_a_deferred_update_that_wrecks_the_weights_is_rolled_back_at_the_step_after(gate):
    # the probe step's own update is taken before its probes: here it wrecks the weights,
    # while its w0 is sound. The step after finds the loss at the current weights blown up
    model, opt, loss, total = _regression(defer=True)
    start = total()
    for i in range(40):
        if i == 8:
            kept = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss(i).backward()
        opt.step((lambda i=i: loss(i)) if opt.needs_closure() or not gate else None)
        if i == 12:  # right after probe step 12's update
            with torch.no_grad():
                model.weight.mul_(1e4)
        if i == 13:
            record = opt.history[-1]
            assert record.step == 13 and {g.action for g in record.groups} == {"rollback"}
            for p, q in zip(model.parameters(), kept, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
            assert not opt.needs_closure()  # probe step 12's probes were dropped
    assert total() < 0.05 * start


def test_a_noisy_groups_bound_is_symmetric_about_its_own_rate_under_a_coupling_factor():
    from hidlr.rates import WARMUP_UPDATES, diagonal_rates

    # two coupled groups: each runs at 0.2 of its diagonal rate (the coupling factor), so the
    # probes reach 2 * 0.2 = 0.4 of it; a noisy proposal equal to the diagonal rate itself
    # (its steady state) keeps it, where bounding it by the probes' reach cut it every time
    n = WARMUP_UPDATES
    kw = {"smoothing": 0.9, "probe_reach": 0.4, "noisy": True, "reach": 2.0}
    assert robust_rate(1.0, n, accepted(1.0), 1.0, 1.0, **kw).rate == pytest.approx(1.0)
    assert robust_rate(1.0, n, accepted(100.0), 1.0, 0.01, **kw).rate == pytest.approx(2.0**0.1)
    assert robust_rate(1.0, n, accepted(0.01), 1.0, 100.0, **kw).rate == pytest.approx(0.5**0.1)
    fit = QuadraticFit(1.0, (1.0, 1.0), ((1.0, 0.0), (0.0, 1.0)), (0.99, 0.99), False, (1.0, 1.0))
    diag, counts, actions = diagonal_rates(
        fit,
        [accepted(1.0), accepted(1.0)],
        [0, 1],
        [0.2, 0.2],  # the rates the probes were placed at
        [1.0, 1.0],
        [n, n],
        policy="robust",
        smoothing=0.9,
        reach=2.0,
        max_rate_change=None,
        noisy=[True, False],
    )
    assert diag == pytest.approx([1.0, 1.0]) and actions == ["update", "update"]
    assert counts == [n + 1, n + 1]
