"""The ``clob_fills`` table: columnar buffered inserts and exact reads (dedup by ``id``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from clobjob.errors import SourceError
from clobjob.models import FILL_COLUMNS
from clobjob.store.database import Database

DERIVED_COLUMNS = ("transaction_hash", "order_hash")  # ALIAS columns: the halves of ``id``
STORED_COLUMNS = tuple(c for c in FILL_COLUMNS if c not in DERIVED_COLUMNS)
_STORED_AT = tuple(FILL_COLUMNS.index(c) for c in STORED_COLUMNS)
_ID, _TX, _ORDER = (FILL_COLUMNS.index(c) for c in ("id", *DERIVED_COLUMNS))


class FillBuffer:
    """Fill rows (tuples in ``FILL_COLUMNS`` order) gathered as the stored columns until flushed."""

    def __init__(self) -> None:
        self._columns: list[list[Any]] = [[] for _ in STORED_COLUMNS]

    def __len__(self) -> int:
        return len(self._columns[0])

    def extend(self, rows: Iterable[Sequence[Any]]) -> None:
        """Append rows; a row whose id is not ``transaction_hash + "_" + order_hash`` is refused."""
        columns = self._columns
        for row in rows:
            if row[_ID] != f"{row[_TX]}_{row[_ORDER]}":
                raise SourceError(f"fill id {row[_ID]!r} is not transaction hash + '_' + order hash")
            for column, at in zip(columns, _STORED_AT):
                column.append(row[at])

    def take(self) -> list[list[Any]]:
        """The gathered columns (``STORED_COLUMNS`` order); the buffer is empty afterwards."""
        taken, self._columns = self._columns, [[] for _ in STORED_COLUMNS]
        return taken


class FillTable:
    """Reads and writes of stored fills."""

    db: Database

    def insert_fills(self, columns: Sequence[Sequence[Any]]) -> int:
        """Insert one block of columns as ``FillBuffer.take`` gives them; returns the row count."""
        self.db.insert("clob_fills", STORED_COLUMNS, columns)
        return len(columns[0]) if columns else 0

    def insert_fill_rows(self, rows: Iterable[Sequence[Any]]) -> int:
        """Insert fill rows (tuples in ``FILL_COLUMNS`` order) as one block."""
        buffer = FillBuffer()
        buffer.extend(rows)
        return self.insert_fills(buffer.take())

    def recent_fills(self, now: datetime) -> dict[str, int]:
        """Distinct stored fills by fill timestamp in the last 24 h and 7 days before ``now``."""
        day, week = now - timedelta(days=1), now - timedelta(days=7)
        found = self.db.rows(
            "SELECT uniqExactIf(id, timestamp > toDateTime({day:Int64}, 'UTC')), uniqExact(id) "
            "FROM {db}.clob_fills WHERE timestamp > toDateTime({week:Int64}, 'UTC') "
            "AND timestamp <= toDateTime({now:Int64}, 'UTC')",
            {"day": int(day.timestamp()), "week": int(week.timestamp()), "now": int(now.timestamp())},
        )
        return {"fills_24h": found[0][0], "fills_7d": found[0][1]}

    def newest_fill_before_block(self, source: str, block: int) -> int | None:
        """The newest fill time (unix) of ``source``'s stored fills below ``block`` (None when there is none)."""
        return self.db.scalar("SELECT toUnixTimestamp(maxOrNull(timestamp)) FROM {db}.clob_fills "
                              "WHERE source = {source:String} AND block_number < {block:UInt64}",
                              {"source": source, "block": block})

    def count_fills(self) -> int:
        """Distinct stored fills (exact, whatever merges have happened)."""
        return self.db.scalar("SELECT count() FROM {db}.clob_fills FINAL")
