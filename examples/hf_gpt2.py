"""A Hugging Face GPT-2 built from a config (random weights), trained by autopar as users write it.

    autopar run --plan-first examples/hf_gpt2.py:model --cluster cpu --global-batch 8 --nproc-per-node 2 --steps 5

autopar needs three things from a file like this: a factory returning the `nn.Module`, `example_batch(batch_size)`
returning `(inputs, targets)` (here a dict of keyword inputs, and no targets because the model computes its own
loss from `labels`), and, when the loss is not the output's `.loss`, a `loss_fn(output, targets)`.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, SEQ = 512, 32


def model() -> GPT2LMHeadModel:
    """A 4-layer GPT-2 (about 1.4M parameters) with dropout off, so runs are reproducible."""
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def example_batch(batch_size: int):
    """Token ids and their labels (the model shifts them itself); autopar draws synthetic batches like these."""
    ids = torch.randint(0, VOCAB, (batch_size, SEQ))
    return {"input_ids": ids, "labels": ids.clone()}, None
