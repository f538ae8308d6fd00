"""Activations under torch.autocast: the emulation's dtypes, saved bytes against hand counts, and the planner's use.

Plans that run 16-bit compute as torch.autocast over fp32 parameters (DDP, plain pipelines, TP without DP, one
device) keep an fp32 residual stream and fp32 norm inputs; FSDP2's MixedPrecisionPolicy keeps everything 16-bit.
The hand counts below follow CUDA autocast's documented op lists (torch docs, "Autocast Op Reference").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import profiler
from planner.attention import layers_for_cluster
from planner.cluster import load_cluster
from planner.cost import trains_under_autocast
from planner.model_profile import DType
from planner.strategy import ParallelDims, StageSpec, Strategy, ZeroStage
from profiler.autocast import (
    FP32_OPS,
    LOWER_PRECISION_OPS,
    PROMOTE_OPS,
    AutocastEmulation,
)
from profiler.counting import estimate_layer_cost
from profiler.recording import LayerCall

BF16 = torch.bfloat16


def test_emulation_gives_each_op_the_dtype_cuda_autocast_documents():
    with torch.device("meta"):
        emb, ln, lin = nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        ids = torch.zeros(2, 4, dtype=torch.long)
        q = torch.randn(2, 2, 4, 4)
    with AutocastEmulation(BF16):
        x = emb(ids)
        h = ln(x)
        y = lin(h)
        assert (x.dtype, h.dtype, y.dtype) == (torch.float32, torch.float32, BF16)  # embedding: on no list
        assert (x + y).dtype == torch.float32  # a 16-bit branch added to the fp32 stream promotes
        assert F.gelu(y).dtype == BF16  # on no list: the input's dtype
        assert torch.softmax(y, -1).dtype == y.softmax(-1).dtype == torch.float32
        assert (y @ y.transpose(-1, -2)).dtype == BF16
        assert F.scaled_dot_product_attention(q, q, q).dtype == BF16
        assert F.cross_entropy(y.flatten(0, 1), torch.zeros(8, dtype=torch.long, device="meta")).dtype == torch.float32
        assert y.sum().dtype == torch.float32
        assert torch.softmax(y, -1, dtype=BF16).dtype == BF16  # an explicit dtype is respected
        z = torch.zeros(2, 4, 8, device="meta", dtype=BF16)
        assert z.add_(x).dtype == BF16  # in-place ops do not autocast


def test_emulation_lists_cover_every_op_of_the_installed_torch_autocast_header():
    header = next(Path(torch.__file__).parent.glob("include/ATen/autocast_mode.h"), None)
    if header is None:
        pytest.skip("this torch install ships no C++ headers")
    text = header.read_text()

    def names(macro: str) -> set[str]:
        body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.DOTALL)
        assert body is not None, macro
        return set(re.findall(r"_\((\w+)", body.group(1)))

    assert names("AT_FORALL_LOWER_PRECISION_FP") <= LOWER_PRECISION_OPS
    assert names("AT_FORALL_FP32") | names("AT_FORALL_FP32_SET_OPT_DTYPE") <= FP32_OPS
    assert names("AT_FORALL_PROMOTE") <= PROMOTE_OPS


class _MLPBlock(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(h)
        self.fc_in, self.fc_out = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc_out(F.gelu(self.fc_in(self.ln(x))))


def _count(module: nn.Module, x: torch.Tensor):
    return estimate_layer_cost(module, LayerCall(name="l", args=(x,), kwargs={}, output=None, from_input=(False,)),
                               emulation=lambda: AutocastEmulation(BF16))


def test_pre_norm_mlp_block_saves_22_bsh_plus_fp32_statistics_under_autocast_by_hand():
    b, s, h = 2, 16, 32
    with torch.device("meta"):
        block = _MLPBlock(h)
        x = torch.empty(b, s, h)  # the fp32 residual stream
    cost = _count(block, x)
    # LayerNorm: its fp32 input (4 bsh) and fp32 mean and rstd (2 x 4 bs); fc_in: the bf16 copy autocast made of the
    # norm's fp32 output (2 bsh); GELU: its bf16 input (2 x 4bsh); fc_out: GELU's bf16 output (2 x 4bsh). The
    # parameters' bf16 copies are state, not activations.
    bsh = b * s * h
    assert cost.saved_bytes == 4 * bsh + 8 * b * s + 2 * bsh + 8 * bsh + 8 * bsh
    assert cost.input_bytes == 4 * bsh


def test_a_tied_weight_used_twice_is_cast_once_and_never_counted_as_an_activation():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.lin(x) + self.lin(x)

    with torch.device("meta"):
        layer, x = Twice(), torch.empty(4, 8)
    emulation = AutocastEmulation(BF16)
    with emulation:
        layer(x)
    assert len(emulation.param_casts) == 1  # autocast's weight-cast cache: one copy for both uses
    # Each call casts the fp32 input anew (only leaves that require grad are cached): two bf16 copies saved.
    assert _count(layer, x).saved_bytes == 2 * (4 * 8 * 2)


def test_gpt_block_under_autocast_keeps_fp32_norm_inputs_and_one_cast_per_projection():
    p = profiler.profile_zoo("gpt-tiny", dtype="bfloat16")
    block = next(x for x in p.layers if x.name == "blocks.0")
    sh = 32 * 64  # seq x hidden of gpt-tiny, per sample
    a = block.autocast
    assert a is not None and a.input_bytes == a.output_bytes == 4 * sh == 2 * block.input_bytes
    # Over the all-bf16 count: both LayerNorm inputs are fp32 (+2 x 2sh), and q, k and v each save their own bf16
    # copy of ln_1's fp32 output where bf16 compute shares one tensor (+2 x 2sh).
    assert a.saved_activation_bytes - block.saved_activation_bytes == 2 * 2 * sh + 2 * 2 * sh
    assert a.fused_saved_activation_bytes - block.fused_attention.saved_activation_bytes == 8 * sh
    assert all(x.autocast is None for x in profiler.profile_zoo("gpt-tiny", dtype="float32").layers)


@pytest.mark.parametrize(("dp", "tp", "pp", "zero"), [
    (1, 1, 1, 0), (2, 1, 1, 0), (2, 1, 1, 1), (2, 1, 1, 3), (1, 2, 1, 0), (2, 2, 1, 0), (1, 1, 2, 0), (2, 1, 2, 0),
    (2, 1, 2, 1),
])
def test_planner_and_executor_agree_on_which_plans_run_under_autocast(dp, tp, pp, zero):
    from executor.optim import mixed_precision, uses_fsdp2

    layers = 4
    stages = [StageSpec(start=0, stop=layers)] if pp == 1 else [StageSpec(start=0, stop=2), StageSpec(start=2, stop=4)]
    st = Strategy(dims=ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp), zero_stage=ZeroStage(zero),
                  micro_batch_size=1, num_micro_batches=pp, stages=stages)
    policy, autocast_dtype = mixed_precision(st, BF16, fsdp2=uses_fsdp2(st))
    assert (autocast_dtype is not None) == trains_under_autocast(DType.BF16, dp=dp, tp=tp, pp=pp, zero=zero)
    assert (policy is not None) != (autocast_dtype is not None)
    assert not trains_under_autocast(DType.FP32, dp=dp, tp=tp, pp=pp, zero=zero)


def test_ddp_plans_count_autocast_activations_and_fsdp2_plans_the_16_bit_ones():
    from planner import evaluate

    p = profiler.profile_zoo("gpt-tiny", dtype="bfloat16")
    cluster = load_cluster("dgx-a100-80gb")  # flash attention: the fused counts apply
    whole = [StageSpec(start=0, stop=p.num_layers)]
    mb = 4
    memory = {}
    for zero in (ZeroStage.NONE, ZeroStage.OPTIMIZER):  # DDP (autocast) and FSDP2 ZeRO-1 (MixedPrecisionPolicy)
        st = Strategy(dims=ParallelDims(dp=8, tp=1, pp=1, world_size=8), zero_stage=zero, micro_batch_size=mb,
                      num_micro_batches=1, stages=whole)
        memory[zero] = evaluate(p, cluster, st).memory[0]

    def kept(layer, autocast: bool) -> float:
        if autocast:
            return layer.autocast.fused_saved_activation_bytes or layer.autocast.saved_activation_bytes
        return layer.fused_attention.saved_activation_bytes if layer.fused_attention else layer.saved_activation_bytes

    assert memory[ZeroStage.NONE].activations == mb * sum(kept(x, True) for x in p.layers)
    assert memory[ZeroStage.OPTIMIZER].activations == mb * sum(kept(x, False) for x in p.layers)
    assert memory[ZeroStage.NONE].activations > memory[ZeroStage.OPTIMIZER].activations
    # The model's output stays bf16 logits either way (the head's Linear runs under autocast).
    assert memory[ZeroStage.NONE].output_buffers == memory[ZeroStage.OPTIMIZER].output_buffers


def test_a_profile_without_the_autocast_count_plans_as_before():
    p = profiler.profile_zoo("gpt-tiny", dtype="bfloat16")
    old = p.model_copy(update={"layers": [x.model_copy(update={"autocast": None}) for x in p.layers]})
    cluster = load_cluster("dgx-a100-80gb")
    assert layers_for_cluster(old, cluster, autocast=True) == layers_for_cluster(old, cluster)
    assert layers_for_cluster(p, cluster, autocast=True) != layers_for_cluster(p, cluster)
