"""Shared fixtures: one embedded ClickHouse (chDB) per test session, a fresh database per test.

chDB allows one database path per process at a time, so every test shares the session's path and gets
its own database name inside it.
"""

from __future__ import annotations

import uuid

import pytest

from clobjob.config import Settings
from clobjob.store import Store, open_store


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def settings(chdb_dir, tmp_path, monkeypatch) -> Settings:
    for name in ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return Settings(
        home=tmp_path / "home",
        clickhouse_url=f"chdb://{chdb_dir}",
        clickhouse_database=f"t_{uuid.uuid4().hex[:12]}",
    )


@pytest.fixture
def store(settings) -> Store:
    with open_store(settings) as opened:
        yield opened


@pytest.fixture
def plan(store):
    """A planned run "r" of a scripted source (tests/scripted.py): the rows of each unit."""
    from tests.scripted import plan_scripted_run

    return plan_scripted_run(store)
