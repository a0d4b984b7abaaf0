"""Versioned, idempotent migrations of the storage contract (design.md); same SQL on server and chDB.

Each migration is a list of DDL statements with ``{db}``, ``{on_cluster}`` and ``{engine:…}`` holes:
the engine holes become ``Replicated…`` engines when a cluster is configured.

``clob_fills`` is keyed by ``id`` alone and not partitioned: a backfill inserts fills of every month at
once, and monthly partitions would turn each insert into dozens of parts. ``price`` is an ALIAS computed
from the exact amounts at read time, so it costs nothing on insert and can never disagree with them.
Likewise ``transaction_hash`` and ``order_hash`` are the two halves of ``id`` (tx hash + "_" + order
hash, for subgraph and on-chain rows alike): aliases, not stored copies (≈ 1.7× faster inserts).
"""

from __future__ import annotations

import re

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "fills, markets, orderbooks, runs, units, progress, heartbeats",
        [
            """CREATE TABLE IF NOT EXISTS {db}.clob_fills {on_cluster} (
                id String,
                transaction_hash String ALIAS substring(id, 1, position(id, '_') - 1),
                order_hash String ALIAS substring(id, position(id, '_') + 1),
                timestamp DateTime('UTC'),
                block_number Nullable(UInt64),
                log_index Nullable(UInt32),
                exchange LowCardinality(String),
                maker String,
                taker String,
                maker_asset_id String,
                taker_asset_id String,
                maker_amount_filled UInt256,
                taker_amount_filled UInt256,
                fee UInt256,
                condition_id String,
                token_id String,
                side Enum8('BUY' = 0, 'SELL' = 1),
                is_relay_leg Bool,
                exchange_version UInt8,
                source LowCardinality(String),
                price Decimal(38, 18) ALIAS if(maker_amount_filled = 0 OR taker_amount_filled = 0, 0,
                    if(side = 'BUY', toDecimal256(maker_amount_filled, 18) / taker_amount_filled,
                                     toDecimal256(taker_amount_filled, 18) / maker_amount_filled)),
                ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = {engine:ReplacingMergeTree(ingested_at)}
            ORDER BY id""",
            """CREATE TABLE IF NOT EXISTS {db}.markets {on_cluster} (
                condition_id String,
                token_ids Array(String),
                question String,
                slug String,
                start_date Nullable(DateTime('UTC')),
                end_date Nullable(DateTime('UTC')),
                closed Bool,
                volume Float64,
                neg_risk Bool,
                source LowCardinality(String),
                updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = {engine:ReplacingMergeTree(updated_at)}
            ORDER BY condition_id""",
            """CREATE TABLE IF NOT EXISTS {db}.orderbooks {on_cluster} (
                token_id String,
                condition_id String,
                trades_quantity UInt64,
                synced_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = {engine:ReplacingMergeTree(synced_at)}
            ORDER BY token_id""",
            """CREATE TABLE IF NOT EXISTS {db}.backfill_runs {on_cluster} (
                run_id String,
                parent_run_id String,
                source LowCardinality(String),
                shards UInt32,
                params String,
                created_at DateTime64(3, 'UTC'),
                version UInt64
            ) ENGINE = {engine:ReplacingMergeTree(version)}
            ORDER BY run_id""",
            """CREATE TABLE IF NOT EXISTS {db}.backfill_units {on_cluster} (
                run_id String,
                shard UInt32,
                unit_id UInt32,
                condition_ids Array(String),
                token_ids Array(String),
                ts_from Nullable(Int64),
                ts_to Nullable(Int64),
                id_from Nullable(String),
                id_to Nullable(String),
                expected_fills UInt64,
                expected_requests UInt64
            ) ENGINE = {engine:ReplacingMergeTree}
            ORDER BY (run_id, shard, unit_id)""",
            """CREATE TABLE IF NOT EXISTS {db}.backfill_progress {on_cluster} (
                run_id String,
                shard UInt32,
                unit_id UInt32,
                state Enum8('pending' = 0, 'running' = 1, 'done' = 2, 'failed' = 3),
                cursor String,
                fills UInt64,
                pages UInt64,
                attempts UInt32,
                last_error String,
                pod String,
                updated_at DateTime64(3, 'UTC'),
                version UInt64
            ) ENGINE = {engine:ReplacingMergeTree(version)}
            ORDER BY (run_id, shard, unit_id)""",
            """CREATE TABLE IF NOT EXISTS {db}.backfill_heartbeats {on_cluster} (
                run_id String,
                shard UInt32,
                pod String,
                at DateTime64(3, 'UTC'),
                state LowCardinality(String),
                fills UInt64,
                requests UInt64,
                throttled UInt64,
                rps Float64,
                rate_limit Float64,
                in_flight UInt32,
                units_done UInt32,
                units_total UInt32
            ) ENGINE = {engine:ReplacingMergeTree(at)}
            ORDER BY (run_id, shard)""",
        ],
    ),
    (
        2,
        "units of a source of their own (a backfill of v1 and v2 fills), block ranges of on-chain units",
        [
            """ALTER TABLE {db}.backfill_units {on_cluster}
                ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT 'subgraph',
                ADD COLUMN IF NOT EXISTS block_from Nullable(UInt64),
                ADD COLUMN IF NOT EXISTS block_to Nullable(UInt64)""",
        ],
    ),
    (
        3,
        "every version of every checkpoint, kept: a unit whose latest checkpoint fails validation resumes from its "
        "last valid one (backfill_progress keeps only the latest once merged)",
        [
            """CREATE TABLE IF NOT EXISTS {db}.backfill_progress_history {on_cluster} AS {db}.backfill_progress
                ENGINE = {engine:MergeTree} ORDER BY (run_id, shard, unit_id, version)""",
            """CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.backfill_progress_versions {on_cluster}
                TO {db}.backfill_progress_history AS SELECT * FROM {db}.backfill_progress""",
        ],
    ),
]

LATEST = MIGRATIONS[-1][0]

_ENGINE_HOLE = re.compile(r"\{engine:([A-Za-z]+)(\([^)]*\))?\}")

SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS {db}.schema_migrations {on_cluster} (
    version UInt32,
    description String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = {engine:ReplacingMergeTree}
ORDER BY version"""


def render(statement: str, database: str, cluster: str | None) -> str:
    """Fill a DDL template's holes for one database (and optional cluster)."""

    def engine(match: re.Match[str]) -> str:
        name, args = match.group(1), match.group(2) or ""
        return f"Replicated{name}{args}" if cluster else f"{name}{args}"

    on_cluster = f"ON CLUSTER `{cluster}`" if cluster else ""
    return _ENGINE_HOLE.sub(engine, statement).replace("{db}", f"`{database}`").replace(
        "{on_cluster}", on_cluster
    )
