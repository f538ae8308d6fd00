"""Suite-wide settings: runs the tests launch record into a temporary store, never into the checkout; under
pytest-xdist the schemathesis module is left to a plain run.

`make test` runs tests/test_service_schema.py in one plain pytest process and everything else with `-n 2 --dist
loadfile` (each module on one worker, so a module's batched multi-process launch runs once). Schemathesis names every
generated per-operation test alike, which xdist cannot schedule (it would run one operation of the 16), so xdist
workers do not collect that module; run it without `-n`.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from api.run_store import STORE_ENV

collect_ignore = ["test_service_schema.py"] if os.environ.get("PYTEST_XDIST_WORKER") else []


@pytest.fixture(autouse=True, scope="session")
def _runs_store_outside_the_checkout():
    """Point `autopar run`'s default run store ($AUTOPAR_RUNS_DB) at a temporary file for the whole session;
    subprocesses the tests start inherit it."""
    with tempfile.TemporaryDirectory(prefix="autopar-test-runs-") as tmp:
        previous = os.environ.get(STORE_ENV)
        os.environ[STORE_ENV] = os.path.join(tmp, "runs.db")
        yield
        if previous is None:
            os.environ.pop(STORE_ENV, None)
        else:
            os.environ[STORE_ENV] = previous
