"""Name-to-object resolution for `autopar run`: which model, which data, which optimizer.

A model is a zoo name (`gpt-tiny`), a Hugging Face config (`hf:path/to/config.json`, `profiler.hf_config`), or code:
`path/to/file.py:attr` or `package.module:attr` (`profiler.resolve` parses every form), where attr is
- a model factory: `attr(**options)` returns the `nn.Module`. Beside it, the file defines `example_batch(batch_size)`
  returning `(inputs, targets)` (inputs a tuple, a dict of keyword inputs, or one tensor; targets None when the
  model computes its own loss, e.g. a Hugging Face model given `labels`), or `example_inputs(batch_size)` returning
  the inputs alone, and optionally `loss_fn(output, targets)`. The loss is then that function, else the output's
  `.loss` (see `executor.batch`);
- or a factory returning `(module, example_inputs[, loss_fn[, targets]])`, the contract `autopar profile` and
  `autopar plan` read (`profiler.factory`): one file serves every command. The loss is `loss_fn(output)`, or
  `loss_fn(output, targets)` with targets; the example is made once per process on the CPU (seeded, so every rank
  draws the same), per batch size when the factory takes `batch_size`, else resized like `synthetic_like` does;
- or a `ZooModel`-like object (with `build`, `loss`, `synthetic_batch`, `example_inputs`), or a function returning one.

Data is `synthetic` or `package.module:fn` / `file.py:fn` with fn(step, global_batch_size) -> (inputs, targets), the
whole global batch of that step in the same shapes as above; each data-parallel replica keeps its share. Synthetic
batches are the model's own (zoo) or drawn like its example batch (`executor.batch.synthetic_like`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from executor.batch import Batch, synthetic_like, training_loss
from executor.errors import ExecutorError
from executor.train import DataSource
from profiler.errors import ProfileError
from profiler.factory import factory_kwargs, import_user_module


def _import(spec: str, what: str) -> tuple[ModuleType, Any]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ExecutorError(f"{what} '{spec}' is not of the form path/to/file.py:name or package.module:name")
    try:
        module = import_user_module(module_name, what)
    except ProfileError as exc:
        raise ExecutorError(str(exc)) from None
    try:
        return module, getattr(module, attr)
    except AttributeError:
        raise ExecutorError(f"'{module_name}' has no '{attr}' (from {what} '{spec}')") from None


@dataclass(frozen=True)
class UserModel:
    """A model given as code: a factory, its example batch and its loss (see the module docstring)."""

    name: str
    factory: Callable[..., nn.Module]
    example_batch: Callable[[int], tuple[Any, Any]]
    loss_fn: Callable[..., torch.Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seq_len: int | None = None

    def build(self, device: str | torch.device | None = None) -> nn.Module:
        """Construct the module on `device` (default: the current default device); on 'meta' nothing is allocated."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return self.factory(**self.options)

    def example_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> Any:
        """Inputs of the example batch, on `device`."""
        return Batch.of(*self.example_batch(batch_size)).to(torch.device(device)).inputs()

    def synthetic_batch(self, batch_size: int, *, seed: int = 0) -> tuple[Any, Any]:
        """Random batches drawn like the example batch (`executor.batch.synthetic_like`)."""
        with torch.random.fork_rng(devices=[]):  # the example itself must not vary between calls
            torch.manual_seed(0)
            example = Batch.of(*self.example_batch(max(batch_size, 8)))
        drawn = synthetic_like(example, batch_size, seed=seed)
        return drawn.inputs(), drawn.targets

    def loss(self, output: Any, targets: Any) -> torch.Tensor:
        """The training loss (`executor.batch.training_loss`)."""
        return training_loss(output, targets, self.loss_fn)


def _user_model(name: str, module: ModuleType, factory: Callable, options: dict[str, Any]) -> UserModel:
    example = getattr(module, "example_batch", None)
    if example is None and callable(getattr(module, "example_inputs", None)):
        inputs_fn = module.example_inputs

        def example(batch_size: int) -> tuple[Any, Any]:
            return inputs_fn(batch_size), None
    if not callable(example):
        raise ExecutorError(
            f"model '{name}' is a factory but its file defines no example_batch(batch_size) -> (inputs, targets) "
            "(or example_inputs(batch_size)); add one so autopar knows how the model is called"
        )
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise ExecutorError(f"'loss_fn' beside model '{name}' is not callable; define loss_fn(output, targets)")
    return UserModel(name=name, factory=factory, example_batch=example, loss_fn=loss_fn, options=dict(options),
                     seq_len=getattr(module, "seq_len", None))


def _call_factory(factory: Callable, name: str, options: dict[str, Any], batch_size: int) -> Any:
    """`factory(**options)` (plus `batch_size` where it takes one), with every failure one `ExecutorError` line."""
    try:
        kwargs = factory_kwargs(factory, name, options, batch_size=batch_size)
    except ProfileError as exc:
        raise ExecutorError(str(exc)) from None
    try:
        return factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything; report it as one line
        detail = " ".join(str(exc).split())[:300]
        raise ExecutorError(f"calling model factory '{name}' failed: {type(exc).__name__}: {detail}; fix the factory "
                            "(call it in Python to see the traceback) or its --option values") from None


def _returned_model(name: str, module: ModuleType, factory: Callable, options: dict[str, Any],
                    made: tuple) -> UserModel:
    """A `UserModel` for a factory returning `(module, example_inputs[, loss_fn[, targets]])` (module docstring)."""
    loss_fn = made[2] if len(made) > 2 else None
    if not callable(loss_fn) and loss_fn is not None:
        raise ExecutorError(f"model factory '{name}' returned {type(loss_fn).__name__} as its third element; it must "
                            "be the loss function: (module, example_inputs, loss_fn[, targets])")
    try:
        per_batch = "batch_size" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        per_batch = False
    examples: dict[int, tuple[Any, Any]] = {}

    def build(**opts: Any) -> nn.Module:
        return _call_factory(factory, name, opts, 1)[0]

    def example_batch(batch_size: int) -> tuple[Any, Any]:
        key = batch_size if per_batch else 0
        if key not in examples:
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                torch.manual_seed(0)
                made_here = _call_factory(factory, name, options, batch_size)
            examples[key] = (made_here[1], made_here[3] if len(made_here) > 3 else None)
        example = Batch.of(*examples[key])
        if example.size == batch_size:
            return example.inputs(), example.targets
        drawn = synthetic_like(example, batch_size, seed=0)
        return drawn.inputs(), drawn.targets

    return UserModel(name=name, factory=build, example_batch=example_batch, loss_fn=loss_fn, options=dict(options),
                     seq_len=getattr(module, "seq_len", None))


def resolve_model(name: str, options: dict[str, Any] | None = None) -> Any:
    """A zoo model by name (size options applied), a `UserModel` for a factory or an `hf:config.json` (options
    override config fields), or an imported model description."""
    if name.startswith("hf:"):
        from profiler.hf_config import hf_source

        source = hf_source(name.removeprefix("hf:"), options)
        return UserModel(name=name, factory=source.factory, example_batch=source.example_batch,
                         seq_len=source.seq_len)
    if ":" not in name:
        from profiler.zoo import get_model

        return get_model(name, **(options or {}))
    module, obj = _import(name, "model")
    if not hasattr(obj, "build") and callable(obj):
        with torch.device("meta"):  # find out what the function returns without allocating a model
            made = _call_factory(obj, name, options or {}, 1)
        if isinstance(made, nn.Module):
            return _user_model(name, module, obj, options or {})
        if isinstance(made, tuple) and len(made) in (2, 3, 4) and isinstance(made[0], nn.Module):
            return _returned_model(name, module, obj, options or {}, made)
        obj = made
    missing = [a for a in ("build", "loss", "synthetic_batch", "example_inputs") if not hasattr(obj, a)]
    if missing:
        raise ExecutorError(
            f"model '{name}' lacks {', '.join(missing)}; point --model at a factory returning an nn.Module (with "
            "example_batch beside it) or (module, example_inputs[, loss_fn[, targets]]), a ZooModel-like object, "
            "or a function returning one"
        )
    return obj


def resolve_data(spec: str, model: Any, *, seed: int) -> DataSource:
    """The data source for a run (see the module docstring)."""
    if spec == "synthetic":
        return lambda step, batch: model.synthetic_batch(batch, seed=seed + step)
    _, fn = _import(spec, "data source")
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

