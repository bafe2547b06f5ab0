"""A grouping as a table: :func:`summarize_groups` and :func:`format_groups`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hidlr._validation import check_int
from hidlr.groups._common import (
    _as_groups,
    _check_model,
    _group_params,
    _trainable,
)


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
        frozen = [p for p in model.parameters() if not p.requires_grad and id(p) not in grouped]
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
