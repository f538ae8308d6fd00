"""Which modules are the model's layers (the units a pipeline may cut between), in execution order.

Rules, first match wins:
1. the user's explicit list of module names;
2. an `nn.Sequential` model: its children;
3. a Hugging Face transformers model: its blocks, embeddings, final norm and head, helpers without parameters
   (`rotary_emb`) left to the glue (see `profiler.hf`);
4. a model built around an `nn.ModuleList` of identical blocks (GPT, BERT, Llama, ViT): every module executed
   before the blocks, each block, every module executed after them;
5. otherwise the top-level submodules.
Containers that are never called themselves (a `ModuleList` of different blocks, a `ModuleDict`) are opened up.
Order is the order of first call in a forward pass on the meta device.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from profiler import hf
from profiler.errors import ProfileError

logger = logging.getLogger(__name__)

_INPUT_ERRORS = (RuntimeError, TypeError, IndexError, ValueError, AssertionError)


@dataclass(frozen=True)
class CallOrder:
    """Which submodules one forward pass called, in order, and how often."""

    first_call: dict[str, int]
    calls: dict[str, int]


def _shapes(values: tuple) -> str:
    shapes = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
    if not shapes:
        return "no tensors"
    return ", ".join(str(s) for s in shapes)


def _expected_input(module: nn.Module) -> str | None:
    """The input a standard module accepts, in words, so a shape error can say what was expected."""
    if isinstance(module, nn.Linear):
        return f"shape (..., {module.in_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"shape (N, {module.in_channels}, ...)"
    if isinstance(module, nn.Embedding):
        return f"integer token ids in [0, {module.num_embeddings})"
    if isinstance(module, nn.LayerNorm):
        return f"shape (..., {', '.join(map(str, module.normalized_shape))})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"shape (N, {module.num_features}, ...)"
    return None


def call_order(model: nn.Module, inputs: tuple) -> CallOrder:
    """Run one forward pass with hooks on every submodule; explain input mistakes as a `ProfileError`."""
    first_call: dict[str, int] = {}
    calls: dict[str, int] = {}
    stack: list[tuple[str, nn.Module, tuple]] = []
    handles = []

    def make_hooks(name: str, module: nn.Module):
        def pre(_m, args):
            first_call.setdefault(name, len(first_call))
            calls[name] = calls.get(name, 0) + 1
            stack.append((name, module, args))

        def post(_m, _args, _out):
            if stack:
                stack.pop()

        return pre, post

    for name, module in model.named_modules():
        if name:
            pre, post = make_hooks(name, module)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*inputs)
    except ProfileError:
        raise
    except _INPUT_ERRORS as exc:
        raise _input_error(model, inputs, stack, exc) from None
    finally:
        for handle in handles:
            handle.remove()
    return CallOrder(first_call=first_call, calls=calls)


def _input_error(model: nn.Module, inputs: tuple, stack: list, exc: Exception) -> ProfileError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "meta" in reason.lower():
        where = f" in module '{stack[-1][0]}'" if stack else ""
        return ProfileError(
            f"the model's forward depends on tensor values{where} ({reason}), which the meta device used for "
            "counting cannot run; make the forward's control flow depend on shapes only"
        )
    if not stack:
        try:
            signature = f"forward{inspect.signature(model.forward)}"
        except (TypeError, ValueError):
            signature = "forward(...)"
        return ProfileError(
            f"example inputs do not fit the model: {type(model).__name__}.{signature} got {_shapes(inputs)} "
            f"({reason}); pass inputs that match its forward"
        )
    name, module, args = stack[-1]
    expected = _expected_input(module)
    what = f"expected {expected}" if expected else "rejected its input"
    return ProfileError(
        f"example inputs do not fit the model: module '{name}' ({type(module).__name__}) {what} but got "
        f"{_shapes(args)} ({reason}); the model was called with {_shapes(inputs)}"
    )


def _block_signature(module: nn.Module) -> tuple:
    return (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


def _repeated_block_list(model: nn.Module, order: CallOrder) -> str | None:
    """Name of the largest ModuleList whose elements are identical blocks that the forward calls, or None."""
    best, best_params = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module.named_children())
        if len({_block_signature(m) for _, m in children}) != 1:
            continue
        if not all(f"{name}.{child}" in order.first_call for child, _ in children):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = name, params
    return best


def _expand(module: nn.Module, prefix: str, order: CallOrder, path: str | None, out: list[str]) -> None:
    """Collect the called units under `module`: open containers that are on `path` or never called."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        on_path = path is not None and (path == name or path.startswith(name + "."))
        if path == name:
            out.extend(f"{name}.{c}" for c, _ in child.named_children())
        elif on_path or name not in order.first_call:
            _expand(child, name + ".", order, path, out)
        else:
            out.append(name)


def find_layers(model: nn.Module, order: CallOrder, layers: list[str] | None = None) -> list[str]:
    """The layer names in execution order (see the module docstring for the rules)."""
    modules = dict(model.named_modules())
    if layers is not None:
        names = _check_user_layers(modules, order, layers)
    elif isinstance(model, nn.Sequential):
        names = [n for n, _ in model.named_children()]
    elif (hf_names := hf.layer_names(model, order.first_call)) is not None:
        names = hf_names
    else:
        names = []
        _expand(model, "", order, _repeated_block_list(model, order), names)
    names = [n for n in names if n in order.first_call]
    if not names:
        # A single module with no called children: the whole model is one layer.
        return [""]
    twice = [n for n in names if order.calls.get(n, 0) > 1]
    if twice:
        raise ProfileError(
            f"module '{twice[0]}' is called {order.calls[twice[0]]} times per forward, so it cannot be one pipeline "
            "layer; pass layers=[...] / --layers naming modules that are each called once"
        )
    _warn_uncounted(model, names)
    return sorted(names, key=order.first_call.__getitem__)


def _check_user_layers(modules: dict[str, nn.Module], order: CallOrder, layers: list[str]) -> list[str]:
    for name in layers:
        if name not in modules or name == "":
            raise ProfileError(f"layer '{name}' is not a submodule of the model; use names like "
                               f"{', '.join([n for n in modules if n][:6])}")
        if name not in order.first_call:
            raise ProfileError(f"layer '{name}' is never called by the model's forward; leave it out of layers")
    for a in layers:
        for b in layers:
            if a != b and b.startswith(a + "."):
                raise ProfileError(f"layers '{a}' and '{b}' overlap (one contains the other); list only one of them")
    if len(set(layers)) != len(layers):
        raise ProfileError("layers lists a module twice")
    return list(layers)


def _warn_uncounted(model: nn.Module, names: list[str]) -> None:
    covered = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    missing = sum(p.numel() for p in model.parameters() if id(p) not in covered)
    if missing:
        logger.warning(
            "%d parameters belong to no layer (modules never called, or used directly in the model's own forward); "
            "they are not counted in the profile", missing,
        )
