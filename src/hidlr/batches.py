"""Pairing each training batch with the batch its probes should use."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

import torch

from hidlr._validation import check_float

__all__ = ["probe_subset", "with_probe_batch"]

T = TypeVar("T")


def with_probe_batch(batches: Iterable[T], *, fraction: float = 1.0) -> Iterator[tuple[T, T]]:
    """Yield ``(batch, probe_batch)`` where ``probe_batch`` is the next training batch.

    Hi-DLR's probes measure how far to step along the gradient of ``batch``. Measured on
    ``batch`` itself the answer is too long (it fits that batch's noise); measured on the
    next batch it is an unbiased estimate for fresh data. The next batch is then trained on
    as usual, so nothing is held out. The last batch is paired with itself. Holds one batch
    in memory ahead of the loop.

    ``fraction < 1`` makes the probe batch the first ``fraction`` of the next batch
    (:func:`probe_subset`): each probe's forward pass costs about that fraction of a full
    one, at the price of noisier fits (``hidlr bench overhead`` measures both).
    """
    return _pairs(batches, check_float("fraction", fraction, low=0.0, high=1.0, low_open=True))


def _pairs(batches: Iterable[T], fraction: float) -> Iterator[tuple[T, T]]:
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, _own(probe_subset(following, fraction), following)
        current = following
    yield current, _own(probe_subset(current, fraction), current)


def _own(probe: T, batch: T) -> T:
    """The probe batch as a container of its own (a shallow copy where it is the training
    batch itself): a closure that pops a key from it leaves the training batch whole."""
    if probe is batch and isinstance(batch, (MutableMapping, list)):
        return copy.copy(batch)
    return probe


def probe_subset(batch: T, fraction: float) -> T:
    """The first ``ceil(fraction * n)`` examples of ``batch`` (at least one): every tensor
    with a batch dimension is sliced along dim 0, inside tuples, lists and mappings (a
    ``transformers`` ``BatchEncoding`` included); anything else is passed through. All the
    tensors of a batch must agree on ``n``."""
    fraction = check_float("fraction", fraction, low=0.0, high=1.0, low_open=True)
    if fraction == 1.0:
        return batch
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if len(sizes) > 1:
        raise ValueError(
            f"probe_subset needs one batch size across the batch's tensors, got sizes {sorted(sizes)}"
        )
    if not sizes:
        return batch
    # (rounded first: 0.07 * 100 is 7.000000000000001 in floats, and keeps 7)
    keep = max(1, math.ceil(round(fraction * sizes.pop(), 9)))
    return _slice(batch, keep)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def _slice(batch: Any, keep: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:keep] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        items = {k: _slice(v, keep) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_slice(v, keep) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, keep) for v in batch)
    return batch
