"""Baseline methods for comparing with Hi-DLR: one registry keyed by name, and grid search.

Methods: uniform rates with a torch schedule ('constant', 'linear', 'cosine'), user-given
differential rates ('manual'), LoRA+ ('loraplus', peft), Prodigy, D-Adaptation, DoG / L-DoG
with weight averaging, Schedule-Free ('schedulefree'), and this package's GeN ('gen'), Hi-DLR
('hidlr'), SAGE ('sage') and Hi-DLR over SAGE ('hidlr_sage'). Third-party ones need
``pip install 'hidlr[baselines]'``.
"""

from hidlr.baselines.core import (
    EXTRA_HINT,
    SCHEDULES,
    Built,
    MethodConfig,
    as_param_groups,
    lr_multiplier,
    require,
)
from hidlr.baselines.grid import (
    CALIFORNIA_ULR_GRID,
    LORA_A_GRID,
    LORA_B_GRID,
    NAM_ULR_GRID,
    PAPER_GRIDS,
    ULR_GRID_2D,
    GridSearchResult,
    grid_search,
    log_grid,
    mantissa_grid,
    per_group_grid,
)
from hidlr.baselines.registry import METHODS, available_methods, build

__all__ = [
    "CALIFORNIA_ULR_GRID",
    "EXTRA_HINT",
    "LORA_A_GRID",
    "LORA_B_GRID",
    "METHODS",
    "NAM_ULR_GRID",
    "PAPER_GRIDS",
    "SCHEDULES",
    "ULR_GRID_2D",
    "Built",
    "GridSearchResult",
    "MethodConfig",
    "as_param_groups",
    "available_methods",
    "build",
    "grid_search",
    "log_grid",
    "lr_multiplier",
    "mantissa_grid",
    "per_group_grid",
    "require",
]
