"""Time costs: communication (alpha-beta, hierarchical) and per-layer compute (measured or roofline).

Every coefficient comes from the `ClusterSpec` (bandwidths, latencies, peak rates, efficiency factors) or from the
`ModelProfile`; nothing is tuned here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from planner.cluster import ClusterSpec, LinkSpec
from planner.model_profile import DType, LayerProfile, ModelProfile, ProfileMode, ShardStyle


@dataclass(frozen=True)
class Group:
    """Where the members of one communication group sit: `per_node` of them on each of `nodes` nodes."""

    size: int
    per_node: int
    nodes: int

    @property
    def spans_nodes(self) -> bool:
        """Whether the group leaves a node (and is then limited by the inter-node link)."""
        return self.nodes > 1


@lru_cache(maxsize=4096)
def place_group(size: int, stride: int, gpus_per_node: int) -> Group:
    """The worst placement of the groups {base, base + stride, ..., base + (size-1) * stride} of a mesh axis with
    this stride, on nodes of `gpus_per_node` devices.

    The axis's groups start at every base whose own coordinate is 0 (base % stride + multiples of stride * size);
    when size does not divide the node (tp=6 on 8-GPU nodes) some of them straddle a node boundary although the
    first does not. The group spanning the most nodes is returned, with `per_node` its smallest share of a node (the
    adapters of that node carry the most data).
    """
    period = stride * size
    bases = [lo + hi * period for lo in range(min(stride, gpus_per_node))
             for hi in range(gpus_per_node // math.gcd(period, gpus_per_node) or 1)]
    worst: tuple[int, int] | None = None
    for base in bases:
        counts: dict[int, int] = {}
        for i in range(size):
            node = (base + i * stride) // gpus_per_node
            counts[node] = counts.get(node, 0) + 1
        key = (len(counts), -min(counts.values()))
        worst = key if worst is None or key > worst else worst
    nodes, per_node = worst[0], -worst[1]
    return Group(size=size, per_node=per_node, nodes=nodes)


class CommModel:
    """Alpha-beta cost of each collective on a cluster, one method per collective, as NCCL's rings run them.

    Bandwidth: a group inside one node runs a ring over the intra-node link. A group spanning q nodes with k members
    per node moves (n-1)/n of the data over the intra-node links and 1/k of it over each member's network adapter
    (NCCL's rings cross each node boundary once per channel, one channel per adapter), so its time is that of a
    local ring pass plus a ring pass of the q nodes on 1/k of the data. Bandwidths are scaled by
    `cluster.comm_efficiency` (what NCCL achieves of the link rate).

    Each collective costs `cluster.collective_passes` ring passes (NCCL: all-reduce 2, all-gather and reduce-scatter
    1; gloo's differ and are measured).

    Latency follows NCCL's own tuning model (src/graph/tuning.cc, `ncclTopoTuneModel`, ring algorithm): a base
    latency per call, plus one step per rank of the ring - nodes-1 of them cross the network (`inter_node.latency`),
    the other n-nodes stay inside a node (`intra_node.latency`); an all-reduce makes both passes. So the latency of
    an all-gather over 1536 ranks is about a hundred times that over 16, which is what makes many small collectives
    over thousands of ranks (ZeRO-3's per-layer gathers) expensive.
    """

    def __init__(self, cluster: ClusterSpec) -> None:
        self.cluster = cluster
        self._eff = cluster.comm_efficiency

    def _pass_bytes_seconds(self, n: int, nbytes: float, link: LinkSpec) -> float:
        # Bandwidth part of one reduce-scatter or all-gather ring pass over n members: n-1 steps of nbytes/n each.
        if n <= 1:
            return 0.0
        return (n - 1) / n * nbytes / (link.bandwidth * self._eff)

    def pass_latency(self, group: Group) -> float:
        """Fixed seconds of one ring pass (a reduce-scatter or an all-gather) over `group`, whatever the size."""
        if group.size <= 1:
            return 0.0
        inter_steps = group.nodes - 1
        intra_steps = group.size - 1 - inter_steps
        return (self.cluster.collective_latency + intra_steps * self.cluster.intra_node.latency
                + inter_steps * self.cluster.inter_node.latency)

    def ring_pass(self, nbytes: float, group: Group) -> float:
        """Seconds of one ring pass over `group` with `nbytes` per member (a reduce-scatter as NCCL runs it)."""
        if group.size <= 1:
            return 0.0
        intra, inter = self.cluster.intra_node, self.cluster.inter_node
        local = self._pass_bytes_seconds(group.per_node, nbytes, intra)
        return self.pass_latency(group) + local + self._pass_bytes_seconds(group.nodes, nbytes / group.per_node, inter)

    def reduce_scatter(self, nbytes: float, group: Group) -> float:
        """Seconds to reduce-scatter `nbytes` (each member's full buffer) over `group`."""
        return self.cluster.collective_passes.reduce_scatter * self.ring_pass(nbytes, group)

    def all_gather(self, nbytes: float, group: Group) -> float:
        """Seconds to all-gather buffers that total `nbytes` per member after the gather."""
        return self.cluster.collective_passes.all_gather * self.ring_pass(nbytes, group)

    def all_reduce(self, nbytes: float, group: Group) -> float:
        """Seconds to all-reduce `nbytes` over `group` (NCCL: a reduce-scatter followed by an all-gather)."""
        return self.cluster.collective_passes.all_reduce * self.ring_pass(nbytes, group)

    def p2p(self, nbytes: float, spans_nodes: bool) -> float:
        """Seconds to send `nbytes` from one device to another (inside a node or across nodes)."""
        if nbytes <= 0:
            return 0.0
        link = self.cluster.inter_node if spans_nodes else self.cluster.intra_node
        return link.latency + nbytes / (link.bandwidth * self._eff)

    def affine(self, collective: str, group: Group) -> tuple[float, float]:
        """(alpha, beta) with time(nbytes) = alpha + beta * nbytes for nbytes > 0 (the search needs linear costs)."""
        fn = getattr(self, collective)
        a = fn(1.0, group)
        return a - (fn(2.0, group) - a), fn(2.0, group) - a


def uses_measured_times(profile: ModelProfile, cluster: ClusterSpec) -> bool:
    """Measured layer times apply only when they were taken on the cluster's device type."""
    return profile.mode == ProfileMode.MEASURED and profile.device == cluster.device.type


@dataclass(frozen=True)
class LayerCompute:
    """Compute seconds of one layer for one micro-batch on one device (TP-sharded where the layer allows)."""

    fwd: float
    bwd: float
    recompute: float


def tp_whole_bytes(layer: LayerProfile, *, sequence_parallel: bool = False) -> float:
    """Bytes per sample of a TP-split layer that stay whole on every TP rank: its inputs and outputs, twice
    (LayerNorm inputs, residual adds), except an output that stays split (a vocabulary-parallel head's logits).
    Running sequence-parallel (`planner.tp_comm.runs_sequence_parallel`), only its TP regions' inputs, which each
    rank gathers whole (`SequenceParallelSpec.gathered_bytes`)."""
    if sequence_parallel:
        return layer.tp.sequence_parallel.gathered_bytes
    out = 0.0 if layer.tp is not None and layer.tp.splits_output else layer.output_bytes
    return 2 * (layer.input_bytes + out)


def estimate_gemm_efficiency(flops: float, cluster: ClusterSpec, peak: float) -> float:
    """Fraction of `peak` one GEMM of `flops` FLOPs achieves: e_max * W / (W + W_half).

    e_max is `cluster.compute_efficiency` (what the largest GEMMs reach) and W_half = peak * e_max *
    `device.gemm_ramp_seconds`, i.e. every GEMM takes its ideal time at the ceiling plus a fixed ramp. Monotone in W,
    below e_max, and equal to it when the device has no ramp.
    """
    e_max = cluster.compute_efficiency
    w_half = peak * e_max * cluster.device.gemm_ramp_seconds
    return e_max * flops / (flops + w_half) if flops > 0 else e_max


def estimate_weight_gemm_seconds(
    layer: LayerProfile, cluster: ClusterSpec, peak: float, *, backward: bool, micro_batch: int, tp: int,
    gemm_flops: float,
) -> float:
    """Compute seconds of the weight-GEMM class of one pass: each listed GEMM at its own efficiency.

    A GEMM of `layer.gemms` has M = micro_batch * m rows; a colwise TP shard divides N, a rowwise one K, by `tp`
    (`tp` is 1 for a layer TP does not split). `gemm_flops` (per sample) not covered by listed GEMMs, all of them in
    a profile without the list, run at the ceiling `compute_efficiency` and, for a TP-able layer, split by `tp`.
    """
    ceiling = peak * cluster.compute_efficiency
    styles = {s.module: s.style for s in layer.tp.shards} if (layer.tp is not None and tp > 1) else {}
    inters = {s.module: s.segments[0] for s in layer.tp.shards if s.style == ShardStyle.EXPERTS and s.segments} \
        if styles else {}  # an experts module's intermediate width (its input stack's piece)
    seconds = listed = 0.0
    for g in layer.gemms:
        count = g.bwd_count if backward else g.fwd_count
        if count == 0:
            continue
        style = styles.get(g.module)
        n = g.n / tp if style in (ShardStyle.COLWISE, ShardStyle.VOCAB_COLWISE) else g.n  # and a vocab-parallel head
        k = g.k / tp if style == ShardStyle.ROWWISE else g.k
        if style == ShardStyle.EXPERTS:  # the intermediate features split: the input stack's N, the output's K
            inter = inters.get(g.module)
            n, k = (g.n, g.k / tp) if (g.k == inter if inter else g.k > g.n) else (g.n / tp, g.k)
        w = 2 * micro_batch * g.m * n * k
        seconds += count * w / (peak * estimate_gemm_efficiency(w, cluster, peak))
        listed += count * 2 * g.m * g.n * g.k
    return seconds + micro_batch * max(gemm_flops - listed, 0.0) / tp / ceiling


def _tp_split(nbytes: float, whole: float, tp: int) -> float:
    # The first `whole` bytes stay whole on every TP rank; the rest is split across the group.
    whole = min(nbytes, whole)
    return whole + (nbytes - whole) / tp


def estimate_pass_seconds(
    layer: LayerProfile, cluster: ClusterSpec, peak: float, *, backward: bool, micro_batch: int, tp: int,
    weight_bytes: float, sequence_parallel: bool = False,
) -> float:
    """Seconds of one forward or backward pass of `layer` over a micro-batch: a sum of per-class rooflines.

    Kernels of different arithmetic intensity run one after another, so each class gets its own roofline
    max(FLOPs / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency)) and the classes add up:
    weight GEMMs (compute-bound at these sizes; each listed GEMM at its own size's efficiency, see
    `estimate_weight_gemm_seconds`), activation matmuls (attention; intensity about the head dimension, often
    memory-bound) and memory-bound ops (bytes only; the fused byte count when `cluster.fused_elementwise`).
    Plus `weight_bytes` read (and written) once, `device.kernel_overhead_seconds` for each kernel the pass
    launches, `device.op_dispatch_seconds` for each other op it dispatches (views, aliases: host work in eager
    PyTorch; a kernel's own dispatch is in its overhead), under TP `device.tp_module_overhead_seconds` for each
    sharded module (DTensor dispatch), and `device.transcendental_element_seconds` for each element the pass
    evaluates exp / log / tanh / erf on (`LayerProfile.fwd_transcendental_elements`; compute-bound on a CPU).
    A profile without the split is one roofline over the whole layer.
    TP divides the FLOPs and bytes of a TP-able layer by `tp`, except that its inputs and outputs (LayerNorm,
    residual adds) stay whole on every rank (`tp_whole_bytes`: not a vocabulary-parallel head's split logits).
    `sequence_parallel` (the layer runs so): norms and residual adds run on sequence shards, only the gathered
    region inputs are whole, and each norm and region is one more DTensor-wrapped module (`SequenceParallel`,
    `PrepareModuleInput` hooks: host work per pass, priced like a sharded Linear's).
    """
    if backward:
        flops, total, mm_f, mm_b = layer.bwd_flops, layer.bwd_bytes, layer.bwd_actmm_flops, layer.bwd_actmm_bytes
        mem, mem_fused = layer.bwd_membound_bytes, layer.bwd_membound_fused_bytes
    else:
        flops, total, mm_f, mm_b = layer.fwd_flops, layer.fwd_bytes, layer.fwd_actmm_flops, layer.fwd_actmm_bytes
        mem, mem_fused = layer.fwd_membound_bytes, layer.fwd_membound_fused_bytes
    split = mem > 0 or mm_f > 0
    gemm_f, gemm_b = max(flops - mm_f, 0.0), max(total - mm_b - mem, 0.0)
    if cluster.fused_elementwise and split:
        mem = mem_fused
    t = tp if layer.tp is not None else 1
    sp = sequence_parallel and t > 1 and layer.tp.sequence_parallel is not None
    whole = tp_whole_bytes(layer, sequence_parallel=sp) if t > 1 else 0.0
    b = micro_batch
    compute = peak * cluster.compute_efficiency
    mem_bw = cluster.device.memory_bandwidth * cluster.memory_efficiency
    gemm_s = estimate_weight_gemm_seconds(layer, cluster, peak, backward=backward, micro_batch=b, tp=t,
                                          gemm_flops=gemm_f)
    gemm = max(gemm_s, b * _tp_split(gemm_b, 0.0 if split else whole, t) / mem_bw)
    actmm = max(b * mm_f / t / compute, b * mm_b / t / mem_bw)
    kernels = layer.bwd_kernels if backward else layer.fwd_kernels
    other_ops = max((layer.bwd_ops if backward else layer.fwd_ops) - kernels, 0)
    # Each TP-sharded module runs on DTensors (executor.parallelize.apply_tp): host work on top of its kernels.
    modules = len(layer.tp.shards) if t > 1 else 0
    if sp:
        modules += len(layer.tp.sequence_parallel.norms) + len(layer.tp.sequence_parallel.regions)
    dtensor = modules * cluster.device.tp_module_overhead_seconds
    # exp / log / tanh / erf evaluated per element (GELU, softmax, attention scores): compute-bound on a CPU core,
    # 0 on GPUs (DeviceSpec.transcendental_element_seconds); a TP-able layer's share is split with its heads.
    trans = b * (layer.bwd_transcendental_elements if backward else layer.fwd_transcendental_elements) / t
    return (gemm + actmm + b * _tp_split(mem, whole, t) / mem_bw + weight_bytes / mem_bw
            + kernels * cluster.device.kernel_overhead_seconds + other_ops * cluster.device.op_dispatch_seconds
            + dtensor + trans * cluster.device.transcendental_element_seconds)


def estimate_layer_compute(
    layer: LayerProfile, cluster: ClusterSpec, dtype: DType, *, tp: int, micro_batch: int, recompute: str,
    measured: bool, sequence_parallel: bool = False,
) -> LayerCompute:
    """Forward, backward and recompute seconds of `layer` for one micro-batch.

    Analytic: `estimate_pass_seconds` (per-class rooflines plus one read of the weights in forward and a read and a
    gradient write in backward). Measured times are scaled by the same model's TP ratio.
    """
    peak = cluster.peak_flops_for(dtype)
    shard = tp if layer.tp is not None else 1
    b = micro_batch
    w_dev = device_param_count(layer, tp) * dtype.itemsize

    def roof(backward: bool, weights: float, t: int) -> float:
        return estimate_pass_seconds(layer, cluster, peak, backward=backward, micro_batch=b, tp=t,
                                     weight_bytes=weights, sequence_parallel=sequence_parallel)

    fwd = roof(False, w_dev, tp)
    bwd = roof(True, 2 * w_dev, tp)
    if measured and layer.fwd_seconds is not None and layer.bwd_seconds is not None:
        w_full = layer.param_count * dtype.itemsize
        f1 = roof(False, w_full, 1)
        b1 = roof(True, 2 * w_full, 1)
        fwd = b * layer.fwd_seconds * (fwd / f1 if f1 > 0 else 1.0)
        bwd = b * layer.bwd_seconds * (bwd / b1 if b1 > 0 else 1.0)
    if recompute == "full":
        rc = fwd
    elif recompute == "selective" and layer.selective_fwd_flops > 0:
        rc = b * layer.selective_fwd_flops / shard / (peak * cluster.compute_efficiency)
    else:
        rc = 0.0
    return LayerCompute(fwd=fwd, bwd=bwd, recompute=rc)


def device_param_count(layer: LayerProfile, tp: int) -> float:
    """Parameters of `layer` held by one device of a TP group."""
    if layer.tp is None or tp == 1:
        return float(layer.param_count)
    sharded = min(layer.tp.sharded_param_count, layer.param_count)
    return sharded / tp + (layer.param_count - sharded)



def executor_uses_fsdp2(*, dp: int, tp: int, pp: int, zero: int) -> bool:
    """Whether the executor gives the data-parallel axis to FSDP2 / the composable `replicate` (whose parameters are
    DTensors and whose units run hooks every micro-batch) rather than DDP or nothing (`executor.optim.uses_fsdp2`)."""
    return dp > 1 and not (pp == 1 and tp == 1 and int(zero) == 0)


def trains_under_autocast(dtype: DType, *, dp: int, tp: int, pp: int, zero: int) -> bool:
    """Whether the executor runs 16-bit compute as torch.autocast over fp32 parameters (DDP, plain pipelines, TP
    without DP, one device), so activations keep autocast's dtypes (`LayerProfile.autocast`), rather than as FSDP2's
    MixedPrecisionPolicy over 16-bit parameter copies (`executor.optim.mixed_precision`)."""
    return dtype.itemsize < 4 and not executor_uses_fsdp2(dp=dp, tp=tp, pp=pp, zero=zero)


@dataclass(frozen=True)
class FrameworkOverhead:
    """Host-side framework work of one configuration, each term where the executor does it (one home for the float
    evaluation in `planner.candidate`, the bound in `planner.enumerate` and, through those tables, the CP-SAT model).

    The TP term (per DTensor-sharded module per pass) lives in `estimate_pass_seconds`, with the layer's kernels.
    """

    #: seconds per FSDP2 / replicate unit (a layer holding parameters) per micro-batch, and per tensor of the unit
    unit_per_mb: float = 0.0
    unit_tensor_per_mb: float = 0.0
    #: seconds per pipeline stage (model chunk) per micro-batch; 0 without a pipeline
    stage_per_mb: float = 0.0
    #: seconds per parameter tensor in the optimizer step: plain, and DTensor (FSDP2 / replicate / TP-sharded)
    plain_tensor: float = 0.0
    dtensor: float = 0.0
    #: every parameter is a DTensor (FSDP2 / replicate holds them)
    all_dtensor: bool = False
    tp: int = 1

    def unit_seconds(self, layer: LayerProfile) -> float:
        """Per-micro-batch seconds of `layer` as an FSDP2 / replicate unit (0 without FSDP2 or parameters)."""
        if layer.param_count <= 0:
            return 0.0
        return self.unit_per_mb + self.unit_tensor_per_mb * layer.param_tensors

    def optimizer_seconds(self, layer: LayerProfile) -> float:
        """Per-tensor optimizer seconds of `layer` on one rank (every rank holds a shard or copy of each tensor).

        Under TP without FSDP2 only the sharded Linears' weights and biases are DTensors (two per shard, at most
        the layer's tensor count); the rest (norms) stay plain.
        """
        n = layer.param_tensors
        if self.all_dtensor:
            dt = n
        elif self.tp > 1 and layer.tp is not None:
            dt = min(n, 2 * len(layer.tp.shards))
        else:
            dt = 0
        return dt * self.dtensor + (n - dt) * self.plain_tensor


def framework_overhead(cluster: ClusterSpec, *, dp: int, tp: int, pp: int, zero: int) -> FrameworkOverhead:
    """The `FrameworkOverhead` of a (dp, tp, pp, ZeRO) configuration on `cluster`'s device."""
    dev = cluster.device
    fsdp2 = executor_uses_fsdp2(dp=dp, tp=tp, pp=pp, zero=zero)
    return FrameworkOverhead(
        unit_per_mb=dev.fsdp_unit_overhead_seconds if fsdp2 else 0.0,
        unit_tensor_per_mb=dev.fsdp_tensor_overhead_seconds if fsdp2 else 0.0,
        stage_per_mb=dev.pipeline_microbatch_overhead_seconds if pp > 1 else 0.0,
        plain_tensor=dev.optimizer_tensor_seconds, dtensor=dev.optimizer_dtensor_seconds, all_dtensor=fsdp2, tp=tp,
    )
