"""Which kernel runs each `F.scaled_dot_product_attention` call on the target device, and the layer costs that go
with it.

The profile counts a layer that calls SDPA both ways (`LayerProfile` fields: the math kernel; `fused_attention`: the
fused kernels) and records each call (`AttentionCall`); the cluster says the device type. The rules follow torch's
run-time choice (`aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`, `sdp_utils_cpp.cpp`), for sm80 and newer:

- CUDA, FlashAttention: float16 / bfloat16, no attn_mask, q, k and v with the same head dim <= 256, and no causal
  mask between different query and key lengths (grouped-query k / v are fine).
- CUDA, memory-efficient (CUTLASS): float16 / bfloat16 / float32, any mask, head dims divisible by 8 (16-bit) or 4
  (float32). It saves the same O(s) state as flash. (cuDNN attention, which torch prefers on some Hopper and
  Blackwell builds, also saves O(s): counted as these.)
- CPU: the CPU flash kernel for float32 / bfloat16 / float16, masks allowed, equal head dims, but no dropout.
- Anything else: the math kernel, whose `heads x s x s` scores are written, read and saved.

A layer runs fused only when every one of its calls does (otherwise the math counts apply, the conservative side).
"""

from __future__ import annotations

from enum import Enum

from planner.cluster import ClusterSpec
from planner.model_profile import AttentionCall, AttentionMask, DType, LayerProfile, ModelProfile


class AttentionKernel(str, Enum):
    """The kernel scaled_dot_product_attention runs with."""

    MATH = "math"
    FLASH = "flash"
    EFFICIENT = "efficient"
    CPU_FLASH = "cpu_flash"


_HALF = (DType.FP16, DType.BF16)
_FLASH_MAX_HEAD_DIM = 256


def select_attention_kernel(call: AttentionCall, device_type: str) -> AttentionKernel:
    """The kernel torch picks for `call` on a device of `device_type` ('cuda', 'cpu', ...), see the module doc."""
    same_dims = call.head_dim == call.v_head_dim
    if device_type == "cuda":
        if (call.dtype in _HALF and call.mask == AttentionMask.NONE and same_dims
                and call.head_dim <= _FLASH_MAX_HEAD_DIM and not (call.causal and call.q_len != call.kv_len)):
            return AttentionKernel.FLASH
        align = 8 if call.dtype in _HALF else 4
        if call.head_dim % align == 0 and call.v_head_dim % align == 0:
            return AttentionKernel.EFFICIENT
        return AttentionKernel.MATH
    if device_type == "cpu" and call.dropout == 0 and same_dims:
        return AttentionKernel.CPU_FLASH
    return AttentionKernel.MATH


def layer_attention_kernels(layer: LayerProfile, device_type: str) -> list[AttentionKernel]:
    """The kernel of each SDPA call of `layer` on `device_type` (empty: the layer does not call SDPA)."""
    return [select_attention_kernel(c, device_type) for c in layer.attention]


def runs_fused(layer: LayerProfile, device_type: str) -> bool:
    """Whether the fused count of `layer` applies on `device_type`."""
    kernels = layer_attention_kernels(layer, device_type)
    return bool(kernels) and layer.fused_attention is not None and AttentionKernel.MATH not in kernels


def layer_for_device(layer: LayerProfile, device_type: str) -> LayerProfile:
    """`layer` with the cost fields of the attention kernel `device_type` runs (itself when that is math)."""
    if not runs_fused(layer, device_type):
        return layer
    return layer.model_copy(update=layer.fused_attention.model_dump())


def layer_under_autocast(layer: LayerProfile, device_type: str) -> LayerProfile:
    """`layer`'s memory fields as torch.autocast over fp32 parameters runs it on `device_type` (fp32 residual
    stream, norms and softmax; `LayerProfile.autocast`), itself when the profile has no such count. The compute fields
    stay the 16-bit count's: only what is kept changes here."""
    a = layer.autocast
    if a is None:
        return layer
    fused = runs_fused(layer, device_type) and a.fused_saved_activation_bytes is not None
    return layer.model_copy(update={
        "saved_activation_bytes": a.fused_saved_activation_bytes if fused else a.saved_activation_bytes,
        "selective_saved_bytes": (a.fused_selective_saved_bytes or 0.0) if fused else a.selective_saved_bytes,
        "input_bytes": a.input_bytes, "output_bytes": a.output_bytes,
    })


_RESOLVED: dict[tuple[int, str, bool], tuple[ModelProfile, list[LayerProfile]]] = {}


def layers_for_cluster(profile: ModelProfile, cluster: ClusterSpec, *, autocast: bool = False) -> list[LayerProfile]:
    """Every layer of `profile` as the cluster's device runs its attention, with the memory fields of training under
    torch.autocast when `autocast` (`layer_under_autocast`); cached per profile, device type and that flag."""
    key = (id(profile), cluster.device.type, autocast)
    hit = _RESOLVED.get(key)
    if hit is not None and hit[0] is profile:
        return hit[1]
    layers = [layer_for_device(x, cluster.device.type) for x in profile.layers]
    if autocast:
        layers = [layer_under_autocast(x, cluster.device.type) for x in layers]
    if len(_RESOLVED) > 256:  # bounded across many plans in one process
        _RESOLVED.clear()
    _RESOLVED[key] = (profile, layers)
    return layers


def describe_attention(profile: ModelProfile, device_type: str) -> str | None:
    """One word per kernel the profile's SDPA calls run with on `device_type`, e.g. 'flash'; None without SDPA."""
    kernels: list[str] = []
    for layer in profile.layers:
        found = layer_attention_kernels(layer, device_type)
        if found and not runs_fused(layer, device_type):
            found = [AttentionKernel.MATH]  # one call runs (or is only counted) as math: the whole layer is
        kernels += [k.value for k in found if k.value not in kernels]
    return "+".join(kernels) or None
