"""Integrations of Hi-DLR with third-party training stacks.

Import the submodule you need; those built on a third-party package import it on import:

* :mod:`hidlr.integrations.transformers`: :class:`~hidlr.integrations.transformers.HiDLRTrainer`,
  a ``transformers.Trainer`` that trains with Hi-DLR (needs ``transformers`` and ``accelerate``).
* :mod:`hidlr.integrations.lightning`: :class:`~hidlr.integrations.lightning.HiDLRCallback`
  for Lightning (needs ``lightning``).
* :mod:`hidlr.integrations.distributed`:
  :class:`~hidlr.integrations.distributed.DistributedHiDLR` for DDP and FSDP2 (torch only).
* :mod:`hidlr.integrations.tensorboard`: write Hi-DLR's diagnostics (rates, fit quality,
  acceptance per group) to anything with ``add_scalar``, such as a TensorBoard
  ``SummaryWriter`` (no import of its own).

:func:`find_hidlr` (here, no third-party import) finds the :class:`hidlr.HiDLR` inside the
wrappers that ``accelerate`` and others put around an optimizer.
"""

from __future__ import annotations

from typing import Any

from hidlr.optimizer import HiDLR

__all__ = ["find_hidlr", "group_names"]


def find_hidlr(optimizer: Any) -> HiDLR:
    """The :class:`hidlr.HiDLR` that ``optimizer`` is or wraps.

    Follows ``.optimizer`` attributes (``accelerate``'s ``AcceleratedOptimizer``, SageMaker's
    and DeepSpeed-style wrappers) until a ``HiDLR`` is found; ``TypeError`` if there is none.
    """
    current, seen = optimizer, set()
    while current is not None and id(current) not in seen:
        if isinstance(current, HiDLR):
            return current
        seen.add(id(current))
        current = getattr(current, "optimizer", None)
    raise TypeError(f"no HiDLR optimizer found in {type(optimizer).__name__}")


def group_names(optimizer: Any) -> list[str]:
    """One distinct name per param group: its ``"name"`` entry (as the ``hidlr`` grouping
    helpers set it) when present and unique, else ``"group<i>"`` (with ``_<n>`` added while
    another group already has that name): logs keyed by these names never merge groups."""
    groups = find_hidlr(optimizer).param_groups
    names = [g.get("name") for g in groups]
    given = {n for n in names if isinstance(n, str) and n and names.count(n) == 1}
    out: list[str] = []
    for i, name in enumerate(names):
        if name in given:
            out.append(str(name))
            continue
        fallback, n = f"group{i}", 1
        while fallback in given or fallback in out:
            fallback, n = f"group{i}_{n}", n + 1
        out.append(fallback)
    return out
