"""The profiler's roofline classes of a GPT block against the block's op sequence worked out by hand."""

from __future__ import annotations

import pytest

from planner.gpt_formula import gpt_profile
from profiler import profile_zoo

CLASSES = ["fwd_actmm_flops", "fwd_actmm_bytes", "fwd_membound_bytes", "fwd_membound_fused_bytes",
           "bwd_actmm_flops", "bwd_actmm_bytes", "bwd_membound_bytes", "bwd_membound_fused_bytes"]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt_block_roofline_classes_match_the_hand_counted_op_sequence(dropout: float) -> None:
    # gpt_formula writes each class from the block's kernels counted by hand (layernorm 2X, GELU 8X, softmax 2A, ...,
    # GPU dropout with 1-byte masks); the profiler counts them op by op on the meta device.
    s, h, a = 64, 128, 4
    counted = profile_zoo("gpt2-small", num_layers=1, hidden=h, heads=a, vocab_size=256, seq_len=s, max_positions=s,
                          dtype="float16", dropout=dropout, cache=False).layers[1]
    formula = gpt_profile(num_layers=1, hidden=h, heads=a, seq_len=s, vocab_size=256, dtype="float16",
                          dropout=dropout).layers[1]
    for field in [*CLASSES, "fwd_bytes", "bwd_bytes", "fwd_flops", "bwd_flops"]:
        assert getattr(counted, field) == pytest.approx(getattr(formula, field), rel=1e-12), field
    # the classes are parts of the totals, and fusing only removes bytes
    assert counted.fwd_actmm_bytes + counted.fwd_membound_bytes < counted.fwd_bytes
    assert counted.fwd_membound_fused_bytes < counted.fwd_membound_bytes


def test_dropout_is_counted_as_the_gpu_kernel_with_one_byte_masks() -> None:
    # Dropout saves a 1-byte mask per element: two hidden-state dropouts (s h each) and the attention
    # probabilities' (a s^2), plus the dropped-out probabilities the scores x V matmul keeps (2 a s^2 in fp16):
    # Korthikanti et al.'s 5 a s^2 attention bytes with dropout against 2 a s^2 without. The CPU decomposition would
    # keep 2-byte masks instead.
    s, h, a = 64, 128, 4
    kw = {"num_layers": 1, "hidden": h, "heads": a, "vocab_size": 256, "seq_len": s, "max_positions": s,
          "dtype": "float16", "cache": False}
    with_drop = profile_zoo("gpt2-small", dropout=0.1, **kw).layers[1]
    without = profile_zoo("gpt2-small", dropout=0.0, **kw).layers[1]
    assert with_drop.saved_activation_bytes - without.saved_activation_bytes == 2 * s * h + a * s * s + 2 * a * s * s
