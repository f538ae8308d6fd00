"""GEMM efficiency by shape and the per-kernel overhead: the curve, TP splits, kernel counts, old profiles."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import profiler
from planner.cluster import ClusterSpec, load_cluster
from planner.cost import (
    estimate_gemm_efficiency,
    estimate_layer_compute,
    estimate_pass_seconds,
    estimate_weight_gemm_seconds,
)
from planner.model_profile import (
    DType,
    LayerProfile,
    ModelProfile,
    ShardStyle,
    TensorParallelSpec,
    TPShard,
    WeightGemm,
)


def _cluster(**device) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "t", "nodes": 1, "gpus_per_node": 2,
        "device": dict(name="d", memory_bytes=10**10, peak_flops={"float32": 1e12}, memory_bandwidth=1e11, **device),
        "intra_node": {"bandwidth": 1e10, "latency": 1e-5}, "inter_node": {"bandwidth": 1e9, "latency": 1e-4},
        "compute_efficiency": 0.5, "memory_efficiency": 1.0})


def _linear_gelu_profile() -> ModelProfile:
    """Two Linear(16, 16) + GELU blocks, 8 tokens per sample, counted on meta (no loss: backward from ones)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 16), nn.GELU()), nn.Sequential(nn.Linear(16, 16), nn.GELU()))
    return profiler.profile(model, (torch.randn(2, 8, 16),), layers=["0", "1"], cache=False)


@pytest.mark.parametrize("preset", ["cpu", "dgx-a100-80gb", "dgx-h100"])
def test_gemm_efficiency_rises_with_size_and_never_passes_the_ceiling(preset):
    cluster = load_cluster(preset)
    peak = cluster.peak_flops_for(DType.FP32 if preset == "cpu" else DType.BF16)
    sizes = [2 * n**3 for n in (16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)]
    effs = [estimate_gemm_efficiency(w, cluster, peak) for w in sizes]
    assert all(a < b for a, b in itertools.pairwise(effs))
    assert all(0 < e < cluster.compute_efficiency for e in effs)
    assert effs[-1] > 0.999 * cluster.compute_efficiency  # the largest GEMMs reach the ceiling
    assert effs[0] < 0.1 * cluster.compute_efficiency  # a 16^3 GEMM is all ramp


def test_a_tp_split_gemm_runs_at_lower_efficiency_by_hand():
    # One colwise Linear, 128 tokens x 256 out x 64 in per sample. Each GEMM costs W / (peak * 0.5) + ramp.
    c = _cluster(gemm_ramp_seconds=2e-6)
    gemm = WeightGemm(module="fc", m=128, n=256, k=64, fwd_count=1, bwd_count=2)
    w = 2 * 128 * 256 * 64
    layer = LayerProfile(index=0, name="l", module_type="L", param_count=256 * 64, param_bytes=4 * 256 * 64,
                         fwd_flops=w, bwd_flops=2 * w, fwd_bytes=0, bwd_bytes=0, saved_activation_bytes=0,
                         input_bytes=0, output_bytes=0, gemms=[gemm],
                         tp=TensorParallelSpec(shards=[TPShard(module="fc", style=ShardStyle.COLWISE)], divisor=4,
                                               sharded_param_count=256 * 64, allreduces_per_forward=0,
                                               allreduce_bytes=0))
    kw = {"backward": True, "micro_batch": 2, "gemm_flops": 2 * w}
    whole = estimate_weight_gemm_seconds(layer, c, 1e12, tp=1, **kw)
    split = estimate_weight_gemm_seconds(layer, c, 1e12, tp=2, **kw)
    assert whole == pytest.approx(2 * (2 * w / 0.5e12 + 2e-6), rel=1e-12)
    assert split == pytest.approx(2 * (w / 0.5e12 + 2e-6), rel=1e-12)
    assert estimate_gemm_efficiency(w, c, 1e12) < estimate_gemm_efficiency(2 * w, c, 1e12)
    assert split > whole / 2  # TP halves the FLOPs but not the time
    # a rowwise shard divides K instead: the same FLOPs, the same time
    row = layer.model_copy(update={"tp": layer.tp.model_copy(update={
        "shards": [TPShard(module="fc", style=ShardStyle.ROWWISE)]})})
    assert estimate_weight_gemm_seconds(row, c, 1e12, tp=2, **kw) == pytest.approx(split, rel=1e-12)


def test_linear_gelu_layer_kernels_and_gemm_shape_match_a_hand_count():
    p = _linear_gelu_profile()
    first, second = p.layers
    # forward: addmm (bias + x W^T), gelu. Views (view, t) launch nothing.
    assert (first.fwd_kernels, second.fwd_kernels) == (2, 2)
    # backward: gelu_backward, mm (weight gradient), sum (bias gradient), and for the second block, whose input
    # needs a gradient, one more mm (input gradient)
    assert (first.bwd_kernels, second.bwd_kernels) == (3, 4)
    assert [g.model_dump() for g in second.gemms] == [
        {"module": "0", "m": 8.0, "n": 16, "k": 16, "fwd_count": 1, "bwd_count": 2}]
    assert first.gemms[0].bwd_count == 1
    # the listed GEMMs are exactly the layer's weight-GEMM FLOPs (per sample)
    assert second.fwd_flops - second.fwd_actmm_flops == 2 * 8 * 16 * 16
    assert second.bwd_flops - second.bwd_actmm_flops == 2 * 2 * 8 * 16 * 16


def test_kernel_overhead_adds_kernels_times_overhead_to_each_pass():
    layer = _linear_gelu_profile().layers[1]
    base, slow = _cluster(), _cluster(kernel_overhead_seconds=1e-5)
    a = estimate_layer_compute(layer, base, DType.FP32, tp=1, micro_batch=4, recompute="full", measured=False)
    b = estimate_layer_compute(layer, slow, DType.FP32, tp=1, micro_batch=4, recompute="full", measured=False)
    assert b.fwd - a.fwd == pytest.approx(2 * 1e-5, rel=1e-9)
    assert b.bwd - a.bwd == pytest.approx(4 * 1e-5, rel=1e-9)
    assert b.recompute - a.recompute == pytest.approx(2 * 1e-5, rel=1e-9)  # full recompute repeats the forward
    # a model with more kernels (the same layer counted with twice as many) is predicted slower by that many
    double = layer.model_copy(update={"fwd_kernels": 4, "bwd_kernels": 8})
    c = estimate_layer_compute(double, slow, DType.FP32, tp=1, micro_batch=4, recompute="none", measured=False)
    assert (c.fwd + c.bwd) - (b.fwd + b.bwd) == pytest.approx(6 * 1e-5, rel=1e-9)


def test_profile_without_kernel_counts_or_gemms_gets_todays_time_by_hand():
    # The numbers of test_cost_model's roofline test on a cluster that sets a ramp and a kernel overhead: a profile
    # made before the new fields (here: its JSON without them) costs exactly what it did.
    layer = LayerProfile(index=0, name="l", module_type="L", param_count=0, param_bytes=0, fwd_flops=5e9,
                         bwd_flops=0, fwd_bytes=1e9, bwd_bytes=0, saved_activation_bytes=0, input_bytes=0,
                         output_bytes=0, fwd_actmm_flops=1e9, fwd_actmm_bytes=3e8, fwd_membound_bytes=6e8,
                         fwd_membound_fused_bytes=2e8)
    data = layer.model_dump()
    for key in ("fwd_kernels", "bwd_kernels", "gemms"):
        del data[key]
    old = LayerProfile.model_validate(data)
    c = _cluster(kernel_overhead_seconds=1e-3, gemm_ramp_seconds=1e-3)
    gemm = max(4e9 / 0.5e12, 1e8 / 1e11)
    actmm = max(1e9 / 0.5e12, 3e8 / 1e11)
    t = estimate_pass_seconds(old, c, 1e12, backward=False, micro_batch=2, tp=1, weight_bytes=0.0)
    assert t == pytest.approx(2 * (gemm + actmm + 6e8 / 1e11), rel=1e-12)


def test_old_profile_json_loads_and_plans_like_one_without_the_new_fields():
    from planner import evaluate
    from planner.strategy import ParallelDims, StageSpec, Strategy

    p = _linear_gelu_profile()
    stripped = p.model_copy(update={"layers": [
        x.model_copy(update={"fwd_kernels": 0, "bwd_kernels": 0, "gemms": []}) for x in p.layers]})
    text = stripped.to_json()
    for key in ('"fwd_kernels": 0,', '"bwd_kernels": 0,'):
        text = text.replace(key, "")
    old = ModelProfile.from_json(text)
    assert old.layers[0].gemms == [] and old.layers[0].fwd_kernels == 0
    cluster = load_cluster("cpu", gpus_per_node=1, nodes=1)
    st = Strategy(dims=ParallelDims(dp=1, tp=1, pp=1, world_size=1), micro_batch_size=2, num_micro_batches=1,
                  stages=[StageSpec(start=0, stop=2)])
    legacy = cluster.model_copy(update={"device": cluster.device.model_copy(update={
        "kernel_overhead_seconds": 0.0, "gemm_ramp_seconds": 0.0})})
    # without kernel counts and GEMM shapes the device's new constants change nothing
    assert evaluate(old, cluster, st).step_seconds == pytest.approx(evaluate(old, legacy, st).step_seconds, rel=1e-12)
    # with them, the same model is predicted slower (it has kernels and small GEMMs)
    assert evaluate(p, cluster, st).step_seconds > evaluate(old, cluster, st).step_seconds
