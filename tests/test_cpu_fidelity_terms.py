"""The CPU step-time terms found by measuring the worker's step (bench/fidelity_cpu.py): transcendental elements per
pass, checked against a hand count and a real step."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import profiler
from planner.attention import layers_for_cluster
from planner.cluster import PRESETS, load_cluster
from planner.cost import estimate_pass_seconds
from planner.model_profile import DType
from profiler.zoo import get_model

# gpt-tiny: 4 blocks of width 64 with 4 heads, 32 tokens, a 512-word vocabulary (profiler.zoo)
S, H, HEADS, V = 32, 64, 4, 512


def _causal_scores(s: int) -> int:
    return HEADS * s * (s + 1) // 2  # each query sees itself and the keys before it


@pytest.fixture(scope="module")
def tiny():
    return profiler.profile_zoo("gpt-tiny")


def test_transcendental_elements_match_a_hand_count(tiny):
    block, head = tiny.layers[1], tiny.layers[-1]
    # math attention: GELU over the 4h-wide MLP, softmax over heads x s x s; backward: GELU's (softmax's only multiplies)
    assert block.fwd_transcendental_elements == S * 4 * H + HEADS * S * S
    assert block.bwd_transcendental_elements == S * 4 * H
    # fused attention recomputes the causal scores' exponentials in backward
    assert block.fused_attention.fwd_transcendental_elements == S * 4 * H + _causal_scores(S)
    assert block.fused_attention.bwd_transcendental_elements == S * 4 * H + _causal_scores(S)
    # the loss's log-softmax over the vocabulary, and exp(log-probabilities) in its backward
    assert head.fwd_transcendental_elements == head.bwd_transcendental_elements == S * V
    assert tiny.layers[0].fwd_transcendental_elements == 0  # the embedding evaluates none


def test_profiled_transcendental_elements_equal_a_real_cpu_step(tiny):
    """The profile's count (meta device, CPU's fused attention) equals what torch.profiler sees a real step run."""
    batch = 2
    zm = get_model("gpt-tiny")
    model = zm.build()
    x, y = zm.synthetic_batch(batch, seed=0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        zm.loss(model(*x), y).backward()
    seen = 0
    for ev in prof.events():
        shapes = ev.input_shapes
        if ev.name in ("aten::gelu", "aten::gelu_backward", "aten::_log_softmax", "aten::_log_softmax_backward_data"):
            seen += torch.Size(shapes[0]).numel()
        elif ev.name in ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward"):
            q = shapes[0] if ev.name.endswith("cpu") else shapes[1]  # the backward takes grad_out first
            assert q[-2] == S
            seen += q[0] * _causal_scores(S)
        elif ev.name in ("aten::exp", "aten::tanh", "aten::erf", "aten::_softmax", "aten::sigmoid"):
            seen += torch.Size(shapes[0]).numel()
    layers = layers_for_cluster(tiny, load_cluster("cpu"))
    counted = sum(x.fwd_transcendental_elements + x.bwd_transcendental_elements for x in layers)
    assert seen > 0
    assert batch * counted == seen


def test_transcendental_term_adds_elements_times_the_device_cost(tiny):
    cpu = load_cluster("cpu")
    free = cpu.model_copy(update={"device": cpu.device.model_copy(update={"transcendental_element_seconds": 0.0})})
    block = layers_for_cluster(tiny, cpu)[1]
    peak = cpu.peak_flops_for(DType.FP32)
    for backward in (False, True):
        args = dict(backward=backward, micro_batch=3, tp=1, weight_bytes=0.0)
        extra = estimate_pass_seconds(block, cpu, peak, **args) - estimate_pass_seconds(block, free, peak, **args)
        elements = block.bwd_transcendental_elements if backward else block.fwd_transcendental_elements
        assert extra == pytest.approx(3 * elements * cpu.device.transcendental_element_seconds, rel=1e-9)


def test_gpu_presets_charge_no_transcendental_cost():
    for name, preset in PRESETS.items():
        if preset["device"]["type"] == "cuda":
            assert load_cluster(name).device.transcendental_element_seconds == 0.0
