"""SQLite storage for plans and uploaded profiles.

One file, WAL mode (readers never block the writer, so several uvicorn workers can share it), schema versioned by
`PRAGMA user_version` and upgraded by the numbered `MIGRATIONS`. Every write is a single transaction, so a crash
mid-write leaves either the whole record or nothing. Each operation opens its own short-lived connection: sqlite3
connections must not be shared between the threads FastAPI runs handlers on, and opening one costs microseconds.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from api import run_store
from planner.errors import AutoparError
from planner.run_record import RunRecord


class StorageError(AutoparError):
    """The database file cannot be used (e.g. it was written by a newer autopar)."""


# Migration n (1-based) brings the schema from user_version n-1 to n. Never edit a released entry: append one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE profiles (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE plans (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        request_key TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        model_name TEXT NOT NULL,
        cluster_name TEXT NOT NULL,
        world_size INTEGER NOT NULL,
        summary TEXT NOT NULL,
        step_seconds REAL NOT NULL,
        request TEXT NOT NULL,
        body TEXT NOT NULL
    );
    """,
    # 2: which stored profile a plan was made from (for DELETE /v1/profiles and retention), and age indexes.
    """
    ALTER TABLE plans ADD COLUMN profile_id TEXT;
    UPDATE plans SET profile_id = json_extract(request, '$.model.profile');
    CREATE INDEX plans_profile_id ON plans (profile_id);
    CREATE INDEX plans_created_at ON plans (created_at);
    CREATE INDEX profiles_created_at ON profiles (created_at);
    """,
    # 3: run records (POST /v1/runs): the local run store's table (api.run_store.RUNS_TABLE, frozen like this list).
    run_store.RUNS_TABLE + ";",
)

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class PlanRow:
    """A stored plan: identifiers, list columns and the plan JSON as text."""

    id: str
    request_key: str
    created_at: float
    model_name: str
    cluster_name: str
    world_size: int
    summary: str
    step_seconds: float
    request: str
    body: str


@dataclass(frozen=True)
class ProfileRow:
    """A stored profile: id, model name and the profile JSON as text."""

    id: str
    name: str
    created_at: float
    body: str


@dataclass(frozen=True)
class Pruned:
    """What one retention pass deleted."""

    plans: int = 0
    profiles: int = 0


def _profile_of(request_json: str) -> str | None:
    """The content id of the profile a plan request was made from (None for a zoo model)."""
    try:
        model = json.loads(request_json).get("model")
    except (ValueError, AttributeError):
        return None
    return model.get("profile") if isinstance(model, dict) else None


_PLAN_COLUMNS = "id, request_key, created_at, model_name, cluster_name, world_size, summary, step_seconds, request, body"


class Storage:
    """Plans and profiles in one SQLite file; safe to use from many threads and processes."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        """Open (creating if needed) the database at `path` and bring its schema up to date."""
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at each checkpoint, never corrupt
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            # IMMEDIATE takes the write lock up front, so two writers queue instead of failing to upgrade a lock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"database {self.path} has schema version {version}, newer than this autopar's {SCHEMA_VERSION}; "
                    "upgrade autopar or point --db at another file"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                # user_version is part of the transaction, so a failed migration leaves the old version.
                conn.execute(f"PRAGMA user_version = {number}")

    def schema_version(self) -> int:
        """The schema version recorded in the file."""
        with self._connect() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def ping(self) -> bool:
        """Whether the file answers a query and carries the current schema."""
        try:
            return self.schema_version() == SCHEMA_VERSION
        except sqlite3.Error:
            return False

    # -- plans ---------------------------------------------------------------------------------------------------

    def insert_plan(self, row: PlanRow) -> PlanRow:
        """Store `row` unless a plan with the same request key exists; return whichever is stored."""
        with self._transaction() as conn:
            found = conn.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans WHERE request_key = ?", (row.request_key,)
            ).fetchone()
            if found is not None:
                return PlanRow(*found)
            conn.execute(
                f"INSERT INTO plans ({_PLAN_COLUMNS}, profile_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.id, row.request_key, row.created_at, row.model_name, row.cluster_name, row.world_size,
                 row.summary, row.step_seconds, row.request, row.body, _profile_of(row.request)),
            )
        return row

    def get_plan(self, plan_id: str) -> PlanRow | None:
        """The plan with this id, or None."""
        with self._connect() as conn:
            found = conn.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE id = ?", (plan_id,)).fetchone()
        return PlanRow(*found) if found else None

    def find_plan(self, request_key: str) -> PlanRow | None:
        """The plan stored for this request key, or None."""
        with self._connect() as conn:
            found = conn.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans WHERE request_key = ?", (request_key,)
            ).fetchone()
        return PlanRow(*found) if found else None

    def list_plans(self, *, limit: int, offset: int) -> tuple[list[PlanRow], int]:
        """One page of plans, newest first, and the total count."""
        with self._connect() as conn:
            total = conn.execute("SELECT COUNT(*) FROM plans").fetchone()[0]
            rows = conn.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [PlanRow(*r) for r in rows], int(total)

    def delete_plan(self, plan_id: str) -> bool:
        """Remove a plan; False when there was none with this id."""
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM plans WHERE id = ?", (plan_id,))
            return cursor.rowcount > 0

    # -- profiles ------------------------------------------------------------------------------------------------

    def insert_profile(self, profile_id: str, name: str, body: str) -> tuple[ProfileRow, bool]:
        """Store a profile under its content id; return the stored row and whether it was new."""
        with self._transaction() as conn:
            found = conn.execute(
                "SELECT id, name, created_at, body FROM profiles WHERE id = ?", (profile_id,)
            ).fetchone()
            if found is not None:
                return ProfileRow(*found), False
            row = ProfileRow(profile_id, name, time.time(), body)
            conn.execute(
                "INSERT INTO profiles (id, name, created_at, body) VALUES (?, ?, ?, ?)",
                (row.id, row.name, row.created_at, row.body),
            )
        return row, True

    def get_profile(self, profile_id: str) -> ProfileRow | None:
        """The profile with this id, or None."""
        with self._connect() as conn:
            found = conn.execute(
                "SELECT id, name, created_at, body FROM profiles WHERE id = ?", (profile_id,)
            ).fetchone()
        return ProfileRow(*found) if found else None

    def plans_using_profile(self, profile_id: str) -> int:
        """How many stored plans were made from this profile."""
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM plans WHERE profile_id = ?", (profile_id,)).fetchone()[0])

    def delete_profile(self, profile_id: str, *, cascade: bool = False) -> tuple[bool, int]:
        """Remove a profile; (whether it existed, plans deleted with it). Without `cascade`, a profile that plans
        refer to is kept and (True, -n) is returned, n the number of those plans; with it, they go too."""
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM profiles WHERE id = ?", (profile_id,)).fetchone() is None:
                return False, 0
            users = conn.execute("SELECT COUNT(*) FROM plans WHERE profile_id = ?", (profile_id,)).fetchone()[0]
            if users and not cascade:
                return True, -int(users)
            conn.execute("DELETE FROM plans WHERE profile_id = ?", (profile_id,))
            conn.execute("DELETE FROM profiles WHERE id = ?", (profile_id,))
        return True, int(users)

    # -- runs (tables and queries shared with the local run store, api.run_store) ---------------------------------

    def insert_run(self, record: RunRecord) -> bool:
        """Store a run record; False (nothing written) when its id is already stored."""
        with self._transaction() as conn:
            return run_store.insert_run(conn, record)

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None."""
        with self._connect() as conn:
            return run_store.select_run(conn, run_id)

    def list_runs(self, *, plan_id: str | None = None, cluster_name: str | None = None, limit: int,
                  offset: int = 0) -> tuple[list[RunRecord], int]:
        """One page of runs, newest first, and how many match the filters."""
        with self._connect() as conn:
            return run_store.select_runs(conn, plan_id=plan_id, cluster_name=cluster_name, limit=limit,
                                         offset=offset)

    def stored_bytes(self) -> int:
        """Bytes of stored plan and profile JSON (what the size cap counts)."""
        with self._connect() as conn:
            return _stored_bytes(conn)

    def prune(self, *, max_bytes: int | None = None, max_age_s: float | None = None, now: float | None = None,
              keep: tuple[str, ...] = ()) -> Pruned:
        """Delete plans older than `max_age_s` and profiles older than it that no plan uses, then, oldest first,
        plans and unused profiles until the stored JSON is at most `max_bytes`. Ids in `keep` (what the caller just
        wrote) are never deleted. A profile that a plan uses is deleted only after that plan."""
        now = time.time() if now is None else now
        plans = profiles = 0
        kept = list(keep) or [""]
        marks = ",".join("?" * len(kept))
        unused = f"NOT EXISTS (SELECT 1 FROM plans WHERE plans.profile_id = profiles.id) AND id NOT IN ({marks})"
        with self._transaction() as conn:
            if max_age_s is not None:
                cutoff = now - max_age_s
                plans += conn.execute(f"DELETE FROM plans WHERE created_at < ? AND id NOT IN ({marks})",
                                      (cutoff, *kept)).rowcount
                profiles += conn.execute(f"DELETE FROM profiles WHERE created_at < ? AND {unused}",
                                         (cutoff, *kept)).rowcount
            if max_bytes is not None:
                total = _stored_bytes(conn)
                while total > max_bytes:
                    plan = conn.execute(f"SELECT id, created_at, length(body) + length(request) FROM plans WHERE id "
                                        f"NOT IN ({marks}) ORDER BY created_at LIMIT 1", kept).fetchone()
                    prof = conn.execute(f"SELECT id, created_at, length(body) FROM profiles WHERE {unused} "
                                        "ORDER BY created_at LIMIT 1", kept).fetchone()
                    if plan is None and prof is None:
                        break  # only what the caller keeps (or profiles its kept plans use) is left
                    if prof is None or (plan is not None and plan[1] <= prof[1]):
                        conn.execute("DELETE FROM plans WHERE id = ?", (plan[0],))
                        plans, total = plans + 1, total - plan[2]
                    else:
                        conn.execute("DELETE FROM profiles WHERE id = ?", (prof[0],))
                        profiles, total = profiles + 1, total - prof[2]
        return Pruned(plans=plans, profiles=profiles)


def _stored_bytes(conn: sqlite3.Connection) -> int:
    plans = conn.execute("SELECT COALESCE(SUM(length(body) + length(request)), 0) FROM plans").fetchone()[0]
    profiles = conn.execute("SELECT COALESCE(SUM(length(body)), 0) FROM profiles").fetchone()[0]
    return int(plans) + int(profiles)
