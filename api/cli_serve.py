"""`autopar serve`: run the HTTP planning service with uvicorn.

    autopar serve                                   # http://127.0.0.1:8000, plans in ./autopar.db, docs at /docs
    autopar serve --port 9000 --db /var/lib/autopar/plans.db --workers 4
    autopar serve --host 0.0.0.0 --api-key-file /etc/autopar/keys   # every /v1 request then needs X-API-Key
    AUTOPAR_API_KEYS=k1,k2 autopar serve --host 0.0.0.0            # the same from the environment

A key given with `--api-key` is visible to every user in `ps`; prefer `--api-key-file` or `AUTOPAR_API_KEYS`.

Other limits come from AUTOPAR_* environment variables (see `api.settings.Settings`), e.g.
AUTOPAR_MAX_SOLVER_SECONDS=30 AUTOPAR_SEARCH_WORKERS=4 autopar serve; slow clients are dropped after
AUTOPAR_HEADER_TIMEOUT_S / AUTOPAR_BODY_TIMEOUT_S, idle keep-alive connections after AUTOPAR_KEEP_ALIVE_S.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from api.settings import ENV_PREFIX, Settings, read_api_keys
from planner.errors import AutoparError

console = Console(stderr=True)


def check_db(path: Path) -> None:
    """Open (creating or migrating) the database once, so a bad --db is a one-line error before uvicorn starts."""
    from api.storage import Storage

    fix = "point --db at a new file or at a database an earlier `autopar serve` wrote"
    if path.is_dir():
        raise AutoparError(f"--db {path} is a directory; {fix}")
    try:
        Storage(path)
    except sqlite3.DatabaseError as exc:
        raise AutoparError(f"--db {path} is not a usable SQLite database ({exc}); {fix}") from None
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        raise AutoparError(f"cannot create the database {path} ({reason}); {fix} in a writable directory") from None


def check_bind(host: str, port: int) -> None:
    """Refuse, in one line, an interface that does not resolve or an address/port this host cannot listen on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise AutoparError(f"--host {host!r} is not an address or host name this machine can resolve ({exc}); give "
                           "an interface address such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise AutoparError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick a free port with "
                               "--port or an address of this machine with --host") from None


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    db: Annotated[Path | None, typer.Option(help="SQLite file for plans and profiles [default: ./autopar.db].")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes (they share the db).")] = 1,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="Require this key on /v1 requests (repeatable); visible in "
                                                         "`ps`, so prefer --api-key-file or AUTOPAR_API_KEYS.")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="Require the keys in this file (one a line) on /v1 requests.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve plans over HTTP: POST /v1/plans, GET /v1/plans, /v1/evaluate, /v1/profiles; docs at /docs."""
    from api.server import run_server, server_config

    check_bind(host, port)
    keys_given = (*(api_key or ()), *(read_api_keys(api_key_file) if api_key_file is not None else ()))
    settings = Settings.from_env(db_path=db, api_keys=keys_given or None)
    check_db(settings.db_path)
    keys = "required" if settings.api_keys else "off"
    console.print(f"[bold]autopar serve[/] http://{host}:{port}  db={settings.db_path}  workers={workers}  "
                  f"api keys {keys}  docs at /docs")
    if workers == 1:
        from api.app import create_app

        run_server(server_config(create_app(settings), settings, host=host, port=port, log_level=log_level))
        return
    # Worker processes build their own app from the environment, so hand them the validated settings that way.
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        os.environ[ENV_PREFIX + name.upper()] = json.dumps(value) if isinstance(value, list) else str(value)
    run_server(server_config("api.app:app_from_env", settings, factory=True, host=host, port=port, workers=workers,
                             log_level=log_level))


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("serve")(serve)
