"""The local run store: a SQLite file of `RunRecord`s and, once each by hash, the profiles their plans came from.

    store = RunStore(default_store_path(save_dir))      # <save-dir>/autopar-runs.db, else ./.autopar/runs.db
    store.add(record, profile)                          # one transaction: the run and (if new) its profile
    records, total = store.list(cluster_name="cpu", limit=20)
    samples, missing = store.fit_samples("cpu")         # what planner.run_fit.fit_runs takes

The `runs` table has the same columns here and in the service's database (`api.storage`, migration 3), and the
functions `insert_run`, `select_runs` and `select_run` serve both. Writes are single transactions, so a crash leaves
the whole record or nothing; a store that is locked or cannot be written is a `RunStoreError` naming the file and
the fix (`autopar run` prints the run report before it tries the store, so the measurement is never lost).
`store_run`, `list_runs`, `get_run` and `calibrate_cluster` at the end are the service's side (/v1/runs and the
`calibrated` plan option).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from api.errors import ApiError
from api.schemas import RunPage, RunSummary, StoredRun
from planner.cluster import ClusterSpec
from planner.errors import AutoparError
from planner.model_profile import ModelProfile
from planner.run_fit import FitSample, RunFitError, fit_runs
from planner.run_record import RunRecord
from planner.strategy import RunCalibration

if TYPE_CHECKING:
    from api.service import ServiceContext
    from api.storage import Storage

log = logging.getLogger(__name__)

#: The file `autopar run` records into when it has no --save-dir (relative to the working directory).
FALLBACK_STORE = Path(".autopar") / "runs.db"
STORE_FILE_NAME = "autopar-runs.db"

#: The runs table, the same in the local store (migration 1) and the service's database (api.storage migration 3).
#: Released migrations never change: alter the table by appending a migration to both lists.
RUNS_TABLE = """
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        plan_id TEXT,
        cluster_name TEXT NOT NULL,
        profile_hash TEXT NOT NULL,
        model_name TEXT NOT NULL,
        world_size INTEGER NOT NULL,
        strategy TEXT NOT NULL,
        measured_step_seconds REAL NOT NULL,
        predicted_step_seconds REAL NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX runs_plan_id ON runs (plan_id);
    CREATE INDEX runs_cluster_name ON runs (cluster_name)
"""

# Migration n brings the local store from user_version n-1 to n. Never edit a released entry: append one.
LOCAL_MIGRATIONS: tuple[str, ...] = (
    RUNS_TABLE + """;
    CREATE TABLE profiles (
        profile_hash TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        body TEXT NOT NULL
    )
    """,
)


class RunStoreError(AutoparError):
    """The run store cannot be read or written; the message names the file and what to do."""


#: Environment variable naming the store a run without --save-dir records in (and `autopar runs` reads).
STORE_ENV = "AUTOPAR_RUNS_DB"


def fallback_store() -> Path:
    """The store of runs without --save-dir: $AUTOPAR_RUNS_DB when set, else ./.autopar/runs.db."""
    return Path(os.environ.get(STORE_ENV) or FALLBACK_STORE)


def default_store_path(save_dir: str | Path | None) -> Path:
    """Where `autopar run` records: next to the checkpoints when it saves them, else `fallback_store()`."""
    return Path(save_dir) / STORE_FILE_NAME if save_dir is not None else fallback_store()


# -- the runs table (local store and service) ------------------------------------------------------------------------


def insert_run(conn: sqlite3.Connection, record: RunRecord) -> bool:
    """Insert `record` inside the caller's transaction; False (nothing written) when its id is already stored."""
    if conn.execute("SELECT 1 FROM runs WHERE id = ?", (record.id,)).fetchone() is not None:
        return False
    conn.execute(
        "INSERT INTO runs (id, created_at, plan_id, cluster_name, profile_hash, model_name, world_size, strategy, "
        "measured_step_seconds, predicted_step_seconds, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (record.id, record.created.timestamp(), record.plan_id, record.cluster_name, record.profile_hash,
         record.model, record.plan.strategy.dims.world_size, record.plan.strategy.describe(),
         record.measured.step_seconds, record.predicted.step_seconds, record.model_dump_json()),
    )
    return True


def select_runs(conn: sqlite3.Connection, *, plan_id: str | None = None, cluster_name: str | None = None,
                limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
    """One page of records, newest first, with the filters' total count."""
    where, args = [], []
    if plan_id is not None:
        where.append("plan_id = ?")
        args.append(plan_id)
    if cluster_name is not None:
        where.append("cluster_name = ?")
        args.append(cluster_name)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = conn.execute(f"SELECT COUNT(*) FROM runs{clause}", args).fetchone()[0]
    rows = conn.execute(f"SELECT body FROM runs{clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                        (*args, limit, offset)).fetchall()
    return [RunRecord.model_validate_json(r[0]) for r in rows], int(total)


def select_run(conn: sqlite3.Connection, run_id: str, *, prefix: bool = False) -> RunRecord | None:
    """The record with this id (or, with `prefix`, the one id starting with it); None when there is none."""
    if prefix:
        rows = conn.execute("SELECT body FROM runs WHERE substr(id, 1, ?) = ? ORDER BY seq DESC LIMIT 2",
                            (len(run_id), run_id)).fetchall()
        if len(rows) > 1:
            exact = conn.execute("SELECT body FROM runs WHERE id = ?", (run_id,)).fetchone()
            if exact is None:
                raise RunStoreError(f"more than one run id starts with '{run_id}'; give more of the id")
            rows = [exact]
    else:
        rows = conn.execute("SELECT body FROM runs WHERE id = ?", (run_id,)).fetchall()
    return RunRecord.model_validate_json(rows[0][0]) if rows else None


# -- the local store -------------------------------------------------------------------------------------------------


class RunStore:
    """Run records and their profiles in one SQLite file (one short connection per operation)."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_s: float = 5.0) -> None:
        """Open the store at `path`, creating it (and its directory) when `create`, else refusing a missing one."""
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        if not create and not self.path.is_file():
            raise RunStoreError(f"no run store at {self.path}; `autopar run` writes one (next to --save-dir, else "
                                f"{FALLBACK_STORE}), or give --records PATH of an existing one")
        with self._errors("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._migrate()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            hint = ("another process holds it; retry when it is done" if "locked" in str(exc)
                    else "give --records PATH in a writable directory")
            raise RunStoreError(f"cannot {action} run store {self.path} ({exc}); {hint}") from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _migrate(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(LOCAL_MIGRATIONS):
                raise RunStoreError(f"run store {self.path} has schema version {version}, newer than this autopar's "
                                    f"{len(LOCAL_MIGRATIONS)}; upgrade autopar or give --records another file")
            for number in range(version + 1, len(LOCAL_MIGRATIONS) + 1):
                for statement in LOCAL_MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    def add(self, record: RunRecord, profile: ModelProfile | None = None) -> None:
        """Store `record` and, unless its hash is stored already, `profile` (one transaction)."""
        if profile is not None and profile.profile_hash != record.profile_hash:
            raise RunStoreError(f"the profile given with run {record.id} is not the one its plan was made from")
        with self._errors("write to"), self._transaction() as conn:
            if not insert_run(conn, record):
                raise RunStoreError(f"run {record.id} is already in {self.path}")
            if profile is not None:
                conn.execute("INSERT OR IGNORE INTO profiles (profile_hash, name, body) VALUES (?, ?, ?)",
                             (profile.profile_hash, profile.name, profile.model_dump_json()))
        log.info("recorded run %s in %s", record.id, self.path)

    def get(self, run_id: str) -> RunRecord:
        """The run with this id (or unique id prefix); RunStoreError when there is none."""
        with self._errors("read"), self._transaction() as conn:
            found = select_run(conn, run_id, prefix=True)
        if found is None:
            raise RunStoreError(f"no run '{run_id}' in {self.path}; `autopar runs --records {self.path}` lists them")
        return found

    def list(self, *, plan_id: str | None = None, cluster_name: str | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[RunRecord], int]:
        """One page of runs, newest first, and how many match."""
        with self._errors("read"), self._transaction() as conn:
            return select_runs(conn, plan_id=plan_id, cluster_name=cluster_name, limit=limit, offset=offset)

    def fit_samples(self, cluster_name: str, *, limit: int = 1000) -> tuple[list[FitSample], list[str]]:
        """The newest runs of a cluster with their profiles, and the ids of runs whose profile is not stored."""
        records, _ = self.list(cluster_name=cluster_name, limit=limit)
        with self._errors("read"), self._transaction() as conn:
            bodies = {h: conn.execute("SELECT body FROM profiles WHERE profile_hash = ?", (h,)).fetchone()
                      for h in {r.profile_hash for r in records}}
        profiles = {h: ModelProfile.model_validate_json(b[0]) for h, b in bodies.items() if b is not None}
        samples = [FitSample(r, profiles[r.profile_hash]) for r in records if r.profile_hash in profiles]
        return samples, [r.id for r in records if r.profile_hash not in profiles]


# -- runs --------------------------------------------------------------------------------------------------------------


def store_run(record: RunRecord, ctx: ServiceContext) -> StoredRun:
    """Store a run record; 404 when it names a plan id not stored here, 409 when its id is taken."""
    if record.plan_id is not None and ctx.storage.get_plan(record.plan_id) is None:
        raise ApiError(404, "not_found", f"no plan has id '{record.plan_id}'; drop plan_id or store the plan first",
                       "plan_id")
    if not ctx.storage.insert_run(record):
        raise ApiError(409, "conflict", f"a run with id '{record.id}' is already stored; give the record a new id",
                       "id")
    return StoredRun(id=record.id, plan_linked=record.plan_id is not None, record=record)


def get_run(run_id: str, storage: Storage) -> StoredRun:
    """A stored run by id, or 404."""
    record = storage.get_run(run_id)
    if record is None:
        raise ApiError(404, "not_found", f"no run has id '{run_id}'", "run_id")
    linked = record.plan_id is not None and storage.get_plan(record.plan_id) is not None
    return StoredRun(id=record.id, plan_linked=linked, record=record)


def list_runs(ctx: ServiceContext, *, plan_id: str | None, cluster_name: str | None, limit: int | None,
              offset: int) -> RunPage:
    """One page of stored runs, newest first, optionally of one plan or one cluster name."""
    limit = limit or ctx.settings.page_size
    records, total = ctx.storage.list_runs(plan_id=plan_id, cluster_name=cluster_name, limit=limit, offset=offset)
    items = [RunSummary(id=r.id, created=r.created, plan_id=r.plan_id, model_name=r.model, cluster_name=r.cluster_name,
                        strategy=r.plan.strategy.describe(), measured_step_seconds=r.measured.step_seconds,
                        predicted_step_seconds=r.predicted.step_seconds, step_time_ratio=r.errors.step_time_ratio)
             for r in records]
    following = offset + len(records)
    return RunPage(items=items, total=total, limit=limit, offset=offset,
                   next_offset=following if following < total else None)


def calibrate_cluster(cluster: ClusterSpec, ctx: ServiceContext) -> tuple[ClusterSpec, RunCalibration]:
    """`cluster` fitted to the stored runs of its name whose profile is stored (`planner.run_fit`), or 422."""
    records, _ = ctx.storage.list_runs(cluster_name=cluster.name, limit=1000)
    samples = []
    for record in records:
        row = ctx.storage.get_profile(record.profile_id) if record.profile_id else None
        if row is not None:
            samples.append(FitSample(record, ModelProfile.model_validate_json(row.body)))
    try:
        fit = fit_runs(samples, cluster, source=f"service runs of '{cluster.name}'")
    except RunFitError as exc:
        raise ApiError(422, "no_runs", f"{exc} (runs need their profile stored: POST /v1/profiles, then the record "
                       "with its profile_id)", "options.calibrated") from None
    return fit.cluster, fit.calibration
