"""A Hugging Face model named by its config file: `hf:path/to/config.json` (random weights, nothing downloaded).

The config's `architectures[0]` picks the model class when transformers has it; otherwise the first auto class
whose mapping knows the config (causal LM, masked LM, sequence-to-sequence LM, then the bare model). The example
batch is `input_ids` (plus `labels` for a model with a language-model head, which then computes its own loss from
`outputs.loss`) of `seq_len` tokens: the `seq_len` option, else the model's positions up to DEFAULT_SEQ_LEN.
Every other option overrides a config field (`num_hidden_layers=2`). transformers is an optional dependency
(`pip install autopar[hf]`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from profiler.errors import ProfileError

#: Tokens per example when neither the options nor a shorter position table say otherwise.
DEFAULT_SEQ_LEN = 2048
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "AutoModel")


@dataclass(frozen=True)
class HFSource:
    """How to build one configured Hugging Face model and feed it."""

    name: str
    factory: Callable[..., nn.Module]
    example_batch: Callable[[int], tuple[dict[str, torch.Tensor], None]]
    seq_len: int
    config_file: str


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ProfileError("an hf: model needs the transformers package; install it with `pip install "
                           "autopar[hf]` (or `pip install transformers`)") from None
    return transformers


def _load_config(path: Path, overrides: dict[str, Any]):
    tf = _transformers()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"cannot read the Hugging Face config {path} ({exc}); give a config.json") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ProfileError(f"{path} has no model_type, so it is not a Hugging Face config; give the config.json "
                           "that from_pretrained reads")
    try:
        config = tf.AutoConfig.for_model(**data)
    except (ValueError, KeyError) as exc:
        raise ProfileError(f"transformers cannot build a config from {path} ({exc}); check its model_type, or "
                           "upgrade transformers") from None
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ProfileError(f"the {data['model_type']} config in {path} has no field {', '.join(unknown)}; name "
                           "config fields (e.g. num_hidden_layers=2) or seq_len")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _takes_labels(cls: type) -> bool:
    try:
        return "labels" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_class(config) -> tuple[Any, bool]:
    """The class to build and whether it computes its own loss from `labels`."""
    tf = _transformers()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None)
        if cls is not None:
            return cls, _takes_labels(cls)
    for auto in _AUTO_CLASSES:
        mapping = getattr(tf, auto)._model_mapping
        if type(config) in mapping:
            cls = mapping[type(config)]
            return cls, _takes_labels(cls)
    raise ProfileError(f"transformers has no model class for a {config.model_type} config; add "
                       "\"architectures\": [\"<ModelClass>\"] to the config")


def hf_source(config_file: str, options: dict[str, Any] | None = None) -> HFSource:
    """The model a config file describes, with `options` overriding config fields (`seq_len`: example length)."""
    options = dict(options or {})
    seq_len = options.pop("seq_len", None)
    path = Path(config_file)
    config = _load_config(path, options)
    cls, has_head = _model_class(config)
    positions = next((getattr(config, f) for f in _POSITION_FIELDS if isinstance(getattr(config, f, None), int)),
                     None)
    if seq_len is None:
        seq_len = min(positions or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    elif positions is not None and seq_len > positions:
        raise ProfileError(f"seq_len {seq_len} is longer than the {positions} positions of {path}; use seq_len "
                           f"{positions} or less, or raise max_position_embeddings in the config")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise ProfileError(f"the config in {path} has no vocab_size, so token inputs cannot be drawn; add one")

    def factory() -> nn.Module:
        try:
            return cls(config)
        except Exception as exc:  # noqa: BLE001 - transformers validates configs by raising anything
            raise ProfileError(f"building {cls.__name__} from {path} failed: {type(exc).__name__}: {exc}; fix the "
                               "config or its options") from None

    def example_batch(batch_size: int) -> tuple[dict[str, torch.Tensor], None]:
        ids = torch.randint(1 if vocab > 1 else 0, vocab, (batch_size, seq_len))
        return ({"input_ids": ids, "labels": ids.clone()} if has_head else {"input_ids": ids}), None

    return HFSource(name=f"hf:{path}", factory=factory, example_batch=example_batch, seq_len=int(seq_len),
                    config_file=str(path))
