"""SubgraphSource: answers classified, shapes checked strictly, cursors exact, against canned servers and the sim."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from clobjob.config import Settings
from clobjob.errors import SourceError, TransientSourceError
from clobjob.models import FILL_COLUMNS, Fill, WorkUnit
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sources.subgraph import SubgraphIndexingError, SubgraphSource, decode_cursor, fills_query

pytestmark = pytest.mark.timeout(120)

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


Reply = tuple[int, bytes] | str  # (status, body) or "hang"


class Canned:
    """A loopback HTTP server answering each POST with the next reply (the last one repeats)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies, self.requests = replies, []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if reply == "hang":
            await asyncio.sleep(3600)
        status, body = reply
        return web.Response(status=status, body=body, content_type="application/json")


def controller(**changes: Any) -> AdaptiveRateController:
    return AdaptiveRateController(**{"initial_rps": 200.0, "max_window": 16, "backoff_base_s": 0.01,
                                     "backoff_cap_s": 0.05, "retry_min_per_s": 100.0, **changes})


def unit(tokens: tuple[str, ...] = (TOKEN,), **changes: Any) -> WorkUnit:
    return WorkUnit(run_id="r", unit_id=1, shard=0, token_ids=tokens, **changes)


@pytest.fixture
async def canned() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []
    sources: list[SubgraphSource] = []

    async def start(replies: list[Reply], **settings: Any) -> tuple[SubgraphSource, Canned]:
        fake = Canned(replies)
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
