"""Small models used by the experiments: NAM, mixture of experts, LoRA linear, CNN, transformer."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "MLP",
    "NAM",
    "LoRALinear",
    "MixtureOfExperts",
    "MultiHead",
    "SmallCNN",
    "TokenTransformer",
]


class MLP(nn.Sequential):
    """``sizes[0] -> ... -> sizes[-1]`` with an activation between linear layers."""

    def __init__(self, sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> None:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)


class NAM(nn.Module):
    """Neural additive model: ``y = bias + sum_j f_j(x_j)``, one small MLP per feature."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.features = nn.ModuleList(MLP([1, hidden, hidden, 1]) for _ in range(n_features))
        self.bias = nn.Parameter(torch.zeros(1))

    def shape_functions(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, n_features)``: each feature's learned contribution."""
        return torch.cat([f(x[:, j : j + 1]) for j, f in enumerate(self.features)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shape_functions(x).sum(dim=1, keepdim=True) + self.bias


class MixtureOfExperts(nn.Module):
    """A softmax gate (two layers) over ``n_experts`` MLP experts (appendix B of the paper)."""

    def __init__(self, d_in: int, d_out: int, n_experts: int = 6, hidden: int = 64) -> None:
        super().__init__()
        self.gate = MLP([d_in, hidden, n_experts])
        self.experts = nn.ModuleList(MLP([d_in, hidden, d_out]) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(x), dim=-1)
        outs = torch.stack([e(x) for e in self.experts], dim=-1)
        return (outs * weights.unsqueeze(-2)).sum(dim=-1)


class MultiHead(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self, d_in: int, n_tasks: int, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = MLP([d_in, hidden, hidden])
        self.act = nn.ReLU()
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.trunk(x))
        return torch.cat([head(h) for head in self.heads], dim=1)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B A`` (B starts at zero)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 1.0) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(
            torch.randn(rank, base.in_features) / math.sqrt(base.in_features)
        )
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight (for code that reads ``.weight``, like torch's fused encoder path)."""
        return self.base.weight + self.scale * self.lora_B @ self.lora_A

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU blocks, global average pooling and a linear head.

    ``conv_bias=False`` leaves out the convolutions' biases, which the BatchNorm right after
    each one cancels in training mode (as torchvision's ResNets do): the training loss does
    not depend on them, so an Adam-type optimizer moves them by its rate on gradient noise
    alone, and the running statistics that evaluation uses fall behind them."""

    def __init__(self, n_classes: int, channels: int = 16, *, conv_bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TokenTransformer(nn.Module):
    """Embedding, a pre-norm transformer encoder, a final norm and a linear head on the mean
    over positions (``pool=True``) or at every position."""

    def __init__(
        self,
        vocab: int,
        n_classes: int,
        d_model: int = 32,
        heads: int = 2,
        layers: int = 1,
        max_len: int = 64,
        pool: bool = True,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=2 * d_model,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.norm(self.encoder(h))
        return self.head(h.mean(dim=1) if self.pool else h)
