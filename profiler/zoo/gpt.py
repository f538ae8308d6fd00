"""GPT-2 style decoder (pre-LayerNorm, learned positions, GELU MLP), laid out for autopar.

The top-level children are the pipeline units: `embed`, each of `blocks`, `head`. Each takes one tensor and returns
one tensor, so any contiguous run of them is a pipeline stage. Attention projections are separate Linears
(`q_proj`, `k_proj`, `v_proj` colwise, `o_proj` rowwise; `fc_in` colwise, `fc_out` rowwise) so Megatron-style
tensor parallelism splits whole heads; the attention code infers the local head count from the projection width.
With the Hugging Face layout's tied output head the parameter count equals GPT-2's exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from profiler.zoo.layers import InitByName, SelfAttention


class GPTConfig(BaseModel):
    """Size of a GPT model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(default=50257, ge=1, description="Vocabulary size.")
    max_positions: int = Field(default=1024, ge=1, description="Learned position embeddings (context length).")
    seq_len: int = Field(default=1024, ge=1, description="Tokens per training sample.")
    num_layers: int = Field(default=12, ge=1, description="Transformer blocks.")
    hidden: int = Field(default=768, ge=1, description="Model width.")
    heads: int = Field(default=12, ge=1, description="Attention heads; must divide hidden.")
    mlp_ratio: int = Field(default=4, ge=1, description="MLP width over model width.")
    tie_embeddings: bool = Field(default=True, description="Share the token embedding with the output head.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout probability (0 keeps runs deterministic).")
    layer_norm_eps: float = Field(default=1e-5, gt=0)


class MLP(nn.Module):
    """Two Linears with GELU between."""

    def __init__(self, hidden: int, ratio: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden, ratio * hidden)
        self.fc_out = nn.Linear(ratio * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.hidden, cfg.heads, cfg.dropout, causal=True)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden, cfg.mlp_ratio)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPTEmbedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(pos))


class GPTHead(nn.Module):
    """Final LayerNorm and the vocabulary projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(InitByName):
    """embed -> blocks -> head; returns logits of shape (batch, seq, vocab)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.seq_len > cfg.max_positions:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds max_positions {cfg.max_positions}")
        self.config = cfg
        self.embed = GPTEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = GPTHead(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill one whole parameter, chosen by its name: N(0, 0.02), residual projections scaled by
        1/sqrt(2 * layers), LayerNorm weights 1, biases 0. The executor calls this per parameter with a generator
        seeded from the name, so every sharded layout starts from the same weights as a single-process run."""
        std = 0.02
        if name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif ".ln_" in name or name.startswith("head.ln_f"):
            nn.init.ones_(tensor)
        elif name.endswith(("o_proj.weight", "fc_out.weight")):
            nn.init.normal_(tensor, 0.0, std / math.sqrt(2 * self.config.num_layers), generator=generator)
        else:
            nn.init.normal_(tensor, 0.0, std, generator=generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
