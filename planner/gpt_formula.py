"""A GPT `ModelProfile` written from closed-form formulas, with no torch: for tests, benches and "what if" sizes.

The per-layer numbers follow the published analyses of the GPT / Megatron block (hidden h, heads a, sequence s,
vocabulary V, element size e bytes):
- parameters per block `12 h^2 + 13 h`; forward FLOPs per sample `24 s h^2 + 4 s^2 h` (Narayanan et al. 2021,
  appendix), backward twice that; the logit layer `2 s h V` forward;
- saved activations per block and sample `s h (34 + 5 a s / h)` bytes in 16-bit (Korthikanti et al. 2022), of which
  `5 a s^2` are the attention scores that selective recomputation drops; the attention core that selective recompute
  repeats costs `4 s^2 h` FLOPs;
- a block's output (what a pipeline cut sends) is `s h e` bytes; Megatron TP needs two all-reduces of that size per
  forward.
- the roofline classes of a block (per sample, X = s h e, A = a s^2 e, n = s^2 mask elements), read off the zoo
  block's op sequence (pre-LayerNorm, unfused attention with a causal mask built from s x s tensors, GPU dropout
  with 1-byte masks when `dropout` > 0):
  weight GEMMs move 18 X forward (q, k, v, o: 2 X each; fc_in, fc_out: 5 X each) and 36 X backward (each Linear's
  input gradient and weight gradient reread its operands; weight-gradient writes are per step, not counted);
  activation matmuls (QK^T, scores x V) do 4 s^2 h FLOPs and move 2 A + 4 X forward, 8 s^2 h and 4 A + 8 X backward;
  memory-bound ops move forward 20 X + 6 A (layernorms 2 X each, softmax-scale-mask-softmax, GELU 8 X, residual
  adds 3 X each, the head-merge copy 2 X) + 6 n + 4 n e (the mask) + 16 s (layernorm statistics), backward
  43 X + 5 A + 16 s; dropout adds forward 4 X + 2 s h + 2 A + a s^2 and backward the same. Fused, the intermediates
  only memory-bound ops read drop out: forward 4 A + 6 n + 4 n e (+ 4 X with dropout), backward 8 X + 2 A
  (11 X + 4 A with dropout).

The layout mirrors `profiler.zoo.gpt`: `embed`, `blocks.0..L-1`, `head`, with the tied output head owning no weight.
"""

from __future__ import annotations

import hashlib
import json

from planner.model_profile import (
    INPUT_NODE,
    OUTPUT_NODE,
    DType,
    InputSpec,
    LayerEdge,
    LayerProfile,
    ModelProfile,
    ProfileMode,
    SequenceParallelSpec,
    ShardStyle,
    TensorParallelSpec,
    TensorSpec,
    TPShard,
)

_BLOCK_SHARDS = [
    TPShard(module="attn.q_proj", style=ShardStyle.COLWISE),
    TPShard(module="attn.k_proj", style=ShardStyle.COLWISE),
    TPShard(module="attn.v_proj", style=ShardStyle.COLWISE),
    TPShard(module="attn.o_proj", style=ShardStyle.ROWWISE),
    TPShard(module="mlp.fc_in", style=ShardStyle.COLWISE),
    TPShard(module="mlp.fc_out", style=ShardStyle.ROWWISE),
]


def gpt_profile(
    *,
    num_layers: int,
    hidden: int,
    heads: int,
    seq_len: int = 1024,
    vocab_size: int = 50257,
    max_positions: int | None = None,
    dtype: DType | str = DType.FP16,
    tie_embeddings: bool = True,
    name: str | None = None,
    dropout: float = 0.0,
) -> ModelProfile:
    """An analytic profile of a GPT with the given size (per-sample quantities, as the profiler reports them).

    dropout: only whether it is above 0 matters (the dropout kernels' bytes); the zoo's `dropout` option.
    """
    dt = DType(dtype)
    e = dt.itemsize
    s, h, a, V = seq_len, hidden, heads, vocab_size
    P = max_positions or seq_len
    sh = s * h * e
    # Korthikanti's 34 s h counts 16-bit tensors plus 1-byte dropout masks; scale the 16-bit part for fp32.
    block_saved = s * h * 34 * e / 2 + 5 * a * s * s * e / 2
    block_fwd_flops = 24 * s * h * h + 4 * s * s * h
    block_params = 12 * h * h + 13 * h
    X, A, n, d = s * h * e, a * s * s * e, s * s, dropout > 0
    fwd_mm_bytes, bwd_mm_bytes = 2 * A + 4 * X, 4 * A + 8 * X
    drop = (4 * X + 2 * s * h + 2 * A + a * s * s) if d else 0.0
    fwd_mem = 20 * X + 6 * A + 6 * n + 4 * n * e + 16 * s + drop
    bwd_mem = 43 * X + 5 * A + 16 * s + drop
    fwd_mem_fused = fwd_mem - (4 * A + 6 * n + 4 * n * e + (4 * X if d else 0.0))
    bwd_mem_fused = bwd_mem - ((11 * X + 4 * A) if d else (8 * X + 2 * A))
    layers = [
        LayerProfile(
            index=0, name="embed", module_type="GPTEmbedding",
            param_count=V * h + P * h, param_bytes=(V * h + P * h) * e,
            fwd_flops=0.0, bwd_flops=0.0, fwd_bytes=3 * sh, bwd_bytes=3 * sh,
            saved_activation_bytes=8 * s, input_bytes=8 * s, output_bytes=sh,
        )
    ]
    for i in range(num_layers):
        layers.append(
            LayerProfile(
                index=i + 1, name=f"blocks.{i}", module_type="Block",
                param_count=block_params, param_bytes=block_params * e,
                fwd_flops=block_fwd_flops, bwd_flops=2 * block_fwd_flops,
                fwd_bytes=18 * X + fwd_mm_bytes + fwd_mem, bwd_bytes=36 * X + bwd_mm_bytes + bwd_mem,
                fwd_actmm_flops=4 * s * s * h, fwd_actmm_bytes=fwd_mm_bytes,
                fwd_membound_bytes=fwd_mem, fwd_membound_fused_bytes=fwd_mem_fused,
                bwd_actmm_flops=8 * s * s * h, bwd_actmm_bytes=bwd_mm_bytes,
                bwd_membound_bytes=bwd_mem, bwd_membound_fused_bytes=bwd_mem_fused,
                saved_activation_bytes=block_saved, input_bytes=sh, output_bytes=sh,
                selective_saved_bytes=5 * a * s * s * e / 2, selective_fwd_flops=4 * s * s * h,
                tp=TensorParallelSpec(
                    shards=_BLOCK_SHARDS, divisor=a, sharded_param_count=12 * h * h + 7 * h,
                    allreduces_per_forward=2, allreduce_bytes=sh,
                    # Megatron's sequence parallelism: LayerNorms on sequence shards, attention and MLP inputs
                    # gathered (s h e bytes each)
                    sequence_parallel=SequenceParallelSpec(norms=["ln_1", "ln_2"], regions=["attn", "mlp"],
                                                           gathered_bytes=2 * sh),
                ),
            )
        )
    head_params = 2 * h + (0 if tie_embeddings else V * h)
    layers.append(
        LayerProfile(
            index=num_layers + 1, name="head", module_type="GPTHead",
            param_count=head_params, param_bytes=head_params * e, shared_param_count=V * h if tie_embeddings else 0,
            fwd_flops=2 * s * h * V, bwd_flops=4 * s * h * V,
            fwd_bytes=2 * sh + s * V * e, bwd_bytes=2 * sh + 2 * s * V * e,
            saved_activation_bytes=2 * sh + 4 * s * V, input_bytes=sh, output_bytes=s * V * e,
            # Vocabulary-parallel head: the logits stay split, the loss needs only per-token reductions.
            tp=TensorParallelSpec(
                shards=[TPShard(module="lm_head", style=ShardStyle.VOCAB_COLWISE)], divisor=1, uneven_max=V,
                sharded_param_count=0 if tie_embeddings else V * h, allreduces_per_forward=0, allreduce_bytes=0.0,
            ),
        )
    )
    names = [layer.name for layer in layers]
    edges = [LayerEdge(src=INPUT_NODE, dst="embed", bytes=8 * s)]
    edges += [LayerEdge(src=x, dst=y, bytes=layers[i].output_bytes) for i, (x, y) in enumerate(zip(names, names[1:]))]
    edges.append(LayerEdge(src="head", dst=OUTPUT_NODE, bytes=s * V * e))
    config = {"L": num_layers, "h": h, "a": a, "V": V, "P": P, "tie": tie_embeddings, "dtype": dt.value,
              "dropout": dropout}
    return ModelProfile(
        name=name or f"gpt-formula-{num_layers}x{h}",
        structure_hash=hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        input=InputSpec(batch_size=1, seq_len=s, tensors=[TensorSpec(shape=[1, s], dtype="int64")]),
        dtype=dt, device="meta", mode=ProfileMode.ANALYTIC,
        layers=layers, edges=edges, cut_points=list(range(1, len(layers))), profile_seconds=0.0,
    )
