"""`autopar evaluate`: trainer configurations read back into autopar strategies and scored against the best plan.

Round trips: a plan exported for Megatron-LM, torchtitan (overrides and TOML) and DeepSpeed reads back as the same
strategy with the same predicted step time. A hand-written Megatron-LM launch script gives the degrees it names. The
CLI explains a deliberately bad configuration by its bubble, and user mistakes are one line with exit code 2. No
torch: the plans come from a formula profile.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from api.cli import app
from planner import evaluate, plan
from planner.cluster import load_cluster
from planner.export import export_plan
from planner.gpt_formula import gpt_profile
from planner.import_configs import ImportConfigError, parse_config
from planner.import_strategy import to_strategy
from planner.strategy import Plan, Prediction, Recompute, Schedule, Strategy, ZeroStage

PROFILE = gpt_profile(num_layers=8, hidden=1024, heads=16, seq_len=512, vocab_size=1000, dtype="bfloat16")
CLUSTER = load_cluster("dgx-a100-80gb")
BATCH = 32


def _hybrid(zero: int) -> Plan:
    result = plan(PROFILE, CLUSTER, global_batch_size=BATCH, tp_degrees=(2,), pp_degrees=(2,),
                  schedules=(Schedule.INTERLEAVED_1F1B,), virtual_stages=(2,), recompute=(Recompute.FULL,),
                  zero_stages=(zero,), time_limit_s=5)
    s = result.strategy
    assert (s.dims.dp, s.dims.tp, s.dims.pp, s.virtual_stages, s.recompute, int(s.zero_stage)) == (
        2, 2, 2, 2, Recompute.FULL, zero)
    return result


@pytest.fixture(scope="module")
def hybrid_zero1() -> Plan:
    """What Megatron-LM can express: dp x tp x pp, interleaved, full recompute, distributed optimizer (ZeRO-1)."""
    return _hybrid(1)


@pytest.fixture(scope="module")
def hybrid_zero3() -> Plan:
    """What torchtitan can express: the same with FSDP2 (ZeRO-3) on the data-parallel axis."""
    return _hybrid(3)


def _read_back(p: Plan, target: str, fmt: str | None, source: str) -> tuple[Strategy, list[str]]:
    settings = parse_config(source, export_plan(p, target, fmt).text, world_size=CLUSTER.world_size)
    imported = to_strategy(settings, PROFILE, global_batch_size=p.strategy.global_batch_size)
    return imported.strategy, imported.notes


def _assert_same(strategy: Strategy, p: Plan) -> None:
    s = p.strategy
    assert strategy.dims == s.dims
    assert (strategy.zero_stage, strategy.micro_batch_size, strategy.num_micro_batches, strategy.schedule,
            strategy.virtual_stages, strategy.recompute, strategy.mesh_order) == (
        s.zero_stage, s.micro_batch_size, s.num_micro_batches, s.schedule, s.virtual_stages, s.recompute, s.mesh_order)
    assert strategy.stages == s.stages
    predicted = evaluate(PROFILE, CLUSTER, strategy).step_seconds
    assert predicted == pytest.approx(p.prediction.step_seconds, rel=1e-9, abs=0)


def test_megatron_export_reads_back_as_the_plans_strategy_and_step_time(hybrid_zero1):
    strategy, notes = _read_back(hybrid_zero1, "megatron", None, "megatron-args")
    _assert_same(strategy, hybrid_zero1)
    assert notes == []  # --bf16 matches the profile, nothing assumed


@pytest.mark.parametrize("fmt", ["args", "toml"])
def test_torchtitan_export_reads_back_as_the_plans_strategy_and_step_time(hybrid_zero3, fmt):
    strategy, _ = _read_back(hybrid_zero3, "torchtitan", fmt, "torchtitan")
    _assert_same(strategy, hybrid_zero3)


def test_deepspeed_export_of_a_zero_plan_reads_back_and_names_its_own_zero3():
    zero = plan(PROFILE, CLUSTER, global_batch_size=BATCH, tp_degrees=(1,), pp_degrees=(1,), zero_stages=(3,),
                recompute=(Recompute.FULL,), time_limit_s=5)
    assert (zero.strategy.dims.dp, zero.strategy.zero_stage) == (8, ZeroStage.FULL)
    strategy, notes = _read_back(zero, "deepspeed", None, "ds-config")
    _assert_same(strategy, zero)
    assert any("FSDP2 cost model" in n for n in notes) and any("activation_checkpointing" in n for n in notes)


MEGATRON_README_SCRIPT = r"""#!/bin/bash
# Runs the "8-layer" parameter model (Megatron-LM README style)
GPUS_PER_NODE=8
NUM_NODES=4
DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
)
GPT_MODEL_ARGS=(
    --num-layers 8
    --hidden-size 1024
    --num-attention-heads 16
    --seq-length 512
)
TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 16
    --train-iters 500000
    --bf16
    --recompute-granularity full --recompute-method uniform
)
MODEL_PARALLEL_ARGS=(
	--tensor-model-parallel-size 8
	--pipeline-model-parallel-size 4
	--sequence-parallel
	--use-distributed-optimizer
)
torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \
    ${GPT_MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]}
"""


def test_hand_written_megatron_script_gives_its_degrees_and_names_what_it_ignores():
    cluster = load_cluster("dgx-a100-80gb", nodes=4)
    settings = parse_config("megatron-args", MEGATRON_README_SCRIPT, world_size=cluster.world_size)
    imported = to_strategy(settings, PROFILE, global_batch_size=16)
    s = imported.strategy
    assert (s.dims.dp, s.dims.tp, s.dims.pp) == (1, 8, 4)  # Megatron-LM: dp = 32 GPUs / (tp 8 x pp 4)
    assert (s.micro_batch_size, s.num_micro_batches, s.schedule, s.recompute, s.zero_stage) == (
        1, 16, Schedule.ONE_F_ONE_B, Recompute.FULL, ZeroStage.OPTIMIZER)
    # 8 transformer layers, 2 per stage; the embedding rides with the first stage and the head with the last.
    assert [(st.start, st.stop) for st in s.stages] == [(0, 3), (3, 5), (5, 7), (7, 10)]
    assert s.sequence_parallel  # --sequence-parallel is scored as such, not noted as unsupported
    assert {"--hidden-size", "--num-attention-heads", "--train-iters"} <= set(imported.ignored)
    assert evaluate(PROFILE, cluster, s).fits
    with pytest.raises(ImportConfigError, match="--num-layers 24 but .* has 8 transformer layers"):
        to_strategy(parse_config("megatron-args", MEGATRON_README_SCRIPT.replace("--num-layers 8", "--num-layers 24"),
                                 world_size=32), PROFILE, global_batch_size=16)


def _profile_file(tmp_path):
    path = tmp_path / "gpt.profile.json"
    PROFILE.to_json(path)
    return path


def _evaluate(tmp_path, kind: str, text: str, *extra: str):
    config = tmp_path / f"config.{kind}"
    config.write_text(text)
    return CliRunner().invoke(app, ["evaluate", str(_profile_file(tmp_path)), "--cluster", "dgx-a100-80gb",
                                    "--global-batch", str(BATCH), "--from", kind, str(config), "--time-limit", "5",
                                    *extra])


def test_cli_explains_a_too_deep_pipeline_by_its_bubble(tmp_path):
    bad = ("--tensor-model-parallel-size 1 --pipeline-model-parallel-size 8 --micro-batch-size 1 "
           f"--global-batch-size {BATCH} --bf16 --num-layers 8")
    out = tmp_path / "evaluation.json"
    r = _evaluate(tmp_path, "megatron-args", bad, "--json", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    team = Prediction.model_validate(data["team"]["prediction"])
    best = Plan.model_validate(data["best"]).prediction
    # The JSON's team prediction is what the cost model says about pp=8 (scored again here from the strategy).
    assert team == evaluate(PROFILE, CLUSTER, Strategy.model_validate(data["team"]["strategy"]))
    assert team.step_seconds > 1.05 * best.step_seconds and "best plan is predicted" in r.output
    lines = r.output.splitlines()
    why = lines.index(next(x for x in lines if x.startswith("why they differ")))
    first = lines[why + 1]
    assert first.split()[0] == "bubble" and "your pp=8 bubble" in first, r.output
    share = float(re.search(r"([+-][0-9.]+)% of your step:", first).group(1)) / 100
    expected = (team.time.bubble - best.time.bubble) / team.step_seconds
    assert share == pytest.approx(expected, abs=5e-5)  # printed to 0.01%
    assert data["differences"][0]["share_of_team_step"] == pytest.approx(expected, rel=1e-12)
    assert "memory per pipeline rank" in r.output and "GiB" in r.output


def test_cli_says_an_export_of_the_best_plan_is_as_good_as_the_best(tmp_path):
    best = plan(PROFILE, CLUSTER, global_batch_size=BATCH, time_limit_s=5)
    assert best.strategy.dims.tp == best.strategy.dims.pp == 1  # what ds_config expresses
    r = _evaluate(tmp_path, "ds-config", export_plan(best, "deepspeed").text)
    assert r.exit_code == 0, r.output
    assert "as good as autopar's best plan (within 1%)" in r.output


TITAN_BAD_FQN = """[parallelism]
pipeline_parallel_degree = 2
pipeline_parallel_schedule = "1F1B"
module_fqns_per_model_part = [["embed", "blocks.0", "blocks.1", "blocks.2"], ["blocks.3", "layers.4", "head"]]
[training]
local_batch_size = 8
"""


@pytest.mark.parametrize("kind, text, words", [
    ("torchtitan", TITAN_BAD_FQN, "names 'layers.4' (model part 1), which is not a layer"),
    ("megatron-args", "--tensor-model-parallel-size 3 --micro-batch-size 1", "= 3 does not divide the 8 GPUs"),
    ("ds-config", '{"train_micro_batch_size_per_gpu": 3}', "not a multiple of micro-batch 3 x dp 8"),
    ("megatron-args", "--micro-batch-size 1 --global-batch-size 64", "--global-batch-size is 64 but --global-batch"),
    ("ds-config", "{not json", "not valid JSON"),
])
def test_cli_refuses_a_configuration_it_cannot_score_in_one_line(tmp_path, kind, text, words):
    r = _evaluate(tmp_path, kind, text)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_refuses_a_missing_file_and_an_unknown_kind_in_one_line(tmp_path):
    for kind, path, words in (("megatron-args", tmp_path / "nope.sh", "does not exist"),
                              ("yaml", tmp_path, "--from takes megatron-args, ds-config or torchtitan")):
        r = CliRunner().invoke(app, ["evaluate", str(_profile_file(tmp_path)), "--cluster", "dgx-a100-80gb",
                                     "--global-batch", "8", "--from", kind, str(path)])
        assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_import_never_imports_torch():
    code = ("import sys, planner.import_configs, planner.import_strategy, api.cli_evaluate; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
