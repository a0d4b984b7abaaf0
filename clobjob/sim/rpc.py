"""A simulated Polygon JSON-RPC node for the CLOB v2 exchanges, with the ``eth_getLogs`` limits of real providers.

The chain (``Chain``) is consistent with a ``Dataset``: blocks are 2 s apart on the subgraph simulator's clock
(``clobjob.sim.data.block_timestamp``), fills trade the dataset's tokens (a few trade tokens no market knows),
and a window of ``blocks`` blocks from ``start_block`` (default: straddling the NegRisk Exchange v2 deploy block,
so the first part has CTF fills only) holds deterministic v2 ``OrderFilled`` logs of both exchanges. Each match
is one transaction: one fill per maker order, the taker order's own fill whose taker is the exchange (the relay
leg), then an ``OrdersMatched`` log of the exchange, with ERC-1155 and USDC transfers from other contracts among
them, so fill log indexes have gaps; other transactions of unrelated contracts fill the blocks, a few blocks are
busy (hundreds of matches), and some amounts exceed 2^53 (a few 2^64). ``Chain.truth`` is the exact
``clob_fills`` rows (``FILL_COLUMNS`` order), built from the generator's values, not by decoding logs.

The v1 exchanges' ``OrderFilled`` logs are the dataset's own fills (what the subgraph serves: same ids, values and
times; each in the block of its timestamp, emitted by its market's v1 exchange, after the block's v2 logs), so the
chain can cross-check the subgraph.

Methods: ``eth_chainId`` (0x89), ``eth_blockNumber`` (``RpcConfig.head``, default the block whose timestamp
is now), ``eth_getBlockByNumber`` (null past the head), ``eth_getLogs`` (address / topics filters, tags,
ranges clipped to the head), single calls and batches.

Provider profiles (``RpcConfig.for_profile``), with the texts of data-sources.md §2:

- ``infura``: more than 10,000 blocks → -32602 "range N exceeds limit of 10000"; more than 10,000 results →
  -32005 "query returned more than 10000 results. Try with this block range [0x…, 0x…]." with data
  {from, to, limit}; no ``blockTimestamp`` on logs; batches of any size.
- ``alchemy``: more than 2,000 blocks AND more than 10,000 logs → -32602 "Log response size exceeded. You can
  make eth_getLogs requests with up to a 2K block range …, or … a cap of 10K logs …" with a suggested range;
  logs carry ``blockTimestamp``; batches of at most 100 calls.
- ``tiny`` (a free plan): more than 10 blocks → -32600 "You can make eth_getLogs requests with up to a 10 block
  range. Based on your parameters, this block range should work: [0x…, 0x…]"; batches rejected.
- ``clean``: no limits.

Throttling is the subgraph simulator's per-client token bucket (``faults.TokenBucket``), charged per CALL (as
providers count a batch's calls): a request whose first call finds no token gets HTTP 429 with the profile's
rate error, later calls of a batch that find none get that error in their own answer. Faults: ``p_5xx``,
``p_hang`` (an answer after ``hang_s``); latency ``latency_s`` + ``latency_per_log_s`` per log served.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from clobjob.models import EXCHANGE_FIRST_BLOCKS, EXCHANGES
from clobjob.sim.data import (
    CTF_EXCHANGE,
    FILL_FIELDS,
    HEAD_BLOCK,
    HEAD_TS,
    NEGRISK_EXCHANGE,
    Dataset,
    block_hash,
    block_of,
    block_timestamp,
)
from clobjob.sim.faults import TokenBucket

RPC_PATH = "/rpc"
ORDER_FILLED = "0xd543adfd945773f1a62f74f0ee55a5e3b9b1a28262980ba90b1a89f2ea84d8ee"
ORDER_FILLED_V1 = "0xd0a08e8c493f9c94f29311604c9de1b4e8c8d4c06bd0c789af57f2d65bfec0f6"
ORDERS_MATCHED = "0x63bf4d16b7fa898ef4c4b2b6d90fd201e9c56313b65638af6088d149d2ce956c"  # another exchange event
TRANSFER_SINGLE = "0xc3d58168c5ae7397731d063d5bbf3d657854427343f4c083240f7aacaa2d0f62"  # ERC-1155
TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"  # ERC-20
CONDITIONAL_TOKENS = "0x4d97dcd97ec945f40cf65f87097ace5ea0476045"
USDC = "0x3c499c542cef5e3811e1192ce70d8cc03d5c3359"
CTF_V2, NEGRISK_V2 = (address for address, version in EXCHANGES.items() if version == 2)
V1_EXCHANGES = {address for address, version in EXCHANGES.items() if version == 1}
NEGRISK_V2_FROM = EXCHANGE_FIRST_BLOCKS[NEGRISK_V2]
STAT_KEYS = ("requests", "calls", "batches", "batch_rejected", "throttled_429", "throttled_calls", "range_errors",
             "result_errors", "http_413", "http_5xx", "hang", "get_logs", "widest_answered", "logs_served",
             "blocks_served")

_RATE_ERRORS = {
    "infura": (-32005, "project ID request rate exceeded"),
    "alchemy": (429, ("Your app has exceeded its compute units per second capacity. If you have retries enabled, "
                      "you can safely ignore this message. If not, check out "
                      "https://docs.alchemy.com/reference/throughput")),
}
_DEFAULT_RATE_ERROR = (429, "Too Many Requests")
_PROFILES: dict[str, dict[str, Any]] = {
    "clean": {},
    "infura": {"range_limit": 10_000, "result_limit": 10_000, "batch_limit": 1_000},
    "alchemy": {"result_limit": 10_000, "free_range": 2_000, "batch_limit": 100, "inline_timestamps": True},
    "tiny": {"range_limit": 10, "batch_limit": 0},
}


class RpcConfig(BaseModel):
    """Provider limits, throttling, faults and latency of the simulated node (see the module doc)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    profile: str = Field("clean", pattern="^(clean|infura|alchemy|tiny)$", description="whose error texts")
    seed: int = 7
    head: int | None = Field(None, ge=0, description="eth_blockNumber; None = the block whose timestamp is now")
    range_limit: int | None = Field(None, ge=1, description="most blocks one eth_getLogs may span")
    result_limit: int | None = Field(None, ge=1, description="most logs one eth_getLogs may return")
    free_range: int = Field(0, ge=0, description="ranges of at most this many blocks ignore result_limit")
    batch_limit: int | None = Field(None, ge=0, description="most calls per batch; 0 = batches rejected")
    inline_timestamps: bool = Field(False, description="logs carry blockTimestamp")
    http_413_logs: int | None = Field(None, ge=1, description="answer HTTP 413 when a request would return more")
    rate_limit_rps: float | None = Field(None, gt=0, description="calls/s per client; None = no limit")
    burst: int = Field(10, ge=1)
    p_5xx: float = Field(0.0, ge=0, le=1)
    p_hang: float = Field(0.0, ge=0, le=1)
    hang_s: float = Field(3600.0, ge=0)
    latency_s: float = Field(0.0, ge=0, description="per request")
    latency_per_log_s: float = Field(0.0, ge=0)

    @classmethod
    def for_profile(cls, profile: str, **knobs: Any) -> RpcConfig:
        """``profile``'s limits (clean, infura, alchemy, tiny), overridden by ``knobs``."""
        if profile not in _PROFILES:
            raise ValueError(f"unknown rpc profile {profile!r} (known: {', '.join(_PROFILES)})")
        return cls(profile=profile, **{**_PROFILES[profile], **knobs})


# --- the chain -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fill:
    """The generator's values of one v2 fill (what the log encodes)."""

    order_hash: str
    maker: str
    taker: str
    side: int  # 0 BUY, 1 SELL
    token: int
    maker_amount: int
    taker_amount: int
    fee: int


def _word(value: int) -> str:
    return f"{value:064x}"


def _topic(address: str) -> str:
    return "0x" + address[2:].rjust(64, "0")


class Chain:
    """Deterministic v2 exchange logs for ``blocks`` blocks from ``start_block`` (see the module doc)."""

    def __init__(self, ds: Dataset, *, start_block: int = NEGRISK_V2_FROM - 1_000, blocks: int = 20_000,
                 matches_per_block: float = 0.5, busy_share: float = 0.003, seed: int = 11) -> None:
        self.ds, self.start_block, self.end_block = ds, start_block, start_block + blocks
        rng = random.Random(seed * 1_000_003 + ds.seed)
        self._hex = lambda: "0x" + rng.getrandbits(256).to_bytes(32, "big").hex()
        self._address = lambda: "0x" + rng.getrandbits(160).to_bytes(20, "big").hex()
        wallets = [self._address() for _ in range(2_000)]
        tokens = [int(t) for t in ds.assets[1:]]
        neg_risk = [m["negRisk"] for m in ds.markets]
        self.logs: list[dict[str, Any]] = []  # every log, in (block, log index) order
        self.fills: list[tuple[dict[str, Any], _Fill]] = []  # the OrderFilled logs with their values
        self._tx_of_block: dict[int, list[str]] = {}
        for block in range(start_block, self.end_block):
            busy = rng.random() < busy_share
            matches = rng.randint(100, 400) if busy else int(rng.expovariate(1 / matches_per_block))
            txs: list[list[tuple[str, list[str], str, _Fill | None]]] = []
            for _ in range(matches):
                code = rng.randrange(len(tokens))
                token = tokens[code] if rng.random() > 0.01 else rng.getrandbits(256)  # 1%: a token no market knows
                exchange = NEGRISK_V2 if neg_risk[code // 2] and block >= NEGRISK_V2_FROM else CTF_V2
                txs.append(self._match(rng, exchange, token, wallets))
            txs += [[self._unrelated(rng)] for _ in range(int(rng.expovariate(1 / 2.0)))]
            rng.shuffle(txs)
            index, hashes = rng.randrange(3), []
            for tx_logs in txs:
                tx = self._hex()
                hashes.append(tx)
                for address, topics, data, fill in tx_logs:
                    log = {"address": address, "topics": topics, "data": data, "blockNumber": hex(block),
                           "transactionHash": tx, "transactionIndex": hex(len(hashes) - 1),
                           "blockHash": block_hash(ds.key, block), "logIndex": hex(index), "removed": False}
                    self.logs.append(log)
                    if fill is not None:
                        self.fills.append((log, fill))
                    index += 1 + (rng.random() < 0.05)  # a log of a failed call now and then
            if hashes:
                self._tx_of_block[block] = hashes
        self._blocks = [int(log["blockNumber"], 16) for log in self.logs]
        self.fill_blocks = [int(log["blockNumber"], 16) for log, _ in self.fills]

    def _amount(self, rng: random.Random) -> int:
        shares = max(1, int(rng.lognormvariate(3.5, 1.6) * 1e6))
        draw = rng.random()
        if draw < 0.01:
            return 2**53 + rng.getrandbits(40)
        return 2**64 + rng.getrandbits(60) if draw < 0.012 else shares

    def _match(self, rng: random.Random, exchange: str, token: int, wallets: list[str]
               ) -> list[tuple[str, list[str], str, _Fill | None]]:
        """The logs of one match: maker fills (with their transfers), the relay leg, OrdersMatched."""
        taker, side, cents = rng.choice(wallets), rng.randrange(2), rng.randint(1, 99)
        logs, shares_sum, usdc_sum = [], 0, 0
        for _ in range(1 + min(int(rng.expovariate(1.0)), 7)):
            shares = self._amount(rng)
            usdc = max(1, shares * cents // 100)
            shares_sum, usdc_sum = shares_sum + shares, usdc_sum + usdc
            maker_side = 1 - side
            amounts = (usdc, shares) if maker_side == 0 else (shares, usdc)
            logs.append(self._transfer(rng, token, shares))
            logs.append(self._fill(rng, exchange, rng.choice(wallets), taker, maker_side, token, *amounts))
        amounts = (usdc_sum, shares_sum) if side == 0 else (shares_sum, usdc_sum)
        logs.append(self._fill(rng, exchange, taker, exchange, side, token, *amounts))
        logs.append((exchange, [ORDERS_MATCHED, self._hex(), _topic(taker)],
                     "0x" + _word(token) + _word(amounts[0]) + _word(amounts[1]), None))
        return logs

    def _fill(self, rng: random.Random, exchange: str, maker: str, taker: str, side: int, token: int,
              maker_amount: int, taker_amount: int) -> tuple[str, list[str], str, _Fill]:
        fee = (maker_amount * rng.randint(1, 200) // 10_000) if rng.random() < 0.15 else 0
        fill = _Fill(self._hex(), maker, taker, side, token, maker_amount, taker_amount, fee)
        builder = rng.getrandbits(256) if rng.random() < 0.3 else 0
        data = "0x" + "".join(_word(v) for v in (side, token, maker_amount, taker_amount, fee, builder,
                                                  rng.getrandbits(256)))
        return exchange, [ORDER_FILLED, fill.order_hash, _topic(maker), _topic(taker)], data, fill

    def _transfer(self, rng: random.Random, token: int, amount: int) -> tuple[str, list[str], str, None]:
        topics = [TRANSFER_SINGLE, _topic(CTF_V2), _topic(self._address()), _topic(self._address())]
        return CONDITIONAL_TOKENS, topics, "0x" + _word(token) + _word(amount), None

    def _unrelated(self, rng: random.Random) -> tuple[str, list[str], str, None]:
        address = USDC if rng.random() < 0.5 else self._address()
        return address, [TRANSFER, _topic(self._address()), _topic(self._address())], "0x" + _word(
            rng.getrandbits(64)), None

    def truth(self, conditions: dict[str, str] | None = None, low: int = 0, high: int | None = None
              ) -> list[tuple[Any, ...]]:
        """The exact ``clob_fills`` rows of blocks [low, high), ``conditions`` (default: the dataset's map) giving
        condition ids."""
        conditions = self.ds.token_to_condition if conditions is None else conditions
        rows = []
        for log, fill in self.fills[bisect.bisect_left(self.fill_blocks, low):
                                    bisect.bisect_left(self.fill_blocks, high or self.end_block)]:
            block, tx, token = int(log["blockNumber"], 16), log["transactionHash"], str(fill.token)
            buy = fill.side == 0
            rows.append((f"{tx}_{fill.order_hash}", tx, fill.order_hash, block_timestamp(block), block,
                         int(log["logIndex"], 16), log["address"], fill.maker, fill.taker,
                         "0" if buy else token, token if buy else "0", fill.maker_amount, fill.taker_amount,
                         fill.fee, conditions.get(token, ""), token, "BUY" if buy else "SELL",
                         fill.taker in EXCHANGES, 2, "rpc"))
        return rows

    def fill_count(self, low: int, high: int) -> int:
        """OrderFilled logs of both exchanges in blocks [low, high]."""
        return bisect.bisect_right(self.fill_blocks, high) - bisect.bisect_left(self.fill_blocks, low)

    def block(self, number: int) -> dict[str, Any]:
        """``eth_getBlockByNumber`` (transaction hashes only)."""
        return {"number": hex(number), "hash": block_hash(self.ds.key, number),
                "parentHash": block_hash(self.ds.key, number - 1), "timestamp": hex(block_timestamp(number)),
                "miner": "0x" + "00" * 20, "gasLimit": hex(45_000_000), "gasUsed": hex(21_000 * 40),
                "transactions": self._tx_of_block.get(number, [])}

    @cached_property
    def _v1_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The dataset's (v1) fill rows in block order, and their blocks."""
        blocks = block_of(self.ds.fills.columns["timestamp"].values)
        order = np.argsort(blocks, kind="stable")
        return order, blocks[order]

    def v1_logs(self, low: int, high: int) -> list[dict[str, Any]]:
        """The v1 exchanges' ``OrderFilled`` logs of blocks [low, high]: one per fill of the dataset (what the
        subgraph serves), emitted by its market's exchange, after the block's v2 logs."""
        order, blocks = self._v1_rows
        start, end = np.searchsorted(blocks, low), np.searchsorted(blocks, high, side="right")
        rows = order[start:end]
        if not len(rows):
            return []
        fills = self.ds.fills.render(rows, [(name, name) for name in FILL_FIELDS])
        markets = (self.ds.token_codes(rows) - 1) // 2
        logs, index, last = [], 0, None
        for block, fill, market in sorted(zip(blocks[start:end].tolist(), fills, markets.tolist(), strict=True),
                                          key=lambda found: (found[0], found[1]["id"])):
            if block != last:
                index, last = self._next_index(block), block
            data = "".join(_word(int(fill[k])) for k in ("makerAssetId", "takerAssetId", "makerAmountFilled",
                                                          "takerAmountFilled", "fee"))
            logs.append({"address": NEGRISK_EXCHANGE if self.ds.markets[market]["negRisk"] else CTF_EXCHANGE,
                         "topics": [ORDER_FILLED_V1, fill["orderHash"], _topic(fill["maker"]), _topic(fill["taker"])],
                         "data": "0x" + data, "blockNumber": hex(block), "transactionHash": fill["transactionHash"],
                         "transactionIndex": "0x0", "blockHash": block_hash(self.ds.key, block),
                         "logIndex": hex(index), "removed": False})
            index += 1
        return logs

    def _next_index(self, block: int) -> int:
        """The log index after the block's last v2 log (0 in a block without one)."""
        at = bisect.bisect_right(self._blocks, block)
        return int(self.logs[at - 1]["logIndex"], 16) + 1 if at and self._blocks[at - 1] == block else 0

    def select(self, low: int, high: int, addresses: set[str] | None, topics: Sequence[Any]) -> list[dict[str, Any]]:
        """The logs of blocks [low, high] matching the address set (None = any) and positional topics: the v2
        window's, then (when the v1 exchanges are asked for) the v1 fills'."""
        found = []
        logs = self.logs[bisect.bisect_left(self._blocks, low):bisect.bisect_right(self._blocks, high)]
        v1 = self.v1_logs(low, high) if addresses is None or addresses & V1_EXCHANGES else []
        if v1:
            logs = sorted(logs + v1, key=lambda log: (int(log["blockNumber"], 16), int(log["logIndex"], 16)))
        for log in logs:
            if addresses is not None and log["address"] not in addresses:
                continue
            if all(want is None or (len(log["topics"]) > i and log["topics"][i] in want)
                   for i, want in enumerate(topics)):
                found.append(log)
        return found


# --- the node ------------------------------------------------------------------------------------


class _CallError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, **({"data": data} if data is not None else {})}


def _quantity_param(value: Any, head: int, what: str) -> int:
    if value in (None, "latest", "safe", "finalized", "pending"):
        return head
    if value == "earliest":
        return 0
    if isinstance(value, str) and value.startswith("0x"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise _CallError(-32602, f"invalid argument: {what} {value!r} is not a hex block number or tag")


class RpcNode:
    """The JSON-RPC endpoint of a ``Chain``: ``mount(app)`` serves it at ``RPC_PATH`` of an aiohttp app."""

    def __init__(self, chain: Chain, cfg: RpcConfig | None = None) -> None:
        self.chain, self.cfg = chain, cfg or RpcConfig()
        self._limiter = TokenBucket(self.cfg.rate_limit_rps, self.cfg.burst)
        self._rng = random.Random(self.cfg.seed)
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._closing = asyncio.Event()

    def mount(self, app: web.Application) -> None:
        """Serve ``POST RPC_PATH`` on ``app`` (wakes slow answers at shutdown)."""
        async def closing(_app: web.Application) -> None:
            self._closing.set()

        self._closing = asyncio.Event()
        app.on_shutdown.append(closing)
        app.router.add_post(RPC_PATH, self.handle)

    def stats(self) -> dict[str, int]:
        """Counts of requests, calls and each outcome."""
        return dict(self._stats)

    def configure(self, **knobs: Any) -> RpcConfig:
        """Change knobs at run time (validated like RpcConfig)."""
        self.cfg = RpcConfig.model_validate({**self.cfg.model_dump(), **knobs})
        self._limiter.reset(self.cfg.rate_limit_rps, self.cfg.burst)
        return self.cfg

    @property
    def head(self) -> int:
        """The chain head: ``cfg.head``, else the block whose timestamp is now (never before the window's end)."""
        if self.cfg.head is not None:
            return self.cfg.head
        return max(HEAD_BLOCK + (int(time.time()) - HEAD_TS) // 2, self.chain.end_block)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    async def handle(self, request: web.Request) -> web.Response:
        """One HTTP request: a call or a batch."""
        self._stats["requests"] += 1
        raw = await request.read()
        draw = self._rng.random()
        if draw < self.cfg.p_hang:
            self._stats["hang"] += 1
            await self._sleep(self.cfg.hang_s)
            return web.Response(status=504, text="upstream timed out")
        if draw < self.cfg.p_hang + self.cfg.p_5xx:
            self._stats["http_5xx"] += 1
            return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                content_type="text/html")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            return _json({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": f"parse error: {exc}"}})
        calls = doc if isinstance(doc, list) else [doc]
        if isinstance(doc, list):
            self._stats["batches"] += 1
            limit = self.cfg.batch_limit
            if limit == 0 or (limit is not None and len(doc) > limit) or not doc:
                self._stats["batch_rejected"] += 1
                text = "batch requests are not supported" if limit == 0 else f"batch size {len(doc)} exceeds {limit}"
                return _json({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": text}}, 400)
        self._stats["calls"] += len(calls)
        code, message = _RATE_ERRORS.get(self.cfg.profile, _DEFAULT_RATE_ERROR)
        now, client = time.monotonic(), request.remote or ""
        admitted = [self._limiter.take(client, now) is None for _ in calls]
        if not admitted[0]:
            self._stats["throttled_429"] += 1
            return _json({"jsonrpc": "2.0", "id": calls[0].get("id") if isinstance(calls[0], dict) else None,
                          "error": {"code": code, "message": message}}, 429)
        answers, logs = [], 0
        for call, ok in zip(calls, admitted, strict=True):
            call_id = call.get("id") if isinstance(call, dict) else None
            if not ok:
                self._stats["throttled_calls"] += 1
                answers.append({"jsonrpc": "2.0", "id": call_id, "error": {"code": code, "message": message}})
                continue
            try:
                result = self._call(call)
            except _CallError as exc:
                answers.append({"jsonrpc": "2.0", "id": call_id, "error": exc.error})
                continue
            if isinstance(result, list):
                logs += len(result)
            answers.append({"jsonrpc": "2.0", "id": call_id, "result": result})
        if self.cfg.http_413_logs is not None and logs > self.cfg.http_413_logs:
            self._stats["http_413"] += 1
            return web.Response(status=413, text="Request Entity Too Large")
        self._stats["logs_served"] += logs
        delay = self.cfg.latency_s + self.cfg.latency_per_log_s * logs
        if delay:
            await self._sleep(delay)
        return _json(answers if isinstance(doc, list) else answers[0])

    def _call(self, call: Any) -> Any:
        if not isinstance(call, dict) or call.get("jsonrpc") != "2.0" or not isinstance(call.get("method"), str):
            raise _CallError(-32600, "invalid request")
        method, params = call["method"], call.get("params") or []
        if not isinstance(params, list):
            raise _CallError(-32602, "invalid params: expected an array")
        if method == "eth_chainId":
            return "0x89"
        if method == "eth_blockNumber":
            return hex(self.head)
        if method == "eth_getBlockByNumber":
            if len(params) != 2:
                raise _CallError(-32602, "missing value for required argument 1")
            number = _quantity_param(params[0], self.head, "block")
            self._stats["blocks_served"] += 1
            return self.chain.block(number) if number <= self.head else None
        if method == "eth_getLogs":
            if len(params) != 1 or not isinstance(params[0], dict):
                raise _CallError(-32602, "invalid params: expected one filter object")
            return self._get_logs(params[0])
        raise _CallError(-32601, f"the method {method} does not exist/is not available")

    def _get_logs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        self._stats["get_logs"] += 1
        head, cfg = self.head, self.cfg
        low = _quantity_param(query.get("fromBlock"), head, "fromBlock")
        high = min(_quantity_param(query.get("toBlock"), head, "toBlock"), head)
        if low > high:
            raise _CallError(-32602, "invalid block range params")
        address = query.get("address")
        addresses = None if address is None else {a.lower() for a in ([address] if isinstance(address, str)
                                                                       else address)}
        topics = [None if t is None else {t.lower()} if isinstance(t, str) else {x.lower() for x in t}
                  for t in query.get("topics") or []]
        span = high - low + 1
        if cfg.range_limit is not None and span > cfg.range_limit:
            self._stats["range_errors"] += 1
            if cfg.profile == "infura":
                raise _CallError(-32602, f"range {span} exceeds limit of {cfg.range_limit}")
            suggestion = f"[{hex(low)}, {hex(low + cfg.range_limit - 1)}]"
            raise _CallError(-32600, f"You can make eth_getLogs requests with up to a {cfg.range_limit} block range. "
                                     f"Based on your parameters, this block range should work: {suggestion}")
        found = self.chain.select(low, high, addresses, topics)
        limit = cfg.result_limit
        if limit is not None and len(found) > limit and span > cfg.free_range:
            self._stats["result_errors"] += 1
            fits = max(low, int(found[limit]["blockNumber"], 16) - 1)  # the last block before the cap is hit
            suggestion = f"[{hex(low)}, {hex(fits)}]"
            if cfg.profile == "alchemy":
                raise _CallError(-32602, "Log response size exceeded. You can make eth_getLogs requests with up to a "
                                         "2K block range and no limit on the response size, or you can request any "
                                         "block range with a cap of 10K logs in the response. Based on your "
                                         f"parameters and the response size limit, this block range should work: "
                                         f"{suggestion}")
            raise _CallError(-32005, f"query returned more than {limit} results. Try with this block range "
                                     f"{suggestion}.", {"from": hex(low), "to": hex(fits), "limit": limit})
        self._stats["widest_answered"] = max(self._stats["widest_answered"], span)
        if cfg.inline_timestamps:
            return [{**log, "blockTimestamp": hex(block_timestamp(int(log["blockNumber"], 16)))} for log in found]
        return found


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload, separators=(",", ":")),
                        content_type="application/json")
