"""`planner.plan(model, cluster, ...) -> Plan`: load inputs, search, and explain the choice in words and numbers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from planner.budget import Budget
from planner.cluster import ClusterSpec, load_cluster
from planner.enumerate import SearchSpace
from planner.errors import AutoparError
from planner.evaluate import PlanError, name_stages, prepare
from planner.model_profile import ModelProfile, ProfileError
from planner.search import SIMPLICITY_TOLERANCE, Objective, Scored, SearchResult, search
from planner.strategy import Alternative, Plan, Provenance, Recompute, RunCalibration, Schedule, ZeroStage

log = logging.getLogger(__name__)

PLANNER_VERSION = "0.3.6"  # 0.3.6: activations in autocast's dtypes where 16-bit compute runs as torch.autocast; 0.3.5: experts shards split the intermediate GEMM dimension; sequence parallelism searched with pipelining too (cuts after such layers send shards); 0.3.4: transcendental elements per pass (cpu preset); 0.3.3: sequence parallelism (Strategy.sequence_parallel, planner.tp_comm); 0.3.2: memory counts the runtime, AdamW temporaries, output buffers; part of the service's plan keys: bumped whenever the cost model or the search changes
GB = 1e9


def read_profile(path: str | Path) -> ModelProfile:
    """A profile JSON written by `autopar profile`, with every way it can be unusable turned into one line."""
    fix = "give a profile JSON written by `autopar profile --out` (or a zoo name)"
    if Path(path).is_dir():
        raise ProfileError(f"{path} is a directory, not a model profile; {fix}")
    if not Path(path).exists():
        raise ProfileError(f"profile file {path} does not exist; write it with `autopar profile MODEL --out {path}`, "
                           "or name the model itself")
    try:
        result = ModelProfile.from_json(Path(path))
    except AutoparError:
        raise  # already names the problem and the fix (planner.model_profile.ProfileError)
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read model profile {path} ({exc}); {fix}") from None
    except ValueError as exc:
        lines = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in lines[:3]) if lines else type(exc).__name__
        raise ProfileError(f"{path} is not a valid model profile ({detail}); {fix}") from None
    if result.fwd_flops <= 0 or result.param_count + result.saved_activation_bytes <= 0:
        raise ProfileError(f"{path} is a model profile with no compute (zero FLOPs, parameters and activations); "
                           f"profile the model again, {fix}")
    return result


def load_profile(model: Any, *, example_inputs: Any = None, cluster: ClusterSpec | None = None, dtype: Any = None,
                 model_options: dict[str, Any] | None = None) -> ModelProfile:
    """A ModelProfile from a profile, or anything `profiler.resolve.resolve_profile` takes: a zoo name, a
    file.py:factory / package.module:factory, a profile JSON path, hf:config.json, or an nn.Module with
    example_inputs; profiled in `dtype`, else in what `cluster` trains in (`planner.precision.default_dtype`)."""
    if isinstance(model, ModelProfile) and dtype is None:
        return model
    if (isinstance(model, (str, Path)) and Path(model).suffix == ".json" and not str(model).startswith("hf:")
            and not model_options and dtype is None):
        return read_profile(model)  # a finished profile needs no torch
    from profiler.resolve import resolve_profile  # torch is imported only to profile a model here

    return resolve_profile(model, options=model_options, example_inputs=example_inputs, cluster=cluster,
                           dtype=dtype).profile


def plan(model: Any, cluster: ClusterSpec | str | Path, *, global_batch_size: int, example_inputs: Any = None,
         dtype: Any = None, model_options: dict[str, Any] | None = None, top_k: int = 5, time_limit_s: float = 10.0, seed: int = 0, objective: str = "throughput",
         workers: int = 1, simplicity_tolerance: float = SIMPLICITY_TOLERANCE, cancel: Any = None,
         calibration: RunCalibration | None = None, **search_options: Any) -> Plan:
    """The best parallel strategy for training `model` on `cluster` with `global_batch_size` samples per step.

    `model` is a ModelProfile or a model reference (see `load_profile`); `model_options` are the reference's options
    (zoo config fields, factory keyword arguments, `seq_len`), `dtype` the precision to profile it in (default: what
    the cluster's devices train in, `planner.precision.default_dtype`; the plan records it for `autopar run`).

    `search_options` restrict the search space (see `planner.enumerate.SearchSpace`: zero_stages, schedules,
    virtual_stages, recompute, micro_batch_sizes, tp_degrees, pp_degrees). `time_limit_s` is the search budget: it
    stops earlier only once the choice is proved optimal, and the provenance gives the gap it proved otherwise.
    `simplicity_tolerance` (default 3%, the cost model's measured error): among strategies predicted within this
    fraction of the fastest, the simplest is chosen (DDP over ZeRO-1 over ZeRO-3, no pipeline over a pipeline, less
    recomputation, less tensor parallelism); 0 always takes the fastest. The memory objective ignores it.

    `time_limit_s` bounds the whole call once the profile is loaded: graph preparation and search share one
    deadline (`planner.budget.Budget`, at least 0.5 s). `cancel` is an optional `threading.Event`; setting it from
    another thread stops preparation or search with `PlanCancelled` (the service sets it for an abandoned request).
    `calibration` (from `planner.run_fit`, with `cluster` the fitted one) is recorded in the plan's provenance.
    """
    if global_batch_size < 1:
        raise PlanError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if not 0 <= simplicity_tolerance < 1:
        raise PlanError(f"simplicity_tolerance must be in [0, 1), got {simplicity_tolerance}; use 0.03 for 3%")
    try:
        obj = Objective(objective)
    except ValueError:
        raise PlanError(f"unknown objective '{objective}'; use 'throughput' or 'memory'") from None
    spec = cluster if isinstance(cluster, ClusterSpec) else load_cluster(cluster)
    profile = load_profile(model, example_inputs=example_inputs, cluster=spec, dtype=dtype,
                           model_options=model_options)
    unknown = set(search_options) - set(SearchSpace.__dataclass_fields__)
    if unknown:
        raise PlanError(f"unknown search option(s) {sorted(unknown)}; known: {sorted(SearchSpace.__dataclass_fields__)}")
    space = SearchSpace(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in search_options.items()})
    budget = Budget(time_limit_s, cancel)
    view = prepare(profile, spec, budget)
    result = search(view, spec, global_batch_size=global_batch_size, top_k=top_k, time_limit_s=time_limit_s,
                    seed=seed, workers=workers, objective=obj, space=space,
                    simplicity_tolerance=simplicity_tolerance, budget=budget)
    best = result.best
    log.info("planned %s on %s in %.2fs (%d candidates solved)", profile.name, spec.name, result.seconds,
             result.evaluated)
    return Plan(
        kind=best.strategy.kind, strategy=name_stages(best.strategy, profile), prediction=best.prediction,
        explanation=explain(result, spec, profile, obj),
        alternatives=[a.model_copy(update={"strategy": name_stages(a.strategy, profile)})
                      for a in alternatives(result, top_k)],
        provenance=Provenance(model_name=profile.name, profile_hash=profile.profile_hash, cluster=spec,
                              planner_version=PLANNER_VERSION, search_seconds=result.seconds,
                              solver_status=result.status, candidates_evaluated=result.evaluated,
                              dtype=profile.dtype, seq_len=profile.input.seq_len,
                              model_options=_scalar_options(model_options), calibration=calibration),
    )


def _scalar_options(options: dict[str, Any] | None) -> dict[str, str | int | float | bool]:
    """The model options a plan records: the JSON scalars (what `--option key=value` gives), others left out."""
    return {k: v for k, v in (options or {}).items() if isinstance(v, (str, int, float, bool))}


def _dominant_loss(alt: Scored, best: Scored) -> str:
    """The part of the alternative's step time that grew the most, in words."""
    a, b = alt.prediction, best.prediction
    step = a.step_seconds
    top = max(a.time.comms, key=lambda c: c.exposed_seconds, default=None)
    parts = {
        "pipeline bubble": (a.time.bubble - b.time.bubble, f"pipeline bubble {a.time.bubble / step:.0%}"),
        "comm": (a.time.exposed_comm - b.time.exposed_comm,
                 f"exposed communication {a.time.exposed_comm / step:.0%}"
                 + (f" ({top.collective} on {top.axis.value})" if top is not None else "")),
        "compute": (a.time.compute - b.time.compute, f"compute {a.time.compute:.3g} s per step on its slowest rank"),
        "recompute": (a.time.recompute - b.time.recompute, f"recomputation {a.time.recompute / step:.0%}"),
        "optimizer": (a.time.optimizer - b.time.optimizer, f"optimizer step {a.time.optimizer:.3g} s"),
    }
    return max(parts.values(), key=lambda x: x[0])[1]


def reason(alt: Scored, best: Scored) -> str:
    """Why `alt` lost to `best`, e.g. 'does not fit: 12.4 GB over on stage 0' or '9% slower: pipeline bubble 14%'."""
    if not alt.fits:
        return f"does not fit: {alt.over_bytes / GB:.1f} GB over on stage {alt.over_rank}"
    slower = alt.prediction.step_seconds / best.prediction.step_seconds - 1
    if slower <= -0.0005:
        return (f"{-slower:.1%} faster, within the error the cost model cannot resolve; the simpler "
                f"{_simpler_words(alt, best)[1]} was chosen")
    if slower < 0.0005:
        return (f"same predicted time; needs {alt.prediction.peak_memory / GB:.1f} GB per device vs "
                f"{best.prediction.peak_memory / GB:.1f} GB, ranked lower")
    return f"{slower:.0%} slower: {_dominant_loss(alt, best)}"


def alternatives(result: SearchResult, top_k: int) -> list[Alternative]:
    """The best strategy of other degree groups (and faster groups that do not fit), each with its reason."""
    best = result.best
    pool = list(result.ranked[1:])
    pool += [s for s in result.misfits if s.prediction.step_seconds < best.prediction.step_seconds][:2]
    pool.sort(key=lambda s: (s.fits, s.prediction.step_seconds))
    pool = sorted(pool[: top_k], key=lambda s: s.prediction.step_seconds)
    return [Alternative(strategy=s.strategy, prediction=s.prediction, reason=reason(s, best)) for s in pool]


def explain(result: SearchResult, cluster: ClusterSpec, profile: ModelProfile, objective: Objective) -> str:
    """Why this strategy, in a few sentences with numbers."""
    b = result.best
    p, s, d = b.prediction, b.strategy, b.strategy.dims
    peak = max(range(len(p.memory)), key=lambda r: p.memory[r].total)
    out = [(
        f"{s.kind.value} parallelism ({s.describe()}) on {cluster.world_size} x {cluster.device.name} in "
        f"{profile.dtype.value}: {p.step_seconds:.3g} s per step, {p.tokens_per_second:,.0f} tokens/s, "
        f"MFU {p.mfu:.0%}, peak memory {p.memory[peak].total / GB:.1f} of {p.memory[peak].capacity / GB:.1f} GB "
        f"usable (pipeline rank {peak})."
    )]
    state = profile.param_count * 16 / GB
    if d.dp == cluster.world_size and int(s.zero_stage) == 0:
        out.append(f"The model's training state ({state:.1f} GB at 16 bytes per parameter) fits one device, so "
                   "every device holds a replica and only gradients are exchanged.")
    elif d.dp == cluster.world_size:
        out.append(f"The model's training state ({state:.1f} GB at 16 bytes per parameter) is sharded by ZeRO "
                   f"stage {int(s.zero_stage)} over all {d.dp} devices, so no layer needs splitting.")
    else:
        pure = result.pure_dp
        if pure is None:
            miss = next((m for m in result.misfits if m.cfg.dims.tp == 1 and m.cfg.dims.pp == 1), None)
            why = (f"does not fit ({miss.over_bytes / GB:.1f} GB over)" if miss is not None
                   else "does not fit one device or cannot split this batch")
            out.append(f"Pure data parallelism {why}: the training state alone is {state:.1f} GB.")
        else:
            slower = pure.prediction.step_seconds / p.step_seconds - 1
            out.append(f"Pure data parallelism would fit but is {slower:.0%} slower "
                       f"({_dominant_loss(pure, b)}).")
    if d.tp > 1:
        out.append(f"Tensor parallelism of {d.tp} stays inside a node ({cluster.gpus_per_node} GPUs on "
                   f"{cluster.intra_node.bandwidth / GB:.0f} GB/s links) and splits each layer's weights and "
                   "FLOPs.")
    if d.pp > 1:
        sched = s.schedule.value + (f" with {s.virtual_stages} chunks per rank" if s.virtual_stages > 1 else "")
        out.append(f"{d.pp} pipeline stages ({sched}) run {s.num_micro_batches} micro-batches of "
                   f"{s.micro_batch_size}; the bubble costs {p.time.bubble / p.step_seconds:.0%} of the step.")
    if s.recompute != Recompute.NONE:
        out.append(f"{s.recompute.value.capitalize()} recomputation trades {p.time.recompute / p.step_seconds:.0%} "
                   "extra compute for activation memory.")
    if int(s.zero_stage) and d.dp < cluster.world_size:
        out.append(f"ZeRO stage {int(s.zero_stage)} shards training state over the {d.dp} data-parallel ranks.")
    if result.fastest is not None:
        fast, simple = _simpler_words(result.fastest, b)
        gain = 1 - result.fastest.prediction.step_seconds / p.step_seconds
        out.append(f"{fast[0].upper() + fast[1:]} ({result.fastest.strategy.describe()}) was predicted {gain:.1%} "
                   f"faster, within the {result.tolerance:.0%} the cost model cannot resolve; {simple} chosen as "
                   "simpler.")
    if not result.proved:
        out.append(f"The search stopped at its time budget: no strategy is predicted more than {result.gap:.1%} faster "
                   "than the fastest it found, and a larger time limit may find one.")
    if not result.checked:
        out.append(f"The time budget ran out before every simpler strategy predicted within {result.tolerance:.0%} "
                   "of the fastest was checked; a larger time limit may find a simpler one.")
    if objective == Objective.MEMORY:
        out.append("Objective: least peak memory among strategies that fit, then step time.")
    if s.schedule == Schedule.GPIPE:
        out.append("GPipe keeps every micro-batch's activations until the backward pass.")
    return " ".join(out)


def _simpler_words(fast: Scored, simple: Scored) -> tuple[str, str]:
    """How the faster and the simpler strategy differ, in the first respect of `planner.search.simplicity`."""
    f, s = fast.cfg, simple.cfg

    def zero(c) -> str:
        if c.zero_stage == ZeroStage.NONE:
            return "DDP" if c.dims.dp > 1 else "no ZeRO"
        return f"ZeRO-{int(c.zero_stage)}"

    def pipe(c) -> str:
        return "no pipeline" if c.dims.pp == 1 else (
            f"a {c.dims.pp}-stage pipeline" + (f" with {c.virtual_stages} chunks per rank" if c.virtual_stages > 1
                                              else ""))

    def recompute(c) -> str:
        return f"{c.recompute.value} recomputation"

    def tp(c) -> str:
        return f"tensor parallelism {c.dims.tp}"

    for words in (zero, pipe, recompute, tp):
        if words(f) != words(s):
            return words(f), words(s)
    return "the faster strategy", "this one"
