"""Pairing each training batch with the batch its probes should use."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["with_probe_batch"]

T = TypeVar("T")


def with_probe_batch(batches: Iterable[T]) -> Iterator[tuple[T, T]]:
    """Yield ``(batch, probe_batch)`` where ``probe_batch`` is the next training batch.

    Hi-DLR's probes measure how far to step along the gradient of ``batch``. Measured on
    ``batch`` itself the answer is too long (it fits that batch's noise); measured on the
    next batch it is an unbiased estimate for fresh data. The next batch is then trained on
    as usual, so nothing is held out. The last batch is paired with itself. Holds one batch
    in memory ahead of the loop.
    """
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, following
        current = following
    yield current, current
