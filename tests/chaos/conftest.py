"""The chaos tests' served database: one ``clobjob db serve`` per test module, each run on its own database."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Database


@pytest.fixture(scope="module")
def db(chdb_dir):
    served = Database(chdb_dir)
    yield served
    served.stop()
