"""Structured errors: every 4xx/5xx the service answers is `{"error": {"code", "message", "field"}}`.

Validation errors name the offending field as a dotted path into the request body (`model.options.hidden`), user
mistakes the planner reports (`AutoparError`) become 422, and anything unexpected becomes a logged 500 that does
not leak a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorResponse
from planner.errors import AutoparError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the service answers with a given status, code, message and field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response for one error."""
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message, "field": field}},
        headers=headers,
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """'body.model.zoo.options.hidden' -> 'model.options.hidden': drop the location and the union tag names."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        source = parts.pop(0)
        if not parts:
            return "body" if source == "body" else None
    # pydantic inserts the discriminator value of a tagged union ('zoo', 'preset', ...) into the path.
    tags = {"zoo", "profile", "profile_id", "preset", "spec"}
    cleaned = [str(p) for i, p in enumerate(parts) if not (p in tags and i > 0 and parts[i - 1] in ("model", "cluster"))]
    return ".".join(cleaned) or None


def _error_field(err: dict[str, Any]) -> str | None:
    path = _field_path(err.get("loc", ()))
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        # The error sits on the union; the field at fault is its tag ('kind').
        tag = str((err.get("ctx") or {}).get("discriminator", "kind")).strip("'\"")
        return f"{path}.{tag}" if path and path != "body" else tag
    return path


def _validation_message(errors: list[dict[str, Any]]) -> str:
    pieces = []
    for err in errors[:5]:
        where = _error_field(err) or "body"
        pieces.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(pieces) + more


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        # loc is ('body', <character offset>): the field is the body as a whole.
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(422, "invalid_json", f"request body is not valid JSON ({detail} at character "
                              f"{list(first.get('loc', ('', '?')))[-1]})", "body")
    return error_response(422, "validation_error", _validation_message(errors), _error_field(first))


async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, headers=exc.headers)


async def _on_autopar_error(_: Request, exc: AutoparError) -> JSONResponse:
    # An AutoparError that reached here was not mapped to a field by the service: the request as a whole is wrong.
    return error_response(422, "planning_error", str(exc), None)


def _allowed_methods(request: Request) -> str:
    # Starlette's 405 lists the methods of the first route with this path only; GET and POST /v1/plans are two.
    methods: set[str] = set()
    for route in request.app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
             413: "body_too_large"}
    headers = dict(getattr(exc, "headers", None) or {})
    field = None
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    if exc.status_code == 400:
        field = "body"  # FastAPI raises 400 only when it cannot read the body at all (e.g. not UTF-8)
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), field,
                          headers=headers or None)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error while serving a request")
    return error_response(500, "internal_error", "internal server error; the server log has the details", None)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer an `ErrorResponse`."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(AutoparError, _on_autopar_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape for these statuses."""
    text = {
        400: "Unreadable request body", 401: "Missing or wrong API key", 404: "Not found", 408: "Request body too slow",
        413: "Request body too large",
        409: "Still referenced", 422: "Invalid request (the field says which part)",
        429: "This client's concurrency limit reached", 503: "Too many searches in flight",
        504: "Search exceeded the wall-clock guard",
    }
    return {s: {"model": ErrorResponse, "description": text.get(s, "Error")} for s in statuses}
