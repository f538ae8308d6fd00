"""SQLite storage of the service: migrations, WAL, content-keyed plans, and no half-written records."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from api.storage import SCHEMA_VERSION, PlanRow, Storage, StorageError


def _row(plan_id: str, key: str, created_at: float = 1.0) -> PlanRow:
    return PlanRow(id=plan_id, request_key=key, created_at=created_at, model_name="m", cluster_name="c",
                   world_size=4, summary="dp=4", step_seconds=1.0, request="{}", body="{}")


def test_new_database_is_migrated_to_the_current_schema_in_wal_mode(tmp_path):
    storage = Storage(tmp_path / "a.db")
    assert storage.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "a.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_data_and_does_not_rerun_migrations(tmp_path):
    Storage(tmp_path / "a.db").insert_plan(_row("p1", "k1"))
    reopened = Storage(tmp_path / "a.db")
    assert reopened.get_plan("p1") is not None and reopened.schema_version() == SCHEMA_VERSION


def test_database_from_a_newer_autopar_is_refused(tmp_path):
    Storage(tmp_path / "a.db")
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="newer"):
        Storage(tmp_path / "a.db")


def test_second_plan_with_the_same_request_key_keeps_the_first(tmp_path):
    storage = Storage(tmp_path / "a.db")
    first = storage.insert_plan(_row("p1", "same"))
    second = storage.insert_plan(_row("p2", "same"))
    assert second.id == first.id == "p1"
    assert storage.list_plans(limit=10, offset=0)[1] == 1


def test_failed_transaction_leaves_no_record(tmp_path):
    storage = Storage(tmp_path / "a.db")
    with pytest.raises(RuntimeError), storage._transaction() as conn:
        conn.execute("INSERT INTO profiles (id, name, created_at, body) VALUES ('x', 'n', 0, '{}')")
        raise RuntimeError("crash after the insert, before the commit")
    assert storage.get_profile("x") is None


def test_process_killed_mid_write_leaves_no_record_and_a_usable_file(tmp_path):
    db = tmp_path / "a.db"
    Storage(db)
    script = textwrap.dedent(f"""
        import os
        from api.storage import Storage
        storage = Storage({str(db)!r})
        with storage._transaction() as conn:
            conn.execute("INSERT INTO profiles (id, name, created_at, body) VALUES ('x', 'n', 0, '{{}}')")
            os._exit(1)  # dies holding the write transaction: no commit, no rollback, no close
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=60, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    storage = Storage(db)
    assert storage.get_profile("x") is None
    assert storage.insert_profile("y", "n", "{}")[1] is True
