"""HTTP routes: parse, call `api.service`, shape the answer. No planning logic lives here."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

import planner
from api import evaluation, retention, run_store, service, whatif_service
from api.deps import ClientId, Context
from api.errors import error_responses
from api.schemas import (
    ClusterList,
    EvaluateRequest,
    EvaluateResponse,
    ExportRequest,
    ExportResponse,
    Health,
    PlanPage,
    PlanRequest,
    PlanResponse,
    ProfileCreated,
    RunPage,
    StoredProfile,
    StoredRun,
    WhatIfRequest,
)
from api.storage import SCHEMA_VERSION
from planner.cluster import load_cluster, preset_names
from planner.model_profile import ModelProfile
from planner.run_record import RunRecord
from planner.whatif import WhatIf

health = APIRouter(tags=["health"])
# The API-key check is attached by the app factory, only when the server has keys, so /docs says when it is needed.
v1 = APIRouter(prefix="/v1", responses=error_responses(400, 413, 422))

def _parse_in_thread(model: type[BaseModel]):
    """A dependency that reads the raw body and validates it as `model` in a worker thread.

    FastAPI validates a declared body on the event loop; a profile of a few MiB takes most of a second to validate,
    so several at once would stall every other request (`/healthz` included). Errors keep FastAPI's shape (a 422
    with `body`-rooted locations, or `json_invalid` with the character offset).
    """

    async def parse(request: Request) -> Any:
        raw = await request.body()
        try:
            return await run_in_threadpool(model.model_validate_json, raw or b"null")
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if errors and errors[0].get("type") == "json_invalid":
                try:
                    json.loads(raw)
                    offset = 0
                except (json.JSONDecodeError, UnicodeDecodeError) as bad:
                    offset = getattr(bad, "pos", getattr(bad, "start", 0))
                reason = (errors[0].get("ctx") or {}).get("error", "JSON decode error")
                raise RequestValidationError([{"type": "json_invalid", "loc": ("body", offset), "msg": reason,
                                               "input": {}, "ctx": {"error": reason}}]) from None
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None

    return Depends(parse)


def _documented_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` naming `model` as the JSON request body (its schema is added by `api.app.openapi_schema`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


#: Request bodies parsed off the event loop, documented by `api.app` (see `_parse_in_thread`).
BODY_MODELS: tuple[type[BaseModel], ...] = (PlanRequest, EvaluateRequest, ModelProfile, RunRecord, WhatIfRequest,
                                            ExportRequest)

PlanId = Annotated[str, Path(min_length=1, max_length=100, description="Plan id.")]
ProfileId = Annotated[str, Path(min_length=1, max_length=100, description="Profile id.")]
RunId = Annotated[str, Path(min_length=1, max_length=100, description="Run id.")]


@health.get("/healthz", response_model=Health, response_model_exclude_none=True)
async def healthz() -> Health:
    """Liveness: the process answers (even while searches run; async so it needs no worker thread)."""
    return Health(status="ok", version=planner.__version__)


@health.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "Storage down"}})
def readyz(ctx: Context, response: Response) -> Health:
    """Readiness: the database answers and carries the current schema."""
    ok = ctx.storage.ping()
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(status="ready" if ok else "storage unavailable", version=planner.__version__,
                  schema_version=SCHEMA_VERSION if ok else None)


@v1.post(
    "/plans", response_model=PlanResponse, status_code=status.HTTP_201_CREATED,
    responses={200: {"model": PlanResponse, "description": "Served from the store (cached)"},
               **error_responses(429, 503, 504)},
    openapi_extra=_documented_body(PlanRequest),
)
async def create_plan(body: Annotated[PlanRequest, _parse_in_thread(PlanRequest)], ctx: Context, client: ClientId, request: Request,
                      response: Response) -> PlanResponse:
    """Search the best plan for a model on a cluster (201), or answer the stored one for the same request (200).

    A client has at most `max_searches_per_client` searches running (429 past it); a search whose client
    disconnects is cancelled."""
    result, created = await service.create_plan(body, ctx, client=client, disconnected=request.is_disconnected)
    if not created:
        response.status_code = status.HTTP_200_OK
    return result


@v1.get("/plans", response_model=PlanPage)
def list_plans(
    ctx: Context,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="Plans per page.")] = None,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Plans to skip (newest first).")] = 0,
) -> PlanPage:
    """Stored plans, newest first."""
    return service.list_plans(ctx, limit=limit, offset=offset)


@v1.get("/plans/{plan_id}", response_model=PlanResponse, responses=error_responses(404))
def get_plan(plan_id: PlanId, ctx: Context) -> PlanResponse:
    """A stored plan."""
    return service.get_plan(plan_id, ctx.storage)


@v1.delete("/plans/{plan_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404))
def delete_plan(plan_id: PlanId, ctx: Context) -> Response:
    """Forget a stored plan (the next equal request searches again)."""
    service.delete_plan(plan_id, ctx.storage)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@v1.post("/plans/{plan_id}/export", response_model=ExportResponse, responses=error_responses(404),
         openapi_extra=_documented_body(ExportRequest))
async def export_plan(plan_id: PlanId, body: Annotated[ExportRequest, _parse_in_thread(ExportRequest)],
                      ctx: Context) -> ExportResponse:
    """A stored plan as torchtitan, Megatron-LM, DeepSpeed, accelerate or Lightning configuration (what `autopar
    export` writes), a file name for it, and what the target cannot express."""
    return await run_in_threadpool(whatif_service.export_stored_plan, plan_id, body, ctx)


@v1.post("/whatif", response_model=WhatIf, responses=error_responses(429, 503, 504),
         openapi_extra=_documented_body(WhatIfRequest))
async def create_whatif(body: Annotated[WhatIfRequest, _parse_in_thread(WhatIfRequest)], ctx: Context,
                        client: ClientId, request: Request) -> WhatIf:
    """Plan one model (zoo name or stored profile id) on every cluster preset x GPU count; a cell that cannot be
    planned says why. At most 32 cells; counts against the client's search limit; cancelled on disconnect."""
    return await whatif_service.create_whatif(body, ctx, client=client, disconnected=request.is_disconnected)


@v1.post("/evaluate", response_model=EvaluateResponse, responses=error_responses(429, 503, 504),
         openapi_extra=_documented_body(EvaluateRequest))
async def evaluate(body: Annotated[EvaluateRequest, _parse_in_thread(EvaluateRequest)], ctx: Context, client: ClientId, request: Request) -> EvaluateResponse:
    """Predict step time, throughput and memory of a strategy you choose (what-if); answers are cached in memory
    and equal requests in flight share one evaluation (nothing is written to the database)."""
    return await evaluation.evaluate(body, ctx, client=client, disconnected=request.is_disconnected)


@v1.post("/profiles", response_model=ProfileCreated, status_code=status.HTTP_201_CREATED,
         responses={200: {"model": ProfileCreated, "description": "Already stored"}},
         openapi_extra=_documented_body(ModelProfile))
async def upload_profile(body: Annotated[ModelProfile, _parse_in_thread(ModelProfile)], ctx: Context, response: Response) -> ProfileCreated:
    """Store a model profile (`autopar profile` output); answers its content id."""
    created = await run_in_threadpool(service.store_profile, body, ctx)
    if not created.created:
        response.status_code = status.HTTP_200_OK
    return created


@v1.get("/profiles/{profile_id}", response_model=StoredProfile, responses=error_responses(404))
def get_profile(profile_id: ProfileId, ctx: Context) -> StoredProfile:
    """A stored profile."""
    return service.get_profile(profile_id, ctx.storage)


@v1.delete("/profiles/{profile_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409))
def delete_profile(
    profile_id: ProfileId, ctx: Context,
    cascade: Annotated[bool, Query(description="Also delete the stored plans made from this profile.")] = False,
) -> Response:
    """Forget a stored profile. Refused (409) while stored plans were made from it, unless `cascade=true`, which
    deletes those plans too."""
    retention.delete_profile(profile_id, ctx.storage, cascade=cascade)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@v1.get("/clusters", response_model=ClusterList)
def list_clusters() -> ClusterList:
    """The built-in cluster presets (use their names in plan requests)."""
    return ClusterList(presets=[load_cluster(name) for name in preset_names()])


@v1.post("/runs", response_model=StoredRun, status_code=status.HTTP_201_CREATED, responses=error_responses(404, 409),
         openapi_extra=_documented_body(RunRecord))
async def create_run(body: Annotated[RunRecord, _parse_in_thread(RunRecord)], ctx: Context) -> StoredRun:
    """Store a run record (`autopar run --server`): the plan's prediction next to the run's measurement. A record
    naming a `plan_id` is linked to that stored plan (404 when there is none)."""
    return await run_in_threadpool(run_store.store_run, body, ctx)


@v1.get("/runs", response_model=RunPage)
def list_runs(
    ctx: Context,
    plan_id: Annotated[str | None, Query(max_length=100, description="Only runs of this plan.")] = None,
    cluster: Annotated[str | None, Query(max_length=100, description="Only runs on this cluster name.")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="Runs per page.")] = None,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Runs to skip (newest first).")] = 0,
) -> RunPage:
    """Stored runs, newest first, with measured and predicted step time."""
    return run_store.list_runs(ctx, plan_id=plan_id, cluster_name=cluster, limit=limit, offset=offset)


@v1.get("/runs/{run_id}", response_model=StoredRun, responses=error_responses(404))
def get_run(run_id: RunId, ctx: Context) -> StoredRun:
    """A stored run record."""
    return run_store.get_run(run_id, ctx.storage)
