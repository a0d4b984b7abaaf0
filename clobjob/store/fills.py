"""The ``clob_fills`` table: columnar buffered inserts and exact reads (dedup by ``id``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from clobjob.errors import ClobjobError
from clobjob.models import BLOCK_S, FILL_COLUMNS, ChainReach
from clobjob.store.database import Database

DERIVED_COLUMNS = ("transaction_hash", "order_hash")  # ALIAS columns: the halves of ``id``
STORED_COLUMNS = tuple(c for c in FILL_COLUMNS if c not in DERIVED_COLUMNS)
_STORED_AT = tuple(FILL_COLUMNS.index(c) for c in STORED_COLUMNS)


class StoreCountMismatch(ClobjobError):
    """An insert that ClickHouse acknowledged with fewer rows written than sent."""


class FillBuffer:
    """Fills gathered as the stored columns until flushed."""

    def __init__(self) -> None:
        self._columns: list[list[Any]] = [[] for _ in STORED_COLUMNS]

    def __len__(self) -> int:
        return len(self._columns[0])

    def extend_columns(self, columns: Sequence[Sequence[Any]]) -> None:
        """Append fills within the storage contract (``models.check_fill_columns``: the worker checks every page
        before it is buffered), as ``Page.columns`` holds them: one sequence per ``FILL_COLUMNS`` field, or none."""
        if columns:
            for column, at in zip(self._columns, _STORED_AT):
                column.extend(columns[at])

    def extend(self, rows: Iterable[Sequence[Any]]) -> None:
        """Append fill rows (tuples in ``FILL_COLUMNS`` order)."""
        self.extend_columns(tuple(zip(*rows)))

    def take(self) -> list[list[Any]]:
        """The gathered columns (``STORED_COLUMNS`` order); the buffer is empty afterwards."""
        taken, self._columns = self._columns, [[] for _ in STORED_COLUMNS]
        return taken


class FillTable:
    """Reads and writes of stored fills."""

    db: Database
    blocks_done_through: Callable[[], int | None]  # RunTables'

    def insert_fills(self, columns: Sequence[Sequence[Any]]) -> int:
        """Insert one block of columns as ``FillBuffer.take`` gives them; returns the row count.

        ``StoreCountMismatch`` when ClickHouse reports fewer rows written than were sent (more is not a loss:
        a materialized view on the table counts its own rows too); not checked when the answer has no summary."""
        sent = len(columns[0]) if columns else 0
        written = self.db.insert("clob_fills", STORED_COLUMNS, columns)
        if written is not None and written < sent:
            raise StoreCountMismatch(f"ClickHouse reports {written:,} of {sent:,} fills written to clob_fills")
        return sent

    def insert_fill_rows(self, rows: Iterable[Sequence[Any]]) -> int:
        """Insert fill rows (tuples in ``FILL_COLUMNS`` order) as one block (unchecked: tests and tools)."""
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

    def chain_reach(self) -> ChainReach:
        """How far the v2 block ranges are complete (``blocks_done_through``) and about when that block was: the
        newest stored v2 fill below it, plus ``BLOCK_S`` per block after that fill's block."""
        through = self.blocks_done_through()
        found = self.db.rows(
            "SELECT block_number, toUnixTimestamp(timestamp) FROM {db}.clob_fills "
            "WHERE exchange_version = 2 AND block_number < {block:UInt64} ORDER BY block_number DESC LIMIT 1",
            {"block": through}) if through is not None else []
        if not found:
            return ChainReach(through, None, None)
        block, at = found[0]
        return ChainReach(through, at + BLOCK_S * (through - 1 - block), at)

    def fills_between(self, source: str, ts_from: int, ts_to: int) -> dict[str, tuple]:
        """``source``'s stored fills with a timestamp in [ts_from, ts_to], by id: (timestamp, maker, taker, maker and
        taker asset ids, maker and taker amounts, fee)."""
        found = self.db.rows(
            "SELECT id, toUnixTimestamp(timestamp), maker, taker, maker_asset_id, taker_asset_id, "
            "toString(maker_amount_filled), toString(taker_amount_filled), toString(fee) FROM {db}.clob_fills FINAL "
            "WHERE source = {source:String} AND timestamp BETWEEN toDateTime({low:Int64}, 'UTC') "
            "AND toDateTime({high:Int64}, 'UTC')", {"source": source, "low": ts_from, "high": ts_to})
        return {row[0]: (*row[1:6], *map(int, row[6:])) for row in found}

    def count_fills(self) -> int:
        """Distinct stored fills (exact, whatever merges have happened)."""
        return self.db.scalar("SELECT count() FROM {db}.clob_fills FINAL")
