"""hidlr: Hessian-informed differential learning rates (Hi-DLR) for any PyTorch optimizer.

``HiDLR(base_optimizer)`` adapts one learning rate per param group of ``base_optimizer`` by
probing the loss along the base optimizer's own step; with one group it is GeN (Hi-ULR).
"""

from hidlr.batches import probe_subset, with_probe_batch
from hidlr.fit import QuadraticFit, RateDecision, fit_quadratic, propose_rates
from hidlr.groups import (
    GroupSummary,
    UnitSplitLinear,
    by_depth,
    by_lora,
    by_output_unit,
    by_patterns,
    by_role,
    by_subnetwork,
    check_groups,
    find_head,
    format_groups,
    merge_output_units,
    split_output_units,
    summarize_groups,
)
from hidlr.history import GroupProbe, ProbeRecord, history_rows, save_history
from hidlr.optimizer import HiDLR

__version__ = "0.1.0"

__all__ = [
    "GroupProbe",
    "GroupSummary",
    "HiDLR",
    "ProbeRecord",
    "QuadraticFit",
    "RateDecision",
    "UnitSplitLinear",
    "__version__",
    "by_depth",
    "by_lora",
    "by_output_unit",
    "by_patterns",
    "by_role",
    "by_subnetwork",
    "check_groups",
    "find_head",
    "fit_quadratic",
    "format_groups",
    "history_rows",
    "merge_output_units",
    "probe_subset",
    "propose_rates",
    "save_history",
    "split_output_units",
    "summarize_groups",
    "with_probe_batch",
]
