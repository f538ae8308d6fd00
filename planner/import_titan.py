"""torchtitan's parallelism settings for `planner.import_configs`: TOML or `--section.field value` overrides.

Reads the [parallelism], [training] and [activation_checkpoint] settings `autopar export --to torchtitan` writes
(and torchtitan's defaults for those it leaves out: shard degree -1, activation checkpointing 'selective',
bfloat16 parameters).
"""

from __future__ import annotations

import json

import tomllib

from planner.import_configs import (
    ImportConfigError,
    Source,
    TrainerSettings,
    dp_from_world,
    positive_int,
    shell_words,
)
from planner.model_profile import DType
from planner.strategy import Recompute, Schedule, ZeroStage

_TITAN_SCHEDULE = {"gpipe": Schedule.GPIPE, "1f1b": Schedule.ONE_F_ONE_B, "interleaved1f1b": Schedule.INTERLEAVED_1F1B}
_TITAN_MULTI_STAGE = {"interleaved1f1b", "loopedbfs", "interleavedzerobubble", "zbvzerobubble", "dualpipev"}
_TITAN_KEYS = {
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
                    "pipeline_parallel_degree", "pipeline_parallel_schedule", "pipeline_parallel_microbatch_size",
                    "module_fqns_per_model_part", "pipeline_parallel_layers_per_stage", "fsdp_reshard_after_forward",
                    "context_parallel_degree", "mixed_precision_param"},
    "training": {"local_batch_size", "batch_size", "global_batch_size", "seq_len", "mixed_precision_param"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
}
_TITAN_DTYPE = {"bfloat16": DType.BF16, "float32": DType.FP32, "float16": DType.FP16}


def _override_value(text: str) -> object:
    """An override's value as torchtitan's config parser reads it: a JSON list, an integer or a string."""
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ImportConfigError(f"cannot read the list {text!r}; write it as JSON, e.g. "
                                    "'[[\"tok_embeddings\",\"layers.0\"],[\"layers.1\",\"norm\",\"output\"]]'") from None
    return int(text) if text.lstrip("-").isdigit() else text


def titan_sections(text: str) -> dict[str, dict[str, object]]:
    """torchtitan's settings by section, from TOML or from `--section.field value` overrides."""
    words = shell_words(text, "torchtitan overrides") if "--" in text else []
    if not any(w.startswith("--") and "." in w.split("=", 1)[0] for w in words):
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ImportConfigError(f"the torchtitan configuration is neither TOML nor --section.field overrides "
                                    f"({exc}); give its job TOML or the override list") from None
    sections: dict[str, dict[str, object]] = {}
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        name, eq, value = w[2:].partition("=")
        if not eq:
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else "true"
        section, _, key = name.rpartition(".")
        sections.setdefault(section, {})[key] = _override_value(value)
    return sections


def parse_torchtitan(text: str, *, world_size: int) -> TrainerSettings:
    """torchtitan's [parallelism], [training] and [activation_checkpoint] settings (TOML or overrides)."""
    sections = titan_sections(text)
    for name in _TITAN_KEYS:
        if not isinstance(sections.get(name, {}), dict):
            raise ImportConfigError(f"torchtitan's {name} must be a table of settings ([{name}]), got "
                                    f"{sections[name]!r}")
    par, tr = sections.get("parallelism", {}), sections.get("training", {})
    ac = sections.get("activation_checkpoint", {})
    s = TrainerSettings(source=Source.TORCHTITAN, world_size=world_size)
    s.tp = positive_int("parallelism.tensor_parallel_degree", par.get("tensor_parallel_degree", 1))
    s.pp = positive_int("parallelism.pipeline_parallel_degree", par.get("pipeline_parallel_degree", 1))
    if positive_int("parallelism.context_parallel_degree", par.get("context_parallel_degree", 1)) > 1:
        raise ImportConfigError("parallelism.context_parallel_degree > 1 cannot be scored: autopar has no "
                                "context-parallel axis; score it with context_parallel_degree = 1")
    replicate = positive_int("parallelism.data_parallel_replicate_degree", par.get("data_parallel_replicate_degree", 1))
    shard = par.get("data_parallel_shard_degree", -1)
    rest = dp_from_world(s, "torchtitan's")
    if shard == -1:  # torchtitan's default: whatever the other degrees leave
        if rest % replicate:
            raise ImportConfigError(f"data_parallel_replicate_degree {replicate} does not divide the {rest} "
                                    "data-parallel ranks the other degrees leave; change it or the GPU count")
        shard = rest // replicate
    shard = positive_int("parallelism.data_parallel_shard_degree", shard)
    s.dp = replicate * shard
    if s.dp != rest:
        raise ImportConfigError(f"torchtitan's degrees replicate {replicate} x shard {shard} x tp {s.tp} x pp {s.pp} "
                                f"= {s.dp * s.tp * s.pp} do not equal the {world_size} GPUs; change them or "
                                "--nodes/--gpus-per-node")
    if shard > 1:
        reshard = par.get("fsdp_reshard_after_forward", "default")
        s.zero_stage = ZeroStage.GRADIENTS if reshard == "never" else ZeroStage.FULL
        if reshard == "never":
            s.notes.append("fsdp_reshard_after_forward = never keeps parameters gathered from forward to backward: "
                           "scored as ZeRO-2")
        if replicate > 1:
            s.notes.append(f"HSDP (replicate {replicate} x shard {shard}) cannot be expressed: scored as ZeRO-"
                           f"{int(s.zero_stage)} over all {s.dp} data-parallel ranks (more inter-node traffic than "
                           "HSDP sends)")
    mb = 1
    name = str(par.get("pipeline_parallel_schedule", "1F1B"))
    key = name.lower().replace("_", "")
    if key not in _TITAN_SCHEDULE and key not in _TITAN_MULTI_STAGE:
        raise ImportConfigError(f"unknown pipeline_parallel_schedule {name!r}; use GPipe, 1F1B or Interleaved1F1B")
    if s.pp > 1:
        s.schedule = _TITAN_SCHEDULE.get(key, Schedule.INTERLEAVED_1F1B)
        if key not in _TITAN_SCHEDULE:
            s.notes.append(f"the {name} schedule is scored as interleaved 1F1B (autopar models GPipe, 1F1B and "
                           "interleaved 1F1B)")
        parts = par.get("module_fqns_per_model_part")
        if parts is not None:
            if not (isinstance(parts, list) and all(isinstance(p, list) for p in parts)):
                raise ImportConfigError("module_fqns_per_model_part must be a list of lists of module names")
            s.model_parts = [[str(n) for n in p] for p in parts]
        elif "pipeline_parallel_layers_per_stage" in par:
            s.layers_per_virtual_stage = positive_int("pipeline_parallel_layers_per_stage",
                                                   par["pipeline_parallel_layers_per_stage"])
        else:
            s.virtual_stages = 2 if key in _TITAN_MULTI_STAGE else 1
            s.notes.append(f"no module_fqns_per_model_part: scored with torchtitan's even split into "
                           f"{s.virtual_stages} stage(s) per pipeline rank")
        mb = positive_int("parallelism.pipeline_parallel_microbatch_size",
                       par.get("pipeline_parallel_microbatch_size", 1))
    local = tr.get("local_batch_size", tr.get("batch_size"))
    if local is None:
        raise ImportConfigError("the torchtitan configuration sets no training.local_batch_size; add it")
    local = positive_int("training.local_batch_size", local)
    s.micro_batch_size = mb if s.pp > 1 else local
    if s.pp > 1 and local % mb:
        raise ImportConfigError(f"training.local_batch_size {local} is not a multiple of "
                                f"pipeline_parallel_microbatch_size {mb}; make it one")
    total = tr.get("global_batch_size", -1)
    s.global_batch_size = local * s.dp if total == -1 else positive_int("training.global_batch_size", total)
    mode = ac.get("mode")
    if mode is None:
        mode = "selective"
        s.notes.append("activation_checkpoint.mode is not set: torchtitan's default 'selective' is scored")
    if mode not in ("none", "selective", "full"):
        raise ImportConfigError(f"activation_checkpoint.mode takes none, selective or full, got {mode!r}")
    s.recompute = Recompute(mode)
    option = str(ac.get("selective_ac_option", "op"))
    if mode == "selective":
        s.notes.append(f"torchtitan's selective checkpointing (selective_ac_option '{option}') is scored as "
                       "autopar's selective recomputation of the attention core"
                       + (f"; '{option}' checkpoints every {option}th layer in full" if option.isdigit() else ""))
    precision = par.get("mixed_precision_param", tr.get("mixed_precision_param", "bfloat16"))
    s.dtype = _TITAN_DTYPE.get(str(precision))
    if s.dtype is None:
        raise ImportConfigError(f"mixed_precision_param {precision!r} is not a precision; use bfloat16 or float32")
    if "seq_len" in tr:
        s.seq_len = positive_int("training.seq_len", tr["seq_len"])
    s.ignored = sorted([f"[{name}]" for name in sections if name not in _TITAN_KEYS]
                       + [f"{name}.{k}" for name, keys in _TITAN_KEYS.items()
                          for k in sections.get(name, {}) if k not in keys])
    return s
