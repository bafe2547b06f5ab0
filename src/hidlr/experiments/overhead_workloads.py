"""The overhead benchmark's workloads and arithmetic: the three models at their sizes, how K
groups are cut from their parameters, the base optimizers, and the two speed bounds (the
paper's and this implementation's limit); see :mod:`hidlr.experiments.overhead`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from hidlr.experiments.models import MLP, TokenTransformer
from hidlr.optimizer import HiDLR

__all__ = [
    "BASES",
    "K_VALUES",
    "MODELS",
    "PHI_VALUES",
    "POLICIES",
    "BNConvNet",
    "Workload",
    "forwards_per_probe_step",
    "implementation_limit",
    "make_base",
    "make_workload",
    "paper_bound",
    "snapshot_bytes",
    "split_groups",
    "trainable_bytes",
]


MODELS = ("mlp", "transformer", "cnn")
BASES = ("sgd", "adamw")
POLICIES = ("paper", "robust")
K_VALUES = (1, 2, 4, 8, 40)
PHI_VALUES = (1, 2, 4, 8, 16)
TABLE4_PHIS: tuple[int | None, ...] = (None, 8, 4, 2, 1)  # None: never probe (Phi = inf)
TABLE4_K = 2
PROBES_PER_GROUP = 4  # HiDLR's default probe_multipliers (-2, -1, 1, 2)

_MB = 2.0**20


# -- theory ----------------------------------------------------------------------------------


def paper_bound(k: int, phi: float) -> float:
    """The paper's lower bound on the relative speed: ``1 / (1 + 4K / (3 Phi))`` (B = 2F, C = 0)."""
    return 1.0 / (1.0 + PROBES_PER_GROUP * k / (3.0 * phi))


def forwards_per_probe_step(k: int, policy: str) -> int:
    """Forward passes of one probe step: ``4K``, plus (robust policy) the loss at ``w0`` and
    the combined step's (K >= 2)."""
    robust = policy == "robust"
    return PROBES_PER_GROUP * k + robust + (robust and k >= 2)


def implementation_limit(
    base_step: float,
    forward: float,
    k: int,
    phi: float,
    policy: str,
    forwards: float | None = None,
) -> float:
    """The relative speed with nothing but the probes' forward passes added to a base step:
    ``base_step / (base_step + n_fwd / Phi * forward)``, with ``n_fwd`` the forward passes a
    probe step made (``forwards``, measured: groups whose step did not move their weights are
    not probed) or else :func:`forwards_per_probe_step`."""
    n_fwd = forwards_per_probe_step(k, policy) if forwards is None else forwards
    return base_step / (base_step + n_fwd / phi * forward)


# -- workloads -------------------------------------------------------------------------------


class BNConvNet(nn.Module):
    """``blocks`` conv3x3-BatchNorm-ReLU blocks at constant width, global pooling, a linear head
    (4 parameter tensors per block)."""

    def __init__(self, in_channels: int, channels: int, blocks: int, n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Workload:
    """A model with fixed batches; ``loss(i)`` is the cross-entropy on batch ``i``."""

    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    description: str
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def loss(self, i: int = 0, fraction: float = 1.0) -> torch.Tensor:
        x, y = self.batches[i]
        if fraction < 1.0:
            keep = max(1, math.ceil(fraction * x.shape[0]))
            x, y = x[:keep], y[:keep]
        return nn.functional.cross_entropy(self.model(x), y)

    def reset(self) -> None:
        """Back to the initial weights and buffers (in place)."""
        self.model.load_state_dict(self.initial)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def make_workload(name: str, *, size: str = "full", n_batches: int = 1, seed: int = 0) -> Workload:
    """The benchmark's model ``name`` (``mlp``, ``transformer`` or ``cnn``) with random data.

    ``size="full"``: a training step of 10-30 ms on one CPU thread; ``"tiny"``: for tests.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    tiny = size == "tiny"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n_classes = 3 if tiny else 10
    model: nn.Module
    if name == "mlp":
        width, batch = (8, 4) if tiny else (320, 128)
        model = MLP([width] * 20 + [n_classes])
        shape: tuple[int, ...] = (batch, width)
        desc = f"MLP 20 linear layers x {width}, batch {batch}"
    elif name == "transformer":
        d, heads, seq, batch, vocab = (8, 2, 4, 2, 20) if tiny else (64, 4, 32, 48, 1000)
        model = TokenTransformer(vocab, n_classes, d_model=d, heads=heads, layers=3, max_len=seq)
        shape = (batch, seq)
        desc = f"pre-norm encoder 3 layers d={d} heads={heads}, batch {batch} x {seq} tokens"
    else:
        channels, side, batch = (2, 4, 2) if tiny else (20, 16, 32)
        model = BNConvNet(3, channels, 10, n_classes)
        shape = (batch, 3, side, side)
        desc = f"10 conv-BN-ReLU blocks x {channels} ch, batch {batch} x 3x{side}x{side}"
    batches = []
    for _ in range(n_batches):
        if name == "transformer":
            x = torch.randint(0, vocab, shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen)
        batches.append((x, torch.randint(0, n_classes, (shape[0],), generator=gen)))
    model.train()
    return Workload(name, model, batches, desc)


def split_groups(params: Sequence[nn.Parameter], k: int) -> list[list[nn.Parameter]]:
    """``params`` in order, cut into ``k`` contiguous groups whose sizes (in tensors) differ by
    at most one, the larger ones first."""
    params = list(params)
    if not 1 <= k <= len(params):
        raise ValueError(f"k must be between 1 and the number of tensors {len(params)}, got {k}")
    size, extra = divmod(len(params), k)
    groups, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        groups.append(params[start:end])
        start = end
    return groups


def make_base(name: str, groups: list[list[nn.Parameter]]) -> Optimizer:
    """The base optimizer ``name`` (``sgd``: lr 1e-2; ``adamw``: lr 1e-3, weight decay 0.01)
    over ``groups``, each a param group; torch's default implementation otherwise."""
    param_groups: list[dict[str, Any]] = [{"params": g} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=1e-3, weight_decay=0.01)
    raise ValueError(f"base must be one of {BASES}, got {name!r}")


def trainable_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of one copy of ``params``."""
    return sum(p.numel() * p.element_size() for p in params)


def snapshot_bytes(optimizer: HiDLR) -> int:
    """Bytes of the copy a probe step of ``optimizer`` would take now: every parameter of a
    param group that has a gradient (a frozen group has none)."""
    return trainable_bytes(
        [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    )
