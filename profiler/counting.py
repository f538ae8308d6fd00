"""Counting one layer's costs on the meta device: FLOPs, bytes moved, saved activations, the attention core.

Everything here is for the whole batch the layer was called with; the caller divides by the batch size.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode`, forward and backward in separate passes.
- Bytes moved (roofline): for every aten op that produces data (views excluded), bytes of its tensor inputs and
  outputs, leaving out parameters and, in backward, the parameter gradients it writes (both are per step, not per
  sample).
- Roofline classes: the ops are split into what runs as separate kernels with different arithmetic intensity, so the
  planner can sum one roofline per class instead of hiding the memory-bound work under the GEMMs' time:
  weight GEMMs (FLOP-performing ops that read a parameter or write a parameter gradient), activation matmuls (FLOP
  ops between two activations: attention scores and context, intensity about the head dimension) and memory-bound
  ops (no FLOPs counted: layernorm, GELU, softmax, scale, mask, dropout, residual adds, bias-gradient sums, copies).
  For the memory-bound class also the bytes left when chains of memory-bound ops run as fused kernels: a tensor that
  a memory-bound op writes and only memory-bound ops read, that autograd does not save and that does not leave the
  layer, never goes to memory (its write and its reads drop out).
- Saved activations: every tensor autograd packs for backward (`saved_tensors_hooks`), counted once per storage
  and leaving out parameters and buffers.
- Attention core (for selective recompute): a softmax's output and everything elementwise derived from it (dropout,
  masks) is the core; its saved bytes are what selective recompute drops, and the activation-by-activation matmuls
  that feed or consume it (QK^T and scores x V) are the forward FLOPs it repeats.
- `scaled_dot_product_attention`: a layer that calls it is counted twice, as a non-fused matmul-softmax-matmul
  (`heads x s x s` probabilities saved) and as the fused kernel a GPU would run (no scores stored; causal FLOPs
  halved), and each call is described, so the planner can pick the count of the kernel its device runs
  (see `profiler.attention`).
- Dropout is counted as the GPU kernel runs it (`native_dropout`: one read, one write and a 1-byte mask; backward one
  kernel), not as the CPU/meta decomposition (allocate, bernoulli, divide, multiply with a mask in the input dtype).
- Ops that only alias their input (`_unsafe_view`) or only allocate (`empty_like`) move no data and count no bytes.
- Dispatched ops: every aten op the pass dispatches, views, aliases and allocations included (`fwd_ops` /
  `bwd_ops`); eager PyTorch pays a host cost for each (argument parsing, the dispatcher, autograd's node), kernel or
  not. Kernels are the data-producing subset.
- Transcendental elements (`profiler.transcendental`): elements each pass evaluates exp / log / tanh / erf on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from profiler import flop_formulas  # noqa: F401 - registers the grouped-matmul (MoE) FLOP formulas
from profiler.attention import AttentionCallInfo, AttentionRouting, causal_flop_fraction
from profiler.hf_tp_derived import expert_plan, is_conv1d
from profiler.loss import TrainingLoss
from profiler.recording import LayerCall, fresh_leaf_args, tensor_bytes, tensors_of
from profiler.transcendental import transcendental_elements

aten = torch.ops.aten
_MATMULS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm}
_SOFTMAXES = {aten._softmax, aten._safe_softmax, aten.softmax}
# Allocation without initialisation: no memory traffic on a GPU.
_ALLOCATIONS = {aten.empty_like, aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided}

if TYPE_CHECKING:
    from profiler.autocast import AutocastEmulation

logger = logging.getLogger(__name__)


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
    fwd_actmm_flops: float = 0.0
    fwd_actmm_bytes: float = 0.0
    fwd_membound_bytes: float = 0.0
    fwd_membound_fused_bytes: float = 0.0
    bwd_actmm_flops: float = 0.0
    bwd_actmm_bytes: float = 0.0
    bwd_membound_bytes: float = 0.0
    bwd_membound_fused_bytes: float = 0.0
    # Each scaled_dot_product_attention call, and the layer counted with them as fused kernels (None: no call, or
    # one the fused ops cannot take).
    attention: tuple[AttentionCallInfo, ...] = ()
    fused: LayerCost | None = None
    # Kernels each pass launches and the weight GEMMs by shape (see `weight_gemms`).
    fwd_kernels: int = 0
    bwd_kernels: int = 0
    # Every aten op each pass dispatches (kernels, views, aliases, allocations).
    fwd_ops: int = 0
    bwd_ops: int = 0
    gemms: tuple[GemmCount, ...] = ()
    # Elements each pass evaluates a transcendental function on (whole batch).
    fwd_transcendental_elements: float = 0.0
    bwd_transcendental_elements: float = 0.0


@dataclass(frozen=True)
class GemmCount:
    """GEMMs of one weight matrix with one shape in one layer call: M rows (whole batch), N x K weight."""

    module: str
    m: float
    n: int
    k: int
    fwd_count: int
    bwd_count: int


@dataclass(frozen=True)
class RooflineClasses:
    """FLOPs and bytes of one pass split by kernel class (the weight-GEMM class is the rest of the totals)."""

    actmm_flops: float
    actmm_bytes: float
    membound_bytes: float
    membound_fused_bytes: float


@dataclass
class _Op:
    """One data-producing aten op: FLOPs, whether it reads a parameter, what it reads and writes."""

    flops: float
    reads_param: bool
    param_keys: list[int]  # storage keys of the parameters it reads
    reads: list[tuple[int | None, float]]  # (record id of the tensor read, or None if made outside the pass; bytes)
    writes: list[tuple[int, int, float]]  # (storage key, record id, bytes)


def _from_module_tracker() -> bool:
    """Whether the op being dispatched comes from FlopCounterMode's module tracker (its forward hooks alias each
    module's inputs to follow backward): counting's own work, which an eager training step does not do."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith("module_tracker.py"):
            return True
        frame = frame.f_back
    return False


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _OpMeter(TorchDispatchMode):
    """Sums activation bytes per op and follows the attention core through the forward pass."""

    def __init__(self, excluded: set[int]) -> None:
        super().__init__()
        self.excluded = excluded
        self.bytes = 0.0
        self.dispatched = 0  # every op seen, views included
        self.transcendental = 0.0  # elements evaluated by exp / log / tanh / erf
        self.flops_skipped = 0.0  # counted by torch's FLOP formulas but skipped by a causal fused kernel
        self.outputs: list[tuple[int, float]] = []
        self.ops: list[_Op] = []
        self._record_of: dict[int, int] = {}  # storage key -> record id of the op output that last wrote it
        self._records = 0
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
        if not _from_module_tracker():
            self.dispatched += 1
            self.transcendental += transcendental_elements(func, args, kwargs, outs)
        if not func.is_view:
            self._record(func, args, kwargs, out, ins, outs)
        self._alive.extend(t.untyped_storage() for t in outs)
        self._follow_attention(func, args, kwargs, out, ins, outs)
        return out

    def _record(self, func, args, kwargs, out, ins, outs) -> None:
        packet = func._overloadpacket
        if packet in _ALLOCATIONS:
            return
        if not func._schema.is_mutable and {_key(t) for t in outs} & {_key(t) for t in ins}:
            return  # returns an alias of an input (e.g. _unsafe_view): no data moves
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
        if flops:
            kept = flops * causal_flop_fraction(func, args, kwargs)
            self.flops_skipped += flops - kept
            flops = kept
        reads, reads_param, param_keys = [], False, []
        for t in ins:
            k = _key(t)
            if k in self.excluded:
                reads_param = True
                param_keys.append(k)
                continue
            nbytes = float(t.numel() * t.element_size())
            self.bytes += nbytes
            reads.append((self._record_of.get(k), nbytes))
        writes = []
        for t in outs:
            k, nbytes = _key(t), float(t.numel() * t.element_size())
            self.bytes += nbytes
            self.outputs.append((k, nbytes))
            self._record_of[k] = self._records
            writes.append((k, self._records, nbytes))
            self._records += 1
        self.ops.append(_Op(flops=flops, reads_param=reads_param, param_keys=param_keys, reads=reads, writes=writes))

    @property
    def kernels(self) -> int:
        """Ops of this pass that launch a kernel: every data-producing op (views, aliases, allocations left out)."""
        return len(self.ops)

    def classes(self, keep: set[int], param_grads: set[int]) -> RooflineClasses:
        """Split this pass's FLOPs and bytes by kernel class (see the module docstring).

        keep: storage keys that must reach memory whatever reads them (saved for backward, the layer's outputs);
        param_grads: keys of parameter gradients (their writes are per step, so not counted, and the ops writing
        them are weight GEMMs or bias-gradient reductions).
        """
        actmm_flops = actmm_bytes = membound = 0.0
        writer_is_membound: dict[int, tuple[int, float, bool]] = {}  # record -> (key, bytes, memory-bound writer)
        readers: dict[int, list[tuple[bool, float]]] = {}
        for op in self.ops:
            writes_grad = any(k in param_grads for k, _, _ in op.writes)
            nbytes = sum(b for _, b in op.reads) + sum(b for k, _, b in op.writes if k not in param_grads)
            is_membound = op.flops == 0
            if is_membound:
                membound += nbytes
            elif not (op.reads_param or writes_grad):
                actmm_flops += op.flops
                actmm_bytes += nbytes
            for rec, b in op.reads:
                if rec is not None:
                    readers.setdefault(rec, []).append((is_membound, b))
            for k, rec, b in op.writes:
                writer_is_membound[rec] = (k, 0.0 if k in param_grads else b, is_membound)
        fused_away = 0.0
        for rec, (k, b, by_membound) in writer_is_membound.items():
            reads = readers.get(rec, [])
            if by_membound and reads and k not in keep and k not in param_grads and all(m for m, _ in reads):
                fused_away += b + sum(rb for _, rb in reads)
        return RooflineClasses(actmm_flops=actmm_flops, actmm_bytes=actmm_bytes, membound_bytes=membound,
                               membound_fused_bytes=max(membound - fused_away, 0.0))

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


def estimate_layer_cost(module: nn.Module, call: LayerCall, loss: TrainingLoss | None = None, *,
                        emulation: Callable[[], AutocastEmulation] | None = None) -> LayerCost:
    """Count one layer (on meta) called with its recorded arguments: FLOPs, bytes, saved activations.

    With `loss` (the last layer only), the loss of the layer's output is part of the forward, backward starts from
    it, and what it saves counts as the layer's (one count per storage, so a tensor the layer already keeps is not
    counted twice).

    A layer that calls scaled_dot_product_attention is counted again with the fused kernels (`LayerCost.fused`).
    With `emulation` (a factory: each count runs under a fresh one, `profiler.autocast`) only the forward is counted,
    under it: what the layer keeps when it trains that way.
    """
    def count(routing: AttentionRouting) -> LayerCost:
        return count_layer_call(module, call, loss, routing, emulation=emulation and emulation(),
                                forward_only=emulation is not None)

    routing = AttentionRouting(fused=False)
    cost = count(routing)
    if not routing.calls:
        return cost
    fused = None
    if all(c.fusable for c in routing.calls):
        try:
            fused = count(AttentionRouting(fused=True))
        except RuntimeError as exc:
            # A layer whose arguments carry state the first count changed (a Hugging Face key/value cache object
            # passed in kwargs) cannot be run again; its attention is then costed as the math kernel.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("%s: attention counted as the unfused kernel only (a second count failed: %s)",
                           type(module).__name__, reason[:160])
    return dataclasses.replace(cost, attention=tuple(routing.calls), fused=fused)


def count_layer_call(module: nn.Module, call: LayerCall, loss: TrainingLoss | None, routing: AttentionRouting, *,
                     emulation: AutocastEmulation | None = None, forward_only: bool = False) -> LayerCost:
    """Count one call of `module` with `routing` deciding how SDPA runs. `emulation`: run the forward under it
    (its parameter copies are not activations); `forward_only`: skip backward (its fields stay 0)."""
    args, kwargs = fresh_leaf_args(call)
    excluded = {_key(t) for t in list(module.parameters()) + list(module.buffers())}
    saved: dict[int, float] = {}
    param_casts = emulation.param_casts if emulation is not None else set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = _key(t)
        if k not in excluded and k not in param_casts:
            saved.setdefault(k, float(t.untyped_storage().nbytes()))
        return t

    fwd_meter = _OpMeter(excluded)
    with torch.enable_grad(), routing, emulation or contextlib.nullcontext(), \
            FlopCounterMode(display=False) as fwd_counter, fwd_meter, saved_tensors_hooks(pack, lambda t: t):
        output = module(*args, **kwargs)
        if loss is not None:
            output = loss(output)
    needs_grad = [] if forward_only else [t for t in tensors_of(output) if t.requires_grad]
    fwd_cls = fwd_meter.classes(set(saved) | {_key(t) for t in tensors_of(output)}, set())
    bwd_cls = RooflineClasses(0.0, 0.0, 0.0, 0.0)
    bwd_flops = bwd_bytes = 0.0
    bwd_ops: list[_Op] = []
    bwd_dispatched = bwd_transcendental = 0
    weights = {_key(p): (name.rpartition(".")[0], *_gemm_features(module, name, p))
               for name, p in module.named_parameters() if p.dim() >= 2}
    grad_of: dict[int, int] = {}
    if needs_grad:
        grads = [torch.ones_like(t) for t in needs_grad]
        bwd_meter = _OpMeter(excluded)
        with FlopCounterMode(display=False) as bwd_counter, bwd_meter:
            torch.autograd.backward(needs_grad, grads)
        grad_keys = {_key(p.grad) for p in module.parameters() if p.grad is not None}
        bwd_bytes = bwd_meter.bytes - sum(b for k, b in bwd_meter.outputs if k in grad_keys)
        bwd_flops = float(bwd_counter.get_total_flops()) - bwd_meter.flops_skipped
        input_grads = {_key(t.grad) for t in tensors_of((args, kwargs)) if t.grad is not None}
        bwd_cls = bwd_meter.classes(input_grads, grad_keys)
        bwd_ops = bwd_meter.ops
        bwd_dispatched, bwd_transcendental = bwd_meter.dispatched, bwd_meter.transcendental
        grad_of = {_key(p.grad): _key(p) for p in module.parameters() if p.grad is not None}
    for p in module.parameters():
        p.grad = None
    return LayerCost(
        fwd_flops=float(fwd_counter.get_total_flops()) - fwd_meter.flops_skipped,
        bwd_flops=bwd_flops,
        fwd_bytes=fwd_meter.bytes,
        bwd_bytes=max(bwd_bytes, 0.0),
        saved_bytes=sum(saved.values()),
        selective_saved_bytes=sum(b for k, b in saved.items() if k in fwd_meter.core),
        selective_fwd_flops=fwd_meter.core_flops,
        input_bytes=float(tensor_bytes((call.args, call.kwargs))),
        output_bytes=float(tensor_bytes(call.output)),
        fwd_actmm_flops=fwd_cls.actmm_flops,
        fwd_actmm_bytes=fwd_cls.actmm_bytes,
        fwd_membound_bytes=fwd_cls.membound_bytes,
        fwd_membound_fused_bytes=fwd_cls.membound_fused_bytes,
        bwd_actmm_flops=bwd_cls.actmm_flops,
        bwd_actmm_bytes=bwd_cls.actmm_bytes,
        bwd_membound_bytes=bwd_cls.membound_bytes,
        bwd_membound_fused_bytes=bwd_cls.membound_fused_bytes,
        fwd_kernels=fwd_meter.kernels,
        bwd_kernels=len(bwd_ops),
        fwd_ops=fwd_meter.dispatched,
        bwd_ops=bwd_dispatched,
        gemms=weight_gemms(fwd_meter.ops, bwd_ops, weights, grad_of),
        fwd_transcendental_elements=fwd_meter.transcendental,
        bwd_transcendental_elements=bwd_transcendental,
    )


def _gemm_features(layer: nn.Module, name: str, p: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the GEMMs that read parameter `name`: dim 0 and the rest for a Linear or convolution weight; a
    transformers Conv1D stores its weight (in, out); a mixture-of-experts stack (experts, N, K) is one weight per
    expert (`profiler.hf_tp_derived.EXPERT_PLANS`)."""
    owner_path = name.rpartition(".")[0]
    owner = layer.get_submodule(owner_path) if owner_path else layer
    if p.dim() == 2 and is_conv1d(owner):
        return int(p.shape[1]), int(p.shape[0])
    if p.dim() == 3 and expert_plan(owner) is not None:
        return int(p.shape[1]), int(p.shape[2])
    return int(p.shape[0]), p.numel() // p.shape[0]


def weight_gemms(fwd_ops: list[_Op], bwd_ops: list[_Op], weights: dict[int, tuple[str, int, int]],
                 grad_of: dict[int, int]) -> tuple[GemmCount, ...]:
    """The weight GEMMs of one layer call, grouped by weight and shape.

    weights: storage key of each parameter of 2 or more dims -> (owning module, N = dim 0, K = the other dims);
    grad_of: storage key of a parameter gradient -> key of its parameter. A FLOP-performing op that reads such a
    weight is a forward GEMM or an input-gradient GEMM; one that writes its gradient is a weight-gradient GEMM (a
    convolution backward doing both is two GEMMs sharing its FLOPs). M = FLOPs / (2 N K) whatever the op's layout.
    """
    found: dict[tuple[str, float, int, int], list[int]] = {}
    for slot, ops in ((0, fwd_ops), (1, bwd_ops)):
        for op in ops:
            if op.flops <= 0:
                continue
            keys = [k for k in op.param_keys if k in weights]
            keys += [grad_of[k] for k, _, _ in op.writes if grad_of.get(k) in weights]
            for k in keys:
                module, n, kk = weights[k]
                m = op.flops / len(keys) / (2 * n * kk)
                found.setdefault((module, m, n, kk), [0, 0])[slot] += 1
    return tuple(GemmCount(module=mod, m=m, n=n, k=k, fwd_count=c[0], bwd_count=c[1])
                 for (mod, m, n, k), c in found.items())
