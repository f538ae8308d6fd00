"""scaled_dot_product_attention is counted as the kernel the target device runs (issue 9, item 3).

The profile (meta device) counts an SDPA layer both as the math kernel and as the fused kernel; the planner picks by
the cluster's device type. Expected numbers come from closed forms: FlashAttention saves q, k, v, the output and a
float32 log-sum-exp per query row and never the s x s scores; a causal fused kernel computes s(s+1)/2 of the s^2
scores, forward two matmuls (QK^T, PV), backward five (QK^T recomputed, dV, dP, dQ, dK).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from api.cli_profile import render_profile
from planner.attention import (
    AttentionKernel,
    describe_attention,
    layer_for_device,
    layers_for_cluster,
    select_attention_kernel,
)
from planner.cluster import load_cluster
from planner.memory import estimate_layer_activation_bytes
from planner.model_profile import AttentionCall, AttentionMask, DType, ModelProfile
from planner.strategy import Recompute
from profiler import profile

HIDDEN, HEADS = 256, 4
HEAD_DIM = HIDDEN // HEADS


class Block(nn.Module):
    """A nanoGPT block as users write it: fused qkv Linear, split, causal SDPA (or explicit matmul-softmax)."""

    def __init__(self, *, sdpa: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.c_attn, self.c_proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))
        self.sdpa, self.dropout = sdpa, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
            att = att.masked_fill(torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(self.ln_2(x))


def _profile(seq: int, *, sdpa: bool, dropout: float = 0.0, dtype=torch.bfloat16) -> ModelProfile:
    model = nn.Sequential(Block(sdpa=sdpa, dropout=dropout), Block(sdpa=sdpa, dropout=dropout)).to("meta")
    return profile(model, torch.empty(1, seq, HIDDEN, device="meta"), dtype=dtype, cache=False)


def _activations(p: ModelProfile, cluster_name: str) -> int:
    layer = layers_for_cluster(p, load_cluster(cluster_name))[0]
    return estimate_layer_activation_bytes(layer, tp=1, micro_batch=1, recompute=Recompute.NONE)


@pytest.fixture(scope="module")
def sdpa_profiles() -> dict[int, ModelProfile]:
    return {s: _profile(s, sdpa=True) for s in (4096, 8192)}


def test_sdpa_memory_at_8192_in_bf16_on_cuda_grows_linearly(sdpa_profiles) -> None:
    small, large = (_activations(sdpa_profiles[s], "dgx-h100") for s in (4096, 8192))
    assert large / small == pytest.approx(2.0, rel=0.02)
    # Nothing of size heads x s x s is kept: the scores alone would be 4 x 8192^2 x 2 bytes = 512 MiB.
    assert large < HEADS * 8192**2 * 2 / 4
    assert describe_attention(sdpa_profiles[8192], "cuda") == "flash"


def test_explicit_matmul_softmax_attention_grows_quadratically_on_cuda() -> None:
    small, large = (_activations(_profile(s, sdpa=False), "dgx-h100") for s in (4096, 8192))
    assert large / small > 3.5
    assert describe_attention(_profile(64, sdpa=False), "cuda") is None


def test_math_count_keeps_the_softmax_probabilities(sdpa_profiles) -> None:
    # The math kernel saves the bf16 probabilities (2 bytes x heads x s^2) for backward; selective recompute drops
    # exactly them. A fused kernel has none.
    layer = sdpa_profiles[4096].layers[0]
    assert layer.selective_saved_bytes == HEADS * 4096**2 * 2
    assert layer.fused_attention is not None and layer.fused_attention.selective_saved_bytes == 0
    less = layer.saved_activation_bytes - layer.fused_attention.saved_activation_bytes
    # Math saves copies of q, k, v (bmm operands) and the probabilities; flash saves q, k, v (views of the qkv
    # output), its output (written (b, s, heads, d), so c_proj's saved input is the same storage), a float32
    # log-sum-exp per query row and its random-number state (24 bytes).
    lse_bytes = HEADS * 4096 * 4
    assert less == pytest.approx(HEADS * 4096**2 * 2 - lse_bytes, abs=64)


def test_causal_flash_flops_are_the_closed_form() -> None:
    s = 256
    layer = _profile(s, sdpa=True).layers[0]
    fused = layer.fused_attention
    full, kept = s * s, s * (s + 1) / 2
    # math: 2 matmuls forward, 4 backward over all s^2 scores; flash: 2 forward, 5 backward over the kept ones.
    assert layer.fwd_flops - fused.fwd_flops == pytest.approx(2 * 2 * HEADS * HEAD_DIM * (full - kept))
    assert layer.bwd_flops - fused.bwd_flops == pytest.approx(2 * HEADS * HEAD_DIM * (4 * full - 5 * kept))
    assert fused.fwd_actmm_flops == pytest.approx(2 * 2 * HEADS * HEAD_DIM * kept)


def test_math_kernel_keeps_the_old_counts() -> None:
    # On CPU, training dropout inside SDPA runs the math kernel (sdp_utils_cpp.cpp: check_for_dropout).
    p = _profile(128, sdpa=True, dropout=0.1)
    layer = p.layers[0]
    assert layer_for_device(layer, "cpu") is layer
    assert layer_for_device(layer, "cuda").saved_activation_bytes == layer.fused_attention.saved_activation_bytes
    assert describe_attention(p, "cpu") == "math"
    # A profile written before attention calls were recorded (schema 1) loads and is counted as math everywhere.
    data = p.model_dump(mode="json")
    data["schema_version"] = 1
    for x in data["layers"]:
        del x["attention"], x["fused_attention"]
    old = ModelProfile.model_validate(data)
    assert layers_for_cluster(old, load_cluster("dgx-h100")) == old.layers
    assert old.layers[0].saved_activation_bytes == layer.saved_activation_bytes


def test_fp32_cpu_profile_runs_the_cpu_flash_kernel_without_dropout() -> None:
    p = _profile(128, sdpa=True, dtype=torch.float32)
    layer = p.layers[0]
    assert describe_attention(p, "cpu") == "cpu_flash" and describe_attention(p, "cuda") == "efficient"
    assert layers_for_cluster(p, load_cluster("cpu"))[0].saved_activation_bytes \
        == layer.fused_attention.saved_activation_bytes < layer.saved_activation_bytes


def _call(**kw) -> AttentionCall:
    base = {"heads": 8, "kv_heads": 8, "q_len": 1024, "kv_len": 1024, "head_dim": 64, "v_head_dim": 64,
            "causal": True, "mask": AttentionMask.NONE, "dropout": 0.0, "dtype": DType.BF16}
    return AttentionCall(**{**base, **kw})


@pytest.mark.parametrize(("call", "device", "kernel"), [
    (_call(), "cuda", AttentionKernel.FLASH),
    (_call(kv_heads=2), "cuda", AttentionKernel.FLASH),  # grouped-query k / v: flash takes them
    (_call(dropout=0.1), "cuda", AttentionKernel.FLASH),
    (_call(mask=AttentionMask.FLOAT, causal=False), "cuda", AttentionKernel.EFFICIENT),  # flash takes no mask
    (_call(dtype=DType.FP32), "cuda", AttentionKernel.EFFICIENT),  # flash is 16-bit only
    (_call(head_dim=512, v_head_dim=512), "cuda", AttentionKernel.EFFICIENT),  # flash: head dim <= 256
    (_call(q_len=1, kv_len=1024), "cuda", AttentionKernel.EFFICIENT),  # flash: causal needs square
    (_call(dtype=DType.FP32, head_dim=6, v_head_dim=6), "cuda", AttentionKernel.MATH),  # not 4-aligned
    (_call(head_dim=36, v_head_dim=36, dtype=DType.FP16, mask=AttentionMask.BOOL), "cuda", AttentionKernel.MATH),
    (_call(dtype=DType.FP32, mask=AttentionMask.BOOL), "cpu", AttentionKernel.CPU_FLASH),
    (_call(dropout=0.1), "cpu", AttentionKernel.MATH),
    (_call(v_head_dim=32), "cpu", AttentionKernel.MATH),
    (_call(), "xpu", AttentionKernel.MATH),
])
def test_kernel_choice_follows_torch_sdp_utils(call: AttentionCall, device: str, kernel: AttentionKernel) -> None:
    assert select_attention_kernel(call, device) == kernel


def test_profile_table_names_the_kernel(sdpa_profiles) -> None:
    assert "attention: flash on cuda, cpu_flash on cpu" in str(render_profile(sdpa_profiles[4096]).caption)
