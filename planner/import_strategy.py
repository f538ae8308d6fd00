"""A team's trainer configuration as an autopar `Strategy`, and why it differs from the best plan (no torch, no I/O).

    settings = parse_config("megatron-args", text, world_size=cluster.world_size)   # planner.import_configs
    imported = to_strategy(settings, profile, global_batch_size=512)
    team = evaluate(profile, cluster, imported.strategy)
    why = compare(imported.strategy, team, best.strategy, best.prediction, cluster)

Stages follow the trainer: Megatron-LM (and torchtitan without `module_fqns_per_model_part`) split the transformer
layers evenly over the (virtual) stages, with the layers before the first block on the first stage and those after
the last block on the last; torchtitan's model parts are mapped to the profile's layers by module name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

from pydantic import ValidationError

from planner.cluster import ClusterSpec
from planner.cost import place_group
from planner.evaluate import name_stages
from planner.export import split_blocks
from planner.import_configs import ImportConfigError, Source, TrainerSettings
from planner.model_profile import ModelProfile
from planner.search import SIMPLICITY_TOLERANCE
from planner.strategy import MeshAxis, ParallelDims, Prediction, Schedule, StageSpec, Strategy

GiB = 1024**3

_GLOBAL_FLAG = {Source.MEGATRON: "--global-batch-size", Source.DEEPSPEED: "train_batch_size",
                Source.TORCHTITAN: "training.global_batch_size"}
_MICRO_FLAG = {Source.MEGATRON: "--micro-batch-size", Source.DEEPSPEED: "train_micro_batch_size_per_gpu",
               Source.TORCHTITAN: "pipeline_parallel_microbatch_size"}


@dataclass(frozen=True)
class Imported:
    """A configuration as a strategy, with what autopar had to assume or could not express (`notes`) and the
    settings it did not read (`ignored`)."""

    strategy: Strategy
    notes: list[str]
    ignored: list[str]


def _blocks(profile: ModelProfile) -> tuple[str | None, list[int]]:
    """The repeated block list's name and the profile indices of its layers (every layer when nothing repeats)."""
    names = [x.name for x in profile.layers]
    prefix, _ = split_blocks([names])
    if prefix is None:
        return None, list(range(len(names)))
    pattern = re.compile(re.escape(prefix) + r"\.\d+")
    return prefix, [i for i, n in enumerate(names) if pattern.fullmatch(n)]


def _batches(s: TrainerSettings, global_batch_size: int) -> tuple[int, int]:
    """Micro-batch size and micro-batches per step per replica for `global_batch_size` samples per step."""
    if s.global_batch_size is not None and s.global_batch_size != global_batch_size:
        raise ImportConfigError(f"the configuration's {_GLOBAL_FLAG[s.source]} is {s.global_batch_size} but "
                                f"--global-batch is {global_batch_size}; give the same global batch")
    mb, m = s.micro_batch_size, s.num_micro_batches
    if mb is None and m is not None and global_batch_size % (m * s.dp) == 0:
        mb = global_batch_size // (m * s.dp)
    if mb is None:
        raise ImportConfigError(f"the configuration sets no micro-batch size ({_MICRO_FLAG[s.source]}); add it")
    if global_batch_size % (mb * s.dp):
        raise ImportConfigError(f"global batch {global_batch_size} is not a multiple of micro-batch {mb} x dp {s.dp} "
                                f"= {mb * s.dp}; change {_MICRO_FLAG[s.source]} or --global-batch")
    if m is not None and m * mb * s.dp != global_batch_size:
        raise ImportConfigError(f"gradient_accumulation_steps {m} x micro-batch {mb} x dp {s.dp} = {m * mb * s.dp} "
                                f"is not the global batch {global_batch_size}; make them agree")
    return mb, global_batch_size // (mb * s.dp)


def _virtual_stages(s: TrainerSettings, blocks: int) -> int:
    """Stages per pipeline rank the configuration asks for."""
    if s.pp == 1:
        return 1
    if s.model_parts is not None:
        if len(s.model_parts) % s.pp:
            raise ImportConfigError(f"module_fqns_per_model_part has {len(s.model_parts)} parts, not a multiple of "
                                    f"pipeline_parallel_degree {s.pp}; give pp x stages-per-rank parts")
        return len(s.model_parts) // s.pp
    if s.layers_per_virtual_stage is not None:
        per = s.layers_per_virtual_stage
        if blocks % (per * s.pp):
            raise ImportConfigError(f"{blocks} transformer layers do not split into {per} per virtual stage on pp="
                                    f"{s.pp} ranks; pick a layer count per stage dividing {blocks // s.pp}")
        return blocks // (per * s.pp)
    return s.virtual_stages or 1


def _even_bounds(profile: ModelProfile, chunks: int, first: int | None, last: int | None) -> list[int]:
    """Stage boundaries splitting the transformer blocks evenly (first/last stage sizes fixed when given)."""
    _, blocks = _blocks(profile)
    n = len(blocks)
    if chunks == 1:
        return [0, profile.num_layers]
    fixed = [x for x in (first, last) if x is not None]
    middle = chunks - len(fixed)
    rest = n - sum(fixed)
    if rest < 0 or (middle and rest % middle) or (not middle and rest):
        raise ImportConfigError(f"{n} transformer layers do not split evenly into {chunks} pipeline stages"
                                + (f" with {first} on the first and {last} on the last" if fixed else "")
                                + "; Megatron-LM needs --num-layers divisible by pp x virtual stages")
    counts = [rest // middle if middle else 0] * chunks
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    if min(counts) < 1:
        raise ImportConfigError(f"a pipeline stage would hold no transformer layer ({counts}); use fewer stages")
    bounds, k = [0], 0
    for c in counts[:-1]:
        k += c
        bounds.append(blocks[k])
    return bounds + [profile.num_layers]


def _part_bounds(profile: ModelProfile, parts: list[list[str]]) -> list[int]:
    """Stage boundaries from torchtitan's module names per model part (each a layer or the parent of layers)."""
    names = [x.name for x in profile.layers]
    owner: dict[int, int] = {}
    for k, part in enumerate(parts):
        if not part:
            raise ImportConfigError(f"model part {k} of module_fqns_per_model_part is empty; give it a module")
        for fqn in part:
            hits = [i for i, n in enumerate(names) if n == fqn or n.startswith(fqn + ".")]
            if not hits:
                raise ImportConfigError(f"module_fqns_per_model_part names '{fqn}' (model part {k}), which is not a "
                                        f"layer of {profile.name}; use its module names ({names[0]}, ..., "
                                        f"{names[-1]})")
            for i in hits:
                if owner.setdefault(i, k) != k:
                    raise ImportConfigError(f"layer {names[i]} is in model parts {owner[i]} and {k}; name it once")
    missing = [n for i, n in enumerate(names) if i not in owner]
    if missing:
        raise ImportConfigError(f"layer {missing[0]} of {profile.name} is in no module_fqns_per_model_part entry; "
                                "add it to one")
    order = [owner[i] for i in range(len(names))]
    if order != sorted(order) or set(order) != set(range(len(parts))):
        bad = next(i for i in range(1, len(order)) if order[i] < order[i - 1])
        raise ImportConfigError(f"model part {order[bad - 1]} holds layer {names[bad - 1]} after part {order[bad]} "
                                f"holds {names[bad]}: parts must be runs of consecutive layers in model order")
    return [order.index(k) for k in range(len(parts))] + [len(names)]


def to_strategy(settings: TrainerSettings, profile: ModelProfile, *, global_batch_size: int) -> Imported:
    """The strategy `settings` describes for `profile` at `global_batch_size` samples per step."""
    s, notes = settings, list(settings.notes)
    prefix, blocks = _blocks(profile)
    if s.num_layers is not None and s.num_layers != len(blocks):
        raise ImportConfigError(f"the configuration has --num-layers {s.num_layers} but {profile.name} has "
                                f"{len(blocks)} transformer layers" + (f" ({prefix}.*)" if prefix else "")
                                + "; give the model the configuration trains")
    if s.seq_len is not None and profile.input.seq_len is not None and s.seq_len != profile.input.seq_len:
        notes.append(f"the configuration trains on {s.seq_len} tokens per sample but the model was profiled at "
                     f"{profile.input.seq_len}; scored at {profile.input.seq_len} (give --seq-len {s.seq_len})")
    if s.dtype is not None and s.dtype != profile.dtype:
        notes.append(f"the configuration trains in {s.dtype.value} but the profile is in {profile.dtype.value}; "
                     f"scored in {profile.dtype.value}")
    mb, m = _batches(s, global_batch_size)
    v = _virtual_stages(s, len(blocks))
    schedule = Schedule.ONE_F_ONE_B if s.pp == 1 else s.schedule or (
        Schedule.INTERLEAVED_1F1B if v > 1 else Schedule.ONE_F_ONE_B)
    if schedule == Schedule.INTERLEAVED_1F1B and v == 1:
        raise ImportConfigError("the interleaved schedule needs at least 2 stages per pipeline rank; give "
                                "module_fqns_per_model_part with 2 x pp parts, or a 1F1B schedule")
    if schedule != Schedule.INTERLEAVED_1F1B and v > 1:
        raise ImportConfigError(f"the {schedule.value} schedule runs one stage per pipeline rank but the "
                                f"configuration gives {v}; use an interleaved schedule or pp parts")
    if s.model_parts is not None and s.pp > 1:
        bounds = _part_bounds(profile, s.model_parts)
    else:
        bounds = _even_bounds(profile, s.pp * v, s.first_stage_layers if s.pp > 1 else None,
                              s.last_stage_layers if s.pp > 1 else None)
    try:
        strategy = Strategy(
            dims=ParallelDims(dp=s.dp, tp=s.tp, pp=s.pp, world_size=s.world_size), mesh_order=s.mesh_order,
            zero_stage=s.zero_stage, micro_batch_size=mb, num_micro_batches=m, schedule=schedule, virtual_stages=v,
            recompute=s.recompute, sequence_parallel=s.sequence_parallel,
            stages=[StageSpec(start=a, stop=b) for a, b in pairwise(bounds)])
    except ValidationError as exc:
        msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ImportConfigError(f"the configuration is not a valid strategy: {msg}") from None
    return Imported(strategy=name_stages(strategy, profile), notes=notes, ignored=list(s.ignored))


# ---------------------------------------------------------------- why it differs from the best plan


@dataclass(frozen=True)
class Difference:
    """One component of the step time: the team's and the best plan's seconds, and what it is in words."""

    component: str
    team_seconds: float
    best_seconds: float
    share: float  # (team - best) / the team's step time
    text: str

    @property
    def seconds(self) -> float:
        """What the team's configuration spends more (negative: less) than the best plan."""
        return self.team_seconds - self.best_seconds


@dataclass(frozen=True)
class Comparison:
    """The team's configuration beside the best plan: a verdict and the differences, largest first."""

    verdict: str
    differences: list[Difference]
    over: list[tuple[int, float]]  # (pipeline rank, bytes over capacity) where the team's configuration does not fit


def _spans_nodes(strategy: Strategy, axis: MeshAxis, cluster: ClusterSpec) -> bool:
    """Whether a group of `axis` leaves a node under the strategy's mesh order."""
    order, stride = list(strategy.mesh_order), 1
    for inner in order[order.index(axis) + 1:]:
        stride *= strategy.dims.degree(inner)
    return place_group(strategy.dims.degree(axis), stride, cluster.gpus_per_node).spans_nodes


def _comm_group(purpose: str, axis: MeshAxis) -> str:
    """Which line of the comparison a collective belongs to."""
    if axis != MeshAxis.DP:
        return axis.value
    return "zero3" if purpose.startswith("ZeRO-3") else "zero2" if purpose.startswith("ZeRO-2") else "dp"


def _comm_seconds(p: Prediction) -> dict[str, float]:
    """Exposed communication seconds per comparison line; what the list does not account for is 'other'."""
    out: dict[str, float] = {}
    for c in p.time.comms:
        key = _comm_group(c.purpose, c.axis)
        out[key] = out.get(key, 0.0) + c.exposed_seconds
    out["other"] = p.time.exposed_comm - sum(out.values())
    return out


def _share(x: float) -> str:
    """A share of a step in words: whole percents, one decimal below 10%."""
    if 0 < x < 0.0005:
        return "under 0.1%"
    return f"{x:.0%}" if x >= 0.1 else f"{x:.1%}"


def _describe(key: str, s: Strategy, p: Prediction, seconds: float, whose: str, cluster: ClusterSpec) -> str:
    """One component of a step in words, e.g. 'your pp=8 bubble (1f1b, 32 micro-batches) costs 11% of your step'."""
    d, cost = s.dims, f"{_share(seconds / p.step_seconds)} of {'your' if whose == 'your' else 'its'} step"
    where = "across nodes" if key in ("tp", "pp", "zero3", "dp") and _spans_nodes(
        s, MeshAxis(key if key in ("tp", "pp") else "dp"), cluster) else "inside a node"
    sched = s.schedule.value + (f", {s.virtual_stages} stages per rank" if s.virtual_stages > 1 else "")
    return {
        "compute": f"compute on {whose} slowest pipeline rank takes {cost} (tp={d.tp}, micro-batch "
                   f"{s.micro_batch_size}, its share of the layers)",
        "recompute": f"{whose} {s.recompute.value} recompute adds {cost}",
        "bubble": f"{whose} pp={d.pp} bubble ({sched}, {s.num_micro_batches} micro-batches) costs {cost}",
        "optimizer": f"{whose} optimizer step takes {cost} (ZeRO stage {int(s.zero_stage)}, dp={d.dp})",
        "tp": f"{whose} exposed tensor-parallel communication (tp={d.tp}, {where}) costs {cost}",
        "pp": f"{whose} pipeline stage-to-stage sends (pp={d.pp}, {where}) cost {cost}",
        "zero3": f"{whose} ZeRO-3 parameter all-gathers (dp={d.dp}, {where}) cost {cost}",
        "zero2": f"{whose} ZeRO-2 gradient reduce-scatters every micro-batch (dp={d.dp}) cost {cost}",
        "dp": f"{whose} exposed data-parallel gradient sync (dp={d.dp}, {where}) costs {cost}",
        "other": f"{whose} other exposed communication costs {cost}",
    }[key]


_COMPONENTS = ("compute", "recompute", "bubble", "optimizer", "tp", "pp", "zero3", "zero2", "dp", "other")


def _parts(p: Prediction) -> dict[str, float]:
    """Seconds of each comparison line in a prediction (they add up to its step time)."""
    return {k: getattr(p.time, k) for k in ("compute", "recompute", "bubble", "optimizer")} | _comm_seconds(p)


def compare(team_strategy: Strategy, team: Prediction, best_strategy: Strategy, best: Prediction,
            cluster: ClusterSpec) -> Comparison:
    """Why the team's configuration and the best plan differ, per component of the step, largest first.

    Each difference is in seconds and as a share of the team's step; it is described from the team's side where
    the team spends more, from the best plan's side where the best plan does."""
    step = team.step_seconds
    mine, theirs = _parts(team), _parts(best)
    diffs = []
    for key in _COMPONENTS:
        t, b = mine.get(key, 0.0), theirs.get(key, 0.0)
        if abs(t - b) <= 1e-9 * step:
            continue
        text = (_describe(key, team_strategy, team, t, "your", cluster) if t > b else
                _describe(key, best_strategy, best, b, "the best plan's", cluster)
                + (f"; yours {_share(t / step)}" if t > 0 else "; yours has none"))
        diffs.append(Difference(component=key, team_seconds=t, best_seconds=b, share=(t - b) / step, text=text))
    diffs.sort(key=lambda x: -x.seconds)
    over = [(r, m.total - m.capacity) for r, m in enumerate(team.memory) if m.total > m.capacity]
    ratio = step / best.step_seconds
    if abs(ratio - 1) <= 0.01:
        verdict = "your configuration is as good as autopar's best plan (within 1%)"
    elif ratio < 1:
        verdict = (f"your configuration is predicted {1 - ratio:.1%} faster than autopar's choice, which takes the "
                   f"simpler strategy when one is within {SIMPLICITY_TOLERANCE:.0%} of the fastest")
    else:
        faster = f"{ratio:.1f}x as fast" if ratio >= 2 else f"{ratio - 1:.0%} faster"
        verdict = (f"autopar's best plan is predicted {faster} ({best.step_seconds:.4g} s vs your {step:.4g} s "
                   "per step)")
    if over:
        rank, nbytes = max(over, key=lambda x: x[1])
        verdict = f"your configuration does not fit: {nbytes / GiB:.1f} GiB over on stage {rank}; " + verdict
    return Comparison(verdict=verdict, differences=diffs, over=over)
