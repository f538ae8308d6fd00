"""What the service does, as plain functions: resolve a request to a profile and a cluster, key it, search, store.

Routes only translate HTTP to these calls. Safety rules live here: a model is a zoo name (built by the registry
on the meta device, never an import path) or profile data; a cluster is a preset name (never a file path) or
cluster data; sizes, world sizes and solver time are bounded by `Settings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

import planner
from api.errors import ApiError
from api.retention import apply_retention
from api.runner import ResultCache, SearchRunner
from api.schemas import (
    ClusterRef,
    ModelRef,
    PlanPage,
    PlanRequest,
    PlanResponse,
    PlanSummary,
    PresetClusterRef,
    ProfileCreated,
    ProfileModelRef,
    StoredProfile,
    StoredProfileRef,
    ZooModelRef,
)
from api.settings import Settings
from api.storage import PlanRow, Storage
from planner.cluster import PRESETS, ClusterError, ClusterSpec, load_cluster, preset_names
from planner.errors import AutoparError
from planner.model_profile import ModelProfile
from planner.precision import default_dtype
from planner.strategy import Plan, RunCalibration

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """Everything a request handler needs: settings, storage, the search pool and the what-if answer cache."""

    settings: Settings
    storage: Storage
    runner: SearchRunner
    evaluations: ResultCache = dataclasses.field(default_factory=lambda: ResultCache(256))


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete enough to key: either a profile, or a validated zoo config to profile."""

    key: dict[str, Any]
    name: str
    profile: ModelProfile | None = None
    zoo: ZooModelRef | None = None


def digest(data: Any) -> str:
    """SHA-256 of `data` as canonical JSON: the content key of a request or profile."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def profile_id(profile: ModelProfile) -> str:
    """Content id of a profile: equal profiles get equal ids."""
    return "prof-" + digest(profile.model_dump(mode="json"))[:24]


def _stored_json(obj: BaseModel, what: str) -> str:
    """`obj` as JSON, checked to read back as the same type (every number finite) before anything is stored."""
    text = obj.model_dump_json()
    try:
        type(obj).model_validate_json(text)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(x) for x in problem["loc"])
        raise ApiError(422, f"invalid_{what}", f"the {what} would not read back ({where}: {problem['msg']}); "
                       "nothing was stored: check the inputs' units and ranges", where or None) from None
    return text


def _timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


# -- model and cluster ---------------------------------------------------------------------------------------------


def _estimate_params(config: Any) -> float:
    """Rough parameter count of a transformer-like config (blocks + embeddings); 0 for configs without a width."""
    hidden = getattr(config, "hidden", 0)
    layers = getattr(config, "num_layers", 0)
    ffn = getattr(config, "ffn_hidden", None)
    # Attention 4 h^2; MLP 2 h * (ratio h), or 3 h * ffn for a gated (SwiGLU) one.
    mlp = 3 * hidden * ffn if ffn else 2 * getattr(config, "mlp_ratio", 4) * hidden * hidden
    embed = getattr(config, "vocab_size", 0) + getattr(config, "max_positions", 0)
    return layers * (4 * hidden * hidden + mlp) + embed * hidden


def _zoo_config(ref: ZooModelRef, settings: Settings) -> dict[str, Any]:
    """Validate a zoo reference against the registry and the size limits; its full config as plain data."""
    from profiler.zoo import (  # the zoo needs torch: import only when a zoo model is asked for
        ZooError,
        get_model,
    )

    options = ref.options.model_dump(exclude_none=True)
    try:
        zoo_model = get_model(ref.name, **options)
    except ZooError as exc:
        field = "model.name" if ref.name not in _zoo_names() else "model.options"
        raise ApiError(422, "unknown_model" if field == "model.name" else "invalid_model_options", str(exc), field)
    config = zoo_model.config
    layers = getattr(config, "num_layers", 0)
    if layers + 2 > settings.max_profile_layers:
        raise ApiError(422, "model_too_large", f"{layers} layers is over this server's limit of "
                       f"{settings.max_profile_layers - 2}; ask for fewer layers", "model.options.num_layers")
    params = _estimate_params(config)
    if params > settings.max_zoo_params:
        raise ApiError(422, "model_too_large", f"about {params:.3g} parameters is over this server's limit of "
                       f"{settings.max_zoo_params:.3g}; ask for a smaller hidden size or fewer layers", "model.options")
    heads, hidden = getattr(config, "heads", None), getattr(config, "hidden", None)
    if heads and hidden and hidden % heads:
        raise ApiError(422, "invalid_model_options", f"heads ({heads}) must divide hidden ({hidden})",
                       "model.options.heads")
    return {"family": zoo_model.family, **config.model_dump(mode="json")}


@lru_cache(maxsize=1)
def _zoo_names() -> frozenset[str]:
    from profiler.zoo import list_models

    return frozenset(list_models())


def _check_profile(profile: ModelProfile, settings: Settings, field: str) -> None:
    if profile.num_layers > settings.max_profile_layers:
        raise ApiError(422, "model_too_large", f"the profile has {profile.num_layers} layers, over this server's "
                       f"limit of {settings.max_profile_layers}", field)


def resolve_model(ref: ModelRef, ctx: ServiceContext, cluster: ClusterSpec | None = None) -> ResolvedModel:
    """Check a model reference and turn it into its cache-key part (zoo models are profiled later, in search).

    A zoo model without a dtype is profiled in what `cluster` trains in (`planner.precision.default_dtype`), as
    every other entry point does.
    """
    if isinstance(ref, ZooModelRef):
        config = _zoo_config(ref, ctx.settings)
        if ref.dtype is None:
            ref = ref.model_copy(update={"dtype": default_dtype(cluster)})
        key = {"zoo": ref.name, "config": config, "dtype": ref.dtype.value}
        return ResolvedModel(key=key, name=ref.name, zoo=ref)
    if isinstance(ref, ProfileModelRef):
        _check_profile(ref.profile, ctx.settings, "model.profile.layers")
        return ResolvedModel(key={"profile": profile_id(ref.profile)}, name=ref.profile.name, profile=ref.profile)
    assert isinstance(ref, StoredProfileRef)
    row = ctx.storage.get_profile(ref.profile_id)
    if row is None:
        raise ApiError(422, "unknown_profile", f"no stored profile has id '{ref.profile_id}'; upload it with "
                       "POST /v1/profiles first", "model.profile_id")
    profile = ModelProfile.model_validate_json(row.body)
    return ResolvedModel(key={"profile": row.id}, name=profile.name, profile=profile)


_PROFILE_LOCK = threading.Lock()


@lru_cache(maxsize=32)
def _profile_zoo_cached(name: str, options_json: str, dtype: str, cache_dir: str | None) -> ModelProfile:
    # The one resolver of model references (allow_code=False: never importing code here).
    from profiler.resolve import resolve_profile

    # torch dispatch modes (FLOP counting) are process state: profile one model at a time.
    with _PROFILE_LOCK:
        return resolve_profile(name, options=json.loads(options_json), dtype=dtype, device="meta", cache=True,
                               cache_dir=cache_dir, allow_code=False).profile


def profile_for(model: ResolvedModel, settings: Settings) -> ModelProfile:
    """The profile of a resolved model, profiling a zoo model on the meta device (memoised per process)."""
    if model.profile is not None:
        return model.profile
    assert model.zoo is not None
    options = json.dumps(model.zoo.options.model_dump(exclude_none=True), sort_keys=True)
    cache_dir = str(settings.profile_cache_dir) if settings.profile_cache_dir else None
    try:
        return _profile_zoo_cached(model.zoo.name, options, model.zoo.dtype.value, cache_dir)
    except (AutoparError, ValueError) as exc:
        # A model constructor rejects option combinations the schema cannot express (e.g. kv_heads not dividing
        # heads) with ValueError: still the caller's options at fault.
        raise ApiError(422, "invalid_model_options", str(exc), "model.options") from None


def resolve_cluster(ref: ClusterRef, settings: Settings) -> ClusterSpec:
    """A preset (by name only: never a path on the server) or an inline spec, within the world-size limit."""
    if isinstance(ref, PresetClusterRef):
        if ref.name not in PRESETS:
            raise ApiError(422, "unknown_cluster", f"unknown cluster preset '{ref.name}'; known presets: "
                           f"{', '.join(preset_names())} (or send a full spec with kind 'spec')", "cluster.name")
        try:
            cluster = load_cluster(ref.name, nodes=ref.nodes, gpus_per_node=ref.gpus_per_node)
        except ClusterError as exc:
            raise ApiError(422, "invalid_cluster", str(exc), "cluster") from None
        field = "cluster.nodes"
    else:
        cluster, field = ref.spec, "cluster.spec.nodes"
    if cluster.world_size > settings.max_world_size:
        raise ApiError(422, "cluster_too_large", f"{cluster.world_size} devices is over this server's limit of "
                       f"{settings.max_world_size}", field)
    return cluster


# -- plans ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanJob:
    """A validated plan request: what to search, and the content key it is stored under."""

    key: str
    normalised: dict[str, Any]
    model: ResolvedModel
    cluster: ClusterSpec
    global_batch_size: int
    objective: str
    top_k: int
    time_limit_s: float
    seed: int
    calibration: RunCalibration | None = None


def prepare_plan(request: PlanRequest, ctx: ServiceContext) -> PlanJob:
    """Validate a plan request and compute its content key (equal requests after defaults get equal keys)."""
    cluster = resolve_cluster(request.cluster, ctx.settings)
    model = resolve_model(request.model, ctx, cluster)
    opts = request.options
    calibration = None
    if opts.calibrated:  # the fitted cluster is part of the key: new runs give a new plan
        from api.run_store import calibrate_cluster

        cluster, calibration = calibrate_cluster(cluster, ctx)
    time_limit = min(opts.time_limit_s or ctx.settings.default_solver_seconds, ctx.settings.max_solver_seconds)
    normalised = {
        "planner_version": planner.PLANNER_VERSION,
        "model": model.key,
        "cluster": cluster.model_dump(mode="json"),
        "global_batch_size": request.global_batch_size,
        "objective": opts.objective.value,
        "top_k": opts.top_k,
        "time_limit_s": time_limit,
        "seed": opts.seed,
    }
    return PlanJob(
        key=digest(normalised), normalised=normalised, model=model, cluster=cluster,
        global_batch_size=request.global_batch_size, objective=opts.objective.value, top_k=opts.top_k,
        time_limit_s=time_limit, seed=opts.seed, calibration=calibration,
    )


@dataclass(frozen=True)
class SearchOutcome:
    """What a plan job did: the stored row, whether it searched, and whether its plan is the one stored."""

    row: PlanRow
    searched: bool
    inserted: bool


def search_and_store(job: PlanJob, ctx: ServiceContext, cancel: threading.Event | None = None) -> SearchOutcome:
    """Profile (zoo models), search and store the plan; runs on the search pool. Setting `cancel` stops the search
    (`planner.budget.PlanCancelled`); `job.time_limit_s` bounds graph preparation and search together."""
    # Checked again here: an equal request may have stored its plan between our lookup and this job's start.
    stored = ctx.storage.find_plan(job.key)
    if stored is not None:
        return SearchOutcome(stored, searched=False, inserted=False)
    profile = profile_for(job.model, ctx.settings)
    started = time.perf_counter()
    # Looked up at call time (not imported by name) so the search function can be swapped, e.g. to count calls.
    plan: Plan = planner.plan(
        profile, job.cluster, global_batch_size=job.global_batch_size, top_k=job.top_k,
        time_limit_s=job.time_limit_s, seed=job.seed, objective=job.objective, cancel=cancel,
        **({"calibration": job.calibration} if job.calibration is not None else {}),
    )
    log.info("searched %s on %s in %.2f s: %s", job.model.name, job.cluster.name, time.perf_counter() - started,
             plan.strategy.describe())
    request_text = json.dumps({k: v for k, v in job.normalised.items() if k != "cluster"} | {
        "cluster": job.cluster.name, "world_size": job.cluster.world_size}, sort_keys=True)
    row = PlanRow(
        id=uuid.uuid4().hex, request_key=job.key, created_at=time.time(), model_name=job.model.name,
        cluster_name=job.cluster.name, world_size=job.cluster.world_size, summary=plan.strategy.describe(),
        step_seconds=plan.prediction.step_seconds, request=request_text, body=_stored_json(plan, "plan"),
    )
    # Another process (uvicorn worker) may have stored the same key meanwhile: the first stored plan wins.
    stored = ctx.storage.insert_plan(row)
    apply_retention(ctx, keep=(stored.id,))
    return SearchOutcome(stored, searched=True, inserted=stored.id == row.id)


def plan_response(row: PlanRow, *, cached: bool) -> PlanResponse:
    """The API view of a stored plan."""
    return PlanResponse(id=row.id, created_at=_timestamp(row.created_at), cached=cached,
                        request_key=row.request_key, plan=Plan.model_validate_json(row.body))


def plan_summary(row: PlanRow) -> PlanSummary:
    """One line of the plan list."""
    return PlanSummary(id=row.id, created_at=_timestamp(row.created_at), model_name=row.model_name,
                       cluster_name=row.cluster_name, world_size=row.world_size, strategy=row.summary,
                       step_seconds=row.step_seconds)


def _prepare_and_look_up(request: PlanRequest, ctx: ServiceContext) -> tuple[PlanJob, PlanRow | None]:
    job = prepare_plan(request, ctx)
    return job, ctx.storage.find_plan(job.key)


async def create_plan(request: PlanRequest, ctx: ServiceContext, *, client: str | None = None,
                      disconnected: Any = None) -> tuple[PlanResponse, bool]:
    """The stored plan for this request, searching only when there is none; (response, newly created).

    A search counts against `client`'s concurrency limit; `disconnected` (an async callable) tells the runner when
    the client has gone, so an abandoned search is cancelled."""
    # Validation and the store lookup are quick: they use the general thread pool, so a cache hit never queues
    # behind running searches.
    job, stored = await run_in_threadpool(_prepare_and_look_up, request, ctx)
    if stored is not None:
        return plan_response(stored, cached=True), False
    outcome, started_here = await ctx.runner.run(job.key, search_and_store, job, ctx, client=client,
                                                 disconnected=disconnected)
    # A request that joined another's in-flight search did not search itself: for it the answer is cached.
    searched_here = started_here and outcome.searched
    return plan_response(outcome.row, cached=not searched_here), searched_here and outcome.inserted


def list_plans(ctx: ServiceContext, *, limit: int | None, offset: int) -> PlanPage:
    """One page of stored plans, newest first (`limit` defaults to the server's page size)."""
    limit = limit or ctx.settings.page_size
    rows, total = ctx.storage.list_plans(limit=limit, offset=offset)
    following = offset + len(rows)
    return PlanPage(items=[plan_summary(r) for r in rows], total=total, limit=limit, offset=offset,
                    next_offset=following if following < total else None)


def delete_plan(plan_id: str, storage: Storage) -> None:
    """Forget a stored plan, or 404."""
    if not storage.delete_plan(plan_id):
        raise ApiError(404, "not_found", f"no plan has id '{plan_id}'", "plan_id")


def get_plan(plan_id: str, storage: Storage) -> PlanResponse:
    """A stored plan by id, or 404."""
    row = storage.get_plan(plan_id)
    if row is None:
        raise ApiError(404, "not_found", f"no plan has id '{plan_id}'", "plan_id")
    return plan_response(row, cached=True)


# -- profiles ----------------------------------------------------------------------------------------------------------


def store_profile(profile: ModelProfile, ctx: ServiceContext) -> ProfileCreated:
    """Store an uploaded profile under its content id."""
    _check_profile(profile, ctx.settings, "layers")
    row, created = ctx.storage.insert_profile(profile_id(profile), profile.name, _stored_json(profile, "profile"))
    apply_retention(ctx, keep=(row.id,))
    return ProfileCreated(id=row.id, name=profile.name, num_layers=profile.num_layers,
                          param_count=profile.param_count, created=created)


def get_profile(pid: str, storage: Storage) -> StoredProfile:
    """A stored profile by id, or 404."""
    row = storage.get_profile(pid)
    if row is None:
        raise ApiError(404, "not_found", f"no profile has id '{pid}'", "profile_id")
    return StoredProfile(id=row.id, created_at=_timestamp(row.created_at),
                         profile=ModelProfile.model_validate_json(row.body))
