"""Meta-device models of the shapes users write get initial weights as their own init gives them, the same for the
same seed whatever the plan.

Single-process checks call `executor.init.build_initialized` (the executor's resolve-rule-then-materialise path on
the CPU) and compare with the model built the ordinary way on the CPU: constant tensors exactly, random ones by
their statistics. One 2-process launch (this file is also its worker program) applies ZeRO-3 and tp=2 plans with
`apply_plan` and the test compares every gathered tensor with the single-process materialisation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

from executor.errors import ExecutorError
from executor.init import build_initialized, build_meta

SEED = 3
SEQ = 8
VOCAB = 32
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


# --- models as users write them ---------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """No reset_parameters: the weight is set in __init__ only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Rotary(nn.Module):
    """A non-persistent buffer computed in __init__ (on meta it would hold nothing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.cos(self.inv_freq).repeat(2)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.rot = Rotary(dim)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.rot(self.norm(x)))))


class TinyLM(nn.Module):
    """Bias-free Linears, RMSNorms, a rotary buffer, a positional parameter owned by the root, a tied head."""

    def __init__(self, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos_emb = nn.Parameter(torch.randn(SEQ, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos_emb
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class Scaled(nn.Module):
    """reset_parameters covers the weight but not the buffer set in __init__."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        self.register_buffer("scale", torch.full((4,), 2.5))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.5)


class ConvNet(nn.Module):
    """Bias-free Conv2d and Linear, BatchNorm running statistics, MultiheadAttention (torch's _reset_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.attn = nn.MultiheadAttention(32, 2)
        self.fc = nn.Linear(32, 10, bias=False)
        self.scaled = Scaled()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # No dropout, so a sharded forward can be compared with the single-process one.
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        max_position_embeddings=16))


def bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      vocab_size=VOCAB, max_position_embeddings=16))


FACTORIES = {"tiny_lm": TinyLM, "conv_net": ConvNet, "gpt2": gpt2, "llama": llama, "bert": bert}
HF = {"gpt2", "llama", "bert"}


def _factory(name: str):
    if name in HF:
        pytest.importorskip("transformers")
    return FACTORIES[name]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}


# --- (a) values as the model's own init gives them -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_materialised_tensors_match_the_models_own_init_statistics(name):
    factory = _factory(name)
    got = build_initialized(factory, seed=SEED)
    torch.manual_seed(1234)
    ref = factory()
    mine, theirs = _state(got), _state(ref)
    assert sorted(mine) == sorted(theirs)
    for key, r in theirs.items():
        t = mine[key]
        assert t.device.type == "cpu" and t.shape == r.shape and t.dtype == r.dtype, key
        if not t.is_floating_point():
            assert torch.equal(t, r), key
            continue
        assert torch.isfinite(t).all(), key
        if r.numel() == 1 or bool((r == r.flatten()[0]).all()) or key.endswith("inv_freq"):
            assert torch.equal(t, r), key  # constants (ones, zeros, frequencies) exactly as the module sets them
        else:
            # A different draw from the same distribution: same spread, mean near zero on that scale.
            assert 0.75 < float(t.std() / r.std()) < 1.33, (key, float(t.std()), float(r.std()))
            assert abs(float(t.mean() - r.mean())) < 5 * float(r.std()) / r.numel() ** 0.5, key
            assert not torch.equal(t, r), key
    for alias, p in got.named_parameters(remove_duplicate=False):
        for other, q in ref.named_parameters(remove_duplicate=False):
            if q is ref.get_parameter(alias) and other != alias:
                assert got.get_parameter(other) is p  # ties survive materialisation


def test_bias_free_layers_keep_no_bias_and_get_kaiming_uniform_weights():
    net = build_initialized(ConvNet, seed=SEED)
    assert net.conv.bias is None and net.fc.bias is None
    for layer, fan_in in ((net.conv, 3 * 3 * 3), (net.fc, 32)):
        bound = 1 / fan_in**0.5  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / nn.Conv2d reset_parameters use it
        w = layer.weight.detach()
        assert float(w.abs().max()) <= bound
        assert abs(float(w.std()) - bound / 3**0.5) < 0.1 * bound


def test_norms_buffers_and_root_parameters_without_an_init_come_from_the_cpu_build():
    lm = build_initialized(TinyLM, seed=SEED)
    for norm in (lm.norm, lm.blocks[0].norm, lm.blocks[1].norm):
        assert torch.equal(norm.weight.detach(), torch.ones(16))
    assert torch.equal(lm.blocks[1].rot.inv_freq, Rotary(16).inv_freq)
    torch.manual_seed(SEED)
    assert torch.equal(lm.pos_emb.detach(), TinyLM().pos_emb.detach())
    assert lm.head.weight is lm.embed.weight
    net = build_initialized(ConvNet, seed=SEED)
    assert torch.equal(net.scaled.scale, torch.full((4,), 2.5))  # an init that leaves a buffer unwritten
    assert abs(float(net.scaled.weight.detach().std()) - 0.5) < 0.15
    assert torch.equal(net.bn.running_var, torch.ones(32)) and int(net.bn.num_batches_tracked) == 0
    assert torch.equal(net.attn.out_proj.bias.detach(), torch.zeros(32))  # MultiheadAttention zeroes its child's bias


def test_hugging_face_init_weights_runs_per_module_including_parents():
    pytest.importorskip("transformers")
    model = build_initialized(gpt2, seed=SEED)
    std = model.config.initializer_range
    # GPT2PreTrainedModel._init_weights(GPT2Attention) rescales the child's c_proj: std / sqrt(2 * n_layer).
    proj = torch.cat([model.transformer.h[i].attn.c_proj.weight.detach().flatten() for i in range(2)])
    assert abs(float(proj.std()) - std / 2) < 0.1 * std
    assert abs(float(model.transformer.wte.weight.detach().std()) - std) < 0.1 * std
    assert model.lm_head.weight is model.transformer.wte.weight
    bert_model = build_initialized(bert, seed=SEED)
    assert torch.equal(bert_model.bert.embeddings.position_ids, torch.arange(16).expand(1, -1))


def test_modules_without_init_are_named_with_their_host_memory_cost(caplog):
    with caplog.at_level(logging.WARNING, logger="executor.init"):
        build_initialized(TinyLM, seed=SEED)
    text = caplog.text
    assert "'blocks.0.norm' (RMSNorm)" in text and "'blocks.1.rot' (Rotary)" in text
    assert "the root module (TinyLM)" in text and "MiB of host memory" in text


def test_a_bare_meta_module_without_any_init_is_refused_naming_the_modules():
    with pytest.raises(ExecutorError, match=r"'norm' \(RMSNorm\).*function that builds the model"):
        build_initialized(build_meta(TinyLM), seed=SEED)


def test_a_factory_that_builds_on_meta_itself_is_refused_when_the_fallback_needs_it():
    def on_meta():
        with torch.device("meta"):
            return TinyLM()

    with pytest.raises(ExecutorError, match="builds on the meta device itself"):
        build_initialized(on_meta, seed=SEED)


# --- (b) the seed alone decides ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_same_seed_gives_identical_weights_and_another_seed_different_ones(name):
    factory = _factory(name)
    a, b, c = (_state(build_initialized(factory, seed=s)) for s in (SEED, SEED, SEED + 1))
    # Which tensors are random at all: those two ordinary CPU builds under different seeds disagree on.
    plain = []
    for s in (1, 2):
        torch.manual_seed(s)
        plain.append(_state(factory()))
    assert sum(not torch.equal(t, plain[1][k]) for k, t in plain[0].items()) >= 3
    for key, t in a.items():
        assert torch.equal(t, b[key]), key
        assert torch.equal(t, c[key]) == torch.equal(plain[0][key], plain[1][key]), key


# --- (c) sharded layouts start from the single-process weights --------------------------------------------------

#: case -> (model, Strategy keyword arguments).
DIST_CASES = {
    "tiny_lm_zero3": ("tiny_lm", {"dp": 2, "zero_stage": 3}),
    "tiny_lm_zero1": ("tiny_lm", {"dp": 2, "zero_stage": 1}),
    "tiny_lm_tp2": ("tiny_lm", {"tp": 2}),
    "llama_zero3": ("llama", {"dp": 2, "zero_stage": 3}),
    "gpt2_zero3": ("gpt2", {"dp": 2, "zero_stage": 3}),
}
BATCH = 4
TOL = 1e-5


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _loss(out, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def _profile(name: str):
    import profiler

    with torch.device("meta"):
        model = FACTORIES[name]()
    return profiler.profile(model, (_ids(),), device="meta", cache=False)


def _worker(cases_path: str, out_path: str) -> None:
    """Apply each case's plan, then gather every tensor, one forward's loss and the gradients; rank 0 saves them."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from executor import apply_plan, init_distributed
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    payload = json.loads(Path(cases_path).read_text())
    device = init_distributed("cpu")
    results = {}
    for case, raw in payload["cases"].items():
        model = DIST_CASES[case][0]
        profile = ModelProfile.model_validate(payload["profiles"][model])
        pm = apply_plan(Strategy.model_validate(raw), FACTORIES[model], profile, loss_fn=_loss, device=device,
                        seed=SEED)
        part = pm.parts[0]
        tensors = {k: whole(v) for k, v in [*part.named_parameters(), *part.named_buffers()]}
        loss = _loss(part(_ids()), _ids())
        loss.backward()
        grads = {k: whole(p.grad) for k, p in part.named_parameters()}
        results[case] = {"tensors": tensors, "loss": float(loss), "grads": grads}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    teardown()


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory) -> dict:
    cases = {c: kw for c, kw in DIST_CASES.items() if HAVE_TRANSFORMERS or kw[0] not in HF}
    tmp = tmp_path_factory.mktemp("init2")
    profiles = {m: _profile(m) for m in {m for m, _ in cases.values()}}
    payload = {
        "profiles": {m: p.model_dump(mode="json") for m, p in profiles.items()},
        "cases": {c: sup.strategy(num_layers=profiles[m].num_layers, **kw).model_dump(mode="json")
                  for c, (m, kw) in cases.items()},
    }
    cases_path, out_path = tmp / "cases.json", tmp / "out.pt"
    sup.run_workers(__file__, 2, payload, cases_path, out_path, timeout=150)
    return torch.load(out_path)


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", sorted(DIST_CASES))
def test_sharded_layout_materialises_the_single_process_weights(two_rank, case):
    name = DIST_CASES[case][0]
    factory = _factory(name)
    ref = build_initialized(factory, seed=SEED)
    got = two_rank[case]
    expected = _state(ref)
    assert sorted(got["tensors"]) == sorted(expected)
    for key, t in expected.items():
        assert torch.equal(got["tensors"][key], t), key
    loss = _loss(ref(_ids()), _ids())
    loss.backward()
    assert abs(got["loss"] - loss.item()) <= TOL
    for key, p in ref.named_parameters():
        assert float((got["grads"][key] - p.grad).abs().max()) <= TOL, key


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
