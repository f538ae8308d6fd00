"""Shared request dependencies: the service context and the API-key check."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from api.service import ServiceContext

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of the server's API keys.")
_bearer = HTTPBearer(auto_error=False, description="One of the server's API keys as a Bearer token.")


def get_context(request: Request) -> ServiceContext:
    """The app's settings, storage and search pool."""
    return request.app.state.ctx


Context = Annotated[ServiceContext, Depends(get_context)]


def client_id(request: Request) -> str:
    """Who the request counts against for the per-client concurrency limit: its API key (hashed, never logged in
    clear) when it carries one, else its peer address (behind a proxy every client shares the proxy's address)."""
    key = request.headers.get("x-api-key") or request.headers.get("authorization")
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


ClientId = Annotated[str, Depends(client_id)]


def require_api_key(
    ctx: Context,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """When the server has API keys, a request must carry one (X-API-Key or Authorization: Bearer)."""
    keys = ctx.settings.api_keys
    if not keys:
        return
    given = api_key or (bearer.credentials if bearer is not None else None)
    # compare_digest on every key: the time taken does not reveal how much of a key matched.
    if given is None or not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise ApiError(401, "unauthorized", "missing or wrong API key; send it as 'X-API-Key: <key>' or "
                       "'Authorization: Bearer <key>'", "X-API-Key", headers={"WWW-Authenticate": "Bearer"})
