"""The search against brute force, hand-computed cases, and the rules a plan must obey (no torch needed)."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import subprocess
import sys
import time

import pytest

from planner import PlanError, evaluate, plan
from planner.candidate import CandidateCosts
from planner.cluster import ClusterSpec, load_cluster
from planner.cost import place_group
from planner.enumerate import SearchSpace, enumerate_configs
from planner.evaluate import prepare
from planner.gpt_formula import gpt_profile
from planner.model_profile import (
    DType,
    InputSpec,
    LayerProfile,
    ModelProfile,
    ProfileMode,
    TensorParallelSpec,
)
from planner.search import SIMPLICITY_TOLERANCE, search, simplicity
from planner.strategy import (
    MeshAxis,
    ParallelDims,
    PlanKind,
    Recompute,
    Schedule,
    StageSpec,
    Strategy,
    ZeroStage,
)


def _layer(i: int, rng: random.Random, divisor: int) -> LayerProfile:
    params = rng.randint(1, 50) * 10**5
    flops = rng.uniform(1, 10) * 1e9
    saved = rng.uniform(1, 10) * 1e6
    out = rng.choice([1e6, 2e6, 4e6])
    return LayerProfile(
        index=i, name=f"l{i}", module_type="L", param_count=params, param_bytes=4 * params,
        fwd_flops=flops, bwd_flops=2 * flops, fwd_bytes=saved * 2, bwd_bytes=saved * 4,
        saved_activation_bytes=saved, input_bytes=1e6, output_bytes=out,
        selective_saved_bytes=saved * rng.uniform(0, 0.5), selective_fwd_flops=flops * 0.1,
        tp=(TensorParallelSpec(shards=[], divisor=divisor, sharded_param_count=params * 9 // 10,
                               allreduces_per_forward=rng.choice([1, 2]), allreduce_bytes=out)
            if rng.random() < 0.8 else None),
    )


def _random_instance(seed: int) -> tuple[ModelProfile, ClusterSpec, int]:
    rng = random.Random(seed)
    # Up to 24 layers; at most 8 legal cuts keep the brute force over partitions small (as skip connections do).
    n_layers = rng.randint(2, 24)
    divisor = rng.choice([4, 8, 12])
    layers = [_layer(i, rng, divisor) for i in range(n_layers)]
    n_cuts = min(n_layers - 1, rng.randint(max(0, min(n_layers - 1, 8) - 2), 8))
    profile = ModelProfile(
        name=f"rand{seed}", structure_hash=f"h{seed}", input=InputSpec(batch_size=1, seq_len=16), dtype=DType.FP32,
        device="meta", mode=ProfileMode.ANALYTIC, layers=layers, edges=[],
        cut_points=sorted(rng.sample(range(1, n_layers), k=n_cuts)),
        profile_seconds=0.0)
    gpn = rng.choice([1, 2, 4])
    nodes = rng.choice([1, 2, 4]) if gpn < 4 else rng.choice([1, 2])
    static = profile.param_count * 16
    cluster = ClusterSpec.model_validate(dict(
        name="rand", nodes=nodes, gpus_per_node=gpn,
        device=dict(name="d", memory_bytes=int(static * rng.uniform(0.1, 1.2)) + 10**8,
                    peak_flops={"float32": 1e12}, memory_bandwidth=rng.choice([1e10, 1e11])),
        intra_node=dict(bandwidth=rng.choice([1e9, 1e10]), latency=1e-5),
        inter_node=dict(bandwidth=rng.choice([1e8, 1e9]), latency=1e-4),
        overlap_dp_comm=rng.random() < 0.5, memory_margin=0.05))
    return profile, cluster, rng.choice([4, 8, 16])


def _brute_force_by_config(profile: ModelProfile, cluster: ClusterSpec, batch: int, space: SearchSpace) -> dict:
    """Min step time of every configuration (GPipe included, every one of the 6 mesh orders) that fits, over every
    contiguous partition."""
    view = prepare(profile, cluster)
    usual = SearchSpace().mesh_orders[0]
    full = SearchSpace(**{**space.__dict__, "schedules": (*space.schedules, Schedule.GPIPE), "mesh_orders": (usual,)})
    out = {}
    configs = [dataclasses.replace(cfg, mesh_order=order) for cfg in enumerate_configs(view, cluster, batch, full)
               for order in itertools.permutations(usual)]
    for cfg in configs:
        costs = CandidateCosts(profile, cluster, cfg, view.cut_bytes)
        for inner in itertools.combinations(view.cuts, cfg.num_stages - 1):
            pc = costs.evaluate_bounds([0, *inner, profile.num_layers])
            if pc.fits:
                out[cfg] = min(out.get(cfg, float("inf")), pc.step)
    return out


def _brute_force(profile: ModelProfile, cluster: ClusterSpec, batch: int, space: SearchSpace) -> float:
    """Min step time over every configuration and every contiguous partition at legal cuts."""
    return min(_brute_force_by_config(profile, cluster, batch, space).values(), default=float("inf"))


@pytest.mark.parametrize("seed", range(50))
def test_search_finds_the_brute_force_optimum_on_small_random_instances(seed):
    profile, cluster, batch = _random_instance(seed)
    rng = random.Random(1000 + seed)
    space = SearchSpace(zero_stages=tuple(sorted(rng.sample([0, 1, 2, 3], 2))),
                        recompute=tuple(rng.sample(list(Recompute), rng.randint(1, 2))), virtual_stages=(2,))
    by_config = _brute_force_by_config(profile, cluster, batch, space)
    expected = min(by_config.values(), default=float("inf"))
    view = prepare(profile, cluster)
    if expected == float("inf"):
        # The error must name the reason the brute force found: no configuration splits the batch, or none fits.
        legal = enumerate_configs(view, cluster, batch, space)
        why = "no strategy fits in" if legal else r"not divisible by any data-parallel degree|no \(dp, tp, pp\) split"
        with pytest.raises(PlanError, match=why):
            search(view, cluster, global_batch_size=batch, space=space, relative_gap=0.0, simplicity_tolerance=0.0,
                   time_limit_s=120)
        return
    result = search(view, cluster, global_batch_size=batch, space=space, relative_gap=0.0, simplicity_tolerance=0.0,
                    time_limit_s=120)
    assert result.best.prediction.step_seconds == pytest.approx(expected, rel=1e-6)
    assert result.proved and result.gap == 0.0
    # the plan's own prediction is exactly what evaluate() says about its strategy
    again = evaluate(profile, cluster, result.best.strategy)
    assert again.step_seconds == pytest.approx(result.best.prediction.step_seconds, rel=1e-12)
    for s in [result.best, *result.ranked]:
        assert all(m.total <= m.capacity for m in s.prediction.memory)
    # with the default tolerance: the simplest configuration within 3% of the optimum, the fastest of its kind
    window = expected * (1 + SIMPLICITY_TOLERANCE)
    simplest = min(simplicity(c) for c, t in by_config.items() if t <= window)
    fastest_simple = min(t for c, t in by_config.items() if t <= window and simplicity(c) == simplest)
    lenient = search(view, cluster, global_batch_size=batch, space=space, relative_gap=0.0, time_limit_s=120)
    assert simplicity(lenient.best.cfg) == simplest
    assert lenient.best.step == pytest.approx(fastest_simple, rel=1e-6)


def test_pure_data_parallel_step_is_compute_plus_all_reduce_by_hand():
    F, P, M, W = 1e9, 1e12, 1e11, 1e6  # flops per sample per layer, peak, memory bandwidth, params per layer
    layers = [LayerProfile(index=i, name=f"l{i}", module_type="L", param_count=W, param_bytes=4 * W,
                           fwd_flops=F, bwd_flops=2 * F, fwd_bytes=0, bwd_bytes=0, saved_activation_bytes=1e6,
                           input_bytes=1e6, output_bytes=1e6) for i in range(2)]
    profile = ModelProfile(name="two", structure_hash="x", input=InputSpec(batch_size=1), dtype=DType.FP32,
                           device="meta", mode=ProfileMode.ANALYTIC, layers=layers, edges=[], cut_points=[1],
                           profile_seconds=0.0)
    cluster = ClusterSpec.model_validate(dict(
        name="hand", nodes=1, gpus_per_node=4,
        device=dict(name="d", memory_bytes=10**10, peak_flops={"float32": P}, memory_bandwidth=M),
        intra_node=dict(bandwidth=1e10, latency=2e-5), inter_node=dict(bandwidth=1e9, latency=1e-4),
        compute_efficiency=1.0, memory_efficiency=1.0, comm_efficiency=1.0, overlap_dp_comm=False))
    b = 8
    strategy = Strategy(dims=ParallelDims(dp=4, tp=1, pp=1, world_size=4), micro_batch_size=b,
                        num_micro_batches=1, stages=[StageSpec(start=0, stop=2)])
    pred = evaluate(profile, cluster, strategy)
    # per layer: forward b*F/P plus one weight read, backward 2*b*F/P plus weight read and gradient write
    compute = 2 * (b * F / P + 4 * W / M + 2 * b * F / P + 2 * 4 * W / M)
    S = 2 * 4 * W  # fp32 gradient bytes of both layers
    # DDP: ceil(S / 25 MiB) = 1 bucket, counted as S / 25 MiB + 1 calls; each call a ring on 4 devices in the node
    # (two passes of NCCL's base latency + 3 steps), the data 2 * 3/4 of S
    latency = 2 * (8.4e-6 + 3 * 2e-5)
    all_reduce = latency * (S / (25 * 1024**2) + 1) + 2 * 3 / 4 * S / 1e10
    # torch's AdamW (not fused) makes 8 passes over fp32 tensors per parameter: decay mul_ (read+write), lerp_ of the
    # first moment (3), mul_ and addcmul_ of the second (2 + 3), sqrt, division, add_ eps (2 each), addcdiv_ (4)
    optimizer = 2 * W * (2 + 3 + 2 + 3 + 2 + 2 + 2 + 4) * 4 / M
    assert pred.step_seconds == pytest.approx(compute + all_reduce + optimizer, rel=1e-12)
    assert pred.time.exposed_comm == pytest.approx(all_reduce, rel=1e-12)


def test_small_model_with_large_batch_on_one_node_is_data_parallel():
    p = gpt_profile(num_layers=12, hidden=768, heads=12, seq_len=1024, vocab_size=50257)
    result = plan(p, load_cluster("dgx-a100-80gb"), global_batch_size=512, top_k=3)
    assert result.kind == PlanKind.DATA
    assert result.strategy.dims.dp == 8
    assert "does not fit" not in result.explanation


def test_model_that_cannot_fit_one_device_gets_model_or_hybrid_parallelism():
    # 18B parameters: 295 GB of replicated training state (ZeRO-3 sharding would be 'data' by definition).
    p = gpt_profile(num_layers=40, hidden=6144, heads=48, seq_len=2048, vocab_size=51200)
    assert p.param_count * 16 > 80 * 2**30
    result = plan(p, load_cluster("dgx-a100-80gb", nodes=2), global_batch_size=64, zero_stages=(0,), top_k=3,
                  time_limit_s=2)  # the kind is settled long before the (anytime) search could prove its optimum
    assert result.kind in (PlanKind.MODEL, PlanKind.HYBRID)
    assert all(m.total <= m.capacity for m in result.prediction.memory)


def test_tp_never_spans_nodes_on_a_slow_network():
    p = gpt_profile(num_layers=24, hidden=4096, heads=32, seq_len=2048, vocab_size=51200)
    slow = load_cluster("dgx-a100-80gb").with_overrides(
        nodes=4, gpus_per_node=2, inter_node={"bandwidth": 1e9, "latency": 1e-4})
    result = plan(p, slow, global_batch_size=64, top_k=5, time_limit_s=2)
    for s in [result.strategy, *(a.strategy for a in result.alternatives)]:
        assert not place_group(s.dims.tp, 1, slow.gpus_per_node).spans_nodes


def test_no_returned_plan_predicts_more_memory_than_the_device_has():
    p = gpt_profile(num_layers=24, hidden=2048, heads=16, seq_len=2048, vocab_size=51200)
    cluster = load_cluster("dgx-a100-40gb", nodes=2)
    result = plan(p, cluster, global_batch_size=256, top_k=8)
    cap = cluster.device.memory_bytes
    assert result.prediction.peak_memory <= cap * (1 - cluster.memory_margin)
    for alt in result.alternatives:
        assert alt.prediction.fits == (alt.prediction.peak_memory <= cap * (1 - cluster.memory_margin) + 1)
        assert alt.prediction.fits or alt.reason.startswith("does not fit")


def test_plan_is_deterministic_and_round_trips_through_json():
    p = gpt_profile(num_layers=8, hidden=1024, heads=16, seq_len=1024, vocab_size=50257)
    a = plan(p, load_cluster("dgx-a100-40gb", nodes=2), global_batch_size=32, top_k=3)
    b = plan(p, load_cluster("dgx-a100-40gb", nodes=2), global_batch_size=32, top_k=3)
    assert a.strategy == b.strategy
    assert type(a).from_json(a.to_json()).strategy == a.strategy
    assert a.provenance.profile_hash == p.profile_hash


def test_no_fit_error_says_how_much_is_missing_and_what_would_help():
    p = gpt_profile(num_layers=40, hidden=6144, heads=48, seq_len=2048, vocab_size=51200)
    one = load_cluster("dgx-a100-40gb").with_overrides(gpus_per_node=1)
    with pytest.raises(PlanError, match=r"GB over; try about \d+ nodes"):
        plan(p, one, global_batch_size=8)


def test_batch_not_divisible_by_any_dp_degree_suggests_workable_sizes():
    layer = LayerProfile(index=0, name="only", module_type="L", param_count=10, param_bytes=40, fwd_flops=1.0,
                         bwd_flops=2.0, fwd_bytes=0, bwd_bytes=0, saved_activation_bytes=1, input_bytes=1,
                         output_bytes=1)
    p = ModelProfile(name="one", structure_hash="o", input=InputSpec(batch_size=1), dtype=DType.FP32, device="meta",
                     mode=ProfileMode.ANALYTIC, layers=[layer], edges=[], cut_points=[], profile_seconds=0.0)
    with pytest.raises(PlanError, match=r"global batch 12 is not divisible.*dp in \[8\].*8 or 16"):
        plan(p, load_cluster("dgx-a100-80gb"), global_batch_size=12)


def test_precision_mismatch_is_refused():
    p = gpt_profile(num_layers=2, hidden=64, heads=4, seq_len=32, vocab_size=512, dtype="float16")
    with pytest.raises(PlanError, match="precision mismatch.*float16"):
        plan(p, load_cluster("cpu"), global_batch_size=8)


def test_memory_objective_never_picks_more_memory_than_the_throughput_plan():
    p = gpt_profile(num_layers=12, hidden=1024, heads=16, seq_len=1024, vocab_size=50257)
    cluster = load_cluster("dgx-a100-40gb")
    fast = plan(p, cluster, global_batch_size=64, top_k=1)
    small = plan(p, cluster, global_batch_size=64, top_k=1, objective="memory")
    assert small.prediction.peak_memory <= fast.prediction.peak_memory
    assert fast.prediction.step_seconds <= small.prediction.step_seconds * (1 + 1e-9)


def test_importing_the_planner_does_not_import_torch():
    code = "import sys, planner; planner.plan; planner.evaluate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluate_rejects_a_strategy_for_another_cluster_size():
    p = gpt_profile(num_layers=2, hidden=64, heads=4, seq_len=32, vocab_size=512)
    s = Strategy(dims=ParallelDims(dp=2, tp=1, pp=1, world_size=2), zero_stage=ZeroStage.NONE, micro_batch_size=1,
                 num_micro_batches=1, stages=[StageSpec(start=0, stop=4)])
    with pytest.raises(PlanError, match="uses 2 devices"):
        evaluate(p, load_cluster("dgx-a100-80gb"), s)


def _two_layer_ddp_vs_zero3(memory_bandwidth: float) -> tuple[ModelProfile, ClusterSpec, float, float]:
    """Two fp32 layers on 2 GPUs, one micro-batch of 8, no overlap: DDP vs ZeRO-3 steps by hand."""
    F, P, M, W, B = 1e9, 1e12, memory_bandwidth, 1e6, 1e10
    layers = [LayerProfile(index=i, name=f"l{i}", module_type="L", param_count=W, param_bytes=4 * W,
                           fwd_flops=F, bwd_flops=2 * F, fwd_bytes=0, bwd_bytes=0, saved_activation_bytes=1e6,
                           input_bytes=1e6, output_bytes=1e6) for i in range(2)]
    profile = ModelProfile(name="two", structure_hash="z", input=InputSpec(batch_size=1), dtype=DType.FP32,
                           device="meta", mode=ProfileMode.ANALYTIC, layers=layers, edges=[], cut_points=[],
                           profile_seconds=0.0)
    cluster = ClusterSpec.model_validate(dict(
        name="hand", nodes=1, gpus_per_node=2,
        device=dict(name="d", memory_bytes=10**10, peak_flops={"float32": P}, memory_bandwidth=M),
        intra_node=dict(bandwidth=B, latency=0.0), inter_node=dict(bandwidth=1e9, latency=0.0),
        collective_latency=0.0, compute_efficiency=1.0, memory_efficiency=1.0, comm_efficiency=1.0,
        overlap_dp_comm=False))
    compute = 2 * (3 * 8 * F / P + 3 * 4 * W / M)  # fwd + bwd flops, weight reads and gradient writes
    S = 2 * 4 * W  # gradient bytes
    optimizer = 2 * W * 20 * 4 / M  # torch's AdamW: 20 fp32 element accesses per parameter (see above)
    ddp = compute + S / B + optimizer  # ring all-reduce on 2 devices moves S bytes
    zero3 = compute + 1.5 * S / B + optimizer / 2  # 2 all-gathers + reduce-scatter of S/2; half the optimizer
    return profile, cluster, ddp, zero3


@pytest.mark.parametrize("memory_bandwidth, zero3_gain, chosen", [(7.2e10, 0.014, 0), (2.5e10, 0.0525, 3)])
def test_ddp_is_chosen_when_zero3_is_faster_only_within_the_tolerance(memory_bandwidth, zero3_gain, chosen):
    profile, cluster, ddp, zero3 = _two_layer_ddp_vs_zero3(memory_bandwidth)
    assert ddp / zero3 - 1 == pytest.approx(zero3_gain, abs=5e-4)
    space = {"zero_stages": (0, 3), "recompute": (Recompute.NONE,), "micro_batch_sizes": (8,)}
    result = plan(profile, cluster, global_batch_size=16, **space)
    assert int(result.strategy.zero_stage) == chosen
    assert result.prediction.step_seconds == pytest.approx(ddp if chosen == 0 else zero3, rel=1e-9)
    if chosen == 0:
        assert f"ZeRO-3 (dp=2 tp=1 pp=1 zero=3 mb=8x1 1f1b recompute=none) was predicted {zero3_gain:.1%}" \
               in result.explanation
        assert "within the 3% the cost model cannot resolve; DDP chosen as simpler" in result.explanation
        assert result.alternatives[0].reason.startswith(f"{zero3_gain:.1%} faster")
    else:
        assert "simpler" not in result.explanation
    strict = plan(profile, cluster, global_batch_size=16, simplicity_tolerance=0.0, **space)
    assert int(strict.strategy.zero_stage) == 3
    least_memory = plan(profile, cluster, global_batch_size=16, objective="memory", **space)
    assert int(least_memory.strategy.zero_stage) == 3


class _TickClock:
    """A clock that advances a fixed tick at every reading: budgets then measure the search's own steps, not the
    machine's speed, so what a budget lets the search do is the same on every machine."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_a_larger_time_budget_finds_the_faster_plan_that_a_small_one_misses(monkeypatch):
    # The case: a GPT-3-width model on many A100s, where capped solves stopped at a worse plan than the space
    # holds. Here 48 blocks of width 12288 on 64 A100s (8 nodes), batch 1536, the space cut to ZeRO 0/1, 1F1B,
    # selective/full recompute and no sequence parallelism to keep the test short. The clock ticks 5 ms per reading,
    # so the 0.5 s budget is 100 readings of the search's work: the bounds and a few greedy partitions, while the
    # large budget closes the CP-SAT solves (a non-default mesh order wins).
    p = gpt_profile(num_layers=48, hidden=12288, heads=96, seq_len=2048, vocab_size=51200)
    cluster = load_cluster("dgx-a100-80gb", nodes=8)
    space = {"zero_stages": (0, 1), "recompute": (Recompute.SELECTIVE, Recompute.FULL),
             "schedules": (Schedule.ONE_F_ONE_B,), "sequence_parallel": (False,)}
    monkeypatch.setattr(time, "perf_counter", _TickClock(0.005))
    quick = plan(p, cluster, global_batch_size=1536, top_k=1, time_limit_s=0.5, simplicity_tolerance=0.0, **space)
    ample = plan(p, cluster, global_batch_size=1536, top_k=1, time_limit_s=1000, simplicity_tolerance=0.0,
                 **space)
    # strictly better (by more than rounding), found and proved by the larger budget
    assert ample.prediction.step_seconds < quick.prediction.step_seconds * 0.995
    assert (ample.strategy.dims.pp, ample.strategy.dims.tp) != (1, 1)
    assert "search stopped by its 0.5 s budget; proved within" in quick.provenance.solver_status
    assert "time budget" in quick.explanation

    def proved_gap(status: str) -> float:
        return float(re.search(r"proved within ([0-9.]+)%", status).group(1)) if "proved within" in status else 0.0

    assert proved_gap(ample.provenance.solver_status) < proved_gap(quick.provenance.solver_status) / 2


def _two_layer_profile(params: int, cut_bytes: float) -> ModelProfile:
    layers = [LayerProfile(index=i, name=f"l{i}", module_type="L", param_count=params, param_bytes=4 * params,
                           fwd_flops=1e9, bwd_flops=2e9, fwd_bytes=0, bwd_bytes=0, saved_activation_bytes=1e6,
                           input_bytes=cut_bytes, output_bytes=cut_bytes) for i in range(2)]
    return ModelProfile(name="two", structure_hash=f"m{params}", input=InputSpec(batch_size=1), dtype=DType.FP32,
                        device="meta", mode=ProfileMode.ANALYTIC, layers=layers, edges=[], cut_points=[1],
                        profile_seconds=0.0)


@pytest.mark.parametrize("params, cut_bytes, pp_inside_node", [(10**3, 1e9, True), (10**8, 1e3, False)])
def test_the_mesh_order_is_chosen_by_cost(params, cut_bytes, pp_inside_node):
    """dp=2 x pp=2 on 2 nodes of 2: big activations at the cut put the pipeline inside a node, big gradients the
    data-parallel group; the usual order (pp, dp, tp) keeps dp inside a node."""
    cluster = ClusterSpec.model_validate(dict(
        name="two-nodes", nodes=2, gpus_per_node=2,
        device=dict(name="d", memory_bytes=10**11, peak_flops={"float32": 1e12}, memory_bandwidth=1e11),
        intra_node=dict(bandwidth=1e11, latency=1e-6), inter_node=dict(bandwidth=1e9, latency=1e-5),
        overlap_dp_comm=False))
    profile = _two_layer_profile(params, cut_bytes)
    space = dict(tp_degrees=(1,), pp_degrees=(2,), zero_stages=(0,), recompute=(Recompute.NONE,),
                 micro_batch_sizes=(2,), schedules=(Schedule.ONE_F_ONE_B,))
    result = plan(profile, cluster, global_batch_size=8, **space)
    usual = SearchSpace().mesh_orders[0]
    order = [axis for axis in result.strategy.mesh_order if result.strategy.dims.degree(axis) > 1]
    assert (order[-1] == MeshAxis.PP) == pp_inside_node  # the innermost axis of size > 1 sits inside a node
    other = evaluate(profile, cluster, result.strategy.model_copy(update={"mesh_order": usual}))
    if pp_inside_node:
        assert tuple(result.strategy.mesh_order) != usual
        assert result.prediction.step_seconds < other.step_seconds * 0.9
    else:
        assert tuple(result.strategy.mesh_order) == usual  # the usual order wins (and would win a tie)
