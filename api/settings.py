"""The one settings object of the planning service.

`create_app(Settings(...))` takes it explicitly; only `Settings.from_env()` (used by `autopar serve`, whose uvicorn
workers each build their own app) reads `AUTOPAR_*` environment variables, so no library code below the app
factory looks at the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.errors import AutoparError

ENV_PREFIX = "AUTOPAR_"


class SettingsError(AutoparError):
    """A setting (or `AUTOPAR_*` environment variable) with an unusable value."""


class Settings(BaseModel):
    """Configuration of one service instance; every limit a request can run into lives here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    db_path: Path = Field(default=Path("autopar.db"), description="SQLite file that stores plans and profiles.")
    profile_cache_dir: Path | None = Field(
        default=None, description="Where zoo-model profiles are cached on disk (None: the profiler's default)."
    )
    api_keys: tuple[str, ...] = Field(
        default=(), description="Accepted API keys; empty means no authentication. Sent as 'X-API-Key' or Bearer."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    max_solver_seconds: float = Field(
        default=60.0, gt=0, description="Cap on a request's solver time limit (a larger request is clamped to it)."
    )
    default_solver_seconds: float = Field(
        default=10.0, gt=0, description="Solver time limit used when a request does not give one."
    )
    request_timeout_s: float = Field(
        default=180.0, gt=0,
        description="Wall-clock guard on profiling + search per request, queueing included; past it the answer is 504.",
    )
    search_workers: int = Field(default=2, ge=1, le=64, description="Threads that run searches off the event loop.")
    max_pending_searches: int = Field(
        default=128, ge=1, description="Searches queued or running at once; more get 503 so memory stays bounded."
    )
    max_searches_per_client: int = Field(
        default=8, ge=1, description="Searches and evaluations one client (API key, else address) may have queued or "
        "running at once; more get 429, so one client cannot hold every worker.",
    )
    evaluate_cache_entries: int = Field(
        default=256, ge=1, description="What-if answers (/v1/evaluate) kept in memory; equal requests reuse them.",
    )
    max_stored_bytes: int | None = Field(
        default=None, ge=1024, description="Cap on the stored plan and profile JSON: past it, after each write, the "
        "oldest plans and the oldest profiles no plan uses are deleted (None: no size cap).",
    )
    retention_days: float | None = Field(
        default=None, gt=0, description="Plans, and profiles no plan refers to, older than this are pruned after "
        "each write (None: kept until deleted).",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="A connection that has not sent a complete request head within this is "
        "closed (slow-header clients).",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="A request whose body has not fully arrived this long after its head gets "
        "408 and the connection is closed (slow-body clients).",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0, description="An idle keep-alive connection is closed after this many seconds.",
    )
    max_connections: int = Field(
        default=1000, ge=1, description="Open connections per worker process; more get 503 at once.",
    )
    max_world_size: int = Field(default=4096, ge=1, description="Largest cluster (nodes x gpus_per_node) accepted.")
    max_profile_layers: int = Field(default=1024, ge=1, description="Most layers a model (zoo or uploaded) may have.")
    max_zoo_params: float = Field(
        default=2e12, gt=0, description="Largest zoo model (parameters, estimated from its options) the server profiles."
    )
    page_size: int = Field(default=20, ge=1, le=1000, description="Plans per page when a list request gives no limit.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `AUTOPAR_<FIELD>` variables (JSON for lists, e.g. AUTOPAR_API_KEYS='["k1"]'), then overrides."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if name == "api_keys":
                data[name] = _parse_keys(raw)
            else:
                data[name] = raw
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise SettingsError(f"invalid service settings: {problems}") from None


def _parse_keys(raw: str) -> tuple[str, ...]:
    """A JSON list of keys, or a comma-separated string (empty pieces dropped)."""
    raw = raw.strip()
    if raw.startswith("["):
        try:
            keys = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{ENV_PREFIX}API_KEYS is not a JSON list: {exc}") from None
        return tuple(str(k) for k in keys if str(k))
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def read_api_keys(path: str | Path) -> tuple[str, ...]:
    """The keys in a key file, one a line (blank lines and `#` comments skipped), so no key has to appear in argv."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read API key file {path} ({exc}); give a readable text file, one key a line"
                            ) from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise SettingsError(f"API key file {path} holds no key; write one key a line")
    return keys
