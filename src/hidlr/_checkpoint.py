"""HiDLR's checkpoint format beside the base optimizer's: the deferred probe step as plain
data, the options a checkpoint brings, and the hooks a wrapper carries as torch's do."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from hidlr._probing import snapshot
from hidlr._validation import check_multipliers

if TYPE_CHECKING:
    from hidlr.optimizer import HiDLR


@dataclass
class Pending:
    """A deferred probe step: its parameters (per group, those with a gradient), their values
    before its update (``w0``) and the rates that update used."""

    step: int
    params: list[list[torch.Tensor]]
    w0: list[torch.Tensor]
    used: list[float]


def pending_to_state(
    pending: Pending | None, param_groups: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """A deferred probe step as plain data: positions of its parameters in the param groups
    (per group) and their values before its update. Like the tensors of torch's own
    ``state_dict``, these are live (the next step probes with them as scratch): save them
    at once, or ``copy.deepcopy`` the state dict to keep it in memory."""
    if pending is None:
        return None
    where = {id(p): (i, j) for i, g in enumerate(param_groups) for j, p in enumerate(g["params"])}
    return {
        "step": pending.step,
        "params": [[list(where[id(p)]) for p in ps] for ps in pending.params],
        "w0": list(pending.w0),
        "used": list(pending.used),
    }


def pending_from_state(
    data: dict[str, Any] | None, param_groups: list[dict[str, Any]]
) -> Pending | None:
    """The deferred probe step of :func:`pending_to_state`, on these param groups' tensors."""
    if data is None:
        return None
    params = [[param_groups[i]["params"][j] for i, j in ps] for ps in data["params"]]
    flat = [p for ps in params for p in ps]
    w0 = snapshot(flat)  # the layout of a live snapshot (one buffer), then its values
    if flat:
        torch._foreach_copy_(
            w0,
            [t.to(device=p.device, dtype=p.dtype) for t, p in zip(data["w0"], flat, strict=True)],
        )
    return Pending(int(data["step"]), params, w0, list(data["used"]))


def checkpoint_options(
    saved: dict[str, Any], current: dict[str, Any], *, quiet: Iterable[str] = ()
) -> dict[str, Any]:
    """The options a checkpoint brings; they replace ``current`` (as torch's optimizers take
    their hyperparameters from a checkpoint), with a warning naming those that differ (except
    ``quiet`` ones: set by Hi-DLR itself). An option the checkpoint predates keeps its
    ``current`` value."""
    options = {**current, **saved}
    options["probe_multipliers"] = check_multipliers(options["probe_multipliers"])
    changed = sorted(
        k
        for k in options.keys() | current.keys()
        if options.get(k) != current.get(k) and k not in quiet
    )
    if changed:
        warnings.warn(
            "the checkpoint's Hi-DLR options replace the constructor's: "
            + ", ".join(f"{k}={options.get(k)!r} (was {current.get(k)!r})" for k in changed),
            stacklevel=3,
        )
    return options


HOOKS = tuple(
    f"_optimizer_{kind}_hooks"
    for kind in (
        "step_pre",
        "step_post",
        "state_dict_pre",
        "state_dict_post",
        "load_state_dict_pre",
        "load_state_dict_post",
    )
)


def restore_requires_grad(params: list[torch.Tensor], flags: list[bool] | None) -> None:
    """``requires_grad`` as :meth:`HiDLR.freeze` found it (all on for a checkpoint that did
    not record it)."""
    for i, p in enumerate(params):
        p.requires_grad_(True if flags is None or i >= len(flags) else bool(flags[i]))


class BaseLoaded:
    """The base optimizer's load-state-dict hooks (see :meth:`hidlr.HiDLR._watch_base`): after
    any load into it (a HiDLR checkpoint's base part, or a plain checkpoint of the base), the
    groups get Hi-DLR's keys they lack, and ``requires_grad`` follows the loaded groups: off
    where a group is frozen, back as :meth:`~hidlr.HiDLR.freeze` found it where a frozen group
    now trains. A class holding a weak reference, so that neither keeps the other alive or
    unpicklable."""

    def __init__(self, owner: HiDLR) -> None:
        self.owner = weakref.ref(owner)
        self.live: list[tuple[bool, list[bool] | None]] | None = None

    def _mine(self, optimizer: Optimizer) -> HiDLR | None:
        owner = self.owner()
        return owner if owner is not None and owner.optimizer is optimizer else None

    def before(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        if self._mine(optimizer) is not None:
            self.live = [
                (bool(g.get("hidlr_frozen", False)), g.get("hidlr_requires_grad"))
                for g in optimizer.param_groups
            ]

    def __call__(self, optimizer: Optimizer) -> None:
        owner = self._mine(optimizer)
        live, self.live = self.live, None
        if owner is None:
            return
        for i, group in enumerate(optimizer.param_groups):
            owner._init_group(i, group)
        for group, (was_frozen, flags) in zip(optimizer.param_groups, live or [], strict=False):
            if group["hidlr_frozen"]:
                for p in group["params"]:
                    p.requires_grad_(False)
            elif was_frozen:  # a checkpoint from before a freeze: the group trains again
                restore_requires_grad(group["params"], flags)
