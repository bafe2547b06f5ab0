"""hidlr: Hessian-informed differential learning rates (Hi-DLR) for any PyTorch optimizer.

``HiDLR(base_optimizer)`` adapts one learning rate per param group of ``base_optimizer`` by
probing the loss along the base optimizer's own step; with one group it is GeN (Hi-ULR).
"""

from hidlr.fit import QuadraticFit, RateDecision, fit_quadratic, propose_rates
from hidlr.history import GroupProbe, ProbeRecord, history_rows, save_history
from hidlr.optimizer import HiDLR

__version__ = "0.1.0"

__all__ = [
    "GroupProbe",
    "HiDLR",
    "ProbeRecord",
    "QuadraticFit",
    "RateDecision",
    "__version__",
    "fit_quadratic",
    "history_rows",
    "propose_rates",
    "save_history",
]
