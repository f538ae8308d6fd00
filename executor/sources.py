"""Name-to-object resolution for `autopar run`: which model, which data, which optimizer.

A model is a zoo name (`gpt-tiny`) or `package.module:attr`, where attr is a `ZooModel`-like object (with `build`,
`loss`, `synthetic_batch`, `example_inputs`, `seq_len`) or a function returning one. Data is `synthetic` (the model's
own deterministic random batches) or `package.module:fn` with fn(step, global_batch_size) -> (inputs, targets), the
whole global batch of that step; each data-parallel replica keeps its share.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from executor.errors import ExecutorError
from executor.train import DataSource


def _import(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ExecutorError(f"{what} '{spec}' is not of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExecutorError(f"cannot import {what} module '{module_name}': {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ExecutorError(f"module '{module_name}' has no '{attr}' (from {what} '{spec}')") from None


def resolve_model(name: str, options: dict[str, Any] | None = None) -> Any:
    """A zoo model by name (size options applied) or an imported model description."""
    if ":" not in name:
        from profiler.zoo import get_model

        return get_model(name, **(options or {}))
    obj = _import(name, "model")
    if not hasattr(obj, "build") and callable(obj):
        obj = obj(**(options or {}))
    missing = [a for a in ("build", "loss", "synthetic_batch", "example_inputs") if not hasattr(obj, a)]
    if missing:
        raise ExecutorError(
            f"model '{name}' lacks {', '.join(missing)}; point --model at a ZooModel-like object or a function "
            "returning one"
        )
    return obj


def resolve_data(spec: str, model: Any, *, seed: int) -> DataSource:
    """The data source for a run (see the module docstring)."""
    if spec == "synthetic":
        return lambda step, batch: model.synthetic_batch(batch, seed=seed + step)
    fn = _import(spec, "data source")
    if not callable(fn):
        raise ExecutorError(f"data source '{spec}' is not callable; it must be fn(step, global_batch_size)")
    return fn


class OptimizerSpec(BaseModel):
    """Which optimizer each model part gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adamw", "sgd"] = Field(default="adamw", description="Optimizer family.")
    lr: float = Field(default=3e-4, gt=0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum.")

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """An optimizer over `params`."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
