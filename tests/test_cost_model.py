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
    comm, S = CommModel(_cluster()), 4e8
    group = place_group(4, 1, 4)
    assert not group.spans_nodes
    expected = 2 * 3 * 1e-5 + 2 * 3 / 4 * S / (1e10 * 0.5)
    assert comm.all_reduce(S, group) == pytest.approx(expected, rel=1e-12)


def test_all_reduce_across_nodes_is_hierarchical_and_bounded_by_the_inter_node_link():
    comm, S = CommModel(_cluster()), 4e8
    group = place_group(8, 1, 4)  # 4 members on each of 2 nodes
    assert (group.per_node, group.nodes) == (4, 2)
    intra_half = 3 * 1e-5 + 3 / 4 * S / (1e10 * 0.5)
    inter_half = 1 * 1e-4 + 1 / 2 * (S / 4) / (1e9 * 0.5)
    assert comm.all_reduce(S, group) == pytest.approx(2 * (intra_half + inter_half), rel=1e-12)
    assert comm.all_reduce(S, group) > comm.all_reduce(S, place_group(4, 1, 4))


def test_reduce_scatter_plus_all_gather_equals_all_reduce():
    comm = CommModel(_cluster())
    for group in (place_group(2, 1, 4), place_group(8, 1, 4), place_group(2, 4, 4)):
        assert comm.reduce_scatter(1e7, group) + comm.all_gather(1e7, group) == pytest.approx(
            comm.all_reduce(1e7, group))


def test_p2p_uses_the_link_it_crosses():
    comm = CommModel(_cluster())
    assert comm.p2p(1e6, False) == pytest.approx(1e-5 + 1e6 / 5e9)
    assert comm.p2p(1e6, True) == pytest.approx(1e-4 + 1e6 / 5e8)


def test_mixed_precision_adamw_holds_16_bytes_per_parameter_and_zero3_divides_all_of_it():
    assert estimate_state_bytes(DType.FP16, ZeroStage.NONE, 8).total == 16
    assert estimate_state_bytes(DType.FP32, ZeroStage.NONE, 8).total == 16  # 4 + 4 + 8, no master copy
    assert estimate_state_bytes(DType.BF16, ZeroStage.FULL, 8).total == pytest.approx(2)
    z1 = estimate_state_bytes(DType.BF16, ZeroStage.OPTIMIZER, 4)
    assert (z1.parameters, z1.gradients, z1.optimizer) == (2, 2, 3)


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
