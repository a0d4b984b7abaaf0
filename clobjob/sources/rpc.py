"""CLOB v2 fills from Polygon logs: ``eth_getLogs`` of the exchange contracts over JSON-RPC (aiohttp), rate-controlled.

What is read. The v2 ``OrderFilled`` logs (topic0 ``ORDER_FILLED_V2``) of every configured exchange contract
(``Settings.rpc_contracts``, default CTF Exchange v2 AND NegRisk Exchange v2: reading only the CTF one silently
misses every NegRisk fill), with one filter ``{address: [contracts…], topics: [[topic0]], fromBlock, toBlock}``.
With the v1 exchanges configured (``V1_EXCHANGE_CONTRACTS``) it reads their v1 ``OrderFilled`` logs (topic0
``ORDER_FILLED_V1``; 5 data words: makerAssetId, takerAssetId, makerAmountFilled, takerAmountFilled, fee) the same
way, as rows of ``exchange_version`` 1: what ``clobjob verify --cross-check`` compares with the subgraph's fills.
A unit is the block range ``[block_from, block_to)`` (``WorkUnit``; None: from the earliest contract's first
block / to the safe head when the unit starts). The safe head is ``eth_blockNumber − rpc_lag_blocks`` (reorg
safety); a unit ending beyond it waits for it, yielding empty pages (same cursor) every ``HEAD_POLL_S``.

Rows. The 3 indexed topics (orderHash, maker, taker) and 7 data words (side, tokenId, makerAmountFilled,
takerAmountFilled, fee, builder, metadata) become the same ``clob_fills`` row as the subgraph's
(``FILL_COLUMNS`` order): id = tx hash + "_" + order hash, side BUY (0) ⇒ makerAssetId "0" / takerAssetId tokenId,
SELL (1) ⇒ the reverse, ``exchange`` = the emitting contract, ``is_relay_leg`` = the taker is an exchange
contract, ``exchange_version`` 2, ``source`` "rpc". The timestamp is the log's ``blockTimestamp`` when the
provider sends one, else the block's (``eth_getBlockByNumber``, cached) — never computed from the block number.
Every value is validated; a malformed log raises ``SourceError`` naming block, tx, log index and field.
``condition_id`` comes from the caller's token → condition map; a token missing from it gets "" and is counted
in ``unknown_tokens``.

Adaptive block ranges. Providers cap ``eth_getLogs`` by block range, by result count or by response size, each
with its own text and code (codes are not reliable), so any error answer to ``eth_getLogs`` splits the range.
A *range* error ("range 1000000 exceeds limit of 10000", "max is 1k blocks", "maximum 1024", "up to a 10 block
range") is a hard cap: the span drops to the provider's suggested range (``[0x…, 0x…]`` in the message or
``data.from/to``), else the number in the text, else half, and never grows past it again. A *result* error
("more than 10000 results", "Log response size exceeded", HTTP 413, anything else) depends on how busy the
blocks are: the span drops to the suggestion or half, and the result cap named in the text (10000, "10K logs")
is remembered. After each answered range the span grows (×2, or towards 80% of a known result cap at the
density just seen), up to ``rpc_max_span``. A single block that keeps failing raises ``SourceError``.

Requests. Up to ``rpc_batch`` calls travel as one JSON-RPC batch; a page asks for several consecutive ranges at
once when they are small. A provider that answers a batch with anything but an array does not take batches of
that size: the batch size halves (down to single calls) and the calls are resent. HTTP 429 and rate answers
inside a batch ("request rate exceeded", "compute units per second", code 429) are resent after a backoff.
A request none of whose calls was admitted is a throttle for the rate controller. In a partly admitted batch
the answered calls are kept and the batch size drops to the calls admitted (providers count every call of a
batch against their burst: a batch larger than it never passes whole), growing back by one per whole batch;
counting such a request as a throttle measured an accepted rate near zero and drove the rate to its floor. 5xx,
timeouts, empty or garbled bodies are retried through ``controlled_request`` like the subgraph's.

Cursor (opaque): ``{"next": N, "to": T, "span": S}`` — the next block to fetch, the unit's end (exclusive;
resolved from the safe head at the unit's first start when it has none) and the current adaptive span.
``Page.done`` when ``next`` reaches ``to``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import BadInput, ClobjobError, SourceError, TransientSourceError
from clobjob.models import EXCHANGE_FIRST_BLOCKS, EXCHANGES, FILL_COLUMNS, WorkUnit
from clobjob.ratelimit import (
    AdaptiveRateController,
    Permit,
    Retryable,
    controlled_request,
)
from clobjob.sources.base import Lanes, Page
from clobjob.sources.http import HttpSession, OverHttp

ORDER_FILLED_V2 = "0xd543adfd945773f1a62f74f0ee55a5e3b9b1a28262980ba90b1a89f2ea84d8ee"
"""keccak256("OrderFilled(bytes32,address,address,uint8,uint256,uint256,uint256,uint256,bytes32,bytes32)")."""
ORDER_FILLED_V1 = "0xd0a08e8c493f9c94f29311604c9de1b4e8c8d4c06bd0c789af57f2d65bfec0f6"
"""keccak256("OrderFilled(bytes32,address,address,uint256,uint256,uint256,uint256,uint256)"): the v1 exchanges'."""
V1_EXCHANGE_CONTRACTS = ",".join(f"{address}@{EXCHANGE_FIRST_BLOCKS[address]}"
                                 for address, version in EXCHANGES.items() if version == 1)
"""``Settings.rpc_contracts`` that reads the v1 exchanges' logs (to cross-check the subgraph)."""
POLYGON_CHAIN_ID = 137

MAX_ATTEMPTS = 8
HEAD_POLL_S = 2.0  # about one Polygon block
HEAD_TTL_S = 2.0  # a head read is reused for this long
PAGE_LOGS = 10_000  # a page asks for about this many logs (several small ranges in one batch)
RESULT_TARGET = 0.8  # grow a span towards this share of a known result cap
SINGLE_BLOCK_FAILURES = 3  # errors on a one-block range before it is a SourceError
BLOCK_CACHE = 200_000  # block timestamps kept
BLOCK_SLICES = 4  # a plan's block ranges per shard
MIN_BLOCKS = 10_000  # the shortest block range worth a unit of its own

RATE_TEXTS = ("rate limit", "request rate", "too many requests", "compute units", "capacity exceeded", "throughput")
RESULT_TEXTS = ("results", "response size", "too many logs", "response is too big", "too large response", "413")
RANGE_TEXTS = ("range", "block", "too wide")
_SUGGESTED = re.compile(r"\[\s*(0x[0-9a-fA-F]+)\s*,\s*(0x[0-9a-fA-F]+)\s*\]")
_BLOCK_LIMIT = re.compile(r"(?:max(?:imum)?(?: is| block range)?|limit of|up to an?)\s+(\d+)\s*(k)?\b", re.IGNORECASE)
_RESULT_LIMIT = re.compile(r"(?:more than|cap of)\s+(\d+)\s*(k)?\s*(?:results|logs)", re.IGNORECASE)
_QUANTITY = re.compile(r"0x[0-9a-fA-F]{1,64}")
_WORD_HEX = re.compile(r"0x[0-9a-fA-F]{64}")
_DATA_WORDS = {  # per event: its data words, and the version of the exchange that emits it
    ORDER_FILLED_V2: (("side", "tokenId", "makerAmountFilled", "takerAmountFilled", "fee", "builder", "metadata"), 2),
    ORDER_FILLED_V1: (("makerAssetId", "takerAssetId", "makerAmountFilled", "takerAmountFilled", "fee"), 1),
}
_DATA_HEX = {event: re.compile(f"0x[0-9a-fA-F]{{{64 * len(words)}}}") for event, (words, _) in _DATA_WORDS.items()}
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_ADDRESS_PAD = "0" * 24
_CONDITION, _TOKEN = FILL_COLUMNS.index("condition_id"), FILL_COLUMNS.index("token_id")


# --- how its units are cut ----------------------------------------------------------------------


def block_ranges(first: int, end: int, shards: int) -> list[tuple[int, int]]:
    """[first, end) cut into ``BLOCK_SLICES`` ranges per shard, each at least ``MIN_BLOCKS`` long (none when
    empty)."""
    if end <= first:
        return []
    count = max(1, min(shards * BLOCK_SLICES, (end - first) // MIN_BLOCKS))
    bounds = [first + (end - first) * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


# --- error answers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RpcError:
    """One call's JSON-RPC error answer (an HTTP 413 is one too, code 413)."""

    code: int
    message: str
    data: Any = None

    @property
    def kind(self) -> str:
        """``rate`` (a throttle), ``range`` (a block-range cap) or ``result`` (any other error: too many
        results, too big a response, or unknown — an ``eth_getLogs`` error always splits)."""
        text = self.message.lower()
        if self.code == 429 or any(t in text for t in RATE_TEXTS):
            return "rate"
        if self.code == 413 or any(t in text for t in RESULT_TEXTS):
            return "result"
        return "range" if any(t in text for t in RANGE_TEXTS) else "result"

    def suggested_span(self, start: int) -> int | None:
        """The block count of the provider's suggested range ``[from, to]`` for a query from ``start``."""
        found = _SUGGESTED.search(self.message)
        bounds = (found.group(1), found.group(2)) if found else None
        if bounds is None and isinstance(self.data, dict):
            bounds = (self.data.get("from"), self.data.get("to"))
        try:
            low, high = (int(b, 16) for b in bounds)  # type: ignore[union-attr, arg-type]
        except (TypeError, ValueError):
            return None
        return max(1, high - (start if low == start else low) + 1) if high >= low else None

    def block_limit(self) -> int | None:
        """The block-range cap a range error names ("limit of 10000", "max is 1k blocks")."""
        found = _BLOCK_LIMIT.search(self.message)
        return int(found.group(1)) * (1000 if found.group(2) else 1) if found else None

    def result_limit(self) -> int | None:
        """The result cap a result error names ("more than 10000 results", "a cap of 10K logs", data.limit)."""
        found = _RESULT_LIMIT.search(self.message)
        if found:
            return int(found.group(1)) * (1000 if found.group(2) else 1)
        limit = self.data.get("limit") if isinstance(self.data, dict) else None
        return limit if type(limit) is int and limit > 0 else None

    def __str__(self) -> str:
        return f"JSON-RPC error {self.code}: {self.message}"


class _BatchRejected(ClobjobError):
    """The provider does not take a batch of this size (answered: a success for the rate)."""


def _error(raw: Any) -> RpcError:
    if not isinstance(raw, dict) or type(raw.get("code")) is not int or not isinstance(raw.get("message"), str):
        return RpcError(-1, f"malformed error object {json.dumps(raw)[:200]}")
    return RpcError(raw["code"], raw["message"], raw.get("data"))


def _answers(doc: Any, count: int) -> list[Any]:
    """Per call (ids 0…count-1), its result or its ``RpcError``; a batch lacking answers is rejected, a single
    call without one is not JSON-RPC (``SourceError``)."""
    items = doc if isinstance(doc, list) else [doc]
    found: dict[int, Any] = {}
    for item in items:
        if isinstance(item, dict) and type(item.get("id")) is int and ("result" in item or "error" in item):
            found[item["id"]] = _error(item["error"]) if "error" in item else item["result"]
    if any(i not in found for i in range(count)):
        if len(items) == 1 and isinstance(items[0], dict) and "error" in items[0]:
            return [_error(items[0]["error"])] * count  # one error for the whole request (id null)
        if count > 1:
            raise _BatchRejected(f"the answer lacks {count - len(found)} of {count} calls")
        raise SourceError(f"the endpoint does not answer JSON-RPC: {json.dumps(doc)[:200]} (is the RPC URL right?)")
    return [found[i] for i in range(count)]


# --- decoding ------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(field, why)
        self.field, self.why = field, why


def _quantity(log: Mapping[str, Any], field: str) -> int:
    value = log.get(field)
    if type(value) is not str or not _QUANTITY.fullmatch(value):
        raise _Bad(field, f"expected a hex quantity, got {value!r}")
    return int(value, 16)


def _word(value: Any, field: str) -> str:
    if type(value) is not str or not _WORD_HEX.fullmatch(value):
        raise _Bad(field, f"expected 32 bytes of hex, got {value!r}")
    return value.lower()


def _topic_address(value: Any, field: str) -> str:
    word = _word(value, field)
    if not word[2:26] == _ADDRESS_PAD:
        raise _Bad(field, f"expected an address left-padded to 32 bytes, got {value!r}")
    return "0x" + word[26:]


def log_position(log: Any) -> tuple[int, str, int]:
    """(block number, tx hash, log index) of a log; ``SourceError`` when one of them is malformed."""
    if not isinstance(log, dict):
        raise SourceError(f"eth_getLogs answer drifted: a log is {type(log).__name__}, expected an object")
    try:
        return _quantity(log, "blockNumber"), _word(log.get("transactionHash"), "transactionHash"), \
            _quantity(log, "logIndex")
    except _Bad as bad:
        raise SourceError(f"eth_getLogs answer drifted: log {json.dumps(log)[:200]}: {bad.field}: {bad.why}") from None


def fill_row(log: Mapping[str, Any], timestamp: int, conditions: Mapping[str, str],
             contracts: Collection[str]) -> tuple[Any, ...]:
    """The ``clob_fills`` row (``FILL_COLUMNS`` order) of one ``OrderFilled`` log emitted by one of ``contracts``
    (lower-case addresses): a v2 one (side, tokenId, … ; ``exchange_version`` 2) or a v1 one (makerAssetId,
    takerAssetId, …; version 1), told apart by topic0; ``SourceError`` naming block, tx, log index and field."""
    block, tx, index = log_position(log)
    try:
        address = log.get("address")
        if type(address) is not str or not _ADDRESS.fullmatch(address) or address.lower() not in contracts:
            raise _Bad("address", f"expected one of the exchange contracts, got {address!r}")
        exchange = address.lower()
        topics = log.get("topics")
        if not isinstance(topics, list) or len(topics) != 4:
            raise _Bad("topics", f"expected 4 topics (OrderFilled), got {topics!r}")
        event = _word(topics[0], "topics[0]")
        if event not in _DATA_WORDS:
            raise _Bad("topics[0]", f"expected the OrderFilled topic of v2 or v1, got {topics[0]!r}")
        order_hash = _word(topics[1], "topics[1] (orderHash)")
        maker = _topic_address(topics[2], "topics[2] (maker)")
        taker = _topic_address(topics[3], "topics[3] (taker)")
        data, (words, version) = log.get("data"), _DATA_WORDS[event]
        if type(data) is not str or not _DATA_HEX[event].fullmatch(data):
            size = f"{(len(data) - 2) / 64:g} words" if type(data) is str and data.startswith("0x") else repr(data)
            raise _Bad("data", f"expected {len(words)} words of hex ({', '.join(words)}), got {size}")
        first, second, maker_amount, taker_amount, fee = (int(data[2 + 64 * k:66 + 64 * k], 16) for k in range(5))
        if version == 2:
            if first not in (0, 1):
                raise _Bad("data[0] (side)", f"expected 0 (BUY) or 1 (SELL), got {first}")
            buy, token = first == 0, second
        else:
            if (first == 0) == (second == 0):
                raise _Bad("data[0:2] (makerAssetId, takerAssetId)",
                           f"exactly one must be the collateral (0), got {first} and {second}")
            buy = first == 0
            token = second if buy else first
        if log.get("removed") is True:
            raise _Bad("removed", "the log was removed by a reorg (is rpc_lag_blocks too small?)")
    except _Bad as bad:
        raise SourceError(f"bad OrderFilled log at block {block}, tx {tx}, log index {index}: "
                          f"{bad.field}: {bad.why}") from None
    token_id = str(token)
    return (f"{tx}_{order_hash}", tx, order_hash, timestamp, block, index, exchange, maker, taker,
            "0" if buy else token_id, token_id if buy else "0", maker_amount, taker_amount, fee,
            conditions.get(token_id, ""), token_id, "BUY" if buy else "SELL",
            taker in EXCHANGES or taker in contracts, version, "rpc")


# --- cursors -------------------------------------------------------------------------------------


@dataclass
class Cursor:
    """Blocks ``[next, to)`` still to fetch, ``span`` blocks per ``eth_getLogs`` call."""

    next: int
    to: int
    span: int

    def encode(self) -> str:
        return json.dumps({"next": self.next, "to": self.to, "span": self.span}, separators=(",", ":"))

    @classmethod
    def decode(cls, unit: WorkUnit, cursor: str) -> Cursor:
        """The cursor's state; ``SourceError`` if it is not one this source made for ``unit``."""
        try:
            raw = json.loads(cursor)
            state = cls(raw["next"], raw["to"], raw["span"])
            valid = (type(state.next) is int and type(state.to) is int and type(state.span) is int
                     and state.span >= 1 and state.next <= state.to
                     and (unit.block_from is None or state.next >= unit.block_from)
                     and (unit.block_to is None or state.to == unit.block_to))
        except (ValueError, TypeError, KeyError):
            valid = False
        if not valid:
            raise SourceError(f"unit {unit.unit_id}: cursor {cursor[:120]!r} was not made by the rpc source for "
                              f"blocks [{unit.block_from}, {unit.block_to})")
        return state


# --- the source ----------------------------------------------------------------------------------


class RpcSource(OverHttp):
    """``FillSource`` over a Polygon JSON-RPC endpoint; one aiohttp session, the process's shared controller."""

    name = "rpc"

    def __init__(self, settings: Settings, controller: AdaptiveRateController, *,
                 max_attempts: int = MAX_ATTEMPTS, head_poll_s: float = HEAD_POLL_S) -> None:
        if settings.rpc_url is None or not settings.rpc_url.get_secret_value():
            raise BadInput("the rpc source needs a Polygon JSON-RPC endpoint: set CLOBJOB_RPC_URL")
        self._url = settings.rpc_url.get_secret_value()  # may hold a key: never logged
        self.controller = controller
        self.contracts = settings.rpc_contract_blocks()
        self.topics = sorted({ORDER_FILLED_V1 if EXCHANGES.get(c) == 1 else ORDER_FILLED_V2 for c in self.contracts})
        self.first_block = min(self.contracts.values())
        self.lag = settings.rpc_lag_blocks
        self.max_span = settings.rpc_max_span
        self.initial_span = min(settings.rpc_initial_span, settings.rpc_max_span)
        self.max_attempts = max_attempts
        self.head_poll_s = head_poll_s
        self.batch_cap = settings.rpc_batch  # most calls per HTTP request; halves when the provider rejects a batch
        self.batch = settings.rpc_batch  # calls per HTTP request now (below the cap while the burst runs out)
        self.pages_batch = settings.rpc_batch  # ranges asked for per page
        self.range_cap: int | None = None  # the provider's block-range cap, once an error named it
        self.result_cap: int | None = None  # the provider's result cap, once an error named it
        self.span_hint = self.initial_span  # the last span that worked: where a fresh unit starts
        self.unknown_tokens: Counter[str] = Counter()  # fills whose token is not in the caller's map
        self._timeout_s = settings.request_timeout_s
        self._blocks: OrderedDict[int, int] = OrderedDict()  # block → timestamp
        self._head: tuple[int, float] | None = None  # (head, monotonic time read)
        self._checked_chain = False
        self._http = HttpSession(controller, settings.request_timeout_s)

    # --- JSON-RPC ----------------------------------------------------------------------------

    async def _post(self, permit: Permit, calls: Sequence[tuple[str, list[Any]]], timeout_s: float) -> list[Any]:
        """One HTTP request for ``calls``: per call its result or ``RpcError`` (the permit is told of rate answers)."""
        requests = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
        payload = json.dumps(requests if len(requests) > 1 else requests[0], separators=(",", ":")).encode()
        status, headers, body = await self._http.send("POST", self._url, timeout_s, data=payload)
        retry_after = headers.get("Retry-After")
        if status == 429:
            raise Retryable("throttled (HTTP 429)", "throttled", retry_after)
        if status == 413:
            return [RpcError(413, f"HTTP 413: {body[:120].decode(errors='replace').strip()}")] * len(calls)
        if status >= 500 or status == 408:
            raise Retryable(f"HTTP {status}: {body[:80].decode(errors='replace').strip()!r}", "failed")
        if not body.strip():
            raise Retryable(f"empty body (HTTP {status})", "failed")
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if len(calls) > 1 and status != 200:
                raise _BatchRejected(f"HTTP {status}") from None
            if status != 200:
                raise SourceError(f"JSON-RPC endpoint answered HTTP {status}: "
                                  f"{body[:200].decode(errors='replace')!r}") from None
            raise Retryable(f"truncated or garbled body ({len(body)} bytes)", "failed") from None
        if len(calls) > 1 and not isinstance(doc, list):
            error = _error(doc.get("error")) if isinstance(doc, dict) else None
            if error is not None and error.kind == "rate":
                raise Retryable(str(error), "throttled", retry_after)
            raise _BatchRejected(str(error) if error else f"HTTP {status}")
        answers = _answers(doc, len(calls))
        admitted = sum(not (isinstance(a, RpcError) and a.kind == "rate") for a in answers)
        if not admitted:
            permit.throttled(retry_after)
        elif admitted < len(calls):  # the provider's burst ran out within the batch: smaller batches
            self.batch = min(self.batch, admitted)
        elif len(calls) == self.batch < self.batch_cap:
            self.batch += 1  # a whole batch passed: try one more call per request
        return answers

    async def _chunk(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any] | None:
        """Answers to one request of ``calls``; None when the provider rejected the batch (``batch`` shrank)."""
        try:
            return await controlled_request(
                self.controller, lambda permit, timeout_s: self._post(permit, calls, timeout_s),
                what="rpc", max_attempts=self.max_attempts, timeout_s=self._timeout_s)
        except _BatchRejected as rejected:
            smaller = max(1, len(calls) // 2)
            if smaller < self.batch_cap:
                logger.info("rpc: the provider rejects batches of {} calls ({}); sending {} at a time",
                            len(calls), rejected, smaller)
                self.batch_cap = smaller
            self.batch = min(self.batch, self.batch_cap)
            return None

    async def call_many(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Per call its result or ``RpcError``, in order: batches of ``batch`` calls sent concurrently; calls a
        provider answered with a rate error are resent after a backoff, the others are kept."""
        answers: list[Any] = [None] * len(calls)
        pending, throttled = list(range(len(calls))), 0
        while pending:
            chunks = [pending[i:i + self.batch] for i in range(0, len(pending), self.batch)]
            results = await asyncio.gather(*(self._chunk([calls[i] for i in chunk]) for chunk in chunks))
            again, rated = [], False
            for chunk, result in zip(chunks, results, strict=True):
                if result is None:
                    again.extend(chunk)
                    continue
                for i, answer in zip(chunk, result, strict=True):
                    if isinstance(answer, RpcError) and answer.kind == "rate":
                        again.append(i)
                        rated = True
                    else:
                        answers[i] = answer
            if rated:
                throttled += 1
                if throttled >= self.max_attempts:
                    raise TransientSourceError(f"rpc: gave up after {throttled} throttled rounds")
                await asyncio.sleep(self.controller.backoff(throttled))
            pending = sorted(again)
        return answers

    async def call(self, method: str, params: list[Any]) -> Any:
        """The result of one call; ``TransientSourceError`` on an error answer."""
        answer = (await self.call_many([(method, params)]))[0]
        if isinstance(answer, RpcError):
            raise TransientSourceError(f"rpc {method}: {answer}")
        return answer

    # --- chain -------------------------------------------------------------------------------

    async def _check_chain(self) -> None:
        if self._checked_chain:
            return
        chain = await self.call("eth_chainId", [])
        if type(chain) is not str or not _QUANTITY.fullmatch(chain) or int(chain, 16) != POLYGON_CHAIN_ID:
            raise SourceError(f"the JSON-RPC endpoint serves chain {chain!r}, expected Polygon (0x89 = 137)")
        self._checked_chain = True

    async def head(self) -> int:
        """The chain head (``eth_blockNumber``), read at most every ``HEAD_TTL_S``."""
        now = time.monotonic()
        if self._head is None or now - self._head[1] > HEAD_TTL_S:
            value = await self.call("eth_blockNumber", [])
            if type(value) is not str or not _QUANTITY.fullmatch(value):
                raise SourceError(f"eth_blockNumber answered {value!r}, expected a hex quantity")
            self._head = (int(value, 16), now)
        return self._head[0]

    async def safe_head(self) -> int:
        """The newest block considered final: head − ``rpc_lag_blocks``."""
        return await self.head() - self.lag

    async def timestamps(self, blocks: Collection[int]) -> dict[int, int]:
        """Block → timestamp (cached; the missing ones from ``eth_getBlockByNumber``)."""
        missing = sorted(b for b in set(blocks) if b not in self._blocks)
        if missing:
            answers = await self.call_many([("eth_getBlockByNumber", [hex(b), False]) for b in missing])
            for number, block in zip(missing, answers, strict=True):
                if isinstance(block, RpcError):
                    raise TransientSourceError(f"rpc eth_getBlockByNumber {number}: {block}")
                if block is None:
                    raise TransientSourceError(f"rpc: block {number} is not available (eth_getBlockByNumber: null)")
                if (not isinstance(block, dict) or type(block.get("number")) is not str
                        or not _QUANTITY.fullmatch(block["number"]) or int(block["number"], 16) != number):
                    raise SourceError(f"eth_getBlockByNumber {number} answered a different or malformed block: "
                                      f"{json.dumps(block)[:200]}")
                try:
                    self._remember(number, _quantity(block, "timestamp"))
                except _Bad as bad:
                    raise SourceError(f"eth_getBlockByNumber {number}: {bad.field}: {bad.why}") from None
        return {b: self._blocks[b] for b in blocks}

    async def first_block_at(self, timestamp: int, low: int, high: int) -> int:
        """The first block of [low, high) whose timestamp is at or after ``timestamp`` (``high`` when none): a
        binary search over the blocks' own timestamps (``timestamps``: cached, rate-controlled)."""
        while low < high:
            middle = (low + high) // 2
            if (await self.timestamps([middle]))[middle] >= timestamp:
                high = middle
            else:
                low = middle + 1
        return low

    def _remember(self, block: int, timestamp: int) -> None:
        self._blocks[block] = timestamp
        if len(self._blocks) > BLOCK_CACHE:
            self._blocks.popitem(last=False)

    # --- fills -------------------------------------------------------------------------------

    def _filter(self, low: int, high: int) -> tuple[str, list[Any]]:
        return ("eth_getLogs", [{"address": list(self.contracts), "topics": [self.topics],
                                 "fromBlock": hex(low), "toBlock": hex(high)}])

    def _narrow(self, state: Cursor, error: RpcError, failures: int) -> None:
        """A smaller span after ``error`` on a range of ``state.span`` blocks from ``state.next``."""
        span, suggested = state.span, error.suggested_span(state.next)
        if span == 1:
            if failures >= SINGLE_BLOCK_FAILURES:
                raise SourceError(f"eth_getLogs keeps failing for the single block {state.next}: {error}")
            return
        if error.kind == "range":
            cap = min(suggested or error.block_limit() or span // 2, span - 1)
            self.range_cap = min(self.range_cap or cap, cap)
            state.span = self.range_cap
        else:
            self.result_cap = error.result_limit() or self.result_cap
            state.span = min(suggested or span // 2, span - 1, self.range_cap or span)
        state.span = self.span_hint = max(1, state.span)
        logger.debug("rpc: {} blocks from {} are too many ({}); now {}", span, state.next, error, state.span)

    def _widen(self, span: int, logs: int) -> int:
        """The span after answered ranges of ``span`` blocks holding at most ``logs`` logs."""
        factor = 2.0
        if self.result_cap and logs:
            factor = min(2.0, RESULT_TARGET * self.result_cap / logs)
        return max(1, min(int(span * factor), self.range_cap or self.max_span, self.max_span))

    def check_cursor(self, unit: WorkUnit, cursor: str) -> None:
        """``SourceError`` unless this source made ``cursor`` for ``unit``."""
        if cursor:
            Cursor.decode(unit, cursor)

    async def pages(self, unit: WorkUnit, cursor: str, conditions: Mapping[str, str],
                    lanes: Lanes | None = None) -> AsyncIterator[Page]:
        """Pages of ``unit``'s block range resuming after ``cursor`` (see the module doc for its format)."""
        await self._check_chain()
        if cursor:
            state = Cursor.decode(unit, cursor)
        else:
            start = unit.block_from if unit.block_from is not None else self.first_block
            to = unit.block_to if unit.block_to is not None else max(await self.safe_head() + 1, start)
            state = Cursor(min(start, to), to, self.span_hint)
        if state.next >= state.to:
            yield Page((), state.encode(), True)
            return
        failures, per_range = 0, None  # errors in a row; logs of the busiest answered range of the last page
        while state.next < state.to:
            end = min(state.to, await self.safe_head() + 1)
            if state.next >= end:  # the unit reaches past the safe head: wait for new blocks
                yield Page((), state.encode(), False)
                await asyncio.sleep(self.head_poll_s)
                continue
            count = 1 if per_range is None else max(1, min(self.pages_batch, PAGE_LOGS // max(per_range, 1)))
            span, ranges, low = state.span, [], state.next
            while len(ranges) < count and low < end:
                ranges.append((low, min(low + span, end) - 1))
                low = ranges[-1][1] + 1
            answers = await self.call_many([self._filter(a, b) for a, b in ranges])
            logs: list[Any] = []
            busiest, full = 0, False
            for (a, b), answer in zip(ranges, answers, strict=True):
                if isinstance(answer, RpcError):
                    failures += 1
                    self._narrow(state, answer, failures)
                    break
                if not isinstance(answer, list):
                    raise SourceError(f"eth_getLogs [{a}, {b}] answered {type(answer).__name__}, expected a list")
                for log in answer:
                    if not a <= log_position(log)[0] <= b:
                        raise SourceError(f"eth_getLogs [{a}, {b}] answered a log of block {log_position(log)[0]}")
                failures, busiest, full = 0, max(busiest, len(answer)), full or b - a + 1 == span
                logs.extend(answer)
                state.next = b + 1
            if state.next == ranges[0][0]:
                continue  # nothing answered: again with the narrower span
            per_range = busiest
            if full and state.span == span:
                state.span = self.span_hint = self._widen(span, busiest)
            rows = await self._rows(logs, conditions)
            logs = []
            yield Page.of_rows(rows, state.encode(), state.next >= state.to)

    async def _rows(self, logs: list[Any], conditions: Mapping[str, str]) -> list[tuple[Any, ...]]:
        """Fill rows of answered logs, with their block timestamps (inline ones, else fetched)."""
        stamps, missing = {}, set()
        for log in logs:
            block = int(log["blockNumber"], 16)
            if log.get("blockTimestamp") is None:
                missing.add(block)
                continue
            try:
                stamps[block] = _quantity(log, "blockTimestamp")
            except _Bad as bad:
                _, tx, index = log_position(log)
                raise SourceError(f"bad OrderFilled log at block {block}, tx {tx}, log index {index}: "
                                  f"{bad.field}: {bad.why}") from None
        if missing:
            stamps.update(await self.timestamps(missing - stamps.keys()))
        rows = []
        for log in logs:
            row = fill_row(log, stamps[int(log["blockNumber"], 16)], conditions, self.contracts)
            if not row[_CONDITION]:
                self.unknown_tokens[row[_TOKEN]] += 1
            rows.append(row)
        return rows
