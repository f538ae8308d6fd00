"""Vocabulary-parallel embedding and output head: found by the profiler, costed by the planner, run by the executor.

The multi-process cases are one 2-rank torchrun launch (this file is also the worker program) and one 4-rank launch;
each case's losses are compared with a single-process run of the same global batch (tests/executor_support.py).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

TOL = 1e-5
#: gpt-tiny with an odd vocabulary: 257 rows split 129 / 128 over two ranks.
UNEVEN = ("gpt-tiny", (("vocab_size", 257),))
#: name -> (model, Strategy keyword arguments, loss: "zoo" = the zoo model's loss, "wrapped" = a lambda around it)
TWO_RANK = {
    "untied_tp2": (("gpt-tiny", ()), {"tp": 2}, "zoo"),
    "tied_tp2_full_recompute": (sup.TIED, {"tp": 2, "num_layers": 4, "recompute": "full"}, "zoo"),
    "uneven_vocab_tp2": (UNEVEN, {"tp": 2}, "zoo"),
    "unknown_loss_gathers_logits_tp2": (("gpt-tiny", ()), {"tp": 2}, "wrapped"),
}
#: dp x tp with an untied head runs in tests/test_executor_dist.py (dp2xtp2_fsdp); 4 ranks cost ~30 s on 2 cores.
FOUR_RANK: dict = {}


# --- profiler --------------------------------------------------------------------------------------------------


@functools.cache
def _gpt2(tied: bool = True):
    import profiler

    return profiler.profile_zoo("gpt2-small", num_layers=1, seq_len=16, max_positions=16, tie_embeddings=tied,
                                cache=False)


def _styles(layer) -> list[tuple[str, str]]:
    return [] if layer.tp is None else [(s.module, s.style.value) for s in layer.tp.shards]


def test_profiler_marks_gpt2_token_embedding_rowwise_and_tied_head_colwise():
    prof = _gpt2()
    embed, head = prof.layers[0], prof.layers[-1]
    assert _styles(embed) == [("wte", "vocab_rowwise")]  # not the position embedding wpe
    assert _styles(head) == [("lm_head", "vocab_colwise")]
    v, h = 50257, 768
    assert embed.tp.sharded_param_count == v * h  # the embedding owns the tied weight
    assert head.tp.sharded_param_count == 0 and head.shared_param_count == v * h
    # 50257 is odd (and prime to 3 and 8): uneven splits are allowed, so tp = 2, 3, 8 all work; no shard is empty.
    assert all(embed.tp.allows(t) and head.tp.allows(t) for t in (2, 3, 8))
    assert embed.tp.uneven_max == head.tp.uneven_max == 50257 and not embed.tp.allows(50258)


def test_profiler_marks_user_model_with_tied_head_and_layers_that_are_the_modules():
    import torch

    import profiler
    from tests.user_models import SEQ, VOCAB, FusedGPT

    prof = profiler.profile(FusedGPT(), (torch.zeros(2, SEQ, dtype=torch.long),), cache=False)
    by_name = {layer.name: layer for layer in prof.layers}
    assert _styles(by_name["wte"]) == [("", "vocab_rowwise")]
    assert by_name["wpe"].tp is None  # a learned position embedding stays replicated
    assert _styles(by_name["lm_head"]) == [("", "vocab_colwise")]
    assert by_name["lm_head"].tp.sharded_param_count == 0
    assert by_name["wte"].tp.sharded_param_count == VOCAB * 16


def test_a_head_whose_bias_is_shared_with_another_module_stays_whole():
    """BERT's decoder bias is `cls.predictions.bias`: splitting the head would split that parameter in one place
    only, so the head is left whole (the embedding is still split)."""
    import torch
    from torch import nn

    import profiler

    class SharedBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.mid = nn.Linear(16, 16)
            self.head = nn.Linear(16, 64)
            self.bias = nn.Parameter(torch.zeros(64))
            self.head.bias = self.bias  # tied as transformers ties BertLMPredictionHead.decoder.bias

        def forward(self, ids):
            return self.head(torch.relu(self.mid(self.embed(ids))))

    prof = profiler.profile(SharedBias(), (torch.zeros(2, 8, dtype=torch.long),), cache=False)
    styles = {x.name: [s.style.value for s in x.tp.shards] if x.tp else [] for x in prof.layers}
    assert styles["embed"] == ["vocab_rowwise"]
    assert styles["head"] == []


def test_head_per_rank_parameters_and_logits_activation_split_by_tp8():
    from planner.cost import device_param_count
    from planner.memory import estimate_layer_activation_bytes
    from planner.strategy import Recompute

    prof = _gpt2(tied=False)
    head = prof.layers[-1]
    v, h, s = 50257, 768, 16
    # ln_f (weight + bias) stays whole; the vocabulary projection is split eight ways.
    assert device_param_count(head, 8) == pytest.approx(2 * h + v * h / 8)
    # Saved for backward, per sample: ln_f's input and the Linear's input (whole on every rank), ln_f's mean and
    # rstd, and the log-softmax of the logits (s x V fp32), which is split; the targets come from the input.
    assert head.output_bytes == s * v * 4
    act = estimate_layer_activation_bytes(head, tp=8, micro_batch=1, recompute=Recompute.NONE)
    whole = 2 * s * h * 4
    assert whole + s * v * 4 / 8 <= act <= whole + s * v * 4 / 8 + 2 * s * 4 + 64
    full = estimate_layer_activation_bytes(head, tp=1, micro_batch=1, recompute=Recompute.NONE)
    assert full >= whole + s * v * 4


def test_head_compute_splits_by_tp():
    from planner.cluster import load_cluster
    from planner.cost import estimate_layer_compute
    from planner.model_profile import DType

    head = _gpt2(tied=False).layers[-1]
    cluster = load_cluster("dgx-a100-80gb")
    times = [estimate_layer_compute(head, cluster, DType.FP32, tp=t, micro_batch=8, recompute="none",
                                    measured=False) for t in (1, 8)]
    # The head is almost all vocabulary GEMM and logits traffic: eight ranks take well under a quarter of the time.
    assert times[1].fwd < times[0].fwd / 4 and times[1].bwd < times[0].bwd / 4


# --- executor: where the logits stay split -----------------------------------------------------------------------


def test_logits_stay_split_only_for_a_known_cross_entropy_without_pipelining(caplog):
    from executor.vocab_parallel import logits_layout
    from profiler.zoo import get_model
    from profiler.zoo.gpt import gpt_loss

    prof = sup.tiny_profile()
    zoo = get_model("gpt-tiny")
    split = functools.partial(logits_layout, prof, tp=2, micro_batch=4, compute_dtype=None)
    assert split(gpt_loss, pp=1) and split(zoo.loss, pp=1)
    with caplog.at_level(logging.WARNING, logger="executor.vocab_parallel"):
        assert not split(lambda out, t: gpt_loss(out, t), pp=1)
        assert not split(None, pp=1)
        assert not split(gpt_loss, pp=2)
    # The warning names the extra memory: 4 samples x 32 x 512 fp32 logits, half of them gathered = 0.1 MiB.
    assert len(caplog.records) == 3 and all("0.1 MiB" in r.getMessage() for r in caplog.records)
    marked = lambda out, t: gpt_loss(out, t)
    marked.autopar_loss_parallel = True
    assert split(marked, pp=1)


# --- executor: multi-process -------------------------------------------------------------------------------------


def _worker(cases_path: str, out_path: str) -> None:
    """Run every case on this rank; rank 0 writes {case: {"losses": [...], ...}}."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from executor import apply_plan, init_distributed, train
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy
    from profiler.zoo import get_model

    payload = json.loads(Path(cases_path).read_text())
    device = init_distributed("cpu")
    results = {}
    for name, case in payload["cases"].items():
        model, options = case["model"]
        zoo = get_model(model, **dict(options))
        st = Strategy.model_validate(case["strategy"])
        profile = ModelProfile.model_validate(case["profile"])
        loss = zoo.loss if case["loss"] == "zoo" else (lambda out, t, zoo=zoo: zoo.loss(out, t))
        pm = apply_plan(st, functools.partial(zoo.build, "meta"), profile, loss_fn=loss, device=device,
                        seed=sup.SEED)
        part = pm.parts[0]
        emb = part.get_submodule(f"{profile.layers[0].name}.wte").weight
        head = part.get_submodule(f"{profile.layers[-1].name}.lm_head").weight
        info = {"loss_parallel": pm.loss_parallel, "tied": emb is head,
                "emb_local_rows": (emb.to_local() if isinstance(emb, DTensor) else emb).shape[0]}
        opts = [torch.optim.SGD(p.parameters(), lr=sup.LR) for p in pm.parts]
        info["losses"] = [r.loss for r in train(pm, opts, lambda step, batch, zoo=zoo: zoo.synthetic_batch(
            batch, seed=sup.DATA_SEED + step), steps=sup.STEPS)]
        results[name] = info
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    teardown()


def _launch(nproc: int, cases: dict, tmp: Path) -> dict:
    payload = {"cases": {
        name: {"model": list(model), "strategy": sup.strategy(**kw).model_dump(mode="json"), "loss": loss,
               "profile": sup.tiny_profile(*model).model_dump(mode="json")}
        for name, (model, kw, loss) in cases.items()
    }}
    cases_path, out_path = tmp / f"cases{nproc}.json", tmp / f"out{nproc}.json"
    sup.run_workers(__file__, nproc, payload, cases_path, out_path, timeout=150)
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vocab")
    return _launch(2, TWO_RANK, tmp) | (_launch(4, FOUR_RANK, tmp) if FOUR_RANK else {})


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted([*TWO_RANK, *FOUR_RANK]))
def test_vocab_parallel_training_loss_equals_single_process(runs, case):
    (model, options), kw, loss = (TWO_RANK | FOUR_RANK)[case]
    got = runs[case]
    st = sup.strategy(**kw)
    ref = sup.reference_losses(st.global_batch_size, model=model, options=options)
    assert max(abs(a - b) for a, b in zip(got["losses"], ref, strict=True)) <= TOL, (got["losses"], ref)
    # The layout really was vocabulary-parallel: the embedding holds its share of the rows on each rank.
    vocab = dict(options).get("vocab_size", dict(sup.TIED[1])["vocab_size"] if model == sup.TIED[0] else 512)
    rows = -(-vocab // st.dims.tp)
    if st.zero_stage >= 1 and st.dims.dp > 1:  # FSDP also splits the rows over the dp axis
        rows = -(-rows // st.dims.dp)
    assert got["emb_local_rows"] == rows
    assert got["loss_parallel"] == (loss == "zoo")
    if model == sup.TIED[0]:
        assert got["tied"]  # embedding and head still share one tensor after parallelize_module


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
