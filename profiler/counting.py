"""Counting one layer's costs on the meta device: FLOPs, bytes moved, saved activations, the attention core.

Everything here is for the whole batch the layer was called with; the caller divides by the batch size.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode`, forward and backward in separate passes.
- Bytes moved (roofline): for every aten op that produces data (views excluded), bytes of its tensor inputs and
  outputs, leaving out parameters and, in backward, the parameter gradients it writes (both are per step, not per
  sample).
- Saved activations: every tensor autograd packs for backward (`saved_tensors_hooks`), counted once per storage
  and leaving out parameters and buffers.
- Attention core (for selective recompute): a softmax's output and everything elementwise derived from it (dropout,
  masks) is the core; its saved bytes are what selective recompute drops, and the activation-by-activation matmuls
  that feed or consume it (QK^T and scores x V) are the forward FLOPs it repeats.
- `scaled_dot_product_attention` is counted as a non-fused matmul-softmax-matmul in the profiled dtype (torch's own
  math path would upcast 16-bit inputs to float32 here, which no GPU kernel does), so its FLOPs and its
  `heads x s x s` probabilities are visible; a fused (flash) kernel saves less than this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from profiler.loss import TrainingLoss
from profiler.recording import LayerCall, tensor_bytes, tensors_of

aten = torch.ops.aten
_MATMULS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm}
_SOFTMAXES = {aten._softmax, aten._safe_softmax, aten.softmax}


@dataclass(frozen=True)
class LayerCost:
    """Counted costs of one layer call, for the whole batch."""

    fwd_flops: float
    bwd_flops: float
    fwd_bytes: float
    bwd_bytes: float
    saved_bytes: float
    selective_saved_bytes: float
    selective_fwd_flops: float
    input_bytes: float
    output_bytes: float


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _OpMeter(TorchDispatchMode):
    """Sums activation bytes per op and follows the attention core through the forward pass."""

    def __init__(self, excluded: set[int]) -> None:
        super().__init__()
        self.excluded = excluded
        self.bytes = 0.0
        self.outputs: list[tuple[int, float]] = []
        self._alive: list[object] = []  # keeps storages alive so their keys are never reused during the count
        self.mm_flops: dict[int, float] = {}
        self.mm_sources: dict[int, set[int]] = {}  # storage key -> activation matmuls it derives from
        self.core_mms: set[int] = set()
        self.core: set[int] = set()  # storage keys of attention-core tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = tensors_of((args, kwargs))
        outs = tensors_of(out)
        if not func.is_view:
            self.bytes += sum(t.numel() * t.element_size() for t in ins if _key(t) not in self.excluded)
            for t in outs:
                nbytes = float(t.numel() * t.element_size())
                self.bytes += nbytes
                self.outputs.append((_key(t), nbytes))
        self._alive.extend(t.untyped_storage() for t in outs)
        self._follow_attention(func, args, kwargs, out, ins, outs)
        return out

    def _follow_attention(self, func, args, kwargs, out, ins, outs) -> None:
        packet = func._overloadpacket
        in_keys = [_key(t) for t in ins]
        if packet in _MATMULS and not any(k in self.excluded for k in in_keys):
            op_id = len(self.mm_flops)
            self.mm_flops[op_id] = float(flop_registry[packet](*args, **kwargs, out_val=out))
            if any(k in self.core for k in in_keys):
                self.core_mms.add(op_id)
            for t in outs:
                self.mm_sources.setdefault(_key(t), set()).add(op_id)
            return
        if packet in _SOFTMAXES:
            for k in in_keys:
                self.core_mms |= self.mm_sources.get(k, set())
            self.core.update(_key(t) for t in outs)
            return
        # Elementwise ops (same element count as an input) carry both marks forward: scale, mask, dropout.
        for t_in, k in zip(ins, in_keys):
            carries_core, sources = k in self.core, self.mm_sources.get(k)
            if not carries_core and not sources:
                continue
            for t in outs:
                if t.numel() == t_in.numel():
                    if carries_core:
                        self.core.add(_key(t))
                    if sources:
                        self.mm_sources.setdefault(_key(t), set()).update(sources)

    @property
    def core_flops(self) -> float:
        """FLOPs of the matmuls that belong to the attention core."""
        return sum(self.mm_flops[i] for i in self.core_mms)


def _attention_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """scaled_dot_product_attention as plain ops in the input dtype (same result, unfused)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    # Masks are added, not masked_fill'ed: an add saves nothing for backward, like a real attention kernel.
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        attn_mask = keep if attn_mask is None else attn_mask & keep
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(
            ~attn_mask, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = torch.dropout(probs, dropout_p, train=True)
    return torch.matmul(probs, value)


class _UnfusedAttention(TorchFunctionMode):
    """Routes scaled_dot_product_attention to `_attention_math` while a layer is counted."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention_math(*args, **kwargs)
        return func(*args, **kwargs)


def _prepare_args(call: LayerCall) -> tuple[tuple, dict]:
    """Fresh leaf copies of the recorded arguments; floating ones need grad unless they are model inputs."""
    flags = iter(call.from_input)

    def prep(v):
        if not isinstance(v, torch.Tensor):
            return v
        from_input = next(flags, False)
        leaf = v.detach()
        if leaf.is_floating_point() and not from_input:
            leaf.requires_grad_(True)
        return leaf

    return tree_map(prep, (call.args, call.kwargs))


def estimate_layer_cost(module: nn.Module, call: LayerCall, loss: TrainingLoss | None = None) -> LayerCost:
    """Count one layer (on meta) called with its recorded arguments: FLOPs, bytes, saved activations.

    With `loss` (the last layer only), the loss of the layer's output is part of the forward, backward starts from
    it, and what it saves counts as the layer's (one count per storage, so a tensor the layer already keeps is not
    counted twice).
    """
    args, kwargs = _prepare_args(call)
    excluded = {_key(t) for t in list(module.parameters()) + list(module.buffers())}
    saved: dict[int, float] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = _key(t)
        if k not in excluded:
            saved.setdefault(k, float(t.untyped_storage().nbytes()))
        return t

    fwd_meter = _OpMeter(excluded)
    with torch.enable_grad(), _UnfusedAttention(), FlopCounterMode(display=False) as fwd_counter, fwd_meter, \
            saved_tensors_hooks(pack, lambda t: t):
        output = module(*args, **kwargs)
        if loss is not None:
            output = loss(output)
    needs_grad = [t for t in tensors_of(output) if t.requires_grad]
    bwd_flops = bwd_bytes = 0.0
    if needs_grad:
        grads = [torch.ones_like(t) for t in needs_grad]
        bwd_meter = _OpMeter(excluded)
        with FlopCounterMode(display=False) as bwd_counter, bwd_meter:
            torch.autograd.backward(needs_grad, grads)
        grad_keys = {_key(p.grad) for p in module.parameters() if p.grad is not None}
        bwd_bytes = bwd_meter.bytes - sum(b for k, b in bwd_meter.outputs if k in grad_keys)
        bwd_flops = float(bwd_counter.get_total_flops())
    for p in module.parameters():
        p.grad = None
    return LayerCost(
        fwd_flops=float(fwd_counter.get_total_flops()),
        bwd_flops=bwd_flops,
        fwd_bytes=fwd_meter.bytes,
        bwd_bytes=max(bwd_bytes, 0.0),
        saved_bytes=sum(saved.values()),
        selective_saved_bytes=sum(b for k, b in saved.items() if k in fwd_meter.core),
        selective_fwd_flops=fwd_meter.core_flops,
        input_bytes=float(tensor_bytes((call.args, call.kwargs))),
        output_bytes=float(tensor_bytes(call.output)),
    )
