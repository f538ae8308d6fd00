"""Pipeline cuts of Hugging Face T5 (profiler.hf_encdec) and pipeline-parallel training of it that is exactly the
model: cuts inside each stack and between the stacks, every tensor crossing a cut counted, and pp=2 on 2 gloo ranks
with the single-process losses and final parameters.

Expected cuts come from the layer names alone: every block of a stack but the first, each stack's final norm and the
decoder's embedding (the boundary between the stacks). Expected bytes are counted by hand from the config: the hidden
state [T, d], T5's relative position bias [1, heads, T, T] (per sample: divided by the profiled batch), the encoder's
output and the decoder's int64 input ids. This file is also the worker program of the training test (under torchrun).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else __import__("transformers")

ENC_LEN, DEC_LEN, D, HEADS, V = 8, 6, 32, 4, 64
LR, STEPS, TOL = 0.1, 3, 1e-5


def t5_config(**kw) -> transformers.T5Config:
    """A tiny T5 (v1.0 layout: the head tied to the shared embedding, decoder output scaled), no dropout."""
    base = {"num_layers": 2, "num_decoder_layers": 2, "d_model": D, "d_ff": 64, "num_heads": HEADS,
            "d_kv": D // HEADS, "vocab_size": V, "decoder_start_token_id": 0, "pad_token_id": 0, "dropout_rate": 0.0}
    return transformers.T5Config(**(base | kw))


def t5() -> torch.nn.Module:
    """The model the training test pipelines."""
    return transformers.T5ForConditionalGeneration(t5_config())


def t5_batch(size: int, step: int = 0) -> dict[str, torch.Tensor]:
    """Source ids and (shorter) target labels: the model makes its decoder inputs from the labels."""
    gen = torch.Generator().manual_seed(100 + step)
    return {"input_ids": torch.randint(1, V, (size, ENC_LEN), generator=gen),
            "labels": torch.randint(1, V, (size, DEC_LEN), generator=gen)}


def _profile(model: torch.nn.Module, batch: dict | None = None):
    import profiler

    return profiler.profile(model, batch if batch is not None else t5_batch(2), device="meta", cache=False)


@functools.cache
def _t5_profile():
    """The profile of `t5()` at `t5_batch(2)` (the layer names and cuts several tests read)."""
    torch.manual_seed(0)
    return _profile(t5())


def _t5_names() -> list[str]:
    return [layer.name for layer in _t5_profile().layers]


def _expected_cuts(names: list[str]) -> list[int]:
    cuts = []
    for stack in ("encoder", "decoder"):
        blocks = [i for i, n in enumerate(names) if n.startswith(f"{stack}.block.")]
        cuts += blocks[1:] + [names.index(f"{stack}.final_layer_norm")]
    return sorted(cuts + [names.index("decoder.embed_tokens")])


def test_t5_is_cut_between_the_blocks_of_each_stack_between_the_stacks_and_before_the_final_norms():
    torch.manual_seed(0)
    profile = _profile(transformers.T5ForConditionalGeneration(t5_config(num_layers=3, num_decoder_layers=4,
                                                                           dropout_rate=0.1)))
    names = [layer.name for layer in profile.layers]
    assert names[1:4] == ["encoder.block.0", "encoder.block.1", "encoder.block.2"]
    assert profile.cut_points == _expected_cuts(names)
    assert names[profile.cut_points[2]] == "encoder.final_layer_norm"
    assert names[profile.cut_points[3]] == "decoder.embed_tokens"


def test_a_measured_cpu_profile_of_t5_times_every_layer_and_counts_as_the_meta_one():
    import profiler

    torch.manual_seed(0)
    measured = profiler.profile(t5(), t5_batch(2), device="cpu", cache=False, warmup=0, repeats=1)
    assert measured.step is not None and measured.step.fwd_bwd_seconds > 0
    assert all(x.fwd_seconds is not None and x.bwd_seconds is not None for x in measured.layers)
    meta = _t5_profile()
    assert [(x.name, x.fwd_flops, x.tp) for x in measured.layers] == [(x.name, x.fwd_flops, x.tp) for x in meta.layers]
    assert measured.cut_points == meta.cut_points and measured.edges == meta.edges


def test_every_tensor_crossing_a_t5_cut_is_counted():
    from planner.graph import cut_bytes
    from profiler.partition import partition

    batch = 2  # the profiled batch (`_t5_profile`)
    model, profile, names = t5(), _t5_profile(), _t5_names()
    f32, i64 = 4, 8
    enc_hidden, dec_hidden = ENC_LEN * D * f32, DEC_LEN * D * f32
    ids = DEC_LEN * i64
    enc_bias, dec_bias = HEADS * ENC_LEN**2 * f32 / batch, HEADS * DEC_LEN**2 * f32 / batch  # [1, H, T, T] per sample
    expected = {
        "encoder.block.1": enc_hidden + enc_bias + ids,
        "encoder.final_layer_norm": enc_hidden + ids,
        "decoder.embed_tokens": enc_hidden + ids,  # the encoder's output and the decoder's input ids
        "decoder.block.1": dec_hidden + dec_bias + enc_hidden,
        "decoder.final_layer_norm": dec_hidden,
    }
    assert [names[k] for k in profile.cut_points] == list(expected)
    sizes = cut_bytes(profile)
    assert {names[k]: sizes[k] for k in profile.cut_points} == expected
    part = partition(model, names, (), t5_batch(batch))
    assert {names[k]: c.nbytes for k, c in part.cuts.items()} == {n: b * batch for n, b in expected.items()}


def test_each_stage_holds_only_the_layers_it_runs_and_the_shared_embedding_where_used():
    from profiler.partition import partition

    torch.manual_seed(0)
    model = t5()
    names = _t5_names()
    stages = partition(model, names, (), t5_batch(2)).stage_modules(model, [2, 4, 7])
    params = [{n for n, _ in s.named_parameters()} for s in stages]
    # Tied to encoder.embed_tokens, decoder.embed_tokens and lm_head: held where one of them runs.
    assert ["shared.weight" in p for p in params] == [True, False, True, True]
    assert params[1] == {n for n, _ in model.named_parameters()
                         if n.startswith(("encoder.block.1.", "encoder.final_layer_norm."))}
    assert params[2] == {"shared.weight"} | {n for n, _ in model.named_parameters() if n.startswith("decoder.block.")}
    assert params[3] == {"shared.weight", "decoder.final_layer_norm.weight"}


def test_t5_with_tensor_and_pipeline_parallelism_together_is_refused_before_any_rank_starts():
    from executor import pipeline
    from executor.apply import _to_meta
    from executor.errors import ExecutorError
    from planner.strategy import StageSpec

    torch.manual_seed(0)
    model, profile = t5(), _t5_profile()
    n = profile.num_layers
    stages = [StageSpec(start=0, stop=4), StageSpec(start=4, stop=n)]
    traced = _to_meta(model, t5_batch(2))  # as apply_plan traces the batch the run trains on
    assert pipeline.check_pipelinable(model, profile, stages, tp=1, example_inputs=traced).legal_cuts == \
        profile.cut_points
    with pytest.raises(ExecutorError, match="plan with tp=1 or pp=1") as err:
        pipeline.check_pipelinable(model, profile, stages, tp=2, example_inputs=traced)
    assert "\n" not in str(err.value)


class _ScaledT5(transformers.T5ForConditionalGeneration if transformers else object):
    """A T5 whose own forward scales the encoder's input embeddings: glue the stage programs do not run."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        return super().forward(inputs_embeds=self.shared(input_ids) * 2.0, labels=labels, **kwargs)


def test_a_t5_whose_forward_differs_from_t5s_gets_no_cuts_with_the_reason():
    from profiler.partition import partition

    torch.manual_seed(0)
    model = _ScaledT5(t5_config())
    names = _t5_names()
    part = partition(model, names, (), t5_batch(2))
    assert part.legal_cuts == []
    assert "_ScaledT5" in part.why_illegal(2) and "pp=1" in part.why_illegal(2)


def test_a_t5_batch_without_labels_or_decoder_inputs_gets_no_cuts():
    from profiler.partition import partition

    model = t5()
    names = _t5_names()
    part = partition(model, names, (), {"input_ids": t5_batch(2)["input_ids"]})
    assert part.legal_cuts == [] and "labels" in part.why_illegal(2)


# --- pipelined training: pp=2 trains exactly the single-process T5 ------------------------------------------------

CASES = {  # cut before encoder.block.1, at the boundary between the stacks, before decoder.block.1
    "encoder_gpipe": {"cuts": (2,), "schedule": "gpipe"},
    "boundary_1f1b": {"cuts": (4,), "schedule": "1f1b", "num_micro_batches": 4, "micro_batch_size": 1},
    "decoder_1f1b": {"cuts": (6,), "schedule": "1f1b"},
}


def _reference(st) -> tuple[list[float], dict[str, torch.Tensor]]:
    from executor.init import build_initialized

    net = build_initialized(t5, seed=sup.SEED)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    nmb, losses = st.num_micro_batches, []
    for step in range(STEPS):
        total = 0.0
        full = t5_batch(st.global_batch_size, step)
        for i in range(nmb):  # equal-length micro-batches: the whole batch's mean loss is their mean
            loss = net(**{k: v.chunk(nmb)[i] for k, v in full.items()}).loss
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
        pm = apply_plan(st, t5, profile, device=device, seed=sup.SEED, example_inputs=t5_batch(st.micro_batch_size))
        opts = [torch.optim.SGD(p.parameters(), lr=LR) for p in pm.parts]
        losses[name] = []
        for step in range(STEPS):
            local = pm.forward_backward(pm.local_batch(t5_batch(st.global_batch_size, step)))
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
def test_pp2_trains_the_single_process_t5_losses_and_parameters(tmp_path):
    from planner.strategy import Strategy

    profile = _t5_profile()
    assert profile.cut_points == [2, 3, 4, 6, 7]
    cases = {name: sup.strategy(pp=2, num_layers=profile.num_layers, **kw).model_dump(mode="json")
             for name, kw in CASES.items()}
    out = tmp_path / "out.json"
    sup.run_workers(__file__, 2, {"profile": profile.model_dump(mode="json"), "cases": cases},
                    tmp_path / "cases.json", out, timeout=180)
    got = json.loads(out.read_text())
    for name, spec in cases.items():
        ref_losses, ref_params = _reference(Strategy.model_validate(spec))
        assert max(abs(a - b) for a, b in zip(got[name], ref_losses, strict=True)) <= TOL, (name, got[name])
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in (0, 1)]
        # The tied embedding / head is on both stages; its copies must have stayed equal.
        torch.testing.assert_close(ranks[0]["shared.weight"], ranks[1]["shared.weight"], rtol=0, atol=0)
        params = {**ranks[0], **ranks[1]}
        assert sorted(params) == sorted(ref_params)
        for n, p in params.items():
            torch.testing.assert_close(p, ref_params[n], rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
