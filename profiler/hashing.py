"""Identity of a model's structure, and of one layer's structure plus its inputs (to profile repeats once)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def structure_hash(model: nn.Module) -> str:
    """Hash of the module tree, parameter and buffer names / shapes / dtypes, and which parameters are shared.

    The device is left out on purpose: a model built on 'meta' hashes the same as the same model on 'cuda'.
    """
    h = hashlib.sha256()
    for name, module in model.named_modules(remove_duplicate=False):
        h.update(f"M {name} {_type_name(module)}\n".encode())
    # Tied weights (GPT-2's head) change the parameter count, so the first name of each tensor is hashed too.
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias = first_name.setdefault(id(p), name)
        h.update(f"P {name} {tuple(p.shape)} {p.dtype} {p.requires_grad} {alias}\n".encode())
    for name, b in model.named_buffers(remove_duplicate=False):
        h.update(f"B {name} {tuple(b.shape)} {b.dtype}\n".encode())
    return h.hexdigest()[:16]


def _value_signature(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{value.dtype}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_value_signature(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value_signature(v)}" for k, v in sorted(value.items())) + "}"
    text = repr(value)
    return text if len(text) < 80 else f"<{_type_name(value)}>"


def layer_signature(module: nn.Module, args: tuple, kwargs: dict, grad_mask: tuple[bool, ...]) -> str:
    """Two layers with equal signatures cost the same: same classes, parameter shapes and input shapes."""
    parts = [_type_name(module)]
    parts += [f"{n}:{_type_name(m)}" for n, m in module.named_modules(remove_duplicate=False)]
    parts += [
        f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in module.named_parameters(remove_duplicate=False)
    ]
    parts += [f"{n}:{tuple(b.shape)}:{b.dtype}" for n, b in module.named_buffers(remove_duplicate=False)]
    parts.append(_value_signature(args))
    parts.append(_value_signature(kwargs))
    parts.append(str(grad_mask))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
