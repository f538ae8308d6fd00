"""The FastAPI application of the planning service.

    autopar serve --port 8000 --db plans.db
    curl -s localhost:8000/v1/plans -H 'content-type: application/json' -d '{"model": {"kind": "zoo",
      "name": "gpt2-medium"}, "cluster": {"kind": "preset", "name": "dgx-a100-80gb", "nodes": 2},
      "global_batch_size": 512}'

`create_app(settings)` builds an app around one `Settings`; `app_from_env()` is the factory uvicorn workers call.
OpenAPI docs are served at /docs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

import planner
from api.deps import require_api_key
from api.errors import error_responses, install_error_handlers
from api.middleware import BodyLimitMiddleware
from api.routes import BODY_MODELS, health, v1
from api.runner import ResultCache, SearchRunner
from api.service import ServiceContext
from api.settings import Settings
from api.storage import Storage

log = logging.getLogger(__name__)


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document plus the request-body schemas of the routes that parse their body in a worker
    thread (`api.routes.BODY_MODELS`), so /docs and generated clients see the same contract as before."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in BODY_MODELS],
                                     ref_template="#/components/schemas/{model}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """A ready-to-serve app: storage opened (and migrated), search pool started, routes and error handlers set."""
    settings = settings or Settings()
    storage = Storage(settings.db_path)
    runner = SearchRunner(workers=settings.search_workers, max_pending=settings.max_pending_searches,
                          timeout_s=settings.request_timeout_s, max_per_client=settings.max_searches_per_client)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("autopar service ready: db=%s, %d search workers, api keys %s", settings.db_path,
                 settings.search_workers, "required" if settings.api_keys else "off")
        yield
        runner.shutdown()

    app = FastAPI(
        title="autopar planning service",
        version=planner.__version__,
        summary="Plans data / tensor / pipeline parallel training for a model on a cluster, and remembers them.",
        lifespan=lifespan,
    )
    app.state.ctx = ServiceContext(settings=settings, storage=storage, runner=runner,
                                   evaluations=ResultCache(settings.evaluate_cache_entries))
    app.openapi = lambda: openapi_schema(app)
    install_error_handlers(app)
    app.include_router(health)
    if settings.api_keys:
        app.include_router(v1, dependencies=[Depends(require_api_key)], responses=error_responses(401))
    else:
        app.include_router(v1)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, api_keys=settings.api_keys,
                       body_timeout_s=settings.body_timeout_s)
    return app


def app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` / multi-worker serving: settings from AUTOPAR_* variables."""
    return create_app(Settings.from_env())
