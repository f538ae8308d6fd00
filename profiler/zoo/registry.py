"""Built-in models that users (and the demo, the service and the tests) can name without writing code.

`get_model("gpt2-medium", num_layers=4)` returns a `ZooModel`: a validated config plus how to build the module,
make example inputs and synthetic batches, and compute the training loss. Adding a family means adding one
`_Family` entry; adding a size means adding one preset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from planner.errors import AutoparError


class ZooError(AutoparError):
    """An unknown zoo name or an invalid size option."""


@dataclass(frozen=True)
class _Family:
    """How to build and feed one family of models."""

    config_cls: type[BaseModel]
    build: Callable[[Any], nn.Module]
    # (config, batch_size, generator, device) -> (inputs, targets)
    make_batch: Callable[[Any, int, torch.Generator | None, str], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ZooModel:
    """A named model with its configuration, ready to build, feed and train."""

    name: str
    family: str
    config: BaseModel
    _family: _Family = field(repr=False)

    def build(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """Construct the module on `device` (default: the current default device); on 'meta' nothing is allocated."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            module = self._family.build(self.config)
        return module.to(dtype) if dtype is not None else module

    @property
    def seq_len(self) -> int | None:
        """Tokens per sample, or None for image/vector models."""
        return getattr(self.config, "seq_len", None)

    def synthetic_batch(
        self, batch_size: int, *, seed: int = 0, device: str | torch.device = "cpu"
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Deterministic random (inputs, targets) for `batch_size` samples."""
        gen = None
        if str(device) != "meta":
            gen = torch.Generator(device="cpu").manual_seed(seed)
        inputs, targets = self._family.make_batch(self.config, batch_size, gen, "cpu" if gen else "meta")
        return tuple(t.to(device) for t in inputs), targets.to(device)

    def example_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """Inputs only, for profiling."""
        return self.synthetic_batch(batch_size, device=device)[0]

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss (a scalar, mean over the batch)."""
        return self._family.loss(output, targets)

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The family's loss function itself (e.g. `profiler.zoo.gpt.gpt_loss`), for callers that need its name."""
        return self._family.loss


_FAMILIES: dict[str, _Family] = {}
# zoo name -> (family, preset config fields)
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_family(name: str, family: _Family, presets: dict[str, dict[str, Any]]) -> None:
    """Add a family and its named sizes to the zoo."""
    _FAMILIES[name] = family
    for preset, fields in presets.items():
        _PRESETS[preset] = (name, fields)


def list_models() -> list[str]:
    """Known zoo names."""
    return sorted(_PRESETS)


def get_model(name: str, **overrides: Any) -> ZooModel:
    """A zoo model by name, with size options (num_layers, hidden, heads, seq_len, vocab_size, ...) overridden."""
    if name not in _PRESETS:
        raise ZooError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    family_name, fields = _PRESETS[name]
    family = _FAMILIES[family_name]
    unknown = set(overrides) - set(family.config_cls.model_fields)
    if unknown:
        raise ZooError(
            f"'{name}' has no option {', '.join(sorted(unknown))}; its options are "
            f"{', '.join(family.config_cls.model_fields)}"
        )
    try:
        config = family.config_cls(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ZooError(f"invalid options for '{name}': {problems}") from None
    return ZooModel(name=name, family=family_name, config=config, _family=family)
