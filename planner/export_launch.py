"""The argument-list exports of `planner.export`: torchtitan (overrides or TOML) and Megatron-LM (launch line)."""

from __future__ import annotations

import json
import re

from planner.export import Format, Target, header, mesh_warning, precision_name, split_blocks, stage_layers
from planner.model_profile import DType
from planner.strategy import Plan, Recompute, Schedule, ZeroStage

# ---------------------------------------------------------------- torchtitan

_TITAN_SCHEDULE = {Schedule.GPIPE: "GPipe", Schedule.ONE_F_ONE_B: "1F1B", Schedule.INTERLEAVED_1F1B: "Interleaved1F1B"}
_TITAN_DTYPE = {DType.BF16: "bfloat16", DType.FP32: "float32", DType.TF32: "float32", DType.FP16: "float16"}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"  # type: ignore[union-attr]


def torchtitan_settings(plan: Plan) -> tuple[dict[str, dict[str, object]], list[str]]:
    """torchtitan's JobConfig fields by section, and what it cannot express."""
    s, d = plan.strategy, plan.strategy.dims
    warnings = mesh_warning(plan, "torchtitan", "pp, dp_replicate, dp_shard, cp, tp (outermost first)")
    replicate, shard, reshard = d.dp, 1, None
    if s.zero_stage == ZeroStage.FULL:
        replicate, shard = 1, d.dp
    elif s.zero_stage in (ZeroStage.OPTIMIZER, ZeroStage.GRADIENTS) and d.dp > 1:
        replicate, shard, reshard = 1, d.dp, "never"
        warnings.append(f"ZeRO stage {int(s.zero_stage)} has no torchtitan setting: exported as FSDP with "
                        "fsdp_reshard_after_forward = never (parameters stay gathered from forward to backward, "
                        "gradients and optimizer state sharded: ZeRO-2)")
    elif d.dp > 1 and (d.tp > 1 or d.pp > 1):
        replicate, shard = 1, d.dp
        warnings.append("ZeRO stage 0 (replicated DDP) with tensor or pipeline parallelism cannot be expressed: "
                        "torchtitan runs DDP only on a 1-D mesh; exported as FSDP (data_parallel_shard_degree), "
                        "which shards state and communicates more than the plan predicted")
    par: dict[str, object] = {"data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard,
                              "tensor_parallel_degree": d.tp, "pipeline_parallel_degree": d.pp}
    if reshard is not None:
        par["fsdp_reshard_after_forward"] = reshard
    per_replica = s.micro_batch_size * s.num_micro_batches
    if d.pp > 1:
        par["pipeline_parallel_schedule"] = _TITAN_SCHEDULE[s.schedule]
        par["pipeline_parallel_microbatch_size"] = s.micro_batch_size
        par["module_fqns_per_model_part"] = stage_layers(plan, Target.TORCHTITAN)
        warnings.append("module_fqns_per_model_part holds the profiled model's module names; they must match the "
                        "torchtitan model definition (e.g. tok_embeddings, layers.N, norm, output)")
    training: dict[str, object] = {"local_batch_size": per_replica if d.pp > 1 else s.micro_batch_size,
                                   "global_batch_size": s.global_batch_size}
    if plan.provenance.seq_len is not None:
        training["seq_len"] = plan.provenance.seq_len
    dtype = precision_name(plan)
    if dtype is not None:
        training["mixed_precision_param"] = _TITAN_DTYPE[dtype]
        if dtype == DType.FP16:
            warnings.append("float16: torchtitan's FSDP mixed precision takes bfloat16 or float32 parameters; "
                            "float16 has no loss scaling there")
    if d.tp > 1 and not s.sequence_parallel:
        warnings.append("torchtitan runs its norms sequence-parallel whenever tensor_parallel_degree > 1; the plan "
                        "does not (less activation memory than the plan counted)")
    ac: dict[str, object] = {"mode": s.recompute.value}
    if s.recompute == Recompute.SELECTIVE:
        ac["selective_ac_option"] = "op"
        warnings.append("selective recomputation: the plan recomputes the attention core only; torchtitan's "
                        "selective_ac_option 'op' saves a list of ops instead, close but not the same memory")
    return {"parallelism": par, "training": training, "activation_checkpoint": ac}, warnings


def torchtitan(plan: Plan, fmt: Format) -> tuple[str, list[str]]:
    """torchtitan's settings as `--section.field value` overrides or as TOML sections."""
    sections, warnings = torchtitan_settings(plan)
    lines = header(plan, "torchtitan", "#", warnings)
    if fmt == Format.TOML:
        for name, fields in sections.items():
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
        return "\n".join(lines) + "\n", warnings
    args = []
    for name, fields in sections.items():
        for k, v in fields.items():
            value = json.dumps(v, separators=(",", ":")) if isinstance(v, list) else str(v)
            args.append(f"--{name}.{k} {_shell(value)}")
    return "\n".join(lines + [" \\\n".join(args)]) + "\n", warnings


def _shell(value: str) -> str:
    """`value` quoted for a POSIX shell when it needs it."""
    return value if re.fullmatch(r"[A-Za-z0-9_.,:/=+-]+", value) else "'" + value.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------- Megatron-LM

def megatron_args(plan: Plan) -> tuple[list[str], list[str]]:
    """Megatron-LM launch arguments (flag, value, flag, ...) and what they cannot express."""
    s, d = plan.strategy, plan.strategy.dims
    warnings: list[str] = []
    order = tuple(a.value for a in s.mesh_order)
    args = ["--tensor-model-parallel-size", str(d.tp), "--pipeline-model-parallel-size", str(d.pp)]
    if order == ("dp", "pp", "tp"):
        args.append("--use-tp-pp-dp-mapping")
    else:
        warnings += mesh_warning(plan, "Megatron-LM", "tp innermost, then dp, then pp (or tp-pp-dp)")
    prefix, blocks = split_blocks(stage_layers(plan, Target.MEGATRON))
    if prefix is None:
        warnings.append("no repeated transformer block found among the layer names; --num-layers counts every layer")
    total = sum(blocks)
    args += ["--num-layers", str(total)]
    if len(set(blocks)) > 1:
        warnings.append(f"unequal pipeline stages cannot be expressed exactly: Megatron-LM needs the same number of "
                        f"transformer layers per (virtual) pipeline stage, the plan has {blocks}"
                        + (" (--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers set the "
                           "first and last stage)" if s.virtual_stages == 1 and len(set(blocks[1:-1])) <= 1 else
                           "; Megatron-LM splits them evenly, which changes the balance the plan predicted"))
        if s.virtual_stages == 1 and len(set(blocks[1:-1])) <= 1 and d.pp > 1:
            args += ["--decoder-first-pipeline-num-layers", str(blocks[0]),
                     "--decoder-last-pipeline-num-layers", str(blocks[-1])]
    if s.virtual_stages > 1:
        per_chunk = blocks[0] if len(set(blocks)) == 1 else max(1, total // len(blocks))
        args += ["--num-layers-per-virtual-pipeline-stage", str(per_chunk)]
    if s.schedule == Schedule.GPIPE and d.pp > 1:
        warnings.append("the GPipe schedule cannot be expressed: Megatron-LM always runs 1F1B (less activation "
                        "memory than the plan counted)")
    args += ["--micro-batch-size", str(s.micro_batch_size), "--global-batch-size", str(s.global_batch_size)]
    if plan.provenance.seq_len is not None:
        args += ["--seq-length", str(plan.provenance.seq_len)]
    if s.recompute == Recompute.FULL:
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif s.recompute == Recompute.SELECTIVE:
        args += ["--recompute-granularity", "selective"]
    if s.zero_stage >= ZeroStage.OPTIMIZER and d.dp > 1:
        args.append("--use-distributed-optimizer")
        if s.zero_stage > ZeroStage.OPTIMIZER:
            warnings.append(f"ZeRO stage {int(s.zero_stage)} cannot be expressed: Megatron-LM's distributed "
                            "optimizer shards optimizer state only (ZeRO-1), so each device holds more memory than "
                            "the plan counted (--use-torch-fsdp2 shards everything but replaces it)")
    dtype = precision_name(plan)
    if dtype == DType.BF16:
        args.append("--bf16")
    elif dtype == DType.FP16:
        args.append("--fp16")
    if s.sequence_parallel:
        args.append("--sequence-parallel")
    return args, warnings


def megatron(plan: Plan) -> tuple[str, list[str]]:
    """A torchrun line launching Megatron-LM's pretrain_gpt.py with the plan's arguments."""
    args, warnings = megatron_args(plan)
    c, d = plan.provenance.cluster, plan.strategy.dims
    lines = header(plan, "Megatron-LM", "#", warnings)
    lines.append(f"# world size {d.world_size} = tp {d.tp} x pp {d.pp} x dp {d.dp}; Megatron-LM derives dp from it")
    pairs, i = [], 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        pairs.append(f"{args[i]} {args[i + 1]}" if has_value else args[i])
        i += 2 if has_value else 1
    launch = f"torchrun --nnodes {c.nodes} --nproc-per-node {c.gpus_per_node} pretrain_gpt.py"
    return "\n".join(lines + [" \\\n    ".join([launch] + pairs)]) + "\n", warnings
