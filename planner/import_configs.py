"""The reverse of `planner.export`: what a team's trainer configuration says about parallelism (no torch, no I/O).

    settings = parse_config("megatron-args", text, world_size=16)
    imported = to_strategy(settings, profile, global_batch_size=512)    # planner.import_strategy
    evaluate(profile, cluster, imported.strategy)

Sources: Megatron-LM launch arguments (a file as `autopar export --to megatron` writes it, or any shell-ish text
holding the flags), a DeepSpeed `ds_config` JSON, and torchtitan TOML or its `--section.field value` overrides.
What the configuration leaves open or autopar cannot express is kept in `TrainerSettings.notes`, flags and keys it
does not read in `TrainerSettings.ignored`; nothing is dropped silently.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from enum import Enum

from planner.errors import AutoparError
from planner.model_profile import DType
from planner.strategy import DEFAULT_MESH_ORDER, MeshAxis, Recompute, Schedule, ZeroStage


class ImportConfigError(AutoparError):
    """A trainer configuration autopar cannot read or score; the message names the setting and the fix."""


class Source(str, Enum):
    """Kinds of trainer configuration `autopar evaluate --from` reads."""

    MEGATRON = "megatron-args"
    DEEPSPEED = "ds-config"
    TORCHTITAN = "torchtitan"


@dataclass
class TrainerSettings:
    """A configuration's parallel settings on `world_size` devices, before the model is known."""

    source: Source
    world_size: int
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: ZeroStage = ZeroStage.NONE
    micro_batch_size: int | None = None  # None: derived from the global batch (DeepSpeed) or missing
    num_micro_batches: int | None = None  # DeepSpeed's gradient_accumulation_steps; else from the global batch
    global_batch_size: int | None = None  # None: the configuration leaves it to the caller
    schedule: Schedule | None = None  # None: 1F1B, interleaved when there are virtual stages
    virtual_stages: int | None = None  # stages per pipeline rank when the configuration gives it directly
    layers_per_virtual_stage: int | None = None  # transformer layers per (virtual) stage (Megatron, torchtitan)
    first_stage_layers: int | None = None  # Megatron's --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None  # Megatron's --decoder-last-pipeline-num-layers
    model_parts: list[list[str]] | None = None  # torchtitan's module_fqns_per_model_part
    recompute: Recompute = Recompute.NONE
    sequence_parallel: bool = False  # Megatron's --sequence-parallel (with tp > 1)
    mesh_order: tuple[MeshAxis, ...] = DEFAULT_MESH_ORDER
    dtype: DType | None = None  # None: not stated; scored in the profile's precision
    num_layers: int | None = None  # transformer layers the configuration expects (checked against the model)
    seq_len: int | None = None
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_config(source: Source | str, text: str, *, world_size: int) -> TrainerSettings:
    """The parallel settings in `text`, a configuration of kind `source`, for `world_size` devices."""
    try:
        src = Source(source)
    except ValueError:
        raise ImportConfigError(f"unknown configuration kind '{source}'; use one of "
                                f"{', '.join(s.value for s in Source)}") from None
    if src == Source.MEGATRON:
        return parse_megatron(text, world_size=world_size)
    if src == Source.DEEPSPEED:
        return parse_deepspeed(text, world_size=world_size)
    from planner.import_titan import parse_torchtitan  # it imports this module's helpers

    return parse_torchtitan(text, world_size=world_size)


def positive_int(what: str, value: object, allow_zero: bool = False) -> int:
    """`value` as an int >= 1 (>= 0 with allow_zero); a one-line error naming the setting otherwise."""
    try:
        number = int(str(value)) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < (0 if allow_zero else 1):
        raise ImportConfigError(f"{what} takes a {'non-negative' if allow_zero else 'positive'} integer, got "
                                f"{value!r}; set it to a number (shell variables are not expanded)")
    return number


def dp_from_world(settings: TrainerSettings, what: str) -> int:
    """The data-parallel degree the world size leaves for tp x pp; an error when tp x pp does not divide it."""
    model = settings.tp * settings.pp
    if settings.world_size % model:
        raise ImportConfigError(f"{what} tp x pp = {settings.tp} x {settings.pp} = {model} does not divide the "
                                f"{settings.world_size} GPUs; change the degrees or --nodes/--gpus-per-node")
    return settings.world_size // model


def shell_words(text: str, what: str) -> list[str]:
    """The words of shell-ish text: comments dropped, backslash-continued lines joined, quotes removed."""
    try:
        return shlex.split(text.replace("\\\r\n", " ").replace("\\\n", " "), comments=True)
    except ValueError as exc:
        raise ImportConfigError(f"cannot split the {what} into words ({exc}); check its quotes") from None


# ---------------------------------------------------------------- Megatron-LM

_MEGATRON_INT = {
    "--tensor-model-parallel-size": "tp", "--pipeline-model-parallel-size": "pp",
    "--num-layers-per-virtual-pipeline-stage": "layers_per_virtual_stage",
    "--virtual-pipeline-model-parallel-size": "virtual_stages", "--micro-batch-size": "micro_batch_size",
    "--global-batch-size": "global_batch_size", "--num-layers": "num_layers", "--seq-length": "seq_len",
    "--decoder-first-pipeline-num-layers": "first_stage_layers",
    "--decoder-last-pipeline-num-layers": "last_stage_layers",
    "--recompute-num-layers": None, "--context-parallel-size": None, "--expert-model-parallel-size": None,
}
_MEGATRON_STR = ("--recompute-granularity", "--recompute-method")
_MEGATRON_SWITCH = ("--sequence-parallel", "--use-distributed-optimizer", "--bf16", "--fp16",
                    "--use-tp-pp-dp-mapping")
_LAUNCHERS = ("torchrun", "python", "python3", "deepspeed")


def _flags(words: list[str]) -> tuple[dict[str, str | None], dict[str, str]]:
    """Training flags (name -> value, None for a switch) after the script, and the launcher's flags before it."""
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    launcher: dict[str, str] = {}
    if script is not None:
        start = max((i for i in range(script) if words[i].rsplit("/", 1)[-1] in _LAUNCHERS), default=script)
        for i in range(start + 1, script):  # torchrun's own flags, between it and the script
            name, eq, value = words[i].partition("=")
            if name.startswith("--"):
                launcher[name.replace("_", "-")] = value if eq else words[i + 1] if i + 1 < script else ""
        words = words[:start] + words[script + 1:]  # bash arrays of flags may come before the launch line
    out: dict[str, str | None] = {}
    for i, w in enumerate(words):
        w = w[w.index("--"):] if "--" in w and not w.startswith("--") and "=(" in w else w  # ARGS=(--flag ...
        w = w.rstrip(")") if w.startswith("--") else w
        if not w.startswith("--"):
            continue
        name, eq, value = w.partition("=")
        if not eq:
            nxt = words[i + 1].rstrip(")") if i + 1 < len(words) else None
            value = nxt if nxt and not nxt.startswith("--") else None
        out[name] = value
    return out, launcher


def parse_megatron(text: str, *, world_size: int) -> TrainerSettings:
    """Megatron-LM's launch arguments in `text` (shell-ish: comments, continuations, a torchrun line, a bash array)."""
    flags, launcher = _flags(shell_words(text, "Megatron-LM arguments"))
    s = TrainerSettings(source=Source.MEGATRON, world_size=world_size)
    nodes, per_node = launcher.get("--nnodes"), launcher.get("--nproc-per-node")
    if nodes and per_node and nodes.isdigit() and per_node.isdigit() and int(nodes) * int(per_node) != world_size:
        raise ImportConfigError(f"the launch line starts --nnodes {nodes} x --nproc-per-node {per_node} = "
                                f"{int(nodes) * int(per_node)} processes but the cluster has {world_size} GPUs; "
                                "give the matching --nodes/--gpus-per-node")
    ints = {}
    for flag, attr in _MEGATRON_INT.items():
        if flag in flags:
            ints[flag] = positive_int(flag, flags[flag], allow_zero=flag == "--recompute-num-layers")
            if attr is not None:
                setattr(s, attr, ints[flag])
    if ints.get("--context-parallel-size", 1) > 1:
        raise ImportConfigError(f"--context-parallel-size {ints['--context-parallel-size']} cannot be scored: "
                                "autopar has no context-parallel axis; score it with --context-parallel-size 1")
    if ints.get("--expert-model-parallel-size", 1) > 1:
        s.notes.append("--expert-model-parallel-size is not modelled: experts are scored as replicated on the "
                       "data-parallel axis")
    s.dp = dp_from_world(s, "Megatron-LM's")
    if s.virtual_stages is not None and s.layers_per_virtual_stage is not None:
        s.notes.append("--virtual-pipeline-model-parallel-size and --num-layers-per-virtual-pipeline-stage are both "
                       "set; the number of layers per virtual stage is used")
        s.virtual_stages = None
    granularity, method = flags.get("--recompute-granularity"), flags.get("--recompute-method")
    if granularity == "full":
        s.recompute = Recompute.FULL
        layers = ints.get("--recompute-num-layers", 1)
        if method == "block":
            s.notes.append(f"--recompute-method block recomputes only the first {layers} layers of each stage; "
                           "scored as full recomputation of every layer")
        elif layers > 1:
            s.notes.append(f"--recompute-method uniform with --recompute-num-layers {layers} recomputes groups of "
                           f"{layers} layers (one checkpoint per group); scored as per-layer full recomputation")
    elif granularity == "selective":
        s.recompute = Recompute.SELECTIVE
    elif granularity is not None:
        raise ImportConfigError(f"--recompute-granularity takes full or selective, got {granularity!r}")
    elif method is not None:
        s.notes.append("--recompute-method without --recompute-granularity does nothing in Megatron-LM; scored "
                       "without recomputation")
    s.sequence_parallel = "--sequence-parallel" in flags and s.tp > 1
    if "--use-distributed-optimizer" in flags:
        s.zero_stage = ZeroStage.OPTIMIZER
    if "--use-tp-pp-dp-mapping" in flags:
        s.mesh_order = (MeshAxis.DP, MeshAxis.PP, MeshAxis.TP)
    if "--bf16" in flags and "--fp16" in flags:
        raise ImportConfigError("both --bf16 and --fp16 are set; keep one")
    s.dtype = DType.BF16 if "--bf16" in flags else DType.FP16 if "--fp16" in flags else None
    if s.dtype is None:
        s.notes.append("no --bf16/--fp16: Megatron-LM trains in float32; scored in the profile's precision")
    known = set(_MEGATRON_INT) | set(_MEGATRON_STR) | set(_MEGATRON_SWITCH)
    s.ignored = sorted(f for f in flags if f not in known)
    return s


# ---------------------------------------------------------------- DeepSpeed

_DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "zero_optimization", "bf16", "fp16", "activation_checkpointing", "tensor_parallel"}


def _ds_int(cfg: dict, key: str, s: TrainerSettings) -> int | None:
    """An integer ds_config entry; 'auto' (the Hugging Face Trainer fills it in) or absent is None."""
    value = cfg.get(key)
    if value is None or value == "auto":
        if value == "auto":
            s.notes.append(f"{key} is 'auto' (filled in by the Hugging Face Trainer); derived from the other batch "
                           "settings and --global-batch")
        return None
    return positive_int(f"ds_config {key}", value)


def _enabled(section: object) -> bool:
    """Whether a ds_config section such as {"enabled": true} is on."""
    return isinstance(section, dict) and section.get("enabled") is True


def parse_deepspeed(text: str, *, world_size: int) -> TrainerSettings:
    """A DeepSpeed ds_config JSON: ZeRO stage, batch settings, precision, activation checkpointing, AutoTP size."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportConfigError(f"the ds_config is not valid JSON ({exc.msg} at line {exc.lineno}); give the JSON "
                                "file passed to deepspeed.initialize") from None
    if not isinstance(cfg, dict):
        raise ImportConfigError("the ds_config must be a JSON object; give the JSON file passed to "
                                "deepspeed.initialize")
    s = TrainerSettings(source=Source.DEEPSPEED, world_size=world_size)
    tp_section = cfg.get("tensor_parallel")
    if isinstance(tp_section, dict) and "autotp_size" in tp_section:
        s.tp = positive_int("ds_config tensor_parallel.autotp_size", tp_section["autotp_size"])
    s.dp = dp_from_world(s, "DeepSpeed's")
    s.micro_batch_size = _ds_int(cfg, "train_micro_batch_size_per_gpu", s)
    s.num_micro_batches = _ds_int(cfg, "gradient_accumulation_steps", s)
    s.global_batch_size = _ds_int(cfg, "train_batch_size", s)
    zero = cfg.get("zero_optimization", {})
    stage = positive_int("ds_config zero_optimization.stage", zero.get("stage", 0) if isinstance(zero, dict) else zero,
                      allow_zero=True)
    if stage > 3:
        raise ImportConfigError(f"ds_config zero_optimization.stage is {stage}; DeepSpeed has stages 0 to 3")
    s.zero_stage = ZeroStage(stage)
    if stage == 3:
        s.notes.append("DeepSpeed's own ZeRO-3 is scored with autopar's FSDP2 cost model (per-layer parameter "
                       "all-gathers and gradient reduce-scatters); its prefetch and bucket settings are not modelled")
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key) if isinstance(zero, dict) else None
        device = section.get("device", "none") if isinstance(section, dict) else "none"
        if device not in ("none", None):
            s.notes.append(f"zero_optimization.{key} to {device} is not modelled: scored as if state stays on the "
                           "GPU (less memory and more transfer time in reality)")
    if "pipeline" in cfg:
        s.notes.append("ds_config's pipeline section configures a PipelineModule built in code; its stages are not "
                       "in ds_config, so the configuration is scored with pp=1")
    if _enabled(cfg.get("bf16")) and _enabled(cfg.get("fp16")):
        raise ImportConfigError("ds_config enables both bf16 and fp16; keep one")
    s.dtype = DType.BF16 if _enabled(cfg.get("bf16")) else DType.FP16 if _enabled(cfg.get("fp16")) else None
    if s.dtype is None:
        s.notes.append("neither bf16 nor fp16 is enabled: DeepSpeed trains in float32; scored in the profile's "
                       "precision")
    if isinstance(cfg.get("activation_checkpointing"), dict):
        s.recompute = Recompute.FULL
        s.notes.append("activation_checkpointing configures deepspeed.checkpointing, which recomputes what the model "
                       "wraps; scored as full recomputation of every layer")
    s.ignored = sorted(k for k in cfg if k not in _DS_KEYS | {"pipeline"})
    return s
