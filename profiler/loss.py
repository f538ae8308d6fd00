"""The training loss, counted and timed as part of the model's last layer.

A language model's cross-entropy keeps a float32 copy of the logits (its log-probabilities) for backward: for
GPT-2 small at 1024 tokens that is 206 MB per sample, over 30x the 6.3 MB the head itself saves. The loss runs on
the last pipeline stage, so the profiler adds its FLOPs, bytes moved and saved tensors to the last layer, and
backward starts from the loss (a scalar) instead of a gradient of ones on the last layer's output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from profiler.errors import ProfileError
from profiler.recording import cast_inputs, tensors_of


def loss_name(fn: Callable) -> str:
    """Qualified name of a loss callable ('profiler.zoo.gpt.gpt_loss'), part of the profile's cache key.

    A `functools.partial` is named after its function; a loss object (`nn.CrossEntropyLoss()`) after its class.
    """
    if isinstance(fn, functools.partial):
        return f"partial({loss_name(fn.func)})"
    qualname = getattr(fn, "__qualname__", None)
    if qualname is None:  # a callable object: its class names it
        cls = type(fn)
        return f"{cls.__module__}.{cls.__qualname__}"
    return f"{getattr(fn, '__module__', None) or '?'}.{qualname}"


def targets_signature(targets: Any) -> list[list] | None:
    """Shapes and dtypes of the target tensors (None without targets), for the cache key."""
    if targets is None:
        return None
    return [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors_of(targets)]


@dataclass(frozen=True)
class TrainingLoss:
    """A loss function with its targets on one device: `fn(output, targets)`, or `fn(output)` without targets."""

    fn: Callable
    targets: Any
    name: str

    @classmethod
    def on_device(cls, fn: Callable, targets: Any, device: str, dtype: torch.dtype) -> TrainingLoss:
        """The loss with its targets moved to `device`; floating-point targets take the profiled dtype."""
        if targets is not None and device != "meta" and any(t.is_meta for t in tensors_of(targets)):
            raise ProfileError(
                f"the loss targets are on the meta device, so the loss cannot be timed on '{device}'; pass real "
                "targets or profile with device='meta'"
            )
        moved = None if targets is None else cast_inputs(targets, device, dtype)
        return cls(fn=fn, targets=moved, name=loss_name(fn))

    def __call__(self, output: Any) -> torch.Tensor:
        """The loss of `output`, checked to be a scalar that backward can start from."""
        try:
            value = self.fn(output) if self.targets is None else self.fn(output, self.targets)
        except ProfileError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code may raise anything; report it as one line
            device = next((t.device.type for t in tensors_of(output)), "?")
            hint = (" (on meta it must not read tensor values: no .item(), no value-dependent branches)"
                    if device == "meta" else "")
            raise ProfileError(f"loss_fn {self.name} failed on the {device} device{hint}: "
                               f"{type(exc).__name__}: {exc}") from None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ProfileError(f"loss_fn {self.name} returned {what}; it must return a scalar tensor (reduce with "
                               "mean or sum)")
        if not value.requires_grad:
            raise ProfileError(f"loss_fn {self.name} returned a value that does not depend on the model's output "
                               "(no gradient); compute it from the output it is given")
        return value
