"""A ClickHouse database handle over clickhouse-connect: one code path for a server and embedded chDB."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver import options as driver_options
from clickhouse_connect.driver.exceptions import Error as DriverError
from clickhouse_connect.driver.exceptions import OperationalError

from clobjob.config import Settings
from clobjob.errors import BadInput, ClobjobError, StoreUnreachable
from clobjob.store import schema
from clobjob.store.outage import reason_of

# Pinned so behaviour does not depend on server defaults: synchronous inserts, no block deduplication (fills
# dedup by id; a block dropped as a "duplicate" would make the written count disagree with the rows sent).
INSERT_SETTINGS = {"async_insert": 0, "insert_deduplicate": 0}


def id_set(name: str) -> str:
    """A bound list of strings as an ``IN`` operand: ``x IN {id_set("ids")}`` with ``{"ids": [...]}``.

    A bare ``IN {ids:Array(String)}`` is quadratic in the list (27 s for 20,000 ids on chDB); as a
    subquery it becomes one hash set (1.5 s for 200,000, mostly passing the parameter).
    """
    return f"(SELECT arrayJoin({{{name}:Array(String)}}))"


SERVED_AT = "served-at.json"
"""The file in an embedded database's directory where ``clobjob db serve`` records its pid and URL while serving."""


class DatabaseBusy(ClobjobError):
    """The embedded database is held by another process (chDB allows one per path); ``served_at`` is the URL
    when that process is ``clobjob db serve``, which other commands should be pointed at instead."""

    def __init__(self, pid: int | None, served_at: str | None = None) -> None:
        hint = (f"; it is clobjob db serve at {served_at}: use --clickhouse-url {served_at} "
                "(or CLOBJOB_CLICKHOUSE_URL) to work with it meanwhile") if served_at else ""
        super().__init__(f"the embedded database is in use by another process (pid {pid or '?'}){hint}")
        self.pid = pid
        self.served_at = served_at


def served_at(path: Path, pid: int | None) -> str | None:
    """The URL ``clobjob db serve`` recorded in the database directory ``path`` if process ``pid`` wrote it."""
    try:
        served = json.loads((path / SERVED_AT).read_text())
        return str(served["url"]) if pid and served["pid"] == pid else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def database_holder(settings: Settings) -> int | None:
    """The pid of another process holding the embedded database (0 if unreadable), None when it is free
    (or held by this process, which may reopen it).

    chDB keeps an exclusive ``flock`` on ``<path>/status`` (which names the pid) while it is open.
    """
    if not settings.embedded:
        return None
    status_file = Path(settings.dsn().removeprefix("chdb://")) / "status"
    try:
        fd = os.open(status_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        found = re.search(r"PID:\s*(\d+)", os.read(fd, 4096).decode(errors="replace"))
        pid = int(found.group(1)) if found else 0
        return None if pid == os.getpid() else pid
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def connect(settings: Settings) -> Any:
    """A clickhouse-connect client for the configured DSN (``http(s)://…`` or ``chdb:///path``).

    ``DatabaseBusy`` naming the holding process when another one has the embedded database open;
    ``StoreUnreachable`` when the server cannot be reached (nothing answers: a retry may help).
    """
    dsn = settings.dsn()
    options: dict[str, Any] = {"interface": urlsplit(dsn).scheme}  # the driver alone guesses https from the port
    if settings.embedded:
        if (holder := database_holder(settings)) is not None:
            raise DatabaseBusy(holder, served_at(Path(dsn.removeprefix("chdb://")), holder))
        try:
            import chdb  # noqa: F401
        except ImportError as exc:
            raise BadInput("embedded ClickHouse needs chdb: pip install 'clobjob[embedded]'") from exc
        os.makedirs(dsn.removeprefix("chdb://"), exist_ok=True)
        options = {}
    elif "pandas" not in sys.modules:
        # The driver imports pandas (67 MB) at its first insert only to ask whether the data is a DataFrame;
        # clobjob inserts lists, so a server client says pandas is absent (chDB itself needs pandas).
        driver_options.pd = None
    try:
        return clickhouse_connect.get_client(dsn=dsn, **options)
    except Exception as exc:  # the driver's message may contain the DSN: show the redacted one
        if (holder := database_holder(settings)) is not None:
            raise DatabaseBusy(holder, served_at(Path(dsn.removeprefix("chdb://")), holder)) from None
        if isinstance(exc, OperationalError) and not settings.embedded:  # nothing answers (its text has no DSN)
            raise StoreUnreachable(f"cannot connect to ClickHouse at {settings.redacted_dsn()}: "
                                   f"{reason_of(exc)}") from None
        raise ClobjobError(f"cannot connect to ClickHouse at {settings.redacted_dsn()}: "
                           f"{type(exc).__name__}") from None


class Database:
    """A client bound to one database name; ``{db}`` in SQL is that database, values are bound parameters."""

    def __init__(self, client: Any, database: str, cluster: str | None = None) -> None:
        self.client = client
        self.database = database
        self.cluster = cluster
        self._insert_types: dict[tuple[str, tuple[str, ...]], Sequence[Any]] = {}  # see ``insert``

    def sql(self, text: str) -> str:
        """``text`` with ``{db}`` replaced by the quoted database name."""
        return text.replace("{db}", f"`{self.database}`")

    def rows(self, text: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Rows of a query; parameters are bound server-side (``{name:Type}`` in the SQL)."""
        return self.client.query(self.sql(text), parameters=dict(params or {})).result_rows

    def scalar(self, text: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row (``None`` when there is none)."""
        found = self.rows(text, params)
        return found[0][0] if found else None

    def command(self, text: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns nothing."""
        self.client.command(self.sql(text), parameters=dict(params or {}))

    def insert(self, table: str, column_names: Sequence[str], columns: Sequence[Sequence[Any]]) -> int | None:
        """Insert one columnar block (one list per column) into ``table``; returns the rows ClickHouse reports
        written (its summary's ``written_rows``), None when the answer carries no summary.

        The columns' types are asked of the server (``DESCRIBE TABLE``) at a table's first insert only: asking at
        every block cost a round trip (7 % of a worker's CPU at 100 req/s). ``migrate`` forgets them."""
        if not (columns and len(columns[0])):
            return 0
        key = (table, tuple(column_names))
        context = self.client.create_insert_context(table, column_names=list(column_names),
                                                    database=self.database, column_oriented=True,
                                                    column_types=self._insert_types.get(key),
                                                    settings=INSERT_SETTINGS, data=list(columns))
        self._insert_types[key] = context.column_types
        try:
            summary = self.client.insert(context=context).summary
            return int(summary["written_rows"]) if "written_rows" in summary else None
        except DriverError:
            raise
        except Exception as exc:  # a value the driver cannot serialize: name its column (the driver only logs it)
            raise ClobjobError(f"cannot send column {getattr(context, 'column_name', '?')} of {table} to "
                               f"ClickHouse: {type(exc).__name__}: {exc}") from exc
        finally:
            # clickhouse-connect's InsertContext sits in a reference cycle and keeps the data (also outside
            # its ``data`` property): unless it lets go, every inserted block (≈10 MB of Python objects per
            # 20,000 fills) stays alive until the next full garbage collection.
            vars(context).clear()

    def migrate(self) -> list[int]:
        """Create the database and apply every migration not yet recorded; returns the versions applied."""
        self._insert_types.clear()
        on_cluster = f" ON CLUSTER `{self.cluster}`" if self.cluster else ""
        self.client.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`{on_cluster}")
        self.client.command(schema.render(schema.SCHEMA_TABLE, self.database, self.cluster))
        done = {row[0] for row in self.rows("SELECT DISTINCT version FROM {db}.schema_migrations")}
        applied = []
        for version, description, statements in schema.MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                self.client.command(schema.render(statement, self.database, self.cluster))
            self.insert("schema_migrations", ["version", "description"], [[version], [description]])
            applied.append(version)
        return applied

    def schema_version(self) -> int:
        """The highest applied migration (0 for an empty database)."""
        return self.scalar("SELECT max(version) FROM {db}.schema_migrations") or 0

    def close(self) -> None:
        """Release the client."""
        self.client.close()
