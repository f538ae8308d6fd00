"""The framework-overhead terms of the cost model (planner.cost.FrameworkOverhead, tp_module_overhead_seconds): each
appears where the executor does that work and nowhere else, by hand counts on gpt-tiny's analytic profile; the search
stays exact with them; profiles and cluster files made before them still load (no torch in the planner paths)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup
from test_planner_search import _brute_force_by_config, _random_instance

from planner import evaluate
from planner.cluster import ClusterSpec, load_cluster, preset_names
from planner.enumerate import SearchSpace
from planner.evaluate import prepare
from planner.model_profile import ModelProfile
from planner.search import search
from planner.strategy import Recompute

FIELDS = ("tp_module_overhead_seconds", "fsdp_unit_overhead_seconds", "fsdp_tensor_overhead_seconds",
          "ddp_bucket_overhead_seconds", "optimizer_tensor_seconds", "optimizer_dtensor_seconds",
          "pipeline_microbatch_overhead_seconds", "op_dispatch_seconds")
#: gpt-tiny by hand (zoo: embed = wte + wpe; 4 blocks of q/k/v/o + fc_in/fc_out Linears with biases and 2 LayerNorms;
#: head = LayerNorm + lm_head without bias): parameter tensors per layer, and TP-sharded modules per layer.
TENSORS = [2, 16, 16, 16, 16, 3]
SHARDED = [1, 6, 6, 6, 6, 1]


def _cluster(world: int, **fields: float) -> ClusterSpec:
    """The cpu preset with every framework term 0 except those given."""
    base = load_cluster("cpu", gpus_per_node=world)
    device = base.device.model_copy(update={f: 0.0 for f in FIELDS} | fields)
    return base.model_copy(update={"device": device})


def _growth(field: str, value: float, **kw) -> float:
    """How much gpt-tiny's predicted step grows when `field` is set to `value`, for sup.strategy(**kw)."""
    st = sup.strategy(**kw)
    profile = sup.tiny_profile()
    world = st.dims.world_size
    return (evaluate(profile, _cluster(world, **{field: value}), st).step_seconds
            - evaluate(profile, _cluster(world), st).step_seconds)


def test_gpt_tiny_profile_counts_parameter_tensors_by_hand():
    profile = sup.tiny_profile()
    assert [x.param_tensors for x in profile.layers] == TENSORS
    assert [len(x.tp.shards) for x in profile.layers] == SHARDED


def test_tp_plan_grows_by_sharded_modules_times_passes_and_dp_plan_does_not():
    o, m = 1e-3, 2  # sup.strategy: 2 micro-batches
    assert _growth("tp_module_overhead_seconds", o, tp=2) == pytest.approx(sum(SHARDED) * 2 * m * o, rel=1e-9)
    # Full recompute runs every forward again: three passes.
    assert _growth("tp_module_overhead_seconds", o, tp=2, recompute="full") == pytest.approx(
        sum(SHARDED) * 3 * m * o, rel=1e-9)
    for kw in ({"dp": 2}, {"dp": 2, "zero_stage": 3}, {"pp": 2, "cuts": (3,)}):
        assert _growth("tp_module_overhead_seconds", o, **kw) == 0.0


def test_fsdp_units_cost_every_micro_batch_and_ddp_has_none():
    o = 1e-3
    for m in (1, 2, 4):
        for zero in (1, 3):  # FSDP2 runs every unit's hooks each micro-batch whether or not it reshards
            got = _growth("fsdp_unit_overhead_seconds", o, dp=2, zero_stage=zero, num_micro_batches=m)
            assert got == pytest.approx(len(TENSORS) * m * o, rel=1e-9)
        got = _growth("fsdp_tensor_overhead_seconds", o, dp=2, zero_stage=3, num_micro_batches=m)
        assert got == pytest.approx(sum(TENSORS) * m * o, rel=1e-9)  # each tensor of each unit
    assert _growth("fsdp_unit_overhead_seconds", o, dp=2) == 0.0  # plain DDP
    assert _growth("fsdp_tensor_overhead_seconds", o, dp=2) == 0.0
    assert _growth("fsdp_unit_overhead_seconds", o, tp=2) == 0.0
    assert _growth("fsdp_unit_overhead_seconds", o, pp=2, cuts=(3,)) == 0.0


def test_ddp_pays_per_bucket_and_fsdp2_plans_do_not():
    o = 1e-3
    params = sup.tiny_profile().param_count
    # The planner's bucket count for P fp32 gradients: at most 4 P / 25 MiB + 1 (one partly filled bucket).
    assert _growth("ddp_bucket_overhead_seconds", o, dp=2) == pytest.approx(o * (1 + 4 * params / (25 * 2**20)),
                                                                              rel=1e-9)
    for kw in ({"dp": 2, "zero_stage": 3}, {"tp": 2}, {"pp": 2, "cuts": (3,)}):
        assert _growth("ddp_bucket_overhead_seconds", o, **kw) == 0.0


def test_optimizer_pays_per_tensor_plain_or_dtensor_as_the_executor_holds_it():
    plain, dt = 1e-3, 5e-3
    total = sum(TENSORS)
    # DDP: every parameter a plain tensor.
    assert _growth("optimizer_tensor_seconds", plain, dp=2) == pytest.approx(total * plain, rel=1e-9)
    assert _growth("optimizer_dtensor_seconds", dt, dp=2) == 0.0
    # FSDP2: every parameter a DTensor shard.
    assert _growth("optimizer_dtensor_seconds", dt, dp=2, zero_stage=3) == pytest.approx(total * dt, rel=1e-9)
    assert _growth("optimizer_tensor_seconds", plain, dp=2, zero_stage=3) == 0.0
    # TP alone: each sharded Linear's weight and bias are DTensors (the embedding's wte, the head's bias-free
    # lm_head plus nothing else), the LayerNorms and wpe stay plain.
    dtensors = [2, 12, 12, 12, 12, 2]  # min(tensors, 2 per sharded module)
    assert _growth("optimizer_dtensor_seconds", dt, tp=2) == pytest.approx(sum(dtensors) * dt, rel=1e-9)
    assert _growth("optimizer_tensor_seconds", plain, tp=2) == pytest.approx((total - sum(dtensors)) * plain,
                                                                              rel=1e-9)
    # A pipeline: each rank steps its own tensors; the tail is the rank with the most parameters, here also the
    # most tensors (stages [0, 2) and [2, 6)).
    assert _growth("optimizer_tensor_seconds", plain, pp=2, cuts=(2,)) == pytest.approx(sum(TENSORS[2:]) * plain,
                                                                                         rel=1e-9)


@pytest.mark.parametrize(("schedule", "v", "cuts"), [("1f1b", 1, (3,)), ("gpipe", 1, (2,)),
                                                      ("interleaved_1f1b", 2, (2, 3, 4))])
def test_pipeline_stage_work_is_per_micro_batch_per_chunk_and_only_in_pipelines(schedule, v, cuts):
    o, m, pp = 1e-3, 4, 2
    kw = {"pp": pp, "cuts": cuts, "schedule": schedule, "virtual_stages": v, "num_micro_batches": m,
          "micro_batch_size": 1}
    # Every rank gains v * o per micro-batch: m * (R_max + v o) + (S + pp v o - R_max - v o) / v.
    assert _growth("pipeline_microbatch_overhead_seconds", o, **kw) == pytest.approx((m * v + pp - 1) * o, rel=1e-9)
    for plain in ({"dp": 2}, {"dp": 2, "zero_stage": 3}, {"tp": 2}):
        assert _growth("pipeline_microbatch_overhead_seconds", o, **plain) == 0.0


def test_profiles_and_cluster_files_without_the_new_fields_still_load(tmp_path):
    profile = sup.tiny_profile()
    data = profile.model_dump(mode="json")
    for layer in data["layers"]:
        del layer["param_tensors"]
    old = ModelProfile.model_validate(data)
    assert all(x.param_tensors == 0 for x in old.layers)
    st = sup.strategy(dp=2)
    cluster = _cluster(2, optimizer_tensor_seconds=1e-3)
    # A profile that does not count tensors pays no per-tensor optimizer cost.
    assert evaluate(old, cluster, st).step_seconds == pytest.approx(evaluate(old, _cluster(2), st).step_seconds)
    spec = load_cluster("cpu").model_dump(mode="json")
    for field in FIELDS:
        del spec["device"][field]
    path = tmp_path / "old.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    loaded = load_cluster(str(path))
    assert all(getattr(loaded.device, f) == 0.0 for f in FIELDS)
    assert load_cluster("dgx-a100-80gb").device.tp_module_overhead_seconds == 0.0  # GPU presets: host work hidden


#: Instances where something fits: interleaved and 4-stage pipelines, TP x PP, and three (1, 8, 29) whose optimum the
#: framework terms change (e.g. DDP instead of ZeRO-3, as FSDP2's units and DTensor optimizer cost more).
@pytest.mark.parametrize("seed", [0, 1, 8, 10, 11, 13, 15, 29])
def test_search_matches_brute_force_with_framework_terms(seed):
    profile, cluster, batch = _random_instance(seed)
    rng = random.Random(500 + seed)
    layers = [x.model_copy(update={"param_tensors": rng.randint(0, 6)}) for x in profile.layers]
    profile = profile.model_copy(update={"layers": layers})
    # Large enough to move the optimum (the random instances' layers take ~1-100 ms).
    device = cluster.device.model_copy(update={f: rng.uniform(1e-4, 1e-2) for f in FIELDS})
    cluster = ClusterSpec.model_validate(cluster.model_copy(update={"device": device}).model_dump())
    space = SearchSpace(zero_stages=(0, 3), recompute=(rng.choice([Recompute.NONE, Recompute.FULL]),),
                        virtual_stages=(2,))
    by_config = _brute_force_by_config(profile, cluster, batch, space)
    expected = min(by_config.values(), default=float("inf"))
    assert expected < float("inf")
    result = search(prepare(profile, cluster), cluster, global_batch_size=batch, space=space, relative_gap=0.0,
                    simplicity_tolerance=0.0, time_limit_s=120)
    assert result.best.prediction.step_seconds == pytest.approx(expected, rel=1e-6)
    assert result.proved and result.gap == 0.0


def test_calibration_copies_measured_framework_overheads_and_older_measurements_load():
    from test_calibrate import _synthetic, _truth

    from planner.cluster_fit import FRAMEWORK_FIELDS, Measurements, build_cluster

    assert set(FRAMEWORK_FIELDS) == set(FIELDS)
    m = _synthetic(_truth(), 0.0, 0)
    figures = {f: (i + 1) * 1e-4 for i, f in enumerate(FIELDS)}
    fitted = build_cluster(m.model_copy(update={"framework": {**figures, "latency.send": 1.0}})).cluster
    assert {f: getattr(fitted.device, f) for f in FIELDS} == figures
    data = m.model_dump(mode="json")
    data.pop("framework")
    old = build_cluster(Measurements.model_validate(data)).cluster  # measured before the overheads were timed
    assert all(getattr(old.device, f) == 0.0 for f in FIELDS)


class _Views(nn.Module):
    """One multiply (a kernel) and then only views: forward mul, view, transpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).view(4, 2).transpose(0, 1)


def test_profile_counts_views_as_dispatched_ops_but_not_as_kernels():
    from profiler.counting import estimate_layer_cost
    from profiler.recording import LayerCall

    x = torch.randn(2, 4, device="meta", requires_grad=True)
    call = LayerCall(name="v", args=(x,), kwargs={}, output=torch.empty(4, 2, device="meta"))
    cost = estimate_layer_cost(_Views(), call)
    # By hand: forward aten.mul (the one kernel), view, transpose; backward transpose and view (undoing them), mul
    # (the one kernel) and the detach with which autograd stores the leaf's gradient.
    assert (cost.fwd_ops, cost.fwd_kernels, cost.bwd_ops, cost.bwd_kernels) == (3, 1, 4, 1)
    for layer in sup.tiny_profile().layers[1:5]:  # the blocks (split heads, transposes)
        assert layer.fwd_ops > layer.fwd_kernels and layer.bwd_ops > layer.bwd_kernels


def test_per_op_dispatch_grows_the_step_by_non_kernel_ops_and_is_zero_on_gpu_presets():
    from planner.attention import layers_for_cluster

    o, m = 1e-4, 2  # sup.strategy: 2 micro-batches, one process
    cluster = _cluster(1)
    layers = layers_for_cluster(sup.tiny_profile(), cluster)  # the attention kernel the cpu runs, as the cost model
    other = sum(x.fwd_ops - x.fwd_kernels + x.bwd_ops - x.bwd_kernels for x in layers)
    assert _growth("op_dispatch_seconds", o) == pytest.approx(other * m * o, rel=1e-9)
    assert load_cluster("cpu").device.op_dispatch_seconds > 0
    for name in preset_names():
        if name != "cpu":
            assert load_cluster(name).device.op_dispatch_seconds == 0.0


#: gpt-tiny under tp=2 by hand, as DTensor runs it: the embedding's partial output (1, forward); per block the
#: rowwise o_proj and fc_out outputs (2, forward) and the input gradient of each colwise q_proj, k_proj, v_proj and
#: fc_in (4, backward); the vocabulary-parallel head's loss_parallel reductions (max, sum of exponentials, target
#: logit: 3, forward) and its input gradient (1, backward). A 2-rank gloo step of the executor issued 29 (a counter
#: around torch.distributed._functional_collectives.all_reduce).
TP_ALLREDUCES = 1 + 4 * (2 + 4) + 3 + 1


def test_tp_allreduces_per_step_match_what_dtensor_issues_and_each_pays_its_latency():
    profile = sup.tiny_profile()
    assert sum(x.tp.allreduces_per_step(recompute_forward=False) for x in profile.layers) == TP_ALLREDUCES
    st, m, d = sup.strategy(tp=2), 2, 1e-3
    base = _cluster(2)
    slow = base.model_copy(update={"collective_latency": base.collective_latency + d})
    grown = evaluate(profile, slow, st).step_seconds - evaluate(profile, base, st).step_seconds
    # An all-reduce is two ring passes (reduce-scatter, all-gather), each paying the per-call latency.
    assert grown == pytest.approx(TP_ALLREDUCES * m * 2 * d, rel=1e-6)
    # Full recompute repeats the forward's all-reduces (embedding 1, blocks 4 x 2, loss 3).
    full = sup.strategy(tp=2, recompute="full")
    grown = evaluate(profile, slow, full).step_seconds - evaluate(profile, base, full).step_seconds
    assert grown == pytest.approx((TP_ALLREDUCES + 1 + 4 * 2 + 3) * m * 2 * d, rel=1e-6)
