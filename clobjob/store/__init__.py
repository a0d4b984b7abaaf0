"""ClickHouse storage (design.md "Storage contract"): one ``Store`` over a server or embedded chDB."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from clobjob.config import Settings
from clobjob.store.database import Database, DatabaseBusy, connect, database_holder
from clobjob.store.fills import FillBuffer, FillTable
from clobjob.store.markets import MarketTable
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


@contextmanager
def open_store(settings: Settings, *, migrate: bool = True) -> Iterator[Store]:
    """Open the configured database, migrating it first unless ``migrate=False``; ``DatabaseBusy`` names the
    process holding an embedded database."""
    store = Store(Database(connect(settings), settings.clickhouse_database, settings.clickhouse_cluster))
    try:
        if migrate:
            store.migrate()
        yield store
    finally:
        store.close()
