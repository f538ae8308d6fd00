"""Pieces the zoo's model families share: name-seeded initialisation and multi-head self-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InitByName(nn.Module):
    """A model whose every parameter and buffer is filled by `init_parameter(name, tensor, generator)`.

    The executor materialises a model part by part and calls `init_parameter` per tensor with a generator seeded by
    the tensor's name, so any parallel layout starts from the weights a single process would build.
    """

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill one whole tensor, chosen by its name (each family defines its scheme)."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer not on the meta device (see `init_parameter`)."""
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if t.device.type != "meta":
                self.init_parameter(name, t)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (colwise q/k/v, rowwise o under TP).

    The head count is inferred from the projection width, so the same code runs on a tensor-parallel shard of heads.
    """

    def __init__(self, hidden: int, heads: int, dropout: float, *, causal: bool) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))
