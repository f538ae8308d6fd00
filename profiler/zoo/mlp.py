"""A plain MLP classifier of residual blocks, laid out for autopar.

Top-level pipeline units: `embed` (Linear from the input features to the width), each of `blocks`
(x + fc_out(gelu(fc_in(norm(x))))), and `head` (LayerNorm and the class projection). `fc_in` / `fc_out` form a
colwise / rowwise pair, so tensor parallelism applies to every block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from profiler.zoo.layers import InitByName


class MLPConfig(BaseModel):
    """Size of an MLP classifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_features: int = Field(default=1024, ge=1, description="Input features per sample.")
    hidden: int = Field(default=1024, ge=1, description="Width of the residual stream.")
    mlp_ratio: int = Field(default=4, ge=1, description="Inner width of a block over the width.")
    num_layers: int = Field(default=8, ge=1, description="Residual blocks.")
    num_classes: int = Field(default=1000, ge=2, description="Output classes.")


class MLPBlock(nn.Module):
    """x + fc_out(gelu(fc_in(norm(x))))."""

    def __init__(self, hidden: int, ratio: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc_in = nn.Linear(hidden, ratio * hidden)
        self.fc_out = nn.Linear(ratio * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc_out(F.gelu(self.fc_in(self.norm(x))))


class MLPHead(nn.Module):
    """LayerNorm and the class projection."""

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class MLP(InitByName):
    """embed -> blocks -> head; returns class logits of shape (batch, num_classes)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Linear(cfg.in_features, cfg.hidden)
        self.blocks = nn.ModuleList(MLPBlock(cfg.hidden, cfg.mlp_ratio) for _ in range(cfg.num_layers))
        self.head = MLPHead(cfg.hidden, cfg.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill one whole parameter by its name: N(0, 0.02) weights (fc_out scaled by 1/sqrt(2 * layers)), zero
        biases, LayerNorm weights 1. The executor calls this per tensor with a name-seeded generator."""
        if name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name.endswith("fc_out.weight"):
            nn.init.normal_(tensor, 0.0, 0.02 / math.sqrt(2 * self.config.num_layers), generator=generator)
        else:
            nn.init.normal_(tensor, 0.0, 0.02, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def mlp_batch(cfg: MLPConfig, batch_size: int, gen: torch.Generator | None, device: str):
    """Random feature vectors and class labels."""
    x = torch.randn(batch_size, cfg.in_features, generator=gen, device=device)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen, device=device)
    return (x,), y


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch."""
    return F.cross_entropy(logits.float(), targets)
