"""Models named on the command line: `path/to/file.py:factory` or `package.module:factory`.

The factory is called with no arguments, except `batch_size` / `seq_len` when its signature has them, and returns
either a module or `(module, example_inputs)`. A module alone works when it has an `example_inputs(batch_size)`
method. To have the training loss counted with the last layer, return `(module, example_inputs, loss_fn)` (called
as `loss_fn(output)`) or `(module, example_inputs, loss_fn, targets)` (called as `loss_fn(output, targets)`).
Each failure says which part (file, import, attribute, call, return value) went wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from profiler.errors import ProfileError


def is_factory_spec(spec: str) -> bool:
    """True for 'file.py:name' / 'package.module:name' (zoo names never contain ':')."""
    return ":" in spec


def is_file_reference(module_part: str) -> bool:
    """Whether the part before ':' names a Python file (a path) rather than an importable module."""
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def import_user_module(module_part: str, what: str = "model") -> ModuleType:
    """The module a reference names: a Python file (loaded once per process under a name derived from its absolute
    path, so two files with one stem do not clash) or an importable module. `what` names it in errors."""
    if is_file_reference(module_part):
        path = Path(module_part).resolve()
        if not path.is_file():
            raise ProfileError(f"{what} file '{module_part}' does not exist")
        name = "_autopar_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ProfileError(f"'{module_part}' cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything; report it as one line
            sys.modules.pop(name, None)
            raise ProfileError(f"importing {what} file '{module_part}' failed: {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        raise ProfileError(f"{what} module '{module_part}' cannot be imported ({exc}); check the name and "
                           "PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001
        raise ProfileError(f"importing {what} module '{module_part}' failed: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class FactoryModel:
    """What a factory returned: the module, its example inputs and, optionally, its loss and targets."""

    module: nn.Module
    inputs: tuple | dict
    loss_fn: Callable | None = None
    targets: Any = None


def load_factory(spec: str, *, batch_size: int, seq_len: int | None = None) -> FactoryModel:
    """Import and call the factory named by `spec`; returns the module, its inputs and its loss if it gave one."""
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise ProfileError(f"'{spec}' is not 'path/to/file.py:factory' or 'package.module:factory'")
    source = import_user_module(module_part)
    factory = getattr(source, attr, None)
    if factory is None:
        public = [n for n in dir(source) if not n.startswith("_") and callable(getattr(source, n))]
        raise ProfileError(f"'{module_part}' has no attribute '{attr}'; callables there: {', '.join(public[:12])}")
    if not callable(factory):
        raise ProfileError(f"'{spec}' is not callable")
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "batch_size" in params:
        kwargs["batch_size"] = batch_size
    if "seq_len" in params and seq_len is not None:
        kwargs["seq_len"] = seq_len
    try:
        result = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ProfileError(f"calling '{spec}' failed: {type(exc).__name__}: {exc}") from None
    if isinstance(result, tuple) and len(result) in (2, 3, 4) and isinstance(result[0], nn.Module):
        model, inputs, *loss = result
        if loss and not callable(loss[0]):
            raise ProfileError(f"'{spec}' returned {type(loss[0]).__name__} as its third element; it must be the "
                               "loss function: (module, example_inputs, loss_fn[, targets])")
        return FactoryModel(model, inputs if isinstance(inputs, tuple) else (inputs,), *loss)
    if isinstance(result, nn.Module):
        if callable(getattr(result, "example_inputs", None)):
            inputs = result.example_inputs(batch_size)
            return FactoryModel(result, inputs if isinstance(inputs, tuple) else (inputs,))
        example_batch = getattr(source, "example_batch", None)
        if callable(example_batch):  # the `autopar run --model file.py:factory` contract (executor.sources)
            inputs, targets = example_batch(batch_size)
            loss_fn = getattr(source, "loss_fn", None)
            return FactoryModel(result, inputs if isinstance(inputs, (tuple, dict)) else (inputs,),
                                loss_fn if callable(loss_fn) else None, targets if callable(loss_fn) else None)
        raise ProfileError(
            f"'{spec}' returned a module but no example inputs; return (module, example_inputs), or define "
            "example_batch(batch_size) -> (inputs, targets) beside the factory, so autopar knows the input shapes"
        )
    raise ProfileError(f"'{spec}' returned {type(result).__name__}; it must return an nn.Module, "
                       "(module, example_inputs) or (module, example_inputs, loss_fn[, targets])")
