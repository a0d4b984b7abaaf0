"""The ``markets`` and ``orderbooks`` tables: the universe and the subgraph's expected fill counts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from clobjob.models import ChainReach, Market, MarketFills, as_utc
from clobjob.store.database import Database, id_set

FILL_COUNTS_SQL = """
WITH (SELECT maxOrNull(synced_at) FROM {db}.orderbooks) AS last_sync
SELECT condition_id, token_ids, toUnixTimestamp(start_date), toUnixTimestamp(end_date), volume,
       if(any_row = 1 OR updated_at <= last_sync, expected, NULL), stored,
       row_number() OVER (ORDER BY volume DESC, condition_id), question, closed, latest, stored_v2
FROM (
  SELECT t.condition_id AS condition_id, any(t.token_ids) AS token_ids, any(t.question) AS question,
         any(t.start_date) AS start_date, any(t.end_date) AS end_date, any(t.closed) AS closed,
         any(t.volume) AS volume, any(t.updated_at) AS updated_at,
         sumIf(s.n, o.owner = t.condition_id) AS stored, sumIf(b.q, o.owner = t.condition_id) AS expected,
         max(b.has_row) AS any_row, maxIf(s.latest, o.owner = t.condition_id) AS latest,
         sumIf(s.n2, o.owner = t.condition_id) AS stored_v2
  FROM (SELECT condition_id, token_ids, question, start_date, end_date, closed, volume, updated_at,
               arrayJoin(token_ids) AS token_id FROM {db}.markets FINAL WHERE notEmpty(token_ids)) AS t
  LEFT JOIN (SELECT token_id, min(condition_id) AS owner
             FROM (SELECT arrayJoin(token_ids) AS token_id, condition_id FROM {db}.markets FINAL)
             GROUP BY token_id) AS o USING token_id
  LEFT JOIN (SELECT token_id, count() AS n, countIf(exchange_version = 2) AS n2,
                    toUnixTimestamp(maxIf(timestamp, exchange_version = 1)) AS latest
             FROM {db}.clob_fills FINAL GROUP BY token_id) AS s USING token_id
  LEFT JOIN (SELECT token_id, trades_quantity AS q, 1 AS has_row FROM {db}.orderbooks FINAL) AS b USING token_id
  GROUP BY t.condition_id
)
ORDER BY condition_id
SETTINGS join_use_nulls = 0
"""
"""Per market of the universe: expected fills by the rule of ``models.MarketStatus`` (NULL = unknown), stored
fills (and of them the v2 ones), volume rank, the newest v1 fill's time. A token two markets claim counts for one
of them only (the lower condition id; see ``token_conflicts``). Each table is read once per role (no CTE referenced
twice: ClickHouse inlines CTEs)."""

MARKET_COLUMNS = ("condition_id", "token_ids", "question", "slug", "start_date", "end_date", "closed", "volume",
                  "neg_risk", "source")


class MarketTable:
    """Reads and writes of the market universe."""

    db: Database
    fetched_markets: Callable[[], dict[str, datetime]]  # RunTables'
    chain_reach: Callable[[], ChainReach]  # FillTable's

    def upsert_markets(self, markets: Sequence[Market]) -> int:
        """Insert or replace markets by condition id (idempotent); returns the count."""
        columns = [[getattr(m, name) for m in markets] for name in MARKET_COLUMNS]
        self.db.insert("markets", MARKET_COLUMNS, columns)
        return len(markets)

    def markets(self, condition_ids: Iterable[str] | None = None) -> list[Market]:
        """The current market rows (all, or the given condition ids)."""
        where, params = "", {}
        if condition_ids is not None:
            where, params = f"WHERE condition_id IN {id_set('ids')}", {"ids": list(condition_ids)}
        found = self.db.rows(
            f"SELECT {', '.join(MARKET_COLUMNS)} FROM {{db}}.markets FINAL {where} ORDER BY condition_id",
            params,
        )
        return [Market(**dict(zip(MARKET_COLUMNS, row))) for row in found]

    def token_conditions(self, condition_ids: Iterable[str] | None = None) -> dict[str, str]:
        """Token id → condition id, from the universe and the subgraph's orderbooks (all, or some markets)."""
        where, params = "", {}
        if condition_ids is not None:
            where, params = f"WHERE condition_id IN {id_set('ids')}", {"ids": list(condition_ids)}
        found = self.db.rows(
            f"""SELECT token_id, any(condition_id) FROM (
                    SELECT arrayJoin(token_ids) AS token_id, condition_id FROM {{db}}.markets FINAL {where}
                    UNION ALL
                    SELECT token_id, condition_id FROM {{db}}.orderbooks FINAL {where}
                ) GROUP BY token_id""",
            params,
        )
        return dict(found)

    def claimed_tokens(self) -> set[str]:
        """Every token id a market of the universe claims."""
        return {token for (token,) in self.db.rows("SELECT DISTINCT arrayJoin(token_ids) FROM {db}.markets FINAL")}

    def market_fill_counts(self, condition_ids: Iterable[str] | None = None, *,
                           now: float | None = None) -> list[MarketFills]:
        """Every market of the universe (or only those listed) with expected and stored fills, by condition id.

        One query over markets ⨝ orderbooks ⨝ stored fills (``MarketFills.status`` classifies the rows), and
        when each market was last fetched to the end of the source (``proven`` when that was after its counts last
        changed; ``new_since_ts`` = its newest stored v1 fill's time when it was, but before, so only newer fills
        can be missing), and whether the v2 block ranges reach the safe head as of ``now`` (default: the current
        time; ``ChainReach.current``). It
        reads the whole universe (the volume ranks need it, and 200,000 markets with 10M fills take ≈ 2 s);
        a list is applied to the result, so a long one costs nothing (as a query parameter, 200,000 ids
        would add ≈ 1.5 s per reference).
        """
        wanted = None if condition_ids is None else set(condition_ids)
        fetched, counted = self.fetched_markets(), self.orderbooks_synced_at()
        current = self.chain_reach().current(time.time() if now is None else now)
        found = []
        for cid, tokens, *rest, latest, v2_fills in self.db.rows(FILL_COUNTS_SQL):
            if wanted is None or cid in wanted:
                fetched_at, counted_at = fetched.get(cid), counted.get(cid)
                proven = fetched_at is not None and (counted_at is None or fetched_at > counted_at)
                grown = fetched_at is not None and not proven and latest > 0
                found.append(MarketFills(cid, tuple(tokens), *rest, proven=proven,
                                         new_since_ts=latest if grown else None, v2_fills=v2_fills,
                                         chain_current=current))
        return found

    def token_conflicts(self, limit: int = 5) -> tuple[int, list[tuple[str, list[str]]]]:
        """Tokens that more than one market claims: their count and up to ``limit`` examples (token, markets)."""
        found = self.db.rows(
            "SELECT token_id, groupArray(condition_id) FROM (SELECT arrayJoin(token_ids) AS token_id, condition_id "
            "FROM {db}.markets FINAL) GROUP BY token_id HAVING count() > 1 ORDER BY token_id")
        return len(found), [(token, sorted(markets)) for token, markets in found[:limit]]

    def orderbook_counts(self) -> dict[str, int]:
        """Expected fills of every token that has a count (the subgraph's ``tradesQuantity``)."""
        return dict(self.db.rows("SELECT token_id, trades_quantity FROM {db}.orderbooks FINAL"))

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
        """Per condition id, when the expected fills of its tokens last changed (rows are written only then)."""
        found = self.db.rows("SELECT condition_id, max(synced_at) FROM {db}.orderbooks FINAL GROUP BY condition_id")
        return {condition: as_utc(at) for condition, at in found}
