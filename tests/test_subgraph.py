"""SubgraphSource: answers classified, shapes checked strictly, cursors exact, against canned servers and the sim."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from clobjob import plan
from clobjob.config import Settings
from clobjob.errors import SourceError, TransientSourceError
from clobjob.models import EXCHANGES, FILL_COLUMNS, Fill, WorkUnit
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sources.subgraph import (
    SubgraphIndexingError,
    SubgraphSource,
    decode_cursor,
    fill_page,
    fills_query,
    id_bounds,
    typed_fill_page,
)

pytestmark = pytest.mark.timeout(60)

TOKEN = "1234567890123456789012345678901234567890"
CONDITION = "0x" + "ab" * 32
EXCHANGE = "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e"


def event(i: int, **changes: Any) -> dict[str, Any]:
    tx, order = f"0x{i:064x}", f"0x{i + 7:064X}"
    found = {"id": f"{tx}_{order}", "transactionHash": tx, "timestamp": str(1_700_000_000 + i), "orderHash": order,
             "maker": f"0x{i:040x}", "taker": EXCHANGE if i % 2 else f"0x{i + 1:040x}",
             "makerAssetId": "0" if i % 2 else TOKEN, "takerAssetId": TOKEN if i % 2 else "0",
             "makerAmountFilled": str(10**12 + i), "takerAmountFilled": str(2 * i), "fee": "0"}
    found.update(changes)
    return {k: v for k, v in found.items() if v is not None}


def fills_body(events: list[dict[str, Any]]) -> bytes:
    return json.dumps({"data": {"orderFilledEvents": events}}).encode()


Reply = tuple[int, bytes] | tuple[int, bytes, str] | str  # (status, body[, content type]) or "hang"


class Canned:
    """A loopback HTTP server answering each POST with the next reply (the last one repeats)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies, self.requests = replies, []
        self.release = asyncio.Event()  # set at teardown: hung handlers finish

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if reply == "hang":
            await self.release.wait()
        status, body, *content_type = reply
        return web.Response(status=status, body=body, content_type=(content_type or ["application/json"])[0])


def controller(**changes: Any) -> AdaptiveRateController:
    return AdaptiveRateController(**{"initial_rps": 200.0, "min_rps": 20.0, "max_window": 16, "backoff_base_s": 0.01,
                                     "backoff_cap_s": 0.05, "retry_min_per_s": 100.0, **changes})


def unit(tokens: tuple[str, ...] = (TOKEN,), **changes: Any) -> WorkUnit:
    return WorkUnit(**{"run_id": "r", "unit_id": 1, "shard": 0, "token_ids": tokens, **changes})


@pytest.fixture
async def canned() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []
    sources: list[SubgraphSource] = []
    fakes: list[Canned] = []

    async def start(replies: list[Reply], **settings: Any) -> tuple[SubgraphSource, Canned]:
        fake = Canned(replies)
        fakes.append(fake)
        app = web.Application()
        app.router.add_post("/gn", fake.handle)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        config = Settings(subgraph_url=str(server.make_url("/gn")), **{"request_timeout_s": 2.0, **settings})
        source = SubgraphSource(config, controller(), max_attempts=4)
        sources.append(source)
        return source, fake

    yield start
    for source in sources:
        await source.close()
    for fake in fakes:
        fake.release.set()
    for server in servers:
        await server.close()


async def collect(source: SubgraphSource, work: WorkUnit, cursor: str = "", conditions=None) -> list:
    return [page async for page in source.pages(work, cursor, conditions or {TOKEN: CONDITION})]


# --- rows ----------------------------------------------------------------------------------------


async def test_rows_are_mapped_exactly(canned):
    source, fake = await canned([(200, fills_body([event(1), event(2)]))], subgraph_api_key="s3cret")
    [page] = await collect(source, unit())
    assert page.done and json.loads(page.cursor) == []
    buy, sell = (Fill(**dict(zip(FILL_COLUMNS, row))) for row in page.rows)
    assert buy.side == "BUY" and buy.token_id == TOKEN and buy.is_relay_leg and buy.condition_id == CONDITION
    assert sell.side == "SELL" and not sell.is_relay_leg and sell.maker_amount_filled == 10**12 + 2
    assert buy.order_hash == buy.order_hash.lower() and buy.id == f"0x{1:064x}_0x{8:064x}"
    assert (buy.block_number, buy.log_index, buy.exchange, buy.exchange_version, buy.source) == (None, None, "", 1,
                                                                                                 "subgraph")
    headers, body = fake.requests[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert body["variables"] == {"after": "", "tokens": [TOKEN]}
    assert "or: [{makerAssetId_in: $tokens, id_gt: $after}" in body["query"]


def test_time_filters_sit_inside_each_or_branch():
    query = fills_query(True, True, True)
    branch = "id_gt: $after, timestamp_gte: $from, timestamp_lt: $to"
    assert f"{{makerAssetId_in: $tokens, {branch}}}" in query and f"{{takerAssetId_in: $tokens, {branch}}}" in query
    assert "where: {id_gt: $after, timestamp_gte: $from, timestamp_lt: $to}" in fills_query(False, True, True)
    bounded = fills_query(True, False, False, True)
    assert "$upto: ID!" in bounded and "{takerAssetId_in: $tokens, id_gt: $after, id_lt: $upto}" in bounded
    assert "where: {id_gt: $after, id_lt: $upto, timestamp_gte: $from}" in fills_query(False, True, False, True)


async def test_id_range_unit_starts_at_id_from_and_stops_before_id_to(canned):
    source, fake = await canned([(200, fills_body([event(1)]))])
    await collect(source, unit(id_from="0x40000000", id_to="0x80000000"))
    await collect(source, unit(id_to="0x40000000"))
    await collect(source, unit(id_from="0xc0000000"))
    assert [body["variables"] for _, body in fake.requests] == [
        {"after": "0x40000000", "upto": "0x80000000", "tokens": [TOKEN]},
        {"after": "", "upto": "0x40000000", "tokens": [TOKEN]},
        {"after": "0xc0000000", "tokens": [TOKEN]},
    ]
    assert "id_lt" not in fake.requests[2][1]["query"]


ODD_VALUES = [None, "", 7, True, [], "0x" + "AB" * 32, "007", "1e3", "-5", " 12", "\u0661\u0662", str(2**256),
              str(2**256 - 1), "0", "\u00e9", "0xZZ"]


@hyp_settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(sorted(event(0))), st.sampled_from(ODD_VALUES)),
                max_size=3),
       st.sampled_from([None, {"errors": [{"message": "boom"}]}, {"errors": []}, {"extra": 1}, {"data": None}]))
def test_the_typed_decoder_reads_exactly_what_the_generic_parser_reads(changes, top):
    """The fast path makes the very rows of the generic one, or declines (None) and leaves the answer to it — also
    each answer the generic parser refuses, so that its message names the field."""
    events = [event(i) for i in range(4)]
    for at, field, value in changes:
        events[at] = {**events[at], field: value} if value is not None else {
            k: v for k, v in events[at].items() if k != field}
    doc = {"data": {"orderFilledEvents": events}, **(top or {})}
    body = json.dumps(doc).encode()
    conditions = {TOKEN: CONDITION}
    try:
        parsed = orjson.loads(body)
        if parsed.get("errors") or not isinstance(parsed.get("data"), dict):
            raise SourceError("not a fills answer")
        generic = fill_page(parsed["data"]["orderFilledEvents"], conditions)
    except SourceError:
        generic = None
    typed = typed_fill_page(body, conditions)
    assert typed is None or typed == generic
    if not changes and top in (None, {"extra": 1}, {"errors": []}):
        assert typed is not None  # a well-formed page takes the fast path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"makerAssetId": None, "makerAssetID": "0"}, "orderFilledEvents[1].makerAssetId: missing field"),
        ({"timestamp": 1_700_000_001}, "orderFilledEvents[1].timestamp: expected a BigInt"),
        ({"fee": "1e3"}, "orderFilledEvents[1].fee: expected a BigInt"),
        ({"takerAssetId": "0xabc"}, "orderFilledEvents[1].takerAssetId: expected a uint256"),
        ({"maker": None}, "orderFilledEvents[1].maker: missing field"),
    ],
)
async def test_schema_drift_fails_fast_naming_the_field(canned, changes, expected):
    source, fake = await canned([(200, fills_body([event(0), event(1, **changes)]))])
    with pytest.raises(SourceError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        await collect(source, unit())
    assert len(fake.requests) == 1


async def test_missing_collection_is_drift(canned):
    source, _ = await canned([(200, json.dumps({"data": {"orderFilled": []}}).encode())])
    with pytest.raises(SourceError, match="data.orderFilledEvents"):
        await collect(source, unit())


async def test_market_entities_drift_names_the_field(canned):
    source, _ = await canned([(200, json.dumps({"data": {"marketDatas": [
        {"id": TOKEN, "condition": CONDITION}, {"id": TOKEN, "condition": "not hex"}]}}).encode())])
    with pytest.raises(SourceError, match=r"marketDatas\[1\]\.condition: condition id 'not hex' is not hex"):
        await source.market_tokens()


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    ["Cannot mix column filters with 'or' operator at the same level",
     "The `first` argument must be between 0 and 1000, but is 1001",
     "Type `Query` has no field `orderFilledEvent`"],
)
async def test_permanent_errors_fail_fast_with_the_query_error(canned, message):
    source, fake = await canned([(200, json.dumps({"errors": [{"message": message}]}).encode())])
    with pytest.raises(SourceError, match="rejected the query") as failure:
        await collect(source, unit())
    assert message in str(failure.value) and failure.value.exit_code == 2
    assert len(fake.requests) == 1


async def test_indexing_error_is_its_own_failure(canned):
    source, _ = await canned([(200, b'{"errors":[{"message":"indexing_error"}]}')])
    with pytest.raises(SubgraphIndexingError, match="indexing_error"):
        await collect(source, unit())


async def test_every_transient_answer_is_retried(canned):
    allowance = b"Sorry, you've surpassed your query allowance. Please try again - limits reset every 10 seconds."
    replies: list[Reply] = [
        (429, allowance), (200, allowance), (503, b"<html><body>503 Service Unavailable</body></html>"), (200, b""),
        (200, fills_body([event(1)])[:100]),
        (200, b'{"errors":[{"message":"service is overloaded and can not run the query right now."}]}'),
        (200, b'{"errors":[{"message":"Query timed out"}]}'), "hang", (200, fills_body([event(1)])),
    ]
    source, fake = await canned(replies, request_timeout_s=0.3)
    source.max_attempts = len(replies)
    [page] = await collect(source, unit())
    assert len(page.rows) == 1 and len(fake.requests) == len(replies)
    state = source.controller.snapshot()
    assert state.throttled == 2 and state.errors >= 5


async def test_persistent_failure_gives_up_with_the_last_reason(canned):
    source, fake = await canned([(502, b"<html>Bad Gateway</html>")])
    with pytest.raises(TransientSourceError, match="gave up after 4 attempts: HTTP 502"):
        await collect(source, unit())
    assert len(fake.requests) == 4


async def test_api_key_never_appears_in_errors(canned):
    source, _ = await canned([(401, b"unauthorized")], subgraph_api_key="s3cret")
    with pytest.raises(SourceError) as failure:
        await collect(source, unit())
    assert "s3cret" not in str(failure.value) and "401" in str(failure.value)


def test_foreign_cursor_is_refused():
    for cursor in ("0xabc", "[[0, 5, \"\"]]", "[[1, 1, \"\"]]", "{}"):
        with pytest.raises(SourceError, match="cursor"):
            decode_cursor(unit(), cursor, 10)


# --- against the simulator -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.generate(markets=400, seed=11)


def truth_rows(ds: Dataset) -> dict[str, tuple]:
    """Every fill as the row the source must produce, built from the simulator's truth."""
    rows = {}
    for f in ds.iter_truth():
        side = "BUY" if f["makerAssetId"] == "0" else "SELL"
        rows[f["id"]] = (f["id"], f["transactionHash"], f["orderHash"], int(f["timestamp"]), None, None, "",
                         f["maker"], f["taker"], f["makerAssetId"], f["takerAssetId"], int(f["makerAmountFilled"]),
                         int(f["takerAmountFilled"]), int(f["fee"]), f["conditionId"], f["tokenId"], side,
                         f["taker"] in EXCHANGES, 1, "subgraph")
    return rows


def token_units(ds: Dataset, per_unit: int) -> list[WorkUnit]:
    tokens = sorted(ds.token_to_condition)
    return [unit(tuple(tokens[i:i + per_unit]), unit_id=i) for i in range(0, len(tokens), per_unit)]


@pytest.fixture
async def sim(dataset):
    servers: list[SimServer] = []
    sources: list[SubgraphSource] = []

    async def start(cfg: SimConfig, *, timeout_s: float = 5.0, rate: AdaptiveRateController | None = None,
                    **options: Any) -> tuple[SimServer, SubgraphSource]:
        server = SimServer(dataset, cfg)
        await server.start()
        servers.append(server)
        source = SubgraphSource(Settings(subgraph_url=server.url, request_timeout_s=timeout_s),
                                rate or controller(), **options)
        sources.append(source)
        return server, source

    yield start
    for source in sources:
        await source.close()
    for server in servers:
        await server.stop()


async def fetch_all(source: SubgraphSource, units: list[WorkUnit], conditions: dict[str, str]) -> list[tuple]:
    async def one(work: WorkUnit) -> list[tuple]:
        return [row for page in await collect(source, work, conditions=conditions) for row in page.rows]

    return [row for rows in await asyncio.gather(*(one(u) for u in units)) for row in rows]


def assert_exact(rows: list[tuple], expected: dict[str, tuple]) -> None:
    assert len(rows) == len({r[0] for r in rows}), "a fill was fetched twice"
    assert {r[0] for r in rows} == set(expected)
    assert all(r == expected[r[0]] for r in rows)


async def test_clean_recovers_every_fill_exactly(sim, dataset):
    server, source = await sim(SimConfig.for_profile("clean"), max_tokens=40)
    rows = await fetch_all(source, token_units(dataset, 100), dataset.token_to_condition)
    assert_exact(rows, truth_rows(dataset))
    assert server.stats()["requests"] == server.stats()["ok"]


async def test_hostile_recovers_every_fill_exactly(sim, dataset):
    cfg = SimConfig.for_profile("hostile", seed=5, p_5xx=0.06, p_graphql_timeout=0.05, p_overloaded=0.05,
                                p_empty_body=0.05, p_truncated=0.05, p_slow=0.05, p_hang=0.05, slow_s=0.3,
                                store_timeout_rows=250, rate_limit_rps=25.0, burst=3)
    server, source = await sim(cfg, timeout_s=1.0, max_tokens=6, max_attempts=12,
                               rate=controller(initial_rps=60.0, retry_ratio=1.0))
    rows = await fetch_all(source, token_units(dataset, 64), dataset.token_to_condition)
    assert_exact(rows, truth_rows(dataset))
    stats = server.stats()
    faults = ("throttled_429", "http_5xx", "graphql_timeout", "overloaded", "store_timeout", "empty_body",
              "truncated", "slow", "hang")
    assert [f for f in faults if not stats[f]] == []


async def test_heavy_batches_are_split_and_resume_exactly_across_the_split(sim, dataset):
    light = [t for t in sorted(dataset.token_to_condition) if 0 < dataset.trades_quantity(t) < 60][:64]
    work = unit(tuple(light))
    server, source = await sim(SimConfig(p_store_timeout_in=1.0, store_timeout_rows=200), max_tokens=64)
    pages = await collect(source, work, conditions=dataset.token_to_condition)
    expected = {k: v for k, v in truth_rows(dataset).items() if v[15] in set(light)}
    assert_exact([r for p in pages for r in p.rows], expected)
    assert server.stats()["store_timeout"] >= 3
    split = next(i for i, p in enumerate(pages) if len(json.loads(p.cursor)) >= 2)
    for cut in (split, len(pages) // 2):
        resumed = await collect(source, work, pages[cut].cursor, dataset.token_to_condition)
        assert [r for p in resumed for r in p.rows] == [r for p in pages[cut + 1:] for r in p.rows]


async def test_resume_from_a_mid_unit_cursor_yields_exactly_the_rest(sim, dataset):
    whale = max(dataset.token_to_condition, key=dataset.trades_quantity)
    work = unit((whale, *sorted(dataset.token_to_condition)[:30]))
    _, source = await sim(SimConfig(), max_tokens=8)
    pages = await collect(source, work, conditions=dataset.token_to_condition)
    assert len(pages) > 6 and pages[-1].done and not any(p.done for p in pages[:-1])
    for cut in (0, 3, len(pages) - 2, len(pages) - 1):
        resumed = await collect(source, work, pages[cut].cursor, dataset.token_to_condition)
        assert [r for p in resumed for r in p.rows] == [r for p in pages[cut + 1:] for r in p.rows]
        assert resumed[-1].done


async def test_giant_market_split_into_id_ranges_is_recovered_exactly(sim, dataset):
    tokens_of: dict[str, list[str]] = {}
    for token, condition in sorted(dataset.token_to_condition.items()):
        tokens_of.setdefault(condition, []).append(token)
    giant = max(tokens_of, key=lambda c: sum(map(dataset.trades_quantity, tokens_of[c])))
    tokens = tuple(tokens_of[giant])
    bounds = id_bounds(7)
    units = [unit(tokens, unit_id=i, id_from=lo, id_to=hi) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    _, source = await sim(SimConfig())
    pages = [await collect(source, work, conditions=dataset.token_to_condition) for work in units]
    for work, found in zip(units, pages):
        ids = [r[0] for p in found for r in p.rows]
        assert len(found) > 1 and ids
        assert all((work.id_from is None or work.id_from < i) and (work.id_to is None or i < work.id_to) for i in ids)
    expected = {k: v for k, v in truth_rows(dataset).items() if v[14] == giant}
    assert len(expected) > 5 * plan.PAGE_SIZE
    assert_exact([r for found in pages for p in found for r in p.rows], expected)
    middle, found = units[3], pages[3]  # a range resumes inside itself
    resumed = await collect(source, middle, found[0].cursor, dataset.token_to_condition)
    assert [r for p in resumed for r in p.rows] == [r for p in found[1:] for r in p.rows]


async def test_time_window_units(sim, dataset):
    expected = truth_rows(dataset)
    stamps = sorted(row[3] for row in expected.values())
    ts_from, ts_to = stamps[len(stamps) // 3], stamps[len(stamps) // 2]
    conditions = dict(list(dataset.token_to_condition.items())[::2])  # half the tokens have no condition
    _, source = await sim(SimConfig())
    window = [r for p in await collect(source, unit((), ts_from=ts_from, ts_to=ts_to), "", conditions)
              for r in p.rows]
    inside = {k: v[:14] + (conditions.get(v[15], ""),) + v[15:] for k, v in expected.items() if ts_from <= v[3] < ts_to}
    assert_exact(window, inside)
    tokens = tuple(sorted(dataset.token_to_condition)[:200])
    bounded = [r for p in await collect(source, unit(tokens, ts_from=ts_from, ts_to=ts_to), "",
                                        dataset.token_to_condition) for r in p.rows]
    assert_exact(bounded, {k: v for k, v in expected.items() if k in inside and v[15] in tokens})


async def test_sim_errors_are_classified(sim):
    _, source = await sim(SimConfig())
    with pytest.raises(SourceError, match="`first` argument must be between 0 and 1000"):
        await source.query("{ orderFilledEvents(first: 1001) { id } }", {})
    with pytest.raises(SourceError, match="Cannot mix column filters"):
        await source.query('{ orderFilledEvents(where: {id_gt: "", or: [{fee: "0"}, {fee: "1"}]}) { id } }', {})
    _, failing = await sim(SimConfig(indexing_error=True))
    with pytest.raises(SubgraphIndexingError, match="indexing_error"):
        await collect(failing, unit())


def test_markets_sync_adds_subgraph_markets_and_expected_fills(settings, store, dataset, tmp_path, capsys):
    from clobjob.cli import main

    gamma = dataset.markets[:100]
    path = tmp_path / "markets.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in gamma))
    db = ["--clickhouse-url", settings.clickhouse_url.get_secret_value(), "--database", settings.clickhouse_database]
    assert main([*db, "markets", "load", str(path)]) == 0
    with SimServer(dataset, SimConfig.for_profile("throttled")).run_in_thread() as server:
        assert main([*db, "markets", "sync", "--add-subgraph-markets", "--subgraph-url", server.url,
                     "--max-rps", "50"]) == 0
    known = set(dataset.token_to_condition.values())
    assert f"added {len(known - {m['conditionId'] for m in gamma})} new" in capsys.readouterr().out
    markets = {m.condition_id: m for m in store.markets()}
    assert set(markets) == known | {m["conditionId"] for m in gamma}
    assert all(markets[m["conditionId"]].question == m["question"] for m in gamma)
    added = [m for c, m in markets.items() if c not in {g["conditionId"] for g in gamma}]
    assert all(m.source == "subgraph" and len(m.token_ids) == 2 for m in added)
    assert all(dataset.token_to_condition[t] == m.condition_id for m in added for t in m.token_ids)
    expected = {t: dataset.trades_quantity(t) for t in dataset.token_to_condition}
    synced = dict(store.db.rows("SELECT token_id, trades_quantity FROM {db}.orderbooks FINAL"))
    assert {t: n for t, n in synced.items() if t in expected} == expected and 0 in expected.values()
    assert all(n == 0 for t, n in synced.items() if t not in expected)  # tokens the subgraph does not know
