"""Cost model rules, each checked against a formula worked out by hand (no torch needed)."""

from __future__ import annotations

import pytest

from planner.cluster import ClusterSpec, load_cluster
from planner.cost import CommModel, place_group
from planner.memory import estimate_state_bytes, in_flight
from planner.model_profile import DType
from planner.pipeline import build_timeline, estimate_pipeline_seconds
from planner.strategy import Schedule, ZeroStage


def _cluster(**kw) -> ClusterSpec:
    base = dict(name="t", nodes=2, gpus_per_node=4,
                device=dict(name="d", memory_bytes=10**10, peak_flops={"float32": 1e12}, memory_bandwidth=1e11),
                intra_node=dict(bandwidth=1e10, latency=1e-5), inter_node=dict(bandwidth=1e9, latency=1e-4),
                comm_efficiency=0.5)
    base.update(kw)
    return ClusterSpec.model_validate(base)


def test_all_reduce_inside_a_node_is_a_ring_on_the_intra_node_link():
    comm, S = CommModel(_cluster(collective_latency=2e-6)), 4e8
    group = place_group(4, 1, 4)
    assert not group.spans_nodes
    # two ring passes, each NCCL's base latency + 3 steps on the intra-node link + 3/4 of the data
    expected = 2 * (2e-6 + 3 * 1e-5) + 2 * 3 / 4 * S / (1e10 * 0.5)
    assert comm.all_reduce(S, group) == pytest.approx(expected, rel=1e-12)


def test_all_reduce_across_nodes_is_hierarchical_and_bounded_by_the_inter_node_link():
    comm, S = CommModel(_cluster(collective_latency=2e-6)), 4e8
    group = place_group(8, 1, 4)  # 4 members on each of 2 nodes
    assert (group.per_node, group.nodes) == (4, 2)
    # NCCL ring latency: 7 steps, of which nodes-1 = 1 crosses the network; data: a local ring pass plus a
    # ring pass of the 2 nodes on 1/4 of the data (one adapter per member).
    latency = 2e-6 + 6 * 1e-5 + 1 * 1e-4
    data = 3 / 4 * S / (1e10 * 0.5) + 1 / 2 * (S / 4) / (1e9 * 0.5)
    assert comm.all_reduce(S, group) == pytest.approx(2 * (latency + data), rel=1e-12)
    assert comm.all_reduce(S, group) > comm.all_reduce(S, place_group(4, 1, 4))


def test_collective_latency_grows_with_the_ranks_of_the_ring():
    """NCCL's rings take one step per rank: a 1536-GPU all-reduce pays ~100x the latency of a 16-GPU one."""
    cluster = load_cluster("dgx-a100-80gb", nodes=192)
    comm = CommModel(cluster)
    small, big = place_group(16, 1, 8), place_group(1536, 1, 8)
    lat16, lat1536 = comm.all_reduce(1.0, small), comm.all_reduce(1.0, big)
    intra, inter = cluster.intra_node.latency, cluster.inter_node.latency
    assert lat1536 == pytest.approx(2 * (cluster.collective_latency + 1344 * intra + 191 * inter), rel=1e-3)
    assert lat1536 > 50 * lat16
    # the bandwidth part does not grow with the ranks: each adapter carries 1/8 of the data whatever the node count
    S, eff = 1e10, cluster.comm_efficiency
    local = 7 / 8 * S / (cluster.intra_node.bandwidth * eff)
    expected = 2 * (local + 191 / 192 * S / 8 / (cluster.inter_node.bandwidth * eff))
    assert comm.all_reduce(S, big) - lat1536 == pytest.approx(expected, rel=1e-6)
    assert comm.all_reduce(S, big) - lat1536 < 2 * (comm.all_reduce(S, small) - lat16)


def test_reduce_scatter_plus_all_gather_equals_all_reduce():
    comm = CommModel(_cluster())
    for group in (place_group(2, 1, 4), place_group(8, 1, 4), place_group(2, 4, 4)):
        assert comm.reduce_scatter(1e7, group) + comm.all_gather(1e7, group) == pytest.approx(
            comm.all_reduce(1e7, group))


def test_p2p_uses_the_link_it_crosses():
    comm = CommModel(_cluster())
    assert comm.p2p(1e6, False) == pytest.approx(1e-5 + 1e6 / 5e9)
    assert comm.p2p(1e6, True) == pytest.approx(1e-4 + 1e6 / 5e8)


def test_state_bytes_follow_the_executors_mixed_precision_by_hand():
    """fp32 master parameters, gradients and moments (4 + 4 + 8) always; 16-bit compute adds a 2-byte copy."""
    fp32 = estimate_state_bytes(DType.FP32, ZeroStage.NONE, 8)
    assert (fp32.parameters, fp32.gradients, fp32.optimizer) == (4, 4, 8)
    bf16 = estimate_state_bytes(DType.BF16, ZeroStage.NONE, 8)
    assert (bf16.parameters, bf16.gradients, bf16.optimizer) == (4 + 2, 4, 8)  # autocast's saved bf16 casts
    assert estimate_state_bytes(DType.FP16, ZeroStage.NONE, 8).total == 18
    # ZeRO-3 without a pipeline: everything sharded (one gathered layer lives in the comm buffers)
    z3 = estimate_state_bytes(DType.BF16, ZeroStage.FULL, 8, micro_batches=4)
    assert z3.total == pytest.approx(16 / 8)
    # ZeRO-3 in a pipeline: torch keeps the bf16 parameters unsharded after backward, gradients accumulate whole
    z3p = estimate_state_bytes(DType.BF16, ZeroStage.FULL, 8, pipelined=True, micro_batches=4)
    assert (z3p.parameters, z3p.gradients, z3p.optimizer) == (4 / 8 + 2, 4, 1)
    # ZeRO-1 / 2 (FSDP2, reshard_after_forward=False): the bf16 parameters stay whole; ZeRO-1 syncs gradients
    # once per step, so they stay whole over several micro-batches, ZeRO-2 reduce-scatters every micro-batch
    z1 = estimate_state_bytes(DType.BF16, ZeroStage.OPTIMIZER, 4, micro_batches=2)
    assert (z1.parameters, z1.gradients, z1.optimizer) == (1 + 2, 4, 2)
    assert estimate_state_bytes(DType.BF16, ZeroStage.OPTIMIZER, 4, micro_batches=1).gradients == 1
    z2 = estimate_state_bytes(DType.BF16, ZeroStage.GRADIENTS, 4, micro_batches=2)
    assert (z2.parameters, z2.gradients, z2.optimizer) == (1 + 2, 1, 2)
    # fp32 training under ZeRO-1/2 keeps a whole fp32 copy while the layers run
    assert estimate_state_bytes(DType.FP32, ZeroStage.GRADIENTS, 4).parameters == 1 + 4


def test_1f1b_keeps_p_minus_i_micro_batches_and_gpipe_keeps_all():
    assert [in_flight(Schedule.ONE_F_ONE_B, pp=4, rank=r, num_micro_batches=8, virtual_stages=1)
            for r in range(4)] == [4, 3, 2, 1]
    assert in_flight(Schedule.ONE_F_ONE_B, pp=4, rank=0, num_micro_batches=2, virtual_stages=1) == 2
    assert in_flight(Schedule.GPIPE, pp=4, rank=3, num_micro_batches=8, virtual_stages=1) == 8


@pytest.mark.parametrize("schedule", [Schedule.GPIPE, Schedule.ONE_F_ONE_B])
def test_simulated_schedule_with_equal_stages_takes_m_plus_p_minus_1_stage_times(schedule):
    p, m, f, b = 4, 6, 1.0, 2.0
    slots = build_timeline([[f]] * p, [[b]] * p, schedule=schedule, num_micro_batches=m)
    makespan = max(s.end for s in slots)
    assert makespan == pytest.approx((m + p - 1) * (f + b))
    assert estimate_pipeline_seconds([f + b] * p, num_micro_batches=m, virtual_stages=1) == pytest.approx(makespan)


def test_interleaving_divides_the_bubble_by_the_number_of_chunks():
    p, m, v, t = 4, 8, 2, 3.0
    plain = estimate_pipeline_seconds([t] * p, num_micro_batches=m, virtual_stages=1)
    inter = estimate_pipeline_seconds([t] * p, num_micro_batches=m, virtual_stages=v)
    assert plain - m * t == pytest.approx((p - 1) * t)
    assert inter - m * t == pytest.approx((p - 1) * t / v)


def test_unequal_stages_are_not_averaged_away():
    # The slowest rank sets the steady state: 8 micro-batches of 3 s plus the others' 1 s each in warm-up/drain.
    assert estimate_pipeline_seconds([1.0, 3.0, 1.0, 1.0], num_micro_batches=8, virtual_stages=1) == 8 * 3 + 3
    slots = build_timeline([[1 / 3], [1.0], [1 / 3], [1 / 3]], [[2 / 3], [2.0], [2 / 3], [2 / 3]],
                           schedule=Schedule.ONE_F_ONE_B, num_micro_batches=8)
    assert max(s.end for s in slots) >= 8 * 3


def test_presets_load_with_node_override():
    c = load_cluster("dgx-a100-80gb", nodes=4)
    assert c.world_size == 32


def test_layer_time_sums_one_roofline_per_kernel_class_by_hand():
    from planner.cost import estimate_pass_seconds
    from planner.model_profile import LayerProfile

    # peak 1e12 FLOP/s, 1e11 B/s: weight GEMMs compute-bound, activation matmuls memory-bound, plus memory-bound ops
    layer = LayerProfile(index=0, name="l", module_type="L", param_count=0, param_bytes=0, fwd_flops=5e9,
                         bwd_flops=0, fwd_bytes=1e9, bwd_bytes=0, saved_activation_bytes=0, input_bytes=0,
                         output_bytes=0, fwd_actmm_flops=1e9, fwd_actmm_bytes=3e8, fwd_membound_bytes=6e8,
                         fwd_membound_fused_bytes=2e8)
    c = _cluster(compute_efficiency=1.0, memory_efficiency=1.0)
    gemm = max(4e9 / 1e12, 1e8 / 1e11)  # 4 ms compute vs 1 ms of its own bytes
    actmm = max(1e9 / 1e12, 3e8 / 1e11)  # 1 ms compute vs 3 ms of bytes
    t = estimate_pass_seconds(layer, c, 1e12, backward=False, micro_batch=2, tp=1, weight_bytes=0.0)
    assert t == pytest.approx(2 * (gemm + actmm + 6e8 / 1e11), rel=1e-12)
    fused = c.with_overrides(fused_elementwise=True)
    t = estimate_pass_seconds(layer, fused, 1e12, backward=False, micro_batch=2, tp=1, weight_bytes=0.0)
    assert t == pytest.approx(2 * (gemm + actmm + 2e8 / 1e11), rel=1e-12)
    # without the split (older profiles) the layer is one roofline, as before
    plain = layer.model_copy(update={f: 0.0 for f in ("fwd_actmm_flops", "fwd_actmm_bytes", "fwd_membound_bytes",
                                                      "fwd_membound_fused_bytes")})
    t = estimate_pass_seconds(plain, c, 1e12, backward=False, micro_batch=2, tp=1, weight_bytes=0.0)
    assert t == pytest.approx(2 * max(5e9 / 1e12, 1e9 / 1e11), rel=1e-12)


def test_small_gpt_blocks_take_longer_per_flop_than_large_ones():
    # Attention's memory-bound work per token grows with a s (scores), its GEMM work with h^2: at s = 2048 a
    # h = 2304 block spends a larger share on memory-bound kernels than a h = 12288 block.
    from planner.cost import estimate_pass_seconds
    from planner.gpt_formula import gpt_profile

    c = load_cluster("dgx-a100-80gb", compute_efficiency=0.65, fused_elementwise=True)
    peak = c.peak_flops_for(DType.FP16)

    def per_flop(h: int, a: int) -> float:
        blk = gpt_profile(num_layers=1, hidden=h, heads=a, seq_len=2048, vocab_size=51200, dropout=0.1).layers[1]
        t = estimate_pass_seconds(blk, c, peak, backward=False, micro_batch=1, tp=1, weight_bytes=0.0)
        return t / blk.fwd_flops

    small, large = per_flop(2304, 24), per_flop(12288, 96)
    gemm_only = 1 / (peak * 0.65)
    assert small > 1.3 * gemm_only  # well above the GEMM-only rate...
    assert large < 1.1 * gemm_only  # ...while a large block is nearly all GEMM


def _gpt_formula_profile():
    from planner.gpt_formula import gpt_profile

    return gpt_profile(num_layers=8, hidden=1024, heads=16, seq_len=1024, vocab_size=32000)


def test_rank_times_are_the_cost_models_own_and_give_its_bubble():
    """The chart's per-rank times: the bubble the prediction reports is (sum_r R_r - max_r R_r) / v of them."""
    from planner import evaluate
    from planner.strategy import ParallelDims, Recompute, StageSpec, Strategy

    profile = _gpt_formula_profile()
    cluster = load_cluster("dgx-a100-80gb")
    cuts = profile.cut_points
    stages = [StageSpec(start=0, stop=cuts[1]), StageSpec(start=cuts[1], stop=cuts[5]),
              StageSpec(start=cuts[5], stop=profile.num_layers)]
    s = Strategy(dims=ParallelDims(dp=1, tp=1, pp=3, world_size=3), micro_batch_size=1, num_micro_batches=6,
                 recompute=Recompute.SELECTIVE, stages=stages)
    pred = evaluate(profile, cluster.with_overrides(gpus_per_node=3), s)
    per_rank = [t.forward + t.backward for t in pred.rank_times]
    assert len(per_rank) == 3 and len(set(round(x, 12) for x in per_rank)) == 3  # unequal stages, unequal times
    assert pred.time.bubble == pytest.approx(sum(per_rank) - max(per_rank), rel=1e-9)
    assert all(0 < t.forward < t.backward for t in pred.rank_times)  # backward is about twice forward


def test_full_recompute_working_set_is_reported_as_activations_not_buffers():
    from planner import evaluate
    from planner.strategy import ParallelDims, Recompute, StageSpec, Strategy

    profile = _gpt_formula_profile()
    cluster = load_cluster("dgx-a100-80gb", gpus_per_node=1)
    one = dict(dims=ParallelDims(dp=1, tp=1, pp=1, world_size=1), micro_batch_size=2, num_micro_batches=1,
               stages=[StageSpec(start=0, stop=profile.num_layers)])
    full = evaluate(profile, cluster, Strategy(**one, recompute=Recompute.FULL)).memory[0]
    assert full.comm_buffers == 0  # one device: no communication buffers at all
    inputs = sum(2 * x.input_bytes for x in profile.layers)
    assert full.activations > inputs  # the layer inputs kept plus the working set of the layer being recomputed
