"""ClickHouse storage (design.md "Storage contract"): one ``Store`` over a server or embedded chDB."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from clickhouse_connect.driver.exceptions import OperationalError

from clobjob.config import Settings
from clobjob.errors import StoreUnreachable
from clobjob.store.database import Database, DatabaseBusy, connect, database_holder
from clobjob.store.fills import FillBuffer, FillTable
from clobjob.store.markets import MarketTable
from clobjob.store.outage import Outage
from clobjob.store.runs import RunTables

__all__ = ["Database", "DatabaseBusy", "FillBuffer", "Store", "database_holder", "open_store"]


class Store(FillTable, MarketTable, RunTables):
    """Every table of the storage contract behind one handle (the tables' methods live in their modules)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        return self.db.migrate()

    def drop_database(self) -> None:
        """Delete the whole database (the demo's --fresh)."""
        self.db.command("DROP DATABASE IF EXISTS {db}")

    def close(self) -> None:
        """Release the connection (and, for chDB, the database directory)."""
        self.db.close()


BUSY_POLL_S = 0.2  # how often a held embedded database is tried again


@contextmanager
def open_store(settings: Settings, *, migrate: bool = True, wait_s: float = 0.0,
               busy_wait_s: float = 0.0) -> Iterator[Store]:
    """Open the configured database, migrating it first unless ``migrate=False``. An embedded database another
    process holds is waited for up to ``busy_wait_s`` (``status --watch`` holds it a moment at every refresh), then
    ``DatabaseBusy`` names that process. A server that cannot be reached is waited for up to ``wait_s``
    (retrying with backoff, as the store writer does), then ``StoreUnreachable`` names the redacted DSN."""
    until = time.monotonic() + busy_wait_s
    while True:
        try:
            store = _reached(settings, migrate, wait_s)
            break
        except DatabaseBusy:
            if time.monotonic() + BUSY_POLL_S > until:
                raise
            time.sleep(BUSY_POLL_S)
    try:
        yield store
    finally:
        store.close()


def _reached(settings: Settings, migrate: bool, wait_s: float) -> Store:
    """The store opened once the server answers, tried again for up to ``wait_s``."""
    outage = Outage(wait_s, settings.redacted_dsn(), "waiting for it")
    while True:
        try:
            return _opened(settings, migrate)
        except (StoreUnreachable, OperationalError) as exc:
            if wait_s <= 0:
                raise
            time.sleep(outage.delay(exc))


def _opened(settings: Settings, migrate: bool) -> Store:
    store = Store(Database(connect(settings), settings.clickhouse_database, settings.clickhouse_cluster))
    try:
        if migrate:
            store.migrate()
    except BaseException:
        store.close()
        raise
    return store
