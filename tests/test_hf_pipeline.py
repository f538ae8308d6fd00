"""Pipeline cuts between the blocks of Hugging Face models (profiler.hf_partition) and pipeline-parallel training of
them that is exactly the model's forward: Llama with grouped-query attention, GPT-2 and BERT from small configs (T5,
an encoder-decoder: tests/test_hf_t5_pipeline.py).

Expected cut points come from the models' structure alone: a stage may start at every block but the first and at the
final norm, so for layers [pre..., block 0..N-1, post...] the cuts are the indices of blocks 1..N-1 and of post[0].
This file is also the worker program of the pipelined training test (run under torchrun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else __import__("transformers")

S, V, H, HEADS, KV, INTER, LAYERS = 8, 64, 32, 4, 2, 64, 4
LR, STEPS, TOL = 0.1, 3, 1e-5
LLAMA_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "hf_llama_tiny.json"


def llama() -> torch.nn.Module:
    """LlamaForCausalLM with grouped-query attention (2 KV heads for 4 query heads)."""
    cfg = transformers.LlamaConfig(num_hidden_layers=LAYERS, hidden_size=H, intermediate_size=INTER,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                                   max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(embd_pdrop: float = 0.0, resid_pdrop: float = 0.0) -> torch.nn.Module:
    """GPT2LMHeadModel (head tied to the token embedding) with the given embedding / residual dropout."""
    cfg = transformers.GPT2Config(n_layer=LAYERS, n_embd=H, n_head=HEADS, vocab_size=V, n_positions=16,
                                  embd_pdrop=embd_pdrop, resid_pdrop=resid_pdrop, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class _ScaledLlamaModel(transformers.LlamaModel if transformers else object):
    """A Llama body that scales its embeddings in its own forward (glue between layers, not inside one)."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return super().forward(inputs_embeds=inputs_embeds * 2.0, **kwargs)


class ScaledLlama(transformers.LlamaForCausalLM if transformers else object):
    """LlamaForCausalLM around `_ScaledLlamaModel`: a later stage would scale its received hidden state again."""

    def __init__(self, config):
        super().__init__(config)
        self.model.__class__ = _ScaledLlamaModel


def batch(size: int, seed: int = 0, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids with labels (the model computes its own loss)."""
    ids = torch.randint(1, V, (size, S), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), **extra}


def _profile(model: torch.nn.Module, inputs: dict | None = None):
    import profiler

    return profiler.profile(model, inputs if inputs is not None else batch(2), device="meta", cache=False)


def _expected_cuts(names: list[str], blocks: str) -> list[int]:
    at = [i for i, n in enumerate(names) if n.startswith(blocks)]
    return at[1:] + [at[-1] + 1]


@pytest.mark.parametrize(("factory", "blocks"), [(llama, "model.layers."), (gpt2, "transformer.h.")])
def test_a_cut_between_every_pair_of_blocks_and_before_the_final_norm(factory, blocks):
    from planner.graph import cut_bytes

    torch.manual_seed(0)
    profile = _profile(factory())
    names = [layer.name for layer in profile.layers]
    assert [n for n in names if n.startswith(blocks)] == [f"{blocks}{i}" for i in range(LAYERS)]
    assert profile.cut_points == _expected_cuts(names, blocks)
    # One hidden state [S, H] in float32 crosses each cut, per sample.
    sizes = cut_bytes(profile)
    assert [sizes[k] for k in profile.cut_points] == [S * H * 4] * len(profile.cut_points)


class _GlueDropoutGPT2(transformers.GPT2LMHeadModel if transformers else object):
    """GPT-2 whose own forward drops out whatever embeddings it runs on (a functional dropout in the glue)."""

    def forward(self, input_ids=None, inputs_embeds=None, labels=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids)
        dropped = torch.nn.functional.dropout(inputs_embeds, 0.1, self.training)
        return super().forward(inputs_embeds=dropped, labels=labels, **kwargs)


def test_gpt2_embedding_dropout_runs_once_on_the_first_stage_and_keeps_the_cuts():
    from profiler.partition import partition

    torch.manual_seed(0)
    model = gpt2(embd_pdrop=0.1).train()
    names = [layer.name for layer in _profile(gpt2(embd_pdrop=0.1)).layers]
    inputs = batch(2, labels=None)
    part = partition(model, names, (), inputs)
    assert part.legal_cuts == _expected_cuts(names, "transformer.h.")
    stages = [m.train() for m in part.stage_modules(model, [3, 5])]
    torch.manual_seed(3)
    with torch.no_grad():
        full = model(**inputs).logits
    torch.manual_seed(3)
    with torch.no_grad():
        x = stages[0](input_ids=inputs["input_ids"])
        for stage in stages[1:]:
            x = stage(x)
    torch.testing.assert_close(x, full, rtol=0, atol=0)


def test_a_dropout_in_the_models_own_forward_is_refused():
    from profiler.partition import partition

    cfg = gpt2().config
    torch.manual_seed(0)
    model = _GlueDropoutGPT2(cfg)
    names = [layer.name for layer in _profile(_GlueDropoutGPT2(cfg)).layers]
    part = partition(model, names, (), batch(2, labels=None))
    assert part.legal_cuts == []
    assert "_GlueDropoutGPT2" in part.why_illegal(3) and "dropout" in part.why_illegal(3)


def test_dropout_inside_the_blocks_keeps_the_cuts():
    torch.manual_seed(0)
    profile = _profile(gpt2(resid_pdrop=0.1))
    assert profile.cut_points == _expected_cuts([x.name for x in profile.layers], "transformer.h.")


def test_glue_that_would_run_again_on_later_stages_means_no_cuts():
    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=H, intermediate_size=INTER,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                                   max_position_embeddings=16, pad_token_id=0)
    torch.manual_seed(0)
    profile = _profile(ScaledLlama(cfg))
    assert profile.cut_points == []


def test_the_stage_programs_of_the_full_model_compose_to_its_forward():
    from profiler.partition import partition

    torch.manual_seed(0)
    model = llama().eval()
    names = [layer.name for layer in _profile(llama()).layers]
    inputs = batch(2, labels=None)
    part = partition(model, names, (), inputs)
    stages = part.stage_modules(model, [2, 5])
    assert [sorted({n.split(".")[2] for n, _ in s.named_parameters() if n.startswith("model.layers.")})
            for s in stages] == [["0"], ["1", "2", "3"], []]
    assert {n for n, _ in stages[2].named_parameters()} == {"model.norm.weight", "lm_head.weight"}
    with torch.no_grad():
        x = stages[0](input_ids=inputs["input_ids"])
        for stage in stages[1:]:
            x = stage(x)
        assert torch.equal(x, model(**inputs).logits)


def test_a_batch_that_later_stages_would_need_is_refused_by_the_executor_in_one_line():
    from executor import pipeline
    from executor.errors import ExecutorError

    torch.manual_seed(0)
    profile = _profile(llama())
    meta = llama().to("meta")
    ids = torch.zeros(2, S, dtype=torch.long, device="meta")
    stages = sup.stages(3, num_layers=profile.num_layers)
    assert pipeline.check_pipelinable(meta, profile, stages, example_inputs=(ids,)).legal_cuts == profile.cut_points
    with pytest.raises(ExecutorError, match="attention_mask") as err:
        pipeline.check_pipelinable(meta, profile, stages, example_inputs=(ids, torch.ones_like(ids)))
    assert "\n" not in str(err.value) and "pp=1" in str(err.value)


# --- pipelined training: pp=2 trains exactly the single-process model --------------------------------------------

CASES = {  # name -> Strategy keywords and the cut (before model.layers.2, before model.norm)
    "pp2_gpipe_mid": {"pp": 2, "cuts": (3,), "schedule": "gpipe"},
    "pp2_1f1b_norm": {"pp": 2, "cuts": (5,), "schedule": "1f1b", "num_micro_batches": 4, "micro_batch_size": 1},
}


def _source():
    from profiler.hf_config import hf_source

    return hf_source(str(LLAMA_CONFIG), {"seq_len": S})


def _tiny_batch(size: int, step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 512, (size, S), generator=torch.Generator().manual_seed(100 + step))
    return {"input_ids": ids, "labels": ids.clone()}


def _reference(st) -> tuple[list[float], dict[str, torch.Tensor]]:
    from executor.init import build_initialized

    net = build_initialized(_source().factory, seed=sup.SEED)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    nmb, losses = st.num_micro_batches, []
    for step in range(STEPS):
        total = 0.0
        full = _tiny_batch(st.global_batch_size, step)
        for i in range(nmb):
            micro = {k: v.chunk(nmb)[i] for k, v in full.items()}
            loss = net(**micro).loss
            (loss / nmb).backward()
            total += loss.item() / nmb
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in net.named_parameters()}


def _worker(cases_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from executor import apply_plan, init_distributed
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy

    payload = json.loads(Path(cases_path).read_text())
    profile = ModelProfile.model_validate(payload["profile"])
    device = init_distributed("cpu")
    out = Path(out_path)
    losses = {}
    for name, spec in payload["cases"].items():
        st = Strategy.model_validate(spec)
        pm = apply_plan(st, _source().factory, profile, device=device, seed=sup.SEED,
                        example_inputs=_tiny_batch(st.micro_batch_size, 0))
        opts = [torch.optim.SGD(p.parameters(), lr=LR) for p in pm.parts]
        losses[name] = []
        for step in range(STEPS):
            local = pm.forward_backward(pm.local_batch(_tiny_batch(st.global_batch_size, step)))
            for opt in opts:
                opt.step()
                opt.zero_grad()
            losses[name].append(pm.global_loss(local))
        params = {n: p.detach() for part in pm.parts for n, p in part.named_parameters()}
        torch.save(params, out.with_name(f"{name}.rank{dist.get_rank()}.pt"))
    if dist.get_rank() == 0:
        out.write_text(json.dumps(losses))
    teardown()


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_pp2_trains_the_single_process_llama_losses_and_parameters(tmp_path):
    import profiler
    from planner.strategy import Strategy

    profile = profiler.profile(_source().factory(), _tiny_batch(2, 0), device="meta", cache=False)
    assert profile.cut_points == [2, 3, 4, 5]
    cases = {}
    for name, kw in CASES.items():
        kw = dict(kw)
        cases[name] = sup.strategy(pp=kw.pop("pp"), cuts=kw.pop("cuts"), num_layers=profile.num_layers,
                                   **kw).model_dump(mode="json")
    out = tmp_path / "out.json"
    sup.run_workers(__file__, 2, {"profile": profile.model_dump(mode="json"), "cases": cases},
                    tmp_path / "cases.json", out, timeout=180)
    got = json.loads(out.read_text())
    for name, spec in cases.items():
        ref_losses, ref_params = _reference(Strategy.model_validate(spec))
        assert max(abs(a - b) for a, b in zip(got[name], ref_losses, strict=True)) <= TOL, (name, got[name])
        params = {**torch.load(tmp_path / f"{name}.rank0.pt"), **torch.load(tmp_path / f"{name}.rank1.pt")}
        assert sorted(params) == sorted(ref_params)
        for n, p in params.items():
            torch.testing.assert_close(p, ref_params[n], rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_autopar_run_pipelines_the_hf_llama_config_with_its_own_loss(tmp_path):
    from executor.init import build_initialized
    from executor.sources import resolve_model
    from profiler.resolve import parse_reference, resolve_profile

    ref = f"hf:{LLAMA_CONFIG}"
    profile = resolve_profile(parse_reference(ref, {"seq_len": S}), dtype="float32").profile
    st = sup.strategy(pp=2, cuts=(4,), num_layers=profile.num_layers, schedule="1f1b")
    sup.make_plan(st, profile).to_json(tmp_path / "plan.json")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", str(tmp_path / "plan.json"), "--model", ref, "--option",
         f"seq_len={S}", "--steps", str(STEPS), "--optimizer", "sgd", "--lr", str(LR), "--report", str(report)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(sup.REPO)}, capture_output=True,
        text=True, timeout=150, check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "pp=2" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    losses = [s["loss"] for s in json.loads(report.read_text())["steps"]]
    model = resolve_model(ref, {"seq_len": S})
    net = build_initialized(model.build, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step, got in enumerate(losses):  # equal-length micro-batches: the whole batch's mean is their mean
        inputs, _ = model.synthetic_batch(st.global_batch_size, seed=step)
        loss = net(**inputs).loss
        assert abs(loss.item() - got) <= TOL, (step, loss.item(), got)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(losses) == STEPS


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def test_an_all_ones_attention_mask_is_dropped_and_a_padded_one_refused_in_the_pipeline():
    from executor import pipeline
    from executor.batch import Batch
    from executor.errors import ExecutorError

    ids = torch.randint(1, V, (2, S))
    kept = pipeline.without_all_ones_mask(Batch(kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                         "labels": ids}))
    assert set(kept.kwargs) == {"input_ids", "labels"} and kept.kwargs["input_ids"] is ids
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    with pytest.raises(ExecutorError, match="padding") as err:
        pipeline.without_all_ones_mask(Batch(kwargs={"input_ids": ids, "attention_mask": padded}))
    assert "\n" not in str(err.value) and "pp=1" in str(err.value)
