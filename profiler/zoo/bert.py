"""BERT encoder (post-LayerNorm, learned positions, GELU MLP) with the pooler, laid out for autopar.

Top-level pipeline units: `embed` (ids -> hidden states), each of `blocks`, and `head` (the pooler: hidden states ->
one pooled vector per sample). With the pooler included the parameter count equals BERT's published count exactly
(109,482,240 for base). Every sample uses token type 0 and no padding mask, so each unit takes one tensor. The
training loss is a regression of the pooled vector on a target vector: it adds no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from profiler.zoo.layers import InitByName, SelfAttention


class BertConfig(BaseModel):
    """Size of a BERT model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(default=30522, ge=1, description="Vocabulary size (uncased WordPiece).")
    max_positions: int = Field(default=512, ge=1, description="Learned position embeddings.")
    type_vocab_size: int = Field(default=2, ge=1, description="Token-type (segment) embeddings.")
    seq_len: int = Field(default=512, ge=1, description="Tokens per training sample.")
    num_layers: int = Field(default=12, ge=1, description="Encoder blocks.")
    hidden: int = Field(default=768, ge=1, description="Model width.")
    heads: int = Field(default=12, ge=1, description="Attention heads; must divide hidden.")
    mlp_ratio: int = Field(default=4, ge=1, description="MLP width over model width.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout probability (0 keeps runs deterministic).")
    layer_norm_eps: float = Field(default=1e-12, gt=0, description="LayerNorm epsilon.")


class BertMLP(nn.Module):
    """Two Linears with exact (erf) GELU between."""

    def __init__(self, hidden: int, ratio: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden, ratio * hidden)
        self.fc_out = nn.Linear(ratio * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class BertBlock(nn.Module):
    """Post-LayerNorm block: x = ln(x + attn(x)), then x = ln(x + mlp(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.hidden, cfg.heads, cfg.dropout, causal=False)
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp = BertMLP(cfg.hidden, cfg.mlp_ratio)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class BertEmbedding(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (every token has type 0)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.ln(self.word(ids) + self.position(pos) + self.token_type.weight[0]))


class BertPooler(nn.Module):
    """tanh(Linear(first token's hidden state)): one vector per sample."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class Bert(InitByName):
    """embed -> blocks -> head (pooler); returns pooled vectors of shape (batch, hidden)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.seq_len > cfg.max_positions:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds max_positions {cfg.max_positions}")
        self.config = cfg
        self.embed = BertEmbedding(cfg)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.num_layers))
        self.head = BertPooler(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill one whole parameter, chosen by its name (BERT's scheme): N(0, 0.02) weights, zero biases,
        LayerNorm weights 1. The executor calls this per tensor with a name-seeded generator."""
        if name.endswith("bias"):
            nn.init.zeros_(tensor)
        elif name.rpartition(".")[0].split(".")[-1].startswith("ln"):
            nn.init.ones_(tensor)
        else:
            nn.init.normal_(tensor, 0.0, 0.02, generator=generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def bert_batch(cfg: BertConfig, batch_size: int, gen: torch.Generator | None, device: str):
    """Random token ids and a random target vector per sample."""
    ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=gen, device=device)
    targets = torch.randn(batch_size, cfg.hidden, generator=gen, device=device)
    return (ids,), targets


def bert_loss(pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error between pooled vectors and targets."""
    return F.mse_loss(pooled.float(), targets.float())
