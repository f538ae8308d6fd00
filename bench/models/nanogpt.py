"""A GPT written the way most people write one (nanoGPT / GPT-2 style), for the accuracy benches.

One fused `c_attn` Linear split into q, k, v with the full width hard-coded, heads by `view(B, T, n_head, hs)`,
`F.scaled_dot_product_attention`, learned positions added in `forward`, an output head tied to the token embedding
(Megatron-LM's default), the loss computed from the logits by `loss_fn`. Nothing here is marked for autopar: the
profiler has to find the tensor-parallel shards, the vocabulary-parallel embedding and head, and the pipeline cuts.

    autopar profile bench/models/nanogpt.py:gpt --seq-len 2048
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT and Megatron-LM do by default

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


#: Shape of the factory's model (change with keyword arguments to `gpt`).
DEFAULTS = dict(vocab_size=50304, block_size=1024, n_layer=12, n_embd=768, n_head=12)
SEQ_LEN = 1024


def gpt(**overrides: int) -> GPT:
    """The model (GPT-2 small by default)."""
    return GPT(**{**DEFAULTS, **overrides})


def example_batch(batch_size: int, seq_len: int = SEQ_LEN, vocab_size: int = DEFAULTS["vocab_size"]):
    """One micro-batch of token ids and next-token targets."""
    idx = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
    return (idx[:, :-1],), idx[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def nanogpt_profile(*, layers: int, hidden: int, heads: int, seq_len: int, vocab_size: int,
                    dtype: str = "float16", cache: bool = True):
    """The profile of this file's GPT at the given size, counted on the meta device (nothing marked by hand)."""
    import profiler

    with torch.device("meta"):
        model = gpt(vocab_size=vocab_size, block_size=seq_len, n_layer=layers, n_embd=hidden, n_head=heads)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    return profiler.profile(model, (ids,), device="meta", dtype=dtype, loss_fn=loss_fn, targets=ids,
                            name=f"nanogpt-{layers}x{hidden}", cache=cache, source_files=(__file__,))


def block_bounds(profile, chunks: int) -> list[int]:
    """Stage boundaries with the blocks split evenly over `chunks` (embeddings first, final norm and head last)."""
    blocks = [i for i, x in enumerate(profile.layers) if x.module_type == "Block"]
    per = len(blocks) // chunks
    bounds = [0] + [blocks[k * per] for k in range(1, chunks)] + [profile.num_layers]
    if any(b not in profile.cut_points for b in bounds[1:-1]):
        raise ValueError(f"no legal cut at {bounds}; the profile's cuts are {profile.cut_points}")
    return bounds
