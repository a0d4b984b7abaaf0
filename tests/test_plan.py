"""The controller on chDB: the missing set, custom lists, unit planning, shard balance, writing plans."""

from __future__ import annotations

import json
import random
import re
import time
from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from clobjob import monitor, plan
from clobjob.cli import main
from clobjob.errors import BadInput
from clobjob.models import FILL_COLUMNS, Checkpoint, Market, MarketFills, Run, UnitState
from clobjob.models import MarketStatus as Status
from clobjob.sources.subgraph import id_bounds
from clobjob.store import open_store
from tests.test_store import make_fill

NOW = 1_700_000_000
DAY = 86_400


def cid(n: int) -> str:
    return "0x" + f"{n:x}".rjust(64, "0")


def fills_of(token: str, count: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        values = dict(zip(FILL_COLUMNS, make_fill(i, rng)))
        buy = values["side"] == "BUY"
        values.update(token_id=token, maker_asset_id="0" if buy else token, taker_asset_id=token if buy else "0")
        rows.append(tuple(values[c] for c in FILL_COLUMNS))
    return rows


# name: (orderbook trades per token (None = no row), stored fills per token, market loaded after the sync,
#        expected status)
SEED = {
    "complete": ((3, 2), (3, 2), False, Status.COMPLETE),
    "incomplete": ((5, 5), (4, 0), False, Status.INCOMPLETE),
    "missing": ((7, 0), (0, 0), False, Status.MISSING),
    "zero": ((0, 0), (0, 0), False, Status.ZERO_FILL),
    "never_traded": ((None, None), (0, 0), False, Status.ZERO_FILL),
    "stored_never_traded": ((None, None), (1, 0), False, Status.COMPLETE),
    "unknown": ((None, None), (0, 0), True, Status.MISSING),
    "stored_unknown": ((None, None), (1, 0), True, Status.UNKNOWN),
    "partial_book": ((2, None), (2, 0), False, Status.COMPLETE),
    "over": ((1, 0), (2, 0), False, Status.COMPLETE),
    "stale_zero": ((0, 0), (1, 0), False, Status.COMPLETE),
    "partial_missing": ((None, 4), (0, 0), True, Status.MISSING),
}


def seed(store) -> dict[str, str]:
    """Markets of every kind with partial data stored, some loaded after the orderbooks sync; returns
    name → condition id."""
    names, books, rows = {}, {}, []
    early, late = [], []
    for n, (name, (trades, stored, after_sync, _)) in enumerate(SEED.items(), 1):
        tokens = (str(1000 * n + 1), str(1000 * n + 2))
        names[name] = cid(n)
        (late if after_sync else early).append(
            Market(condition_id=cid(n), token_ids=tokens, volume=float(n), question=f"market {n}?",
                   end_date=datetime.fromtimestamp(NOW - n * 100 * DAY, timezone.utc)))
        for token, quantity, count in zip(tokens, trades, stored):
            if quantity is not None:
                books[token] = (cid(n), quantity)
            rows += fills_of(token, count, seed=int(token))
    store.upsert_markets(early)
    store.upsert_orderbooks(books)
    time.sleep(0.01)
    store.upsert_markets(late)
    store.insert_fill_rows(rows)
    store.insert_fill_rows(rows[:3])  # re-sent rows do not count twice
    return names


def test_missing_incomplete_and_complete_sets_are_exact(store):
    names = seed(store)
    report = plan.missing_work(store, now=NOW)
    got = {m.condition_id: m for m in report.markets}
    for name, (_, _, _, status) in SEED.items():
        assert got[names[name]].status is status, name
    assert got[names["unknown"]].expected_fills is None and got[names["partial_book"]].expected_fills == 2
    assert got[names["never_traded"]].expected_fills == 0 and got[names["partial_missing"]].expected_fills == 4
    assert got[names["complete"]].stored_fills == 5 and got[names["incomplete"]].stored_fills == 4
    assert got[names["complete"]].question == "market 1?" and got[names["complete"]].token_ids == ("1001", "1002")
    assert {m.condition_id for m in report.work} == {names[n] for n in ("incomplete", "missing", "unknown",
                                                                          "partial_missing")}
    summary = report.to_dict()
    assert summary["by_status"] == {"complete": 5, "incomplete": 1, "missing": 3, "zero_fill": 2, "unknown": 1,
                                    "source_short": 0, "waiting_v2": 0}
    assert summary["to_fetch"] == {"markets": 4, "missing": 3, "incomplete": 1, "unknown_expected": 1,
                                   "expected_fills": 10 + 7 + 4, "requests": 2}
    # end dates 100·n days ago: n = 1..3 → 30d-1y, n = 4..7 → 1y-2y, n = 8..12 → >2y
    assert sum(summary["by_age"]["30d-1y"].values()) == 3 and sum(summary["by_age"][">2y"].values()) == 5
    assert sum(summary["by_volume"]["top100"].values()) == 12 and got[cid(12)].volume_rank == 1


def test_custom_list_restricts_and_reports_unknown_ids(store):
    names = seed(store)
    stranger = cid(999)
    report = plan.missing_work(store, [names["missing"], names["complete"].upper().replace("0X", "0x"), stranger])
    assert {m.condition_id for m in report.markets} == {names["missing"], names["complete"]}
    assert report.not_found == (stranger,)
    assert [m.volume_rank for m in report.markets] == [12, 10]  # ranks in the whole universe


def test_plan_and_monitor_agree_on_every_market(store):
    """One definition: diagnose/plan and status/verify classify alike (a zero-trade market after a sync is
    zero-fill for both, a market loaded after the last sync is missing for both)."""
    names = seed(store)
    report = plan.missing_work(store, now=NOW)
    shown = monitor.run_status(store)["markets"]
    assert {status: shown[status] for status in report.by_status()} == report.by_status()
    assert shown["coverage"] == report.coverage and monitor.verify(store)["markets"] == shown
    months = monitor.coverage_by_month(store.market_fill_counts())
    assert sum(m["not_covered"] for m in months) == len(report.work) + shown["unknown"] == shown["not_covered"]
    planned = {c for u in plan.plan_backfill(store, 2, "agree", plan.missing_work(store)) for c in u.condition_ids}
    assert planned == {m.condition_id for m in report.work}
    assert names["never_traded"] not in planned and names["unknown"] in planned


def test_custom_list_validation_names_bad_ids_and_lines(tmp_path):
    lines = tmp_path / "ids.txt"
    lines.write_text(f"# targets\n{cid(1)}\n0xnothex\n\n{'f' * 65}\n{cid(1)[2:]}\n")
    with pytest.raises(BadInput) as caught:
        plan.read_condition_ids(lines)
    message = str(caught.value)
    assert "2 bad condition id(s)" in message and "line 3: condition id '0xnothex'" in message
    assert "line 5:" in message and "longer than 32 bytes" in message and "line 6" not in message
    array = tmp_path / "ids.json"
    array.write_text(f'[\n  "{cid(1)}",\n  "0x1",\n  12,\n  "{cid(2)}"\n]')
    with pytest.raises(BadInput) as caught:
        plan.read_condition_ids(array)
    assert "line 3: condition id '0x1' has 1 hex digits" in str(caught.value)  # not padded to 64 digits
    assert "line 4: condition id 12 is not hex" in str(caught.value)
    array.write_text(json.dumps([cid(2), "0x" + cid(1)[4:], cid(1)]))  # 62 digits: leading zeros lost
    assert plan.read_condition_ids(array) == [cid(2), cid(1)]


def cli(settings, *argv: str) -> int:
    return main(["--clickhouse-url", settings.clickhouse_url.get_secret_value(), "--database",
                 settings.clickhouse_database, *argv])


def test_cli_diagnose_json_out_and_bad_list_exit_2(settings, tmp_path, capsys):
    assert cli(settings, "diagnose", "--offline", "--rate", "1") == 0  # empty universe: coverage unknown
    assert "coverage - " in capsys.readouterr().out
    with open_store(settings) as store:
        names = seed(store)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{cid(1)}\n0xzz\n")
    assert cli(settings, "diagnose", "--offline", "--markets", str(bad)) == 2
    assert "line 2: condition id '0xzz'" in capsys.readouterr().err
    out = tmp_path / "missing.json"
    assert cli(settings, "diagnose", "--offline", "--json", "--rate", "5", "--out", str(out)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["by_status"]["missing"] == 3 and shown["recommendation"]["rate_rps"] == 5
    assert json.loads(out.read_text()) == sorted(names[n] for n in ("incomplete", "missing", "unknown",
                                                                     "partial_missing"))
    assert cli(settings, "diagnose", "--offline", "--markets", str(out)) == 0
    human = capsys.readouterr().out
    assert "missing" in human and "incomplete" in human and "requests" in human


def test_cli_plan_refuses_to_overwrite_progress_without_force(settings, capsys):
    with open_store(settings) as store:
        seed(store)
    assert cli(settings, "plan", "--shards", "2", "--run-id", "r1") == 0
    assert "shard" in capsys.readouterr().out
    with open_store(settings) as store:
        first = store.units("r1")
        assert {c for u in first for c in u.condition_ids} == {m.condition_id for m in
                                                               plan.missing_work(store).work}
        assert store.run("r1").shards == 2
        store.save_checkpoints([Checkpoint(run_id="r1", shard=first[0].shard, unit_id=first[0].unit_id,
                                           state=UnitState.RUNNING, cursor="x")])
    assert cli(settings, "plan", "--shards", "3", "--run-id", "r1") == 2
    assert "--force" in capsys.readouterr().err
    with open_store(settings) as store:
        assert store.units("r1") == first and store.checkpoints("r1")
    assert cli(settings, "plan", "--shards", "3", "--run-id", "r1", "--force") == 0
    with open_store(settings) as store:
        assert store.checkpoints("r1") == {} and store.run("r1").shards == 3
        assert {u.shard for u in store.units("r1")} <= {0, 1, 2}


def test_write_plan_force_replaces_cleanly(store):
    seed(store)
    report = plan.missing_work(store, now=NOW)
    units = plan.plan_units(report, 2, "r")
    plan.write_plan(store, Run(run_id="r", shards=2, source="subgraph"), units)
    plan.write_plan(store, Run(run_id="r", shards=2, source="subgraph"), units)  # no progress yet: re-planning is fine
    store.save_checkpoints([Checkpoint(run_id="r", shard=units[0].shard, unit_id=units[0].unit_id)])
    with pytest.raises(BadInput, match="already has progress") as caught:
        plan.write_plan(store, Run(run_id="r", shards=1, source="subgraph"), units[:1])
    assert caught.value.exit_code == 2
    plan.write_plan(store, Run(run_id="r", shards=1, source="subgraph"),
                    [u.model_copy(update={"shard": 0}) for u in units[:1]], force=True)
    assert store.units("r") == [units[0].model_copy(update={"shard": 0})] and store.checkpoints("r") == {}
    assert store.run("r").shards == 1


def test_cli_plan_time_window(settings, capsys):
    assert cli(settings, "plan", "--shards", "2", "--run-id", "w", "--since", "2024-01-01T00:00:00Z",
               "--until", "2024-01-08") == 0
    with open_store(settings) as store:
        units = store.units("w")
    assert all(u.token_ids == () for u in units) and {u.shard for u in units} == {0, 1}
    assert cli(settings, "plan", "--shards", "2", "--since", "2024-01-08", "--until", "2024-01-01") == 2
    assert cli(settings, "plan", "--shards", "2", "--since", "2024-01-01") == 2


# --- planning without a database ------------------------------------------------------------------


def work(n: int, expected: int | None, *, start: int | None = NOW - 100 * DAY, end: int | None = NOW - DAY,
         tokens: int = 2) -> MarketFills:
    return MarketFills(cid(n), tuple(str(n * 10 + t) for t in range(tokens)), start, end, float(expected or 0),
                       expected, 0, n)


def heavy_tailed(count: int, seed: int) -> plan.MissingReport:
    rng = random.Random(seed)
    markets = [work(n, int(20 * rng.paretovariate(0.9)) if n % 17 else None) for n in range(count)]
    return plan.MissingReport(NOW, tuple(markets))


def tiles(ranges: list[tuple[str | None, str | None]]) -> bool:
    """Fill-id ranges tile the whole id space: the first from None, the last to None, each boundary shared by
    neighbours, boundaries strictly increasing lower-case hex prefixes shorter than any id."""
    ordered = sorted(ranges, key=lambda r: "" if r[0] is None else r[0])
    inner = [r[0] for r in ordered[1:]]
    return (ordered[0][0] is None and ordered[-1][1] is None
            and all(a[1] == b[0] for a, b in zip(ordered, ordered[1:]))
            and all(a < b for a, b in zip(inner, inner[1:]))
            and all(re.fullmatch(r"0x[0-9a-f]{1,63}", b) for b in inner))


def check_cover(report: plan.MissingReport, units: list, max_tokens: int = plan.MAX_BATCH_TOKENS) -> None:
    ranges: dict[str, list] = {}
    for unit in units:
        markets = [m for m in report.work if m.condition_id in unit.condition_ids]
        assert unit.token_ids == tuple(t for m in markets for t in m.token_ids)
        assert len(unit.condition_ids) == 1 or len(unit.token_ids) <= max_tokens
        assert unit.ts_from is None and unit.ts_to is None
        for c in unit.condition_ids:
            ranges.setdefault(c, []).append((unit.id_from, unit.id_to))
    assert set(ranges) == {m.condition_id for m in report.work}
    for c, found in ranges.items():
        assert found == [(None, None)] or (len(found) > 1 and tiles(found)), c
    assert sorted(u.unit_id for u in units) == list(range(len(units)))


@hyp_settings(max_examples=60, deadline=None)
@given(
    expected=st.lists(st.one_of(st.none(), st.integers(0, 2_000), st.integers(0, 3_000_000)), min_size=1,
                      max_size=60),
    spans=st.lists(st.tuples(st.one_of(st.none(), st.integers(NOW - 900 * DAY, NOW)),
                             st.one_of(st.none(), st.integers(NOW - 900 * DAY, NOW + 90 * DAY))), min_size=1),
    shards=st.integers(1, 16),
)
def test_every_missing_market_in_exactly_one_unit_or_tiling_id_ranges(expected, spans, shards):
    markets = [MarketFills(cid(n), (str(2 * n), str(2 * n + 1)), *spans[n % len(spans)], 0.0, e, 0, n)
               for n, e in enumerate(expected)]
    report = plan.MissingReport(NOW, tuple(markets))
    units = plan.plan_units(report, shards, "h")
    check_cover(report, units)
    assert all(0 <= u.shard < shards for u in units)
    for c, e in enumerate(expected):
        planned = sum(u.expected_fills for u in units if cid(c) in u.condition_ids and len(u.condition_ids) == 1)
        assert planned in (0, e or 0)  # a market alone (whole or cut) keeps its exact expected count


@pytest.mark.parametrize(("start", "end"), [(NOW - 100 * DAY, NOW - DAY), (None, None)])
def test_giant_market_is_cut_into_equal_tiling_id_ranges(start, end):
    report = plan.MissingReport(NOW, (work(1, 5_000_000, start=start, end=end), *(work(n, 900) for n in range(2, 400))))
    units = plan.plan_units(report, 8, "g")
    giant = sorted((u for u in units if u.condition_ids == (cid(1),)), key=lambda u: u.id_from or "")
    assert len(giant) > 8 and tiles([(u.id_from, u.id_to) for u in giant])
    assert sum(u.expected_fills for u in giant) == 5_000_000
    assert max(u.expected_fills for u in giant) - min(u.expected_fills for u in giant) <= 1
    widths = [int(b.id_from, 16) - int(a.id_from or "0x0", 16) for a, b in zip(giant, giant[1:])]
    assert max(widths) - min(widths) <= 1  # equal shares of the id space
    check_cover(report, units)


def test_id_bounds_tile_the_id_space():
    assert id_bounds(1) == [None, None]
    assert id_bounds(4) == [None, "0x40000000", "0x80000000", "0xc0000000", None]
    assert tiles(list(zip(id_bounds(1000), id_bounds(1000)[1:])))


def test_plan_is_deterministic_and_independent_of_input_order():
    report = heavy_tailed(3_000, seed=7)
    shuffled = list(report.markets)
    random.Random(1).shuffle(shuffled)
    first = plan.plan_units(report, 8, "d")
    assert first == plan.plan_units(report, 8, "d")
    assert first == plan.plan_units(plan.MissingReport(NOW, tuple(shuffled)), 8, "d")


def test_batches_respect_request_budget_and_token_cap():
    report = plan.MissingReport(NOW, tuple(work(n, 300, tokens=3 if n % 2 else 2) for n in range(1, 600)))
    units = plan.plan_units(report, 4, "b", batch_requests=5, max_batch_tokens=50)
    assert all(u.expected_requests <= 5 and len(u.token_ids) <= 50 for u in units)
    assert all(u.expected_requests == max(1, -(-u.expected_fills // 1000)) for u in units)
    check_cover(report, units, max_tokens=50)


@pytest.mark.parametrize("shards", [4, 8, 16])
def test_heavy_tailed_plan_is_balanced(shards):
    report = heavy_tailed(20_000, seed=3)
    units = plan.plan_units(report, shards, "x")
    loads = [load.expected_requests for load in plan.shard_loads(units, shards)]
    assert plan.imbalance(loads) <= 1.10
    assert sum(loads) >= plan.estimate_requests(report)


def test_time_window_units_tile_the_window():
    since, until = datetime(2024, 1, 1, tzinfo=timezone.utc), datetime(2024, 1, 8, tzinfo=timezone.utc)
    units = plan.plan_window(since, until, 3, "w")
    ordered = sorted(units, key=lambda u: u.ts_from)
    assert ordered[0].ts_from == int(since.timestamp()) and ordered[-1].ts_to == int(until.timestamp())
    assert all(a.ts_to == b.ts_from for a, b in zip(ordered, ordered[1:]))
    assert [load.units for load in plan.shard_loads(units, 3)] == [4, 4, 4]
    assert len(plan.plan_window(since, since.replace(minute=2), 8, "w")) == 2


def test_recommendation_follows_rate_and_work():
    big = plan.recommend(1_000_000, 50.0, latency_s=0.4)
    assert big.duration_s == 20_000 and big.shards == 5 and big.in_flight == 5
    assert plan.recommend(100, 50.0).shards == 1
    with pytest.raises(BadInput):
        plan.recommend(1, 0)



def test_default_run_ids_are_unique_within_a_second(store):
    moment = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    assert plan.default_run_id(store, moment) == "run-20240506-070809"
    store.create_run(Run(run_id="run-20240506-070809", shards=1, source="subgraph"), [])
    assert plan.default_run_id(store, moment) == "run-20240506-070809-2"


async def test_live_check_samples_markets_and_finds_the_rate_limit(settings):
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from clobjob.parts import process_parts
    from clobjob.probe import live_check

    answered = []

    async def handle(request: web.Request) -> web.Response:
        tokens = (await request.json())["variables"].get("tokens", [])
        answered.append(tokens)
        if "666" in tokens:
            return web.json_response({"errors": [{"message": "boom"}]})
        if len(answered) % 4 == 0:
            return web.json_response({}, status=429)
        return web.json_response({"data": {"orderFilledEvents": []}})

    app = web.Application()
    app.router.add_post("/gn", handle)
    server = TestServer(app)
    await server.start_server()
    try:
        probing = settings.with_overrides(subgraph_url=str(server.make_url("/gn")), initial_rps=20.0,
                                          max_in_flight=4, request_timeout_s=2.0)
        markets = (work(1, 5), MarketFills(cid(2), ("666",), None, None, 0.0, None, 0, 2))
        async with process_parts(probing, "subgraph") as parts:
            live = await live_check(plan.MissingReport(NOW, markets), parts.source, parts.controller, sample=2,
                                    probe_s=1.5, timeout_s=6.0, concurrency=4)
            assert await live_check(plan.MissingReport(NOW, ()), parts.source, parts.controller) is None
    finally:
        await server.close()
    good, bad = sorted(live.samples, key=lambda s: s.condition_id)
    assert (good.fills, good.more, good.error, good.expected_fills) == (0, False, "", 5)
    assert bad.condition_id == cid(2) and "boom" in bad.error
    assert live.requests > 2 and live.throttled > 0 and live.limited and live.rate_rps > 0


def test_unknown_listed_ids_fail_plan_and_backfill_naming_them(settings, tmp_path, capsys):
    with open_store(settings) as store:
        seed(store)
    listed = tmp_path / "ids.txt"
    unknown = [cid(900 + n) for n in range(14)]
    listed.write_text("\n".join([cid(1), *unknown]) + "\n")
    for command in (["plan", "--shards", "2", "--run-id", "r-unknown"], ["backfill", "--shards", "1"]):
        assert cli(settings, *command, "--markets", str(listed)) == 2
        err = capsys.readouterr().err
        assert "14 listed condition id(s) are not in the market universe" in err
        assert unknown[0] in err and unknown[9] in err and unknown[10] not in err and "; and 4 more" in err
    with open_store(settings) as store:
        assert store.runs() == []  # no empty run that status would show as DONE
    assert cli(settings, "diagnose", "--offline", "--markets", str(listed)) == 0  # diagnose reports them
    assert "not in the universe: 14" in capsys.readouterr().out


def test_a_large_id_array_reads_back_fast_and_bad_ones_are_capped(tmp_path):
    ids = [cid(n) for n in range(30_000)]
    array = tmp_path / "ids.json"
    array.write_text(json.dumps(ids, indent=1))  # as diagnose --out writes it
    assert plan.read_condition_ids(array) == ids
    array.write_text(json.dumps(["0x1234"] * 30_000))
    with pytest.raises(BadInput) as caught:
        plan.read_condition_ids(array)
    message = str(caught.value)
    assert "1,000 bad condition id(s) (stopped reading at 1,000)" in message and "; and 990 more" in message
