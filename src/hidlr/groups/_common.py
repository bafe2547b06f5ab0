"""What every grouping helper shares: the checks and guarantees of :func:`check_groups` and the
lookups of modules and names."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from hidlr._validation import _fail

ModuleRef = str | nn.Module
Pattern = str | re.Pattern[str] | Callable[[str, torch.Tensor], bool]
ParamGroups = list[dict[str, Any]]

ROLES = ("head", "norm", "bias")
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_NORM_NAME = re.compile(r"Norm(alization)?(\d[dD])?$")  # LlamaRMSNorm, T5LayerNorm, LayerNorm2d
_LORA_A = {"lora_A", "lora_embedding_A"}
_LORA_B = {"lora_B", "lora_embedding_B"}
_LORA_MAGNITUDE = {"lora_magnitude_vector"}


def _reject(name: str, accepted: str, value: Any, exc: type[Exception] = ValueError) -> NoReturn:
    _fail(name, accepted, value, exc)
    raise AssertionError("unreachable")  # _fail raises


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# -- the one check shared by every helper --------------------------------------------------------


def _finalize(
    model: nn.Module,
    named_groups: Sequence[tuple[str, Sequence[str]]],
    *,
    optional: Collection[str] = (),
    why_empty: str = "it holds no trainable parameter",
) -> ParamGroups:
    """Check a grouping given by parameter names and build the torch param groups.

    ``ValueError``, naming what is wrong, for: no trainable parameter, a group name that is
    not a non-empty string or is used twice, a name that is not a trainable parameter, a
    parameter in two groups, an empty group not in ``optional``, a trainable parameter in no
    group. Empty groups in ``optional`` are dropped.
    """
    trainable = _trainable(model)
    if not trainable:
        raise ValueError("model must have at least one trainable parameter, got none")
    order = {n: i for i, n in enumerate(trainable)}
    owner: dict[str, str] = {}
    overlaps: list[str] = []
    seen: set[str] = set()
    for gname, pnames in named_groups:
        if not isinstance(gname, str) or not gname:
            _reject("group names", "non-empty strings", gname)
        if gname in seen:
            raise ValueError(f"group names must be unique, got {gname!r} twice")
        seen.add(gname)
        for pn in pnames:
            if pn not in order:
                raise ValueError(
                    f"group {gname!r} names {pn!r}, which is not a trainable parameter"
                )
            if pn not in owner:
                owner[pn] = gname
            elif owner[pn] == gname:
                overlaps.append(f"{pn!r} (twice in {gname!r})")
            else:
                overlaps.append(f"{pn!r} (in {owner[pn]!r} and {gname!r})")
    if overlaps:
        raise ValueError("parameters in more than one group: " + _listing(overlaps))
    groups: ParamGroups = []
    for gname, pnames in named_groups:
        if not pnames:
            if gname in optional:
                continue
            raise ValueError(f"group {gname!r} is empty: {why_empty}")
        ordered = sorted(pnames, key=order.__getitem__)
        groups.append({"params": [trainable[n] for n in ordered], "name": gname})
    missing = [repr(n) for n in trainable if n not in owner]
    if missing:
        raise ValueError("trainable parameters in no group: " + _listing(missing))
    return groups


def check_groups(
    model: nn.Module, groups: Iterable[Mapping[str, Any]] | torch.optim.Optimizer
) -> None:
    """Run the checks of the helpers here on param groups you built yourself.

    Raises ``ValueError`` naming the parameters or groups when a tensor is not a parameter
    of ``model``, a parameter is in two groups, a group holds no trainable parameter, two
    groups share a name, or a trainable parameter is in no group. Frozen parameters inside
    a group are allowed (torch skips them) but do not count. Groups without ``"name"`` are
    called ``group<i>``.
    """
    _check_model(model)
    all_names = {id(p): n for n, p in model.named_parameters()}
    named: list[tuple[str, list[str]]] = []
    for i, group in enumerate(_as_groups(groups)):
        gname = group.get("name", f"group{i}")
        pnames: list[str] = []
        for p in _group_params(group, i):
            if id(p) not in all_names:
                raise ValueError(
                    f"group {gname!r} holds a tensor of shape {tuple(p.shape)} that is not a "
                    "parameter of the model"
                )
            if p.requires_grad:
                pnames.append(all_names[id(p)])
        named.append((gname, pnames))
    _finalize(model, named)


# -- arguments and module lookup -------------------------------------------------------------


def _check_model(model: Any, *, trainable: bool = False) -> None:
    if not isinstance(model, nn.Module):
        _reject("model", "a torch.nn.Module", type(model).__name__, TypeError)
    if trainable and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model must have at least one trainable parameter, got none")


def _check_rest(rest: Any, taken: Collection[str]) -> str:
    if not isinstance(rest, str):
        _reject("rest", "a non-empty str", rest, TypeError)
    if not rest or rest in taken:
        _reject(
            "rest", "a non-empty group name other than " + _listing([repr(t) for t in taken]), rest
        )
    return rest


def _resolve_module(model: nn.Module, ref: Any, what: str) -> tuple[str, nn.Module]:
    """``(full name, module)`` for a submodule given by name or object.

    A name that is not found is also tried under ``base_model.model.``, where ``peft``
    puts the wrapped model, so ``"head"`` works before and after ``get_peft_model``.
    """
    if isinstance(ref, nn.Module):
        for name, module in model.named_modules():
            if module is ref:
                return name, module
        _reject(what, "a submodule of the model or its name", type(ref).__name__)
    if not isinstance(ref, str):
        _reject(what, "a module name (str) or a submodule", ref, TypeError)
    modules = dict(model.named_modules())
    for candidate in (ref, f"base_model.model.{ref}"):
        if candidate in modules:
            return candidate, modules[candidate]
    close = difflib.get_close_matches(ref, [k for k in modules if k], n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise ValueError(f"{what} must be the name of a submodule of the model, got {ref!r}{hint}")


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _children_holding(module: nn.Module, ids: Collection[int]) -> list[tuple[str, nn.Module]]:
    """The children of ``module`` holding at least one of the parameters ``ids``."""
    return [(n, c) for n, c in module.named_children() if any(id(p) in ids for p in c.parameters())]


def _id_names(model: nn.Module) -> dict[int, str]:
    """Trainable parameters by identity, so a tied parameter is found from every module."""
    return {id(p): n for n, p in _trainable(model).items()}


def _names_of(module: nn.Module, id_names: Mapping[int, str]) -> list[str]:
    return [id_names[id(p)] for p in module.parameters() if id(p) in id_names]


def _with_rest(
    model: nn.Module,
    named: list[tuple[str, list[str]]],
    rest: Any,
    optional: Collection[str] = (),
    why_empty: str = "it holds no trainable parameter",
) -> ParamGroups:
    """``named`` plus a ``rest`` group of every trainable parameter not in it, checked."""
    rest_name = _check_rest(rest, [g for g, _ in named])
    inside = {n for _, names in named for n in names}
    leftover = [n for n in _trainable(model) if n not in inside]
    groups = [*named, (rest_name, leftover)]
    return _finalize(model, groups, optional={rest_name, *optional}, why_empty=why_empty)


# -- by role ----------------------------------------------------------------------------------


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _as_groups(groups: Any) -> list[Mapping[str, Any]]:
    if isinstance(groups, torch.optim.Optimizer):
        return list(groups.param_groups)
    if isinstance(groups, (Mapping, torch.Tensor)) or not isinstance(groups, Iterable):
        _reject("groups", "a sequence of param-group dicts or an optimizer", groups, TypeError)
    out = list(groups)
    for i, g in enumerate(out):
        if not isinstance(g, Mapping) or "params" not in g:
            _reject(f"groups[{i}]", "a dict with 'params'", g, TypeError)
        params = g["params"]
        if isinstance(params, (torch.Tensor, list, tuple)):
            continue
        if isinstance(params, (set, frozenset)):  # as torch: their order changes between runs
            _reject(
                f"groups[{i}]['params']", "an ordered collection (a set is not)", params, TypeError
            )
        if isinstance(params, (str, Mapping)) or not isinstance(params, Iterable):
            _reject(
                f"groups[{i}]['params']", "a tensor or an iterable of tensors", params, TypeError
            )
        # a generator (model.parameters()) is read once and kept, as torch's optimizers do,
        # so that the groups still hold their parameters after a check
        listed = list(params)
        if isinstance(g, MutableMapping):
            g["params"] = listed
        else:
            out[i] = {**g, "params": listed}
    return out


def _group_params(group: Mapping[str, Any], i: int) -> list[torch.Tensor]:
    params = group["params"]
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    for j, p in enumerate(items):
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            items[j] = p = p[1]  # (name, tensor) pairs, as torch.optim accepts
        if not isinstance(p, torch.Tensor):
            _reject(f"groups[{i}]['params']", "tensors", type(p).__name__, TypeError)
    return items
