"""HTTP routes: parse, call `api.service`, shape the answer. No planning logic lives here."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

import planner
from api import evaluation, retention, service
from api.deps import ClientId, Context
from api.errors import error_responses
from api.schemas import (
    ClusterList,
    EvaluateRequest,
    EvaluateResponse,
    Health,
    PlanPage,
    PlanRequest,
    PlanResponse,
    ProfileCreated,
    StoredProfile,
)
from api.storage import SCHEMA_VERSION
from planner.cluster import load_cluster, preset_names
from planner.model_profile import ModelProfile

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
BODY_MODELS: tuple[type[BaseModel], ...] = (PlanRequest, EvaluateRequest, ModelProfile)

PlanId = Annotated[str, Path(min_length=1, max_length=100, description="Plan id.")]
ProfileId = Annotated[str, Path(min_length=1, max_length=100, description="Profile id.")]


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
