"""`profile(model, example_inputs)`: one call from any nn.Module to a `ModelProfile`.

Counting (FLOPs, bytes, memory, layer graph, tensor parallelism) always happens on a meta copy of the model, so it
allocates no weights and works for models far larger than the machine; on device "cpu" / "cuda" the layers and a
whole step are also timed. Layers with the same structure and inputs (the blocks of a transformer) are counted and
timed once and the result copied, which keeps a 70B model under a few seconds. A training loss, when given, is
counted and timed as part of the last layer (see `profiler.loss`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.model_profile import (
    AttentionCall,
    AttentionMask,
    AutocastActivations,
    DType,
    FusedAttentionCosts,
    InputSpec,
    LayerProfile,
    ModelProfile,
    ProfileMode,
    StepMeasurement,
    TensorSpec,
    WeightGemm,
)
from profiler import cache as profile_cache
from profiler import hf
from profiler.attention import AttentionCallInfo
from profiler.autocast import count_autocast_layers
from profiler.counting import LayerCost, estimate_layer_cost
from profiler.errors import ProfileError
from profiler.graph import build_layer_graph
from profiler.hashing import layer_signature, structure_hash
from profiler.layers import call_order, find_layers
from profiler.loss import TrainingLoss, loss_name, targets_signature
from profiler.measure import estimate_times
from profiler.partition import partition, positional_inputs
from profiler.recording import cast_inputs, device_copy, meta_copy, record_calls, tensors_of
from profiler.tensor_parallel import detect_tensor_parallel
from profiler.vocab_parallel import detect_vocab_parallel, merge_specs

logger = logging.getLogger(__name__)

#: progress(description, steps done, steps in total)
ProgressFn = Callable[[str, int, int], None]

_DTYPE_NAMES = {
    "float32": DType.FP32, "fp32": DType.FP32, "float": DType.FP32, "tf32": DType.TF32,
    "bfloat16": DType.BF16, "bf16": DType.BF16, "float16": DType.FP16, "fp16": DType.FP16, "half": DType.FP16,
}
_TORCH_DTYPES = {DType.FP32: torch.float32, DType.TF32: torch.float32, DType.BF16: torch.bfloat16,
                 DType.FP16: torch.float16}


def _resolve_dtype(model: nn.Module, dtype: Any) -> DType:
    if dtype is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    if isinstance(dtype, DType):
        return dtype
    if isinstance(dtype, torch.dtype):
        for d, t in _TORCH_DTYPES.items():
            if t == dtype and d != DType.TF32:
                return d
        raise ProfileError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ProfileError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


def _check_device(device: str) -> str:
    device = str(device)
    if device == "meta" or device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ProfileError(f"device '{device}' asked for, but CUDA is not available; use 'cpu' or 'meta'")
        return device
    raise ProfileError(f"unknown device '{device}'; use 'meta' (analytic), 'cpu' or 'cuda'")


def _input_spec(inputs: tuple, seq_len: int | None) -> InputSpec:
    tensors = tensors_of(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise ProfileError("example inputs must contain at least one tensor with a batch dimension first")
    first = tensors[0]
    if seq_len is None and first.dim() >= 2 and (not first.is_floating_point() or first.dim() == 3):
        seq_len = int(first.shape[1])  # token ids (B, S) or hidden states (B, S, H)
    return InputSpec(
        batch_size=int(first.shape[0]),
        seq_len=seq_len,
        tensors=[TensorSpec(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch.")) for t in tensors],
    )


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: the argument, else $AUTOPAR_CACHE_DIR, else ~/.cache/autopar."""
    return Path(cache_dir or os.environ.get("AUTOPAR_CACHE_DIR") or Path.home() / ".cache" / "autopar")


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    device: str = "meta",
    dtype: Any = None,
    layers: list[str] | None = None,
    name: str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    seq_len: int | None = None,
    loss_fn: Callable | None = None,
    targets: Any = None,
    source_files: tuple[str, ...] = (),
) -> ModelProfile:
    """Profile `model` called as `model(*example_inputs)`, per layer (see `ModelProfile` for every field).

    device: "meta" counts only (analytic); "cpu" / "cuda" also times each layer and a whole step.
    dtype: precision to profile in (default: the model's); layers: explicit layer module names (default: found
    automatically); cache / cache_dir: reuse profiles on disk (default dir $AUTOPAR_CACHE_DIR or ~/.cache/autopar);
    progress: called as progress(description, done, total); seq_len: tokens per sample if not dim 1 of the input.
    loss_fn: the training loss, counted (and timed) as part of the last layer, whose output must be the model's
    output: called as loss_fn(output, targets), or as loss_fn(output) when targets is None (no targets are made up);
    it must return a scalar. Without loss_fn, a transformers model given `labels` has the loss it computes from them
    counted this way (`profiler.hf.labels_as_targets`); any other model's backward starts from a gradient of ones on
    its output.
    source_files: files beside the model's classes whose code shapes it (a factory's file): part of the cache key.
    """
    return _profile(model, example_inputs, device=device, dtype=dtype, layers=layers, name=name, warmup=warmup,
                    repeats=repeats, cache=cache, cache_dir=cache_dir, progress=progress, seq_len=seq_len,
                    loss_fn=loss_fn, targets=targets, owned=False, source_files=source_files)


def _check_loss_layer(names: list[str], records: dict, loss_fn: Callable) -> None:
    """The loss is counted with the last layer, so what it reads of the model's output (all of it, or what its
    `reads(output)` gives) must be exactly that layer's output."""
    last = records[names[-1]].output
    model_out = records["<output>"].output
    if callable(getattr(loss_fn, "reads", None)):
        model_out = loss_fn.reads(model_out)
    if getattr(loss_fn, "post", None) is not None:
        # the model's forward transforms the head's logits elementwise before its loss (profiler.hf.LabelsLoss.post,
        # known by its source line), and the loss counted with the last layer applies the same transform
        same = [(t.shape, t.dtype) for t in tensors_of(model_out)] == [(t.shape, t.dtype) for t in tensors_of(last)]
        if same:
            return
    if [id(t) for t in tensors_of(model_out)] != [id(t) for t in tensors_of(last)]:
        raise ProfileError(
            f"loss_fn is applied to the model's output, but the last layer '{names[-1] or '(model)'}' does not "
            "return it (the model's forward changes it afterwards, or the layers leave out the module that makes "
            "it); move that computation into the last layer or into loss_fn, or list the layers up to the output"
        )


def _profile(model, example_inputs, *, device, dtype, layers, name, warmup, repeats, cache, cache_dir, progress,
             seq_len, loss_fn, targets, owned, source_files=()) -> ModelProfile:
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ProfileError(f"expected an nn.Module to profile, got {type(model).__name__}")
    if warmup < 0 or repeats < 1:
        raise ProfileError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    device = _check_device(device)
    if loss_fn is not None and not callable(loss_fn):
        raise ProfileError(f"loss_fn must be callable as loss_fn(output, targets), got {type(loss_fn).__name__}")
    inputs = hf.meta_safe_inputs(model, positional_inputs(model, example_inputs))
    if loss_fn is None and targets is None:  # a transformers model's own loss from `labels` (profiler.hf)
        inputs, loss_fn, targets = hf.labels_as_targets(model, inputs)
    dt = _resolve_dtype(model, dtype)
    spec = _input_spec(inputs, seq_len)
    batch = spec.batch_size
    name = name or type(model).__name__
    shash = structure_hash(model)
    loss_key = None if loss_fn is None else {"fn": loss_name(loss_fn), "targets": targets_signature(targets)}
    key = profile_cache.cache_key(shash, spec, dt.value, device, layers, (warmup, repeats), loss_key,
                                  code=profile_cache.code_fingerprint(model, loss_fn, source_files))
    directory = default_cache_dir(cache_dir)
    if cache and (hit := profile_cache.load(directory, key)) is not None:
        logger.info("profile of %s loaded from the cache (%s)", name, directory)
        return hit.model_copy(update={"name": name})
    report = progress or (lambda _d, _i, _n: None)

    report("tracing", 0, 1)
    torch_dtype = _TORCH_DTYPES[dt]
    meta_model = meta_copy(model, torch_dtype)
    hf.prepare_copy(meta_model, torch_dtype)
    meta_inputs = cast_inputs(inputs, "meta", torch_dtype)
    names = find_layers(meta_model, call_order(meta_model, meta_inputs), layers)
    hf.annotate_tp(meta_model, names)  # a transformers model's own tp plan, where it has one
    records = record_calls(meta_model, meta_inputs, names, clone=False)
    hf.drop_caches(records)
    cuts = partition(meta_model, names, meta_inputs)
    graph = build_layer_graph(meta_model, names, records, meta_inputs, batch, traced=cuts.graph)
    if cuts.trace_error is not None and len(names) > 1:
        logger.warning("%s can run with pp=1 only: %s", name, cuts.why_illegal(1))

    signature = {
        n: layer_signature(meta_model.get_submodule(n), records[n].args, records[n].kwargs, records[n].from_input)
        for n in names
    }
    meta_loss = None
    if loss_fn is not None:
        _check_loss_layer(names, records, loss_fn)
        meta_loss = TrainingLoss.on_device(loss_fn, targets, "meta", torch_dtype)
        # The loss makes the last layer unlike any other layer of the same shape.
        signature[names[-1]] += f"+loss:{meta_loss.name}"
    unique: dict[str, str] = {}
    for n in names:
        unique.setdefault(signature[n], n)
    measured = device != "meta"
    total = len(unique) + (warmup + repeats if measured else 0)
    costs: dict[str, LayerCost] = {}
    tp = {}
    for i, (sig, n) in enumerate(unique.items()):
        report(f"counting {n}", i, total)
        module = meta_model.get_submodule(n)
        costs[sig] = estimate_layer_cost(module, records[n], meta_loss if n == names[-1] else None)
        tp[sig] = detect_tensor_parallel(module, records[n], batch)

    autocast = None
    if torch_dtype in (torch.bfloat16, torch.float16):  # plans that train under torch.autocast keep other dtypes
        report("counting under autocast", len(unique), total)
        autocast = count_autocast_layers(model, inputs, names, unique, loss_fn, targets, torch_dtype)

    times: dict[str, tuple[float, float]] = {}
    step = None
    device_name = None
    if measured:
        real_model = device_copy(model, device, torch_dtype, owned=owned)
        real_inputs = cast_inputs(inputs, device, torch_dtype)
        real_loss = None if loss_fn is None else TrainingLoss.on_device(loss_fn, targets, device, torch_dtype)
        # Only the layers that get timed need their real inputs kept.
        real_records = record_calls(real_model, real_inputs, list(unique.values()), clone=True)
        hf.drop_caches(real_records)
        timings = estimate_times(
            real_model, real_inputs, {sig: (real_model.get_submodule(n), real_records[n]) for sig, n in unique.items()},
            device=device, warmup=warmup, repeats=repeats,
            progress=lambda i, rounds: report(f"timing round {i + 1}/{rounds}", len(unique) + i, total),
            loss=None if real_loss is None else (signature[names[-1]], real_loss),
        )
        del real_records
        times = timings.layers
        step = StepMeasurement(fwd_bwd_seconds=timings.step_seconds, peak_memory_bytes=timings.peak_memory_bytes)
        if device.startswith("cuda"):
            device_name = torch.cuda.get_device_name(torch.device(device))
    report("done", total, total)

    vocab = detect_vocab_parallel(meta_model, names, records, batch)  # per layer name: tied weights count once
    layer_tp = {n: merge_specs(tp[signature[n]], vocab.get(n)) for n in names}
    layer_profiles = _layer_profiles(meta_model, names, signature, costs, layer_tp, times, batch, autocast or {})
    result = ModelProfile(
        name=name,
        structure_hash=shash,
        input=spec,
        dtype=dt,
        device=device,
        device_name=device_name,
        mode=ProfileMode.MEASURED if measured else ProfileMode.ANALYTIC,
        layers=layer_profiles,
        edges=graph.edges,
        cut_points=cuts.legal_cuts,
        step=step,
        profile_seconds=time.perf_counter() - started,
        torch_version=torch.__version__,
    )
    logger.info("profiled %s: %d layers (%d distinct), graph from %s, %.2f s", name, len(names), len(unique),
                graph.method, result.profile_seconds)
    if cache:
        profile_cache.store(directory, key, result)
    return result


def _layer_profiles(meta_model, names, signature, costs, layer_tp, times, batch, autocast) -> list[LayerProfile]:
    seen: set[int] = set()
    out = []
    for index, n in enumerate(names):
        module = meta_model.get_submodule(n)
        params = [p for p in module.parameters() if id(p) not in seen]
        shared = [p for p in module.parameters() if id(p) in seen]
        buffers = [b for b in module.buffers() if id(b) not in seen]
        seen.update(id(t) for t in params + buffers)
        cost = costs[signature[n]]
        fwd_s, bwd_s = times.get(signature[n], (None, None))
        out.append(LayerProfile(
            index=index,
            name=n,
            module_type=type(module).__name__,
            param_count=sum(p.numel() for p in params),
            param_tensors=len(params),
            shared_param_count=sum(p.numel() for p in shared),
            active_param_count=hf.active_param_count(module, params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
            fwd_flops=cost.fwd_flops / batch,
            bwd_flops=cost.bwd_flops / batch,
            fwd_bytes=cost.fwd_bytes / batch,
            bwd_bytes=cost.bwd_bytes / batch,
            saved_activation_bytes=cost.saved_bytes / batch,
            input_bytes=cost.input_bytes / batch,
            output_bytes=cost.output_bytes / batch,
            selective_saved_bytes=cost.selective_saved_bytes / batch,
            selective_fwd_flops=cost.selective_fwd_flops / batch,
            fwd_actmm_flops=cost.fwd_actmm_flops / batch,
            fwd_actmm_bytes=cost.fwd_actmm_bytes / batch,
            fwd_membound_bytes=cost.fwd_membound_bytes / batch,
            fwd_membound_fused_bytes=cost.fwd_membound_fused_bytes / batch,
            bwd_actmm_flops=cost.bwd_actmm_flops / batch,
            bwd_actmm_bytes=cost.bwd_actmm_bytes / batch,
            bwd_membound_bytes=cost.bwd_membound_bytes / batch,
            bwd_membound_fused_bytes=cost.bwd_membound_fused_bytes / batch,
            fwd_seconds=None if fwd_s is None else fwd_s / batch,
            bwd_seconds=None if bwd_s is None else bwd_s / batch,
            tp=layer_tp[n],
            attention=[_attention_call(c, batch) for c in cost.attention],
            fused_attention=None if cost.fused is None else _fused_costs(cost.fused, batch),
            autocast=_autocast_activations(autocast.get(signature[n]), batch),
            fwd_kernels=cost.fwd_kernels,
            bwd_kernels=cost.bwd_kernels,
            fwd_ops=cost.fwd_ops,
            bwd_ops=cost.bwd_ops,
            fwd_transcendental_elements=cost.fwd_transcendental_elements / batch,
            bwd_transcendental_elements=cost.bwd_transcendental_elements / batch,
            gemms=[WeightGemm(module=g.module, m=g.m / batch, n=g.n, k=g.k, fwd_count=g.fwd_count,
                              bwd_count=g.bwd_count) for g in cost.gemms],
        ))
    return out


def _autocast_activations(cost: LayerCost | None, batch: int) -> AutocastActivations | None:
    if cost is None:
        return None
    fused = cost.fused
    return AutocastActivations(
        saved_activation_bytes=cost.saved_bytes / batch, selective_saved_bytes=cost.selective_saved_bytes / batch,
        input_bytes=cost.input_bytes / batch, output_bytes=cost.output_bytes / batch,
        fused_saved_activation_bytes=None if fused is None else fused.saved_bytes / batch,
        fused_selective_saved_bytes=None if fused is None else fused.selective_saved_bytes / batch,
    )


def _attention_call(c: AttentionCallInfo, batch: int) -> AttentionCall:
    dtype = next((d for d, t in _TORCH_DTYPES.items() if t == c.dtype and d != DType.TF32), DType.FP32)
    return AttentionCall(
        heads=max(c.batch_heads // batch, 1), kv_heads=max(c.kv_batch_heads // batch, 1), q_len=c.q_len,
        kv_len=c.kv_len, head_dim=c.head_dim, v_head_dim=c.v_head_dim, causal=c.causal,
        mask=AttentionMask(c.mask), dropout=c.dropout, dtype=dtype,
    )


def _fused_costs(cost: LayerCost, batch: int) -> FusedAttentionCosts:
    """The fused-attention count per sample (`LayerCost.saved_bytes` is the profile's saved_activation_bytes)."""
    # kernels and dispatched ops do not grow with the batch
    per_call = ("saved_activation_bytes", "fwd_kernels", "bwd_kernels", "fwd_ops", "bwd_ops")
    per_sample = {name: getattr(cost, name) / batch for name in FusedAttentionCosts.model_fields
                  if name not in per_call}
    return FusedAttentionCosts(saved_activation_bytes=cost.saved_bytes / batch, fwd_kernels=cost.fwd_kernels,
                               bwd_kernels=cost.bwd_kernels, fwd_ops=cost.fwd_ops, bwd_ops=cost.bwd_ops,
                               **per_sample)


def profile_zoo(
    name: str,
    *,
    batch_size: int = 1,
    device: str = "meta",
    dtype: str = "float32",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    layers: list[str] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    progress: ProgressFn | None = None,
    with_loss: bool = True,
    **size_options: Any,
) -> ModelProfile:
    """Profile a zoo model by name (`autopar profile gpt2-medium`); size_options override its config fields.

    with_loss: count (and time) the model's training loss on synthetic targets as part of the last layer, as
    `profile(..., loss_fn=, targets=)` does; False profiles the model alone.
    """
    from profiler.zoo import get_model

    if batch_size < 1:
        raise ProfileError(f"batch_size must be at least 1, got {batch_size}")
    zoo_model = get_model(name, **size_options)
    device = _check_device(device)
    # Built in float32 (the structure hash does not depend on the profiled dtype); profile() converts its copies.
    model = zoo_model.build(device=device)
    inputs, targets = zoo_model.synthetic_batch(batch_size, device=device)
    return _profile(model, inputs, device=device, dtype=dtype, layers=layers, name=name, warmup=warmup,
                    repeats=repeats, cache=cache, cache_dir=cache_dir, progress=progress, seq_len=zoo_model.seq_len,
                    loss_fn=zoo_model.loss_fn if with_loss else None, targets=targets if with_loss else None,
                    owned=True)
