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

from hidlr.groups._common import check_groups
from hidlr.groups.builders import by_depth, by_lora, by_patterns, by_role, by_subnetwork, find_head
from hidlr.groups.summary import GroupSummary, format_groups, summarize_groups
from hidlr.groups.units import (
    UnitSplitLinear,
    by_output_unit,
    merge_output_units,
    split_output_units,
)

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
