"""The ``clob_fills`` table: columnar buffered inserts and exact reads (dedup by ``id``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from clobjob.models import FILL_COLUMNS
from clobjob.store.database import Database


class FillBuffer:
    """Fill rows (tuples in ``FILL_COLUMNS`` order) gathered column by column until flushed."""

    def __init__(self) -> None:
        self._columns: list[list[Any]] = [[] for _ in FILL_COLUMNS]

    def __len__(self) -> int:
        return len(self._columns[0])

    def extend(self, rows: Iterable[Sequence[Any]]) -> None:
        """Append rows."""
        columns = self._columns
        for row in rows:
            for column, value in zip(columns, row, strict=True):
                column.append(value)

    def take(self) -> list[list[Any]]:
        """The gathered columns; the buffer is empty afterwards."""
        taken, self._columns = self._columns, [[] for _ in FILL_COLUMNS]
        return taken


class FillTable:
    """Reads and writes of stored fills."""

    db: Database

    def insert_fills(self, columns: Sequence[Sequence[Any]]) -> int:
        """Insert one block of fill columns (``FILL_COLUMNS`` order); returns the row count."""
        self.db.insert("clob_fills", FILL_COLUMNS, columns)
        return len(columns[0]) if columns else 0

    def insert_fill_rows(self, rows: Iterable[Sequence[Any]]) -> int:
        """Insert fill rows (tuples in ``FILL_COLUMNS`` order) as one block."""
        buffer = FillBuffer()
        buffer.extend(rows)
        return self.insert_fills(buffer.take())

    def count_fills(self) -> int:
        """Distinct stored fills (exact, whatever merges have happened)."""
        return self.db.scalar("SELECT count() FROM {db}.clob_fills FINAL")

    def fill_counts_by_token(self, token_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Exact distinct fill counts per token id (all tokens, or only those given)."""
        if token_ids is None:
            found = self.db.rows("SELECT token_id, count() FROM {db}.clob_fills FINAL GROUP BY token_id")
        else:
            found = self.db.rows(
                "SELECT token_id, count() FROM {db}.clob_fills FINAL "
                "WHERE token_id IN {tokens:Array(String)} GROUP BY token_id",
                {"tokens": list(token_ids)},
            )
        return {token: count for token, count in found}
