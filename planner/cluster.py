"""The cluster contract: devices, their peak rates and the links between them, plus presets for common machines.

Bandwidths are bytes per second *per GPU, per direction*; latencies are seconds. A `ClusterSpec` is plain data: the
cost model (`planner.cost`) reads its coefficients from here rather than from constants in code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from planner.errors import AutoparError
from planner.model_profile import DType
from planner.validation import (
    BANDWIDTH_RANGE,
    MAX_SECONDS,
    PEAK_FLOPS_RANGE,
    Contract,
    check_fields,
    check_number,
)

CLUSTER_SCHEMA_VERSION = 1

GB = 1e9
GiB = 1024**3


class ClusterError(AutoparError):
    """A cluster description that cannot be used, with what to change."""


class _Strict(Contract):
    @model_validator(mode="after")
    def _physical_ranges(self) -> _Strict:
        check_fields(self)  # finite, and bytes / seconds within planner.validation's bounds
        return self


class DeviceSpec(_Strict):
    """One accelerator (or one CPU worker of a gloo test cluster)."""

    name: str = Field(description="Human-readable device name.")
    type: Literal["cuda", "cpu"] = Field(
        default="cuda", description="torch device type the executor uses: 'cuda' (NCCL) or 'cpu' (gloo)."
    )
    memory_bytes: int = Field(gt=0, description="Usable device memory in bytes.")
    peak_flops: dict[DType, float] = Field(description="Dense peak FLOP/s per dtype (no sparsity).")
    memory_bandwidth: float = Field(gt=0, description="Device memory bandwidth in bytes/s.")
    kernel_overhead_seconds: float = Field(
        default=0.0, ge=0,
        description="Fixed seconds each kernel of a layer costs on top of its roofline (eager dispatch and launch); "
                    "applies to profiles that count kernels. 0 = no per-kernel cost.",
    )
    op_dispatch_seconds: float = Field(
        default=0.0, ge=0,
        description="Host seconds of each dispatched aten op that launches no kernel (views, aliases, allocations, "
                    "autograd's bookkeeping): argument parsing, the dispatcher, the autograd node. A kernel's own "
                    "dispatch is inside kernel_overhead_seconds. Applies to profiles that count ops. 0 = none.",
    )
    transcendental_element_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds per element an op evaluates exp / log / tanh / erf on (GELU, softmax, log-softmax, "
                    "fused attention's scores), on top of its bytes: what a CPU core spends computing them. 0 = "
                    "memory-bound (GPUs' special-function units outpace memory); needs a profile that counts them.",
    )
    gemm_ramp_seconds: float = Field(
        default=0.0, ge=0,
        description="Fixed seconds each weight GEMM costs on top of FLOPs / (peak * compute_efficiency): GEMM "
                    "efficiency = compute_efficiency * W / (W + peak * compute_efficiency * ramp) for W FLOPs, so "
                    "small (or TP-split) GEMMs run further below the ceiling. 0 = every GEMM at the ceiling.",
    )
    # Host-side framework work, each charged where the executor does it (planner.cost.FrameworkOverhead); 0 = none.
    tp_module_overhead_seconds: float = Field(
        default=0.0, ge=0,
        description="Extra seconds of a tensor-parallel (DTensor) sharded module per pass (forward or backward) "
                    "over the same module on plain tensors, when tp > 1.",
    )
    fsdp_unit_overhead_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds per FSDP2 / `replicate` unit (a layer with parameters) per micro-batch: its pre/post "
                    "forward and backward hooks, beyond the collectives the communication model charges.",
    )
    fsdp_tensor_overhead_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds per parameter tensor of an FSDP2 / `replicate` unit per micro-batch (FSDP2 unshards, "
                    "reshards and reduces each tensor's shard on its own), on top of fsdp_unit_overhead_seconds.",
    )
    ddp_bucket_overhead_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds DDP adds per gradient bucket per step beyond its all-reduce (bucket preparation, the "
                    "reducer's bookkeeping): charged with each bucket's collective latency.",
    )
    optimizer_tensor_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds of the optimizer's step per plain parameter tensor, beyond the bytes it moves "
                    "(AdamW's per-tensor loop); needs a profile that counts parameter tensors.",
    )
    optimizer_dtensor_seconds: float = Field(
        default=0.0, ge=0,
        description="As optimizer_tensor_seconds, for a DTensor parameter (FSDP2 / replicate, or TP-sharded).",
    )
    runtime_memory_bytes: int = Field(
        default=0, ge=0,
        description="Memory each rank's runtime holds once it trains, beyond the model's tensors: on CUDA the CUDA "
                    "context and NCCL's buffers; on CPU the autograd engine's threads, the communicators' buffers "
                    "and Python's objects (executor.runtime_memory). 0 = not counted.",
    )
    dtensor_runtime_memory_bytes: int = Field(
        default=0, ge=0,
        description="Further runtime memory of a rank whose parameters are DTensors (FSDP2 / ZeRO, tensor "
                    "parallelism): sharding-propagation caches, FSDP2's per-parameter state and hooks.",
    )
    pipeline_microbatch_overhead_seconds: float = Field(
        default=0.0, ge=0,
        description="Seconds per micro-batch per pipeline stage of the pipelining schedule's own work (send / recv "
                    "bookkeeping, forward and backward dispatch), beyond the sends' link time.",
    )

    @field_validator("peak_flops")
    @classmethod
    def _positive_rates(cls, v: dict[DType, float]) -> dict[DType, float]:
        if not v:
            raise ValueError("peak_flops needs at least one dtype, e.g. {'bfloat16': 312e12}")
        for dtype, rate in v.items():
            check_number(f"peak_flops[{dtype.value}]", rate, *PEAK_FLOPS_RANGE, "FLOP/s")
        return v

    @field_validator("memory_bandwidth")
    @classmethod
    def _bandwidth_range(cls, v: float) -> float:
        return check_number("memory_bandwidth", v, *BANDWIDTH_RANGE, "bytes/s")


class LinkSpec(_Strict):
    """A communication link as an alpha-beta model: time(bytes) = latency + bytes / bandwidth."""

    bandwidth: float = Field(gt=0, description="Bytes/s per GPU per direction.")
    latency: float = Field(ge=0, description="Seconds of fixed cost per message.")

    @model_validator(mode="after")
    def _link_ranges(self) -> LinkSpec:
        check_number("bandwidth", self.bandwidth, *BANDWIDTH_RANGE, "bytes/s")
        check_number("latency", self.latency, 0.0, MAX_SECONDS, "s")
        return self


class CollectivePasses(_Strict):
    """What each collective costs in ring passes (one pass: a reduce-scatter's n-1 steps of 1/n of the data each,
    bandwidth and per-step latency). NCCL's rings make an all-reduce of two passes and an all-gather or a
    reduce-scatter of one (the defaults). Other backends differ: gloo on CPU runs its all-gather about as long as an
    all-reduce and its reduce-scatter longer still (`autopar calibrate` measures them)."""

    all_reduce: float = Field(default=2.0, gt=0, description="Passes of an all-reduce.")
    all_gather: float = Field(default=1.0, gt=0, description="Passes of an all-gather.")
    reduce_scatter: float = Field(default=1.0, gt=0, description="Passes of a reduce-scatter.")


class ClusterSpec(_Strict):
    """A homogeneous cluster: `nodes` x `gpus_per_node` identical devices."""

    schema_version: int = Field(default=CLUSTER_SCHEMA_VERSION)
    name: str = Field(default="custom", description="Preset or user-given name.")
    nodes: int = Field(ge=1, description="Number of nodes.")
    gpus_per_node: int = Field(ge=1, description="Devices per node.")
    device: DeviceSpec
    intra_node: LinkSpec = Field(description="Link between devices of one node (NVLink, PCIe, loopback).")
    inter_node: LinkSpec = Field(description="Per-GPU share of the network between nodes (InfiniBand, RoCE, ...).")
    compute_efficiency: float = Field(
        default=0.6, gt=0, le=1, description="Fraction of peak FLOP/s that large GEMMs achieve (roofline factor)."
    )
    memory_efficiency: float = Field(
        default=0.8, gt=0, le=1, description="Fraction of peak memory bandwidth that memory-bound ops achieve."
    )
    comm_efficiency: float = Field(
        default=0.8, gt=0, le=1, description="Fraction of link bandwidth collectives achieve (NCCL bus bandwidth)."
    )
    collective_latency: float = Field(
        default=8.4e-6, ge=0,
        description="Fixed seconds per collective call on top of its per-step link latencies (NCCL's ring base "
                    "latency, `baseLat` of the Simple protocol in NCCL's src/graph/tuning.cc).",
    )
    collective_passes: CollectivePasses = Field(
        default_factory=CollectivePasses,
        description="Ring passes each collective costs (NCCL: 2 / 1 / 1; measured by autopar calibrate).",
    )
    memory_margin: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of device memory held back for fragmentation and buffers."
    )
    overlap_dp_comm: bool = Field(
        default=True, description="Whether data-parallel gradient communication overlaps the backward pass."
    )
    fused_elementwise: bool = Field(
        default=False,
        description="Whether chains of memory-bound elementwise ops run as fused kernels (Megatron's fused "
                    "scale-mask-softmax / bias-GELU / bias-dropout-add, torch.compile): intermediates between them "
                    "that autograd does not save never reach memory. False = eager PyTorch, one kernel per op.",
    )

    @property
    def world_size(self) -> int:
        """Total number of devices."""
        return self.nodes * self.gpus_per_node

    @model_validator(mode="after")
    def _version(self) -> ClusterSpec:
        if self.schema_version != CLUSTER_SCHEMA_VERSION:
            raise ValueError(f"cluster schema_version {self.schema_version} is not supported")
        return self

    def peak_flops_for(self, dtype: DType) -> float:
        """Peak FLOP/s for `dtype`, with a clear error when the device spec lacks it."""
        if dtype not in self.device.peak_flops:
            have = ", ".join(d.value for d in self.device.peak_flops)
            raise ClusterError(
                f"cluster '{self.name}' has no peak FLOP/s for {dtype.value} (it has: {have}); profile the model in "
                f"one of those dtypes or add peak_flops.{dtype.value} to the cluster file"
            )
        return self.device.peak_flops[dtype]

    def with_overrides(self, **overrides: object) -> ClusterSpec:
        """A copy with top-level fields replaced (e.g. nodes=4), validated again."""
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return _validate(data, source=f"overrides of '{self.name}'")


# Eager PyTorch on A100 / H100: a kernel costs ~5 us of launch and dispatch however little it does (the latency CUDA
# graphs remove, PyTorch's "Accelerating PyTorch with CUDA Graphs" post). cuBLAS throughput curves (NVIDIA's "GEMM
# performance" guide, square fp16 GEMMs) approach the large-size rate only above ~2^31 FLOPs and run at about half
# of it around 1 GFLOP: modelled as a fixed ~3 us per GEMM (half the ceiling at 0.6 GFLOP on A100, 1.8 on H100). Rough readings
# of published curves, not a measurement; a cluster file may replace them.
# The host-side framework terms (tp_module / fsdp_unit / optimizer tensor / pipeline micro-batch overheads) stay 0 on
# the GPU presets: there the host enqueues kernels asynchronously and its bookkeeping (tens of microseconds per
# module) hides behind device work that, at the sizes these presets are used for, takes milliseconds per layer;
# `autopar calibrate` measures them on a real machine when they matter (small models, CPU).
# `op_dispatch_seconds` (host cost of each view / alias op) stays 0 there for the same reason: the host dispatches
# ahead of the queued kernels, so only the per-kernel launch cost shows in a step.
# `transcendental_element_seconds` stays 0 there: an A100's special-function units return 16 exp/log/tanh results per
# clock per SM (CUDA C Programming Guide, "Arithmetic Instructions" throughput table, compute capability 8.0), 108 SMs
# x 1.41 GHz x 16 = 2.4e12 per second, ten times the ~2.5e11 fp32 elements per second its memory reads and writes.
_GPU_KERNEL_COSTS = {"kernel_overhead_seconds": 5e-6, "gemm_ramp_seconds": 3e-6}


#: Fraction of the A100's 16-bit peak that large GEMMs sustain, calibrated on Megatron-LM SC'21 Tables 1 and 2
#: together (bench/megatron_table1.py, bench/megatron_table2.py): the GEMM-bound rows (h >= 12288) reach 52% of peak
#: end to end with 4-10% of their step in pipeline bubbles, TP communication and memory-bound kernels, which needs
#: GEMMs at 0.7-0.8 of peak; 0.6 (the generic default) predicts every large row 15-20% too slow.
_A100_GEMM_CEILING = 0.75


def _a100(memory_gib: int) -> dict:
    return {
        "name": f"NVIDIA A100-SXM4-{memory_gib}GB",
        "type": "cuda",
        "memory_bytes": memory_gib * GiB,
        "peak_flops": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12},
        "memory_bandwidth": 2039 * GB if memory_gib == 80 else 1555 * GB,
        **_GPU_KERNEL_COSTS,
    }


_NVLINK_STEP, _NET_STEP = 3.4e-6, 9.6e-6  # seconds per ring step (see PRESETS)

_H100 = {
    "name": "NVIDIA H100-SXM5-80GB",
    "type": "cuda",
    "memory_bytes": 80 * GiB,
    "peak_flops": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12},
    "memory_bandwidth": 3350 * GB,
    **_GPU_KERNEL_COSTS,
}

# Published datasheet figures. NVLink bandwidth is the per-direction half of the bidirectional figure; the
# inter-node link is one InfiniBand adapter per GPU (HDR 200 Gb/s on DGX A100, NDR 400 Gb/s on DGX/HGX H100/H200).
# Link latencies are per ring step, NCCL's own figures for the Simple protocol (src/graph/tuning.cc `hwLat`, Ring:
# NVLink 3.4 us, network 9.6 us); `collective_latency` keeps NCCL's base latency per call.
PRESETS: dict[str, dict] = {
    "dgx-a100-40gb": {
        "name": "dgx-a100-40gb", "nodes": 1, "gpus_per_node": 8, "device": _a100(40),
        "intra_node": {"bandwidth": 300 * GB, "latency": _NVLINK_STEP},
        "inter_node": {"bandwidth": 25 * GB, "latency": _NET_STEP},
        "compute_efficiency": _A100_GEMM_CEILING,
    },
    "dgx-a100-80gb": {
        "name": "dgx-a100-80gb", "nodes": 1, "gpus_per_node": 8, "device": _a100(80),
        "intra_node": {"bandwidth": 300 * GB, "latency": _NVLINK_STEP},
        "inter_node": {"bandwidth": 25 * GB, "latency": _NET_STEP},
        "compute_efficiency": _A100_GEMM_CEILING,
    },
    "dgx-h100": {
        "name": "dgx-h100", "nodes": 1, "gpus_per_node": 8, "device": _H100,
        "intra_node": {"bandwidth": 450 * GB, "latency": _NVLINK_STEP},
        "inter_node": {"bandwidth": 50 * GB, "latency": _NET_STEP},
    },
    "hgx-h200": {
        "name": "hgx-h200", "nodes": 1, "gpus_per_node": 8,
        "device": {**_H100, "name": "NVIDIA H200-SXM-141GB", "memory_bytes": 141 * GB, "memory_bandwidth": 4800 * GB},
        "intra_node": {"bandwidth": 450 * GB, "latency": _NVLINK_STEP},
        "inter_node": {"bandwidth": 50 * GB, "latency": _NET_STEP},
    },
    # Processes on one CPU host talking gloo over loopback: for tests and the demo. The device is one core of the
    # 2-core Xeon (2.8 GHz) this project is tested on, measured once with `python bench/fidelity_cpu.py --measure`
    # (one thread, best of repeats): fp32 GEMMs of 256..2048 sustain ~120 GFLOP/s (bf16, no AMX: ~30); a 64 MiB
    # add moves ~11.5 GB/s; a tiny op with autograd costs ~8 us forward and ~7 us backward (the kernel overhead);
    # GEMMs from 64^3 up lose ~3 us each beyond that (the ramp). The links are gloo on the same host, timed as a
    # training step issues its collectives (`autopar calibrate --nproc-per-node 2`, planner 0.3.6: each call alone
    # after 10 ms of compute on both ranks, the median of 15; executor.calibrate._BURST_SECONDS), medians of 3 runs on
    # an idle host: all-reduce bus bandwidth 0.95 / 1.00 / 2.07 GB/s, one-way sends 0.32-1.09 ms per step over 6 runs
    # (0.4 ms), 0-1.0 ms more per call (0.5 ms); gloo's all-gather costs 1.3 / 2.0 / 3.3 ring passes and its
    # reduce-scatter 2.5 / 3.7 / 4.0 where NCCL's cost 1 (`collective_passes`). Back to back, as this preset had them
    # before (1.3 GB/s, 0.2 ms, one pass each), they are 2-5x faster than any step sees: a collective that follows
    # compute waits for the peer's gloo thread to be scheduled again.
    # Compute and gloo share the cores, so gradient communication does not overlap the backward pass.
    # Framework overhead per unit of work: `python bench/framework_overhead.py` (executor.overhead; 2 gloo ranks, one
    # thread each, tiny layers, each figure the best of 5 repeats with the cost model's collectives taken out), the
    # median of 3 runs on the host shared with other jobs (1-minute load 1.3-2.1 on 2 cores): a DTensor TP-sharded
    # Linear ~1.5 ms per pass over a plain one; an FSDP2 unit ~3.9 ms per micro-batch plus ~0.11 ms per parameter
    # tensor; DDP ~0.7 ms per bucket; AdamW ~0.055 ms per plain parameter tensor and ~0.37 ms per DTensor one; a
    # pipeline stage ~1.3 ms per micro-batch beyond its sends. Runs vary by up to 2x with the load.
    # op_dispatch_seconds: a view with autograd (`x.view(...)` of a tensor that requires grad, the cheapest op that
    # runs the whole eager dispatch path), ~2 us (`executor.overhead.measure_op_dispatch`, the best of 3 runs under
    # load 3-9; 3.1-3.4 us under load 2-3): provisional, remeasure on a quiet host. It adds to kernel_overhead_seconds rather than
    # replacing it: the kernel figure comes from a chain of tiny kernels with autograd and already holds each kernel's
    # dispatch, so the per-op cost is charged only for the ops that launch no kernel (ops - kernels of a pass).
    # transcendental_element_seconds: `executor.overhead.measure_transcendental` (bench/framework_overhead.py, one
    # thread, 1M-element fp32 tensors, best of 10, less a multiply's time per element, the mean over GELU (tanh)
    # forward / backward, softmax, log-softmax forward / backward and exp): the median of 5 runs under load 5.5-7.5,
    # 3.2 ns per element (runs 1.5-3.7 ns; in one run GELU 2.7 / 3.1, softmax 1.0, log-softmax 1.3 / 1.0, exp 0.2:
    # the ops' spread is what one figure per element leaves out).
    "cpu": {
        "name": "cpu", "nodes": 1, "gpus_per_node": 4,
        "device": {
            "name": "CPU (gloo)", "type": "cpu", "memory_bytes": 4 * GiB,
            "peak_flops": {"float32": 120e9, "bfloat16": 30e9},
            "memory_bandwidth": 11.5 * GB, "kernel_overhead_seconds": 8e-6, "gemm_ramp_seconds": 3e-6,
            "op_dispatch_seconds": 2e-6,
            "transcendental_element_seconds": 3.2e-9,
            "tp_module_overhead_seconds": 1.5e-3, "fsdp_unit_overhead_seconds": 3.9e-3,
            "fsdp_tensor_overhead_seconds": 1.1e-4, "ddp_bucket_overhead_seconds": 7.1e-4,
            "optimizer_tensor_seconds": 5.5e-5, "optimizer_dtensor_seconds": 3.7e-4,
            "pipeline_microbatch_overhead_seconds": 1.3e-3,
            # `executor.runtime_memory.measure_runtime_memory` on 2 gloo ranks (as `autopar calibrate` runs it; 3
            # runs, medians, planner 0.3.6, its negligible model transformer-shaped so that embedding, attention,
            # GELU and cross-entropy kernels run: 0.42-0.44 MiB of private RSS under DDP, 2.03-2.09 MiB more under
            # FSDP2; with tiny Linears alone it was 0.28 and 1.36).
            "runtime_memory_bytes": 424_000, "dtensor_runtime_memory_bytes": 2_073_000,
        },
        "intra_node": {"bandwidth": 1.0 * GB, "latency": 4e-4},
        "inter_node": {"bandwidth": 1.0 * GB, "latency": 4e-4},
        "collective_latency": 5e-4,
        "collective_passes": {"all_reduce": 2.0, "all_gather": 2.0, "reduce_scatter": 3.7},
        "compute_efficiency": 1.0,
        "memory_efficiency": 1.0,
        "comm_efficiency": 1.0,
        "overlap_dp_comm": False,
    },
}


def preset_names() -> list[str]:
    """Names of the built-in cluster presets."""
    return sorted(PRESETS)


def _validate(data: dict, *, source: str) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ClusterError(f"invalid cluster description in {source}: {problems}") from None


def load_cluster(name_or_path: str | Path, **overrides: object) -> ClusterSpec:
    """A preset name (see `preset_names()`) or a YAML/JSON file, with optional field overrides (nodes=4, ...)."""
    key = str(name_or_path)
    if key in PRESETS:
        data, source = dict(PRESETS[key]), f"preset '{key}'"
    else:
        path = Path(key)
        if not path.suffix and not path.exists():
            raise ClusterError(f"unknown cluster preset '{key}'; known presets: {', '.join(preset_names())}")
        if not path.exists():
            raise ClusterError(f"cluster file {path} does not exist (or give a preset: {', '.join(preset_names())})")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ClusterError(f"cannot parse cluster file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ClusterError(f"cluster file {path} must hold a mapping of fields, got {type(data).__name__}")
        if "preset" in data:  # a file may start from a preset and override some fields
            base = data.pop("preset")
            if base not in PRESETS:
                raise ClusterError(f"{path}: unknown preset '{base}'; known presets: {', '.join(preset_names())}")
            data = {**PRESETS[base], **data}
        source = str(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _validate(data, source=source)
