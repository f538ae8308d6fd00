"""How the profiler counts `F.scaled_dot_product_attention` (SDPA): each way a device may run it.

SDPA picks its kernel at run time (torch's `sdp_utils.cpp` on CUDA, `sdp_utils_cpp.cpp` on CPU): a fused kernel
(FlashAttention, memory-efficient, the CPU flash kernel) that never stores the `heads x s x s` scores, or the math
fallback that does. On the meta device nothing runs and the target device is not known yet, so a layer that calls
SDPA is counted twice, and every call is described (`AttentionCallInfo`) for the planner to decide which count
applies (`planner.attention.select_attention_kernel`):

- math: a non-fused matmul-softmax-matmul in the profiled dtype (torch's own math path would upcast 16-bit inputs to
  float32 here, which no GPU kernel does), its probabilities (and dropout mask) saved for backward;
- fused: the fused kernel's own aten op (`_scaled_dot_product_flash_attention`, or
  `_scaled_dot_product_efficient_attention` when there is a mask or the head dims differ) through its meta kernel and
  autograd formula, so exactly what it saves is counted: q, k, v, the output and a float32 log-sum-exp per query
  row; backward recomputes the scores (torch's FLOP formula for the backward kernel has five matmuls, not four).
  With `is_causal` the fused kernels skip the key blocks above the diagonal (FlashAttention, the CUTLASS kernel and
  the CPU kernel's `num_keys = min(m + qBlockSize, kvSize)`), while torch's FLOP formulas count the full square:
  `causal_flop_fraction` scales them to the kept entries.

Training dropout is routed to `torch.native_dropout` in both counts (one kernel, a 1-byte mask), as CUDA runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_FUSED_OPS = {
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_efficient_attention_backward,
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward,
}


@dataclass(frozen=True)
class AttentionCallInfo:
    """One SDPA call as the kernel selection sees it (shapes for the whole profiled batch)."""

    batch_heads: int  # product of the query's leading dims (batch x heads)
    kv_batch_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    causal: bool
    mask: str  # "none", "bool" or "float"
    dropout: float
    dtype: torch.dtype
    fusable: bool  # 4-D inputs: the fused ops take (batch, heads, seq, dim) only


def causal_fraction(q_len: int, kv_len: int) -> float:
    """Share of the q_len x kv_len scores a causal (top-left aligned, as torch's is_causal) kernel computes."""
    if q_len <= 0 or kv_len <= 0:
        return 1.0
    rows_in_triangle = min(q_len, kv_len)
    kept = rows_in_triangle * (rows_in_triangle + 1) / 2 + max(q_len - kv_len, 0) * kv_len
    return kept / (q_len * kv_len)


def causal_flop_fraction(func, args: tuple, kwargs: dict) -> float:
    """Fraction of torch's FLOP count for `func` that really runs: below 1 only for a causal fused-attention op."""
    if func._overloadpacket not in _FUSED_OPS:
        return 1.0
    bound = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    if not bound.get("is_causal"):
        return 1.0
    return causal_fraction(bound["query"].shape[-2], bound["key"].shape[-2])


def _describe(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False) -> AttentionCallInfo:
    if attn_mask is None:
        mask = "none"
    else:
        mask = "bool" if attn_mask.dtype == torch.bool else "float"
    return AttentionCallInfo(
        batch_heads=math.prod(query.shape[:-2]), kv_batch_heads=math.prod(key.shape[:-2]),
        q_len=int(query.shape[-2]), kv_len=int(key.shape[-2]), head_dim=int(query.shape[-1]),
        v_head_dim=int(value.shape[-1]), causal=bool(is_causal), mask=mask, dropout=float(dropout_p),
        dtype=query.dtype, fusable=query.dim() == key.dim() == value.dim() == 4,
    )


def _repeat_kv(query, key, value):
    if key.shape[-3] == query.shape[-3]:
        return key, value
    groups = query.shape[-3] // key.shape[-3]
    return key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)


def _attention_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """scaled_dot_product_attention as plain ops in the input dtype (same result, unfused)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if enable_gqa:
        key, value = _repeat_kv(query, key, value)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    # Masks are added, not masked_fill'ed: an add saves nothing for backward, like a real attention kernel.
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        attn_mask = keep if attn_mask is None else attn_mask & keep
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = _float_mask(attn_mask, scores.dtype)
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(gpu_dropout(probs, dropout_p), value)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _attention_fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """scaled_dot_product_attention as the fused CUDA op that would run it (FlashAttention without a mask and with
    equal head dims, else the memory-efficient kernel, which takes an additive bias)."""
    if attn_mask is None and query.shape[-1] == value.shape[-1]:
        # FlashAttention takes grouped-query k / v as they are.
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                        scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = _float_mask(attn_mask, query.dtype)
    key, value = _repeat_kv(query, key, value)
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p, is_causal,
                                                        scale=scale)[0]


def gpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout as the CUDA kernel runs it (one op, boolean mask) instead of the CPU/meta decomposition."""
    return torch.native_dropout(x, p, True)[0] if p > 0 else x


class AttentionRouting(TorchFunctionMode):
    """While a layer is counted: routes scaled_dot_product_attention to the math ops or to the fused op, records
    each call in `calls`, and routes training dropout to `gpu_dropout`."""

    def __init__(self, *, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.calls: list[AttentionCallInfo] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_ARGS, args)) | kwargs
            self.calls.append(_describe(**bound))
            return (_attention_fused if self.fused else _attention_math)(**bound)
        if func is F.dropout and not kwargs.get("inplace", False) and len(args) < 4:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training:
                return gpu_dropout(args[0] if args else kwargs["input"], p)
        return func(*args, **kwargs)
