"""BERT, T5 and GPT-2 blocks, whose configs have no `base_model_tp_plan`, and Mixtral's experts, whose config plan
uses styles autopar does not run, get tensor-parallel shards from autopar's own per-class plan, proved on a reduced
copy (profiler.hf_tp_derived), and tp=2 trains the single-process model; so do Llama with grouped-query attention
(its config's plan as it is), Qwen3 and Phi-3.

This file is also the worker program of its distributed test (`python tests/test_hf_tp_derived.py CASES OUT`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup
from test_hf_models import gpt2, llama, mixtral  # tiny GPT-2 (fused Conv1D c_attn), GQA Llama, Mixtral (4 experts)

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else __import__("transformers")

S, V, P = 8, 64, 16  # tokens per sample, vocabulary, positions
H, HEADS, INTER, LAYERS = 32, 4, 64, 2
D_KV, BUCKETS = 8, 32  # T5: width per head, relative-position buckets (T5Config's default)
LR, STEPS, TOL = 0.1, 3, 1e-5


def bert() -> torch.nn.Module:
    """Tiny BertForMaskedLM, dropout off."""
    cfg = transformers.BertConfig(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                  num_attention_heads=HEADS, vocab_size=V, max_position_embeddings=P,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForMaskedLM(cfg)


def t5() -> torch.nn.Module:
    """Tiny T5ForConditionalGeneration (gated-GELU MLP: wi_0, wi_1, wo), dropout off."""
    cfg = transformers.T5Config(num_layers=LAYERS, num_decoder_layers=LAYERS, d_model=H, d_ff=INTER, num_heads=HEADS,
                                d_kv=D_KV, vocab_size=V, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=BUCKETS)
    return transformers.T5ForConditionalGeneration(cfg)


class _CentredIntermediate(transformers.models.bert.modeling_bert.BertIntermediate):
    """Centres the MLP's hidden features: a mean over the features tensor parallelism splits."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.dense(hidden_states)
        return self.intermediate_act_fn(h - h.mean(-1, keepdim=True))


class CentredBert(transformers.BertForMaskedLM):
    """A BERT whose MLP cannot run on feature shards."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for layer in self.bert.encoder.layer:
            layer.intermediate = _CentredIntermediate(config)


def centred_bert() -> torch.nn.Module:
    """The tiny BERT with its MLPs centred."""
    return CentredBert(bert().config)


def bert_batch(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, V, (size, S), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def t5_batch(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, V, (size, S), generator=gen),
            "labels": torch.randint(1, V, (size, S - 2), generator=gen)}


def qwen3() -> torch.nn.Module:
    """Tiny Qwen3ForCausalLM: per-head RMSNorms on q and k (kept whole under TP, their gradients summed)."""
    cfg = transformers.Qwen3Config(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                   num_attention_heads=HEADS, num_key_value_heads=2, head_dim=H // HEADS, vocab_size=V,
                                   max_position_embeddings=P)
    return transformers.Qwen3ForCausalLM(cfg)


def phi3() -> torch.nn.Module:
    """Tiny Phi3ForCausalLM: q, k, v fused in one Linear (unequal pieces with grouped-query attention), gate and up
    in another; its config's plan gathers their outputs, which autopar does not run."""
    cfg = transformers.Phi3Config(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                  num_attention_heads=HEADS, num_key_value_heads=2, vocab_size=V,
                                  max_position_embeddings=P, pad_token_id=0)
    return transformers.Phi3ForCausalLM(cfg)


MODELS = {"bert": (bert, bert_batch), "t5": (t5, t5_batch), "gpt2": (gpt2, bert_batch), "mixtral": (mixtral, bert_batch),
          "qwen3": (qwen3, bert_batch), "phi3": (phi3, bert_batch), "llama": (llama, bert_batch)}


def _profile(name: str):
    import profiler

    factory, make = {**MODELS, "centred_bert": (centred_bert, bert_batch)}[name]
    torch.manual_seed(0)
    return profiler.profile(factory(), make(2), device="meta", cache=False)


@pytest.fixture(scope="module")
def profiles():
    return {name: _profile(name) for name in MODELS}


def _blocks(profile, prefix: str):
    return [layer for layer in profile.layers if layer.name.startswith(prefix)]


def test_bert_blocks_shard_qkv_and_mlp_in_colwise_and_outputs_rowwise_by_heads(profiles):
    blocks = _blocks(profiles["bert"], "bert.encoder.layer.")
    assert len(blocks) == LAYERS
    for layer in blocks:
        assert {s.module: s.style.value for s in layer.tp.shards} == {
            "attention.self.query": "colwise", "attention.self.key": "colwise", "attention.self.value": "colwise",
            "attention.output.dense": "rowwise", "intermediate.dense": "colwise", "output.dense": "rowwise"}
        assert layer.tp.divisor == HEADS
        # colwise Linears split weight and bias; rowwise ones split the weight (their bias is added once)
        assert layer.tp.sharded_param_count == 3 * (H * H + H) + H * H + (H * INTER + INTER) + INTER * H


def test_t5_blocks_shard_self_cross_attention_gated_mlp_and_the_position_bias_by_heads(profiles):
    inner = HEADS * D_KV
    attn = {f"{p}.{x}": "colwise" for p in ("layer.0.SelfAttention",) for x in "qkv"} | {
        "layer.0.SelfAttention.o": "rowwise"}
    cross = {f"layer.1.EncDecAttention.{x}": "colwise" for x in "qkv"} | {"layer.1.EncDecAttention.o": "rowwise"}

    def mlp(i):
        return {f"layer.{i}.DenseReluDense.wi_0": "colwise", f"layer.{i}.DenseReluDense.wi_1": "colwise",
                f"layer.{i}.DenseReluDense.wo": "rowwise"}

    attn_params, mlp_params, bias_params = 4 * H * inner, 3 * H * INTER, BUCKETS * HEADS
    for stack, expected, params in (("encoder", attn | mlp(1), attn_params + mlp_params),
                                    ("decoder", attn | cross | mlp(2), 2 * attn_params + mlp_params)):
        blocks = _blocks(profiles["t5"], f"{stack}.block.")
        assert len(blocks) == LAYERS
        for i, layer in enumerate(blocks):
            assert {s.module: s.style.value for s in layer.tp.shards} == expected
            assert layer.tp.divisor == HEADS
            # block 0 of each stack holds the relative position bias table, split with the heads
            assert layer.tp.sharded_param_count == params + (bias_params if i == 0 else 0)


def test_qwen3_blocks_keep_their_per_head_norms_whole_beside_the_config_plans_shards(profiles):
    # the config's plan says replicated_with_grad_allreduce for q_norm / k_norm: proved, and run so
    for layer in _blocks(profiles["qwen3"], "model.layers."):
        styles = {s.module: s.style.value for s in layer.tp.shards}
        assert styles["self_attn.q_norm"] == styles["self_attn.k_norm"] == "replicated"
        assert styles["self_attn.q_proj"] == "colwise" and styles["mlp.down_proj"] == "rowwise"
        assert layer.tp.divisor == 2  # key/value heads


def test_phi3_fused_projections_are_split_per_piece_by_autopars_own_plan(profiles):
    head = H // HEADS
    for layer in _blocks(profiles["phi3"], "model.layers."):
        assert {s.module: (s.style.value, s.segments) for s in layer.tp.shards} == {
            "self_attn.qkv_proj": ("colwise", [HEADS * head, 2 * head, 2 * head]), "self_attn.o_proj": ("rowwise", None),
            "mlp.gate_up_proj": ("colwise", [INTER, INTER]), "mlp.down_proj": ("rowwise", None)}
        assert layer.tp.divisor == 2  # key/value heads
        assert layer.tp.sharded_param_count == H * (HEADS + 4) * head + H * H + 2 * H * INTER + INTER * H


def test_a_block_whose_mlp_mixes_the_split_features_gets_no_tp_with_the_reason(caplog):
    with caplog.at_level(logging.INFO, logger="profiler.hf_tp_derived"):
        profile = _profile("centred_bert")
    assert all(layer.tp is None for layer in _blocks(profile, "bert.encoder.layer."))
    assert "bert.encoder.layer.0: no tensor parallelism (output 0 differs when sharded)" in caplog.text


# --- tp=2 trains exactly the single-process model ------------------------------------------------------------------

def _train_reference(name: str, global_batch: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from executor.init import build_initialized

    factory, make = MODELS[name]
    net = build_initialized(factory, seed=sup.SEED)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        full = make(global_batch, seed=100 + step)
        total = 0.0
        for i in range(2):  # the strategy's two micro-batches
            micro = {k: v[i * global_batch // 2:(i + 1) * global_batch // 2] for k, v in full.items()}
            loss = net(**micro).loss
            (loss / 2).backward()
            total += loss.item() / 2
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach() for n, p in net.named_parameters()}


def _worker(cases_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from executor import apply_plan, init_distributed
    from executor.tp_rewrite import sharded_layout
    from executor.worker import teardown
    from planner.model_profile import ModelProfile

    payload = json.loads(Path(cases_path).read_text())
    device = init_distributed("cpu")
    result = {}
    for name, raw in payload["profiles"].items():
        factory, make = MODELS[name]
        profile = ModelProfile.model_validate(raw)
        st = sup.strategy(tp=2, num_layers=profile.num_layers)
        pm = apply_plan(st, factory, profile, device=device, seed=sup.SEED, example_inputs=make(st.micro_batch_size))
        opts = [torch.optim.SGD(p.parameters(), lr=LR) for p in pm.parts]
        losses = []
        for step in range(STEPS):
            local = pm.forward_backward(pm.local_batch(make(st.global_batch_size, seed=100 + step)))
            for opt in opts:
                opt.step()
                opt.zero_grad()
            losses.append(pm.global_loss(local))
        params, sharded = {}, []
        for n, p in pm.parts[0].named_parameters():
            if type(p).__name__ == "DTensor":
                sharded.append(n)
                p = sharded_layout(pm.parts[0], n, p.full_tensor(), inverse=True)  # fused: in the user's order
            params[n] = p.detach().tolist()
        result[name] = {"losses": losses, "sharded": sorted(sharded), "params": params}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(result))
    teardown()


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_every_family_tp2_trains_the_single_process_model(profiles, tmp_path):
    cases, out = tmp_path / "cases.json", tmp_path / "out.json"
    payload = {"profiles": {n: p.model_dump(mode="json") for n, p in profiles.items()}}
    sup.run_workers(__file__, 2, payload, cases, out, timeout=180)
    result = json.loads(out.read_text())
    assert "bert.encoder.layer.1.intermediate.dense.weight" in result["bert"]["sharded"]
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in result["t5"]["sharded"]
    assert "decoder.block.1.layer.1.EncDecAttention.o.weight" in result["t5"]["sharded"]
    assert "transformer.h.1.attn.c_attn.weight" in result["gpt2"]["sharded"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in result["mixtral"]["sharded"]
    assert "model.layers.1.self_attn.q_proj.weight" in result["qwen3"]["sharded"]
    assert "model.layers.1.self_attn.q_norm.weight" not in result["qwen3"]["sharded"]  # whole on every rank
    assert "model.layers.0.self_attn.qkv_proj.weight" in result["phi3"]["sharded"]
    assert "model.layers.0.self_attn.k_proj.weight" in result["llama"]["sharded"]  # by its key/value heads
    assert "model.layers.1.mlp.down_proj.weight" in result["llama"]["sharded"]
    for name in MODELS:
        st = sup.strategy(tp=2, num_layers=profiles[name].num_layers)
        losses, params = _train_reference(name, st.global_batch_size)
        got = result[name]
        assert max(abs(a - b) for a, b in zip(got["losses"], losses, strict=True)) <= TOL, (name, got["losses"])
        assert set(got["params"]) == set(params), name
        for n, p in params.items():
            assert torch.allclose(torch.tensor(got["params"][n], dtype=p.dtype), p, rtol=0, atol=TOL), (name, n)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
