"""The built-in model zoo: `get_model(name, **size_options)` and `list_models()`.

Families (one module each): GPT-2 (`gpt`), BERT (`bert`), Llama-style (`llama`), a residual MLP (`mlp`) and
ResNet (`resnet`). Every model's top-level units (embed / stem, each block, head) take one tensor and return one,
so any contiguous run of them is a pipeline stage.
"""

import torch

from profiler.zoo import bert, gpt, llama, mlp, resnet
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
    ),
    presets={
        "gpt2-small": {"num_layers": 12, "hidden": 768, "heads": 12},
        "gpt2-medium": {"num_layers": 24, "hidden": 1024, "heads": 16},
        "gpt2-large": {"num_layers": 36, "hidden": 1280, "heads": 20},
        "gpt2-xl": {"num_layers": 48, "hidden": 1600, "heads": 25},
        # A few-MB model for tests and CPU demos: untied so it pipelines without shared weights.
        "gpt-tiny": {
            "num_layers": 4, "hidden": 64, "heads": 4, "vocab_size": 512, "max_positions": 64, "seq_len": 32, "tie_embeddings": False
        },
    },
)

register_family(
    "bert",
    _Family(
        config_cls=bert.BertConfig,
        build=bert.Bert,
        make_batch=bert.bert_batch,
        loss=bert.bert_loss,
    ),
    presets={
        "bert-base": {"num_layers": 12, "hidden": 768, "heads": 12},
        "bert-large": {"num_layers": 24, "hidden": 1024, "heads": 16},
        "bert-tiny": {"num_layers": 2, "hidden": 64, "heads": 4, "vocab_size": 512, "max_positions": 64, "seq_len": 32},
    },
)

register_family(
    "llama",
    _Family(
        config_cls=llama.LlamaConfig,
        build=llama.Llama,
        make_batch=_token_batch,
        loss=gpt.gpt_loss,
    ),
    presets={
        "llama-7b": {"num_layers": 32, "hidden": 4096, "heads": 32, "ffn_hidden": 11008},
        "llama-13b": {"num_layers": 40, "hidden": 5120, "heads": 40, "ffn_hidden": 13824},
        "llama-70b": {"num_layers": 80, "hidden": 8192, "heads": 64, "kv_heads": 8, "ffn_hidden": 28672},
        "llama-tiny": {"num_layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 172, "vocab_size": 512, "seq_len": 32},
    },
)

register_family(
    "mlp",
    _Family(
        config_cls=mlp.MLPConfig,
        build=mlp.MLP,
        make_batch=mlp.mlp_batch,
        loss=mlp.classification_loss,
    ),
    presets={
        "mlp": {"in_features": 1024, "hidden": 1024, "num_layers": 8, "num_classes": 1000},
        "mlp-tiny": {"in_features": 32, "hidden": 64, "num_layers": 4, "num_classes": 10},
    },
)

register_family(
    "resnet",
    _Family(
        config_cls=resnet.ResNetConfig,
        build=resnet.ResNet,
        make_batch=resnet.image_batch,
        loss=mlp.classification_loss,
    ),
    presets={f"resnet{d}": {"depth": d} for d in (18, 34, 50, 101, 152)},
)

__all__ = ["ZooError", "ZooModel", "get_model", "list_models", "register_family"]
