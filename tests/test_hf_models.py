"""Hugging Face transformers models as first-class citizens (profiler.hf, executor.hf_tp): tiny GPT-2, Llama with
grouped-query attention, BERT and Mixtral built from configs with random weights.

Closed forms come from the configs alone. FLOPs are counted the way FlopCounterMode counts them: 2 per
multiply-accumulate, attention scores over all S x S positions (the math kernel), per sample.
Their tensor-parallel training (tp=2 against one process) is tests/test_hf_tp_derived.py's launch.
"""

from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

S, V, P = 8, 64, 16  # tokens per sample, vocabulary, positions
H, HEADS, KV, INTER, LAYERS = 32, 4, 2, 64, 2
EXPERTS, TOP_K = 4, 2
HD = H // HEADS


def gpt2() -> torch.nn.Module:
    """Tiny GPT2LMHeadModel (head tied to the token embedding), dropout off."""
    cfg = transformers.GPT2Config(n_layer=LAYERS, n_embd=H, n_head=HEADS, vocab_size=V, n_positions=P,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def llama() -> torch.nn.Module:
    """Tiny LlamaForCausalLM with grouped-query attention (2 KV heads for 4 query heads)."""
    cfg = transformers.LlamaConfig(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                                   max_position_embeddings=P, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def bert() -> torch.nn.Module:
    """Tiny BertForMaskedLM (decoder tied to the word embedding), dropout off."""
    cfg = transformers.BertConfig(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                  num_attention_heads=HEADS, vocab_size=V, max_position_embeddings=P,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForMaskedLM(cfg)


def mixtral() -> torch.nn.Module:
    """Tiny MixtralForCausalLM: 4 experts, top-2 routing."""
    cfg = transformers.MixtralConfig(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                     num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                                     max_position_embeddings=P, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return transformers.MixtralForCausalLM(cfg)


def batch(size: int, seed: int = 0, *, mask: bool = False) -> dict[str, torch.Tensor]:
    """Token ids with labels (the model computes its own loss), optionally an all-ones attention mask."""
    ids = torch.randint(1, V, (size, S), generator=torch.Generator().manual_seed(seed))
    out = {"input_ids": ids, "labels": ids.clone()}
    return {**out, "attention_mask": torch.ones_like(ids)} if mask else out


def _profile(factory, *, device="meta", inputs=None, **kw):
    import profiler

    torch.manual_seed(0)
    return profiler.profile(factory(), inputs if inputs is not None else batch(2), device=device, cache=False, **kw)


# Per-sample closed forms from the configs.
ATTN_CORE = 2 * 2 * S * S * HD * HEADS  # QK^T and scores x V
GQA_PROJ = 2 * S * H * (H + 2 * KV * HD + H)  # q, k, v, o
BLOCK_FLOPS = {
    "gpt2": 2 * S * H * (3 * H + H + 4 * H + 4 * H) + ATTN_CORE,
    "llama": GQA_PROJ + 3 * 2 * S * H * INTER + ATTN_CORE,
    "bert": 2 * S * H * 4 * H + 2 * 2 * S * H * INTER + ATTN_CORE,
    "mixtral": GQA_PROJ + ATTN_CORE + 2 * S * H * EXPERTS + S * TOP_K * 3 * 2 * H * INTER,
}
EXPERT_PARAMS = EXPERTS * 3 * H * INTER
PARAMS = {
    "gpt2": V * H + P * H + LAYERS * (4 * H + 3 * H * H + 3 * H + H * H + H + 8 * H * H + 5 * H) + 2 * H,
    "llama": 2 * V * H + LAYERS * (2 * H * H + 2 * H * KV * HD + 3 * H * INTER + 2 * H) + H,
    "bert": (V * H + P * H + 2 * H + 2 * H) + LAYERS * (4 * (H * H + H) + 2 * H * INTER + INTER + H + 4 * H)
    + (H * H + H + 2 * H + V),
    "mixtral": 2 * V * H + LAYERS * (2 * H * H + 2 * H * KV * HD + EXPERTS * H + EXPERT_PARAMS + 2 * H) + H,
}
FACTORIES = {"gpt2": gpt2, "llama": llama, "bert": bert, "mixtral": mixtral}
BLOCKS = {"gpt2": "transformer.h.", "llama": "model.layers.", "bert": "bert.encoder.layer.", "mixtral": "model.layers."}


@pytest.fixture(scope="module")
def profiles():
    return {name: _profile(factory) for name, factory in FACTORIES.items()}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_parameter_count_equals_the_closed_form_of_the_config(profiles, name):
    assert profiles[name].param_count == PARAMS[name]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_block_is_a_layer_with_forward_flops_of_the_closed_form(profiles, name):
    blocks = [layer for layer in profiles[name].layers if layer.name.startswith(BLOCKS[name])]
    assert [b.name for b in blocks] == [f"{BLOCKS[name]}{i}" for i in range(LAYERS)]
    for block in blocks:
        assert block.fwd_flops == pytest.approx(BLOCK_FLOPS[name], rel=0.03)


def test_llama_layers_are_embedding_blocks_norm_head_and_rotary_is_folded_away(profiles):
    names = [layer.name for layer in profiles["llama"].layers]
    assert names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]


def test_llama_tp_plan_shards_attention_and_mlp_of_every_block_by_kv_heads(profiles):
    for layer in profiles["llama"].layers:
        if not layer.name.startswith("model.layers."):
            continue
        shards = {s.module: s.style.value for s in layer.tp.shards}
        assert shards == {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
                          "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
                          "mlp.down_proj": "rowwise"}
        assert layer.tp.divisor == KV
        assert layer.tp.sharded_param_count == 2 * H * H + 2 * H * KV * HD + 3 * H * INTER


def test_gpt2_blocks_shard_the_fused_conv1d_qkv_per_piece_and_the_mlp(profiles):
    # GPT-2 has no base_model_tp_plan: autopar's own table (profiler.hf_tp_derived) shards its Conv1D projections,
    # the fused c_attn per piece (q, k, v each split by heads)
    assert transformers.GPT2Config.base_model_tp_plan is None
    for layer in profiles["gpt2"].layers:
        if not layer.name.startswith(BLOCKS["gpt2"]):
            continue
        assert {s.module: (s.style.value, s.segments) for s in layer.tp.shards} == {
            "attn.c_attn": ("colwise", [H, H, H]), "attn.c_proj": ("rowwise", None),
            "mlp.c_fc": ("colwise", None), "mlp.c_proj": ("rowwise", None)}
        assert layer.tp.divisor == HEADS
        # colwise: weight and bias split; rowwise: the weight (its bias is added once)
        assert layer.tp.sharded_param_count == (3 * H * H + 3 * H) + H * H + (4 * H * H + 4 * H) + 4 * H * H


def test_mixtral_blocks_shard_attention_by_the_config_plan_and_every_expert_by_its_intermediate_features(profiles):
    # the config's plan for the experts uses styles autopar does not run (packed_colwise, moe_tp_experts); autopar
    # splits each expert's gate / up stack per piece and its down stack by the intermediate features instead
    for layer in profiles["mixtral"].layers:
        if not layer.name.startswith(BLOCKS["mixtral"]):
            continue
        assert {s.module: (s.style.value, s.segments) for s in layer.tp.shards} == {
            "self_attn.q_proj": ("colwise", None), "self_attn.k_proj": ("colwise", None),
            "self_attn.v_proj": ("colwise", None), "self_attn.o_proj": ("rowwise", None),
            "mlp.experts": ("experts", [INTER, INTER])}
        assert layer.tp.divisor == KV
        assert layer.tp.sharded_param_count == 2 * H * H + 2 * H * KV * HD + EXPERT_PARAMS
        # the block's output is summed after attention and after the experts; in backward, the inputs of q, k, v
        # and of the experts are
        assert (layer.tp.allreduces_per_forward, layer.tp.allreduces_per_backward) == (2, 4)


def test_another_moe_family_with_mixtrals_expert_layout_gets_expert_tp_and_keeps_its_shared_expert_whole():
    # Qwen2-MoE: its experts class is not Mixtral's but has the same layout (transformers' experts flags); its shared
    # expert (a dense MLP beside the routed ones) stays replicated, the proof on a reduced copy passing as a whole
    moe_inter = 16
    cfg = transformers.Qwen2MoeConfig(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                      moe_intermediate_size=moe_inter, shared_expert_intermediate_size=INTER,
                                      num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                                      max_position_embeddings=P, num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    profile = _profile(lambda: transformers.Qwen2MoeForCausalLM(cfg))
    for layer in profile.layers:
        if not layer.name.startswith("model.layers."):
            continue
        assert {s.module: (s.style.value, s.segments) for s in layer.tp.shards} == {
            "self_attn.q_proj": ("colwise", None), "self_attn.k_proj": ("colwise", None),
            "self_attn.v_proj": ("colwise", None), "self_attn.o_proj": ("rowwise", None),
            "mlp.experts": ("experts", [moe_inter, moe_inter])}
        attention = 2 * H * H + 2 * H * KV * HD + H + 2 * KV * HD  # Qwen2's q, k, v have biases
        assert layer.tp.sharded_param_count == attention + EXPERTS * 3 * H * moe_inter


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_a_model_that_transforms_its_logits_after_the_head_is_profiled_with_that_transform_in_its_loss(family):
    # Granite divides the logits by `logits_scaling`, Gemma 2 soft-caps them (tanh(x / cap) * cap), in the model's
    # own forward after lm_head: the loss counted with the head applies the same transform, and equals the model's
    from profiler.hf import labels_loss

    small = {"num_hidden_layers": LAYERS, "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS,
             "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V, "max_position_embeddings": P}
    if family == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**small, logits_scaling=4.0))
    else:  # a cap small enough that it changes the loss
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small, final_logit_softcapping=0.05,
                                                                         sliding_window=S))
    profile = _profile(lambda: model)
    assert profile.layers[-1].name == "lm_head"
    ids = batch(2)["input_ids"]
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda _m, _a, out: seen.__setitem__("logits", out))
    with torch.no_grad():
        own = model.eval()(input_ids=ids, labels=ids).loss
    hook.remove()
    loss = labels_loss(model)
    assert loss(seen["logits"], ids).item() == pytest.approx(own.item(), rel=1e-6)
    assert abs(loss.fn(seen["logits"], ids).item() - own.item()) > 1e-3  # the transform matters here


def test_tp_divides_the_weight_gemms_of_every_sharded_expert_and_attention_projection_not_the_router(profiles):
    from planner.cluster import load_cluster
    from planner.cost import estimate_weight_gemm_seconds

    base = load_cluster("dgx-h100")
    cluster = base.model_copy(update={"device": base.device.model_copy(update={"gemm_ramp_seconds": 0.0})})
    peak = cluster.peak_flops_for(profiles["mixtral"].dtype)  # no ramp: every GEMM at one efficiency
    block = next(x for x in profiles["mixtral"].layers if x.name == "model.layers.0")
    # each expert's GEMMs: N, K of one expert's weight (2 x inter by hidden in, hidden by inter out)
    assert {(g.n, g.k) for g in block.gemms if g.module == "mlp.experts"} == {(2 * INTER, H), (H, INTER)}

    def seconds(tp):
        return estimate_weight_gemm_seconds(block, cluster, peak, backward=False, micro_batch=4, tp=tp, gemm_flops=0.0)

    router = [g for g in block.gemms if g.module == "mlp.gate"]
    assert router
    only_router = block.model_copy(update={"gemms": router})
    t_router = estimate_weight_gemm_seconds(only_router, cluster, peak, backward=False, micro_batch=4, tp=1,
                                            gemm_flops=0.0)
    assert seconds(2) == pytest.approx((seconds(1) - t_router) / 2 + t_router, rel=1e-9)


def test_mixtral_records_active_parameters_of_top_k_experts(profiles):
    p = profiles["mixtral"]
    assert p.active_param_count == PARAMS["mixtral"] - LAYERS * EXPERT_PARAMS * (EXPERTS - TOP_K) // EXPERTS
    assert profiles["llama"].active_param_count == profiles["llama"].param_count


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_block_is_counted_under_autocast_with_its_hidden_state_in_fp32(name):
    # Under torch.autocast the embedding's output and every residual add stay fp32 (profiler.autocast), so each block
    # takes its hidden state (S x H per sample) with 2 more bytes per element than in the all-bf16 count, and keeps
    # more for backward.
    blocks = [x for x in _profile(FACTORIES[name], dtype="bfloat16").layers if x.name.startswith(BLOCKS[name])]
    assert len(blocks) == LAYERS
    for block in blocks:
        a = block.autocast
        assert a is not None, block.name
        assert a.input_bytes - block.input_bytes >= 2 * S * H
        assert a.saved_activation_bytes > block.saved_activation_bytes


def test_mixtral_counts_the_same_in_bfloat16_and_float32():
    fp32, bf16 = _profile(mixtral, dtype="float32"), _profile(mixtral, dtype="bfloat16")
    assert [x.fwd_flops for x in fp32.layers] == [x.fwd_flops for x in bf16.layers]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_measured_cpu_profile_times_every_layer_without_a_growing_cache(profiles, name):
    p = _profile(FACTORIES[name], device="cpu", warmup=0, repeats=1)
    assert p.step is not None and p.step.fwd_bwd_seconds > 0
    assert all(layer.fwd_seconds is not None and layer.bwd_seconds is not None for layer in p.layers)
    calls = [c for layer in p.layers for c in layer.attention]
    assert calls and all(c.kv_len == S for c in calls)  # a reused key/value cache would have grown it
    # measuring changes no count: the layers, their FLOPs and TP shards are the meta profile's
    assert [(x.name, x.fwd_flops, x.tp) for x in p.layers] == [(x.name, x.fwd_flops, x.tp) for x in profiles[name].layers]


def test_all_ones_attention_mask_counts_like_no_mask_and_padding_is_refused_with_the_fix(profiles):
    from profiler.errors import ProfileError

    masked = _profile(llama, inputs=batch(2, mask=True))
    assert [x.fwd_flops for x in masked.layers] == [x.fwd_flops for x in profiles["llama"].layers]
    padded = batch(2, mask=True)
    padded["attention_mask"][0, -2:] = 0
    with pytest.raises(ProfileError, match="padding"):
        _profile(llama, inputs=padded)


def test_plan_for_llama3_8b_shape_on_8_dgx_h100_finishes_in_10_s():
    from planner.cluster import load_cluster
    from planner.planning import plan

    cfg = transformers.LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    ids = torch.zeros(1, 2048, dtype=torch.long)
    # CPU seconds of this process (profiling, graph, the single-worker search): `make test` runs this beside two
    # other pytest processes on 2 cores, where wall time measures their load (2.7 s idle, 14 s once in CI)
    started, wall = time.process_time(), time.perf_counter()
    result = plan(model, load_cluster("dgx-h100", nodes=8), global_batch_size=512,
                  example_inputs={"input_ids": ids, "labels": ids}, time_limit_s=5.0)
    assert time.process_time() - started < 10, f"{time.perf_counter() - wall:.1f} s wall"
    assert result.strategy.dims.world_size == 64
