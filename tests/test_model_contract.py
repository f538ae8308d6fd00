"""One factory contract for every command, and Hugging Face models with their own loss, end to end.

- A factory returning `(module, example_inputs, loss_fn, targets)` gives one profile hash in `autopar profile`,
  `autopar plan`, Python `plan()` (by reference and as a module) and `autopar run --model` (2 gloo processes), whose
  losses are the single-process model's.
- A transformers model given `labels` is profiled with the loss it computes from them (`profiler.hf.LabelsLoss`, equal
  to the model's own `.loss`), and `hf:examples/hf_llama_tiny.json` profiles, plans and runs (dp=2) from the CLI.
- T5's encoder and decoder blocks are layers although each stack's first block holds the relative position bias.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_resolve import _cli, _own_cache  # noqa: F401 - the CLI helper and the autouse per-test profile cache
from typer.testing import CliRunner

import planner
from api.cli import app
from planner.cluster import load_cluster
from planner.model_profile import ModelProfile
from planner.strategy import Plan

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CONFIG = ROOT / "examples" / "hf_llama_tiny.json"
LR, STEPS, GLOBAL_BATCH = 0.1, 2, 8

# A model file in the profiler's form: the factory returns the module, one example micro-batch, the loss and targets.
TUPLE_FACTORY = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def model(width=16):
        net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))
        return net, (torch.randn(4, 8),), F.cross_entropy, torch.randint(0, 3, (4,))
""")


def _run(tmp: Path, plan_file: Path, model: str) -> tuple[list[float], str]:
    """`autopar run PLAN --model MODEL` on this machine's processes (SGD, synthetic data): losses and output."""
    report = tmp / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", str(plan_file), "--model", model, "--steps", str(STEPS),
         "--optimizer", "sgd", "--lr", str(LR), "--report", str(report)],
        cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=150,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    data = json.loads(report.read_text())
    assert data["world_size"] == 2
    return [s["loss"] for s in data["steps"]], output


def _single_process_losses(model: str) -> list[float]:
    """The same training on one process: the run's initial weights and synthetic global batches, whole."""
    from executor.init import build_initialized
    from executor.sources import resolve_model

    m = resolve_model(model)
    net = build_initialized(m.build, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        inputs, targets = m.synthetic_batch(GLOBAL_BATCH, seed=step)
        out = net(**inputs) if isinstance(inputs, dict) else net(*inputs)
        loss = m.loss(out, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# --- one factory contract ------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_factory_returning_module_inputs_and_loss_has_one_profile_hash_in_profile_plan_python_and_run(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(TUPLE_FACTORY)
    ref = f"{source}:model"
    prof, plan_file = tmp_path / "p.json", tmp_path / "plan.json"
    profiled = _cli("profile", ref, "--cluster", "cpu", "--out", str(prof))
    _cli("plan", ref, "--cluster", "cpu", "--gpus-per-node", "2", "--global-batch", str(GLOBAL_BATCH),
         "--time-limit", "2", "--out", str(plan_file))
    two_cpus = load_cluster("cpu", gpus_per_node=2)
    by_reference = planner.plan(ref, two_cpus, global_batch_size=GLOBAL_BATCH, time_limit_s=2)
    spec = importlib.util.spec_from_file_location("users_own_net", source)  # the user's own import of the file
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    module, inputs, _loss, _targets = net.model()
    as_module = planner.plan(module, two_cpus, global_batch_size=GLOBAL_BATCH, example_inputs=inputs, time_limit_s=2)

    want = ModelProfile.from_json(prof).profile_hash
    assert "loss cross_entropy counted" in " ".join(profiled.split())
    plan = Plan.from_json(plan_file)
    assert {plan.provenance.profile_hash, by_reference.provenance.profile_hash,
            as_module.provenance.profile_hash} == {want}
    assert plan.strategy.dims.world_size == 2
    # `autopar run` refuses a plan whose profile hash differs from the model's, so a run proves the same hash.
    losses, _ = _run(tmp_path, plan_file, ref)
    assert max(abs(a - b) for a, b in zip(losses, _single_process_losses(ref), strict=True)) <= 1e-5


def test_a_run_draws_a_tuple_factorys_example_at_every_batch_size_with_its_loss_and_targets(tmp_path):
    from executor.sources import UserModel, resolve_model

    fixed, sized = tmp_path / "fixed.py", tmp_path / "sized.py"
    fixed.write_text(TUPLE_FACTORY)
    sized.write_text(TUPLE_FACTORY.replace("def model(width=16):", "def model(width=16, batch_size=1):")
                     .replace("(4, 8)", "(batch_size, 8)").replace("(4,)", "(batch_size,)"))
    for path in (fixed, sized):
        m = resolve_model(f"{path}:model", {"width": 5})
        assert isinstance(m, UserModel) and m.loss_fn is torch.nn.functional.cross_entropy
        inputs, targets = m.example_batch(6)
        assert inputs[0].shape == (6, 8) and targets.shape == (6,) and targets.dtype == torch.int64
        assert int(targets.min()) >= 0 and int(targets.max()) <= 2  # drawn in the example's range
        net = m.build()
        assert net[0].out_features == 5  # the option reached the factory
        assert torch.equal(m.loss(net(*inputs), targets), torch.nn.functional.cross_entropy(net(*inputs), targets))
        again, _ = m.synthetic_batch(6, seed=3)
        assert torch.equal(again[0], m.synthetic_batch(6, seed=3)[0][0])


def test_a_run_of_a_tuple_factory_that_raises_is_one_line_naming_the_fix(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("def model(width=16):\n    raise RuntimeError('no GPU here')\n")
    r = CliRunner().invoke(app, ["run", "--plan-first", f"{source}:model", "--global-batch", "4"])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "fix the factory" in r.output, r.output


# --- Hugging Face: the loss from labels -----------------------------------------------------------------------------

def _hf_models() -> dict[str, torch.nn.Module]:
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_hf_models as hf_tests

    t5 = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                               pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return {"gpt2": hf_tests.gpt2(), "llama": hf_tests.llama(), "bert": hf_tests.bert(),
            "mixtral": hf_tests.mixtral(), "t5": transformers.T5ForConditionalGeneration(t5)}


def test_the_loss_counted_from_labels_is_the_models_own_loss():
    from profiler import hf

    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for name, model in _hf_models().items():
        model.eval()
        own = model(input_ids=ids, labels=ids).loss
        inputs, loss, labels = hf.labels_as_targets(model, _positional(model, ids))
        assert loss is not None and labels is ids, name
        out = model(*inputs)
        assert torch.allclose(loss(out, labels), own, atol=1e-6), name
        assert torch.allclose(loss(out.logits, labels), own, atol=1e-6), name  # as the head's output
    model = _hf_models()["mixtral"]
    model.config.output_router_logits = True  # an auxiliary loss the logits do not give: not counted
    assert hf.labels_loss(model) is None


def _positional(model: torch.nn.Module, ids: torch.Tensor) -> tuple:
    from profiler.partition import positional_inputs

    return positional_inputs(model, {"input_ids": ids, "labels": ids})


def test_a_causal_lm_given_labels_is_profiled_with_its_loss_in_the_head():
    import profiler

    llama = _hf_models()["llama"]
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with_labels = profiler.profile(llama, {"input_ids": ids, "labels": ids}, cache=False)
    without = profiler.profile(llama, {"input_ids": ids}, cache=False)
    head, plain = with_labels.layers[-1], without.layers[-1]
    assert head.name == "lm_head" and [t.shape for t in with_labels.input.tensors] == [[2, 8]]
    # The cross-entropy keeps float32 log-probabilities of every logit (8 tokens x 64 entries x 4 bytes a sample).
    assert head.saved_activation_bytes - plain.saved_activation_bytes >= 8 * 64 * 4
    # FLOPs count matmuls only; the loss's softmax shows as memory traffic and kernels.
    assert head.fwd_bytes > plain.fwd_bytes and head.fwd_kernels > plain.fwd_kernels
    assert [x.fwd_flops for x in with_labels.layers[:-1]] == [x.fwd_flops for x in without.layers[:-1]]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_hf_llama_config_profiles_plans_and_runs_from_the_cli_with_its_loss(tmp_path):
    pytest.importorskip("transformers")
    ref = f"hf:{LLAMA_CONFIG}"
    plan_file = tmp_path / "plan.json"
    profiled = " ".join(_cli("profile", ref, "--cluster", "cpu", "--seq-len", "32").split())
    assert "loss ForCausalLMLoss counted in the last layer" in profiled and "Traceback" not in profiled
    planned = _cli("plan", ref, "--cluster", "cpu", "--gpus-per-node", "2", "--global-batch", str(GLOBAL_BATCH),
                   "--seq-len", "32", "--time-limit", "2", "--out", str(plan_file))
    assert "Traceback" not in planned
    plan = Plan.from_json(plan_file)
    assert (plan.strategy.dims.dp, plan.strategy.dims.tp, plan.strategy.dims.pp) == (2, 1, 1)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", str(plan_file), "--model", ref, "--option", "seq_len=32",
         "--steps", str(STEPS), "--optimizer", "sgd", "--lr", str(LR), "--report", str(report)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=150,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    losses = [s["loss"] for s in json.loads(report.read_text())["steps"]]
    from executor.init import build_initialized
    from executor.sources import resolve_model

    m = resolve_model(ref, {"seq_len": 32})
    net = build_initialized(m.build, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step, got in enumerate(losses):
        inputs, _ = m.synthetic_batch(GLOBAL_BATCH, seed=step)
        loss = net(**inputs).loss
        assert abs(loss.item() - got) <= 1e-5, (step, loss.item(), got)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("argv", "word"), [
    (["plan", f"hf:{LLAMA_CONFIG}", "--cluster", "cpu", "--global-batch", "4", "--seq-len", "4096"],
     "max_position_embeddings"),
    (["profile", f"hf:{LLAMA_CONFIG}", "--option", "num_layerz=2"], "num_hidden_layers=2"),
    (["run", "--plan-first", "hf:no/such/config.json", "--global-batch", "4"], "hf:path/to/config.json"),
], ids=["seq-len-past-positions", "unknown-config-field", "missing-config"])
def test_an_hf_mistake_is_one_line_naming_the_fix(argv, word):
    pytest.importorskip("transformers")
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and word in r.output, r.output


# --- T5: blocks of both stacks are layers --------------------------------------------------------------------------

def test_t5_encoder_and_decoder_blocks_are_layers_with_exact_parameters_and_block_flops():
    import profiler

    t5 = _hf_models()["t5"]
    s, d, inner, ff, heads, dkv, buckets, v = 8, 32, 32, 64, 4, 8, 8, 64
    ids = torch.randint(1, v, (2, s), generator=torch.Generator().manual_seed(0))
    p = profiler.profile(t5, {"input_ids": ids, "labels": ids}, cache=False)
    assert [x.name for x in p.layers] == [
        "encoder.embed_tokens", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
        "decoder.embed_tokens", "decoder.block.0", "decoder.block.1", "decoder.final_layer_norm", "lm_head"]
    attention = 4 * d * inner + d  # q, k, v, o and the layer's norm
    mlp = 2 * d * ff + d
    bias = buckets * heads  # the first block of each stack only
    closed = (v * d + (attention + mlp) * 2 + bias + d  # encoder (embedding shared by both stacks and the head)
              + (2 * attention + mlp) * 2 + bias + d)  # decoder: self- and cross-attention
    assert sum(x.param_count for x in p.layers) == closed == t5.num_parameters()
    by_name = {x.name: x for x in p.layers}
    assert by_name["encoder.block.0"].param_count - by_name["encoder.block.1"].param_count == bias
    core = 2 * 2 * s * s * dkv * heads  # QK^T and scores x V over S x S
    assert by_name["encoder.block.1"].fwd_flops == pytest.approx(2 * s * d * 4 * inner + 2 * s * d * ff * 2 + core,
                                                                 rel=0.03)
    assert by_name["decoder.block.1"].fwd_flops == pytest.approx(
        2 * (2 * s * d * 4 * inner) + 2 * s * d * ff * 2 + 2 * core, rel=0.03)
