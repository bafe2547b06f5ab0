"""Hi-DLR in the Hugging Face stack: Trainer, accelerate, peft LoRA, TensorBoard.

Every model is a tiny randomly initialised BERT built from a config (nothing is downloaded);
the data are synthetic token sequences whose class decides which half of the vocabulary the
tokens come from. Each training test trains for real steps and checks that the loss fell
below a stated threshold and that every group's rate moved from its initial value.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

transformers = pytest.importorskip(
    "transformers", reason="optional package 'transformers' is not installed"
)
pytest.importorskip("accelerate", reason="optional package 'accelerate' is not installed")

import hidlr  # noqa: E402
from hidlr.integrations import find_hidlr, group_names  # noqa: E402
from hidlr.integrations.transformers import (  # noqa: E402
    ClosureHiDLR,
    HiDLRTrainer,
    default_groups,
    hidlr_log_values,
)

pytestmark = pytest.mark.integration

LR = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LORA_LR = 3e-3


class Tokens(torch.utils.data.Dataset):
    """Class 0: tokens 5..49, class 1: tokens 50..94 (position 0 is [CLS]=2)."""

    def __init__(self, n: int = 256, length: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=gen)
        self.x = torch.randint(5, 50, (n, length), generator=gen) + 45 * self.y[:, None]
        self.x[:, 0] = 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": self.y[i]}


def bert(lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = transformers.BertForSequenceClassification(config)
    if lora:
        peft = pytest.importorskip("peft", reason="optional package 'peft' is not installed")
        lora_config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        model = peft.get_peft_model(model, lora_config)
    return model


def trainer(
    tmp_path, *, lora=False, model=None, steps=40, hidlr_kwargs=None, probe_batch=None, **args
):
    options = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        max_steps=steps,
        learning_rate=LORA_LR if lora else LR,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
    )
    options.update(args)
    return HiDLRTrainer(
        model=bert(lora) if model is None else model,
        args=transformers.TrainingArguments(**options),
        train_dataset=Tokens(),
        hidlr_kwargs={"update_every": 4, **(hidlr_kwargs or {})},
        **({} if probe_batch is None else {"probe_batch": probe_batch}),
    )


def train_losses(t) -> list[float]:
    """The Trainer's logged training losses, per micro-batch (the Trainer sums the mean losses
    of the accumulated micro-batches when the model does not normalise by the token count)."""
    ga = t.args.gradient_accumulation_steps
    return [log["loss"] / ga for log in t.state.log_history if "loss" in log]


def assert_rates_moved(opt, initial) -> None:
    for name, lr, start in zip(group_names(opt), opt.lrs, initial, strict=True):
        assert not math.isclose(lr, start, rel_tol=1e-3), f"rate of {name} stayed at {start}"


# -- Trainer ----------------------------------------------------------------------------------


# The tests that train to a loss threshold probe the previous step's batch: this toy task starts
# on a plateau where probes on an independent (the next) batch see no descent: from 1e-3 they
# were still on it after 40 steps, and when they leave it depends on float rounding (README).
def test_trainer_full_model_trains_and_logs(tmp_path):
    t = trainer(tmp_path, probe_batch="previous")
    t.train()
    opt = t.hidlr_optimizer
    assert isinstance(t.optimizer, torch.optim.Optimizer) and find_hidlr(t.optimizer) is opt
    assert group_names(opt) == ["head", "norm", "bias", "rest"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.0, 0.01]
    losses = train_losses(t)
    assert losses[0] > 0.5  # chance level is log 2 = 0.69
    assert losses[-1] < 0.1, losses  # reached: 0.052
    assert_rates_moved(opt, [LR] * 4)
    assert opt.steps == 40 and len(opt.history) == 10  # one probe step in update_every=4
    accepted = sum(g.accepted for r in opt.history for g in r.groups)
    assert accepted >= 10  # of 40 group fits; R^2 of the tiny bias / norm groups is often poor
    # every training log carries the rates and the latest fit of each group
    for log in (log for log in t.state.log_history if "loss" in log):
        for name in ("head", "norm", "bias", "rest"):
            assert log[f"hidlr/lr/{name}"] > 0
            assert 0.0 <= log[f"hidlr/accepted/{name}"] <= 1.0
    last = next(log for log in reversed(t.state.log_history) if "loss" in log)
    assert last["hidlr/lr/head"] == opt.lrs[0]


def test_trainer_lora_groups_a_b_head(tmp_path):
    finals = []
    for seed in range(3):  # one seed's last logged loss is too noisy to judge alone
        t = trainer(tmp_path / str(seed), lora=True, steps=60, seed=seed, data_seed=seed)
        t.train()
        opt = t.hidlr_optimizer
        assert group_names(opt) == ["lora_A", "lora_B", "head"]
        losses = train_losses(t)
        assert losses[0] > 0.6
        finals.append(losses[-1])
        assert_rates_moved(opt, [LORA_LR] * 3)
        # only the adapter and the head train
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        frozen = [n for n, p in t.model.named_parameters() if id(p) not in trained]
        assert frozen and all(
            not p.requires_grad for n, p in t.model.named_parameters() if id(p) not in trained
        )
    assert sum(finals) / 3 < 0.35, finals  # half of chance level; reached: 0.27


def test_trainer_mixed_precision_bf16(tmp_path):
    t = trainer(tmp_path, bf16=True, probe_batch="previous")
    t.train()
    assert t.accelerator.mixed_precision == "bf16"
    losses = train_losses(t)
    assert losses[-1] < 0.2, losses  # chance level is 0.69; reached: 0.099
    assert_rates_moved(t.hidlr_optimizer, [LR] * 4)


@pytest.mark.parametrize("which", ["all", "last"])
def test_trainer_probes_the_steps_micro_batches(tmp_path, which):
    t = trainer(tmp_path, steps=1, gradient_accumulation_steps=3)
    t.probe_micro_batches = which
    calls = []
    t.model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    t.train()
    record = t.hidlr_optimizer.history[-1]
    per_probe = 3 if which == "all" else 1
    assert calls.count(True) == 3  # the three training micro-batches
    assert calls.count(False) == record.n_probes * per_probe
    assert t.hidlr_optimizer.default_closure is not None


@pytest.mark.parametrize("probe_batch", ["next", "previous", "same"])
def test_trainer_probes_the_next_steps_batch_by_default(tmp_path, probe_batch):
    # 48 examples in batches of 16: epochs of 3 steps; a probe at every step
    t = trainer(tmp_path, steps=5, gradient_accumulation_steps=1, hidlr_kwargs={"update_every": 1})
    assert t.probe_batch == "next"
    t.probe_batch = probe_batch
    t.train_dataset = Tokens(n=48)
    trained: list[torch.Tensor] = []
    probed: dict[int, list[torch.Tensor]] = {}

    def hook(module, args, kwargs, out):
        ids = kwargs["input_ids"].clone()
        if torch.is_grad_enabled():
            trained.append(ids)
        else:  # during step k's probes the optimizer has counted k + 1 steps
            probed.setdefault(t.hidlr_optimizer.steps - 1, []).append(ids)

    t.model.register_forward_hook(hook, with_kwargs=True)
    t.train()
    assert len(trained) == 5 and sorted(probed) == [0, 1, 2, 3, 4]
    assert not any(torch.equal(trained[i], trained[i + 1]) for i in range(4))
    expected = {
        # the last step of an epoch (2) has no next one: it probes the previous step's
        "next": {0: 1, 1: 2, 2: 1, 3: 4},
        "previous": {0: 0, 1: 0, 2: 1, 3: 2},  # step 0 has no previous one: its own
        "same": {0: 0, 1: 1, 2: 2, 3: 3},
    }[probe_batch]
    for step, i in expected.items():
        assert all(torch.equal(x, trained[i]) for x in probed[step]), (step, i)
    with pytest.raises(ValueError, match="probe_batch must be 'next', 'previous' or 'same'"):
        HiDLRTrainer(model=bert(), probe_batch="own")


def test_trainer_refuses_more_than_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"HiDLRTrainer runs in one process \(world_size is 2\)"):
        trainer(tmp_path)


def test_trainer_refuses_deferred_probes():
    from hidlr.integrations.transformers import HiDLRTrainer

    with pytest.raises(ValueError, match="defer_probes=True is not for HiDLRTrainer"):
        HiDLRTrainer(hidlr_kwargs={"defer_probes": True})


def test_trainer_probes_a_fraction_of_the_batch(tmp_path):
    t = trainer(tmp_path, steps=1, gradient_accumulation_steps=1)
    t.probe_fraction = 0.5
    sizes = []
    t.model.register_forward_hook(
        lambda m, i, o: sizes.append((torch.is_grad_enabled(), o.logits.shape[0]))
    )
    t.train()
    full = t.args.per_device_train_batch_size
    assert sizes[0] == (True, full)
    probes = [n for grad, n in sizes if not grad]
    assert probes and probes == [math.ceil(full / 2)] * t.hidlr_optimizer.history[-1].n_probes
    with pytest.raises(ValueError, match=r"probe_fraction must be a finite float > 0.0 and <= 1.0"):
        HiDLRTrainer(model=bert(), probe_fraction=0.0)


@pytest.mark.parametrize(
    ("lora", "at", "probe_batch", "n"),
    [
        (False, 6, "next", 256),
        (True, 6, "next", 256),
        (False, 4, "next", 256),
        (False, 4, "previous", 256),
        (False, 4, "next", 160),
    ],
    ids=["full", "lora", "before-probe", "before-probe-previous", "before-probe-epoch-end"],
)
def test_trainer_resume_is_bit_identical(tmp_path, lora, at, probe_batch, n):
    # a checkpoint in the middle of a probe cycle (update_every=4, saved at step 6), or just
    # before a probe step: with probe_batch="previous" that one probes the micro-batches of
    # the step before the checkpoint, which optimizer.pt keeps; so does "next" when that step
    # is the last of an epoch (160 examples: 5 steps of 2 x 16) and has no next one
    straight = trainer(
        tmp_path / "a",
        lora=lora,
        steps=12,
        save_strategy="steps",
        save_steps=at,
        probe_batch=probe_batch,
    )
    straight.train_dataset = Tokens(n=n)
    straight.train()
    checkpoint = tmp_path / "a" / f"checkpoint-{at}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["hidlr"]["steps"] == at
    assert set(saved) == {"base", "hidlr", "probe_batches"}
    assert len(saved["probe_batches"]) == 2  # gradient_accumulation_steps micro-batches

    resumed = trainer(
        tmp_path / "b", lora=lora, steps=12, save_strategy="no", probe_batch=probe_batch
    )
    resumed.train_dataset = Tokens(n=n)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a, opt_b = straight.hidlr_optimizer, resumed.hidlr_optimizer
    assert opt_a.lrs == opt_b.lrs and opt_a.steps == opt_b.steps == 12
    assert repr(opt_a.history) == repr(opt_b.history)  # repr: NaN fields compare equal
    initial = [LORA_LR if lora else LR] * len(opt_a.lrs)
    assert_rates_moved(opt_a, initial)


def test_trainer_wraps_a_given_base_optimizer_and_rejects_a_plain_hidlr(tmp_path):
    model = bert()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t = trainer(tmp_path, model=model, steps=8)
    t.optimizer = base
    t.train()
    assert t.hidlr_optimizer.optimizer is base and t.hidlr_optimizer.steps == 8
    assert group_names(t.hidlr_optimizer) == ["group0"]

    t2 = trainer(tmp_path, steps=2)
    t2.optimizer = hidlr.HiDLR(torch.optim.SGD(t2.model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="closure"):
        t2.train()
    with pytest.raises(ValueError, match="probe_micro_batches"):
        HiDLRTrainer(model=bert(), probe_micro_batches="first")


def test_closure_hidlr_under_a_grad_scaler_skips_overflowing_steps():
    """The fp16 path (accelerate calls ``scaler.step(optimizer, closure)``): the default
    closure serves the probes, and a step with inf gradients is skipped by the scaler, Hi-DLR's
    included."""
    model = bert()
    opt = ClosureHiDLR(torch.optim.AdamW(default_groups(model), lr=LR), update_every=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = Tokens()
    losses = []
    for step in range(60):  # the rates need about 30 steps to climb from LR
        batch = data[[(16 * step + i) % len(data) for i in range(16)]]
        opt.default_closure = lambda batch=batch: model(**batch).loss
        loss = model(**batch).loss
        scaler.scale(loss).backward()
        if step == 10:  # an overflow: the scaler skips this step and halves its scale
            model.classifier.weight.grad[0, 0] = math.inf
        before = opt.steps
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert opt.steps == before + (step != 10)
        losses.append(loss.item())
    assert scaler.get_scale() < 2.0**10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.steps == 59 and len(opt.history) == 15
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.6 and last < 0.01, (first, last)  # reached: 1e-4
    assert_rates_moved(opt, [LR] * 4)


def test_default_groups_and_log_values():
    assert [g["name"] for g in default_groups(bert())] == ["head", "norm", "bias", "rest"]
    opt = ClosureHiDLR(torch.optim.SGD(default_groups(bert()), lr=0.1))
    assert hidlr_log_values(opt) == {f"hidlr/lr/{n}": 0.1 for n in group_names(opt)}
    with pytest.raises(TypeError):
        find_hidlr(torch.optim.SGD(bert().parameters(), lr=0.1))


def test_default_groups_of_an_embedding_lora():
    peft = pytest.importorskip("peft", reason="optional package 'peft' is not installed")
    config = peft.LoraConfig(r=2, target_modules=["word_embeddings"], task_type="SEQ_CLS")
    model = peft.get_peft_model(bert(), config)
    groups = default_groups(model)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B", "head"]
    assert [n for n, p in model.named_parameters() if p is groups[0]["params"][0]] == [
        "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A.default"
    ]


def test_trainer_takes_a_group_given_as_one_tensor(tmp_path):
    model = bert()
    head = model.classifier.weight
    rest = [p for p in model.parameters() if p is not head]
    trainer = HiDLRTrainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            max_steps=2,
            per_device_train_batch_size=8,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=Tokens(),
        hidlr_groups=lambda m: [{"params": head, "name": "head"}, {"params": rest}],
    )
    trainer.train()
    groups = trainer.hidlr_optimizer.param_groups
    assert groups[0]["params"] == [head] and len(groups[1]["params"]) == len(rest)


# -- accelerate ------------------------------------------------------------------------------


def test_accelerate_loop_with_gradient_accumulation():
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    model = bert()
    base = torch.optim.AdamW(hidlr.by_role(model, "head"), lr=LR)
    opt = hidlr.HiDLR(base, update_every=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=16, shuffle=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt_p, loader, sched = accelerator.prepare(model, opt, loader, sched)
    assert find_hidlr(opt_p) is opt

    # the probe closure averages over the micro-batches of the step, as HiDLRTrainer does
    losses, micro, step_batches = [], 0, []
    model.train()
    for _epoch in range(4):
        for batch in loader:
            step_batches = [*step_batches[-1:], batch]  # GA=2: this and the previous one
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)

                def closure(batches=step_batches):
                    return sum(model(**b).loss for b in batches) / len(batches)

                opt_p.step(closure)  # skipped by accelerate on accumulation-only micro-batches
                sched.step()
                opt_p.zero_grad()
            losses.append(loss.item())
            micro += 1
    assert opt.steps == micro // 2 == 32
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert first > 0.6 and last < 0.05, (first, last)
    assert_rates_moved(opt, [LR, LR])
    assert len(opt.history) == 8


# -- TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_logs_rates_fit_and_acceptance(tmp_path):
    tensorboard = pytest.importorskip(
        "tensorboard", reason="optional package 'tensorboard' is not installed"
    )
    del tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from hidlr.integrations.tensorboard import record_scalars, trainer_callback

    writer = SummaryWriter(str(tmp_path / "tb"))
    t = trainer(tmp_path / "out", steps=40, probe_batch="previous")
    t.add_callback(trainer_callback(writer))
    t.train()
    writer.close()
    opt = t.hidlr_optimizer
    assert train_losses(t)[-1] < 0.1  # reached: 0.052
    assert_rates_moved(opt, [LR] * 4)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("head", "norm", "bias", "rest"):
        for what in ("lr", "r2", "accepted"):
            assert f"hidlr/{name}/{what}" in tags
    lr_head = events.Scalars("hidlr/head/lr")
    assert [e.step for e in lr_head] == [r.step + 1 for r in opt.history] == list(range(1, 41, 4))
    assert lr_head[-1].value == pytest.approx(opt.lrs[0], rel=1e-6)
    accepted = [e.value for e in events.Scalars("hidlr/rest/accepted")]
    assert set(accepted) <= {0.0, 1.0}
    r2 = events.Scalars("hidlr/head/r2")[-1].value
    assert r2 == pytest.approx(opt.history[-1].groups[0].r2, rel=1e-6)
    assert record_scalars(opt.history[-1], group_names(opt))["hidlr/head/lr"] == opt.lrs[0]


def test_a_second_train_keeps_one_hidlr(tmp_path):
    t = trainer(tmp_path, steps=4)
    t.train()
    first = find_hidlr(t.optimizer)
    t.train()
    opt = find_hidlr(t.optimizer)
    assert opt is first and isinstance(opt.optimizer, torch.optim.AdamW)
    assert opt.steps == 8
    opt.step_batches, opt.previous_batches = [], ["stale"]
    t.args.max_steps = 1
    t.train()  # a new run starts without the last run's batches
    assert "stale" not in opt.previous_batches


# -- found by review (session 7) ---------------------------------------------------------------


def test_default_groups_leave_out_roles_the_model_lacks():
    from hidlr.integrations.transformers import default_groups

    no_bias = torch.nn.Sequential(
        torch.nn.Linear(4, 8, bias=False), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2, bias=False)
    )
    groups = default_groups(no_bias)  # a Llama-like model: norms, no biases
    assert [g["name"] for g in groups] == ["head", "norm", "rest"]
    bare = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU())
    (only,) = default_groups(bare)  # its one weight is the head, and nothing is left as rest
    assert only["name"] == "head" and len(only["params"]) == 1


def test_probes_measure_the_token_normalised_loss_the_step_trained_on(tmp_path):
    """A causal LM normalises its loss by the label tokens of all micro-batches together
    (num_items_in_batch): the probes at the step's own weights and batches must see the same
    objective the gradient came from, not the mean of per-micro-batch means."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)

    class LM(torch.utils.data.Dataset):  # odd examples: only their last 2 labels count
        def __len__(self):
            return 2

        def __getitem__(self, i):
            x = torch.randint(5, 100, (12,), generator=torch.Generator().manual_seed(i))
            y = x.clone()
            if i % 2:
                y[:-2] = -100
            return {"input_ids": x, "labels": y}

    seen: dict[str, list[float]] = {"train": [], "probe": []}

    class Recording(HiDLRTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            seen["train"].append(loss.item())
            return loss

    class BeforeTheStep(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            with torch.no_grad():
                seen["probe"].append(t._probe_loss().item())

    t = Recording(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            max_steps=1,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            save_strategy="no",
        ),
        train_dataset=LM(),
        hidlr_groups=lambda m: hidlr.by_role(m, ("head", "norm")),
        probe_batch="same",
        callbacks=[BeforeTheStep()],
    )
    t.train()
    assert t.model_accepts_loss_kwargs
    assert seen["probe"][0] == pytest.approx(sum(seen["train"]), rel=1e-5)


def test_a_given_closure_hidlr_is_checked_not_silently_reconfigured(tmp_path):
    from hidlr.integrations.transformers import ClosureHiDLR

    t = trainer(tmp_path, steps=2)
    t.optimizer = ClosureHiDLR(torch.optim.SGD(t.model.parameters(), lr=0.1), defer_probes=True)
    with pytest.raises(ValueError, match="passed to HiDLRTrainer has defer_probes=True"):
        t.create_optimizer()
    t.optimizer = ClosureHiDLR(torch.optim.SGD(t.model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match=r"hidlr_kwargs \['update_every'\] are not applied"):
        t.create_optimizer()
    built = trainer(tmp_path, steps=2)
    built.create_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built.create_optimizer()  # its own: no warning the second time


def test_groups_that_leave_out_trainable_parameters_are_reported(tmp_path):
    model = bert()
    t = trainer(tmp_path, model=model, steps=1)
    t.hidlr_groups = lambda m: [{"params": list(m.classifier.parameters())}]
    with pytest.warns(UserWarning, match=r"leaves out \d+ trainable parameter\(s\) \(e.g. 'bert"):
        t._base_param_groups(model)
