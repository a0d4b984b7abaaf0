"""The Goldsky orderbook-subgraph simulator: data shape, graph-node semantics and texts, throttling, faults."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clobjob.models import EXCHANGES
from clobjob.sim import Dataset, Profile, SimConfig, SimServer, export
from clobjob.sim.data import HEAD_BLOCK, block_of
from clobjob.sim.engine import GraphEngine
from clobjob.sim.faults import THROTTLE_BODY, ServiceTime

FIELDS = ("id transactionHash timestamp orderHash maker taker makerAssetId takerAssetId "
          "makerAmountFilled takerAmountFilled fee")
PAGER = (
    "query($tokens:[String!]!, $after:String!){ orderFilledEvents(first:1000, orderBy:id, orderDirection:asc, "
    "where:{or:[{makerAssetId_in:$tokens, id_gt:$after},{takerAssetId_in:$tokens, id_gt:$after}]}) { "
    + FIELDS + " } }"
)
SMALL_QUERY = "{ _meta { block { number } } }"


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return Dataset.generate(markets=300, seed=7)


@pytest.fixture(scope="module")
def truth(ds: Dataset) -> list[dict[str, Any]]:
    return list(ds.iter_truth())


@pytest.fixture(scope="module")
def big_ds() -> Dataset:
    return Dataset.generate(markets=2000, seed=11)


@contextmanager
def running(ds: Dataset, cfg: SimConfig | None = None) -> Iterator[SimServer]:
    with SimServer(ds, cfg or SimConfig()).run_in_thread() as sim:
        yield sim


@pytest.fixture(scope="module")
def clean(ds: Dataset) -> Iterator[SimServer]:
    with running(ds, SimConfig.for_profile(Profile.CLEAN)) as sim:
        yield sim


async def gql(session: aiohttp.ClientSession, url: str, query: str, **variables: Any) -> dict[str, Any]:
    async with session.post(url, json={"query": query, "variables": variables}) as response:
        assert response.status == 200
        return await response.json()


async def page_by_id(session: aiohttp.ClientSession, url: str, tokens: list[str]) -> list[dict[str, Any]]:
    """The reference pager: id_gt cursor, `or` of makerAssetId_in/takerAssetId_in, full pages of 1000."""
    rows: list[dict[str, Any]] = []
    after = ""
    while True:
        page = (await gql(session, url, PAGER, tokens=tokens, after=after))["data"]["orderFilledEvents"]
        rows += page
        if len(page) < 1000:
            return rows
        after = page[-1]["id"]


def market_tokens(ds: Dataset, m: int) -> list[str]:
    return json.loads(ds.markets[m]["clobTokenIds"])


# --- data ---------------------------------------------------------------------------------------


def test_generation_is_deterministic_and_seed_dependent() -> None:
    a, b, c = (Dataset.generate(markets=60, seed=s) for s in (3, 3, 4))
    assert a.markets == b.markets and list(a.iter_truth()) == list(b.iter_truth())
    assert a.markets != c.markets


def test_fills_are_heavy_tailed_with_unknown_markets(big_ds: Dataset) -> None:
    per_market = Counter(r["conditionId"] for r in big_ds.iter_truth())
    counts = [per_market.get(m["conditionId"], 0) for m in big_ds.markets]
    assert sum(c == 0 for c in counts) > 0.3 * len(counts)
    assert np.median([c for c in counts if c]) < 50
    assert 10_000 <= max(counts) <= 100_000
    unknown = [m for m in big_ds.markets if m["conditionId"] not in set(big_ds.token_to_condition.values())]
    assert unknown and all(per_market.get(m["conditionId"], 0) == 0 for m in unknown)


def test_fill_records_look_like_the_subgraph(big_ds: Dataset) -> None:
    truth = list(big_ds.iter_truth())
    v1 = {a for a, version in EXCHANGES.items() if version == 1}
    neg_risk = {m["conditionId"]: m["negRisk"] for m in big_ds.markets}
    relay = [r for r in truth if r["taker"] in v1]
    assert 0.2 < len(relay) / len(truth) < 0.6
    assert all((r["taker"] == "0xc5d563a36ae78145c45a50134d48a1215220f80a") == neg_risk[r["conditionId"]]
               for r in relay)
    assert all((r["makerAssetId"] == "0") != (r["takerAssetId"] == "0") for r in truth)
    assert all(r["tokenId"] in (r["makerAssetId"], r["takerAssetId"]) for r in truth)
    buys = sum(r["makerAssetId"] == "0" for r in truth)
    assert 0.3 < buys / len(truth) < 0.7
    per_tx = Counter(r["transactionHash"] for r in truth)
    assert max(per_tx.values()) >= 4 and sum(n > 1 for n in per_tx.values()) > len(per_tx) / 2
    assert all(r["id"] == f"{r['transactionHash']}_{r['orderHash']}" and len(r["orderHash"]) == 66 for r in truth)
    assert [r["id"] for r in truth] == sorted(r["id"] for r in truth)
    assert [r["timestamp"] for r in truth] != sorted(r["timestamp"] for r in truth)
    assert any(int(r["makerAmountFilled"]) >= 2**64 for r in truth)
    assert sum(r["fee"] != "0" for r in truth) > 0
    same_second = Counter((r["conditionId"], r["timestamp"]) for r in truth)
    assert same_second.most_common(1)[0][1] > 1000


def test_markets_have_gamma_shape(big_ds: Dataset) -> None:
    for market in big_ds.markets[:50]:
        tokens = json.loads(market["clobTokenIds"])
        assert len(tokens) == 2 and all(t.isdigit() for t in tokens)
        assert market["conditionId"].startswith("0x") and len(market["conditionId"]) == 66
        assert json.loads(market["outcomes"]) == ["Yes", "No"] and len(json.loads(market["outcomePrices"])) == 2
        assert market["endDate"].endswith("Z") and isinstance(market["volumeNum"], float)
        assert market["closed"] == ("closedTime" in market)
    known = [m for m in big_ds.markets if m["conditionId"] in set(big_ds.token_to_condition.values())]
    volume: Counter[str] = Counter()
    dust = set()  # markets with an amount above 2**64: Gamma's volume ignores those
    for record in big_ds.iter_truth():
        if max(int(record["makerAmountFilled"]), int(record["takerAmountFilled"])) >= 2**63:
            dust.add(record["conditionId"])
        if record["taker"] not in EXCHANGES:
            usdc = record["makerAmountFilled"] if record["makerAssetId"] == "0" else record["takerAmountFilled"]
            volume[record["conditionId"]] += int(usdc)
    for market in known[:300]:
        if market["conditionId"] not in dust:
            assert market["volumeNum"] == pytest.approx(volume[market["conditionId"]] / 1e6, rel=1e-6, abs=1e-6)


def test_export_is_byte_identical_per_seed(tmp_path: Any) -> None:
    first = [p.read_bytes() for p in export(tmp_path / "a", markets=80, seed=5)]
    again = [p.read_bytes() for p in export(tmp_path / "b", markets=80, seed=5)]
    other = [p.read_bytes() for p in export(tmp_path / "c", markets=80, seed=6)]
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    markets = [json.loads(line) for line in first[0].splitlines()]
    assert isinstance(markets[0]["clobTokenIds"], str)
    assert len(first[1].splitlines()) == Dataset.generate(markets=80, seed=5).n_fills


# --- paging over HTTP -----------------------------------------------------------------------------


async def test_reference_pager_recovers_the_truth(ds: Dataset, truth: list[dict], clean: SimServer) -> None:
    tokens = sorted(ds.token_to_condition)
    async with aiohttp.ClientSession() as session:
        batches = [page_by_id(session, clean.url, tokens[i:i + 40]) for i in range(0, len(tokens), 40)]
        got = [row for rows in await asyncio.gather(*batches) for row in rows]
    expected = {r["id"]: {k: v for k, v in r.items() if k not in ("conditionId", "tokenId")} for r in truth}
    assert len(got) == len(expected) == ds.n_fills
    assert {row["id"]: row for row in got} == expected
    assert clean.stats()["fills_served"] >= ds.n_fills


async def test_timestamp_gt_paging_loses_same_second_fills(ds: Dataset, truth: list[dict], clean: SimServer) -> None:
    (condition, second), burst = Counter((r["conditionId"], r["timestamp"]) for r in truth).most_common(1)[0]
    assert burst > 1000
    tokens = [t for t, c in ds.token_to_condition.items() if c == condition]
    query = (
        "query($tokens:[String!]!, $t:BigInt!){ orderFilledEvents(first:1000, orderBy:timestamp, "
        "where:{or:[{makerAssetId_in:$tokens, timestamp_gt:$t},{takerAssetId_in:$tokens, timestamp_gt:$t}]}) "
        "{ id timestamp } }"
    )
    seen: set[str] = set()
    cursor = "0"
    async with aiohttp.ClientSession() as session:
        while True:
            page = (await gql(session, clean.url, query, tokens=tokens, t=cursor))["data"]["orderFilledEvents"]
            seen.update(row["id"] for row in page)
            if len(page) < 1000:
                break
            cursor = page[-1]["timestamp"]
        complete = {row["id"] for row in await page_by_id(session, clean.url, tokens)}
    expected = {r["id"] for r in truth if r["conditionId"] == condition}
    assert complete == expected
    lost = expected - seen
    assert lost and seen < expected
    assert second in {r["timestamp"] for r in truth if r["id"] in lost}


async def test_marketdatas_and_orderbooks_paging(ds: Dataset, clean: SimServer) -> None:
    async def page_all(field: str, selection: str) -> list[dict]:
        rows, after = [], ""
        while True:
            query = f'{{ {field}(first: 100, where: {{id_gt: "{after}"}}) {{ {selection} }} }}'
            page = (await gql(session, clean.url, query))["data"][field]
            rows += page
            if len(page) < 100:
                return rows
            after = page[-1]["id"]

    async with aiohttp.ClientSession() as session:
        market_data = await page_all("marketDatas", "id condition outcomeIndex")
        books = await page_all("orderbooks", "id tradesQuantity buysQuantity sellsQuantity collateralVolume "
                                             "scaledCollateralVolume")
    assert {r["id"]: r["condition"] for r in market_data} == ds.token_to_condition
    assert all(r["outcomeIndex"] is None for r in market_data)
    traded = {t for t in ds.token_to_condition if ds.trades_quantity(t)}
    assert {r["id"] for r in books} == traded
    for book in books:
        assert int(book["tradesQuantity"]) == ds.trades_quantity(book["id"])
        assert int(book["buysQuantity"]) + int(book["sellsQuantity"]) == int(book["tradesQuantity"])
        units = int(book["collateralVolume"])
        assert book["scaledCollateralVolume"] == (f"{units // 10**6}.{units % 10**6:06d}".rstrip("0").rstrip("."))


# --- graph-node semantics and error texts ---------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("{ orderFilledEvents(first: 1001) { id } }",
         "The `first` argument must be between 0 and 1000, but is 1001"),
        ("{ orderFilledEvents(skip: 5001) { id } }",
         "The `skip` argument must be between 0 and 5000, but is 5001"),
        ('{ orderFilledEvents(where: {timestamp_gt: 1, or: [{maker: "0x1"}, {taker: "0x1"}]}) { id } }',
         "Cannot mix column filters with 'or' operator at the same level. "
         "Found column filter(s) 'timestamp_gt' alongside 'or' operator."),
        ("{ orderFilledEvents { id price } }", "Type `OrderFilledEvent` has no field `price`"),
        ("{ fills { id } }", "Type `Query` has no field `fills`"),
        ("{ orderFilledEvents(block: {number: 999999999}) { id } }",
         "only indexed up to block number 85980000 and data for block number 999999999 is therefore not yet "
         "available"),
        ('{ orderFilledEvents(where: {makerAssetId_in: [1]}) { id } }',
         'Invalid value provided for argument `where`: Object({"makerAssetId_in": List([Int(1)])})'),
    ],
)
async def test_graph_node_error_texts(clean: SimServer, query: str, message: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = await gql(session, clean.url, query)
    assert "data" not in body
    assert message in body["errors"][0]["message"]


async def test_indexing_error_and_meta(ds: Dataset) -> None:
    with running(ds, SimConfig(indexing_error=True)) as sim:
        async with aiohttp.ClientSession() as session:
            assert await gql(session, sim.url, "{ orderFilledEvents { id } }") == {
                "errors": [{"message": "indexing_error"}]}
            meta = (await gql(session, sim.url, "{ _meta { block { number hash timestamp } deployment "
                                                "hasIndexingErrors } }"))["data"]["_meta"]
    assert meta["hasIndexingErrors"] is True and meta["deployment"].startswith("Qm")
    assert meta["block"]["number"] == HEAD_BLOCK and meta["block"]["hash"].startswith("0x")


async def test_goldsky_paths_unknown_args_and_variables_are_lenient(clean: SimServer, ds: Dataset) -> None:
    base = clean.url.split("/subgraphs/")[0]
    async with aiohttp.ClientSession() as session:
        goldsky = f"{base}/api/public/project_x/subgraphs/orderbook-subgraph/0.0.1/gn"
        body = await gql(session, goldsky, "{ orderFilledEvents(first: 2, bogus: 1) { id } }")
        assert len(body["data"]["orderFilledEvents"]) == 2
        body = await gql(session, clean.url, "query($a: String!) { orderFilledEvents(where: {id_gt: $a}) { id } }")
        assert body == {"errors": [{"message": "No value provided for required variable `a`"}]}


def test_block_pinning_filters_and_recomputes() -> None:
    ds = Dataset.generate(markets=120, seed=3)
    engine = GraphEngine(ds)
    truth = list(ds.iter_truth())
    pin = int(np.median(block_of(np.array([int(r["timestamp"]) for r in truth]))))

    def ask(query: str) -> Any:
        return engine.execute({"query": query}).payload["data"]

    pinned = ask(f"{{ orderFilledEvents(first: 1000, block: {{number: {pin}}}) {{ id timestamp }} }}")
    before = [r["id"] for r in truth if block_of(int(r["timestamp"])) <= pin][:1000]
    assert [r["id"] for r in pinned["orderFilledEvents"]] == before
    books = ask(f"{{ orderbooks(first: 1000, block: {{number: {pin}}}) {{ id tradesQuantity }} }}")["orderbooks"]
    counted = Counter(r["tokenId"] for r in truth if block_of(int(r["timestamp"])) <= pin)
    assert {b["id"]: int(b["tradesQuantity"]) for b in books} == dict(counted)
    assert ask(f"{{ _meta(block: {{number: {pin}}}) {{ block {{ number }} }} }}")["_meta"]["block"]["number"] == pin
    changed = ask(f"{{ orderFilledEvents(first: 1000, where: {{_change_block: {{number_gte: {pin}}}}}) {{ id }} }}")
    assert [r["id"] for r in changed["orderFilledEvents"]] == [
        r["id"] for r in truth if block_of(int(r["timestamp"])) >= pin][:1000]
    one = truth[len(truth) // 2]
    assert ask(f'{{ orderFilledEvent(id: "{one["id"]}") {{ id fee }} }}')["orderFilledEvent"] == {
        "id": one["id"], "fee": one["fee"]}
    assert ask('{ orderFilledEvent(id: "0x") { id } }')["orderFilledEvent"] is None


def test_serve_prints_its_url_and_answers() -> None:
    code = "from clobjob.sim import serve; serve(port=0, markets=30, seed=2, profile='throttled')"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            request = urllib.request.Request(url, data=json.dumps({"query": SMALL_QUERY}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.load(response)["data"]["_meta"]["block"]["number"] == HEAD_BLOCK
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


# --- filters against a brute-force evaluation ------------------------------------------------------


@dataclass
class Small:
    engine: GraphEngine
    truth: list[dict[str, Any]] = field(repr=False)


@pytest.fixture(scope="module")
def small() -> Small:
    ds = Dataset.generate(markets=60, seed=21)
    return Small(GraphEngine(ds), list(ds.iter_truth()))


def _value(record: dict[str, Any], name: str) -> Any:
    return int(record[name]) if name in ("timestamp", "makerAmountFilled", "takerAmountFilled", "fee") else record[name]


def _matches(record: dict[str, Any], where: dict[str, Any]) -> bool:
    for key, target in where.items():
        if key == "or":
            ok = any(_matches(record, branch) for branch in target)
        elif key == "and":
            ok = all(_matches(record, branch) for branch in target)
        else:
            name, _, op = key.partition("_")
            value = _value(record, name)
            ok = {"": lambda: value == target, "gt": lambda: value > target, "lte": lambda: value <= target,
                  "lt": lambda: value < target,
                  "in": lambda: value in target, "not": lambda: value != target,
                  "starts_with_nocase": lambda: value.lower().startswith(target.lower())}[op]()
        if not ok:
            return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_filters_order_and_paging_match_brute_force(small: Small, data: st.DataObject) -> None:
    engine, truth = small.engine, small.truth
    pick = st.integers(0, len(truth) - 1).map(truth.__getitem__)
    hex_prefix = st.text("0123456789abcdef", max_size=18).map(lambda digits: "0x" + digits)
    conditions = st.one_of(
        pick.map(lambda r: {"timestamp_gt": int(r["timestamp"])}),
        pick.map(lambda r: {"id_gt": r["id"]}),
        pick.map(lambda r: {"id_lt": r["id"]}),
        hex_prefix.map(lambda h: {"id_gt": h}),  # id-range unit boundaries: shorter than any id
        hex_prefix.map(lambda h: {"id_lt": h}),
        pick.map(lambda r: {"makerAssetId_in": [r["makerAssetId"], r["takerAssetId"]]}),
        pick.map(lambda r: {"takerAssetId": r["takerAssetId"]}),
        pick.map(lambda r: {"maker_starts_with_nocase": r["maker"][:4].upper()}),
        pick.map(lambda r: {"makerAmountFilled_lte": int(r["makerAmountFilled"])}),
        pick.map(lambda r: {"taker_not": r["taker"]}),
        pick.map(lambda r: {"fee_gt": 0}),
    )
    conjunction = st.lists(conditions, min_size=1, max_size=3).map(lambda cs: {k: v for c in cs for k, v in c.items()})
    where = data.draw(st.one_of(conjunction, st.lists(conjunction, min_size=1, max_size=3).map(lambda bs: {"or": bs}),
                                st.lists(conjunction, min_size=1, max_size=2).map(lambda bs: {"and": bs})))
    order = data.draw(st.sampled_from(["id", "timestamp", "makerAmountFilled", "maker"]))
    desc = data.draw(st.booleans())
    first, skip = data.draw(st.integers(0, 300)), data.draw(st.integers(0, 200))
    body = {
        "query": "query($w: OrderFilledEvent_filter, $o: OrderFilledEvent_orderBy, $d: OrderDirection, $f: Int, "
                 "$s: Int) { orderFilledEvents(where: $w, orderBy: $o, orderDirection: $d, first: $f, skip: $s) "
                 "{ id } }",
        "variables": {"w": where, "o": order, "d": "desc" if desc else "asc", "f": first, "s": skip},
    }
    got = [r["id"] for r in engine.execute(body).payload["data"]["orderFilledEvents"]]
    expected = sorted((r for r in truth if _matches(r, where)), key=lambda r: (_value(r, order), r["id"]),
                      reverse=desc)
    assert got == [r["id"] for r in expected][skip:skip + first]


# --- throttling and faults ------------------------------------------------------------------------


async def _post_many(url: str, n: int, gap_s: float = 0.0) -> list[tuple[int, dict[str, str], str]]:
    """(status, headers, body) of ``n`` small queries: all at once, or one every ``gap_s`` seconds."""
    async with aiohttp.ClientSession() as session:
        async def one() -> tuple[int, dict[str, str], str]:
            async with session.post(url, json={"query": SMALL_QUERY}) as response:
                return response.status, dict(response.headers), await response.text()

        if not gap_s:
            return list(await asyncio.gather(*(one() for _ in range(n))))
        out = []
        for _ in range(n):
            out.append(await one())
            await asyncio.sleep(gap_s)
        return out


async def test_rate_limit_throttles_above_the_rate_only(ds: Dataset) -> None:
    with running(ds, SimConfig.for_profile(Profile.THROTTLED, burst=5)) as sim:
        base = sim.url.split("/subgraphs/")[0]
        below = await _post_many(sim.url, 12, gap_s=0.1)  # 10 req/s against 20 req/s
        assert [status for status, _, _ in below] == [200] * 12
        throttled = [r for r in await _post_many(sim.url, 60) if r[0] == 429]
        assert throttled and len(throttled) == sim.stats()["throttled_429"]
        assert all(body == THROTTLE_BODY and "Retry-After" not in headers for _, headers, body in throttled)
        async with aiohttp.ClientSession() as session:
            for _ in range(20):  # the control endpoints are never throttled
                async with session.get(base + "/__stats") as response:
                    assert response.status == 200
            async with session.post(base + "/__config", json={"retry_after": True, "rate_limit_rps": 8}) as response:
                assert (await response.json())["rate_limit_rps"] == 8
        retried = [r for r in await _post_many(sim.url, 20) if r[0] == 429]
        assert retried and all(int(headers["Retry-After"]) >= 1 for _, headers, _ in retried)
        sim.configure(rate_limit_rps=None)
        assert {status for status, _, _ in await _post_many(sim.url, 40)} == {200}


async def _outcome(session: aiohttp.ClientSession, url: str, request: dict[str, Any]) -> str:
    try:
        async with session.post(url, json=request, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            text = await response.text()
    except TimeoutError:
        return "client_timeout"
    if response.status == 429:
        return "429"
    if response.status >= 500:
        assert text.startswith("<html>")
        return "5xx"
    if not text:
        return "empty"
    try:
        body = json.loads(text)
    except ValueError:
        return "truncated"
    return body["errors"][0]["message"] if "errors" in body else "ok"


async def test_hostile_profile_shows_every_fault(ds: Dataset) -> None:
    heavy = sorted(ds.token_to_condition, key=ds.trades_quantity)[-4:]
    heavy_query = {"query": PAGER, "variables": {"tokens": heavy, "after": ""}}
    cfg = SimConfig.for_profile(Profile.HOSTILE, seed=3, slow_s=0.05, hang_s=60, store_timeout_rows=500,
                                rate_limit_rps=100, burst=10)
    wanted = {"throttled_429", "http_5xx", "graphql_timeout", "overloaded", "store_timeout", "empty_body",
              "truncated", "slow", "hang"}
    seen: Counter[str] = Counter()
    with running(ds, cfg) as sim:
        async with aiohttp.ClientSession() as session:
            for _ in range(80):  # bursts of 30 against a bucket of 10 refilled at 100/s
                requests = [heavy_query, {"query": SMALL_QUERY}] * 15
                seen.update(await asyncio.gather(*(_outcome(session, sim.url, r) for r in requests)))
                if all(sim.stats()[key] for key in wanted):
                    break
                await asyncio.sleep(0.1)
        stats = sim.stats()
    assert {key for key in wanted if stats[key]} == wanted
    assert seen["Query timed out"] == stats["graphql_timeout"]
    assert seen["Store error: database query timed out"] == stats["store_timeout"]
    assert seen["service is overloaded and can not run the query right now. Please try again in a few minutes"] \
        == stats["overloaded"]
    assert seen["5xx"] == stats["http_5xx"] and seen["empty"] == stats["empty_body"]
    assert seen["truncated"] == stats["truncated"] and seen["client_timeout"] >= stats["hang"]
    assert seen["429"] == stats["throttled_429"]


async def test_fault_sequence_is_reproducible_from_the_seed(ds: Dataset) -> None:
    cfg = SimConfig(seed=9, p_5xx=0.2, p_overloaded=0.2, p_empty_body=0.2)
    runs = []
    for _ in range(2):
        with running(ds, cfg) as sim:
            runs.append([(status, body) for status, _, body in await _post_many(sim.url, 30, gap_s=0.001)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 3


@pytest.mark.timeout(20)
async def test_shutdown_is_prompt_with_a_hung_request(ds: Dataset) -> None:
    async with aiohttp.ClientSession() as session:
        with running(ds, SimConfig(p_hang=1.0)) as sim:
            request = asyncio.ensure_future(session.post(sim.url, json={"query": SMALL_QUERY}))
            while not sim.stats()["hang"]:
                await asyncio.sleep(0.01)
        request.cancel()


# --- service time ---------------------------------------------------------------------------------


async def test_answers_in_service_overlap(ds: Dataset) -> None:
    n, latency = 8, 1.0
    with running(ds, SimConfig(latency_base_s=latency)) as sim:
        started = asyncio.get_running_loop().time()
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(gql(session, sim.url, SMALL_QUERY) for _ in range(n)))
        wall = asyncio.get_running_loop().time() - started
        stats = sim.stats()
    assert all(a["data"]["_meta"]["block"]["number"] == HEAD_BLOCK for a in answers)
    assert stats["in_service_peak"] == n and stats["in_service"] == 0  # all n waited their service time at once
    assert stats["timed_answers"] == n and stats["service_s"] == pytest.approx(n * latency)
    assert wall < n * latency / 2  # a server answering one request after another needs n × latency


async def test_service_time_grows_with_rows_and_follows_config(ds: Dataset) -> None:
    whale = sorted(ds.token_to_condition, key=ds.trades_quantity)[-1]
    with running(ds, SimConfig(latency_base_s=0.01, latency_per_row_ms=0.1)) as sim:
        base = sim.url.split("/subgraphs/")[0]
        async with aiohttp.ClientSession() as session:
            await gql(session, sim.url, SMALL_QUERY)
            small = sim.stats()["service_s"]
            page = await gql(session, sim.url, PAGER, tokens=[whale], after="")
            rows = len(page["data"]["orderFilledEvents"])
            big = sim.stats()["service_s"] - small
            async with session.post(base + "/__config", json={"latency_base_s": 0.2, "latency_per_row_ms": 0}) as r:
                assert (await r.json())["latency_base_s"] == 0.2
            await gql(session, sim.url, PAGER, tokens=[whale], after="")
            configured = sim.stats()["service_s"] - small - big
    assert rows == 1000
    assert small == pytest.approx(0.01) and big == pytest.approx(0.01 + rows * 0.1e-3)
    assert configured == pytest.approx(0.2)


async def test_429s_answer_while_admitted_requests_are_in_service(ds: Dataset) -> None:
    cfg = SimConfig(rate_limit_rps=0.1, burst=1, latency_base_s=30)
    with running(ds, cfg) as sim:
        async with aiohttp.ClientSession() as session:
            admitted = asyncio.ensure_future(session.post(sim.url, json={"query": SMALL_QUERY}))
            while not sim.stats()["in_service"]:
                await asyncio.sleep(0.01)
            for _ in range(3):
                async with session.post(sim.url, json={"query": SMALL_QUERY}) as response:
                    assert response.status == 429
            assert sim.stats()["in_service"] == 1  # the 429s did not wait for the answer in service
            admitted.cancel()


def test_service_time_jitter_is_seeded() -> None:
    def served(seed: int) -> list[float]:
        cfg = SimConfig(seed=seed, latency_base_s=0.2, latency_per_row_ms=0.5, latency_jitter=0.5)
        service = ServiceTime(seed)
        return [service.seconds(cfg, rows) for rows in (0, 1000, 0, 1000, 0)]

    first, again, other = served(1), served(1), served(2)
    assert first == again and first != other
    assert all(0.1 <= s <= 0.3 for s in first[::2]) and all(0.35 <= s <= 1.05 for s in first[1::2])


def test_realistic_profile_serves_a_full_page_in_about_085_s() -> None:
    cfg = SimConfig.for_profile(Profile.REALISTIC)
    assert cfg.latency_base_s + cfg.latency_per_row_ms * 1000 / 1000 == pytest.approx(0.85)
    assert cfg.rate_limit_rps == SimConfig.for_profile(Profile.THROTTLED).rate_limit_rps
    assert all(SimConfig.for_profile(p).latency_base_s == 0 for p in ("clean", "throttled", "hostile"))


# --- Gamma /markets -------------------------------------------------------------------------------


async def _gamma(session: aiohttp.ClientSession, sim: SimServer, path: str, **params: Any) -> tuple[int, Any]:
    async with session.get(sim.gamma_url + path, params=params) as response:
        return response.status, await response.json(content_type=None) if response.status != 429 else None


async def test_gamma_pages_the_datasets_markets(ds: Dataset, clean: SimServer) -> None:
    async with aiohttp.ClientSession() as session:
        by_offset, offset = [], 0
        while True:
            status, page = await _gamma(session, clean, "/markets", limit=500, offset=offset)  # capped at 100
            assert status == 200 and len(page) <= 100
            if not page:
                break
            by_offset, offset = by_offset + page, offset + len(page)
        by_keyset, cursor, pages = [], None, 0
        while True:
            status, doc = await _gamma(session, clean, "/markets/keyset", limit=100,
                                       **({"after_cursor": cursor} if cursor else {}))
            by_keyset, pages = by_keyset + doc["markets"], pages + 1
            if "next_cursor" not in doc:
                break
            cursor = doc["next_cursor"]
    assert by_offset == by_keyset == ds.markets and pages == 3
    assert isinstance(by_keyset[0]["clobTokenIds"], str) and isinstance(by_keyset[0]["volume"], str)


async def test_gamma_filters_order_and_refusals(ds: Dataset, clean: SimServer) -> None:
    market, other = ds.markets[5], ds.markets[9]
    token = json.loads(market["clobTokenIds"])[1]
    async with aiohttp.ClientSession() as session:
        assert (await _gamma(session, clean, "/markets", condition_ids=market["conditionId"]))[1] == [market]
        assert (await _gamma(session, clean, "/markets", clob_token_ids=token))[1] == [market]
        status, both = await _gamma(session, clean, "/markets", id=f"{market['id']},{other['id']}")
        assert both == [market, other]
        _, closed = await _gamma(session, clean, "/markets", closed="true", limit=100)
        assert closed and all(m["closed"] for m in closed)
        _, top = await _gamma(session, clean, "/markets", order="volumeNum", ascending="false", limit=10)
        assert [m["volumeNum"] for m in top] == sorted((m["volumeNum"] for m in ds.markets), reverse=True)[:10]
        status, error = await _gamma(session, clean, "/markets", offset=10_001)
        assert status == 422 and "10000" in error["error"] and "/markets/keyset" in error["error"]
        status, error = await _gamma(session, clean, "/markets", order="nonsense")
        assert status == 422 and error["error"] == "order fields are not valid"
        status, _ = await _gamma(session, clean, "/markets/keyset", offset=100)
        assert status == 422
        status, _ = await _gamma(session, clean, "/markets/keyset", after_cursor="not-a-cursor")
        assert status == 422


async def test_gamma_limit_bad_rows_and_missing_keyset(ds: Dataset) -> None:
    cfg = SimConfig(gamma_rate_limit_rps=1, gamma_burst=2, gamma_bad_rows=[3])
    with running(ds, cfg) as sim:
        async with aiohttp.ClientSession() as session:
            answers = [await _gamma(session, sim, "/markets", limit=5) for _ in range(4)]
            assert [status for status, _ in answers[:2]] == [200, 200] and answers[-1][0] == 429
            assert "clobTokenIds" not in answers[0][1][3] and answers[0][1][2] == ds.markets[2]
            sim.configure(gamma_rate_limit_rps=None, gamma_keyset=False)
            async with session.get(sim.gamma_url + "/markets/keyset") as response:
                assert response.status == 404
        assert sim.stats()["gamma_throttled_429"] == 2 and sim.stats()["requests"] == 0


# --- sim serve and sim export agree -----------------------------------------------------------------


@contextmanager
def cli_server(*flags: str) -> Iterator[str]:
    """`clobjob sim serve` in its own process; yields the base URL."""
    argv = [sys.executable, "-m", "clobjob", "sim", "serve", "--port", "0", *flags]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None
            yield proc.stdout.readline().strip().split("/subgraphs/")[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.parametrize("flags", [(), ("--markets", "150", "--seed", "3"), ("--markets", "120", "--top-fills", "4000"),
                                   ("--seed", "5", "--top-fills", "30000")])
def test_serve_and_export_agree(flags: tuple[str, ...], tmp_path: Any) -> None:
    from clobjob.cli import main

    assert main(["sim", "export", "--out", str(tmp_path), *flags]) == 0
    exported = [json.loads(line) for line in (tmp_path / "markets.jsonl").read_text().splitlines()]
    served, cursor = [], ""
    with cli_server(*flags) as base:
        while cursor is not None:
            doc = _get(f"{base}/markets/keyset?limit=100" + (f"&after_cursor={cursor}" if cursor else ""))
            served, cursor = served + doc["markets"], doc.get("next_cursor")
        tokens, after = {}, ""
        while after is not None:
            request = urllib.request.Request(base + "/", headers={"Content-Type": "application/json"}, data=json.dumps(
                {"query": 'query($a: ID!){ marketDatas(first: 1000, where: {id_gt: $a}) { id condition } }',
                 "variables": {"a": after}}).encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                page = json.load(response)["data"]["marketDatas"]
            tokens.update((d["id"], d["condition"]) for d in page)
            after = page[-1]["id"] if len(page) == 1000 else None
    assert served == exported
    exported_tokens = {t: m["conditionId"] for m in exported for t in json.loads(m["clobTokenIds"])}
    assert tokens and all(exported_tokens[t] == c for t, c in tokens.items())
    truth_conditions = {r["conditionId"] for r in map(json.loads, (tmp_path / "truth.jsonl").open())}
    assert truth_conditions <= {m["conditionId"] for m in exported}
