"""Score one strategy: `evaluate(profile, cluster, strategy) -> Prediction`, and the Prediction builder the search shares."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from pydantic import ValidationError

from planner.attention import layers_for_cluster
from planner.budget import Budget
from planner.candidate import CandidateCosts, Config, PartitionCosts
from planner.cluster import ClusterError, ClusterSpec
from planner.dp_comm import GRAD_REDUCE_BYTES
from planner.errors import AutoparError
from planner.graph import build_layer_graph, cut_bytes, layer_order, legal_cuts
from planner.model_profile import ModelProfile
from planner.strategy import (
    CommCost,
    MemoryBreakdown,
    MeshAxis,
    Prediction,
    RankTime,
    Recompute,
    StageSpec,
    Strategy,
    TimeBreakdown,
    ZeroStage,
)
from planner.tp_comm import tp_collectives


class PlanError(AutoparError):
    """No strategy can be planned or scored for this input; the message says why and what to change."""


@dataclass(frozen=True)
class ModelView:
    """What the planner derives once per profile: legal pipeline cuts and the bytes each cut sends per sample."""

    profile: ModelProfile
    cuts: list[int]
    cut_bytes: list[float]


def prepare(profile: ModelProfile, cluster: ClusterSpec, budget: Budget | None = None) -> ModelView:
    """Check that profile and cluster can be combined and derive the layer-graph facts the cost model needs.

    `budget` (shared with the search by `planner.plan`) bounds this work: past its deadline, or once its caller
    cancels, preparation stops with PlanTimeout / PlanCancelled instead of running to the end.
    """
    try:
        cluster.peak_flops_for(profile.dtype)
    except ClusterError as exc:
        raise PlanError(f"precision mismatch: the profile is in {profile.dtype.value} but {exc}") from None
    graph = build_layer_graph(profile, budget)
    if budget is not None:
        budget.check("checking the layer order")
    layer_order(graph)
    return ModelView(profile=profile, cuts=legal_cuts(profile), cut_bytes=cut_bytes(profile, graph, budget))


def config_of(strategy: Strategy) -> Config:
    """The strategy without its stage boundaries."""
    return Config(**{f.name: _hashable(getattr(strategy, f.name)) for f in dataclasses.fields(Config)})


def strategy_of(cfg: Config, bounds: tuple[int, ...] | list[int]) -> Strategy:
    """A full strategy from a config and stage boundaries."""
    return Strategy(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)},
                    stages=[StageSpec(start=a, stop=b) for a, b in itertools.pairwise(bounds)])


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def name_stages(strategy: Strategy, profile: ModelProfile) -> Strategy:
    """The strategy with each stage's `layers` set to the profile's module names, so the plan travels alone."""
    names = [x.name for x in profile.layers]
    stages = [s.model_copy(update={"layers": names[s.start:s.stop]}) for s in strategy.stages]
    return strategy.model_copy(update={"stages": stages})


def evaluate(profile: ModelProfile, cluster: ClusterSpec, strategy: Strategy, budget: Budget | None = None
             ) -> Prediction:
    """Predicted step time, throughput and per-rank memory of a strategy the caller chose (within `budget`)."""
    view = prepare(profile, cluster, budget)
    d = strategy.dims
    if d.world_size != cluster.world_size:
        raise PlanError(f"the strategy uses {d.world_size} devices but cluster '{cluster.name}' has "
                        f"{cluster.world_size} ({cluster.nodes} x {cluster.gpus_per_node}); change dp, tp or pp")
    bad_tp = [x.name for x in profile.layers if x.tp is not None and not x.tp.allows(d.tp)]
    if bad_tp:
        raise PlanError(f"tp={d.tp} does not divide the TP divisor of layer {bad_tp[0]}; pick a tp that divides it")
    bounds = [s.start for s in strategy.stages] + [strategy.stages[-1].stop]
    if bounds[-1] != profile.num_layers:
        raise PlanError(f"the stages end at layer {bounds[-1]} but the model has {profile.num_layers} layers")
    illegal = [k for k in bounds[1:-1] if k not in view.cuts]
    if illegal:
        raise PlanError(f"a stage starts at layer {illegal[0]}, which is not a legal pipeline cut of this model")
    costs = CandidateCosts(profile, cluster, config_of(strategy), view.cut_bytes)
    return build_prediction(costs, costs.evaluate_bounds(bounds))


def build_prediction(costs: CandidateCosts, pc: PartitionCosts) -> Prediction:
    """Turn the cost model's per-rank numbers into a `Prediction`; a PlanError if a number overflowed to inf/NaN."""
    try:
        return _build_prediction(costs, pc)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(x) for x in problem["loc"]) or "prediction"
        raise PlanError(f"the cost model overflowed ({where}: {problem['msg']}) for {costs.profile.name} on "
                        f"'{costs.cluster.name}': the profile's FLOPs/bytes or the cluster's rates are out of any "
                        "physical range; check their units") from None


def _build_prediction(costs: CandidateCosts, pc: PartitionCosts) -> Prediction:
    cfg, profile, cluster = costs.cfg, costs.profile, costs.cluster
    m, v, d = cfg.num_micro_batches, cfg.virtual_stages, cfg.dims
    slow, tail = pc.ranks[pc.slowest], pc.ranks[pc.tail_rank]
    busy = slow.compute + slow.recompute + slow.tp_comm + slow.p2p
    zero_exposed = slow.per_mb - busy
    dp_exposed = tail.dp_exposed + tail.dp_blocking
    breakdown = TimeBreakdown(
        compute=m * slow.compute, recompute=m * slow.recompute, bubble=pc.bubble,
        exposed_comm=m * (slow.tp_comm + slow.p2p + zero_exposed) + dp_exposed, optimizer=tail.optimizer,
        comms=_comm_list(costs, pc, zero_exposed),
    )
    batch = cfg.micro_batch_size * m * d.dp
    model_flops = batch * (profile.fwd_flops + profile.bwd_flops)
    run = layers_for_cluster(profile, cluster)  # recomputed as the device runs attention (no scores with flash)
    if cfg.recompute == Recompute.FULL:
        extra = sum(x.fwd_flops for x in run)
    elif cfg.recompute == Recompute.SELECTIVE:
        extra = sum(x.selective_fwd_flops for x in run)
    else:
        extra = 0.0
    world = d.world_size
    working = costs.working_set_bytes
    memory = []
    for rk in pc.ranks:
        parts = dict(parameters=rk.param_bytes, gradients=rk.grad_state_bytes, optimizer_state=rk.optimizer_bytes,
                     activations=rk.activation_bytes + working, comm_buffers=float(costs.comm_buffer_bytes),
                     runtime=float(costs.runtime_bytes),
                     optimizer_temporaries=costs.opt_temp_bytes + costs.opt_temp_per_elem * sum(
                         costs.elems[i] for i in rk.layers),
                     output_buffers=float(costs.output_buffer_bytes if profile.num_layers - 1 in rk.layers else 0))
        memory.append(MemoryBreakdown(**parts, total=max(sum(parts.values()), rk.memory_v / v),
                                      capacity=float(costs.capacity)))
    peak = cluster.peak_flops_for(profile.dtype)
    return Prediction(
        step_seconds=pc.step, time=breakdown, samples_per_second=batch / pc.step,
        tokens_per_second=batch * profile.tokens_per_sample / pc.step,
        model_flops_per_gpu=model_flops / pc.step / world,
        hardware_flops_per_gpu=(model_flops + batch * extra) / pc.step / world,
        mfu=model_flops / pc.step / world / peak, memory=memory, fits=pc.fits,
        rank_times=[RankTime(forward=rk.forward, backward=max(0.0, rk.per_mb - rk.forward)) for rk in pc.ranks],
    )


def _comm_list(costs: CandidateCosts, pc: PartitionCosts, zero_exposed: float) -> list[CommCost]:
    cfg, m = costs.cfg, costs.cfg.num_micro_batches
    slow, tail = pc.ranks[pc.slowest], pc.ranks[pc.tail_rank]
    out = []
    if cfg.dims.tp > 1 and slow.tp_comm > 0:
        full, layers = cfg.recompute == Recompute.FULL, costs.profile.layers
        by_kind: dict[str, list[float]] = {}
        for i in slow.layers:  # the collectives planner.tp_comm prices (in planner.candidate.layer_table), by kind
            for c in tp_collectives(layers[i], layers[i - 1] if i else None, tp=cfg.dims.tp,
                                    sequence_parallel=cfg.sequence_parallel, recompute_forward=full):
                nbytes = cfg.micro_batch_size * c.nbytes
                acc = by_kind.setdefault(c.collective, [0.0, 0.0])
                acc[0] += m * c.count * nbytes
                acc[1] += m * c.count * getattr(costs.comm, c.collective)(nbytes, costs.tp_group)
        for kind, (nbytes, seconds) in by_kind.items():
            purpose = "tp block outputs" if kind == "all_reduce" else "sequence-parallel gathers and reductions"
            out.append(CommCost(collective=kind, axis=MeshAxis.TP, purpose=purpose, bytes=nbytes, seconds=seconds,
                                exposed_seconds=seconds))
    if cfg.num_stages > 1:
        nbytes = m * 2 * sum(costs.cut_bytes[k] for k in _send_cuts(slow.layers, costs.profile.num_layers))
        out.append(CommCost(collective="p2p", axis=MeshAxis.PP, purpose="stage activations and gradients",
                            bytes=nbytes, seconds=m * slow.p2p, exposed_seconds=m * slow.p2p))
    if cfg.dims.dp > 1:
        elems = tail.grad_bytes / costs.profile.dtype.itemsize
        grads, params = elems * GRAD_REDUCE_BYTES, elems * costs.profile.dtype.itemsize
        pipelined = cfg.dims.pp > 1
        if slow.zero_per_mb > 0:
            if cfg.zero_stage == ZeroStage.FULL:
                gathers = 1 if pipelined else 2
                out.append(CommCost(collective="all_gather", axis=MeshAxis.DP,
                                    purpose=f"ZeRO-3 parameter gathers ({gathers} per layer per micro-batch)",
                                    bytes=m * gathers * params, seconds=m * slow.zero_per_mb,
                                    exposed_seconds=m * zero_exposed))
            else:
                out.append(CommCost(collective="reduce_scatter", axis=MeshAxis.DP,
                                    purpose="ZeRO-2 gradients every micro-batch", bytes=m * grads,
                                    seconds=m * slow.zero_per_mb, exposed_seconds=m * zero_exposed))
        if tail.dp_overlap > 0:
            coll = "all_reduce" if cfg.zero_stage == ZeroStage.NONE else "reduce_scatter"
            out.append(CommCost(collective=coll, axis=MeshAxis.DP, purpose="gradient sync during the last backward",
                                bytes=grads, seconds=tail.dp_overlap, exposed_seconds=tail.dp_exposed))
        if tail.dp_blocking > 0:
            what = ("gradient sync after the pipeline" if cfg.zero_stage == ZeroStage.NONE
                    else "parameter gather before the first forward"
                    + (" and gradient sync after the pipeline" if pipelined else ""))
            out.append(CommCost(collective="all_reduce" if cfg.zero_stage == ZeroStage.NONE else "all_gather",
                                axis=MeshAxis.DP, purpose=what, bytes=params + (grads if pipelined else 0.0),
                                seconds=tail.dp_blocking, exposed_seconds=tail.dp_blocking))
    return out


def _send_cuts(layers: list[int], num_layers: int) -> list[int]:
    """Cuts at which a rank holding `layers` sends its output onward (ends of its chunks, not the model's end)."""
    held = set(layers)
    return [i + 1 for i in sorted(held) if i + 1 not in held and i + 1 < num_layers]
