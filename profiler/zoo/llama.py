"""Llama-style decoder (RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention), laid out for autopar.

Top-level pipeline units: `embed`, each of `blocks`, `head` (final RMSNorm and an untied vocabulary projection),
each taking one tensor and returning one. Projections are separate bias-free Linears (`q_proj`, `k_proj`, `v_proj`,
`o_proj`; `gate_proj`, `up_proj`, `down_proj`) so tensor parallelism splits whole (KV) heads; the attention code
infers the local head count from the projection widths, so it runs unchanged on a shard.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from profiler.zoo.layers import InitByName


class LlamaConfig(BaseModel):
    """Size of a Llama-style model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(default=32000, ge=1, description="Vocabulary size.")
    seq_len: int = Field(default=4096, ge=1, description="Tokens per training sample.")
    num_layers: int = Field(default=32, ge=1, description="Transformer blocks.")
    hidden: int = Field(default=4096, ge=1, description="Model width.")
    heads: int = Field(default=32, ge=1, description="Query heads; must divide hidden.")
    kv_heads: int | None = Field(default=None, ge=1, description="Key/value heads (GQA); None means = heads.")
    ffn_hidden: int = Field(default=11008, ge=1, description="SwiGLU inner width.")
    rope_theta: float = Field(default=10000.0, gt=0, description="Rotary embedding base.")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon.")

    @model_validator(mode="after")
    def _check_heads(self) -> LlamaConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.num_kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.num_kv_heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError("the head dimension hidden / heads must be even for rotary embeddings")
        return self

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads actually used."""
        return self.kv_heads or self.heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        # Under TP both head counts shrink by the same factor, so the repeat factor is fixed by the config.
        self.n_rep = cfg.heads // cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        pos = torch.arange(s, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.n_rep > 1:
            k = k[:, :, None].expand(-1, -1, self.n_rep, -1, -1).flatten(1, 2)
            v = v[:, :, None].expand(-1, -1, self.n_rep, -1, -1).flatten(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaEmbedding(nn.Module):
    """Token embeddings (positions are rotary, inside attention)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids)


class LlamaHead(nn.Module):
    """Final RMSNorm and the (untied) vocabulary projection."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class Llama(InitByName):
    """embed -> blocks -> head; returns logits of shape (batch, seq, vocab)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = LlamaEmbedding(cfg)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.head = LlamaHead(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill one whole parameter or buffer, chosen by its name: N(0, 0.02) weights, residual projections scaled
        by 1/sqrt(2 * layers), RMSNorm weights 1, rotary frequencies from the config. The executor calls this per
        tensor with a name-seeded generator, so every sharded layout starts from the same values."""
        cfg = self.config
        if name.endswith("inv_freq"):
            head_dim = cfg.hidden // cfg.heads
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            tensor.copy_(1.0 / cfg.rope_theta**exponent)
        elif name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(tensor, 0.0, 0.02 / math.sqrt(2 * cfg.num_layers), generator=generator)
        else:
            nn.init.normal_(tensor, 0.0, 0.02, generator=generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)
