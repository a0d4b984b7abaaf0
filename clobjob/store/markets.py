"""The ``markets`` and ``orderbooks`` tables: the universe and the subgraph's expected fill counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from clobjob.models import Market, as_utc
from clobjob.store.database import Database

MARKET_COLUMNS = ("condition_id", "token_ids", "question", "slug", "start_date", "end_date", "closed", "volume",
                  "neg_risk", "source")


class MarketTable:
    """Reads and writes of the market universe."""

    db: Database

    def upsert_markets(self, markets: Sequence[Market]) -> int:
        """Insert or replace markets by condition id (idempotent); returns the count."""
        columns = [[getattr(m, name) for m in markets] for name in MARKET_COLUMNS]
        self.db.insert("markets", MARKET_COLUMNS, columns)
        return len(markets)

    def markets(self, condition_ids: Iterable[str] | None = None) -> list[Market]:
        """The current market rows (all, or the given condition ids)."""
        where, params = "", {}
        if condition_ids is not None:
            where, params = "WHERE condition_id IN {ids:Array(String)}", {"ids": list(condition_ids)}
        found = self.db.rows(
            f"SELECT {', '.join(MARKET_COLUMNS)} FROM {{db}}.markets FINAL {where} ORDER BY condition_id",
            params,
        )
        return [Market(**dict(zip(MARKET_COLUMNS, row))) for row in found]

    def token_conditions(self, condition_ids: Iterable[str] | None = None) -> dict[str, str]:
        """Token id → condition id, from the universe and the subgraph's orderbooks (all, or some markets)."""
        where, params = "", {}
        if condition_ids is not None:
            where, params = "WHERE condition_id IN {ids:Array(String)}", {"ids": list(condition_ids)}
        found = self.db.rows(
            f"""SELECT token_id, any(condition_id) FROM (
                    SELECT arrayJoin(token_ids) AS token_id, condition_id FROM {{db}}.markets FINAL {where}
                    UNION ALL
                    SELECT token_id, condition_id FROM {{db}}.orderbooks FINAL {where}
                ) GROUP BY token_id""",
            params,
        )
        return dict(found)

    def count_markets(self) -> int:
        """Markets in the universe."""
        return self.db.scalar("SELECT count() FROM {db}.markets FINAL")

    def upsert_orderbooks(self, trades_by_token: Mapping[str, tuple[str, int]]) -> int:
        """Store expected fills per token: ``{token_id: (condition_id, tradesQuantity)}``."""
        tokens = list(trades_by_token)
        columns = [tokens, [trades_by_token[t][0] for t in tokens], [trades_by_token[t][1] for t in tokens]]
        self.db.insert("orderbooks", ("token_id", "condition_id", "trades_quantity"), columns)
        return len(tokens)

    def orderbooks_synced_at(self) -> dict[str, datetime]:
        """Per condition id, when the subgraph's expected fills of its tokens were last synced."""
        found = self.db.rows("SELECT condition_id, max(synced_at) FROM {db}.orderbooks FINAL GROUP BY condition_id")
        return {condition: as_utc(at) for condition, at in found}

    def expected_fills_by_token(self) -> dict[str, int]:
        """tradesQuantity per token as last synced from the subgraph."""
        return dict(self.db.rows("SELECT token_id, trades_quantity FROM {db}.orderbooks FINAL"))
