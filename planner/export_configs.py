"""The configuration-file exports of `planner.export`: DeepSpeed `ds_config` JSON, accelerate YAML, Lightning Python."""

from __future__ import annotations

import json

import yaml

from planner.export import Target, header, mesh_warning, precision_name, split_blocks, stage_layers
from planner.model_profile import DType
from planner.strategy import Plan, Recompute, Schedule, ZeroStage


def _no_pipeline(plan: Plan, target: str) -> list[str]:
    """The warning for targets with no pipeline parallelism of their own."""
    s, d = plan.strategy, plan.strategy.dims
    if d.pp == 1:
        return []
    text = (f"pipeline parallelism cannot be expressed: {target} has none for training, so pp={d.pp} "
            f"({len(s.stages)} stages, {s.schedule.value}) is left out and this configuration covers dp={d.dp} x "
            f"tp={d.tp} = {d.dp * d.tp} of the {d.world_size} devices; plan again with pp_degrees=(1,) "
            "(`planner.plan`) for a plan it can run")
    return [text]


def _first_block(plan: Plan, target: Target) -> str:
    """Module name of the model's first repeated block (what FSDP wraps and checkpoints)."""
    names = stage_layers(plan, target)
    prefix, _ = split_blocks(names)
    flat = [n for stage in names for n in stage]
    return next((n for n in flat if prefix is not None and n.startswith(prefix + ".")), flat[0])


# ---------------------------------------------------------------- DeepSpeed

def deepspeed_config(plan: Plan) -> tuple[dict[str, object], list[str]]:
    """The ds_config dictionary and what DeepSpeed cannot express."""
    s, d = plan.strategy, plan.strategy.dims
    warnings = mesh_warning(plan, "DeepSpeed", "pipe, data, model (outermost first)")
    dtype = precision_name(plan)
    cfg: dict[str, object] = {
        "train_batch_size": s.global_batch_size,
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.num_micro_batches,
        "zero_optimization": {"stage": int(s.zero_stage)},
        "bf16": {"enabled": dtype == DType.BF16},
        "fp16": {"enabled": dtype == DType.FP16},
    }
    if d.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": d.tp}
        if s.zero_stage == ZeroStage.FULL:
            warnings.append(f"tp={d.tp} with ZeRO stage 3 cannot be expressed: DeepSpeed's AutoTP training runs "
                            "with ZeRO stages 0-2 only")
    if d.pp > 1:
        bounds = [st.start for st in s.stages] + [s.stages[-1].stop]
        warnings.append(f"pipeline parallelism is set in code, not in ds_config: PipelineModule(layers, "
                        f"num_stages={d.pp}, activation_checkpoint_interval={int(s.recompute == Recompute.FULL)}); "
                        f"its partition_method cannot take the plan's stage boundaries {bounds}")
        if s.schedule == Schedule.INTERLEAVED_1F1B:
            warnings.append(f"the interleaved schedule ({s.virtual_stages} stages per rank) cannot be expressed: "
                            "DeepSpeed's pipeline engine runs one stage per rank with 1F1B, so its bubble is larger "
                            "than the plan predicted")
        if s.zero_stage >= ZeroStage.GRADIENTS:
            warnings.append(f"ZeRO stage {int(s.zero_stage)} with pipeline parallelism cannot be expressed: "
                            "DeepSpeed's pipeline engine takes ZeRO stages 0 and 1 only")
    if s.recompute != Recompute.NONE:
        cfg["activation_checkpointing"] = {"partition_activations": d.tp > 1, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False,
                                           "synchronize_checkpoint_boundary": False}
        what = ("each layer" if s.recompute == Recompute.FULL
                else "the attention core only (the plan's selective recomputation)")
        warnings.append(f"activation_checkpointing configures deepspeed.checkpointing; the model must still wrap "
                        f"{what} in deepspeed.checkpointing.checkpoint")
    if dtype == DType.FP16:
        cfg["fp16"] = {"enabled": True, "loss_scale": 0}  # 0: dynamic loss scaling
    return cfg, warnings


def deepspeed_json(plan: Plan) -> tuple[str, list[str]]:
    """The ds_config as JSON (which has no comments: the warnings are only in `Export.warnings`)."""
    cfg, warnings = deepspeed_config(plan)
    return json.dumps(cfg, indent=2) + "\n", warnings


# ---------------------------------------------------------------- accelerate

_ACCELERATE_PRECISION = {DType.BF16: "bf16", DType.FP16: "fp16", DType.FP32: "no", DType.TF32: "no"}


def accelerate_config(plan: Plan) -> tuple[dict[str, object], list[str]]:
    """The `accelerate config` dictionary (FSDP2 with its parallelism sizes) and what accelerate cannot express."""
    s, d, c = plan.strategy, plan.strategy.dims, plan.provenance.cluster
    warnings = mesh_warning(plan, "accelerate", "dp_replicate, dp_shard, cp, tp (outermost first)")
    warnings += _no_pipeline(plan, "accelerate")
    dtype = precision_name(plan)
    # accelerate launches one process per device of its parallelism sizes (it refuses a num_processes other than
    # their product): without the pipeline, dp x tp processes.
    processes = d.dp * d.tp
    machines = c.nodes if processes == d.world_size else max(1, -(-processes // c.gpus_per_node))
    cfg: dict[str, object] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if s.zero_stage != ZeroStage.NONE else ("MULTI_GPU" if processes > 1 else "NO"),
        "mixed_precision": _ACCELERATE_PRECISION[dtype] if dtype is not None else "no",
        "num_machines": machines,
        "num_processes": processes,
        "machine_rank": 0,
        "use_cpu": False,
    }
    if s.zero_stage != ZeroStage.NONE:
        if s.zero_stage == ZeroStage.OPTIMIZER:
            warnings.append("ZeRO stage 1 cannot be expressed: FSDP2 shards gradients too; exported as ZeRO-2 "
                            "(fsdp_reshard_after_forward: false)")
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": s.zero_stage == ZeroStage.FULL,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # wraps the model's _no_split_modules
            "fsdp_activation_checkpointing": s.recompute != Recompute.NONE,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
        }
    if s.zero_stage != ZeroStage.NONE or d.tp > 1:
        sharded = s.zero_stage != ZeroStage.NONE
        cfg["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": 1 if sharded else d.dp,
            "parallelism_config_dp_shard_size": d.dp if sharded else 1,
            "parallelism_config_tp_size": d.tp,
            "parallelism_config_cp_size": 1,
        }
    if s.recompute == Recompute.SELECTIVE:
        warnings.append("selective recomputation cannot be expressed: accelerate's fsdp_activation_checkpointing "
                        "recomputes whole layers (more compute than the plan predicted)")
    elif s.recompute == Recompute.FULL and s.zero_stage == ZeroStage.NONE:
        warnings.append("full recomputation has no accelerate setting without FSDP: wrap each layer in "
                        "torch.utils.checkpoint yourself")
    return cfg, warnings


def accelerate_yaml(plan: Plan) -> tuple[str, list[str]]:
    """The accelerate config as YAML, its warnings and batch settings as comments."""
    cfg, warnings = accelerate_config(plan)
    s = plan.strategy
    lines = header(plan, "accelerate", "#", warnings)
    lines.append(f"# per-device micro-batch {s.micro_batch_size}, Accelerator(gradient_accumulation_steps="
                 f"{s.num_micro_batches}), global batch {s.global_batch_size}")
    return "\n".join(lines) + "\n" + yaml.safe_dump(cfg, sort_keys=False), warnings


# ---------------------------------------------------------------- Lightning

_LIGHTNING_PRECISION = {DType.BF16: "bf16-mixed", DType.FP16: "16-mixed", DType.FP32: "32-true",
                        DType.TF32: "32-true"}


def lightning_python(plan: Plan) -> tuple[str, list[str]]:
    """A Python snippet building the Lightning `Trainer` and strategy for the plan."""
    s, d, c = plan.strategy, plan.strategy.dims, plan.provenance.cluster
    warnings = mesh_warning(plan, "Lightning", "data parallel outside, tensor parallel inside")
    warnings += _no_pipeline(plan, "Lightning")
    imports = ["import lightning as L"]
    body = []
    if d.tp > 1:
        imports.append("from lightning.pytorch.strategies import ModelParallelStrategy")
        strategy = f"ModelParallelStrategy(data_parallel_size={d.dp}, tensor_parallel_size={d.tp})"
        body.append(f"    # configure_model applies TP over tp={d.tp}, then fully_shard over dp={d.dp}"
                    + ("" if s.zero_stage == ZeroStage.FULL else
                       f" (reshard_after_forward=False for ZeRO-{int(s.zero_stage)})"))
        if s.zero_stage == ZeroStage.NONE and d.dp > 1:
            warnings.append("ZeRO stage 0 with tensor parallelism cannot be expressed: ModelParallelStrategy "
                            "shards the data-parallel axis with FSDP2")
        if s.recompute != Recompute.NONE:
            body.append(f"    # and wraps {'each layer' if s.recompute == Recompute.FULL else 'each attention core'}"
                        " in torch.utils.checkpoint (the plan's recomputation)")
    elif s.zero_stage == ZeroStage.NONE:
        imports.append("from lightning.pytorch.strategies import DDPStrategy")
        strategy = "DDPStrategy()" if d.dp > 1 else '"auto"'
    else:
        imports.append("from lightning.pytorch.strategies import FSDPStrategy")
        block = _first_block(plan, Target.LIGHTNING)
        sharding = "FULL_SHARD" if s.zero_stage == ZeroStage.FULL else "SHARD_GRAD_OP"
        if s.zero_stage == ZeroStage.OPTIMIZER:
            warnings.append("ZeRO stage 1 cannot be expressed: FSDPStrategy shards gradients too; exported as "
                            "SHARD_GRAD_OP (ZeRO-2)")
        body.append(f"    block = type(model.get_submodule({block!r}))  # the repeated layer FSDP wraps")
        checkpoint = ", activation_checkpointing_policy={block}" if s.recompute == Recompute.FULL else ""
        strategy = f"FSDPStrategy(sharding_strategy={sharding!r}, auto_wrap_policy={{block}}{checkpoint})"
    if s.recompute == Recompute.SELECTIVE and d.tp == 1:
        warnings.append("selective recomputation cannot be expressed: Lightning's activation_checkpointing_policy "
                        "recomputes whole modules")
    precision = _LIGHTNING_PRECISION[precision_name(plan)] if precision_name(plan) is not None else "32-true"
    lines = header(plan, "Lightning", "#", warnings) + imports + ["", "",
        "def make_trainer(model):",
        (f'    """The Trainer for {plan.provenance.model_name} (`model`: the module the plan was made for); '
         f'DataLoader batch_size={s.micro_batch_size}."""'),
        *body,
        f"    strategy = {strategy}",
        f'    return L.Trainer(accelerator="gpu", devices={c.gpus_per_node}, num_nodes={c.nodes}, strategy=strategy,',
        f"                     precision={precision!r}, accumulate_grad_batches={s.num_micro_batches})"]
    return "\n".join(lines) + "\n", warnings
