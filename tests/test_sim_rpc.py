"""The simulated Polygon node: a chain shaped like the v2 exchanges' logs, JSON-RPC answers and provider limits
with the providers' own texts, batches, per-call throttling."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from clobjob.sim import Dataset, SimServer
from clobjob.sim.data import block_timestamp
from clobjob.sim.rpc import CTF_V2, NEGRISK_V2, NEGRISK_V2_FROM, ORDER_FILLED, ORDERS_MATCHED, Chain, RpcConfig, RpcNode

pytestmark = pytest.mark.timeout(60)
FILTER = {"address": [CTF_V2, NEGRISK_V2], "topics": [[ORDER_FILLED]]}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.generate(markets=200, seed=9)


@pytest.fixture(scope="module")
def chain(dataset) -> Chain:
    return Chain(dataset, blocks=3_000, matches_per_block=1.5, seed=4)


def test_the_chain_has_the_shapes_a_v2_client_must_handle(dataset, chain):
    fills = chain.truth()
    exchanges = Counter(row[6] for row in fills)
    assert set(exchanges) == {CTF_V2, NEGRISK_V2}
    assert min(row[4] for row in fills if row[6] == NEGRISK_V2) >= NEGRISK_V2_FROM > chain.start_block
    assert any(row[17] for row in fills) and not all(row[17] for row in fills)  # relay legs among maker fills
    assert any(row[11] > 2**53 for row in fills) and any(row[11] > 2**64 for row in fills)
    assert {row[16] for row in fills} == {"BUY", "SELL"}
    assert any(row[14] == "" for row in fills)  # tokens no market knows
    assert len({row[0] for row in fills}) == len(fills)  # ids are unique
    topics = Counter(log["topics"][0] for log in chain.logs)
    assert topics[ORDERS_MATCHED] > 0 and len(topics) >= 4 and len(chain.logs) > 2 * len(fills)
    per_block = Counter(row[4] for row in fills)
    assert max(per_block.values()) >= 100  # busy blocks
    indexes = [row[5] for row in fills if row[4] == per_block.most_common(1)[0][0]]
    assert indexes == sorted(indexes) and indexes[-1] - indexes[0] >= len(indexes)  # gaps in log indexes
    assert all(row[3] == block_timestamp(row[4]) for row in fills)
    again = Chain(dataset, blocks=3_000, matches_per_block=1.5, seed=4)
    assert again.truth() == fills


async def rpc(url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json(content_type=None)


def call(method: str, *params: Any, id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": list(params)}


def logs_call(low: int, high: int, id: int = 1, **changes: Any) -> dict[str, Any]:
    return call("eth_getLogs", {**FILTER, "fromBlock": hex(low), "toBlock": hex(high), **changes}, id=id)


async def test_head_blocks_and_filters(dataset, chain):
    async with SimServer(dataset, rpc=RpcNode(chain)) as sim:
        _, head = await rpc(sim.rpc_url, call("eth_blockNumber"))
        assert abs(block_timestamp(int(head["result"], 16)) - time.time()) < 5  # the head is now
        _, chain_id = await rpc(sim.rpc_url, call("eth_chainId"))
        assert chain_id["result"] == "0x89"
        number = chain.start_block + 10
        _, block = await rpc(sim.rpc_url, call("eth_getBlockByNumber", hex(number), False))
        assert int(block["result"]["timestamp"], 16) == block_timestamp(number)
        _, past = await rpc(sim.rpc_url, call("eth_getBlockByNumber", hex(int(head["result"], 16) + 5), False))
        assert past["result"] is None
        low, high = chain.start_block, chain.start_block + 999
        _, found = await rpc(sim.rpc_url, logs_call(low, high))
        assert len(found["result"]) == chain.fill_count(low, high) > 0
        assert all(log["topics"][0] == ORDER_FILLED for log in found["result"])
        _, ctf_only = await rpc(sim.rpc_url, logs_call(low, high, address=CTF_V2.upper().replace("0X", "0x")))
        assert {log["address"] for log in ctf_only["result"]} == {CTF_V2}
        _, everything = await rpc(sim.rpc_url, logs_call(low, high, address=None, topics=[]))
        assert len(everything["result"]) > len(found["result"])
        _, bad = await rpc(sim.rpc_url, logs_call(high, low))
        assert bad["error"]["code"] == -32602
        _, batch = await rpc(sim.rpc_url, [call("eth_blockNumber", id=7), logs_call(low, low + 5, id=8)])
        assert [answer["id"] for answer in batch] == [7, 8] and "result" in batch[1]


async def test_infura_caps_ranges_and_results_and_suggests_a_range_that_works(dataset, chain):
    async with SimServer(dataset, rpc=RpcNode(chain, RpcConfig.for_profile("infura"))) as sim:
        _, wide = await rpc(sim.rpc_url, logs_call(chain.start_block, chain.start_block + 1_000_000 - 1))
        assert wide["error"] == {"code": -32602, "message": "range 1000000 exceeds limit of 10000"}
        node = RpcNode(chain, RpcConfig.for_profile("infura", result_limit=2_000))
    async with SimServer(dataset, rpc=node) as sim:
        _, many = await rpc(sim.rpc_url, logs_call(chain.start_block, chain.end_block - 1))
        error = many["error"]
        assert error["code"] == -32005 and error["message"].startswith("query returned more than 2000 results. "
                                                                       "Try with this block range [0x")
        assert error["data"]["from"] == hex(chain.start_block) and error["data"]["limit"] == 2_000
        _, fits = await rpc(sim.rpc_url, logs_call(chain.start_block, int(error["data"]["to"], 16)))
        assert 0 < len(fits["result"]) <= 2_000


async def test_alchemy_allows_2k_blocks_or_10k_logs_and_inlines_timestamps(dataset, chain):
    node = RpcNode(chain, RpcConfig.for_profile("alchemy", result_limit=1_000, free_range=500))
    async with SimServer(dataset, rpc=node) as sim:
        _, small = await rpc(sim.rpc_url, logs_call(chain.start_block, chain.start_block + 499))
        assert len(small["result"]) > 1_000  # within the free range: no cap
        assert all(int(log["blockTimestamp"], 16) == block_timestamp(int(log["blockNumber"], 16))
                   for log in small["result"])
        _, large = await rpc(sim.rpc_url, logs_call(chain.start_block, chain.end_block - 1))
        assert large["error"]["code"] == -32602
        assert large["error"]["message"].startswith("Log response size exceeded. You can make eth_getLogs requests "
                                                    "with up to a 2K block range")
        _, too_big = await rpc(sim.rpc_url, [call("eth_blockNumber", id=i) for i in range(101)])
        assert "error" in too_big and "101" in too_big["error"]["message"]


async def test_tiny_allows_10_blocks_and_no_batches(dataset, chain):
    async with SimServer(dataset, rpc=RpcNode(chain, RpcConfig.for_profile("tiny"))) as sim:
        _, wide = await rpc(sim.rpc_url, logs_call(chain.start_block, chain.start_block + 10))
        low = hex(chain.start_block)
        assert wide["error"] == {"code": -32600, "message": "You can make eth_getLogs requests with up to a 10 block "
                                 f"range. Based on your parameters, this block range should work: [{low}, "
                                 f"{hex(chain.start_block + 9)}]"}
        status, batch = await rpc(sim.rpc_url, [call("eth_blockNumber", id=1), call("eth_chainId", id=2)])
        assert status == 400 and isinstance(batch, dict) and "not supported" in batch["error"]["message"]


async def test_throttling_is_per_call_http_429_first_then_per_call_errors(dataset, chain):
    node = RpcNode(chain, RpcConfig.for_profile("infura", rate_limit_rps=0.5, burst=3))
    async with SimServer(dataset, rpc=node) as sim:
        status, batch = await rpc(sim.rpc_url, [call("eth_blockNumber", id=i) for i in range(5)])
        assert status == 200 and ["result" in a for a in batch] == [True, True, True, False, False]
        assert batch[3]["error"] == {"code": -32005, "message": "project ID request rate exceeded"}
        status, single = await rpc(sim.rpc_url, call("eth_blockNumber"))
        assert status == 429 and single["error"]["code"] == -32005
        assert node.stats()["throttled_429"] == 1 and node.stats()["throttled_calls"] == 2
