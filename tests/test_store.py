"""Storage contract on the real ClickHouse engine (chDB)."""

from __future__ import annotations

import random

from clobjob.models import FILL_COLUMNS, Checkpoint, Run, UnitState, WorkUnit
from clobjob.store import Database, open_store, schema


def make_fill(i: int, rng: random.Random) -> tuple:
    tx, order = f"0x{rng.getrandbits(256):064x}", f"0x{rng.getrandbits(256):064x}"
    token = str(rng.getrandbits(256))
    buy = i % 2 == 0
    values = {
        "id": f"{tx}_{order}", "transaction_hash": tx, "order_hash": order, "timestamp": 1_650_000_000 + i,
        "block_number": None, "log_index": None, "exchange": "", "maker": "0x" + "a" * 40,
        "taker": "0x" + "b" * 40, "maker_asset_id": "0" if buy else token,
        "taker_asset_id": token if buy else "0", "maker_amount_filled": 2**64 + i,
        "taker_amount_filled": 3 * 10**6 + i, "fee": i % 7, "condition_id": "0x" + "c" * 64,
        "token_id": token, "side": "BUY" if buy else "SELL", "is_relay_leg": i % 3 == 0,
        "exchange_version": 1, "source": "subgraph",
    }
    return tuple(values[c] for c in FILL_COLUMNS)


def test_migrations_are_versioned_and_idempotent(settings):
    with open_store(settings, migrate=False) as store:
        assert store.migrate() == [m[0] for m in schema.MIGRATIONS]
        assert store.migrate() == []
        assert store.db.schema_version() == schema.LATEST
        tables = {r[0] for r in store.db.rows("SELECT name FROM system.tables WHERE database = "
                                                "{d:String}", {"d": settings.clickhouse_database})}
    assert {"clob_fills", "markets", "orderbooks", "backfill_runs", "backfill_units", "backfill_progress",
            "backfill_heartbeats", "schema_migrations"} <= tables


def test_cluster_setting_renders_replicated_engines():
    ddl = schema.render(schema.MIGRATIONS[0][2][0], "db", "main")
    assert "ON CLUSTER `main`" in ddl and "ReplicatedReplacingMergeTree(ingested_at)" in ddl
    plain = schema.render(schema.MIGRATIONS[0][2][0], "db", None)
    assert "ON CLUSTER" not in plain and "Replicated" not in plain


def test_100k_fills_round_trip_exactly_and_dedup_by_id(store):
    rng = random.Random(1)
    rows = [make_fill(i, rng) for i in range(100_000)]
    store.insert_fill_rows(rows)
    store.insert_fill_rows(rows[:30_000])  # a re-sent batch (crash after insert, before checkpoint)
    assert store.count_fills() == 100_000
    stored = store.db.rows(f"SELECT {', '.join(FILL_COLUMNS)} FROM {{db}}.clob_fills FINAL")
    as_tuples = {r[0]: tuple(r) for r in stored}
    for row in rows[::997]:
        got = as_tuples[row[0]]
        assert got[FILL_COLUMNS.index("maker_amount_filled")] == row[FILL_COLUMNS.index("maker_amount_filled")]
        assert got[FILL_COLUMNS.index("maker_amount_filled")] >= 2**64
        assert int(got[FILL_COLUMNS.index("timestamp")].timestamp()) == row[FILL_COLUMNS.index("timestamp")]
        assert got[FILL_COLUMNS.index("token_id")] == row[FILL_COLUMNS.index("token_id")]
    assert len(as_tuples) == 100_000


def test_price_is_exact_usdc_per_share(store):
    rng = random.Random(2)
    buy, sell = make_fill(0, rng), make_fill(1, rng)
    store.insert_fill_rows([buy, sell])
    prices = dict(store.db.rows("SELECT side, price FROM {db}.clob_fills FINAL"))
    m, t = FILL_COLUMNS.index("maker_amount_filled"), FILL_COLUMNS.index("taker_amount_filled")
    assert abs(float(prices["BUY"]) - buy[m] / buy[t]) < 1e-9
    assert abs(float(prices["SELL"]) - sell[t] / sell[m]) < 1e-9


def test_values_are_bound_not_formatted(store):
    hostile = "x'; DROP TABLE {db}.clob_fills; --"
    assert store.markets([hostile]) == [] and store.token_conditions([hostile]) == {}
    assert store.count_fills() == 0  # the table still exists


def test_checkpoints_latest_version_wins(store):
    unit = WorkUnit(run_id="r1", unit_id=3, shard=1, token_ids=("1", "2"), expected_fills=10)
    store.create_run(Run(run_id="r1", shards=2, source="subgraph"), [unit])
    store.save_checkpoints([Checkpoint(run_id="r1", shard=1, unit_id=3, state=UnitState.RUNNING, cursor="a")])
    store.save_checkpoints([Checkpoint(run_id="r1", shard=1, unit_id=3, state=UnitState.DONE, cursor="z",
                                       fills=10, pages=1)])
    (saved,) = store.checkpoints("r1", shard=1).values()
    assert saved.state is UnitState.DONE and saved.cursor == "z" and saved.fills == 10
    assert store.units("r1") == [unit]
    assert store.run("r1").shards == 2
    store.create_run(Run(run_id="r1", shards=1, source="subgraph"), [])  # re-plan replaces plan and progress
    assert store.units("r1") == [] and store.checkpoints("r1") == {}


def test_database_name_is_an_identifier(settings):
    import pytest

    from clobjob.errors import BadInput

    with pytest.raises(BadInput, match="CLOBJOB_CLICKHOUSE_DATABASE='x`; drop': not a plain identifier"):
        settings.with_overrides(clickhouse_database="x`; drop")
    assert isinstance(Database(None, "ok").sql("{db}.t"), str)
