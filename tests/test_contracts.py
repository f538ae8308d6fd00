"""The typed contracts reject inconsistent data at construction and survive JSON round trips."""

import json

import pytest
from pydantic import ValidationError

from planner import (
    ClusterError,
    MeshAxis,
    ParallelDims,
    PlanKind,
    Schedule,
    StageSpec,
    Strategy,
    load_cluster,
    preset_names,
)


def _strategy(**kw):
    base = dict(
        dims=ParallelDims(dp=2, tp=1, pp=2, world_size=4),
        micro_batch_size=2,
        num_micro_batches=4,
        stages=[StageSpec(start=0, stop=3), StageSpec(start=3, stop=6)],
    )
    return Strategy(**{**base, **kw})


def test_parallel_dims_rejects_product_other_than_world_size():
    with pytest.raises(ValidationError, match="does not equal world_size 8"):
        ParallelDims(dp=2, tp=2, pp=1, world_size=8)


def test_strategy_rejects_gap_between_stages():
    with pytest.raises(ValidationError, match="contiguous"):
        _strategy(stages=[StageSpec(start=0, stop=3), StageSpec(start=4, stop=6)])


def test_strategy_rejects_stage_count_other_than_pp_times_virtual():
    with pytest.raises(ValidationError, match="pp\\*virtual_stages = 2"):
        _strategy(stages=[StageSpec(start=0, stop=6)])


def test_interleaved_needs_virtual_stages_and_divisible_micro_batches():
    four = [StageSpec(start=i, stop=i + 1) for i in range(4)]
    with pytest.raises(ValidationError, match="virtual_stages >= 2"):
        _strategy(schedule=Schedule.INTERLEAVED_1F1B, stages=four[:2])
    with pytest.raises(ValidationError, match="divisible by pp"):
        _strategy(schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=2, num_micro_batches=3, stages=four)
    ok = _strategy(schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=2, stages=four)
    assert [ok.stage_ranks(s) for s in range(4)] == [0, 1, 0, 1]


def test_strategy_kind_and_global_batch_follow_from_degrees():
    s = _strategy()
    assert s.global_batch_size == 2 * 4 * 2
    assert s.kind == PlanKind.HYBRID
    data = _strategy(dims=ParallelDims(dp=4, tp=1, pp=1, world_size=4), stages=[StageSpec(start=0, stop=6)])
    assert data.kind == PlanKind.DATA
    model = _strategy(dims=ParallelDims(dp=1, tp=2, pp=2, world_size=4))
    assert model.kind == PlanKind.MODEL


def test_strategy_round_trips_through_json():
    s = _strategy(mesh_order=(MeshAxis.DP, MeshAxis.PP, MeshAxis.TP))
    assert Strategy.model_validate_json(s.model_dump_json()) == s


def test_unknown_cluster_preset_lists_known_ones():
    with pytest.raises(ClusterError) as err:
        load_cluster("dgx-z9000")
    for name in preset_names():
        assert name in str(err.value)


def test_cluster_overrides_and_validation(tmp_path):
    assert load_cluster("dgx-h100", nodes=4).world_size == 32
    with pytest.raises(ClusterError, match="nodes"):
        load_cluster("dgx-h100", nodes=0)
    bad = tmp_path / "c.yaml"
    bad.write_text("preset: dgx-a100-80gb\nintra_node: {bandwidth: 0, latency: 0}\n")
    with pytest.raises(ClusterError, match="intra_node.bandwidth"):
        load_cluster(bad)


def test_cluster_file_in_json_starting_from_preset(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "dgx-a100-40gb", "nodes": 2, "name": "lab"}))
    c = load_cluster(f)
    assert (c.name, c.world_size, c.device.memory_bytes) == ("lab", 16, 40 * 1024**3)
