"""The built-in model zoo: `get_model(name, **size_options)` and `list_models()`."""

import torch

from profiler.zoo import gpt
from profiler.zoo.registry import ZooError, ZooModel, _Family, get_model, list_models, register_family


def _token_batch(cfg, batch_size, gen, device):
    ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=gen, device=device)
    return (ids[:, :-1].contiguous(),), ids[:, 1:].contiguous()


register_family(
    "gpt",
    _Family(
        config_cls=gpt.GPTConfig,
        build=gpt.GPT,
        make_batch=_token_batch,
        loss=gpt.gpt_loss,
        seq_len=lambda cfg: cfg.seq_len,
    ),
    presets={
        "gpt2-small": dict(num_layers=12, hidden=768, heads=12),
        "gpt2-medium": dict(num_layers=24, hidden=1024, heads=16),
        "gpt2-large": dict(num_layers=36, hidden=1280, heads=20),
        "gpt2-xl": dict(num_layers=48, hidden=1600, heads=25),
        # A few-MB model for tests and CPU demos: untied so it pipelines without shared weights.
        "gpt-tiny": dict(
            num_layers=4, hidden=64, heads=4, vocab_size=512, max_positions=64, seq_len=32, tie_embeddings=False
        ),
    },
)

__all__ = ["ZooError", "ZooModel", "get_model", "list_models", "register_family"]
