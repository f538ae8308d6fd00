"""A model file as users hand it to `autopar run --model tests/run_model_dict.py:model`: keyword (dict) inputs with
an attention mask, and the loss returned by the model as `.loss` (the Hugging Face way)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_models import VOCAB, DictLM


def model() -> DictLM:
    """The factory."""
    return DictLM()


def example_batch(batch_size: int):
    """Keyword inputs; no targets: the model computes its loss from `labels`."""
    ids = torch.randint(1, VOCAB, (batch_size, 8))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, None
