"""A backfill knows its work: expected fills counted by the tool itself (no `markets sync`), completeness proven
by a complete fetch, counts that disagree reported, tokens two markets claim counted once, grown markets."""

from __future__ import annotations

import json

import numpy as np

from clobjob import launch, monitor, plan
from clobjob.cli import main
from clobjob.models import Checkpoint, Market, MarketStatus, Run, RunKind, RunParams, UnitState, WorkUnit
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sim.data import block_of
from clobjob.sources.markets import market_from_gamma
from tests.scripted import fill_row
from tests.truth import COMPARED, expected_rows


def quiet(_line: str) -> None:
    pass


def stored(store) -> dict[str, tuple]:
    rows = store.db.rows(f"SELECT {', '.join(COMPARED)} FROM {{db}}.clob_fills FINAL")
    return {r[0]: tuple(int(v.timestamp()) if hasattr(v, "timestamp") else v for v in r) for r in rows}


def test_load_then_backfill_without_sync_is_complete_and_fetches_only_the_universe(settings, store, tmp_path):
    dataset = Dataset.generate(markets=240, seed=5, top_fills=12_000)
    giant = max(dataset.markets, key=lambda m: sum(map(dataset.trades_quantity, json.loads(m["clobTokenIds"]))))
    chosen = [m for m in dataset.markets[:160] if m is not giant] + [giant]  # the simulator serves ~80 more
    path = tmp_path / "markets.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in chosen))
    tokens = {t for m in chosen for t in json.loads(m["clobTokenIds"])}
    truth = {i: row for i, row in expected_rows(dataset).items() if row[COMPARED.index("token_id")] in tokens}
    with SimServer(dataset, SimConfig.for_profile("clean")).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url, flush_interval_s=0.2, heartbeat_interval_s=0.5)
        assert launch.load_markets(settings, str(path), strict=True)[0] == len(chosen)

        _, units = launch.plan_run(settings, shards=4, run_id="preview", say=quiet)
        assert sum(u.expected_fills for u in units) == len(truth)  # the expected work is known before planning
        assert sum(1 for u in units if giant["conditionId"] in u.condition_ids) > 1  # cut into id ranges

        assert launch.backfill(settings, shards=3, parallelism=None, say=quiet) == 0
        status = monitor.run_status(store, heartbeat_interval_s=0.5)
        result = monitor.verify(store, heartbeat_interval_s=0.5)
    assert stored(store) == truth  # exact, and nothing of the markets outside the universe
    markets = status["markets"]
    assert markets["coverage"] == 1.0 and markets["complete"] + markets["zero_fill"] == len(chosen)
    assert markets["complete"] > 0 and markets["zero_fill"] > 0
    assert result["ready"], result["criteria"]
    assert store.count_markets() == len(chosen)  # counting never adds markets


def test_an_open_market_whose_count_grew_fetches_only_the_new_fills(settings, store):
    dataset = Dataset.generate(markets=40, seed=8)
    market = max(dataset.markets, key=lambda m: sum(map(dataset.trades_quantity, json.loads(m["clobTokenIds"]))))
    tokens = set(json.loads(market["clobTokenIds"]))
    truth = {i: row for i, row in expected_rows(dataset).items() if row[COMPARED.index("token_id")] in tokens}
    times = sorted(row[COMPARED.index("timestamp")] for row in truth.values())
    head = int(block_of(np.array([times[len(times) // 2]]))[0])
    store.upsert_markets([market_from_gamma({**market, "closed": False}, 1)])
    with SimServer(dataset, SimConfig(head_block=head)).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url, flush_interval_s=0.2, heartbeat_interval_s=0.5)
        assert launch.backfill(settings, shards=1, parallelism=None, say=quiet) == 0
        first = stored(store)
        assert 0 < len(first) < len(truth) and set(first) <= set(truth)
        assert monitor.run_status(store)["markets"]["complete"] == 1  # complete as the subgraph stood then

        sim.configure(head_block=None)  # the subgraph indexed further: the open market's count grew
        served_before = sim.stats()["fills_served"]
        assert launch.backfill(settings, shards=1, parallelism=None, say=quiet) == 0
        served = sim.stats()["fills_served"] - served_before
    assert stored(store) == truth
    newest = max(row[COMPARED.index("timestamp")] for row in first.values())
    assert served == sum(1 for t in times if t >= newest) < len(truth)  # only the fills from the newest stored on
    (run, _) = store.runs()[:2]
    assert all(u.ts_from == newest for u in store.units(run.run_id))


def _market(n: int, *tokens: str) -> Market:
    return Market(condition_id=f"0x{n:064x}", token_ids=tokens, closed=True)


def _fetched_whole(store, run_id: str, market: Market) -> None:
    unit = WorkUnit(run_id=run_id, unit_id=0, shard=0, condition_ids=(market.condition_id,),
                    token_ids=market.token_ids)
    store.create_run(Run(run_id=run_id, shards=1, source="subgraph", params=RunParams(kind=RunKind.BACKFILL)), [unit])
    store.save_checkpoints([Checkpoint(run_id=run_id, shard=0, unit_id=0, state=UnitState.DONE, cursor="[]")])


def test_a_count_that_disagrees_with_a_complete_fetch_is_reported_both_ways(store):
    fewer, more = _market(1, "11", "12"), _market(2, "21", "22")
    store.upsert_markets([fewer, more])
    store.upsert_orderbooks({"11": (fewer.condition_id, 12), "12": (fewer.condition_id, 0),
                             "21": (more.condition_id, 8), "22": (more.condition_id, 0)})
    store.insert_fill_rows([fill_row(1, i, "11", fewer.condition_id) for i in range(10)]
                           + [fill_row(2, i, "21", more.condition_id) for i in range(10)])
    before = {m.condition_id: m.status for m in plan.missing_work(store).markets}
    assert before == {fewer.condition_id: MarketStatus.INCOMPLETE, more.condition_id: MarketStatus.COMPLETE}

    _fetched_whole(store, "r1", fewer)  # fetched to the end of the source after the counts were taken
    _fetched_whole(store, "r2", more)
    report = plan.missing_work(store)
    statuses = {m.condition_id: m.status for m in report.markets}
    assert statuses == {fewer.condition_id: MarketStatus.SOURCE_SHORT, more.condition_id: MarketStatus.COMPLETE}
    assert not report.work  # not refetched until its count changes
    mismatches = report.to_dict()["count_mismatches"]
    assert (mismatches["fewer"], mismatches["more"]) == (1, 1)
    assert f"{fewer.condition_id}: the source holds 2 fewer fills than its count (10 vs 12)" in mismatches["examples"]
    assert f"{more.condition_id}: the source holds 2 more fills than its count (10 vs 8)" in mismatches["examples"]

    store.upsert_orderbooks({"11": (fewer.condition_id, 15)})  # the count changed since: fetch again
    assert {m.condition_id for m in plan.missing_work(store).work} == {fewer.condition_id}


def test_a_token_two_markets_claim_is_counted_once_and_reported(store):
    first, second = _market(1, "101", "102"), _market(2, "102", "103")
    store.upsert_markets([first, second])
    store.upsert_orderbooks({"101": (first.condition_id, 0), "102": (first.condition_id, 5),
                             "103": (second.condition_id, 0)})
    store.insert_fill_rows([fill_row(1, i, "102", first.condition_id) for i in range(5)])
    markets = {m.condition_id: m for m in store.market_fill_counts()}
    assert sum(m.expected_fills for m in markets.values()) == 5 and sum(m.stored_fills for m in markets.values()) == 5
    assert markets[first.condition_id].status is MarketStatus.COMPLETE
    assert markets[second.condition_id].status is MarketStatus.ZERO_FILL
    assert store.token_conflicts() == (1, [("102", [first.condition_id, second.condition_id])])


def test_tokens_to_count_are_the_uncounted_the_uncovered_and_the_open(store):
    counted_closed, open_one, uncounted = _market(1, "1", "2"), _market(2, "3", "4"), _market(3, "5", "6")
    store.upsert_markets([counted_closed, open_one.model_copy(update={"closed": False}), uncounted])
    store.upsert_orderbooks({t: (m.condition_id, 0) for m in (counted_closed, open_one) for t in m.token_ids})
    wanted = plan.tokens_to_count(plan.missing_work(store), store.orderbook_counts())
    assert wanted == {"3": open_one.condition_id, "4": open_one.condition_id,
                      "5": uncounted.condition_id, "6": uncounted.condition_id}


def test_diagnose_reports_markets_the_subgraph_does_not_know_and_tokens_no_market_claims(settings, store, capsys):
    dataset = Dataset.generate(markets=1_200, seed=11)  # > 1,000 tokens per leading digit: keyset pages
    traded = [m for m in dataset.markets if sum(map(dataset.trades_quantity, json.loads(m["clobTokenIds"])))]
    loaded, left_out, moved = traded[:300], traded[300:], traded[300]
    moved_tokens = tuple(json.loads(moved["clobTokenIds"]))
    strangers = [_market(n, f"77{n:030d}", f"78{n:030d}") for n in (1, 2)]  # no marketDatas of theirs
    misfiled = Market(condition_id=f"0x{9:064x}", token_ids=moved_tokens[:1], closed=True)
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(loaded)] + strangers + [misfiled])
    unclaimed = {t: dataset.trades_quantity(t) for m in left_out for t in json.loads(m["clobTokenIds"])
                 if t != moved_tokens[0] and dataset.trades_quantity(t)}
    with SimServer(dataset, SimConfig.for_profile("clean")).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url)
        shown = launch.diagnose(settings, markets_file=None, offline=False, sample=0, probe_s=0.0, rate=50.0,
                                out=None)["subgraph"]
        assert main(["--clickhouse-url", settings.clickhouse_url.get_secret_value(), "--database",
                     settings.clickhouse_database, "diagnose", "--subgraph-url", sim.url, "--rate", "50",
                     "--sample", "0"]) == 0
    assert shown["markets_unknown_to_subgraph"] == 2
    assert sorted(shown["unknown_examples"]) == sorted(m.condition_id for m in strangers)
    assert shown["tokens_of_another_market"] == 1
    assert shown["another_market_examples"] == [{"token_id": moved_tokens[0], "condition_id": misfiled.condition_id,
                                                 "subgraph_condition_id": moved["conditionId"]}]
    assert shown["unclaimed_subgraph_tokens"] == len(unclaimed) and shown["unclaimed_fills"] == sum(unclaimed.values())
    top = max(unclaimed, key=lambda t: (unclaimed[t], -int(t)))
    assert shown["unclaimed_examples"][0] == {"token_id": top, "fills": unclaimed[top]}
    human = capsys.readouterr().out
    counted = len(loaded) * 2 + 1  # the loaded markets' tokens and the misfiled one, in one id_in batch
    assert f"expected fills: counted {counted} tokens of {len(loaded) + 1} markets" in human
    assert " in 1 request;" in human
    assert "2 market(s) it does not know" in human and "1 token(s) it files under another market" in human
    assert f"{len(unclaimed):,} token(s) with {sum(unclaimed.values()):,} fills that no market" in human
