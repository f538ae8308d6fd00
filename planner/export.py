"""A plan as the configuration of the trainers people use: `export_plan(plan, target) -> Export` (no torch, no I/O).

Targets: torchtitan (command-line overrides or TOML), Megatron-LM (launch arguments), DeepSpeed (`ds_config` JSON),
Hugging Face accelerate (`accelerate config` YAML, FSDP2) and Lightning (`Trainer` / strategy as Python). Whatever a
target cannot express is named in `Export.warnings` (and in the text's comments where its format has comments)
instead of being dropped: unequal pipeline stages where a target wants them equal, a schedule or ZeRO stage it lacks,
pipeline parallelism where it has none, a mesh order other than its fixed one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from planner.errors import AutoparError
from planner.model_profile import DType
from planner.strategy import DEFAULT_MESH_ORDER, Plan


class ExportError(AutoparError):
    """A plan that cannot be exported as asked; the message says why and what to do."""


class Target(str, Enum):
    """Trainers a plan can be exported to."""

    TORCHTITAN = "torchtitan"
    MEGATRON = "megatron"
    DEEPSPEED = "deepspeed"
    ACCELERATE = "accelerate"
    LIGHTNING = "lightning"


class Format(str, Enum):
    """Text formats; each target has a default and torchtitan takes both `args` and `toml`."""

    ARGS = "args"
    TOML = "toml"
    JSON = "json"
    YAML = "yaml"
    PYTHON = "python"


DEFAULT_FORMAT = {Target.TORCHTITAN: Format.ARGS, Target.MEGATRON: Format.ARGS, Target.DEEPSPEED: Format.JSON,
                  Target.ACCELERATE: Format.YAML, Target.LIGHTNING: Format.PYTHON}


@dataclass(frozen=True)
class Export:
    """One exported configuration: its text, its format and what the target could not express."""

    target: Target
    format: Format
    text: str
    warnings: list[str] = field(default_factory=list)


def export_plan(plan: Plan, target: Target | str, fmt: Format | str | None = None) -> Export:
    """`plan` as `target`'s configuration in `fmt` (default: the target's own format, see DEFAULT_FORMAT)."""
    try:
        tgt = Target(target)
    except ValueError:
        raise ExportError(f"unknown export target '{target}'; use one of "
                          f"{', '.join(t.value for t in Target)}") from None
    try:
        form = DEFAULT_FORMAT[tgt] if fmt is None else Format(fmt)
    except ValueError:
        raise ExportError(f"unknown format '{fmt}'; use one of {', '.join(f.value for f in Format)}") from None
    allowed = (Format.ARGS, Format.TOML) if tgt == Target.TORCHTITAN else (DEFAULT_FORMAT[tgt],)
    if form not in allowed:
        raise ExportError(f"{tgt.value} exports as {' or '.join(f.value for f in allowed)}, not {form.value}; "
                          f"drop --format or use --format {allowed[0].value}")
    # The writers import this module's helpers, so they are imported here rather than at the top.
    from planner.export_configs import accelerate_yaml, deepspeed_json, lightning_python
    from planner.export_launch import megatron, torchtitan

    if tgt == Target.TORCHTITAN:
        text, warnings = torchtitan(plan, form)
    elif tgt == Target.MEGATRON:
        text, warnings = megatron(plan)
    elif tgt == Target.DEEPSPEED:
        text, warnings = deepspeed_json(plan)
    elif tgt == Target.ACCELERATE:
        text, warnings = accelerate_yaml(plan)
    else:
        text, warnings = lightning_python(plan)
    return Export(target=tgt, format=form, text=text, warnings=warnings)


def stage_layers(plan: Plan, target: Target) -> list[list[str]]:
    """The module names of each (virtual) stage, in stage order; an ExportError for plans that lack them."""
    stages = plan.strategy.stages
    if any(not s.layers for s in stages):
        raise ExportError(f"this plan does not record its layers' module names (made before they were), and the "
                          f"{target.value} export needs them; make the plan again with `autopar plan ... --out`")
    return [list(s.layers) for s in stages]


def split_blocks(names: list[list[str]]) -> tuple[str | None, list[int]]:
    """The repeated block list (e.g. 'blocks' of 'blocks.0' .. 'blocks.23') and how many of its layers each stage
    holds; (None, layers per stage) when no name repeats with an index."""
    prefixes = Counter(m.group(1) for stage in names for n in stage if (m := re.fullmatch(r"(.+)\.\d+", n)))
    if not prefixes:
        return None, [len(stage) for stage in names]
    prefix = prefixes.most_common(1)[0][0]
    return prefix, [sum(1 for n in stage if re.fullmatch(re.escape(prefix) + r"\.\d+", n)) for stage in names]


def mesh_warning(plan: Plan, target: str, layout: str) -> list[str]:
    """A warning when the plan's mesh order differs from autopar's default (which is also each target's own)."""
    order = tuple(plan.strategy.mesh_order)
    if order == tuple(DEFAULT_MESH_ORDER):
        return []
    text = (f"mesh order {','.join(a.value for a in order)} (outermost first) cannot be expressed: {target} lays "
            f"out ranks as {layout}, so the plan's rank groups differ and its communication estimate does not hold")
    return [text]


def precision_name(plan: Plan) -> DType | None:
    """The precision the plan trains in, when recorded."""
    return plan.provenance.dtype


def header(plan: Plan, target: str, comment: str, warnings: list[str]) -> list[str]:
    """Comment lines: what was exported from which plan, then one line per thing the target cannot express."""
    p, s = plan.provenance, plan.strategy
    lines = [(f"{comment} autopar plan for {p.model_name} on {p.cluster.name} "
              f"{p.cluster.nodes}x{p.cluster.gpus_per_node}, exported for {target}"),
             f"{comment} strategy: {s.describe()}; predicted {plan.prediction.step_seconds:.4g} s per step"]
    lines += [f"{comment} WARNING: {w}" for w in warnings]
    return lines
