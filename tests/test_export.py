"""`autopar export`: a hybrid plan (dp x tp x pp, interleaved, recompute) as each trainer's configuration, parsed back.

The Megatron-LM and torchtitan argument lists are parsed with argparse parsers built here from the flag names those
projects document; JSON, YAML and TOML with their parsers (and DeepSpeed's / accelerate's own config classes when
importable). No torch: the plan comes from a formula profile.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex

import pytest
import tomllib
import yaml
from typer.testing import CliRunner

from api.cli import app
from planner import plan
from planner.cluster import load_cluster
from planner.evaluate import name_stages
from planner.export import ExportError, export_plan
from planner.gpt_formula import gpt_profile
from planner.strategy import MeshAxis, Plan, Recompute, Schedule, StageSpec, Strategy

PROFILE = gpt_profile(num_layers=8, hidden=1024, heads=16, seq_len=512, vocab_size=1000, dtype="bfloat16")


@pytest.fixture(scope="module")
def hybrid() -> Plan:
    result = plan(PROFILE, load_cluster("dgx-a100-80gb"), global_batch_size=32, tp_degrees=(2,), pp_degrees=(2,),
                  schedules=(Schedule.INTERLEAVED_1F1B,), virtual_stages=(2,), recompute=(Recompute.FULL,),
                  zero_stages=(1,), time_limit_s=5)
    s = result.strategy
    assert (s.dims.dp, s.dims.tp, s.dims.pp, s.virtual_stages, s.recompute) == (2, 2, 2, 2, Recompute.FULL)
    return result


def _with_strategy(base: Plan, **changes: object) -> Plan:
    """The plan with strategy fields replaced (validated again, layer names from the profile)."""
    strategy = Strategy.model_validate(base.strategy.model_dump() | changes)
    return Plan.model_validate(base.model_dump() | {"strategy": name_stages(strategy, PROFILE).model_dump(),
                                                    "kind": strategy.kind})


def _command_args(text: str) -> list[str]:
    """The words of the (backslash-continued) command in an exported text, comments dropped."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return shlex.split(body.replace("\\\n", " "))


def test_plan_names_each_stages_layers_and_its_model(hybrid):
    names = [x.name for x in PROFILE.layers]
    for stage in hybrid.strategy.stages:
        assert stage.layers == names[stage.start:stage.stop]
    for alt in hybrid.alternatives:
        assert all(st.layers for st in alt.strategy.stages)
    p = hybrid.provenance
    assert (p.model_name, p.dtype.value, p.seq_len) == (PROFILE.name, "bfloat16", 512)


def test_old_plans_without_layer_names_still_load_and_a_wrong_count_is_refused(hybrid):
    data = hybrid.model_dump(mode="json")
    for stage in data["strategy"]["stages"]:
        del stage["layers"]
    del data["provenance"]["seq_len"], data["provenance"]["model_options"]
    old = Plan.model_validate(data)
    assert all(st.layers == [] for st in old.strategy.stages)
    with pytest.raises(ExportError, match="module names"):
        export_plan(old, "torchtitan")
    with pytest.raises(ValueError, match="names 1 layers, 2 expected"):
        StageSpec(start=0, stop=2, layers=["embed"])


def _titan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    for name in ("data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
                 "pipeline_parallel_degree", "pipeline_parallel_microbatch_size"):
        ap.add_argument(f"--parallelism.{name}", type=int, dest=name)
    ap.add_argument("--parallelism.pipeline_parallel_schedule", dest="schedule",
                    choices=["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"])
    ap.add_argument("--parallelism.module_fqns_per_model_part", dest="fqns", type=json.loads)
    ap.add_argument("--parallelism.fsdp_reshard_after_forward", dest="reshard", choices=["default", "always", "never"])
    ap.add_argument("--training.local_batch_size", type=int, dest="local_batch_size")
    ap.add_argument("--training.global_batch_size", type=int, dest="global_batch_size")
    ap.add_argument("--training.seq_len", type=int, dest="seq_len")
    ap.add_argument("--training.mixed_precision_param", dest="precision", choices=["bfloat16", "float32"])
    ap.add_argument("--activation_checkpoint.mode", dest="ac", choices=["none", "selective", "full"])
    return ap


def test_torchtitan_overrides_and_toml_round_trip_every_degree(hybrid):
    s, d = hybrid.strategy, hybrid.strategy.dims
    a = _titan_parser().parse_args(_command_args(export_plan(hybrid, "torchtitan").text))
    assert a.data_parallel_replicate_degree * a.data_parallel_shard_degree == d.dp
    assert (a.tensor_parallel_degree, a.pipeline_parallel_degree) == (d.tp, d.pp)
    assert (a.schedule, a.pipeline_parallel_microbatch_size, a.ac) == ("Interleaved1F1B", s.micro_batch_size, "full")
    assert len(a.fqns) == d.pp * s.virtual_stages and a.fqns == [st.layers for st in s.stages]
    assert a.local_batch_size // a.pipeline_parallel_microbatch_size == s.num_micro_batches
    assert a.global_batch_size == a.local_batch_size * d.dp == s.global_batch_size
    assert (a.seq_len, a.precision) == (512, "bfloat16")
    toml = tomllib.loads(export_plan(hybrid, "torchtitan", "toml").text)
    assert toml["parallelism"]["module_fqns_per_model_part"] == a.fqns
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "data_parallel_shard_degree"):
        assert toml["parallelism"][key] == getattr(a, key)
    assert toml["activation_checkpoint"]["mode"] == "full"


def _megatron_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers",
                 "--num-layers-per-virtual-pipeline-stage", "--micro-batch-size", "--global-batch-size",
                 "--seq-length", "--recompute-num-layers", "--decoder-first-pipeline-num-layers",
                 "--decoder-last-pipeline-num-layers"):
        ap.add_argument(flag, type=int)
    ap.add_argument("--recompute-granularity", choices=["full", "selective"])
    ap.add_argument("--recompute-method", choices=["uniform", "block"])
    for flag in ("--use-distributed-optimizer", "--sequence-parallel", "--bf16", "--fp16", "--use-tp-pp-dp-mapping"):
        ap.add_argument(flag, action="store_true")
    return ap


def _megatron(p: Plan) -> tuple[argparse.Namespace, int, list[str]]:
    """Megatron's parsed arguments, the world size its torchrun line launches, and the warnings."""
    result = export_plan(p, "megatron")
    words = _command_args(result.text)
    assert words[:5] == ["torchrun", "--nnodes", words[2], "--nproc-per-node", words[4]]
    assert words[5] == "pretrain_gpt.py"
    return _megatron_parser().parse_args(words[6:]), int(words[2]) * int(words[4]), result.warnings


def test_megatron_arguments_round_trip_every_degree(hybrid):
    s, d = hybrid.strategy, hybrid.strategy.dims
    a, world, warnings = _megatron(hybrid)
    dp = world // (a.tensor_model_parallel_size * a.pipeline_model_parallel_size)  # how Megatron derives it
    assert (dp, a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (d.dp, d.tp, d.pp)
    assert a.num_layers == 8 and a.num_layers // (a.num_layers_per_virtual_pipeline_stage * d.pp) == s.virtual_stages
    assert a.global_batch_size // (a.micro_batch_size * dp) == s.num_micro_batches
    assert (a.recompute_granularity, a.recompute_method, a.use_distributed_optimizer, a.bf16) == (
        "full", "uniform", True, True)
    assert a.sequence_parallel == s.sequence_parallel  # set exactly when the plan runs sequence-parallel
    assert not any("unequal" in w for w in warnings)


def test_megatron_warns_on_unequal_stages_and_sets_first_and_last(hybrid):
    uneven = [StageSpec(start=0, stop=4), StageSpec(start=4, stop=6), StageSpec(start=6, stop=7),
              StageSpec(start=7, stop=10)]
    _, _, warnings = _megatron(_with_strategy(hybrid, stages=[x.model_dump() for x in uneven]))
    assert any("unequal pipeline stages" in w and "[3, 2, 1, 2]" in w for w in warnings)
    two = _with_strategy(hybrid, schedule="1f1b", virtual_stages=1,
                         stages=[{"start": 0, "stop": 6}, {"start": 6, "stop": 10}])
    a, _, warnings = _megatron(two)
    assert (a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers) == (5, 3)
    assert a.num_layers_per_virtual_pipeline_stage is None and any("[5, 3]" in w for w in warnings)


def test_deepspeed_config_round_trips_and_names_what_it_cannot_express(hybrid):
    s, d = hybrid.strategy, hybrid.strategy.dims
    result = export_plan(hybrid, "deepspeed")
    cfg = json.loads(result.text)
    assert cfg["train_batch_size"] // (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]) \
        == d.dp
    assert (cfg["zero_optimization"]["stage"], cfg["tensor_parallel"]["autotp_size"]) == (int(s.zero_stage), d.tp)
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and "activation_checkpointing" in cfg
    assert any(f"num_stages={d.pp}" in w for w in result.warnings)
    assert any("interleaved schedule" in w for w in result.warnings)


def test_deepspeed_own_config_class_reads_the_export(hybrid):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    # Without torch.distributed started DeepSpeed counts one data-parallel rank, so export a plan with dp = 1.
    single = _with_strategy(hybrid, dims={"dp": 1, "tp": 2, "pp": 2, "world_size": 4}, num_micro_batches=8)
    ds = DeepSpeedConfig(json.loads(export_plan(single, "deepspeed").text))
    assert (ds.train_batch_size, ds.gradient_accumulation_steps, ds.zero_optimization_stage) == (32, 8, 1)


def test_accelerate_yaml_round_trips_and_names_the_missing_pipeline(hybrid):
    d = hybrid.strategy.dims
    result = export_plan(hybrid, "accelerate")
    cfg = yaml.safe_load(result.text)
    par = cfg["parallelism_config"]
    assert par["parallelism_config_dp_replicate_size"] * par["parallelism_config_dp_shard_size"] == d.dp
    # accelerate runs dp x tp processes (the pipeline it cannot express is left out, not folded into them)
    assert par["parallelism_config_tp_size"] == d.tp and cfg["num_processes"] == d.dp * d.tp
    assert cfg["fsdp_config"]["fsdp_version"] == 2 and cfg["fsdp_config"]["fsdp_activation_checkpointing"]
    assert cfg["mixed_precision"] == "bf16"
    assert any(f"pp={d.pp}" in w and "cannot be expressed" in w for w in result.warnings)
    assert "# WARNING: pipeline parallelism cannot be expressed" in result.text


def test_accelerate_own_loader_reads_the_export(hybrid, tmp_path):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.parallelism_config import ParallelismConfig

    d = hybrid.strategy.dims
    path = tmp_path / "accelerate.yaml"
    path.write_text(export_plan(hybrid, "accelerate").text)
    loaded = load_config_from_file(str(path))
    assert loaded.num_processes == d.dp * d.tp and loaded.mixed_precision == "bf16"
    assert loaded.fsdp_config["fsdp_version"] == 2
    # accelerate refuses a launch whose parallelism sizes do not multiply to its processes
    sizes = {k.removeprefix("parallelism_config_").removesuffix("_size") + "_size": v
             for k, v in loaded.parallelism_config.items()}
    par = ParallelismConfig(**sizes)
    assert par.total_size == loaded.num_processes and (par.dp_shard_size, par.tp_size) == (d.dp, d.tp)


def _calls(tree: ast.AST) -> dict[str, dict[str, object]]:
    """Keyword arguments of each call in a snippet, by the called name."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            out[name] = {k.arg: ast.literal_eval(k.value) for k in node.keywords
                         if isinstance(k.value, ast.Constant)}
    return out


def test_lightning_snippet_parses_and_round_trips_the_degrees_it_has(hybrid):
    s, d = hybrid.strategy, hybrid.strategy.dims
    result = export_plan(hybrid, "lightning")
    calls = _calls(ast.parse(result.text))
    mp = calls["ModelParallelStrategy"]
    assert (mp["data_parallel_size"], mp["tensor_parallel_size"]) == (d.dp, d.tp)
    trainer = calls["Trainer"]
    assert trainer["accumulate_grad_batches"] == s.num_micro_batches and trainer["precision"] == "bf16-mixed"
    assert any(f"pp={d.pp}" in w for w in result.warnings)
    fsdp = _with_strategy(hybrid, dims={"dp": 8, "tp": 1, "pp": 1, "world_size": 8}, schedule="1f1b",
                          virtual_stages=1, zero_stage=3, num_micro_batches=1, stages=[{"start": 0, "stop": 10}])
    text = export_plan(fsdp, "lightning").text
    assert _calls(ast.parse(text))["FSDPStrategy"]["sharding_strategy"] == "FULL_SHARD"
    assert "model.get_submodule('blocks.0')" in text and "activation_checkpointing_policy={block}" in text


def test_a_non_default_mesh_order_is_named_by_every_target_that_cannot_take_it(hybrid):
    order = [MeshAxis.DP, MeshAxis.PP, MeshAxis.TP]
    moved = _with_strategy(hybrid, mesh_order=[a.value for a in order])
    for target in ("torchtitan", "deepspeed", "accelerate", "lightning"):
        assert any(w.startswith("mesh order dp,pp,tp") for w in export_plan(moved, target).warnings), target
    a, _, warnings = _megatron(moved)  # Megatron-LM has this one: tp innermost, then pp, then dp
    assert a.use_tp_pp_dp_mapping and not any("mesh order" in w for w in warnings)


def test_cli_writes_out_atomically_and_prints_the_warnings(hybrid, tmp_path):
    plan_file, out = tmp_path / "plan.json", tmp_path / "ds_config.json"
    hybrid.to_json(plan_file)
    out.write_text("old contents")
    r = CliRunner().invoke(app, ["export", str(plan_file), "--to", "deepspeed", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text() == export_plan(hybrid, "deepspeed").text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds_config.json", "plan.json"]  # no temporary left
    assert "warning: deepspeed: pipeline parallelism is set in code" in r.output
    r = CliRunner().invoke(app, ["export", str(plan_file), "--to", "torchtitan", "--format", "toml"])
    assert r.exit_code == 0 and tomllib.loads(r.stdout)["parallelism"]["tensor_parallel_degree"] == 2


def test_cli_refuses_a_missing_plan_file_in_one_line(tmp_path):
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nope.json"), "--to", "megatron"])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nope.json"), "--to", "megatron", "--format", "toml"])
    assert r.exit_code == 2


def test_export_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, planner.export, planner.export_launch, planner.export_configs, api.cli_export; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
