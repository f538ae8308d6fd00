"""FLOP formulas `torch.utils.flop_counter.FlopCounterMode` lacks, registered when this module is imported.

- `aten._grouped_mm` (mixture-of-experts GEMMs: each row of the input multiplied by its group's weight). Without a
  formula the experts' GEMMs count zero, and a Mixtral layer's FLOPs come out several times too low.
- transformers' fallback grouped matmul (`transformers::grouped_mm_fallback` and its backward), the kernel
  `profiler.hf` counts experts with on meta outside bfloat16; registered by `register_transformers_fallback`.

Counted as 2 FLOPs per multiply-accumulate, like torch's own formulas.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

aten = torch.ops.aten


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `_grouped_mm(a, b, offs)` in its four layouts.

    2D x 3D (tokens grouped by expert, a weight per expert) -> out (M, N); 3D x 2D -> out (M, N_total);
    3D x 3D (batched) -> out (G, M, N); 2D x 2D (the contracted dim grouped, a weight gradient) -> out (G, M, N),
    each group contracting only its slice of K: 2 * M * K_total * N.
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def _fallback_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * input_shape[0] * input_shape[1] * weight_shape[2]


def _fallback_backward_flops(input_shape, weight_shape, offs_shape, grad_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return 2 * _fallback_flops(input_shape, weight_shape)  # the input gradient and the weight gradient


if hasattr(aten, "_grouped_mm") and aten._grouped_mm not in flop_registry:
    register_flop_formula(aten._grouped_mm)(grouped_mm_flops)


def register_transformers_fallback() -> None:
    """Count transformers' fallback grouped matmul (needs transformers imported; idempotent)."""
    ops = getattr(torch.ops, "transformers", None)
    pairs = (("grouped_mm_fallback", _fallback_flops), ("grouped_mm_fallback_backward", _fallback_backward_flops))
    for name, formula in pairs:
        try:
            op = getattr(ops, name)
        except (AttributeError, RuntimeError):
            continue
        if op not in flop_registry:
            register_flop_formula(op)(formula)
