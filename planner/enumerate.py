"""The search space: candidate configurations, and cheap lower bounds on their step time and memory.

A bound must never exceed what `CandidateCosts` predicts for any stage partition of the configuration, so that
pruning by bound never discards the optimum. Per-layer sums are cached per (tp, micro-batch, recompute).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

from planner.attention import layers_for_cluster
from planner.candidate import Config, _spans, _strides, layer_table
from planner.cluster import ClusterSpec
from planner.cost import CommModel, framework_overhead, place_group, uses_measured_times
from planner.dp_comm import Affine, DPComm, dp_comm
from planner.evaluate import ModelView
from planner.memory import (
    estimate_comm_buffer_bytes,
    estimate_state_bytes,
    estimate_working_set_bytes,
    in_flight,
    optimizer_bytes_touched,
)
from planner.strategy import MeshAxis, ParallelDims, Recompute, Schedule, ZeroStage

#: Nodes a tensor-parallel group may span (see `legal_degrees`).
MAX_TP_NODES = 2


@dataclass(frozen=True)
class SearchSpace:
    """Which options the search may combine (keyword arguments of `planner.plan`)."""

    zero_stages: tuple[int, ...] = (0, 1, 2, 3)  #: ZeRO stages to try
    schedules: tuple[Schedule, ...] = (Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED_1F1B)  #: GPipe never beats 1F1B
    virtual_stages: tuple[int, ...] = (2, 3)  #: chunks per rank for the interleaved schedule
    recompute: tuple[Recompute, ...] = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)  #: recompute modes
    micro_batch_sizes: tuple[int, ...] | None = None  #: None = every divisor of the per-replica batch
    tp_degrees: tuple[int, ...] | None = None  #: None = every legal degree
    pp_degrees: tuple[int, ...] | None = None  #: None = every legal degree
    #: Mesh layouts to try, outermost axis first; the first is the usual one (tp innermost, inside a node) and wins
    #: ties. Layouts that place every group the same way as an earlier one are skipped.
    #: sequence parallelism to try where tp > 1 and some layer can run it (False first: it wins ties)
    sequence_parallel: tuple[bool, ...] = (False, True)
    mesh_orders: tuple[tuple[MeshAxis, ...], ...] = (
        (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP), (MeshAxis.DP, MeshAxis.PP, MeshAxis.TP),
        (MeshAxis.PP, MeshAxis.TP, MeshAxis.DP), (MeshAxis.TP, MeshAxis.PP, MeshAxis.DP),
        (MeshAxis.DP, MeshAxis.TP, MeshAxis.PP), (MeshAxis.TP, MeshAxis.DP, MeshAxis.PP),
    )


def divisors(n: int) -> list[int]:
    """Positive divisors of n in increasing order."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def legal_degrees(view: ModelView, cluster: ClusterSpec, space: SearchSpace) -> list[tuple[int, int, int]]:
    """(dp, tp, pp) triples with dp*tp*pp == world and a tp every TP-able layer allows (see `allows`).

    tp may span two nodes: whether that pays is the cost model's call (a wide layer on a fast network can gain).
    Wider groups are not enumerated: every block's all-reduces would then cross the network between more than two
    nodes at the per-GPU network rate, an order of magnitude below the in-node link on every machine we know of, and
    the configurations (most of a large cluster's space) would only cost search time.
    """
    world, profile = cluster.world_size, view.profile
    specs = [x.tp for x in profile.layers if x.tp is not None]
    out = []
    for tp in divisors(world):
        if tp > MAX_TP_NODES * cluster.gpus_per_node:
            continue
        if not all(spec.allows(tp) for spec in specs) or (tp > 1 and not specs):
            continue
        if space.tp_degrees is not None and tp not in space.tp_degrees:
            continue
        for pp in divisors(world // tp):
            if pp > len(view.cuts) + 1 or (space.pp_degrees is not None and pp not in space.pp_degrees):
                continue
            out.append((world // (tp * pp), tp, pp))
    return out


def enumerate_configs(view: ModelView, cluster: ClusterSpec, global_batch: int, space: SearchSpace) -> list[Config]:
    """Every configuration of the search space whose dp divides the global batch."""
    configs = []
    max_stages = len(view.cuts) + 1
    sp_layers = any(x.tp is not None and x.tp.sequence_parallel is not None for x in view.profile.layers)
    for dp, tp, pp in legal_degrees(view, cluster, space):
        if global_batch % dp:
            continue
        dims = ParallelDims(dp=dp, tp=tp, pp=pp, world_size=cluster.world_size)
        per_replica = global_batch // dp
        sizes = divisors(per_replica)
        if space.micro_batch_sizes is not None:
            sizes = [b for b in sizes if b in space.micro_batch_sizes]
        zeros = [ZeroStage(z) for z in space.zero_stages] if dp > 1 else [ZeroStage.NONE]
        for b in sizes:
            m = per_replica // b
            if pp > 1 and m < pp:  # the schedules need a micro-batch for every pipeline rank (see Strategy)
                continue
            scheds = [(Schedule.ONE_F_ONE_B, 1)] if pp == 1 else []
            if pp > 1:
                for s in space.schedules:
                    if s == Schedule.INTERLEAVED_1F1B:
                        scheds += [(s, v) for v in space.virtual_stages if m % pp == 0 and pp * v <= max_stages]
                    else:
                        scheds.append((s, 1))
            sps = [sp for sp in space.sequence_parallel if not sp or (tp > 1 and sp_layers)] or [False]
            for order in distinct_mesh_orders(dims, cluster.gpus_per_node, space.mesh_orders):
                for zero in zeros:
                    for sched, v in scheds:
                        for rc in space.recompute:
                            configs += [Config(dims=dims, zero_stage=zero, micro_batch_size=b, num_micro_batches=m,
                                               schedule=sched, virtual_stages=v, recompute=rc, mesh_order=order,
                                               sequence_parallel=sp) for sp in sps]
    return configs


def distinct_mesh_orders(dims: ParallelDims, gpus_per_node: int, orders: tuple[tuple[MeshAxis, ...], ...]
                         ) -> list[tuple[MeshAxis, ...]]:
    """The orders of `orders` that place the tp group, the dp group or the pipeline neighbours differently from
    every earlier one (an order's cost depends only on those placements)."""
    seen, out = set(), []
    for order in orders:
        strides = _strides(order, dims)
        pp_links = tuple(_spans(r, (r + 1) % dims.pp, strides[MeshAxis.PP], gpus_per_node) for r in range(dims.pp))
        key = (place_group(dims.tp, strides[MeshAxis.TP], gpus_per_node),
               place_group(dims.dp, strides[MeshAxis.DP], gpus_per_node), pp_links)
        if key not in seen:
            seen.add(key)
            out.append(order)
    return out


@dataclass
class LayerTotals:
    """Sums over all layers for one (tp, micro-batch, recompute), the inputs of the bounds."""

    time: float
    max_time: float
    window: float
    elems: float
    act: int
    working: int
    max_static_elems: float = 0.0
    param_layers: int = 0  #: layers that hold parameters (each pays a DP collective's latency)


class Bounder:
    """Lower bounds on step time and peak memory of a configuration over all its stage partitions."""

    def __init__(self, view: ModelView, cluster: ClusterSpec) -> None:
        self.view, self.cluster = view, cluster
        self.profile = view.profile
        self.comm = CommModel(cluster)
        self.measured = uses_measured_times(self.profile, cluster)
        self._totals = lru_cache(maxsize=None)(self._layer_totals)
        self._buffers = lru_cache(maxsize=None)(self._comm_buffers)

    def _layer_totals(self, tp: int, b: int, rc: Recompute, tp_group_key: tuple[int, int], sp: bool = False
                      ) -> LayerTotals:
        p = self.profile
        group = place_group(tp, tp_group_key[0], tp_group_key[1])
        fwd, bwd, rcs, tpc, window, elems, act = layer_table(p, self.cluster, tp, b, rc, group, sp)
        times = [f + g + r + t for f, g, r, t in zip(fwd, bwd, rcs, tpc)]
        working = estimate_working_set_bytes(layers_for_cluster(p, self.cluster), tp=tp, micro_batch=b, recompute=rc,
                                             sequence_parallel=sp)
        if p.dtype.itemsize < 4:  # a bound over both ways 16-bit compute runs: the lesser activations of the two
            act = [min(x, y) for x, y in zip(act, layer_table(p, self.cluster, tp, b, rc, group, sp, True)[6])]
            working = min(working, estimate_working_set_bytes(
                layers_for_cluster(p, self.cluster, autocast=True), tp=tp, micro_batch=b, recompute=rc,
                sequence_parallel=sp))
        return LayerTotals(time=sum(times), max_time=max(times), window=sum(window),
                           elems=sum(elems), act=sum(act),
                           working=working,
                           max_static_elems=max(elems), param_layers=sum(1 for e in elems if e > 0))

    def _comm_buffers(self, dp: int, tp: int, pp: int, zero: ZeroStage, b: int) -> int:
        return estimate_comm_buffer_bytes(self.profile.layers, self.view.cut_bytes, dtype=self.profile.dtype, dp=dp,
                                          tp=tp, pp=pp, zero=zero, micro_batch=b)

    @cache  # noqa: B019 - one Bounder lives for one search
    def _dp_comm(self, dp: int, stride: int, gpus_per_node: int, zero: ZeroStage, pipelined: bool) -> DPComm:
        group = place_group(dp, stride, gpus_per_node)
        return dp_comm(self.comm, group, zero, self.profile.dtype, pipelined=pipelined,
                       overlap=self.cluster.overlap_dp_comm)

    def bounds(self, cfg: Config) -> tuple[float, float, float]:
        """(step-time bound in seconds, peak-memory bound in bytes, the slowest-rank time the first one assumed)."""
        d, b, m, v = cfg.dims, cfg.micro_batch_size, cfg.num_micro_batches, cfg.virtual_stages
        G = self.cluster.gpus_per_node
        strides = _strides(cfg.mesh_order, d)
        t = self._totals(d.tp, b, cfg.recompute, (strides[MeshAxis.TP], G), cfg.sequence_parallel)
        dtype = self.profile.dtype
        zero = cfg.zero_stage if d.dp > 1 else ZeroStage.NONE
        overlap = self.cluster.overlap_dp_comm
        pp = d.pp
        dpc = self._dp_comm(d.dp, strides[MeshAxis.DP], G, zero, pp > 1)

        def total(term: Affine) -> float:  # a term summed over all layers
            return term.alpha * t.param_layers + term.beta * t.elems

        k_sum = total(dpc.per_mb)
        fo = framework_overhead(self.cluster, dp=d.dp, tp=d.tp, pp=pp, zero=cfg.zero_stage)
        # Host work per micro-batch (planner.candidate): FSDP2 units and every rank's v pipeline chunks.
        busy = t.time + sum(fo.unit_seconds(x) for x in self.profile.layers) + pp * v * fo.stage_per_mb
        s_lb = max(busy, k_sum) if overlap else busy + k_sum
        r_lb = max(s_lb / pp, t.max_time + v * fo.stage_per_mb)
        pipe = (m - 1 / v) * r_lb + s_lb / v
        mem_bw = self.cluster.device.memory_bandwidth * self.cluster.memory_efficiency
        opt = (optimizer_bytes_touched(dtype) / mem_bw / (d.dp if zero >= ZeroStage.OPTIMIZER else 1) * t.elems
               + sum(fo.optimizer_seconds(x) for x in self.profile.layers))
        dp_avg = total(dpc.overlap) / pp
        exposed = (max(0.0, dp_avg - t.window / pp) if overlap else dp_avg) + dpc.fixed
        # Averages over ranks bound the largest rank's tail from below (max(0, x - w) is convex).
        tail = opt / pp + total(dpc.blocking) / pp + exposed
        state = estimate_state_bytes(dtype, cfg.zero_stage, d.dp, pipelined=d.pp > 1, micro_batches=m)
        fl = in_flight(cfg.schedule, pp=pp, rank=pp - 1, num_micro_batches=m, virtual_stages=v)  # the fewest
        const = self._buffers(d.dp, d.tp, pp, cfg.zero_stage, b) + t.working
        mem = max(t.elems * state.total / pp + fl * t.act / v / pp, t.max_static_elems * state.total) + const
        return pipe + tail, mem, r_lb
