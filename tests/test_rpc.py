"""RpcSource: v2 OrderFilled logs decoded exactly, malformed logs named, provider limits followed, end to end on
the simulated node for each provider profile (with resume, throttling, batch fallback, waiting for the head)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from Crypto.Hash import keccak
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import SecretStr

from clobjob.config import Settings
from clobjob.errors import SourceError
from clobjob.models import FILL_COLUMNS, Fill, WorkUnit, check_fills
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sim import Dataset, SimServer
from clobjob.sim.rpc import Chain, RpcConfig, RpcNode
from clobjob.sources.rpc import ORDER_FILLED_V1, ORDER_FILLED_V2, RpcError, RpcSource, fill_row

pytestmark = pytest.mark.timeout(120)

CTF = "0xe111180000d2663c0091e4f400237545b87b996b"
NEGRISK = "0xe2222d279d744050d28e00520010520000310f59"
CONTRACTS = {CTF: 84_902_353, NEGRISK: 85_058_176}
TX = "0x" + "ab" * 32
ORDER = "0x" + "cd" * 32
MAKER = "0x" + "11" * 20
TAKER = "0x" + "22" * 20
TOKEN = 2**255 + 12345
LAG = 16


def word(value: int) -> str:
    return f"{value:064x}"


def topic(address: str) -> str:
    return "0x" + "00" * 12 + address[2:]


def order_filled(side: int = 1, token: int = TOKEN, maker_amount: int = 2**60 + 1, taker_amount: int = 5_000_000,
                 fee: int = 7, taker: str = TAKER, address: str = CTF, **changes: Any) -> dict[str, Any]:
    """A log built from the event declaration: OrderFilled(bytes32 indexed orderHash, address indexed maker,
    address indexed taker, uint8 side, uint256 tokenId, uint256 makerAmountFilled, uint256 takerAmountFilled,
    uint256 fee, bytes32 builder, bytes32 metadata)."""
    log = {"address": address, "topics": [ORDER_FILLED_V2, ORDER, topic(MAKER), topic(taker)],
           "data": "0x" + "".join(word(v) for v in (side, token, maker_amount, taker_amount, fee, 2**256 - 1, 0)),
           "blockNumber": hex(85_100_000), "transactionHash": TX, "logIndex": "0x1f", "removed": False}
    log.update(changes)
    return log


def test_topic0_is_the_keccak_of_the_canonical_signature():
    digest = keccak.new(digest_bits=256)
    digest.update(b"OrderFilled(bytes32,address,address,uint8,uint256,uint256,uint256,uint256,bytes32,bytes32)")
    assert ORDER_FILLED_V2 == "0x" + digest.hexdigest()


V1_CTF = "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e"


def v1_order_filled(maker_asset: int = 0, taker_asset: int = TOKEN, **changes: Any) -> dict[str, Any]:
    """A v1 log built from the event declaration: OrderFilled(bytes32 indexed orderHash, address indexed maker,
    address indexed taker, uint256 makerAssetId, uint256 takerAssetId, uint256 makerAmountFilled,
    uint256 takerAmountFilled, uint256 fee)."""
    log = {"address": V1_CTF, "topics": [ORDER_FILLED_V1, ORDER, topic(MAKER), topic(V1_CTF)],
           "data": "0x" + "".join(word(v) for v in (maker_asset, taker_asset, 3_000_000, 2**64 + 9, 11)),
           "blockNumber": hex(60_000_000), "transactionHash": TX, "logIndex": "0x2", "removed": False}
    log.update(changes)
    return log


def test_v1_topic0_is_the_keccak_of_the_canonical_signature():
    digest = keccak.new(digest_bits=256)
    digest.update(b"OrderFilled(bytes32,address,address,uint256,uint256,uint256,uint256,uint256)")
    assert ORDER_FILLED_V1 == "0x" + digest.hexdigest()


def test_a_hand_built_v1_buy_relay_leg_decodes_to_the_expected_row():
    row = fill_row(v1_order_filled(), 1_700_000_000, {str(TOKEN): "0x" + "ee" * 32}, {V1_CTF})
    assert dict(zip(FILL_COLUMNS, row, strict=True)) == {
        "id": f"{TX}_{ORDER}", "transaction_hash": TX, "order_hash": ORDER, "timestamp": 1_700_000_000,
        "block_number": 60_000_000, "log_index": 2, "exchange": V1_CTF, "maker": MAKER, "taker": V1_CTF,
        "maker_asset_id": "0", "taker_asset_id": str(TOKEN), "maker_amount_filled": 3_000_000,
        "taker_amount_filled": 2**64 + 9, "fee": 11, "condition_id": "0x" + "ee" * 32, "token_id": str(TOKEN),
        "side": "BUY", "is_relay_leg": True, "exchange_version": 1, "source": "rpc"}
    check_fills([row])
    sell = dict(zip(FILL_COLUMNS, fill_row(v1_order_filled(TOKEN, 0), 1, {}, {V1_CTF}), strict=True))
    assert (sell["side"], sell["token_id"], sell["maker_asset_id"]) == ("SELL", str(TOKEN), str(TOKEN))


@pytest.mark.parametrize(("changes", "field"), [
    ({"data": "0x" + word(0) + word(5) * 3}, "data"),  # 4 words: not the v1 event
    ({"data": "0x" + word(7) + word(5) * 4}, "makerAssetId, takerAssetId"),  # neither asset is the collateral
    ({"data": "0x" + word(0) * 5}, "makerAssetId, takerAssetId"),  # both are
])
def test_a_malformed_v1_log_names_its_field(changes, field):
    with pytest.raises(SourceError) as raised:
        fill_row(v1_order_filled(**changes), 1, {}, {V1_CTF})
    assert all(part in str(raised.value) for part in ("block 60000000", TX, "log index 2", field))


def test_a_hand_built_sell_log_decodes_to_the_expected_row():
    row = fill_row(order_filled(), 1_777_000_000, {str(TOKEN): "0x" + "ee" * 32}, CONTRACTS)
    assert dict(zip(FILL_COLUMNS, row, strict=True)) == {
        "id": f"{TX}_{ORDER}", "transaction_hash": TX, "order_hash": ORDER, "timestamp": 1_777_000_000,
        "block_number": 85_100_000, "log_index": 31, "exchange": CTF, "maker": MAKER, "taker": TAKER,
        "maker_asset_id": str(TOKEN), "taker_asset_id": "0", "maker_amount_filled": 2**60 + 1,
        "taker_amount_filled": 5_000_000, "fee": 7, "condition_id": "0x" + "ee" * 32, "token_id": str(TOKEN),
        "side": "SELL", "is_relay_leg": False, "exchange_version": 2, "source": "rpc"}
    Fill(**dict(zip(FILL_COLUMNS, row, strict=True)))  # a valid stored row
    check_fills([row])  # within the storage contract the worker checks every page against


def test_a_buy_relay_leg_of_the_negrisk_exchange_with_an_unknown_token():
    row = dict(zip(FILL_COLUMNS, fill_row(order_filled(side=0, taker=NEGRISK, address=NEGRISK.upper().replace(
        "0X", "0x")), 1, {}, CONTRACTS), strict=True))
    assert (row["maker_asset_id"], row["taker_asset_id"], row["side"]) == ("0", str(TOKEN), "BUY")
    assert row["exchange"] == NEGRISK and row["is_relay_leg"] is True and row["condition_id"] == ""


@hsettings(max_examples=200, deadline=None)
@given(side=st.integers(0, 1), token=st.integers(0, 2**256 - 1), amounts=st.lists(st.integers(0, 2**256 - 1),
       min_size=3, max_size=3), block=st.integers(0, 2**40), index=st.integers(0, 10**6),
       order=st.binary(min_size=32, max_size=32), maker=st.binary(min_size=20, max_size=20))
def test_decoding_is_exact_for_any_values(side, token, amounts, block, index, order, maker):
    log = order_filled(side, token, *amounts, blockNumber=hex(block), logIndex=hex(index))
    log["topics"][1:3] = ["0x" + order.hex(), topic("0x" + maker.hex())]
    row = dict(zip(FILL_COLUMNS, fill_row(log, 5, {}, CONTRACTS), strict=True))
    assert (row["block_number"], row["log_index"], row["order_hash"], row["maker"]) == (
        block, index, "0x" + order.hex(), "0x" + maker.hex())
    assert (row["maker_amount_filled"], row["taker_amount_filled"], row["fee"]) == tuple(amounts)
    assert row["token_id"] == str(token) and row["id"] == f"{TX}_0x{order.hex()}"
    assert (row["maker_asset_id"], row["taker_asset_id"]) == (("0", str(token)) if side == 0 else (str(token), "0"))


@pytest.mark.parametrize(("changes", "field"), [
    ({"data": "0x" + word(1) * 6}, "data"),
    ({"data": "0x" + word(1) * 8}, "data"),
    ({"data": "0x" + word(2) + word(1) * 6}, "side"),
    ({"data": "0x" + "zz" * 224}, "data"),
    ({"topics": [ORDER_FILLED_V2, ORDER, topic(MAKER)]}, "topics"),
    ({"topics": [ORDER_FILLED_V2, ORDER, "0x" + "ff" * 32, topic(TAKER)]}, "maker"),
    ({"topics": [ORDER_FILLED_V2, ORDER[:-2], topic(MAKER), topic(TAKER)]}, "orderHash"),
    ({"topics": ["0x" + "00" * 32, ORDER, topic(MAKER), topic(TAKER)]}, "topics[0]"),
    ({"address": "0x" + "33" * 20}, "address"),
    ({"removed": True}, "removed"),
])
def test_a_malformed_log_names_block_tx_log_index_and_field(changes, field):
    with pytest.raises(SourceError) as raised:
        fill_row(order_filled(**changes), 1, {}, CONTRACTS)
    assert all(part in str(raised.value) for part in ("block 85100000", TX, "log index 31", field))


@pytest.mark.parametrize("changes", [{"blockNumber": "85100000"}, {"logIndex": None}, {"transactionHash": "0x12"}])
def test_a_log_without_a_valid_position_is_a_source_error(changes):
    with pytest.raises(SourceError, match="drifted"):
        fill_row(order_filled(**changes), 1, {}, CONTRACTS)


@pytest.mark.parametrize(("code", "message", "data", "kind", "span", "block_limit", "result_limit"), [
    (-32005, "query returned more than 10000 results. Try with this block range [0x100, 0x17f].",
     {"from": "0x100", "to": "0x17f", "limit": 10000}, "result", 128, None, 10000),
    (-32005, "query returned more than 10000 results.", {"from": "0x100", "to": "0x10f", "limit": 10000},
     "result", 16, None, 10000),
    (-32602, "range 1000000 exceeds limit of 10000", None, "range", None, 10000, None),
    (-32602, ("Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and no "
              "limit on the response size, or you can request any block range with a cap of 10K logs in the "
              "response. Based on your parameters, this block range should work: [0x100, 0x1ff]"),
     None, "result", 256, None, 10000),
    (-32000, "query exceeds max block range 100000", None, "range", None, 100000, None),
    (-32000, "eth_getLogs range is too large, max is 1k blocks", None, "range", None, 1000, None),
    (-32000, "block range is too wide (maximum 1024)", None, "range", None, 1024, None),
    (-32600, ("You can make eth_getLogs requests with up to a 10 block range. Based on your parameters, this block "
              "range should work: [0x100, 0x109]"), None, "range", 10, 10, None),
    (413, "HTTP 413: Request Entity Too Large", None, "result", None, None, None),
    (-32000, "something nobody documented", None, "result", None, None, None),
    (-32005, "project ID request rate exceeded", None, "rate", None, None, None),
    (429, "Your app has exceeded its compute units per second capacity.", None, "rate", None, None, None),
])
def test_provider_errors_are_classified_with_their_limits(code, message, data, kind, span, block_limit, result_limit):
    error = RpcError(code, message, data)
    assert (error.kind, error.suggested_span(0x100)) == (kind, span)
    if kind == "range":
        assert error.block_limit() == block_limit
    if kind == "result":
        assert error.result_limit() == result_limit


# --- end to end on the simulated node ------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.generate(markets=300, seed=5)


@pytest.fixture(scope="module")
def chain(dataset) -> Chain:
    return Chain(dataset, blocks=2_400, matches_per_block=2.0, seed=3)


def source(url: str, **knobs: Any) -> RpcSource:
    values = {"rpc_url": SecretStr(url), "rpc_lag_blocks": LAG, "rpc_initial_span": 50_000, **knobs}
    return RpcSource(Settings(**values), AdaptiveRateController(initial_rps=50), head_poll_s=0.05)


def unit(chain: Chain) -> WorkUnit:
    return WorkUnit(run_id="r", unit_id=1, shard=0, block_from=chain.start_block, block_to=chain.end_block)


async def collect(src: RpcSource, work: WorkUnit, conditions, cursor: str = "", stop_after: int | None = None):
    rows, last = [], None
    async for page in src.pages(work, cursor, conditions):
        rows.extend(page.rows)
        last = page
        if stop_after is not None and len(rows) >= stop_after:
            break
    return rows, last


def node(chain: Chain, profile: str, **knobs: Any) -> RpcNode:
    return RpcNode(chain, RpcConfig.for_profile(profile, **{"head": chain.end_block + LAG, **knobs}))


@pytest.mark.parametrize("profile", ["infura", "alchemy", "tiny"])
async def test_each_profile_yields_exactly_the_v2_fills_and_resumes_midway(dataset, chain, profile):
    truth, conditions = chain.truth(dataset.token_to_condition), dataset.token_to_condition
    assert {row[6] for row in truth} == {CTF, NEGRISK} and len(truth) > 10_000
    rpc = node(chain, profile)
    async with SimServer(dataset, rpc=rpc) as sim:
        async with source(sim.rpc_url) as src:
            rows, last = await collect(src, unit(chain), conditions)
            assert rows == truth and last.done
            check_fills(rows)  # the worker would fail a unit whose page is out of the storage contract
            assert sum(src.unknown_tokens.values()) == sum(1 for row in truth if row[14] == "")
            widest = rpc.stats()["widest_answered"]
            assert widest <= {"infura": 10_000, "alchemy": 50_000, "tiny": 10}[profile]
            if profile == "tiny":
                assert src.range_cap == 10 and src.batch_cap == 1 and rpc.stats()["batch_rejected"] >= 1
            else:
                assert rpc.stats()["result_errors"] >= 1 and src.result_cap == 10_000
        async with source(sim.rpc_url, rpc_initial_span=100, rpc_batch=1) as src:  # a later process resumes
            head, page = await collect(src, unit(chain), conditions, stop_after=len(truth) // 3)
            assert json.loads(page.cursor)["next"] < chain.end_block and not page.done
        async with source(sim.rpc_url) as src:
            tail, last = await collect(src, unit(chain), conditions, cursor=page.cursor)
        assert head + tail == truth and last.done


async def test_throttling_goes_through_the_controller_and_loses_nothing(dataset, chain):
    rpc = node(chain, "infura", rate_limit_rps=400, burst=8)
    async with SimServer(dataset, rpc=rpc) as sim, source(sim.rpc_url) as src:
        rows, _ = await collect(src, unit(chain), dataset.token_to_condition)
        state = src.controller.snapshot()
    assert rows == chain.truth(dataset.token_to_condition)
    assert rpc.stats()["throttled_429"] + rpc.stats()["throttled_calls"] > 0
    assert state.throttled > 0 and src.batch < 20  # 429s cut the rate; partly throttled batches shrink


async def test_http_413_splits_and_5xx_and_hangs_are_retried(dataset, chain):
    rpc = node(chain, "clean", http_413_logs=3_000, p_5xx=0.05, p_hang=0.05, hang_s=60, seed=2)
    async with SimServer(dataset, rpc=rpc) as sim, source(sim.rpc_url, request_timeout_s=1.0) as src:
        rows, _ = await collect(src, unit(chain), dataset.token_to_condition)
    assert rows == chain.truth(dataset.token_to_condition)
    assert min(rpc.stats()[key] for key in ("http_413", "http_5xx", "hang")) >= 1


async def test_a_unit_past_the_safe_head_waits_for_new_blocks(dataset, chain):
    rpc = node(chain, "alchemy", head=chain.start_block + 1_000 + LAG)
    async with SimServer(dataset, rpc=rpc) as sim, source(sim.rpc_url) as src:
        rows, waited = [], 0
        async for page in src.pages(unit(chain), "", dataset.token_to_condition):
            rows.extend(page.rows)
            if not page.rows and not page.done:
                waited += 1
                assert json.loads(page.cursor)["next"] == chain.start_block + 1_001  # through the safe head
                rpc.configure(head=chain.end_block + LAG)  # the chain grows
    assert waited >= 1 and rows == chain.truth(dataset.token_to_condition)


async def test_an_open_unit_ends_at_the_safe_head_and_a_foreign_cursor_is_refused(dataset, chain):
    rpc = node(chain, "clean", head=chain.start_block + 500 + LAG)
    open_unit = WorkUnit(run_id="r", unit_id=2, shard=0, block_from=chain.start_block)
    async with SimServer(dataset, rpc=rpc) as sim, source(sim.rpc_url) as src:
        rows, last = await collect(src, open_unit, dataset.token_to_condition)
        assert json.loads(last.cursor)["to"] == chain.start_block + 501 and last.done
        assert rows == chain.truth(dataset.token_to_condition, high=chain.start_block + 501)
        with pytest.raises(SourceError, match="cursor"):
            await collect(src, unit(chain), {}, cursor='{"next": 1, "to": 2, "span": 1}')


def test_contracts_are_validated_and_normalised():
    assert Settings(rpc_contracts=f"{CTF.upper().replace('0X', '0x')}@5").rpc_contract_blocks() == {CTF: 5}
    with pytest.raises(ValueError, match="not address@first_block"):
        Settings(rpc_contracts="0x1234@5")
