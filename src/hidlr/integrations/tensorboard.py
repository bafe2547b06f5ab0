"""Hi-DLR's diagnostics in TensorBoard.

:class:`TensorBoardLogger` writes, for every probe step not yet written and every group,
``hidlr/<group>/lr`` (the adapted rate after the step), ``hidlr/<group>/r2`` (fit quality),
``hidlr/<group>/accepted`` (1 if the fit was accepted), ``hidlr/<group>/proposed``,
``hidlr/<group>/influence_share``, plus ``hidlr/coupling`` and ``hidlr/loss`` (the fitted
loss at the probe step), at global step = optimizer steps completed (``record.step + 1``,
the Trainer's ``global_step`` convention). Non-finite values (a group that
was not probed has ``r2`` NaN) are skipped.

Use it with any ``SummaryWriter``-like object (``add_scalar(tag, value, global_step)``):

```python
from torch.utils.tensorboard import SummaryWriter
from hidlr.integrations.tensorboard import TensorBoardLogger

tb = TensorBoardLogger(SummaryWriter("runs/x"), opt)
for ...:
    opt.step(closure)
    tb.update()      # writes the probe steps since the last call
```

:func:`trainer_callback` does the same from a ``transformers`` Trainer (a
``TrainerCallback``; imports ``transformers`` only when called).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from hidlr.history import ProbeRecord
from hidlr.integrations import find_hidlr, group_names

__all__ = ["ScalarWriter", "TensorBoardLogger", "record_scalars", "trainer_callback"]


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...


def record_scalars(record: ProbeRecord, names: list[str]) -> dict[str, float]:
    """The scalars :class:`TensorBoardLogger` writes for one probe record (finite ones only)."""
    out = {"hidlr/loss": record.loss, "hidlr/coupling": record.coupling}
    for g in record.groups:
        name = names[g.group] if g.group < len(names) else f"group{g.group}"
        out[f"hidlr/{name}/lr"] = g.lr_after
        out[f"hidlr/{name}/r2"] = g.r2
        out[f"hidlr/{name}/accepted"] = float(g.accepted)
        out[f"hidlr/{name}/proposed"] = g.proposed
        out[f"hidlr/{name}/influence_share"] = g.share
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


class TensorBoardLogger:
    """Writes each new probe record of ``optimizer`` (a :class:`hidlr.HiDLR` or a wrapper
    around one) to ``writer`` on :meth:`update`.

    ``names``: one name per param group (default: the groups' ``"name"`` entries, else
    ``group<i>``). Records are identified by their step, so a record is written once even
    if ``update`` is called often; records dropped from a full history before an ``update``
    are lost.
    """

    def __init__(self, writer: ScalarWriter, optimizer: Any, names: list[str] | None = None):
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar(), got {type(writer).__name__}")
        self.writer = writer
        self.optimizer = find_hidlr(optimizer)
        self.names = list(names) if names is not None else group_names(self.optimizer)
        if len(self.names) != len(self.optimizer.param_groups):
            raise ValueError(
                f"names must have one entry per param group ({len(self.optimizer.param_groups)}), "
                f"got {len(self.names)}"
            )
        self.last_step = -1

    def update(self) -> int:
        """Write the probe records not written yet; returns how many were written."""
        written = 0
        for record in self.optimizer.history:
            if record.step <= self.last_step:
                continue
            for tag, value in record_scalars(record, self.names).items():
                self.writer.add_scalar(tag, value, record.step + 1)
            self.last_step = record.step
            written += 1
        return written

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()


def trainer_callback(writer: ScalarWriter) -> Any:
    """A ``transformers.TrainerCallback`` that writes Hi-DLR's probe records to ``writer``
    after every optimizer step of a :class:`hidlr.integrations.transformers.HiDLRTrainer`
    (or any Trainer whose optimizer wraps a :class:`hidlr.HiDLR`)."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.logger: TensorBoardLogger | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            optimizer = kwargs.get("optimizer")
            if optimizer is None:
                return
            if self.logger is None:
                self.logger = TensorBoardLogger(writer, optimizer)
            self.logger.update()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.logger is not None:
                self.logger.flush()

    return _Callback()
