"""v1 and v2 fills in one backfill: market units from the subgraph and block units from Polygon logs, exact
against both ground truths, status showing how far the chain is read, verify's fills of the last 24 hours."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest

from clobjob import launch, monitor
from clobjob.models import EXCHANGES, FILL_COLUMNS
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sim.data import HEAD_BLOCK, HEAD_TS, block_timestamp
from clobjob.sim.rpc import Chain, RpcConfig, RpcNode
from clobjob.sources.markets import market_from_gamma
from tests.truth import COMPARED, expected_rows

V2 = [address for address, version in EXCHANGES.items() if version == 2]


def quiet(_line: str) -> None:
    pass


def now_block() -> int:
    return HEAD_BLOCK + (int(time.time()) - HEAD_TS) // 2


@pytest.fixture(scope="module")
def world():
    dataset = Dataset.generate(markets=120, seed=9)
    chain = Chain(dataset, start_block=now_block() - 1_500, blocks=1_200, matches_per_block=1.0, seed=4)
    return dataset, chain


def stored(store, source: str) -> dict[str, tuple]:
    rows = store.db.rows(f"SELECT {', '.join(COMPARED)} FROM {{db}}.clob_fills FINAL WHERE source = {{s:String}}",
                         {"s": source})
    return {r[0]: tuple(int(v.timestamp()) if hasattr(v, "timestamp") else v for v in r) for r in rows}


def test_one_backfill_stores_v1_and_v2_fills_exactly_and_verify_sees_the_last_day(world, settings, store):
    dataset, chain = world
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(dataset.markets, start=1)])
    node = RpcNode(chain, RpcConfig.for_profile("infura", seed=4))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        contracts = ",".join(f"{address}@{chain.start_block}" for address in V2)  # the chain's window only
        settings = settings.with_overrides(subgraph_url=sim.url, rpc_url=sim.rpc_url, rpc_contracts=contracts,
                                           flush_interval_s=0.2, heartbeat_interval_s=0.5)
        assert launch.backfill(settings, shards=3, parallelism=None, say=quiet) == 0  # --source all (RPC set)
        status = monitor.run_status(store, heartbeat_interval_s=0.5)
        ready = monitor.verify(store, heartbeat_interval_s=0.5)
        again = []
        assert launch.backfill(settings, shards=3, parallelism=None, say=again.append) == 0
    assert stored(store, "subgraph") == expected_rows(dataset)
    columns = {c: i for i, c in enumerate(("id", "transaction_hash", "order_hash", "timestamp", "block_number",
                                           "log_index", "exchange", "maker", "taker", "maker_asset_id",
                                           "taker_asset_id", "maker_amount_filled", "taker_amount_filled", "fee",
                                           "condition_id", "token_id", "side", "is_relay_leg", "exchange_version",
                                           "source"))}
    universe = {t: m["conditionId"] for m in dataset.markets for t in json.loads(m["clobTokenIds"])}
    truth = {row[0]: tuple(row[columns[c]] for c in COMPARED) for row in chain.truth(universe)}
    assert stored(store, "rpc") == truth and truth  # both exchanges, no overlap with v1 ids, nothing missing
    assert not set(truth) & set(expected_rows(dataset))
    assert {row[columns["exchange"]] for row in chain.truth(universe)} == set(V2)
    assert status["source"] == "all" and status["v2"]["blocks_done_through"] >= chain.end_block
    fills_24h = next(c for c in ready["criteria"] if c["name"] == "fills_last_24h")
    assert fills_24h["status"] == "pass", fills_24h
    assert any("blocks" in line for line in again)  # the second backfill only reads the new blocks


def test_verify_fails_the_last_day_when_the_chain_cannot_be_read(world, settings, store):
    dataset, chain = world
    open_market = {**dataset.markets[0], "closed": False, "endDate": "2027-06-30T00:00:00Z"}  # trading now
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate([open_market, *dataset.markets[1:10]], 1)])
    node = RpcNode(chain, RpcConfig.for_profile("clean", seed=4))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        contracts = ",".join(f"{address}@{chain.start_block}" for address in V2)
        settings = settings.with_overrides(subgraph_url=sim.url, rpc_url=sim.rpc_url, rpc_contracts=contracts,
                                           flush_interval_s=0.2, heartbeat_interval_s=0.5, unit_attempts=1)
        node.configure(p_5xx=1.0)  # the endpoint answers nothing useful any more
        said: list[str] = []
        code = launch.backfill(settings, shards=1, parallelism=None, say=said.append)  # all: v1 still fetched
    assert code == 1 and any("cannot read the chain's head" in line and "HTTP 502" in line for line in said)
    assert stored(store, "subgraph")  # the v1 part ran all the same
    fills_24h = next(c for c in monitor.verify(store, on_chain=True)["criteria"] if c["name"] == "fills_last_24h")
    assert fills_24h["status"] == "fail" and "not read up to the last day" in fills_24h["detail"], fills_24h
    assert json.dumps(fills_24h)


def test_a_market_on_v2_is_covered_only_once_the_chain_is_read_to_the_safe_head(settings, store):
    """A market starting after the cutover has no subgraph count (zero-fill by v1 alone) and one whose v1 fills
    are complete but that trades on v2 too: both wait for v2 until the block ranges reach the safe head, and status
    and verify say how far the chain is read."""
    dataset = Dataset.generate(markets=120, seed=9)
    start = now_block() - 4_000  # the chain's fills end over an hour ago: a read up to them is not current
    chain = Chain(dataset, start_block=start, blocks=1_500, matches_per_block=1.0, seed=5)
    middle = start + 700
    universe = {t: m["conditionId"] for m in dataset.markets for t in json.loads(m["clobTokenIds"])}
    early = {row[14] for row in chain.truth(universe, start, middle)}
    anywhere = {row[14] for row in chain.truth(universe)}
    new = next(m for m, known in zip(dataset.markets, dataset.known) if not known and m["conditionId"] in anywhere)
    old = next(m for m, known in zip(dataset.markets, dataset.known)
               if known and dataset.trades_quantity(json.loads(m["clobTokenIds"])[0]) and m["conditionId"] in early)
    soon, ended = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + days * 86_400)) for days in (30, -5))
    rows = [{**m, "startDate": "2026-05-02T00:00:00Z", "endDate": soon, "closed": False} if m is new
            else {**m, "endDate": ended, "closed": True} if m is old else m for m in dataset.markets]
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(rows, start=1)])
    node = RpcNode(chain, RpcConfig.for_profile("alchemy", seed=5, head=middle + 10))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        contracts = ",".join(f"{address}@{start}" for address in V2)
        settings = settings.with_overrides(subgraph_url=sim.url, rpc_url=sim.rpc_url, rpc_contracts=contracts,
                                           rpc_lag_blocks=10, flush_interval_s=0.2, heartbeat_interval_s=0.5)

        def statuses() -> dict[str, str]:
            return {m.condition_id: m.status.value for m in store.market_fill_counts()}

        assert launch.backfill(settings, shards=2, parallelism=None, source="subgraph", say=quiet) == 0
        assert statuses()[new["conditionId"]] == "waiting_v2" and statuses()[old["conditionId"]] == "complete"
        status = monitor.run_status(store, heartbeat_interval_s=0.5)
        assert status["markets"]["waiting_v2"] == 1 and status["v2"]["blocks_done_through"] is None
        shown = monitor.render_status(status)
        assert "waiting for v2 1" in shown and "the chain is not read yet" in shown

        assert launch.backfill(settings, shards=2, parallelism=None, source="rpc", say=quiet) == 0  # to the middle
        found = statuses()
        assert found[new["conditionId"]] == found[old["conditionId"]] == "waiting_v2"
        v2 = monitor.run_status(store, heartbeat_interval_s=0.5)["v2"]
        assert v2["blocks_done_through"] == middle + 1 and v2["current"] is False
        assert v2["reached_at"] == datetime.fromtimestamp(block_timestamp(middle), timezone.utc).isoformat()
        recent = next(c for c in monitor.verify(store)["criteria"] if c["name"] == "recent_markets_complete")
        assert recent["status"] == "fail" and f"{old['conditionId']} {old['question']}" in recent["examples"]
        assert "waiting for v2" in recent["detail"] and f"block {middle:,}" in recent["detail"], recent

        node.configure(head=None)  # the chain's head is now again
        assert launch.backfill(settings, shards=2, parallelism=None, source="rpc", say=quiet) == 0
    found = {m.condition_id: m for m in store.market_fill_counts()}
    assert found[new["conditionId"]].status.value == "complete" and found[new["conditionId"]].v2_fills > 0
    assert found[old["conditionId"]].status.value == "complete" and found[old["conditionId"]].v1_fills > 0
    assert not [m for m in found.values() if m.status.value == "waiting_v2"]
    assert monitor.run_status(store, heartbeat_interval_s=0.5)["v2"]["current"] is True
    assert stored(store, "rpc") == {row[0]: row for row in _compared(chain.truth(universe))}
    recent = next(c for c in monitor.verify(store)["criteria"] if c["name"] == "recent_markets_complete")
    assert recent["status"] == "pass", recent


def _compared(rows: list[tuple]) -> list[tuple]:
    """Truth rows (``FILL_COLUMNS``) reduced to the compared columns."""
    return [tuple(row[FILL_COLUMNS.index(c)] for c in COMPARED) for row in rows]
