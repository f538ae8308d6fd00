"""`POST /v1/evaluate` as plain functions: key the what-if request, answer a cached result, or score it once.

Evaluations are pure functions of (planner version, model, cluster, strategy), so equal requests share one answer:
an in-memory LRU cache (`Settings.evaluate_cache_entries`) and the runner's single flight, exactly as plans share
their stored row. Scoring runs on the search pool under a budget of `Settings.max_solver_seconds`, cancelled when
its client leaves, and counts against the client's concurrency limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

import planner
from api.errors import ApiError
from api.schemas import EvaluateRequest, EvaluateResponse
from api.service import ResolvedModel, ServiceContext, digest, profile_for, resolve_cluster, resolve_model
from planner.budget import Budget
from planner.cluster import ClusterSpec


@dataclass(frozen=True)
class EvaluateJob:
    """A validated what-if request and its content key."""

    key: str
    model: ResolvedModel
    cluster: ClusterSpec
    request: EvaluateRequest


def prepare_evaluation(request: EvaluateRequest, ctx: ServiceContext) -> EvaluateJob:
    """Validate a what-if request (world size, model, cluster) and compute its content key."""
    cluster = resolve_cluster(request.cluster, ctx.settings)
    model = resolve_model(request.model, ctx, cluster)
    strategy = request.strategy
    if strategy.dims.world_size != cluster.world_size:
        raise ApiError(422, "strategy_mismatch", f"strategy.dims.world_size is {strategy.dims.world_size} but the "
                       f"cluster has {cluster.world_size} devices", "strategy.dims.world_size")
    key = "eval-" + digest({"planner_version": planner.PLANNER_VERSION, "model": model.key,
                            "cluster": cluster.model_dump(mode="json"),
                            "strategy": strategy.model_dump(mode="json")})
    return EvaluateJob(key=key, model=model, cluster=cluster, request=request)


def score(job: EvaluateJob, ctx: ServiceContext, cancel: threading.Event | None = None) -> EvaluateResponse:
    """The cost model's prediction for the job's strategy (runs on the search pool, within the server's budget)."""
    profile = profile_for(job.model, ctx.settings)
    strategy = job.request.strategy
    if strategy.stages[-1].stop != profile.num_layers:
        raise ApiError(422, "strategy_mismatch", f"the stages end at layer {strategy.stages[-1].stop} but the model "
                       f"has {profile.num_layers} layers; the last stage must stop at {profile.num_layers}",
                       "strategy.stages")
    budget = Budget(ctx.settings.max_solver_seconds, cancel)
    prediction = planner.evaluate(profile, job.cluster, strategy, budget=budget)
    answer = EvaluateResponse(strategy=strategy, prediction=prediction)
    ctx.evaluations.put(job.key, answer)
    return answer


async def evaluate(request: EvaluateRequest, ctx: ServiceContext, *, client: str | None = None,
                   disconnected: Any = None) -> EvaluateResponse:
    """The prediction for a what-if request: cached when an equal request was scored, else scored once."""
    job = await run_in_threadpool(prepare_evaluation, request, ctx)
    cached = ctx.evaluations.get(job.key)
    if cached is not None:
        return cached.model_copy(update={"cached": True})
    answer, started = await ctx.runner.run(job.key, score, job, ctx, client=client, disconnected=disconnected)
    return answer if started else answer.model_copy(update={"cached": True})
