"""Suite-wide settings: runs the tests launch record into a temporary store, never into the checkout."""

from __future__ import annotations

import os
import tempfile

import pytest

from api.run_store import STORE_ENV


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
