"""``HiDLR``: Hessian-informed differential learning rates around any torch optimizer."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.optim import Optimizer

from hidlr._checkpoint import (
    HOOKS,
    BaseLoaded,
    Pending,
    checkpoint_options,
    pending_from_state,
    pending_to_state,
    restore_requires_grad,
)
from hidlr._own_batch import (
    OWN_BATCH_CHECKS,
    own_batch_found,
    own_batch_slopes,
    own_batch_verdict,
    own_slopes,
    reproduces_own_slope,
    warn_own_batch,
)
from hidlr._probing import (
    GroupMover,
    _dtensor_class,
    _exchange,
    probe_context,
    snapped,
    snapshot,
    swap_plan,
)
from hidlr._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_multipliers,
    check_no_shared_memory,
    check_per_group_rates,
)
from hidlr.fit import QuadraticFit, fit_quadratic, propose_rates
from hidlr.history import GroupProbe, ProbeRecord
from hidlr.influence import choose_frozen, predicted_decrease, update_influence
from hidlr.rates import (
    NOISE_GATE,
    SPIKE_CUT,
    SPIKE_WINDOW,
    applied_rates,
    blown_up,
    coupling_ratio,
    diagonal_rates,
    gradient_blew_up,
    log_average,
    on_plateau,
    overshoot,
    rising,
    spike,
    spike_cuts,
    step_scale,
    track_descent,
)

__all__ = ["HiDLR"]

logger = logging.getLogger(__name__)

Closure = Callable[[], Any]


class HiDLR(Optimizer):
    r"""Hi-DLR (Xu, Bu, Zhang, Barnett): one learning rate per param group, found by probing.

    Wraps any torch optimizer. Every ``update_every`` steps (starting with the first) the
    base optimizer takes its step as usual and its parameter change :math:`\Delta_k` gives
    each group's direction. The loss is then probed, one group at a time, at
    :math:`w_0 + c\,\Delta_k \eta_k / \eta_k^{\text{used}}` for each ``c`` in
    ``probe_multipliers`` (4K forward passes for the default four; the robust policy adds
    one at :math:`w_0` and, with two or more groups, one at the combined step; with one group
    only where its step just taken multiplied the loss), a quadratic
    :math:`L_0 - b_k \xi + \tfrac12 A_k \xi^2` is fitted per group by least squares (eq. 3.1,
    with one intercept shared by all groups), and each group's rate moves toward
    :math:`b_k / A_k` (eq. 3.2): ``new = smoothing * old + (1 - smoothing) * b/A``, only when
    :math:`A_k > 0`, :math:`b_k > 0`, :math:`R^2_k >` ``min_r2`` and every probe is finite.
    The step of that same iteration is then taken with the new rates (Algorithm 1, line 16).
    With one group this is GeN (Hi-ULR).

    The base optimizer's state advances exactly once per step: the direction *is* its step,
    rescaled, which assumes (as for SGD, Adam(W), Adagrad, RMSprop...) that a step's
    parameter change is proportional to the group's ``lr``. Parameters whose ``.grad`` is
    ``None`` are assumed untouched by the base step, as in every torch optimizer.

    Args:
        optimizer: the base optimizer; each of its param groups is one Hi-DLR group. Its
            ``lr`` values are the initial rates: a reasonable order of magnitude suffices.
        update_every: probe every this many steps (Phi in the paper). Probe steps cost
            one extra forward pass per non-zero probe multiplier and group (4K by default);
            4-10 is typical.
        smoothing: weight of the old rate in the update. Larger is steadier; 0 jumps straight
            to the fitted rate (Newton-like, for deterministic problems).
        probe_multipliers: where to probe, in units of the current rate. Must straddle 0 for
            a good fit; the default ``(-2, -1, 1, 2)`` is the paper's. Each non-zero value
            costs one forward pass per group; a ``0`` costs one forward pass per probe step
            (the unperturbed point, shared by all groups; under the robust policy it is the
            measured loss at ``w0``, which that policy takes anyway). Cheaper choices:
            ``(-1, 1, 2)`` (3K passes) or ``(-2, 0, 2)`` (2K + 1 passes). With as many probes as unknowns
            (``(-2, 0, 2)``, or three points and one group) the fit is exact, so the
            ``min_r2`` guard can no longer reject a noisy fit.
        min_r2: accept a fit only when its :math:`R^2` on the group's probes exceeds this.
            With ``policy="paper"``, a value above 1 disables all updates (the rates stay at
            their initial values); the robust policy's safeguards still move them.
        coupled: fit the full matrix :math:`A` of eq. 2.4 (cross terms between groups, from
            ``K(K-1)`` additional probes moving two groups at once) and solve
            :math:`A \eta = b`; all groups of the fit are updated together or not at all.
        max_rate_change: if set, a single update changes a rate at most by this factor.
        policy: ``"robust"`` (default) or ``"paper"``. ``"paper"`` is Algorithm 1 as written:
            the smoothed update above, only when every group's fit is accepted (line 14;
            otherwise no rate changes). ``"robust"`` moves the rate
            toward every proposal alike, shorter or longer, by a log-space average (weight
            ``1 - smoothing``, at most x2 either way per update; see
            :func:`hidlr.rates.robust_rate`): taking shorter proposals at once annealed the
            rates far below the best constant rate. During the first four accepted fits (and
            again after a rate had to grow without a fit) it cuts an overshooting rate at once
            and climbs by up to x1.5 per update. It grows a rate whose probes cannot resolve
            curvature (not while the loss rises), counts probes that ascend as a proposal of
            half the rate, halves it when they blow up, and for a group whose probes descend
            on fewer than 70% of its probe steps (noise-dominated) takes no proposal further from
            its own rate than the largest probe multiplier, and no growth without a fit once
            the loss is 5% below its first probe step's (before that, a rate too small to
            leave the starting plateau is the likely reason for linear probes). It measures the loss at ``w0`` (one
            more forward pass) and cuts the rates when that loss spikes (4x its recent floor,
            or 4x the last probe step's): 10x for the groups whose fit says their step is over
            twice too long, and for the others 10x where the loss is back at the first probe
            step's or above, by half where it undoes more than a tenth of the progress since
            then (one hard batch near a zero loss can), not at all where less. It doubles a
            rate too small for the step to change the weights at all (up to the group's
            largest rate so far), and with two or more groups measures the combined step with
            one more forward pass (the coupling the diagonal model misses; a combined step
            that multiplies the loss by 4 or more cuts the rates 10x, or to its line
            minimum); a single group's new step is measured so only where the step just taken
            multiplied the loss 4x. A rate cut 10x is a ceiling the group never exceeds again;
            see ``rollback`` for a loss that has blown up. Use
            ``"paper"`` to reproduce the paper; ``"robust"`` never diverged on the robustness
            benchmark (see the README). For short runs, start within about 10x of the right
            rate: the climb from far below takes tens of probe steps.
        freeze_threshold: freeze groups whose share of the total influence (smoothed
            ``b^2 / 2A``, :attr:`influence_share`) is below this, after ``freeze_warmup``
            probe steps. ``None`` (default) never freezes.
        freeze_budget: keep only this many of the most influential groups (frozen the rest).
        freeze_warmup: probe steps every group must have had before any freezing.
        history_size: how many probe steps of diagnostics to keep (:attr:`history`).
        defer_probes: probe a probe step's direction at the *following* step, with that step's
            closure, on the batch it trains on: the probes see the next batch without the
            training loop handing it over (a plain ``step(closure)`` on the current batch).
            The probe step itself then needs no closure, the step after it does
            (:meth:`needs_closure`); one passed at the probe step too lets the
            ``rollback`` check the loss there (one forward pass), as at the step after. The
            new rates apply from that step on instead of to the probe step's own update, and
            the one extra copy of the trainable parameters is held from the probe step to the
            next (it is part of :meth:`state_dict` meanwhile).
            Not with :class:`~hidlr.integrations.distributed.DistributedHiDLR`.
        on_own_batch: what to do when the closure evaluates the gradient's own batch (the
            first probe fits reproduce the slope the gradient itself gives along the step, and
            the step after confirms it: see the README): ``"defer"`` (default) switches
            ``defer_probes`` on from then on and warns (where the loop passes a closure at that
            step and the check can tell; otherwise it warns only); ``"warn"`` only warns.
        rollback: under the robust policy, keep a copy of the trainable parameters at the
            last probe step whose loss had not blown up, and go back to it when a probe step
            finds the loss blown up (not finite, or more than 10 loss scales above the losses
            of the earlier probe steps: :func:`hidlr.rates.blown_up`), with the base
            optimizer's state for those parameters cleared (momentum and moment estimates
            gathered on the wrecked weights) and every rate cut 10x, never again to exceed the
            rate it had. Between probe steps, where no loss is measured, a step whose gradient
            norm has blown up (not finite, or 100x the largest at a probe step so far:
            :func:`hidlr.rates.gradient_blew_up`) rolls back the same way and takes no update;
            that costs one norm over the gradients per step (on an accelerator, one
            synchronisation) and is off for sharded parameters. Costs one copy of the
            trainable parameters, held throughout. With
            ``defer_probes`` the step that finds the blow-up takes no update of its own (its
            gradient was taken at the wrecked weights); the loss at the current weights is
            checked at the probe step (when it is given a closure) and at the step after (one
            forward pass each), so a blow-up caused by the deferred step's own update, taken
            before its probes, is caught too; the history records such a rollback at the step
            that found it. Module buffers are not rolled back
            (BatchNorm statistics are the module's; the optimizer does not see them).

    Learning-rate schedulers: attach them to this optimizer (or the base one; they share
    param groups). A group's rate used at a step is ``lrs[k] * lr / ref``: the scheduler's
    factor times the adapted rate, ``ref`` being the group's ``lr`` when Hi-DLR was built (its
    ``initial_lr`` if a scheduler was attached first), so a warm-up or decay shapes whatever
    rate Hi-DLR finds. The probes are placed at multiples of the adapted rate itself, so they keep
    a useful size while the schedule is small.

    The closure passed to :meth:`step` returns the loss at the current weights and must not
    call ``backward``; it decides the probes' batch. Use the next training batch
    (:func:`hidlr.with_probe_batch`): fits on the gradient's own batch are too long. Where the
    loop cannot look ahead, ``defer_probes=True`` with a closure on the current batch gives the
    probes the next batch one step later. Probes
    run under ``torch.no_grad``, all see the random-number state the training step would
    see next (common random numbers for dropout), do not advance it, and every buffer that
    a module changed in place during probing (BatchNorm statistics) is restored.

    If the closure raises (or anything else fails) during probing, the parameters, buffers
    and random state are left exactly as after a plain step of the base optimizer, no rate
    changes, and the exception propagates.
    """

    _sharded_parameters = False  # DTensor shards need a subclass that reduces across ranks
    _defers_on_own_batch = True  # whether on_own_batch="defer" may switch defer_probes on

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        update_every: int = 4,
        smoothing: float = 0.9,
        probe_multipliers: Sequence[float] = (-2.0, -1.0, 1.0, 2.0),
        min_r2: float = 0.95,
        coupled: bool = False,
        max_rate_change: float | None = None,
        policy: str = "robust",
        freeze_threshold: float | None = None,
        freeze_budget: int | None = None,
        freeze_warmup: int = 10,
        history_size: int = 1000,
        defer_probes: bool = False,
        on_own_batch: str = "defer",
        rollback: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, HiDLR):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer other than HiDLR, got {type(optimizer).__name__}"
            )
        check_per_group_rates(optimizer)
        check_no_shared_memory(optimizer.param_groups)
        self.optimizer = optimizer
        self.options: dict[str, Any] = {
            "update_every": check_int("update_every", update_every, minimum=1),
            "smoothing": check_float("smoothing", smoothing, low=0.0, high=1.0, high_open=True),
            "probe_multipliers": check_multipliers(probe_multipliers),
            "min_r2": check_float("min_r2", min_r2),
            "coupled": check_bool("coupled", coupled),
            "max_rate_change": None
            if max_rate_change is None
            else check_float("max_rate_change", max_rate_change, low=1.0, low_open=True),
            "policy": check_choice("policy", policy, ("robust", "paper")),
            "freeze_threshold": None
            if freeze_threshold is None
            else check_float(
                "freeze_threshold",
                freeze_threshold,
                low=0.0,
                high=1.0,
                low_open=True,
                high_open=True,
            ),
            "freeze_budget": None
            if freeze_budget is None
            else check_int("freeze_budget", freeze_budget, minimum=1),
            "freeze_warmup": check_int("freeze_warmup", freeze_warmup, minimum=0),
            "defer_probes": check_bool("defer_probes", defer_probes),
            "on_own_batch": check_choice("on_own_batch", on_own_batch, ("defer", "warn")),
            "rollback": check_bool("rollback", rollback),
        }
        self.defaults = optimizer.defaults
        for name in HOOKS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._steps = 0
        self._coupling = 1.0
        self._coupling_updates = 0
        self._recent_losses: list[float] = []  # fitted unperturbed losses of recent probe steps
        self._first_loss: float | None = None  # and the first (finite) one, the spikes' scale
        # the caller's losses at the deferred probes' blow-up checks (loss_here): the first, then
        # the recent ones; judged against each other, as they need not be the closure's function
        self._here_losses: list[float] = []
        # the largest gradient norm seen at a probe step, that a step's is judged against
        self._largest_gradient = 0.0
        # of the first probe fits compared with the gradient's own slope, how many reproduced
        # it (a closure on the gradient's own batch is acted on once) and how many in all
        self._own_batch: tuple[int, int] = (0, 0)
        # what the next step made of it once the fits found the gradient's own batch: None
        # (not found), "pending" (until that step), "own" (the probes are deferred since),
        # "full_batch", "next_batch" or "warned" (see :meth:`_confirm_own_batch`); while
        # pending, the probe step's closure and its loss at the end of that step
        self._own_batch_outcome: str | None = None
        self._own_batch_closure: tuple[Closure, float, float] | None = None
        self._own_batch_scale = 0.0
        self._confirm_next = False
        self._pending: Pending | None = None  # a deferred probe step's snapshot
        # the last probe step's w0 whose loss had not blown up: (parameters, their copies)
        self._rollback: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._history: deque[ProbeRecord] = deque(
            maxlen=check_int("history_size", history_size, minimum=0)
        )
        for i, group in enumerate(self.param_groups):
            self._init_group(i, group)
        self._watch_base()

    # -- the torch.optim.Optimizer surface -------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # an LR scheduler wraps ``step`` on the instance, with a weak reference to this object:
        # a copy must not carry it, nor the hooks (torch's own optimizers drop them the same way)
        state.pop("step", None)
        state.pop("_opt_called", None)
        for name in HOOKS:
            state.pop(name, None)
        if state.get("_own_batch_closure") is not None:
            # (a user's closure need not pickle: a copy taken between the two steps of the
            # own-batch check drops the check, as a checkpoint does)
            state["_own_batch_closure"], state["_own_batch_outcome"] = None, "warned"
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_first_loss", None)  # (pickled before it was kept)
        self.__dict__.setdefault("_rollback", None)
        self.__dict__.setdefault("_here_losses", [])
        self.__dict__.setdefault("_largest_gradient", 0.0)
        for name in HOOKS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._watch_base()

    def _watch_base(self) -> None:
        """A state dict loaded into the base optimizer itself (a plain checkpoint of it) brings
        param groups without Hi-DLR's keys: they start afresh from its rates."""
        hook = BaseLoaded(self)
        self.optimizer.register_load_state_dict_pre_hook(hook.before)
        self.optimizer.register_load_state_dict_post_hook(hook)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"HiDLR({opts}, lrs={self.lrs}, base={type(self.optimizer).__name__})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        try:
            check_per_group_rates(self.optimizer)
            check_no_shared_memory(self.param_groups)
            self._init_group(len(self.param_groups) - 1, self.param_groups[-1])
        except (TypeError, ValueError):
            self.optimizer.param_groups.pop()
            raise

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict (adapted rates live in its param groups) plus
        Hi-DLR's step count, options and history. State-dict hooks registered on this
        optimizer run around it, as torch's do."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {
            "base": self.optimizer.state_dict(),
            "hidlr": {
                "steps": self._steps,
                "coupling": self._coupling,
                "coupling_updates": self._coupling_updates,
                "recent_losses": list(self._recent_losses),
                "first_loss": self._first_loss,
                "here_losses": list(self._here_losses),
                "largest_gradient": self._largest_gradient,
                "own_batch": list(self._own_batch),
                "own_batch_outcome": self._own_batch_outcome,
                "options": dict(self.options),
                "history": [r.as_dict() for r in self._history],
                "pending": pending_to_state(self._pending, self.param_groups),
            },
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`, the options included: as torch's optimizers take
        their hyperparameters from a checkpoint, the checkpoint's Hi-DLR options replace the
        constructor's (a warning names those that differ)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "hidlr"}:
            raise ValueError(
                "state_dict must be a dict with keys 'base' and 'hidlr' (from HiDLR.state_dict()), "
                f"got keys {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}"
            )
        saved = state_dict["hidlr"]
        outcome = saved.get("own_batch_outcome")
        # (defer_probes switched on by the own-batch check is no change of the user's)
        options = checkpoint_options(
            saved["options"], self.options, quiet=("defer_probes",) if outcome == "own" else ()
        )
        # (the base's load hooks, BaseLoaded, put requires_grad in line with the loaded groups)
        self.optimizer.load_state_dict(state_dict["base"])
        self.options = options
        self._steps = int(saved["steps"])
        self._coupling = float(saved["coupling"])
        self._coupling_updates = int(saved["coupling_updates"])
        self._recent_losses = [float(v) for v in saved.get("recent_losses", [])]
        # (a checkpoint from before it was kept: the next probe step's loss stands in)
        first = saved.get("first_loss")
        self._first_loss = None if first is None else float(first)
        self._here_losses = [float(v) for v in saved.get("here_losses", [])]
        # (a checkpoint from before it was kept: the next probe step's norm sets it)
        self._largest_gradient = float(saved.get("largest_gradient", 0.0))
        agreed, compared = saved.get("own_batch", (0, 0))
        self._own_batch = (int(agreed), int(compared))
        self._own_batch_closure, self._confirm_next = None, False
        self._own_batch_outcome = outcome
        if outcome == "pending":  # the confirmation needs the probe step's closure: warn
            self._own_batch_outcome = "warned"
            warn_own_batch(agreed, compared, deferring=False, can_defer=self._defers_on_own_batch)
        self._history = deque(
            (ProbeRecord.from_dict(r) for r in saved["history"]), maxlen=self._history.maxlen
        )
        self._pending = pending_from_state(saved.get("pending"), self.param_groups)
        # (not in the state: a resumed run keeps its next sound probe step's w0, as a fresh
        # optimizer would; never weights of the run that was loaded over)
        self._rollback = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- what users read -------------------------------------------------------------------

    @property
    def lrs(self) -> list[float]:
        """The adapted rate of each param group (before any scheduler factor)."""
        return [g["hidlr_lr"] for g in self.param_groups]

    @property
    def influence(self) -> list[float]:
        """Each group's smoothed predicted loss decrease ``b^2 / (2A)`` from its own step."""
        return [g["hidlr_influence"] for g in self.param_groups]

    @property
    def influence_share(self) -> list[float]:
        """Each group's share of the total influence of the groups not frozen (0 if frozen)."""
        live = [
            0.0 if g["hidlr_frozen"] else max(g["hidlr_influence"], 0.0) for g in self.param_groups
        ]
        total = sum(live)
        return [v / total if total > 0 else 0.0 for v in live]

    @property
    def frozen(self) -> list[bool]:
        """Which groups are frozen."""
        return [bool(g["hidlr_frozen"]) for g in self.param_groups]

    def freeze(self, index: int) -> None:
        """Freeze group ``index``: no gradient is computed for it (``requires_grad`` off), its
        optimizer state is released and no probe is spent on it. Recorded in checkpoints."""
        group = self.param_groups[index]
        if not group["hidlr_frozen"]:  # what to put back on unfreeze (parameters the user froze)
            group["hidlr_requires_grad"] = [p.requires_grad for p in group["params"]]
        group["hidlr_frozen"] = True
        for p in group["params"]:
            p.requires_grad_(False)
            p.grad = None
            self.optimizer.state.pop(p, None)

    def unfreeze(self, index: int) -> None:
        """Train group ``index`` again; its optimizer state starts afresh. Parameters that did
        not require a gradient before :meth:`freeze` still do not."""
        group = self.param_groups[index]
        flags = group.pop("hidlr_requires_grad", None)
        if group["hidlr_frozen"]:
            restore_requires_grad(group["params"], flags)
        group["hidlr_frozen"] = False

    @property
    def steps(self) -> int:
        """Number of completed steps."""
        return self._steps

    @property
    def history(self) -> tuple[ProbeRecord, ...]:
        """Diagnostics of the most recent probe steps (see :func:`hidlr.save_history`)."""
        return tuple(self._history)

    def needs_closure(self) -> bool:
        """Whether the next :meth:`step` needs the closure: a probe step, or with
        ``defer_probes`` the step after one (where the probe step is given one too, it checks
        the loss there for a blow-up: see ``rollback``)."""
        if self._pending is not None:
            return True
        return not self.options.get("defer_probes", False) and self.is_probe_step()

    def is_probe_step(self) -> bool:
        """Whether the next :meth:`step` probes (and so needs a closure)."""
        return self._steps % self.options["update_every"] == 0

    # -- the step --------------------------------------------------------------------------

    def _init_group(self, index: int, group: dict[str, Any]) -> None:
        # a scheduler attached to the base optimizer first may have set lr to 0 (warm-up);
        # its initial_lr is then the rate Hi-DLR adapts
        key = "initial_lr" if "initial_lr" in group else "lr"
        for name in dict.fromkeys(("lr", key)):
            lr = group.get(name)
            if isinstance(lr, (torch.Tensor, bool)) or not isinstance(lr, (int, float)):
                raise TypeError(f"param_groups[{index}]['{name}'] must be a float, got {lr!r}")
            if not (math.isfinite(lr) and (lr > 0 or (lr == 0 and name != key))):
                bound = "> 0" if name == key else ">= 0"
                raise ValueError(
                    f"param_groups[{index}]['{name}'] must be a finite float {bound} for Hi-DLR "
                    f"to probe, got {lr!r}"
                )
        if group.get("maximize", False):
            raise ValueError(
                f"param_groups[{index}]['maximize'] must be False for Hi-DLR, got True: it "
                "fits the closure's loss as a function to minimise; negate the objective instead"
            )
        for j, p in enumerate(group["params"]):
            if p.is_meta:
                raise ValueError(
                    f"param_groups[{index}]['params'][{j}] is on the meta device: Hi-DLR needs "
                    "parameters with data (materialise them, e.g. with to_empty, before wrapping)"
                )
        dtensor = _dtensor_class()
        if (
            dtensor is not None
            and not self._sharded_parameters
            and any(isinstance(p, dtensor) for p in group["params"])
        ):
            raise TypeError(
                f"param_groups[{index}] holds sharded DTensor parameters (FSDP2 fully_shard): "
                "use hidlr.integrations.distributed.DistributedHiDLR, which probes them "
                "shard-wise and reduces the probe losses across ranks"
            )
        ref = group[key]
        group.setdefault("hidlr_ref_lr", float(ref))
        group.setdefault("hidlr_lr", float(ref))
        group.setdefault("hidlr_diag_lr", float(ref))
        group.setdefault("hidlr_peak_lr", float(ref))
        group.setdefault("hidlr_updates", 0)
        group.setdefault("hidlr_descent", 1.0)
        group.setdefault("hidlr_influence", 0.0)
        group.setdefault("hidlr_probes", 0)
        group.setdefault("hidlr_frozen", False)
        group.setdefault("hidlr_ceiling", math.inf)

    @staticmethod
    def _effective_lr(group: dict[str, Any]) -> float:
        if group["lr"] == group["hidlr_ref_lr"]:  # no scheduler factor: exactly the adapted rate
            return group["hidlr_lr"]
        return group["lr"] * (group["hidlr_lr"] / group["hidlr_ref_lr"])

    def _base_step(self) -> None:
        groups = self.param_groups
        scheduled = [g["lr"] for g in groups]
        try:
            for g in groups:
                g["lr"] = self._effective_lr(g)
            self.optimizer.step()
        finally:
            for g, lr in zip(groups, scheduled, strict=True):
                g["lr"] = lr

    def step(self, closure: Closure | None = None) -> None:  # type: ignore[override]
        """One training step; on probe steps (with ``defer_probes``, the steps after them:
        :meth:`needs_closure`) ``closure()`` must return the scalar loss at the current weights
        (no ``backward``)."""
        self._hidlr_step(closure)

    @torch.no_grad()
    def _hidlr_step(self, closure: Closure | None, loss_here: Any = None) -> None:
        # the step itself; subclasses that wrap step() call this rather than super().step():
        # torch wraps every class's step() with the optimizer hooks, so those would run twice.
        # loss_here: the loss at the current weights where the caller has it (LightningHiDLR:
        # the training loss), for the deferred probes' blow-up check
        if self.needs_closure() and (closure is None or not callable(closure)):
            when = (
                f"the step after a probe step with defer_probes=True (step {self._steps})"
                if self._pending is not None
                else f"probe steps (every update_every={self.options['update_every']} steps, "
                f"starting at the first), got {closure!r} at step {self._steps}"
            )
            raise ValueError(
                f"closure must be a callable returning the loss on {when}; pass e.g. "
                "closure=lambda: loss_fn(model(x), y)"
            )
        if self._own_batch_closure is not None:
            self._confirm_own_batch(closure)
        deferring = self.options.get("defer_probes", False)
        if self._pending is not None or (deferring and self.is_probe_step()):
            try:
                wrecked = self._wrecked_here(closure, loss_here)
            except BaseException:
                self._pending = None  # a failing closure drops the deferred probes, as below
                raise
            if wrecked:
                self._pending = None  # (its w0 is where the deferred step wrecked them from)
                self._steps += 1  # rolled back: no update on this step's wrecked gradient
                return None
        if self._pending is not None and self._resolve_pending(closure):  # type: ignore[arg-type]
            # rolled back: this step's gradient was taken at the wrecked weights, so no update
            self._steps += 1
            return None
        probing = self.is_probe_step()
        if self._gradient_blew_up(probing):
            self._steps += 1  # rolled back: no update on a gradient taken at wrecked weights
            return None
        if not probing:
            self._base_step()
            self._steps += 1
            return None
        if deferring:
            self._defer_probe_step()
            return None
        self._probe_step(closure)  # type: ignore[arg-type]
        return None

    def _gradient_blew_up(self, probing: bool) -> bool:
        """Under the robust policy with ``rollback``: the gradient norm of this step (one norm
        over the gradients; on an accelerator, one synchronisation). At a probe step it only
        raises the largest seen; between probe steps, a norm that has blown up
        (:func:`hidlr.rates.gradient_blew_up`) rolls back to the last probe step's weights, and
        the step takes no update. Not for sharded parameters, whose norms need a reduction."""
        opts = self.options
        if opts["policy"] != "robust" or not opts["rollback"] or self._sharded_parameters:
            return False
        if not probing and self._rollback is None:  # (nothing to go back to yet: no norm)
            return False
        grads = [
            p.grad
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and not p.grad.is_sparse
        ]
        if not grads:
            return False
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
        blew_up = gradient_blew_up(norm, self._largest_gradient)
        if probing:  # (a probe step measures the loss itself; a blown-up norm is no reference)
            if not blew_up:
                self._largest_gradient = max(self._largest_gradient, norm)
            return False
        if not blew_up:
            return False
        self._roll_back(math.nan, 0, self._steps, gradient=norm)
        return True

    def _snapshot_and_step(self) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """The base step, with a copy of the weights before it (``w0``) of the parameters it
        may move (per group: those with a gradient); a failing step leaves them as they were."""
        params = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        flat = [p for ps in params for p in ps]
        copies = snapshot(flat)
        try:
            self._base_step()
        except BaseException:
            if flat:
                torch._foreach_copy_(flat, copies)
            raise
        return params, copies

    @staticmethod
    def _movers(params: list[list[torch.Tensor]], copies: list[torch.Tensor]) -> list[GroupMover]:
        """Exchange the parameters (the current point) with ``copies`` (``w0``), then one
        :class:`GroupMover` per group over the parameters now at ``w0``."""
        flat = [p for ps in params for p in ps]
        plan = swap_plan(flat, copies)
        _exchange(flat, copies, plan)  # params hold w0, the copies hold the current point
        movers, start = [], 0
        for ps in params:
            end = start + len(ps)
            movers.append(GroupMover(ps, copies[start:end], plan[start:end]))
            start += len(ps)
        return movers

    def _probe_step(self, closure: Closure) -> None:
        params, copies = self._snapshot_and_step()
        self._steps += 1
        movers = self._movers(params, copies)
        try:
            own = (
                own_slopes(movers, self._sharded_parameters)
                if self._own_batch[1] < OWN_BATCH_CHECKS and not own_batch_found(*self._own_batch)
                else None
            )
            self._probe_and_update(closure, movers, own=own)
        except _BlownUp as blown:
            for mover in movers:
                mover.reset()
            self._roll_back(blown.loss, blown.evaluations)
            return
        except BaseException:
            for mover in movers:
                mover.reset()
            raise
        if self._confirm_next:
            # (the step is done: a closure that fails here only ends the check, with the
            # warning; at the next probe step it fails as any probe's would)
            self._confirm_next = False
            try:
                reference = self._loss_here(closure)
                self._own_batch_closure = (closure, reference, self._own_batch_scale)
            except Exception as error:
                self._own_batch_failed(error)

    def _probe_losses_seen(self) -> list[float]:
        """The losses at ``w0`` a blow-up is judged against: the recent probe steps' and the
        first one's."""
        return self._recent_losses + ([] if self._first_loss is None else [self._first_loss])

    def _wrecked_here(self, closure: Closure | None, loss_here: Any) -> bool:
        """Under ``defer_probes``, at a probe step and at the step after one: whether the loss
        at the current weights has blown up (:func:`hidlr.rates.blown_up`), and if so the
        rollback. The probes see ``w0`` one step late: by then the weights can have gone from
        a large finite loss to a non-finite one, and the deferred step's own update, taken at
        rates the probes would have cut, can be what wrecked them. The loss is ``loss_here``
        where the caller has it (LightningHiDLR: the training loss, at no cost), judged
        against the earlier ones it gave (it may be another function than the closure's: a
        regularised or summed loss); else the closure's (one forward pass), judged against
        the probes' losses at ``w0``."""
        opts = self.options
        if opts["policy"] != "robust" or not opts["rollback"] or self._rollback is None:
            return False
        if loss_here is not None:
            loss, evaluations = _scalar_loss(loss_here).item(), 0
            seen = self._here_losses
        elif callable(closure):
            loss, evaluations = self._loss_here(closure), 1
            seen = self._probe_losses_seen()
        else:
            return False
        if not blown_up(loss, seen):
            if loss_here is not None:  # the first, then the last SPIKE_WINDOW
                self._here_losses = seen[:1] + (seen[1:] + [loss])[-SPIKE_WINDOW:]
            return False
        self._roll_back(loss, evaluations, self._steps)
        self._here_losses = self._here_losses[:1]
        return True

    def _defer_probe_step(self) -> None:
        """The probe step's update, keeping ``w0`` for its probes at the next step."""
        used = [self._effective_lr(g) for g in self.param_groups]
        params, copies = self._snapshot_and_step()
        self._pending = Pending(self._steps, params, copies, used)
        self._steps += 1

    def _resolve_pending(self, closure: Closure) -> bool:
        """The probes of the deferred probe step, around its ``w0`` along its update, with this
        step's closure; the parameters end where they are (the deferred step's update stays).
        Returns whether the loss had blown up and the parameters were rolled back."""
        pending, self._pending = self._pending, None  # a failure drops it: no rate changes
        assert pending is not None
        # groups added since the probe step (add_param_group) have nothing to probe
        added = self.param_groups[len(pending.params) :]
        params = pending.params + [[] for _ in added]
        used = pending.used + [self._effective_lr(g) for g in added]
        movers = self._movers(params, list(pending.w0))
        try:
            self._probe_and_update(closure, movers, used=used, step=pending.step)
        except _BlownUp as blown:
            for mover in movers:
                mover.reset()
            self._roll_back(blown.loss, blown.evaluations, pending.step)
            return True
        except BaseException:
            for mover in movers:
                mover.reset()
            raise
        return False

    def _probe_and_update(
        self,
        closure: Closure,
        movers: list[GroupMover],
        used: list[float] | None = None,
        step: int | None = None,
        own: list[torch.Tensor | None] | None = None,
    ) -> None:
        """Probe, fit, decide the new rates, move to this step's final point, then commit.

        Nothing on ``self`` or in the param groups changes before the commit at the end, so an
        exception anywhere leaves the rates as they were (the caller restores the weights).
        """
        opts, groups = self.options, self.param_groups
        n = len(groups)
        rates = [g["hidlr_lr"] for g in groups]
        deferred = used is not None  # the probe step's update was taken already: keep it
        used = [self._effective_lr(g) for g in groups] if used is None else used
        moved, pushed = self._step_flags(movers)
        active = [k for k in range(n) if moved[k]]
        # a gradient but no change: the rate fell below what the weights' float format can
        # resolve (repeated cuts); it doubles until the group moves (then the fits take over
        # again), never beyond the largest rate the group has had. Not while a scheduler
        # shrinks the step: then the schedule, not the adapted rate, may be what is too small
        robust = opts["policy"] == "robust"
        stalled = [
            k for k in range(n) if robust and not moved[k] and pushed[k] and used[k] >= rates[k] > 0
        ]
        rows: list[dict[int, float]] = []
        values: list[torch.Tensor] = []
        devices = list({p.device for m in movers for p in m.params})

        def evaluate() -> torch.Tensor:
            rng.replay()
            loss = _scalar_loss(closure())
            guard.restore()
            return loss

        def probe(placement: dict[int, float]) -> None:
            for k, c in placement.items():
                offset = c * rates[k] / used[k] - 1.0
                movers[k].move(offset)
                if snapped(offset) != offset:  # (a scheduler factor within 1e-3 of 1)
                    placement = {**placement, k: used[k] / rates[k]}  # where it really is
            values.append(evaluate())
            rows.append(placement)

        mults = [c for c in opts["probe_multipliers"] if c != 0.0]
        # parameters moved in place (views of shared storage): a buffer overlapping one is
        # parameter data; the others were lent storage of their own for the probes
        in_place = [p for m in movers for p, lent in zip(m.params, m.plan, strict=True) if not lent]
        with probe_context(devices, in_place) as (rng, guard):
            anchor = None
            if active and len(mults) < len(opts["probe_multipliers"]):
                probe({})  # a 0 multiplier: the unperturbed point, shared by all groups
            elif active and robust:
                # the loss at w0, which the robust policy's spike rule and joint check judge
                # by: the fitted intercept is no measurement (one group's probes far from a
                # quadratic, where its step is many times too long, drag it anywhere, even
                # below zero, and a loss that has blown up then passes for a small one)
                anchor = evaluate()
            for i, k in enumerate(active):
                for c in mults:
                    probe({k: c})
                if opts["coupled"] or i + 1 < len(active):
                    movers[k].move(-1.0)  # back to w0 for the next group's probes
            if opts["coupled"]:
                for i, k in enumerate(active):
                    for l in active[i + 1 :]:
                        for c in (-1.0, 1.0):
                            probe({k: c, l: c})
                        movers[k].move(-1.0)
                        movers[l].move(-1.0)
            fit, measured, probed = self._fit(rows, values, rates, anchor)
            if robust and opts["rollback"] and measured is not None:
                if blown_up(measured, self._probe_losses_seen()):
                    if self._rollback is not None:
                        raise _BlownUp(measured, len(values) + (anchor is not None))
                else:
                    self._keep_w0(movers, active)
            anchored = replace(fit, intercept=measured) if robust and measured is not None else fit
            own_b = own_batch_slopes(own, active, used)
            agreed, compared = self._own_batch
            for k in active:
                same = reproduces_own_slope(fit.b[k], own_b[k])
                if same is not None:
                    agreed, compared = agreed + same, compared + 1
            decisions = propose_rates(fit, min_r2=opts["min_r2"])
            # (a checkpoint from before the descent frequency was kept: 1, its start)
            descents = [g.get("hidlr_descent", 1.0) for g in groups]
            for k in active if robust else ():
                descents[k] = track_descent(descents[k], fit.b[k])
            diag, counts, actions = diagonal_rates(
                fit,
                decisions,
                active,
                rates,
                [g["hidlr_diag_lr"] for g in groups],
                [g["hidlr_updates"] for g in groups],
                policy=opts["policy"],
                smoothing=opts["smoothing"],
                reach=max(abs(c) for c in opts["probe_multipliers"]),
                max_rate_change=opts["max_rate_change"],
                rising=rising(anchored.intercept, self._recent_losses),
                noisy=[d < NOISE_GATE for d in descents],
                plateau=on_plateau(anchored.intercept, self._first_loss),
            )
            first = self._first_loss
            if first is None and math.isfinite(anchored.intercept):
                first = anchored.intercept
            spiked, recent = spike_cuts(
                anchored.intercept,
                self._recent_losses,
                [(k, decisions[k], rates[k]) for k in active],
                start=first,
                detect=robust,
            )
            # (a checkpoint from before the ceilings were kept: none)
            ceilings = [g.get("hidlr_ceiling", math.inf) for g in groups]
            for k, factor in spiked:
                diag[k], actions[k] = diag[k] * factor, "spike"
                if factor == SPIKE_CUT:  # the rate the loss blew up at is not tried again
                    ceilings[k] = min(ceilings[k], rates[k])
            coupling, n_coupling = self._coupling, self._coupling_updates
            step_loss, ratio, backtrack = math.nan, math.nan, 1.0
            measured_step = [coupling * d for d in diag]
            if robust and (
                len(active) >= 2 or _step_blew_up(active, rows, probed, anchored, first)
            ):
                # one more probe: the combined step of all groups, which eq. 3.1 does not see.
                # A single group has none, and its own probes say how far it is to go; but
                # where the step just taken multiplied the loss, a poor fit can leave a rate
                # that is still far too long (session 16: GeN on a two-tower model, whose
                # curvature grows with the towers' outputs, took a step that multiplied the
                # loss 6x on its batch, cut its rate by a third and blew up within the probe
                # interval), so there the new step is measured too. (Judged as a spike is, so a
                # 4x jump near a zero loss that undoes little of the progress does not count; on
                # the chaotic deep MLP under momentum GeN still lost, 0.81x to 2.4x)
                steps = [0.0] * n
                for k in active:
                    offset = measured_step[k] / rates[k] - 1.0
                    movers[k].move(offset)
                    moved_to = snapped(offset) == offset
                    steps[k] = measured_step[k] * used[k] / rates[k] if moved_to else used[k]
                step_loss = evaluate().item()
                backtrack = step_scale(anchored, steps, step_loss)
                # (with coupled=True the solve of eq. 2.4 has taken the interactions in already)
                joint = None if opts["coupled"] else coupling_ratio(anchored, steps, step_loss)
                if joint is not None:
                    ratio = joint
                    clipped = min(max(joint, 1e-3), 2.0)
                    coupling = log_average(coupling, clipped, n_coupling, opts["smoothing"])
                    n_coupling += 1
                cut = overshoot(anchored.intercept, step_loss, backtrack)
                if cut < 1.0:  # the new rates' own step multiplies the loss: no noise does that
                    for k in active:
                        diag[k], actions[k] = diag[k] * cut, "overshoot"
                        ceilings[k] = min(ceilings[k], rates[k])
        # (a checkpoint from before the peak was kept: the larger of the initial and the
        # current rate)
        peaks = [g.get("hidlr_peak_lr", max(g["hidlr_lr"], g["hidlr_ref_lr"])) for g in groups]
        new_rates, diag, counts, actions = applied_rates(
            rates,
            diag,
            counts,
            actions,
            active,
            stalled,
            peaks,
            coupling=coupling,
            max_rate_change=opts["max_rate_change"],
        )
        for k in range(n):
            if new_rates[k] > ceilings[k]:
                diag[k] *= ceilings[k] / new_rates[k]
                new_rates[k] = ceilings[k]
        # an overshooting combined step is shortened now, to the minimum along the step that was
        # measured (the old coupling factor); the rates keep their averages
        this_step = [
            min(r, backtrack * measured_step[k]) if k in active and backtrack < 1.0 else r
            for k, r in enumerate(new_rates)
        ]
        if deferred:
            # the probe step's update was taken with the old rates and the next gradient was
            # computed there: it stays (rescaling it now diverged on the robustness benchmark)
            this_step = rates
        for k, mover in enumerate(movers):
            mover.finish(this_step[k] / rates[k] - 1.0 if this_step[k] != rates[k] else 0.0)

        # commit
        for k, g in enumerate(groups):
            g["hidlr_lr"], g["hidlr_diag_lr"], g["hidlr_updates"] = new_rates[k], diag[k], counts[k]
            g["hidlr_descent"] = descents[k]
            g["hidlr_peak_lr"] = max(peaks[k], new_rates[k])
            g["hidlr_ceiling"] = ceilings[k]
            if not g["hidlr_frozen"]:
                gain = predicted_decrease(fit.b[k], fit.A[k][k]) if k in active else 0.0
                g["hidlr_influence"] = update_influence(
                    g["hidlr_influence"], g["hidlr_probes"], gain, opts["smoothing"]
                )
                g["hidlr_probes"] += 1
        self._coupling, self._coupling_updates = coupling, n_coupling
        self._recent_losses, self._first_loss = recent, first
        self._warn_own_batch((agreed, compared))
        if self._confirm_next:  # one update's loss change by the fits sizes the next step's check
            self._own_batch_scale = math.fsum(
                abs(fit.b[k] * used[k]) for k in active if math.isfinite(fit.b[k])
            )
        shares = self.influence_share
        records = []
        for k, g in enumerate(groups):
            if k in active:
                reason, proposed = decisions[k].reason, decisions[k].proposed
            else:
                reason, proposed = _idle_reason(g, k in stalled), math.nan
            records.append(
                GroupProbe.of(
                    k,
                    (rates[k], new_rates[k]),
                    proposed,
                    (fit.b[k], fit.A[k][k], fit.r2[k]),
                    reason,
                    actions[k],
                    (g["hidlr_influence"], shares[k]),
                    own_b[k],
                )
            )
        record = ProbeRecord(
            self._steps - 1 if step is None else step,
            anchored.intercept,
            len(values) + (anchor is not None) + (0 if math.isnan(step_loss) else 1),
            tuple(records),
            step_loss,
            ratio,
            coupling,
        )
        self._history.append(record)
        self._maybe_freeze(record.step)
        logger.debug("hidlr probe step %d: %s", record.step, record)

    def _warn_own_batch(self, own_batch: tuple[int, int]) -> None:
        """Act once, when the fits compared so far say the closure evaluates the gradient's
        own batch (:func:`hidlr._own_batch.own_batch_found`). With ``on_own_batch="defer"``
        (and a class that supports deferred probes) the next step confirms it
        (:meth:`_confirm_own_batch`); otherwise warn now."""
        found_before = own_batch_found(*self._own_batch)
        self._own_batch = own_batch
        if found_before or not own_batch_found(*own_batch):
            return
        opts = self.options
        self._confirm_next = (
            opts.get("on_own_batch", "defer") == "defer"
            and not opts.get("defer_probes", False)
            and self._defers_on_own_batch
        )
        self._own_batch_outcome = "pending" if self._confirm_next else "warned"
        if not self._confirm_next:
            warn_own_batch(*own_batch, deferring=False, can_defer=self._defers_on_own_batch)

    def _own_batch_failed(self, error: BaseException) -> None:
        """A closure raised while the own-batch check measured: it is dropped, with the
        warning the fits call for."""
        self._own_batch_closure, self._own_batch_outcome = None, "warned"
        warn_own_batch(*self._own_batch, deferring=False, failed=error)

    def _confirm_own_batch(self, closure: Closure | None) -> None:
        """At the step after the fits found the gradient's own batch: which batch does the
        closure evaluate (:func:`hidlr._own_batch.own_batch_verdict`, two to six forward
        passes, once)? Each step's own: defer the probes from now on, and warn. One data set
        at every step (full-batch training, where probing it is right) or the next batch
        (which looked alike): nothing changes, nothing is said. No closure at this step (the
        loop passes one only when :meth:`needs_closure`; deferred probes need one at the
        step after a probe step) or no telling: warn only. If a closure raises, the weights,
        buffers and random state are as before, the warning is given and the error raised."""
        held, self._own_batch_closure = self._own_batch_closure, None
        assert held is not None
        before, reference, scale = held
        if not callable(closure):
            self._own_batch_outcome = "warned"
            warn_own_batch(*self._own_batch, deferring=False)
            return
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        devices = list({p.device for p in params})
        with probe_context(devices, params) as (rng, guard):

            def evaluate(fn: Closure) -> float:
                rng.replay()
                value = _scalar_loss(fn()).item()
                guard.restore()
                return value

            try:
                verdict = own_batch_verdict(
                    params, reference, scale, lambda: evaluate(closure), lambda: evaluate(before)
                )
            except BaseException as error:
                self._own_batch_failed(error)
                raise
        self._own_batch_outcome = "warned" if verdict == "unknown" else verdict
        if verdict == "own":
            self.options["defer_probes"] = True
        if verdict in ("own", "unknown"):
            warn_own_batch(*self._own_batch, deferring=verdict == "own")

    def _keep_w0(self, movers: list[GroupMover], active: list[int]) -> None:
        """Copy ``w0`` of the parameters being probed into the rollback buffers (allocated
        once, again only when the set of parameters changes)."""
        for k in active:
            movers[k].move(-1.0)
        params = [p for m in movers for p in m.params]
        kept = self._rollback
        if (
            kept is None
            or len(kept[0]) != len(params)
            or any(p is not q for p, q in zip(kept[0], params, strict=True))
        ):
            self._rollback = (params, snapshot(params))
        else:
            for copy, p in zip(kept[1], params, strict=True):  # (DTensors have no _foreach_copy_)
                copy.copy_(p)

    def _roll_back(
        self, loss: float, evaluations: int, step: int | None = None, gradient: float | None = None
    ) -> None:
        """Return to the kept ``w0`` after a blown-up loss (or, given ``gradient``, a blown-up
        gradient norm between probe steps); see ``rollback``."""
        assert self._rollback is not None
        params, copies = self._rollback
        for p, copy in zip(params, copies, strict=True):
            p.copy_(copy)
        for p in params:
            self.optimizer.state.pop(p, None)
        records = []
        for k, g in enumerate(self.param_groups):
            old = g["hidlr_lr"]
            g["hidlr_ceiling"] = min(g.get("hidlr_ceiling", math.inf), old)
            g["hidlr_lr"], g["hidlr_diag_lr"] = old * SPIKE_CUT, g["hidlr_diag_lr"] * SPIKE_CUT
            records.append(
                GroupProbe.of(
                    k,
                    (old, g["hidlr_lr"]),
                    math.nan,
                    (math.nan, math.nan, math.nan),
                    "blown_up",
                    "rollback",
                    (g["hidlr_influence"], math.nan),
                    math.nan,
                )
            )
        self._recent_losses = []
        self._history.append(
            ProbeRecord(
                self._steps - 1 if step is None else step,
                loss,
                evaluations,
                tuple(records),
                math.nan,
                math.nan,
                self._coupling,
            )
        )
        logger.warning(
            "hidlr: the %s blew up (%.3g) at step %d; back to the weights of the last probe "
            "step, rates cut 10x",
            "loss" if gradient is None else "gradient norm",
            loss if gradient is None else gradient,
            self._steps - 1 if step is None else step,
        )

    def _loss_here(self, closure: Closure) -> float:
        """The closure's loss at the current weights, as a probe sees it (no autograd, the
        random numbers replayed, buffers restored)."""
        params = [p for g in self.param_groups for p in g["params"]]
        with probe_context(list({p.device for p in params}), params) as (rng, guard):
            rng.replay()
            loss = _scalar_loss(closure()).item()
            guard.restore()
        return loss

    def _fit(
        self,
        rows: list[dict[int, float]],
        values: list[torch.Tensor],
        rates: list[float],
        anchor: torch.Tensor | None = None,
    ) -> tuple[QuadraticFit, float | None, list[float]]:
        """The quadratic fitted to the probes (``values`` at the placements ``rows``), the
        loss measured at ``w0`` (``anchor``, evaluated apart from the fit, or the probe of a 0
        multiplier; None if neither) and the probes' losses. All the losses pass through
        :meth:`_reduce_losses` together: one host sync, and every rank of a data-parallel run
        sees the same."""
        offsets = torch.zeros(len(rows), len(rates), dtype=torch.float64)
        for r, placement in enumerate(rows):
            for k, c in placement.items():
                offsets[r, k] = c
        stacked = [*values, anchor] if anchor is not None else values
        losses = (
            self._reduce_losses(torch.stack([v.to(torch.float64) for v in stacked])).cpu()
            if stacked
            else torch.zeros(0, dtype=torch.float64)
        )
        probed = losses[: len(rows)]
        fit = fit_quadratic(offsets, probed, rates, coupled=self.options["coupled"])
        if anchor is not None:
            return fit, float(losses[-1]), probed.tolist()
        return fit, float(losses[0]) if rows and not rows[0] else None, probed.tolist()

    def _step_flags(self, movers: list[GroupMover]) -> tuple[list[bool], list[bool]]:
        """Per group: whether the base step changed any of its parameters (the groups that are
        probed; frozen ones never count), and whether any of its gradients is non-zero (looked
        at only where nothing moved here). Both rows pass through :meth:`_reduce_flags`
        together, so every rank sees the same flags (on an accelerator, reading the flags costs
        one host sync per group)."""
        none = torch.zeros((), dtype=torch.bool)
        moved, pushed = [], []
        for m, g in zip(movers, self.param_groups, strict=True):
            moved.append(m.moved() if not g["hidlr_frozen"] else none)
            pushed.append(none)
        if not moved:
            return [], []
        local = torch.stack([f.cpu() for f in moved])
        for k, m in enumerate(movers):
            if not local[k] and not self.param_groups[k]["hidlr_frozen"]:
                pushed[k] = m.pushed()
        flags = self._reduce_flags(torch.stack([local, torch.stack([p.cpu() for p in pushed])]))
        return [bool(v) for v in flags[0].tolist()], [bool(v) for v in flags[1].tolist()]

    # -- hooks for data-parallel subclasses (hidlr.integrations.distributed) ----------------

    def _reduce_flags(self, flags: torch.Tensor) -> torch.Tensor:
        """Combine this process's per-group flags (a bool tensor on the CPU: a row of "moved"
        flags and a row of "has a non-zero gradient" flags, one column per group) with those of
        its peers, so that all of them probe the same groups. Identity here; a data-parallel
        subclass returns the elementwise logical or over its ranks."""
        return flags

    def _reduce_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """Combine the float64 probe losses of one probe step (a vector, in probe order) with
        those of the peers, so that all of them fit the same quadratic. Identity here; a
        data-parallel subclass returns the mean over its ranks (one collective)."""
        return losses

    def _maybe_freeze(self, step: int) -> None:
        opts = self.options
        if opts["freeze_threshold"] is None and opts["freeze_budget"] is None:
            return
        live = [g for g in self.param_groups if not g["hidlr_frozen"]]
        if not live or min(g["hidlr_probes"] for g in live) < opts["freeze_warmup"]:
            return
        shares = self.influence_share  # before freezing: a frozen group's share is 0
        for k in choose_frozen(
            self.influence,
            self.frozen,
            threshold=opts["freeze_threshold"],
            budget=opts["freeze_budget"],
        ):
            self.freeze(k)
            logger.info(
                "hidlr: froze group %d at step %d (influence share %.3g)", k, step, shares[k]
            )


def _step_blew_up(
    active: list[int],
    rows: list[dict[int, float]],
    probed: list[float],
    fit: QuadraticFit,
    start: float | None,
) -> bool:
    """Whether a single active group's probe nearest the step just taken (multiplier 1) is a
    :func:`~hidlr.rates.spike` against the loss at ``w0`` (4x it, or not finite), one that
    undoes more than a tenth of the progress since ``start``, the first probe step's loss."""
    if len(active) != 1:
        return False
    (k,) = active
    ahead = [(row[k], v) for row, v in zip(rows, probed, strict=True) if row.get(k, 0.0) > 0]
    if not ahead:
        return False
    _, loss = min(ahead, key=lambda cv: abs(math.log(cv[0])))
    return spike(loss, [fit.intercept], start=start)


def _idle_reason(group: dict[str, Any], stalled: bool) -> str:
    """Why a group was not probed."""
    if group["hidlr_frozen"]:
        return "frozen"
    if stalled:
        return "stalled"
    return "zero_direction" if group["params"] else "empty_group"


def _scalar_loss(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}"
            )
        return value.detach().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(
        f"closure must return a scalar loss tensor or float, got {type(value).__name__}"
    )


class _BlownUp(Exception):
    """Raised inside a probe step whose loss at ``w0`` blew up, to return to the kept one."""

    def __init__(self, loss: float, evaluations: int) -> None:
        super().__init__(loss)
        self.loss, self.evaluations = loss, evaluations
