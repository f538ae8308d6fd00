"""`POST /v1/whatif` and `POST /v1/plans/{id}/export` as plain functions (routes only translate HTTP to these).

A what-if grid names its model as a zoo name or a stored profile id (never code, never a path) and its clusters by
preset name; it is bounded (`MAX_WHATIF_CELLS` cells, each within the server's world-size limit) and its per-cell
search budget is clamped so the whole grid stays within `Settings.max_solver_seconds`. The grid runs on the search
pool like a plan: it counts against the client's concurrency limit, equal grids in flight share one run, and it is
cancelled when its client leaves. Nothing is stored: the answer is a pure function of the request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

import planner
from api.errors import ApiError
from api.schemas import MAX_WHATIF_CELLS, ExportRequest, ExportResponse, PresetClusterRef, WhatIfRequest
from api.service import ResolvedModel, ServiceContext, digest, profile_for, resolve_cluster, resolve_model
from planner.cluster import ClusterSpec
from planner.export import ExportError, Format, Target, export_plan
from planner.strategy import Plan
from planner.whatif import CELL_TIME_LIMIT_S, WhatIf, WhatIfError, grid_dtype, whatif

#: The file name a client is offered for each export (the names `autopar export`'s examples use).
SUGGESTED_FILE_NAMES = {
    (Target.TORCHTITAN, Format.ARGS): "torchtitan_overrides.txt", (Target.TORCHTITAN, Format.TOML): "parallelism.toml",
    (Target.MEGATRON, Format.ARGS): "launch.sh", (Target.DEEPSPEED, Format.JSON): "ds_config.json",
    (Target.ACCELERATE, Format.YAML): "accelerate.yaml", (Target.LIGHTNING, Format.PYTHON): "trainer.py",
}


@dataclass(frozen=True)
class WhatIfJob:
    """A validated what-if request: its content key, model, clusters and per-cell budget."""

    key: str
    model: ResolvedModel
    clusters: list[ClusterSpec]
    gpus: list[int]
    request: WhatIfRequest
    cell_time_limit_s: float


def prepare_whatif(request: WhatIfRequest, ctx: ServiceContext) -> WhatIfJob:
    """Validate a what-if request (grid size, presets, world sizes, precision, prices) and compute its key."""
    gpus = sorted(set(request.gpus))
    cells = len(request.clusters) * len(gpus)
    if cells > MAX_WHATIF_CELLS:
        raise ApiError(422, "grid_too_large", f"{len(request.clusters)} clusters x {len(gpus)} GPU counts is {cells} "
                       f"cells, over this server's limit of {MAX_WHATIF_CELLS}; ask for fewer clusters or GPU counts",
                       "gpus")
    if len(set(request.clusters)) != len(request.clusters):
        raise ApiError(422, "invalid_grid", f"clusters repeat ({', '.join(request.clusters)}); name each once",
                       "clusters")
    if gpus[-1] > ctx.settings.max_world_size:
        raise ApiError(422, "cluster_too_large", f"{gpus[-1]} GPUs is over this server's limit of "
                       f"{ctx.settings.max_world_size}", "gpus")
    clusters = [resolve_cluster(PresetClusterRef(kind="preset", name=name), ctx.settings)
                for name in request.clusters]
    prices = request.price_per_gpu_hour
    if isinstance(prices, dict) and set(prices) - set(request.clusters):
        raise ApiError(422, "invalid_price", f"prices name clusters not in the grid: "
                       f"{', '.join(sorted(set(prices) - set(request.clusters)))}", "price_per_gpu_hour")
    ref = request.model
    if ref.kind == "zoo" and ref.dtype is None:
        try:
            ref = ref.model_copy(update={"dtype": grid_dtype(clusters)})
        except WhatIfError as exc:
            raise ApiError(422, "mixed_precision", str(exc), "model.dtype") from None
    model = resolve_model(ref, ctx, clusters[0])
    # The whole grid shares the server's solver cap: each cell gets an equal share at most.
    per_cell = min(request.options.cell_time_limit_s or CELL_TIME_LIMIT_S, ctx.settings.max_solver_seconds / cells)
    key = "whatif-" + digest({
        "planner_version": planner.PLANNER_VERSION, "model": model.key, "clusters": request.clusters, "gpus": gpus,
        "global_batch_size": request.global_batch_size, "prices": prices, "cell_time_limit_s": per_cell,
        "seed": request.options.seed,
    })
    return WhatIfJob(key=key, model=model, clusters=clusters, gpus=gpus, request=request, cell_time_limit_s=per_cell)


def run_whatif(job: WhatIfJob, ctx: ServiceContext, cancel: threading.Event | None = None) -> WhatIf:
    """Profile the model once and plan every cell (runs on the search pool; `cancel` stops it)."""
    profile = profile_for(job.model, ctx.settings)
    return whatif(profile, job.clusters, job.gpus, job.request.global_batch_size,
                  price_per_gpu_hour=job.request.price_per_gpu_hour, cell_time_limit_s=job.cell_time_limit_s,
                  seed=job.request.options.seed, cancel=cancel)


async def create_whatif(request: WhatIfRequest, ctx: ServiceContext, *, client: str | None = None,
                        disconnected: Any = None) -> WhatIf:
    """The what-if table for a request, planned on the search pool (equal requests in flight share one run)."""
    job = await run_in_threadpool(prepare_whatif, request, ctx)
    result, _ = await ctx.runner.run(job.key, run_whatif, job, ctx, client=client, disconnected=disconnected)
    return result


def export_stored_plan(plan_id: str, request: ExportRequest, ctx: ServiceContext) -> ExportResponse:
    """A stored plan as a trainer's configuration: the text, a file name for it and what the target cannot express;
    404 for an unknown plan id."""
    row = ctx.storage.get_plan(plan_id)
    if row is None:
        raise ApiError(404, "not_found", f"no plan has id '{plan_id}'", "plan_id")
    plan = Plan.model_validate_json(row.body)
    try:
        result = export_plan(plan, request.target, request.format)
    except ExportError as exc:  # a format the target has not, or a plan without module names
        raise ApiError(422, "invalid_export", str(exc), "format" if request.format else None) from None
    return ExportResponse(target=result.target, format=result.format, text=result.text,
                          file_name=SUGGESTED_FILE_NAMES[(result.target, result.format)], warnings=result.warnings)
