"""One candidate configuration (everything but the stage boundaries) and its cost tables.

`CandidateCosts` turns (profile, cluster, degrees, ZeRO stage, micro-batch, schedule, recompute) into per-layer
prefix sums and per-rank coefficients. Its step time and memory are *linear or max-of-linear* in the layers each
pipeline rank holds, which lets CP-SAT (`planner.stages`) optimise stage boundaries exactly, and `evaluate_bounds`
computes the same quantities in floating point for a given partition (used by `planner.evaluate` and by tests).

Per pipeline rank r, per micro-batch:
    C_r  = compute (with the host's FSDP2-unit and pipeline-stage work) + recompute + TP all-reduces of its layers
           + the pipeline sends it makes
    K_r  = DP collectives repeated every micro-batch (ZeRO-2 gradient reduce-scatter, ZeRO-3 parameter gathers)
    R_r  = max(C_r, K_r) when DP communication overlaps compute, else C_r + K_r
Once per step, after the pipeline drains:
    X_r  = optimizer step (bytes, plus a cost per parameter tensor) + non-overlappable DP collectives + max(0, overlappable DP collectives - backward window)
           (+ DDP's last bucket); every DP term is per layer, from `planner.dp_comm`
    step = m R_max + (sum_r R_r - R_max) / v + max_r X_r            (see planner.pipeline)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

from planner.attention import layers_for_cluster
from planner.cluster import ClusterSpec
from planner.cost import (
    CommModel,
    Group,
    device_param_count,
    estimate_layer_compute,
    framework_overhead,
    place_group,
    trains_under_autocast,
    uses_measured_times,
)
from planner.dp_comm import dp_comm
from planner.memory import (
    estimate_comm_buffer_bytes,
    estimate_layer_activation_bytes,
    estimate_optimizer_temp_bytes,
    estimate_output_buffer_bytes,
    estimate_state_bytes,
    estimate_working_set_bytes,
    in_flight,
    optimizer_bytes_touched,
)
from planner.model_profile import ModelProfile
from planner.strategy import MeshAxis, ParallelDims, Recompute, Schedule, ZeroStage
from planner.tp_comm import runs_sequence_parallel, tp_collectives


@dataclass(frozen=True)
class Config:
    """A strategy without its stage boundaries: `planner.strategy.Strategy`'s fields but `stages`, under the same names
    (`evaluate.config_of` / `evaluate.strategy_of` convert), hashable so the search can key its tables by it."""

    dims: ParallelDims
    zero_stage: ZeroStage
    micro_batch_size: int
    num_micro_batches: int
    schedule: Schedule
    virtual_stages: int
    recompute: Recompute
    mesh_order: tuple[MeshAxis, ...] = (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)
    sequence_parallel: bool = False

    @property
    def num_stages(self) -> int:
        """Model chunks in the pipeline (pp * virtual stages)."""
        return self.dims.pp * self.virtual_stages


@dataclass
class RankCosts:
    """What one pipeline rank costs under a partition (seconds, bytes)."""

    compute: float = 0.0  # includes `framework`
    framework: float = 0.0  # host-side FSDP2 unit and pipeline stage work per micro-batch (planner.cost)
    forward: float = 0.0
    recompute: float = 0.0
    tp_comm: float = 0.0
    p2p: float = 0.0
    zero_per_mb: float = 0.0
    per_mb: float = 0.0
    window: float = 0.0
    dp_overlap: float = 0.0
    dp_exposed: float = 0.0
    dp_blocking: float = 0.0
    optimizer: float = 0.0
    tail: float = 0.0
    grad_bytes: float = 0.0
    static_bytes: int = 0
    param_bytes: float = 0.0
    grad_state_bytes: float = 0.0
    optimizer_bytes: float = 0.0
    activation_bytes: float = 0.0
    memory_v: int = 0  # v * memory, an integer, so fitting is decided exactly
    layers: list[int] = field(default_factory=list)


@dataclass
class PartitionCosts:
    """Result of `CandidateCosts.evaluate_bounds`."""

    step: float
    pipeline: float
    bubble: float
    ranks: list[RankCosts]
    slowest: int
    tail_rank: int
    fits: bool


def _prefix(values: list[float]) -> list[float]:
    return [0.0, *accumulate(values)]


_TABLES: dict[tuple, tuple] = {}
_REPRESENTATIVES: dict[int, tuple] = {}


def _representatives(profile: ModelProfile, layers: list) -> list[int]:
    """For each layer, the index of the first layer with the same costs (everything but its name and index)."""
    hit = _REPRESENTATIVES.get(id(profile))
    if hit is not None and hit[0] is profile and hit[1] is layers:
        return hit[2]
    first: dict[str, int] = {}
    reps = []
    for i, layer in enumerate(layers):
        key = layer.model_dump_json(exclude={"index", "name"})
        reps.append(first.setdefault(key, i))
    if len(_REPRESENTATIVES) > 256:
        _REPRESENTATIVES.clear()
    _REPRESENTATIVES[id(profile)] = (profile, layers, reps)
    return reps


def layer_table(profile: ModelProfile, cluster: ClusterSpec, tp: int, micro_batch: int, recompute: Recompute,
                tp_group: Group, sequence_parallel: bool = False, autocast: bool = False) -> tuple[list, ...]:
    """Per-layer (fwd, bwd, recompute, TP comm, backward window, device params, activation bytes), cached.

    These depend only on tp, micro-batch, recompute, sequence parallelism and whether 16-bit compute runs as
    torch.autocast (`planner.cost.trains_under_autocast`: activation bytes in autocast's dtypes), so every candidate
    sharing them reuses one table.
    """
    sp = sequence_parallel and tp > 1
    key = (id(profile), id(cluster), tp, micro_batch, recompute, tp_group, sp, autocast)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is profile and hit[1] is cluster:
        return hit[2]
    comm, dtype = CommModel(cluster), profile.dtype
    measured = uses_measured_times(profile, cluster)
    full = recompute == Recompute.FULL  # the forward (and its TP all-reduces) runs again in backward
    layers = layers_for_cluster(profile, cluster)  # attention counted as the cluster's device runs it
    kept = layers_for_cluster(profile, cluster, autocast=autocast)  # and activations in autocast's dtypes
    rows: dict[int, tuple] = {}

    def tp_seconds(layer, previous) -> float:  # the collectives as the executor issues them (planner.tp_comm)
        return sum(c.count * getattr(comm, c.collective)(micro_batch * c.nbytes, tp_group)
                   for c in tp_collectives(layer, previous, tp=tp, sequence_parallel=sp, recompute_forward=full))

    for i in set(_representatives(profile, layers)):  # a transformer's identical blocks are costed once
        layer = layers[i]
        c = estimate_layer_compute(layer, cluster, dtype, tp=tp, micro_batch=micro_batch, recompute=recompute.value,
                                   measured=measured, sequence_parallel=sp)
        rows[i] = (c.fwd, c.bwd, c.recompute, tp_seconds(layer, None), c.bwd + c.recompute,
                   device_param_count(layer, tp),
                   estimate_layer_activation_bytes(kept[i], tp=tp, micro_batch=micro_batch, recompute=recompute,
                                                   sequence_parallel=sp))
    cols = tuple(list(col) for col in zip(*(rows[i] for i in _representatives(profile, layers))))
    for i in range(1, len(layers)) if sp else ():  # where sequence sharding starts or ends: one layer's neighbour
        if runs_sequence_parallel(layers[i], tp, sp) != runs_sequence_parallel(layers[i - 1], tp, sp):
            cols[3][i] = tp_seconds(layers[i], layers[i - 1])
    if len(_TABLES) > 4096:  # keep memory bounded across many plans in one process
        _TABLES.clear()
    _TABLES[key] = (profile, cluster, cols)
    return cols


class CandidateCosts:
    """Cost tables of one `Config` on one cluster for one profile (see the module docstring for the model)."""

    def __init__(self, profile: ModelProfile, cluster: ClusterSpec, cfg: Config, cut_bytes: list[float]) -> None:
        self.profile, self.cluster, self.cfg = profile, cluster, cfg
        d, b = cfg.dims, cfg.micro_batch_size
        dtype, comm = profile.dtype, CommModel(cluster)
        self.comm = comm
        strides = _strides(cfg.mesh_order, d)
        G = cluster.gpus_per_node
        self.tp_group = place_group(d.tp, strides[MeshAxis.TP], G)
        self.dp_group = place_group(d.dp, strides[MeshAxis.DP], G)
        pp_stride = strides[MeshAxis.PP]
        state = estimate_state_bytes(dtype, cfg.zero_stage, d.dp, pipelined=d.pp > 1,
                                     micro_batches=cfg.num_micro_batches)
        self.state = state
        self.autocast = trains_under_autocast(dtype, dp=d.dp, tp=d.tp, pp=d.pp, zero=cfg.zero_stage)
        kept = layers_for_cluster(profile, cluster, autocast=self.autocast)  # what training keeps, in its dtypes
        fwd, bwd, rc, tpc, window, elems, act = layer_table(profile, cluster, d.tp, b, cfg.recompute, self.tp_group,
                                                            cfg.sequence_parallel, self.autocast)
        if cfg.num_stages > 1:
            # A tied weight is held again by the stage of each layer that uses it (the executor keeps one copy per
            # stage and sums their gradients), split by TP when the using layer is TP-able. Charged whenever the model is
            # cut: exact when a cut separates user and owner (GPT's head and embedding), an overestimate otherwise.
            elems = [e + layer.shared_param_count / (d.tp if layer.tp is not None else 1)
                     for e, layer in zip(elems, profile.layers)]
        grad = [n * dtype.itemsize for n in elems]
        # The runtime's own memory, AdamW's temporaries and the model output's buffers (planner.memory), labelled
        # apart in the breakdown: per element updated, per device, or on the device running the last layer.
        self.opt_temp_bytes, self.opt_temp_per_elem = estimate_optimizer_temp_bytes(
            profile.layers, tp=d.tp, dp=d.dp, zero=cfg.zero_stage, device_type=cluster.device.type)
        self.output_buffer_bytes = estimate_output_buffer_bytes(kept[-1], tp=d.tp, micro_batch=b)
        dtensor = d.tp > 1 or (d.dp > 1 and cfg.zero_stage != ZeroStage.NONE)  # FSDP2 / TP parameters are DTensors
        self.runtime_bytes = cluster.device.runtime_memory_bytes + (
            cluster.device.dtensor_runtime_memory_bytes if dtensor else 0)
        static = [int(n * (state.total + self.opt_temp_per_elem) + 0.999999) for n in elems]
        static[-1] += self.output_buffer_bytes
        self.fwd, self.bwd, self.rc, self.tpc = fwd, bwd, rc, tpc
        self.elems = elems
        # Host-side framework work (planner.cost.FrameworkOverhead): each FSDP2 / replicate unit (a layer with
        # parameters) per micro-batch, each pipeline stage per micro-batch, each parameter tensor in the optimizer.
        self.framework = framework_overhead(cluster, dp=d.dp, tp=d.tp, pp=d.pp, zero=cfg.zero_stage)
        host = [self.framework.unit_seconds(layer) if e > 0 else 0.0 for e, layer in zip(elems, profile.layers)]
        self.P_host = _prefix(host)
        self.P_compute = _prefix([f + g + h for f, g, h in zip(fwd, bwd, host)])
        self.P_fwd = _prefix(fwd)
        self.P_rc = _prefix(rc)
        self.P_tp = _prefix(tpc)
        self.P_time = _prefix([f + g + r + t + h for f, g, r, t, h in zip(fwd, bwd, rc, tpc, host)])
        self.P_window = _prefix(window)
        self.P_grad = _prefix(grad)
        self.P_elems = _prefix(elems)
        self.P_static = [0, *accumulate(static)]
        self.P_act = [0, *accumulate(act)]
        # A cut after a layer that runs sequence-parallel sends each TP rank's sequence shard (executor: the stage
        # output stays local; the next layer takes it as it is, or gathers it whole itself).
        sp_sends = [k > 0 and runs_sequence_parallel(profile.layers[k - 1], d.tp, cfg.sequence_parallel)
                    for k in range(len(cut_bytes))]
        self.cut_bytes = [b * x / (d.tp if sharded else 1) for x, sharded in zip(cut_bytes, sp_sends)]

        # Pipeline sends: chunk c sends its output to chunk c+1 (and gets the gradient back) over this link.
        n = cfg.num_stages
        self.p2p_link = [_spans(c % d.pp, (c + 1) % d.pp, pp_stride, G) for c in range(n - 1)]

        # Data-parallel collectives: per-layer costs (planner.dp_comm), summed per rank through prefix tables.
        zero_ = cfg.zero_stage if d.dp > 1 else ZeroStage.NONE
        self.dp = dp_comm(comm, self.dp_group, zero_, dtype, pipelined=d.pp > 1, overlap=cluster.overlap_dp_comm)
        self.P_zero = _prefix([self.dp.per_mb.of(e) if e > 0 else 0.0 for e in elems])
        self.P_dp_overlap = _prefix([self.dp.overlap.of(e) if e > 0 else 0.0 for e in elems])
        self.P_dp_blocking = _prefix([self.dp.blocking.of(e) if e > 0 else 0.0 for e in elems])
        mem_bw = cluster.device.memory_bandwidth * cluster.memory_efficiency
        self.opt_per_elem = optimizer_bytes_touched(dtype) / mem_bw / (d.dp if zero_ >= ZeroStage.OPTIMIZER else 1)
        self.P_opt = _prefix([self.opt_per_elem * e + self.framework.optimizer_seconds(layer)
                              for e, layer in zip(elems, profile.layers)])
        self.overlap = cluster.overlap_dp_comm

        # Memory: v * memory_r = v * static_r + in_flight_r * act_r + v * const <= v * capacity (integers).
        self.in_flight = [in_flight(cfg.schedule, pp=d.pp, rank=r, num_micro_batches=cfg.num_micro_batches,
                                    virtual_stages=cfg.virtual_stages) for r in range(d.pp)]
        self.comm_buffer_bytes = estimate_comm_buffer_bytes(
            profile.layers, [x / (d.tp if sharded else 1) for x, sharded in zip(cut_bytes, sp_sends)], dtype=dtype,
            dp=d.dp, tp=d.tp, pp=d.pp, zero=cfg.zero_stage, micro_batch=b
        )
        #: the layer being recomputed under full recompute: reported as activations, not as buffers
        self.working_set_bytes = estimate_working_set_bytes(kept, tp=d.tp,
                                                            micro_batch=b, recompute=cfg.recompute,
                                                            sequence_parallel=cfg.sequence_parallel)
        self.const_bytes = self.comm_buffer_bytes + self.working_set_bytes + self.runtime_bytes + self.opt_temp_bytes
        self.capacity = int(cluster.device.memory_bytes * (1 - cluster.memory_margin))

    def _affine(self, coef: tuple[float, float], nbytes: float) -> float:
        return coef[0] + coef[1] * nbytes

    def p2p_seconds(self, chunk: int, cut: int) -> float:
        """Forward activation send (or backward gradient send) over the cut ending `chunk` at layer `cut`."""
        return self.comm.p2p(self.cut_bytes[cut], self.p2p_link[chunk])

    def evaluate_bounds(self, bounds: list[int]) -> PartitionCosts:
        """Costs of the partition with stage c = layers [bounds[c], bounds[c+1])."""
        cfg = self.cfg
        pp, v, m = cfg.dims.pp, cfg.virtual_stages, cfg.num_micro_batches
        ranks = [RankCosts() for _ in range(pp)]
        for c in range(cfg.num_stages):
            lo, hi = bounds[c], bounds[c + 1]
            rk = ranks[c % pp]
            rk.layers.extend(range(lo, hi))
            rk.compute += self.P_compute[hi] - self.P_compute[lo]
            rk.forward += self.P_fwd[hi] - self.P_fwd[lo]
            rk.recompute += self.P_rc[hi] - self.P_rc[lo]
            rk.tp_comm += self.P_tp[hi] - self.P_tp[lo]
            rk.window += self.P_window[hi] - self.P_window[lo]
            rk.grad_bytes += self.P_grad[hi] - self.P_grad[lo]
            rk.static_bytes += self.P_static[hi] - self.P_static[lo]
            rk.activation_bytes += self.P_act[hi] - self.P_act[lo]
            if c < cfg.num_stages - 1:
                t = self.p2p_seconds(c, hi)
                rk.p2p += t  # forward send
                ranks[(c + 1) % pp].p2p += t  # backward send of the gradient
        for r, rk in enumerate(ranks):
            elems = sum(self.P_elems[hi] - self.P_elems[lo] for lo, hi in _chunks_of(r, bounds, pp))
            chunks = _chunks_of(r, bounds, pp)
            stage_work = len(chunks) * self.framework.stage_per_mb  # the schedule's own work for each chunk
            rk.framework = sum(self.P_host[hi] - self.P_host[lo] for lo, hi in chunks) + stage_work
            rk.compute += stage_work
            busy = rk.compute + rk.recompute + rk.tp_comm + rk.p2p
            rk.zero_per_mb = sum(self.P_zero[hi] - self.P_zero[lo] for lo, hi in chunks)
            rk.per_mb = max(busy, rk.zero_per_mb) if self.overlap else busy + rk.zero_per_mb
            rk.dp_overlap = sum(self.P_dp_overlap[hi] - self.P_dp_overlap[lo] for lo, hi in chunks)
            rk.dp_blocking = sum(self.P_dp_blocking[hi] - self.P_dp_blocking[lo] for lo, hi in chunks)
            exposed = max(0.0, rk.dp_overlap - rk.window) if self.overlap else rk.dp_overlap
            rk.dp_exposed = exposed + self.dp.fixed
            rk.optimizer = sum(self.P_opt[hi] - self.P_opt[lo] for lo, hi in chunks)
            rk.tail = rk.optimizer + rk.dp_blocking + rk.dp_exposed
            rk.param_bytes = elems * self.state.parameters
            rk.grad_state_bytes = elems * self.state.gradients
            rk.optimizer_bytes = elems * self.state.optimizer
            act_v = self.in_flight[r] * int(rk.activation_bytes)
            rk.activation_bytes = act_v / v
            rk.memory_v = v * rk.static_bytes + act_v + v * self.const_bytes
        per_mb = [rk.per_mb for rk in ranks]
        slowest = max(range(pp), key=lambda r: per_mb[r])
        tail_rank = max(range(pp), key=lambda r: ranks[r].tail)
        bubble = (sum(per_mb) - per_mb[slowest]) / v
        pipeline = m * per_mb[slowest] + bubble
        fits = all(rk.memory_v <= v * self.capacity for rk in ranks)
        return PartitionCosts(step=pipeline + ranks[tail_rank].tail, pipeline=pipeline, bubble=bubble, ranks=ranks,
                              slowest=slowest, tail_rank=tail_rank, fits=fits)


def _strides(order: tuple[MeshAxis, ...], dims: ParallelDims) -> dict[MeshAxis, int]:
    """Rank distance between neighbours along each mesh axis (the last axis is innermost, stride 1)."""
    strides, s = {}, 1
    for axis in reversed(order):
        strides[axis] = s
        s *= dims.degree(axis)
    return strides


def _spans(rank_a: int, rank_b: int, stride: int, gpus_per_node: int) -> bool:
    """Whether pipeline ranks a and b (stride devices apart per rank) sit on different nodes for some pair."""
    lo, hi = min(rank_a, rank_b), max(rank_a, rank_b)
    if hi == lo:
        return False
    if (hi - lo) * stride >= gpus_per_node:
        return True
    return any((lo * stride + x) // gpus_per_node != (hi * stride + x) // gpus_per_node for x in range(stride))


def _chunks_of(rank: int, bounds: list[int], pp: int) -> list[tuple[int, int]]:
    """Layer ranges of the chunks pipeline rank `rank` holds."""
    return [(bounds[c], bounds[c + 1]) for c in range(rank, len(bounds) - 1, pp)]
