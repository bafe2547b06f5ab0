"""HiDLR in a Lightning Trainer (CPU): automatic optimisation, probes, checkpoint resume."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from hidlr.integrations.lightning import HiDLRCallback, LightningHiDLR  # noqa: E402

pytestmark = pytest.mark.integration

BATCHES_PER_EPOCH = 4


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES_PER_EPOCH * 16, 5, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.1 * torch.randn(
        len(x), 1, generator=gen
    )
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 1)
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_after_backward(self) -> None:
        self.backwards += 1

    def probe_loss(self, batch):
        x, y = batch
        assert not torch.is_grad_enabled()
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        base = torch.optim.SGD(
            [{"params": self.body.parameters()}, {"params": self.head.parameters()}], lr=0.02
        )
        return LightningHiDLR(base, update_every=2)


def _trainer(max_epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[HiDLRCallback()],
        **kwargs,
    )


def _fit(max_epochs: int, ckpt_path=None) -> tuple[Net, L.Trainer]:
    net, trainer = Net(), _trainer(max_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(net, _loader(), ckpt_path=ckpt_path)
    return net, trainer


def _opt(trainer: L.Trainer) -> LightningHiDLR:
    return trainer.optimizers[0]


def test_trains_and_adapts_rates():
    net, trainer = _fit(3)
    opt = _opt(trainer)
    assert isinstance(opt, LightningHiDLR)
    assert opt.steps == trainer.global_step == 3 * BATCHES_PER_EPOCH
    assert net.backwards == opt.steps  # one forward-backward per step, none during probes
    assert len(opt.history) == opt.steps // 2
    assert opt.lrs != [0.02, 0.02]
    assert any(r.accepted for rec in opt.history for r in rec.groups)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    whole, whole_trainer = _fit(4)
    _, first = _fit(2)
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    resumed, trainer = _fit(4, ckpt_path=path)
    assert _opt(trainer).steps == _opt(whole_trainer).steps == 4 * BATCHES_PER_EPOCH
    assert _opt(trainer).lrs == _opt(whole_trainer).lrs
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    # repr: the records hold NaNs (no proposal), which == would call different
    assert repr(_opt(trainer).history) == repr(_opt(whole_trainer).history)


def test_needs_probe_loss():
    class NoProbe(Net):
        probe_loss = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="probe_loss"):
        _trainer(1).fit(NoProbe(), _loader())


def test_refuses_more_than_one_process(monkeypatch):
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"HiDLRCallback runs in one process \(world_size is 2\)"):
        _fit(1)


def test_step_without_callback_explains():
    net = Net()
    opt = net.configure_optimizers()
    loss = net.training_step(next(iter(_loader())), 0)
    loss.backward()
    with pytest.raises(RuntimeError, match="HiDLRCallback"):
        opt.step()


def test_probe_loss_passed_to_the_callback():
    class NoProbe(Net):
        probe_loss = None  # type: ignore[assignment]

    calls = []

    def probe_loss(module, batch):
        calls.append(len(batch[0]))
        return nn.functional.mse_loss(module(batch[0]), batch[1])

    net = NoProbe()
    trainer = _trainer(1)
    trainer.callbacks = [HiDLRCallback(probe_loss)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader())
    # two probe steps of the robust policy with two groups: the loss at w0, 4 + 4 probes and
    # the combined step
    assert calls == [16] * 20
    assert _opt(trainer).steps == BATCHES_PER_EPOCH


class Recording(Net):
    """Records the batches trained on and probed."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[torch.Tensor] = []
        self.probed: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.trained.append(batch[0])
        return super().training_step(batch, batch_idx)

    def probe_loss(self, batch):
        self.probed.append(batch[0])
        return super().probe_loss(batch)


@pytest.mark.parametrize("probe_batch", ["next", "previous", "same"])
def test_probes_see_the_chosen_batch(probe_batch):
    net, trainer = Recording(), _trainer(1)
    trainer.callbacks = [HiDLRCallback(probe_batch=probe_batch)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader())
    # update_every=2: probe steps 0 and 2, 10 probe forwards each (with "next", run at the
    # steps after them, on their batches; with "same" the own-batch check only warns: the
    # callback chose the batch, and no forward pass is added)
    assert len(net.probed) == 20
    first, second = net.probed[:10], net.probed[10:]
    expected = {"next": (1, 3), "previous": (0, 1), "same": (0, 2)}[probe_batch]
    assert all(torch.equal(x, net.trained[expected[0]]) for x in first)
    assert all(torch.equal(x, net.trained[expected[1]]) for x in second)
    assert _opt(trainer).options["defer_probes"] is (probe_batch == "next")
    callback = trainer.callbacks[0]
    if probe_batch == "previous":
        assert torch.equal(callback._previous[0], net.trained[-1])  # kept for a checkpoint
    seen: list[torch.Tensor] = []
    net.probed = seen
    again = _trainer(1)
    again.callbacks = [callback]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.fit(net, _loader())
    loader = iter(_loader())
    first_batch, second_batch = next(loader)[0], next(loader)[0]
    # a new fit starts without a previous batch
    assert torch.equal(seen[0], second_batch if probe_batch == "next" else first_batch)
    with pytest.raises(ValueError, match="probe_batch must be 'next', 'previous' or 'same'"):
        HiDLRCallback(probe_batch="both")


def test_a_blow_up_rolls_back_at_the_deferred_probe_step_from_the_training_loss():
    class Wrecked(Recording):
        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if self.trainer.global_step == 6:  # after step 5, which resolved probe step 4
                with torch.no_grad():
                    self.head.weight.mul_(1e4)

        def probe_loss(self, batch):
            self.probed_at.append(self.trainer.global_step)
            return super().probe_loss(batch)

    net = Wrecked()
    net.probed_at = []
    trainer = _trainer(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader())
    opt = _opt(trainer)
    rolled = [r.step for r in opt.history if {g.action for g in r.groups} == {"rollback"}]
    # probe step 6 finds its training loss blown up against the earlier ones: rolled back
    # there at no cost, so the step after has no probes to run (10 forward passes at the
    # other steps after a probe step)
    assert rolled == [6]
    assert 7 not in net.probed_at and net.probed_at.count(5) == 10
    assert opt.steps == 2 * BATCHES_PER_EPOCH
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_training_loss_on_another_scale_than_the_probes_is_no_blow_up():
    class Offset(Net):
        def training_step(self, batch, batch_idx):
            # the probes' loss plus a large term without a gradient (as a penalty on frozen
            # weights would be): the same step, a training loss on another scale
            x, y = batch
            return nn.functional.mse_loss(self(x), y) + 1e3

    net, trainer = Offset(), _trainer(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader())
    opt = _opt(trainer)
    assert not any(g.action == "rollback" for r in opt.history for g in r.groups)
    assert min(opt.lrs) > 1e-3


class EveryThird(Net):
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        opt.options["update_every"] = 3  # probe steps 0, 3 (an epoch's last), 6, ...
        return opt


@pytest.mark.parametrize("probe_batch", ["next", "previous"])
def test_resume_between_a_probe_step_and_its_probes_is_bit_identical(tmp_path, probe_batch):
    def fit(epochs, ckpt_path=None):
        net, trainer = EveryThird(), _trainer(epochs)
        trainer.callbacks = [HiDLRCallback(probe_batch=probe_batch)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(net, _loader(), ckpt_path=ckpt_path)
        return net, trainer

    whole, whole_trainer = fit(3)
    _, first = fit(1)
    if probe_batch == "next":
        assert _opt(first).needs_closure()  # step 3's probes wait for step 4's batch
    path = tmp_path / "one.ckpt"
    first.save_checkpoint(path)
    resumed, trainer = fit(3, ckpt_path=path)
    assert _opt(trainer).lrs == _opt(whole_trainer).lrs != [0.02, 0.02]
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    assert repr(_opt(trainer).history) == repr(_opt(whole_trainer).history)


def test_resuming_a_previous_batch_checkpoint_with_the_default_probes_the_next(tmp_path):
    first = _trainer(1)
    first.callbacks = [HiDLRCallback(probe_batch="previous")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.fit(Recording(), _loader())
    path = tmp_path / "previous.ckpt"
    first.save_checkpoint(path)
    net, trainer = Recording(), _trainer(2)  # the default callback: the next batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader(), ckpt_path=path)
    assert _opt(trainer).options["defer_probes"] is True
    # steps 4 and 6 probe (update_every=2), at steps 5 and 7, on their batches
    assert len(net.trained) == 4 and len(net.probed) == 20
    assert all(torch.equal(x, net.trained[1]) for x in net.probed[:10])
    assert all(torch.equal(x, net.trained[3]) for x in net.probed[10:])


# -- found by review ------------------------------------------------------------------------------


def test_probes_run_under_the_precision_plugins_autocast():
    class Records(Net):
        def training_step(self, batch, batch_idx):
            self.train_dtype = self(batch[0]).dtype
            return super().training_step(batch, batch_idx)

        def probe_loss(self, batch):
            self.probe_dtype = self(batch[0]).dtype
            return super().probe_loss(batch)

    net = Records()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(1, precision="bf16-mixed").fit(net, _loader())
    assert net.train_dtype == net.probe_dtype == torch.bfloat16


def test_gradient_accumulation_scheduled_later_is_refused():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    trainer = _trainer(1)
    trainer.callbacks.append(GradientAccumulationScheduler({0: 2}))
    with pytest.raises(ValueError, match="accumulate_grad_batches > 1"):
        trainer.fit(Net(), _loader())


def test_manual_optimisation_runs_the_hooks_once_per_step():
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.hook_calls = 0

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self(batch[0]), batch[1]))
            opt.step()

        def on_before_optimizer_step(self, optimizer) -> None:
            self.hook_calls += 1

    net, trainer = Manual(), _trainer(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, _loader())
    opt = _opt(trainer)
    assert opt.steps == net.hook_calls == 2 * BATCHES_PER_EPOCH
    assert len(opt.history) == opt.steps // 2 and opt.lrs != [0.02, 0.02]


def test_a_checkpoint_does_not_warn_about_the_callbacks_own_option():
    """HiDLRCallback sets defer_probes on its optimizers; a fresh LightningHiDLR has not, so
    loading a checkpoint must not report it as an option the checkpoint replaced."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    saved = LightningHiDLR(torch.optim.SGD([w], lr=0.1))
    saved.options["defer_probes"] = True  # as the callback leaves it
    fresh = LightningHiDLR(torch.optim.SGD([nn.Parameter(torch.randn(3))], lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(saved.state_dict())
    assert fresh.options["defer_probes"] is False  # the callback sets it at the start of fit
    other = LightningHiDLR(torch.optim.SGD([nn.Parameter(torch.randn(3))], lr=0.1), update_every=7)
    with pytest.warns(UserWarning, match=r"update_every=4 \(was 7\)"):
        other.load_state_dict(saved.state_dict())  # a real difference is still named


def test_probe_loss_must_be_callable():
    with pytest.raises(TypeError, match=r"probe_loss must be None or a callable .* got 'mse'"):
        HiDLRCallback(probe_loss="mse")
