"""HiDLR in a Lightning ``Trainer`` with automatic optimisation, checkpoints included.

Lightning calls ``optimizer.step(closure)`` with a closure that runs ``training_step`` and
``backward``; HiDLR's probes need another closure, the loss *without* backward. So:

- :class:`LightningHiDLR` (a :class:`~hidlr.HiDLR`) runs Lightning's closure first (forward and
  backward, with gradients enabled), then its own step, probing with the module's
  ``probe_loss(batch)``;
- :class:`HiDLRCallback` hands it the batch to probe: by default the next training batch
  (``probe_batch="next"``), or the previous one (``"previous"``), or the gradient's own
  (``"same"``).

Use::

    class Net(L.LightningModule):
        def training_step(self, batch, i): return loss_fn(self(batch[0]), batch[1])
        def probe_loss(self, batch): return loss_fn(self(batch[0]), batch[1])  # no backward
        def configure_optimizers(self):
            return LightningHiDLR(torch.optim.AdamW(groups, lr=1e-3), update_every=4)

    L.Trainer(callbacks=[HiDLRCallback()]).fit(Net(), loader)

Checkpoints: Lightning saves ``optimizer.state_dict()`` (the base optimizer's state, the adapted
rates and HiDLR's step count) and restores it on ``fit(ckpt_path=...)``; a run resumed at an
epoch boundary continues bit for bit like an uninterrupted one.

Which batch the probes see: rates fitted on the gradient's own batch are systematically too
long (that batch is the one the step was made for), so by default the probes see the next
training batch. Lightning loads it only after the step, so the callback runs the optimizer with
``defer_probes=True``: a probe step's probes run at the following step, with that step's batch
(see :class:`~hidlr.HiDLR`); the new rates apply from that step on. ``"previous"`` probes the
previous step's batch at once (the first step, which has none, probes its own), and keeps it in
the callback's checkpoint state. On the robustness benchmark (``hidlr bench robustness
--probe-batch``) deferred probes keep 7 of 12 tasks within 5% of the grid-best rate with no
diverged run, the previous batch 5 (three diverged runs of 216) and the gradient's own 4 (one);
probing the next batch at once, where a loop can hand it over, keeps 9 (see the README).

Manual optimisation works the same way: ``LightningHiDLR`` with the callback, and
``self.optimizers().step()`` without a closure after ``manual_backward``. (A plain HiDLR
stepped with a closure through Lightning's optimizer wrapper would run the precision plugin's
hooks, ``on_before_optimizer_step`` among them, once per probe and never on other steps.)
Probes run under the precision plugin's context, as the training step does (autocast for
``"bf16-mixed"``).

Not supported: gradient accumulation (the probe step would see a partial gradient; refused,
also when a ``GradientAccumulationScheduler`` turns it on) and several processes (each would
fit its own rates on its own batch, and the replicas would drift apart; use
:class:`hidlr.integrations.distributed.DistributedHiDLR` in a plain loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hidlr.optimizer import HiDLR

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import move_data_to_device
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
        from pytorch_lightning.utilities import (  # type: ignore[no-redef]
            move_data_to_device,
        )
    except ImportError as exc:
        raise ImportError(
            "hidlr.integrations.lightning needs Lightning: pip install lightning"
        ) from exc

__all__ = ["HiDLRCallback", "LightningHiDLR"]


class LightningHiDLR(HiDLR):
    """:class:`~hidlr.HiDLR` for Lightning's automatic optimisation.

    ``step(closure)`` calls Lightning's ``closure`` (training step and backward), then steps
    HiDLR; on probe steps the probes call :attr:`probe_closure`, which
    :class:`HiDLRCallback` sets to ``lambda: module.probe_loss(batch)`` for each batch.
    Returns the training loss, as Lightning expects. Same arguments as :class:`~hidlr.HiDLR`.
    The callback chooses the probes' batch (and ``defer_probes``): a closure on the gradient's
    own batch is warned about (``on_own_batch``), never switched to deferred probes.
    """

    probe_closure: Callable[[], Any] | None = None
    _defers_on_own_batch = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        probe = self.probe_closure if self.needs_closure() else None
        if self.needs_closure() and probe is None:
            raise RuntimeError(
                f"LightningHiDLR has no probe closure at probe step {self.steps}: add "
                "hidlr.integrations.lightning.HiDLRCallback() to the Trainer's callbacks and "
                "define probe_loss(batch) on the LightningModule"
            )
        # the training loss is at the current weights: a non-finite one is a blow-up that the
        # deferred probes' rollback takes at no cost (its scale is the training step's, which
        # need not be probe_loss's, so only the probe closure's losses are judged by size)
        here = loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
        self._hidlr_step(probe, here)  # (not super().step: the optimizer hooks would run twice)
        return loss

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("probe_closure", None)  # holds the module and a batch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        # defer_probes is HiDLRCallback's to set (at the start of training), not an option a
        # checkpoint brings: keep this optimizer's, so a resume does not warn about it
        saved = state_dict.get("hidlr") if isinstance(state_dict, dict) else None
        if isinstance(saved, dict) and isinstance(saved.get("options"), dict):
            options = {**saved["options"], "defer_probes": self.options["defer_probes"]}
            state_dict = {**state_dict, "hidlr": {**saved, "options": options}}
        super().load_state_dict(state_dict)


class HiDLRCallback(Callback):
    """Gives every :class:`LightningHiDLR` of the trainer the probe closure of each step:
    ``pl_module.probe_loss(batch)`` (or ``probe_loss`` passed here, called as
    ``probe_loss(pl_module, batch)``).

    Args:
        probe_loss: the loss without backward, if the module has no ``probe_loss`` method.
        probe_batch: ``"next"`` (default): the probes see the next training batch (the
            optimizers run with ``defer_probes=True``, which this sets); ``"previous"``: the
            previous training batch (the first step's own batch when there is none); ``"same"``:
            the gradient's own batch.
    """

    def __init__(
        self,
        probe_loss: Callable[[Any, Any], Any] | None = None,
        probe_batch: str = "next",
    ) -> None:
        if probe_batch not in ("next", "previous", "same"):
            raise ValueError(
                f"probe_batch must be 'next', 'previous' or 'same', got {probe_batch!r}"
            )
        if probe_loss is not None and not callable(probe_loss):
            raise TypeError(
                "probe_loss must be None or a callable probe_loss(module, batch) returning the "
                f"loss, got {probe_loss!r}"
            )
        self.probe_loss = probe_loss
        self.probe_batch = probe_batch
        self._previous: Any = None

    def _optimizers(self, trainer: Any) -> list[LightningHiDLR]:
        found = []
        for opt in trainer.optimizers:
            inner = getattr(opt, "_optimizer", opt)  # a LightningOptimizer wraps it
            if isinstance(inner, LightningHiDLR):
                found.append(inner)
        return found

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._optimizers(trainer):
            raise TypeError(
                "HiDLRCallback: configure_optimizers returned no LightningHiDLR optimizer"
            )
        if self.probe_loss is None and not callable(getattr(pl_module, "probe_loss", None)):
            raise TypeError(
                f"HiDLRCallback: {type(pl_module).__name__} has no probe_loss(batch) method "
                "(the loss at the current weights, without backward); define it or pass "
                "HiDLRCallback(probe_loss=lambda module, batch: ...)"
            )
        if getattr(trainer, "accumulate_grad_batches", 1) != 1:
            raise ValueError("HiDLRCallback does not support accumulate_grad_batches > 1")
        if getattr(trainer, "world_size", 1) > 1:
            raise ValueError(
                f"HiDLRCallback runs in one process (world_size is {trainer.world_size}); for "
                "several, use hidlr.integrations.distributed.DistributedHiDLR with manual "
                "optimisation"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # after a checkpoint's optimizer state (and its options) was restored
        for opt in self._optimizers(trainer):
            opt.options["defer_probes"] = self.probe_batch == "next"

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        # checked again here: a GradientAccumulationScheduler sets it at each epoch's start
        if getattr(trainer, "accumulate_grad_batches", 1) != 1:
            raise ValueError("HiDLRCallback does not support accumulate_grad_batches > 1")
        fn = self.probe_loss
        seen = batch
        if self.probe_batch == "previous" and self._previous is not None:
            # a batch restored from a checkpoint was loaded onto the CPU
            seen = move_data_to_device(self._previous, pl_module.device)

        precision = trainer.precision_plugin

        def probe() -> Any:
            # under the training step's precision context (autocast for "bf16-mixed"): the
            # probes must evaluate the function that is trained
            with precision.train_step_context():
                return fn(pl_module, seen) if fn is not None else pl_module.probe_loss(seen)

        for opt in self._optimizers(trainer):
            opt.probe_closure = probe

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for opt in self._optimizers(trainer):
            opt.probe_closure = None
        if self.probe_batch == "previous":
            self._previous = batch

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # each fit starts afresh (before Lightning restores a checkpoint's state, if any)
        if stage == "fit":
            self._previous = None

    def state_dict(self) -> dict[str, Any]:
        return {"previous_batch": self._previous} if self.probe_batch == "previous" else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = state_dict.get("previous_batch")
