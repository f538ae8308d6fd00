"""Models named on the command line: `path/to/file.py:factory` or `package.module:factory`.

The factory is called with the reference's options as keyword arguments (plus `batch_size` / `seq_len` when its
signature has them), and returns either a module or `(module, example_inputs)`. A module alone works when it has an
`example_inputs(batch_size)` method, or when its file defines `example_batch(batch_size) -> (inputs, targets)` (the
`autopar run` contract, `executor.sources`) or `example_inputs(batch_size)`. To have the training loss counted with the last layer, return `(module, example_inputs, loss_fn)` (called
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
        stamp = (path.stat().st_mtime_ns, path.stat().st_size)
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__autopar_stamp__", None) == stamp:
            return loaded  # an edited file is imported again, so a profile never describes old code
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ProfileError(f"'{module_part}' cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        module.__autopar_stamp__ = stamp  # type: ignore[attr-defined]
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


def factory_kwargs(factory: Callable, spec: str, options: dict[str, Any], *, batch_size: int | None = None,
                   seq_len: int | None = None) -> dict[str, Any]:
    """The keyword arguments to call `factory` with: `options` (each must be a parameter of it), plus `batch_size`
    and `seq_len` where its signature takes them."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    open_ended = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k not in params and k != "seq_len" and not open_ended)
    if unknown:
        takes = [n for n, p in params.items() if p.kind != inspect.Parameter.VAR_POSITIONAL]
        raise ProfileError(f"factory '{spec}' takes no option {', '.join(unknown)} (its parameters: "
                           f"{', '.join(takes) or 'none'}); drop the option or add the parameter to the factory")
    kwargs = dict(options)
    if seq_len is not None:
        if "seq_len" not in params and not open_ended:
            raise ProfileError(f"factory '{spec}' takes no seq_len parameter, so a sequence length cannot be set; "
                               "drop --seq-len or add a seq_len parameter to the factory")
        kwargs["seq_len"] = seq_len
    if "batch_size" in params and batch_size is not None:
        kwargs["batch_size"] = batch_size
    return kwargs


def load_factory(spec: str, *, batch_size: int, seq_len: int | None = None,
                 options: dict[str, Any] | None = None) -> FactoryModel:
    """Import and call the factory named by `spec` with `options` as keyword arguments; returns the module, its
    inputs and its loss if it gave one."""
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
    kwargs = factory_kwargs(factory, spec, {k: v for k, v in (options or {}).items() if k != "seq_len"},
                            batch_size=batch_size, seq_len=seq_len)
    try:
        result = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001
        detail = " ".join(str(exc).split())[:300]
        raise ProfileError(f"calling '{spec}' failed: {type(exc).__name__}: {detail}; fix the factory (call it in "
                           "Python to see the traceback) or its options") from None
    if isinstance(result, tuple) and len(result) in (2, 3, 4) and isinstance(result[0], nn.Module):
        model, inputs, *loss = result
        if loss and not callable(loss[0]):
            raise ProfileError(f"'{spec}' returned {type(loss[0]).__name__} as its third element; it must be the "
                               "loss function: (module, example_inputs, loss_fn[, targets])")
        return FactoryModel(model, inputs if isinstance(inputs, (tuple, dict)) else (inputs,), *loss)
    if isinstance(result, nn.Module):
        if callable(getattr(result, "example_inputs", None)):
            inputs = _call_user(result.example_inputs, spec, "the module's example_inputs", batch_size)
            return FactoryModel(result, inputs if isinstance(inputs, (tuple, dict)) else (inputs,))
        example_batch = getattr(source, "example_batch", None)
        example_inputs = getattr(source, "example_inputs", None)
        if not callable(example_batch) and callable(example_inputs):
            inputs = _call_user(example_inputs, spec, "example_inputs", batch_size)
            return FactoryModel(result, inputs if isinstance(inputs, (tuple, dict)) else (inputs,))
        if callable(example_batch):  # the `autopar run --model file.py:factory` contract (executor.sources)
            batch = _call_user(example_batch, spec, "example_batch", batch_size)
            if not (isinstance(batch, tuple) and len(batch) == 2):
                raise ProfileError(f"example_batch beside '{spec}' returned {type(batch).__name__}; it must return "
                                   "(inputs, targets), with targets None when the model computes its own loss")
            inputs, targets = batch
            loss_fn = getattr(source, "loss_fn", None)
            return FactoryModel(result, inputs if isinstance(inputs, (tuple, dict)) else (inputs,),
                                loss_fn if callable(loss_fn) else None, targets if callable(loss_fn) else None)
        raise ProfileError(
            f"'{spec}' returned a module but no example inputs; return (module, example_inputs), or define "
            "example_batch(batch_size) -> (inputs, targets) beside the factory, so autopar knows the input shapes"
        )
    raise ProfileError(f"'{spec}' returned {type(result).__name__}; it must return an nn.Module, "
                       "(module, example_inputs) or (module, example_inputs, loss_fn[, targets])")


def _call_user(fn: Callable, spec: str, what: str, batch_size: int) -> Any:
    """`fn(batch_size)`, with whatever user code raises turned into one line naming the function."""
    try:
        return fn(batch_size)
    except Exception as exc:  # noqa: BLE001
        detail = " ".join(str(exc).split())[:300]
        raise ProfileError(f"{what}({batch_size}) beside '{spec}' failed: {type(exc).__name__}: {detail}; fix "
                           f"{what}") from None
