"""Param groups for Hi-DLR: the groupings of the paper, ready to use on your own model.

"The success of DLR depends on the grouping of parameters": Hi-DLR adapts one rate per param
group, so the grouping decides which parameters may learn at different speeds. Every helper
here takes a model and returns ordinary torch param groups, a ``list[dict]`` with
``"params"`` (a list of tensors) and ``"name"``, for any ``torch.optim`` optimizer and so for
:class:`hidlr.HiDLR`. Add options (``lr``, ``weight_decay``...) to the dicts before building
the optimizer. One function checks the result of every helper, so they all promise:

* every trainable parameter (``requires_grad=True``) is in exactly one group; frozen ones are
  left out (freeze first, then group);
* no group is empty: a group you asked for that holds no trainable parameter is a
  ``ValueError`` naming it, and so is a parameter in two groups (naming it and both groups);
  leftover groups (``rest``, ``input``, ``output``, ``between<k>``) are dropped when empty;
* a deterministic order: groups in the documented order, parameters within a group in
  ``model.named_parameters()`` order. A parameter shared by several modules (tied weights)
  counts once, under its first name.

Which grouping when (each group costs one forward pass per non-zero probe multiplier per probe
step, so prefer a few groups that really differ):

* :func:`by_role` ``(model, "head")``: fine-tuning a pretrained network, where the new head
  wants a much larger rate than the pretrained body; ``"bias"`` or ``"norm"`` for BitFit-like
  or normalization tuning; ``("head", "norm", "bias")`` for the 4-way split (Table 2).
* :func:`by_depth`: deep stacks, one rate per block or layer (ULMFiT's discriminative
  fine-tuning, with the rates found instead of decayed by hand).
* :func:`by_lora`: LoRA, where ``B`` starts at zero and wants another rate than ``A``.
* :func:`by_subnetwork`: parallel sub-networks (the shape functions of a neural additive
  model, the experts of a mixture of experts), whose curvatures differ.
* :func:`split_output_units` then :func:`by_output_unit`: many independent outputs (the 40
  attribute heads of CelebA), one rate per output unit.
* :func:`by_patterns`: anything else, by regular expression or predicate on the names.

:func:`format_groups` prints a grouping (or ``optimizer.param_groups``) as a table and
:func:`check_groups` runs the same checks on groups you built yourself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn
from torch.nn import functional as F

from hidlr._validation import _fail, check_int

__all__ = [
    "GroupSummary",
    "UnitSplitLinear",
    "by_depth",
    "by_lora",
    "by_output_unit",
    "by_patterns",
    "by_role",
    "by_subnetwork",
    "check_groups",
    "find_head",
    "format_groups",
    "merge_output_units",
    "split_output_units",
    "summarize_groups",
]

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


def find_head(model: nn.Module) -> str:
    """The name of the model's output layer, as :func:`by_role` finds it when not told.

    The rule: the last ``nn.Linear`` (or :class:`UnitSplitLinear`) in module registration
    order with a trainable parameter, skipping ``peft`` LoRA adapters (names with a
    ``lora_*`` part) and the projections inside ``nn.MultiheadAttention``. If one of its ancestors (not the model
    itself) is a ``peft`` ``ModulesToSaveWrapper`` or has a class name ending in ``Head``
    (the transformers and timm convention: ``RobertaClassificationHead``,
    ``ClassifierHead``) and contains no ``nn.ModuleList``, the outermost such ancestor is
    the head. This gives ``classifier`` for BERT, ``lm_head`` for GPT-2 and Llama, ``score``
    for Llama classifiers, ``fc`` for ResNet, ``head`` for ``hidlr.experiments`` models and
    the wrapped head of ``peft`` models with ``modules_to_save``.

    Raises ``ValueError`` when there is no such layer, or when it sits inside an
    ``nn.ModuleList`` (experts, per-feature networks, several task heads: the last one alone
    is not the head); name the head yourself then, e.g. ``by_role(model, head="heads")``.
    The rule reads the module structure, not the forward pass: a model that registers its
    output layer before other linear layers needs ``head=`` too.
    """
    _check_model(model)
    in_attention = {
        id(m)
        for mha in model.modules()
        if isinstance(mha, nn.MultiheadAttention)
        for m in mha.modules()
    }
    last: str | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, (nn.Linear, UnitSplitLinear))
            and id(module) not in in_attention
            and not _is_lora_name(name)
            and any(p.requires_grad for p in module.parameters(recurse=False))
        ):
            last = name
    if last is None:
        raise ValueError(
            "cannot find the head automatically: the model has no trainable nn.Linear outside "
            "LoRA adapters and attention; pass head=<module name>"
        )
    modules = dict(model.named_modules())
    parts = last.split(".")
    for i in range(1, len(parts)):
        ancestor = modules[".".join(parts[:i])]
        cls = type(ancestor).__name__
        if (cls == "ModulesToSaveWrapper" or cls.endswith("Head")) and not any(
            isinstance(m, nn.ModuleList) for m in ancestor.modules()
        ):
            last = ".".join(parts[:i])
            break
    parts = last.split(".")
    for i in range(len(parts) - 1, -1, -1):
        ancestor_name = ".".join(parts[:i])
        if isinstance(modules[ancestor_name], nn.ModuleList):
            raise ValueError(
                f"cannot find the head automatically: the last trainable nn.Linear {last!r} "
                f"sits inside the ModuleList {ancestor_name!r} (experts, per-feature networks "
                f"or several task heads?); pass head=<module name>, e.g. head={ancestor_name!r}"
            )
    return last


def _head_ids(model: nn.Module, head: Any) -> set[int]:
    if head is None:
        specs: list[Any] = [find_head(model)]
    elif isinstance(head, (str, nn.Module)):
        specs = [head]
    elif isinstance(head, Sequence) and head:
        specs = list(head)
    else:
        _reject("head", "a module name, a submodule, or a non-empty sequence of them", head)
    params = dict(model.named_parameters())
    ids: set[int] = set()
    for spec in specs:
        as_param = [n for n in (spec, f"base_model.model.{spec}") if n in params]
        if isinstance(spec, str) and as_param:
            ids.add(id(params[as_param[0]]))
        else:
            ids.update(id(p) for p in _resolve_module(model, spec, "head")[1].parameters())
    return ids


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def _is_bias(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == "bias" or last.endswith("_bias")


def by_role(
    model: nn.Module,
    roles: str | Sequence[str] = ROLES,
    *,
    head: ModuleRef | Sequence[ModuleRef] | None = None,
    rest: str = "rest",
) -> ParamGroups:
    """One group per role in ``roles`` (in that order), then ``rest`` for everything else.

    The groupings of the paper's Table 2: ``by_role(model, "head")`` is "Hi-DLR (head)",
    the head against the rest, likewise ``"bias"`` and ``"norm"``; the default is the 4-way
    split ``head / norm / bias / rest``. The roles:

    * ``"head"``: the parameters of the module(s) named by ``head`` (a module name, a
      parameter name, a submodule, or a sequence of them; names are also tried under
      ``base_model.model.`` for ``peft`` models), found by :func:`find_head` when ``None``.
      A weight tied to the head (GPT-2's ``lm_head`` and ``wte``) counts as head.
    * ``"norm"``: the own parameters of normalization layers (``BatchNorm*``,
      ``InstanceNorm*``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, and modules whose class
      name ends in ``Norm``, such as ``LlamaRMSNorm`` or ``LayerNorm2d``).
    * ``"bias"``: parameters named ``bias`` or ``*_bias`` (``in_proj_bias``).

    A parameter with several roles goes to the first of ``roles`` it has: with the default
    order the head's bias is head and a LayerNorm's bias is norm, while ``by_role(model,
    "bias")`` alone collects every bias. Use ``"head"`` when fine-tuning a pretrained body
    with a new head; add ``"norm"`` and ``"bias"`` when those small tensors matter (BitFit,
    a domain shift absorbed by normalization layers).

    Raises ``ValueError`` for an unknown role, a requested role that no trainable parameter
    has, or a head that cannot be found.
    """
    _check_model(model, trainable=True)
    wanted = (
        [roles] if isinstance(roles, str) else list(roles) if isinstance(roles, Sequence) else []
    )
    if not wanted or any(r not in ROLES for r in wanted) or len(set(wanted)) != len(wanted):
        accepted = "a role or a sequence of distinct roles among " + ", ".join(map(repr, ROLES))
        _reject("roles", accepted, roles)
    if head is not None and "head" not in wanted:
        _reject("head", "None unless 'head' is one of the roles", head)
    head_ids = _head_ids(model, head) if "head" in wanted else set()
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    members: dict[str, list[str]] = {r: [] for r in wanted}
    for name, p in _trainable(model).items():
        has = {"head": id(p) in head_ids, "norm": id(p) in norm_ids, "bias": _is_bias(name)}
        role = next((r for r in wanted if has[r]), None)
        if role is not None:
            members[role].append(name)
    why = "no trainable parameter has this role (frozen, or no such layer); leave it out of roles"
    return _with_rest(model, list(members.items()), rest, why_empty=why)


# -- by depth, by sub-network -----------------------------------------------------------------


def _auto_containers(model: nn.Module) -> list[str]:
    """By structure (all parameters, frozen or not), so freezing does not move the blocks."""
    ids = {id(p) for p in model.parameters()}
    found: list[str] = []
    for name, module in model.named_modules():
        if any(_under(name, f) for f in found):
            continue
        kids = _children_holding(module, ids)
        if len(kids) >= 2 and (
            isinstance(module, nn.ModuleList)
            or (isinstance(module, nn.Sequential) and len({type(c) for _, c in kids}) == 1)
        ):
            found.append(name)
    if found:
        return found
    container, module = "", model
    while True:  # descend through wrappers with a single child (peft's PeftModel, LoraModel)
        kids = _children_holding(module, ids)
        if len(kids) != 1 or any(id(p) in ids for p in module.parameters(recurse=False)):
            return [container]
        container, module = _join(container, kids[0][0]), kids[0][1]


def by_depth(
    model: nn.Module, blocks: ModuleRef | Sequence[ModuleRef] | None = None
) -> ParamGroups:
    """One group per block, from input to output: ULMFiT's depth-wise groups.

    The blocks are the children holding parameters of one or more containers:

    * ``blocks=None`` (automatic): walking the modules in registration order, every
      ``nn.ModuleList`` with at least two such children, and every ``nn.Sequential`` whose
      (two or more) such children are all of one class, is a container; nothing inside a
      container is searched further. Frozen parameters count here, so freezing some layers
      does not change which modules are blocks. This finds transformer layers (``layers``
      of ``nn.TransformerEncoder``, BERT's ``bert.encoder.layer``, GPT-2's
      ``transformer.h``, Llama's ``model.layers``, T5's ``encoder.block`` and
      ``decoder.block``), the blocks of ResNet stages and the layers of an
      ``nn.Sequential`` MLP. If there is none, the container is the model itself
      (descending through wrappers with a single child, such as ``peft``'s): one group per
      top-level child.
    * ``blocks="name"`` (or a submodule, or a sequence of them): those containers; ``""``
      is the model itself (one group per top-level child).

    A block's group is named by its full module name (``"encoder.layers.0"``). The other
    trainable parameters, in ``model.named_parameters()`` order, form ``"input"`` (before
    the first block: embeddings, stem, and parameters held by the model itself, such as a
    positional embedding), ``"output"`` (after the last block: final norm and head) and
    ``"between<k>"`` (between two containers, e.g. T5's encoder final norm); a leftover
    whose name a block already has is put in parentheses (``"(output)"``). Blocks and
    leftovers without trainable parameters are dropped.

    Use it for deep networks whose early layers should move less than late ones, with a
    larger ``update_every`` when there are many blocks.
    """
    _check_model(model, trainable=True)
    trainable = _trainable(model)
    if blocks is None:
        containers = _auto_containers(model)
    else:
        refs = [blocks] if isinstance(blocks, (str, nn.Module)) else list(blocks)
        if not refs:
            _reject(
                "blocks", "a container name, a submodule, or a non-empty sequence of them", blocks
            )
        containers = [_resolve_module(model, r, "blocks")[0] for r in refs]
        for i, a in enumerate(containers):
            if any(_under(a, b) or _under(b, a) for b in containers[i + 1 :]):
                _reject("blocks", "containers that do not contain one another", containers)
    modules = dict(model.named_modules())
    block_names: list[str] = []
    for c in containers:
        kids = _children_holding(modules[c], {id(p) for p in modules[c].parameters()})
        if blocks is not None and not kids:
            _reject("blocks", "containers with children holding parameters", c)
        block_names.extend(_join(c, n) for n, _ in kids)
    in_blocks = [n for n in trainable if any(_under(n, b) for b in block_names)]
    if not in_blocks:
        raise ValueError(
            f"by_depth found no block with trainable parameters (containers: "
            f"{', '.join(map(repr, containers))}); pass blocks=<container name>"
        )
    runs: list[tuple[str | None, list[str]]] = []  # consecutive parameters of one block or none
    for name in trainable:
        label = next((b for b in block_names if _under(name, b)), None)
        if runs and runs[-1][0] == label:
            runs[-1][1].append(name)
        else:
            runs.append((label, [name]))
    at_block = [i for i, (label, _) in enumerate(runs) if label is not None]
    groups: dict[str, list[str]] = {}
    between = 0
    for i, (label, names) in enumerate(runs):
        if label is None:
            if i < at_block[0]:
                label = "input"
            elif i > at_block[-1]:
                label = "output"
            else:
                label, between = f"between{between}", between + 1
            if label in block_names:
                label = f"({label})"
        groups.setdefault(label, []).extend(names)
    return _finalize(model, list(groups.items()))


def by_subnetwork(model: nn.Module, container: ModuleRef, *, rest: str = "rest") -> ParamGroups:
    """One group per child of ``container`` (by name or as a module), then ``rest``.

    For models made of parallel sub-networks whose curvatures differ: a neural additive
    model's shape functions (``by_subnetwork(nam, "features", rest="bias")`` gives
    ``features.0``, ``features.1``, ... and ``bias``), the experts of a mixture of experts
    (``by_subnetwork(moe, "experts", rest="gate")`` gives one group per expert, then the
    gate), or the towers of a multi-task model. Groups are named by the children's full
    module names, in registration order; children without trainable parameters are
    skipped; ``rest`` (everything outside the children, dropped when empty) comes last.
    """
    _check_model(model, trainable=True)
    cname, module = _resolve_module(model, container, "container")
    id_names = _id_names(model)
    kids = _children_holding(module, id_names)
    if not kids:
        _reject("container", "a module with children holding trainable parameters", cname)
    return _with_rest(model, [(_join(cname, n), _names_of(c, id_names)) for n, c in kids], rest)


# -- LoRA, patterns ---------------------------------------------------------------------------


def by_lora(model: nn.Module, *, rest: str = "head") -> ParamGroups:
    """``lora_A``, ``lora_B``, then ``rest`` (default ``"head"``): LoRA's factors apart.

    ``B`` starts at zero and its gradient is scaled by ``A``, so the two factors want
    different rates (LoRA+ fixes their ratio by hand; Hi-DLR finds both). A parameter whose
    name has a part ``lora_A`` or ``lora_embedding_A`` is in ``lora_A`` (``peft``'s
    ``...q.lora_A.default.weight``, :class:`hidlr.experiments.models.LoRALinear`'s
    ``lora_A``), likewise for ``B``; DoRA's ``lora_magnitude_vector`` gets a
    ``lora_magnitude`` group when present. Every other trainable parameter (``peft``'s
    trainable copy of ``modules_to_save``, biases trained with ``bias="all"``) goes to
    ``rest``, dropped when empty.

    Raises ``ValueError`` when the model has no trainable ``lora_A`` or ``lora_B``.
    """
    _check_model(model, trainable=True)
    members: dict[str, list[str]] = {"lora_A": [], "lora_B": [], "lora_magnitude": []}
    for name in _trainable(model):
        parts = set(name.split("."))
        for group, marks in (
            ("lora_A", _LORA_A),
            ("lora_B", _LORA_B),
            ("lora_magnitude", _LORA_MAGNITUDE),
        ):
            if parts & marks:
                members[group].append(name)
                break
    for factor in ("lora_A", "lora_B"):
        if not members[factor]:
            raise ValueError(
                f"group {factor!r} is empty: no trainable parameter has a {factor!r} part in its "
                "name; is the model adapted with LoRA (peft.get_peft_model) and not frozen?"
            )
    return _with_rest(model, list(members.items()), rest, optional={"lora_magnitude"})


def _searcher(rx: re.Pattern[str]) -> Callable[[str, torch.Tensor], bool]:
    return lambda name, param: rx.search(name) is not None


def by_patterns(
    model: nn.Module, patterns: Mapping[str, Pattern], *, rest: str | None = "rest"
) -> ParamGroups:
    """One group per entry of ``patterns`` (in its order), then ``rest``.

    Each pattern is a regular expression (``str`` or compiled) searched (``re.search``) in
    the parameter's full name, or a predicate ``(name, param) -> bool``. For example::

        by_patterns(model, {"attention": r"self_attn", "ffn": r"linear[12]"}, rest="other")
        by_patterns(model, {"matrices": lambda name, p: p.ndim >= 2}, rest="vectors")

    A parameter matched by two patterns is an error naming it and both groups (patterns do
    not shadow each other: make them disjoint), and so is a pattern that matches no
    trainable parameter. Unmatched parameters go to ``rest`` (dropped when empty) or, with
    ``rest=None``, are an error naming them.
    """
    _check_model(model, trainable=True)
    if not isinstance(patterns, Mapping) or not patterns:
        _reject("patterns", "a non-empty mapping of group name to pattern", patterns, TypeError)
    matchers: list[tuple[str, Callable[[str, torch.Tensor], Any]]] = []
    for gname, pattern in patterns.items():
        if isinstance(pattern, str):
            try:
                pattern = re.compile(pattern)
            except re.error as exc:
                _reject(f"patterns[{gname!r}]", f"a valid regular expression ({exc})", pattern)
        if isinstance(pattern, re.Pattern):
            matchers.append((gname, _searcher(pattern)))
        elif callable(pattern):
            matchers.append((gname, pattern))
        else:
            _reject(
                f"patterns[{gname!r}]", "a regular expression or a callable", pattern, TypeError
            )
    members: dict[str, list[str]] = {g: [] for g, _ in matchers}
    unmatched: list[str] = []
    for name, p in _trainable(model).items():
        hits = [g for g, match in matchers if match(name, p)]
        for g in hits:
            members[g].append(name)
        if not hits:
            unmatched.append(repr(name))
    why = "its pattern matches no trainable parameter"
    if rest is None:
        if unmatched:
            raise ValueError(
                "trainable parameters matched by no pattern (rest=None): " + _listing(unmatched)
            )
        return _finalize(model, list(members.items()), why_empty=why)
    return _with_rest(model, list(members.items()), rest, why_empty=why)


# -- one group per output unit --------------------------------------------------------------


class UnitSplitLinear(nn.Module):
    """``nn.Linear`` with one Parameter per output unit, so each unit can have its own rate.

    Torch optimizers give a rate per tensor, so a ``(out, in)`` layer cannot have ``out``
    rates. This module holds ``unit<i>_weight`` of shape ``(1, in)`` (row ``i`` of
    ``weight``) and ``unit<i>_bias`` of shape ``(1,)``, copied from the tensors given, and
    computes exactly ``nn.Linear``'s function: ``forward`` concatenates the rows and calls
    ``F.linear``, so outputs are bitwise equal to the original layer's and each unit's
    gradient is its row of the original gradient. ``weight`` and ``bias`` are read-only
    properties (the concatenations). The ``state_dict`` has ``nn.Linear``'s keys and
    shapes (``weight``, ``bias``), so checkpoints move freely between split and plain models.

    A unit requires grad when the tensor it comes from does (or is not an ``nn.Parameter``).
    Usually built by :func:`split_output_units`, which also puts it into the model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor):
            _reject("weight", "a tensor", type(weight).__name__, TypeError)
        if weight.ndim != 2 or 0 in weight.shape:
            _reject("weight", "a non-empty 2-d tensor", tuple(weight.shape))
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        if bias is not None and not isinstance(bias, torch.Tensor):
            _reject("bias", "None or a tensor", type(bias).__name__, TypeError)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            _reject("bias", f"of shape ({self.out_features},)", tuple(bias.shape))
        self.has_bias = bias is not None
        for key, tensor in (("weight", weight), ("bias", bias)):
            if tensor is None:
                continue
            grad = tensor.requires_grad if isinstance(tensor, nn.Parameter) else True
            for i in range(self.out_features):
                unit = tensor.detach()[i : i + 1].clone()
                self.register_parameter(f"unit{i}_{key}", nn.Parameter(unit, requires_grad=grad))

    def _unit(self, i: int, key: str) -> nn.Parameter:
        param = self._parameters[f"unit{i}_{key}"]
        assert param is not None
        return param

    def unit_params(self, i: int) -> list[nn.Parameter]:
        """The parameters of output unit ``i``: its weight row, then its bias."""
        i = check_int("i", i, minimum=0)
        if i >= self.out_features:
            _reject("i", f"an output unit < {self.out_features}", i)
        return [self._unit(i, key) for key in ("weight", "bias")[: 1 + self.has_bias]]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self._unit(i, "weight") for i in range(self.out_features)])

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return torch.cat([self._unit(i, "bias") for i in range(self.out_features)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same values, dtype, device and ``requires_grad``."""
        first = self._unit(0, "weight")
        linear = nn.utils.skip_init(
            nn.Linear,
            self.in_features,
            self.out_features,
            self.has_bias,
            device=first.device,
            dtype=first.dtype,
        )
        with torch.no_grad():
            for key, full in (("weight", self.weight), ("bias", self.bias)):
                if full is None:
                    continue
                flags = {self._unit(i, key).requires_grad for i in range(self.out_features)}
                if len(flags) != 1:
                    raise ValueError(
                        f"cannot merge output units whose {key}s differ in requires_grad"
                    )
                target = getattr(linear, key)
                target.copy_(full)
                target.requires_grad_(flags.pop())
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.has_bias}, one Parameter per output unit"
        )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        with torch.set_grad_enabled(keep_vars and torch.is_grad_enabled()):
            for key, full in (("weight", self.weight), ("bias", self.bias)):
                if full is not None:
                    destination[prefix + key] = full if keep_vars else full.detach()

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # nn.Linear's keys and shapes; the errors read like torch's own.
        for hook in self._load_state_dict_pre_hooks.values():
            hook(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        expected: dict[str, tuple[int, ...]] = {"weight": (self.out_features, self.in_features)}
        if self.has_bias:
            expected["bias"] = (self.out_features,)
        for key, shape in expected.items():
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(
                    f'While copying the parameter named "{full}", expected torch.Tensor from '
                    f"checkpoint but received {type(value)}"
                )
            elif tuple(value.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {full}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {torch.Size(shape)}."
                )
            else:
                with torch.no_grad():
                    for i in range(self.out_features):
                        param = self._unit(i, key)
                        if assign:
                            new = nn.Parameter(value[i : i + 1], requires_grad=param.requires_grad)
                            self._parameters[f"unit{i}_{key}"] = new
                        else:
                            param.copy_(value[i : i + 1])
        if strict:
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in expected
            )


def _paths(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def _replace(model: nn.Module, paths: Sequence[str], new: nn.Module) -> None:
    for path in paths:
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def split_output_units(model: nn.Module, module: ModuleRef) -> UnitSplitLinear:
    """Replace the ``nn.Linear`` ``module`` (name or object) by a :class:`UnitSplitLinear`.

    The model computes exactly the same function afterwards and its ``state_dict`` keeps
    the same keys and shapes, so checkpoints saved before load into it and checkpoints saved
    after load into the unsplit model. Do this before building the optimizer (the
    parameters are new tensors), then group with :func:`by_output_unit`. Every place the
    layer is registered is replaced; hooks registered on the old layer are not carried
    over. No random numbers are drawn. Returns the new module.

    Raises ``TypeError`` if ``module`` is not an ``nn.Linear`` (or is a subclass with its
    own ``forward``), ``ValueError`` if it is the model itself or if its weight or bias is
    also registered elsewhere (tied weights cannot be split).
    """
    _check_model(model)
    name, linear = _resolve_module(model, module, "module")
    if name == "":
        _reject("module", "a submodule of the model, not the model itself", module)
    if not isinstance(linear, nn.Linear) or type(linear).forward is not nn.Linear.forward:
        _reject("module", "an nn.Linear", f"{name} ({type(linear).__name__})", TypeError)
    paths = _paths(model, linear)
    own = {id(p) for p in linear.parameters()}
    shared = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if id(p) in own and n.rpartition(".")[0] not in paths
    ]
    if shared:
        raise ValueError(
            f"cannot split {name!r}: its parameters are also registered as {_listing(shared)} "
            "(tied weights)"
        )
    new = UnitSplitLinear(linear.weight, linear.bias)
    _replace(model, paths, new)
    return new


def merge_output_units(model: nn.Module, module: ModuleRef) -> nn.Linear:
    """Undo :func:`split_output_units`: put a plain ``nn.Linear`` back and return it."""
    _check_model(model)
    name, split = _resolve_module(model, module, "module")
    if not isinstance(split, UnitSplitLinear) or name == "":
        _reject(
            "module", "a UnitSplitLinear submodule", f"{name} ({type(split).__name__})", TypeError
        )
    linear = split.to_linear()
    _replace(model, _paths(model, split), linear)
    return linear


def by_output_unit(model: nn.Module, module: ModuleRef, *, rest: str = "rest") -> ParamGroups:
    """One group per output unit of a split layer (``"head[0]"``, ...), then ``rest``.

    For many independent outputs that share a trunk, such as CelebA's 40 binary attributes
    on one ``512 -> 40`` head: each unit's weight row and bias get their own rate. Split the
    layer first::

        split_output_units(model, "head")
        groups = by_output_unit(model, "head", rest="trunk")

    Every unit is one more group to probe: with 40 units, use a larger ``update_every``.
    Units without trainable parameters are dropped; ``rest`` (everything else, dropped when
    empty) comes last.
    """
    _check_model(model, trainable=True)
    name, split = _resolve_module(model, module, "module")
    if not isinstance(split, UnitSplitLinear):
        if isinstance(split, nn.Linear):
            raise TypeError(
                f"module must be a UnitSplitLinear, got the nn.Linear {name!r}: call "
                f"split_output_units(model, {name!r}) first, before building the optimizer"
            )
        _reject("module", "a UnitSplitLinear", f"{name} ({type(split).__name__})", TypeError)
    id_names = _id_names(model)
    named = [
        (f"{name}[{i}]", [id_names[id(p)] for p in split.unit_params(i) if id(p) in id_names])
        for i in range(split.out_features)
    ]
    if not any(names for _, names in named):
        _reject("module", "a layer with trainable parameters", name)
    return _with_rest(model, named, rest, optional=[g for g, _ in named])


# -- summaries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSummary:
    """One param group: name, number of tensors and of elements, and parameter names.

    ``param_names`` is empty unless a model is given to :func:`summarize_groups`; a tensor
    that is not a parameter of that model shows as ``"?"``.
    """

    name: str
    tensors: int
    elements: int
    param_names: tuple[str, ...] = ()


def _as_groups(groups: Any) -> list[Mapping[str, Any]]:
    if isinstance(groups, torch.optim.Optimizer):
        return list(groups.param_groups)
    if isinstance(groups, (Mapping, torch.Tensor)) or not isinstance(groups, Iterable):
        _reject("groups", "a sequence of param-group dicts or an optimizer", groups, TypeError)
    out = list(groups)
    for i, g in enumerate(out):
        if not isinstance(g, Mapping) or "params" not in g:
            _reject(f"groups[{i}]", "a dict with 'params'", g, TypeError)
    return out


def _group_params(group: Mapping[str, Any], i: int) -> list[torch.Tensor]:
    params = group["params"]
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    for p in items:
        if not isinstance(p, torch.Tensor):
            _reject(f"groups[{i}]['params']", "tensors", type(p).__name__, TypeError)
    return items


def summarize_groups(
    groups: Iterable[Mapping[str, Any]] | torch.optim.Optimizer, model: nn.Module | None = None
) -> list[GroupSummary]:
    """A :class:`GroupSummary` per group, for a list of param groups or an optimizer."""
    if model is not None:
        _check_model(model)
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    out = []
    for i, group in enumerate(_as_groups(groups)):
        params = _group_params(group, i)
        out.append(
            GroupSummary(
                name=str(group.get("name", f"group{i}")),
                tensors=len(params),
                elements=sum(p.numel() for p in params),
                param_names=tuple(names.get(id(p), "?") for p in params)
                if model is not None
                else (),
            )
        )
    return out


def format_groups(
    groups: Iterable[Mapping[str, Any]] | torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    max_names: int = 3,
) -> str:
    """A table of a grouping: tensors and elements per group, and the total.

    With ``model``, also the first ``max_names`` parameter names of each group, a line for
    the frozen parameters (left out) and, if any, one for trainable parameters in no group::

        group              tensors  elements  parameters
        head                     2        99  head.weight, head.bias
        rest                     6     1,234  pos, embed.weight, ... (+4)
        total                    8     1,333
        frozen (left out)        0         0
    """
    max_names = check_int("max_names", max_names, minimum=0)
    groups = _as_groups(groups)
    summary = summarize_groups(groups, model)

    def names(items: Sequence[str]) -> str:
        shown = list(items[:max_names]) + (
            [f"... (+{len(items) - max_names})"] if len(items) > max_names else []
        )
        return ", ".join(shown)

    rows = [(s.name, s.tensors, s.elements, names(s.param_names)) for s in summary]
    rows.append(("total", sum(s.tensors for s in summary), sum(s.elements for s in summary), ""))
    if model is not None:
        grouped = {id(p) for i, g in enumerate(groups) for p in _group_params(g, i)}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        rows.append(("frozen (left out)", len(frozen), sum(p.numel() for p in frozen), ""))
        loose = [(n, p) for n, p in _trainable(model).items() if id(p) not in grouped]
        if loose:
            count = sum(p.numel() for _, p in loose)
            rows.append(("trainable, in no group", len(loose), count, names([n for n, _ in loose])))
    table = [("group", "tensors", "elements", "parameters")] + [
        (name, str(t), f"{e:,}", shown) for name, t, e, shown in rows
    ]
    width = [max(len(r[c]) for r in table) for c in range(3)]
    lines = []
    for r in table:
        cells = [r[0].ljust(width[0]), r[1].rjust(width[1]), r[2].rjust(width[2])]
        lines.append("  ".join(cells + ([r[3]] if model is not None else [])).rstrip())
    return "\n".join(lines)
