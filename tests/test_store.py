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


def test_a_progress_row_that_fails_validation_gives_way_to_the_units_last_valid_version(store):
    """A latest progress row with a state that is no unit state, or a negative count, is reported with the bad
    value and where it is stored; the unit's checkpoint is its newest older valid version, kept after the
    table merged the old versions away (never its start while a valid one exists)."""
    import clickhouse_connect

    from tests.chaos.harness import insert_raw_progress

    units = [WorkUnit(run_id="r1", unit_id=u, shard=0, token_ids=(str(u),), expected_fills=10) for u in (1, 2, 3)]
    store.create_run(Run(run_id="r1", shards=1, source="subgraph"), units)
    for pages in (1, 2):
        store.save_checkpoints([Checkpoint(run_id="r1", shard=0, unit_id=u, state=UnitState.RUNNING,
                                           cursor=f"c{u}-{pages}", fills=5 * pages, pages=pages) for u in (1, 2)])
    client = store.db.client
    assert isinstance(client, clickhouse_connect.driver.client.Client)
    insert_raw_progress(client, store.db.database, run_id="r1", unit_id=1, state=7, cursor="c1-9", fills=7)
    insert_raw_progress(client, store.db.database, run_id="r1", unit_id=2, state=1, cursor="c2-9", fills=-5)
    insert_raw_progress(client, store.db.database, run_id="r1", unit_id=3, state=2, cursor="c3", attempts=-1)
    store.db.command("OPTIMIZE TABLE {db}.backfill_progress FINAL")  # the older versions merged away

    saved, invalid = store.checked_checkpoints("r1", 0)
    assert {u: (cp.cursor, cp.pages, cp.fills) for u, cp in saved.items()} == {1: ("c1-2", 2, 10),
                                                                              2: ("c2-2", 2, 10)}
    assert [(bad.unit_id, bad.resumed.pages if bad.resumed else None) for bad in invalid] == [(1, 2), (2, 2), (3, None)]
    assert invalid[0].reason.startswith("state 7: ") and f"fills {2**64 - 5}: " in invalid[1].reason
    assert f"attempts {2**32 - 1}: " in invalid[2].reason
    shown = str(invalid[0])
    assert shown.startswith("run r1 shard 0 unit 1: stored checkpoint is invalid (state 7: ") and "pod vandal" in shown
    assert "resuming from its last valid checkpoint (2 pages, 10 fills)" in shown
    assert "resuming from the unit's start" in str(invalid[2])

    cursor_check = store.checked_checkpoints("r1", 0, check=lambda cp: "cursor: not mine" if cp.pages == 2 else None)
    assert {u: cp.cursor for u, cp in cursor_check[0].items()} == {1: "c1-1", 2: "c2-1"}  # a version further back
