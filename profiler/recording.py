"""Copies of the model on the meta device, and what each layer receives and returns in one forward pass."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from profiler.errors import ProfileError


@dataclass
class LayerCall:
    """The arguments one layer was called with and what it returned (tensors on the recording device)."""

    name: str
    args: tuple
    kwargs: dict
    output: Any
    # True for each tensor argument that is (a view of) a model input: it needs no gradient.
    from_input: tuple[bool, ...] = field(default=())


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a nest of tuples / lists / dicts."""
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside `value` (logical size, numel x element size)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(value))


def cast_inputs(inputs: tuple, device: str | torch.device, dtype: torch.dtype) -> tuple:
    """Move inputs to `device`; floating-point ones also to `dtype` (token ids stay integers)."""

    def cast(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)

    return tree_map(cast, inputs)


def meta_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` on the meta device in `dtype`, sharing nothing with it and allocating no weights.

    Weights are replaced by meta tensors before the deep copy, so even a huge CPU model is copied for free and
    tied parameters stay tied.
    """
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any failure of user code inside deepcopy means the same thing
        raise ProfileError(
            f"could not copy the model to the meta device ({type(exc).__name__}: {exc}); build the model on "
            "torch.device('meta') yourself and pass that"
        ) from None
    return _out_of_place(copied.to(dtype=dtype).train())


def _out_of_place(model: nn.Module) -> nn.Module:
    """Turn off `inplace` (nn.ReLU(inplace=True), torchvision style) on a copy the profiler owns.

    Each layer is counted and timed on fresh leaf inputs that need grad, which autograd forbids an in-place op to
    overwrite; out of place, the op costs the same FLOPs and its output is saved all the same.
    """
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def device_copy(model: nn.Module, device: str, dtype: torch.dtype, *, owned: bool) -> nn.Module:
    """The model on `device` in `dtype` for timing; a deep copy unless the caller said it owns the model."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ProfileError(
            f"the model's weights are on the meta device, so it cannot be timed on '{device}'; build it on a real "
            "device or profile with device='meta' (analytic)"
        )
    target = model if owned else copy.deepcopy(model)
    return _out_of_place(target.to(device=device, dtype=dtype).train())


def record_calls(model: nn.Module, inputs: tuple, layer_names: list[str], *, clone: bool) -> dict[str, LayerCall]:
    """Run one forward pass and record each layer's arguments and output.

    With `clone`, arguments are copied so that in-place ops later in the forward (ReLU(inplace=True)) cannot change
    what was recorded; identity-based graph recovery needs `clone=False`.
    """
    input_ids = {id(t) for t in tensors_of(inputs)}
    input_storages = {_storage_key(t) for t in tensors_of(inputs)}
    records: dict[str, LayerCall] = {}
    handles = []

    def make_hooks(name: str):
        def pre(_m, args, kwargs):
            from_input = tuple(
                id(t) in input_ids or _storage_key(t) in input_storages for t in tensors_of((args, kwargs))
            )
            if clone:
                args, kwargs = tree_map(_detached_clone, (args, kwargs))
            records[name] = LayerCall(name=name, args=args, kwargs=kwargs, output=None, from_input=from_input)

        def post(_m, _args, _kwargs, output):
            records[name].output = tree_map(_detached_clone, output) if clone else output

        return pre, post

    for name in layer_names:
        module = model.get_submodule(name)
        pre, post = make_hooks(name)
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    records["<output>"] = LayerCall(name="<output>", args=(), kwargs={}, output=output)
    return records


def _detached_clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def fresh_leaf_args(call: LayerCall) -> tuple[tuple, dict]:
    """Detached copies of a call's recorded arguments; floating ones need grad unless they are model inputs."""
    flags = iter(call.from_input)

    def prep(v):
        if not isinstance(v, torch.Tensor):
            return v
        from_input = next(flags, False)
        leaf = v.detach()
        return leaf.requires_grad_(leaf.is_floating_point() and not from_input)

    return tree_map(prep, (call.args, call.kwargs))
