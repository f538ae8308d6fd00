"""Models written the way users write them, not shaped around autopar: the executor's test zoo.

Each `Case` gives a model factory, deterministic global batches (inputs as users have them: a tuple, or a dict for the
Hugging Face style) and the loss (a function of (output, targets), or None when the model returns its own `.loss`).

- glue_mlp: computation in `forward` between the layers (relu, a residual add, gelu, tanh), a bias-free Linear, and a
  parameter owned by the root module.
- cnn: conv / BatchNorm / relu, a bias-free conv, pooling and the `flatten` before the classifier.
- fused_gpt: nanoGPT-style: separate token and position embeddings added in `forward`, one fused `qkv` Linear split
  per head, `F.scaled_dot_product_attention`, an RMSNorm with no `reset_parameters`, bias-free Linears, and the
  output head tied to the token embedding.
- dict_lm: called with a dict (`input_ids`, `attention_mask`, `labels`) and returning an output object with `.loss`.
- hf_gpt2 / hf_llama / hf_bert: Hugging Face transformers models built from tiny configs (dropout off), dict
  batches with labels (no attention mask: transformers reads its values, which profiling on meta cannot), loss from
  the output's `.loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
SEQ = 8


class GlueMLP(nn.Module):
    """Four Linears with glue between them in the model's own forward."""

    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))  # owned by the root, used in forward
        self.inp = nn.Linear(dim, dim)
        self.mid = nn.Linear(dim, dim, bias=False)
        self.mid2 = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x * self.scale))
        h = h + F.gelu(self.mid(h))
        h = torch.tanh(self.mid2(h))
        return self.out(h)


class SmallCNN(nn.Module):
    """A ResNet-stem-like CNN: the classifier reads the flattened pooled features."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class RMSNorm(nn.Module):
    """Hand-written RMSNorm: a weight of ones, no reset_parameters."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FusedBlock(nn.Module):
    """Pre-norm block with one fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class FusedGPT(nn.Module):
    """nanoGPT-shaped language model (see the module docstring)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, heads: int = 2, layers: int = 2, seq: int = SEQ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(FusedBlock(dim, heads) for _ in range(layers))
        self.ln_f = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@dataclass
class LMOutput:
    """What a Hugging Face model returns: the loss and the logits, by name."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class DictLM(nn.Module):
    """Called as model(**batch) with an attention mask, computes its own loss from `labels`."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> LMOutput:
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        h = h + torch.tanh(self.mix(h.cumsum(1) / math.sqrt(h.shape[1])))
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return LMOutput(loss=loss, logits=logits)


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0))


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0))


def _images(batch: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (torch.randn(batch, 3, 8, 8, generator=gen),), torch.randint(0, 5, (batch,), generator=gen)


def _vectors(batch: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return (torch.randn(batch, 16, generator=gen),), torch.randint(0, 5, (batch,), generator=gen)


def _tokens(batch: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=gen)
    return (ids[:, :-1],), ids[:, 1:]


def _dict_batch(batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], None]:
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, None


def _hf_batch(batch: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], None]:
    # No attention_mask: transformers' mask construction reads tensor values, which profiling on meta cannot.
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}, None


def classify_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits."""
    return F.cross_entropy(output, targets)


def lm_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position."""
    return F.cross_entropy(output.flatten(0, 1), targets.flatten())


@dataclass(frozen=True)
class Case:
    """One model of the zoo: how to build it, feed it and score it."""

    name: str
    factory: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple[Any, Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    needs_transformers: bool = False
    has_batchnorm: bool = False

    def batch(self, step: int, size: int, *, seed: int = 100) -> tuple[Any, Any]:
        """The global batch of a step (same on every rank and in the reference run)."""
        return self.make_batch(size, torch.Generator().manual_seed(seed + step))

    def build(self, seed: int = 0) -> nn.Module:
        """The model with real weights, built under `seed` (what a single-process user run would start from)."""
        torch.manual_seed(seed)
        return self.factory()


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("glue_mlp", GlueMLP, _vectors, classify_loss),
        Case("cnn", SmallCNN, _images, classify_loss, has_batchnorm=True),
        Case("fused_gpt", FusedGPT, _tokens, lm_loss),
        Case("dict_lm", DictLM, _dict_batch, None),
        Case("hf_gpt2", _hf_gpt2, _hf_batch, None, needs_transformers=True),
        Case("hf_llama", _hf_llama, _hf_batch, None, needs_transformers=True),
        Case("hf_bert", _hf_bert, _hf_batch, None, needs_transformers=True),
    ]
}
