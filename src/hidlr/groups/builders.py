"""Groupings by role, depth, sub-network, LoRA factor and name pattern."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hidlr.groups._common import (
    _LORA_A,
    _LORA_B,
    _LORA_MAGNITUDE,
    _NORM_NAME,
    _NORM_TYPES,
    ROLES,
    ModuleRef,
    ParamGroups,
    Pattern,
    _check_model,
    _children_holding,
    _finalize,
    _id_names,
    _is_lora_name,
    _join,
    _listing,
    _names_of,
    _reject,
    _resolve_module,
    _trainable,
    _under,
    _with_rest,
)
from hidlr.groups.units import UnitSplitLinear


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
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights: every name
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
        if not isinstance(blocks, (str, nn.Module, Iterable)):
            _reject(
                "blocks",
                "a container name, a submodule, or a non-empty sequence of them",
                blocks,
                TypeError,
            )
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
    named, seen = [], set()
    for n, c in kids:  # a parameter shared by several children counts once, under the first
        names = [x for x in _names_of(c, id_names) if x not in seen]
        seen.update(names)
        named.append((_join(cname, n), names))
    return _with_rest(model, named, rest)


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
