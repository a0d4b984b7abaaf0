"""CLOB v1 fills from the Goldsky orderbook subgraph (GraphQL over HTTP POST), rate-controlled.

Query shape. A unit's fills are paged with ``orderBy: id, orderDirection: asc, first: 1000`` and an
``id_gt`` cursor starting at "". Both sides of a token set come from ONE query::

    where: {or: [{makerAssetId_in: $tokens, id_gt: $after, timestamp_gte: …, timestamp_lt: …},
                 {takerAssetId_in: $tokens, id_gt: $after, timestamp_gte: …, timestamp_lt: …}]}

(graph-node rejects column filters next to ``or``, so every filter sits inside each branch). One ``or``
query instead of two cursors (maker side, taker side) halves the requests of every market that fits in
one page — most of them on a heavy-tailed universe, where requests, not fills, are what the rate limit
caps — and costs nothing on big markets (same number of full pages). A unit without token ids is a
time-window unit over every market: ``where: {timestamp_gte, timestamp_lt, id_gt}``. A unit cut from a
giant market by fill id (``unit.id_from``/``id_to``, see ``clobjob.plan``) starts its cursor at ``id_from``
and adds ``id_lt: $upto`` (= ``id_to``) to each branch.

Token batches. A unit's tokens are queried ``max_tokens`` at a time. A batch the server cannot run
(``Store error: database query timed out`` at once, ``Query timed out`` twice in a row, ``query is
too expensive``) is split in halves that both continue from the batch's ``id_gt``; a single token that
keeps timing out is retried like any transient error.

Cursor (opaque to everyone else): "" = from the start; otherwise the JSON list of the pending segments
``[[lo, hi, after], …]`` or ``[[lo, hi, after, upto], …]`` — token index range ``unit.token_ids[lo:hi]``
(``[0, 0]`` for a time-window unit) still to page after fill id ``after`` (the id exactly as the server
returned it, since ``id_gt`` compares bytes; a fresh segment starts at the unit's ``id_from``, or "") and
before ``upto`` (``id_lt``; absent: the unit's ``id_to``). ``[]`` = the unit is done. A cursor thus carries
pending split halves and cut ranges, and a resumed unit continues every one of them where its last stored
page ended; cursors of three-element segments (written before ranges were cut) resume unchanged.

Concurrency from the work. Given ``lanes`` (``sources.base.Lanes``, granted by the worker against the rate
controller's in-flight target) a unit pages several segments at once, one request each: a lane takes a
pending segment, or cuts its own id range when that is at least half of the unit's largest and worth
``MIN_SPLIT_PAGES``, where the part it keeps holds whole pages less a margin (``split_segment``, ``kept_pages``:
ids begin with a keccak hash, so a part holds its share of the fills). Pages of all lanes are yielded one by
one, each with the cursor of the whole unit; a segment's ``after`` moves when its page is yielded, and a lane
waits for that before its next request, so a checkpoint never claims a page that was not handed over with or
before it, and a range is only cut between two of its requests (the parts never overlap: no fill is fetched
twice). A cut costs at most one partial page.

Rows (``FILL_COLUMNS`` order) are parsed without a model per fill, but strictly: a missing or renamed
field, a wrong type or a non-numeric BigInt raises ``SourceError`` naming the entity, index and field. A
well-formed fills answer is decoded straight from its bytes into typed records and checked a column at a time
(``typed_fill_page``); anything else falls back to the generic parser, which reads the same rows or names
the fault.
``condition_id`` comes from the caller's token → condition map; a token missing from it gets "". The values
themselves (hex shapes, ranges, side) are the storage contract, ``models.check_fills``, which the worker
applies to every page of every source. A full page whose last id is not after the cursor it was asked
for (a server that ignores ``id_gt``) fails the unit at once (``UnitFailed``) instead of being paged forever.

Errors, and what the rate controller is told. 429 / "surpassed your query allowance" → ``throttled``
(Retry-After honoured); ``service is overloaded`` → ``overloaded``; ``Query timed out`` / store
timeouts → ``success`` (answered at once: the query is heavy, the rate is fine); 5xx, empty or
truncated bodies, connection errors and timeouts → ``failed``. All of them are retried. Only explicit
rate and overload answers cut the rate: measured on the simulator's hostile profile, cutting it on
every 5xx / empty body / statement timeout too (random faults, not load) drives the rate from the
30 req/s limit down to 1–3 req/s, and shrinking the window on every store timeout made the end-to-end
hostile backfill 3× slower. A hung answer is cut after max(5 s, 10 smoothed latencies), doubled at
each retry up to ``request_timeout_s``. Retries wait the controller's jittered backoff and its retry
budget (which delays them, never drops them); after ``max_attempts`` tries ``TransientSourceError``
carries the last reason. ``indexing_error`` raises ``SubgraphIndexingError`` (the worker fails the
unit at once); any other GraphQL error (validation, argument range, "Cannot mix column filters…"), an
unexpected HTTP status or a drifted shape raises ``SourceError`` at once (exit 2) with the server's text.
So does an answer that is not GraphQL JSON at all — an HTML page, a body not starting with ``{``, bytes
that are not UTF-8 — naming the URL (redacted), the status, the content type and the first bytes; only a
JSON body cut short (also inside a UTF-8 character) is retried as truncated.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache, partial
from itertools import repeat
from typing import Any

import msgspec
import orjson
from loguru import logger

from clobjob.config import Settings, redact_url
from clobjob.errors import SourceError, UnitFailed
from clobjob.models import (
    EXCHANGES,
    BadValue,
    Market,
    MarketFills,
    WorkUnit,
    normalize_condition_id,
    normalize_token_id,
)
from clobjob.ratelimit import AdaptiveRateController, Retryable, controlled_request
from clobjob.sources.base import Lanes, Page
from clobjob.sources.http import JSON_HEADERS, HttpSession, OverHttp

PAGE_SIZE = 1000
DATA_UNTIL = datetime(2026, 4, 28, 11, tzinfo=timezone.utc)  # the last v1 fill: the subgraph indexes only v1
MAX_TOKENS_PER_QUERY = 200
ID_DIGITS = 8  # hex digits of an id-range boundary (at most 16**ID_DIGITS ranges)
SPLIT_DIGITS = 16  # hex digits of a split point (a segment is cut in the space of 16**SPLIT_DIGITS ids)
ID_SPACE = 16**SPLIT_DIGITS
MIN_SPLIT_PAGES = 2.0  # a segment expected to hold fewer pages is not split (a split costs one partial page)
SPLIT_MARGIN = 0.1  # a cut keeps whole pages less this share (3 standard deviations of a page's count of ids)
MAX_ATTEMPTS = 8

ALLOWANCE_TEXT = "surpassed your query allowance"
STORE_TIMEOUT_TEXT = "database query timed out"
QUERY_TIMEOUT_TEXT = "query timed out"
TOO_EXPENSIVE_TEXT = "query is too expensive"
OVERLOADED_TEXT = "service is overloaded"
TRANSIENT_TEXTS = ("timed out", "not yet available")  # other timeouts; a block past the indexed head
INDEXING_ERROR_TEXT = "indexing_error"

FILL_FIELDS = ("id", "transactionHash", "timestamp", "orderHash", "maker", "taker", "makerAssetId",
               "takerAssetId", "makerAmountFilled", "takerAmountFilled", "fee")


class SubgraphIndexingError(UnitFailed):
    """The subgraph answers ``indexing_error`` (it failed to index): the unit fails with this reason."""


# --- answers -------------------------------------------------------------------------------------


class _Retry(Retryable):
    """A retryable answer; ``heavy`` says the query is too heavy for the server ("now", or "repeated" when
    only a second time in a row tells)."""

    def __init__(self, reason: str, verdict: str, retry_after: str | None = None, heavy: str = "") -> None:
        super().__init__(reason, verdict, retry_after)
        self.heavy = heavy


class _TooHeavy(Exception):
    """The query is too heavy for the server: split the token batch."""


def _graphql_errors(errors: Any) -> None:
    """Raise the exception an ``errors`` list calls for."""
    messages = [e.get("message") if isinstance(e, dict) else None for e in errors] if isinstance(errors, list) else []
    texts = [m for m in messages if isinstance(m, str)] or [json.dumps(errors)[:300]]
    text = "; ".join(texts)
    lowered = text.lower()
    if INDEXING_ERROR_TEXT in lowered:
        raise SubgraphIndexingError(f"subgraph indexing error: {text}")
    if STORE_TIMEOUT_TEXT in lowered or TOO_EXPENSIVE_TEXT in lowered:
        raise _Retry(text, "answered", heavy="now")
    if QUERY_TIMEOUT_TEXT in lowered:
        raise _Retry(text, "answered", heavy="repeated")
    if OVERLOADED_TEXT in lowered:
        raise _Retry(text, "overloaded")
    if any(t in lowered for t in TRANSIENT_TEXTS):
        raise _Retry(text, "failed")
    raise SourceError(f"subgraph rejected the query: {text}")


def _not_the_protocol(url: str, status: int, headers: Mapping[str, str], body: bytes, why: str) -> SourceError:
    """The error for an answer that is not GraphQL JSON at all (a wrong endpoint, a portal page): permanent."""
    return SourceError(f"{redact_url(url)} is not answering as a GraphQL endpoint ({why}): HTTP {status}, "
                       f"Content-Type {headers.get('Content-Type', '-')!r}, {len(body):,} bytes starting "
                       f"{body.lstrip()[:60]!r}")


def _parsed(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Any:
    """A body orjson refuses, parsed by the standard parser (which accepts a few more, e.g. integers beyond
    64 bits), or the exception that names what is wrong with it."""
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and status == 200:
            raise _Retry(f"truncated body ({len(body)} bytes)", "failed") from None
        raise _not_the_protocol(url, status, headers, body, f"not UTF-8 at byte {exc.start:,}") from None
    except json.JSONDecodeError:
        if status != 200:
            raise SourceError(f"subgraph answered HTTP {status}: {body[:200].decode(errors='replace')!r}") from None
        raise _Retry(f"truncated or garbled body ({len(body)} bytes)", "failed") from None


def _answer(status: int, headers: Mapping[str, str], body: bytes, url: str = "",
            typed: Callable[[bytes], Any] | None = None) -> Any:
    """The ``data`` object of one HTTP answer, or the exception it calls for; with ``typed``, what it makes of a
    200 answer's body unless that is None (a decoder for the well-formed case).

    A body that cannot be GraphQL JSON — an HTML content type, or not starting with ``{`` — or that is not
    UTF-8 before its end is the wrong protocol (``SourceError`` at once, naming the URL and what came back);
    a JSON body cut short (also in the middle of a UTF-8 character) is retried as truncated."""
    if status == 429 or ALLOWANCE_TEXT.encode() in body[:2000]:
        raise _Retry(f"throttled (HTTP {status})", "throttled", headers.get("Retry-After"))
    if status >= 500 or status == 408:
        raise _Retry(f"HTTP {status}: {body[:80].decode(errors='replace').strip()!r}", "failed")
    if not body.strip():
        raise _Retry(f"empty body (HTTP {status})", "failed")
    if "html" in headers.get("Content-Type", "").lower() or not body.lstrip().startswith(b"{"):
        raise _not_the_protocol(url, status, headers, body, "not a JSON object")
    if typed is not None and status == 200 and (found := typed(body)) is not None:
        return found
    try:
        doc = orjson.loads(body)  # 2.3x the standard parser on a 1,000-fill page
    except orjson.JSONDecodeError:
        doc = _parsed(status, headers, body, url)
    if not isinstance(doc, dict):
        raise SourceError(f"subgraph response drifted: top level is {type(doc).__name__}, expected an object")
    if doc.get("errors"):
        _graphql_errors(doc["errors"])
    if status != 200:
        raise SourceError(f"subgraph answered HTTP {status}: {body[:200].decode(errors='replace')!r}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise SourceError("subgraph response drifted: no 'data' object")
    return data


def _entities(data: dict[str, Any], entity: str) -> list[Any]:
    found = data.get(entity)
    if not isinstance(found, list):
        raise SourceError(f"subgraph response drifted: data.{entity} is {type(found).__name__}, expected a list")
    return found


# --- strict, fast parsing ------------------------------------------------------------------------


class _Drift(Exception):
    """A field of one entity does not have the expected shape."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(field, why)
        self.field, self.why = field, why


def _drift(entity: str, index: int, exc: Exception) -> SourceError:
    if isinstance(exc, _Drift):
        where, why = exc.field, exc.why
    elif isinstance(exc, KeyError):
        where, why = str(exc.args[0]), "missing field"
    else:
        where, why = "-", f"expected an object, got {exc}"
    return SourceError(f"subgraph response drifted: {entity}[{index}].{where}: {why}")


def _text(entity: dict[str, Any], field: str) -> str:
    value = entity[field]
    if type(value) is not str or not value:
        raise _Drift(field, f"expected a non-empty string, got {value!r}")
    return value


def _bigint(entity: dict[str, Any], field: str) -> int:
    value = entity[field]
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    raise _Drift(field, f"expected a BigInt (decimal string), got {value!r}")


def _asset(entity: dict[str, Any], field: str, canonical: dict[str, str]) -> str:
    """An asset id (uint256 as a decimal string) in canonical form; ``canonical`` caches them per page."""
    value = entity[field]
    found = canonical.get(value) if type(value) is str else None
    if found is None:
        if type(value) is not str or not (value.isdigit() and value.isascii()) or int(value) >= 2**256:
            raise _Drift(field, f"expected a uint256 decimal string, got {value!r}")
        found = canonical[value] = str(int(value))
    return found


def fill_rows(events: list[Any], conditions: Mapping[str, str]) -> list[tuple[Any, ...]]:
    """``orderFilledEvents`` objects as fill rows in ``FILL_COLUMNS`` order; ``SourceError`` on drift."""
    rows: list[tuple[Any, ...]] = []
    append, canonical, exchanges = rows.append, {}, EXCHANGES
    index = 0
    try:
        for index, event in enumerate(events):
            maker_asset = _asset(event, "makerAssetId", canonical)
            taker_asset = _asset(event, "takerAssetId", canonical)
            buy = maker_asset == "0"
            token = taker_asset if buy else maker_asset
            taker = _text(event, "taker").lower()
            append((
                _text(event, "id").lower(), _text(event, "transactionHash").lower(),
                _text(event, "orderHash").lower(), _bigint(event, "timestamp"), None, None, "",
                _text(event, "maker").lower(), taker, maker_asset, taker_asset,
                _bigint(event, "makerAmountFilled"), _bigint(event, "takerAmountFilled"), _bigint(event, "fee"),
                conditions.get(token, ""), token, "BUY" if buy else "SELL", taker in exchanges, 1, "subgraph",
            ))
    except (_Drift, KeyError, TypeError) as exc:
        raise _drift("orderFilledEvents", index, exc) from None
    return rows


@dataclass(frozen=True)
class FillPage:
    """One answer's fills as columns (``Page.columns``), how many events it held, and the last event's id as the
    server wrote it."""

    columns: Sequence[list[Any]]
    events: int
    last: str | None


def fill_page(events: list[Any], conditions: Mapping[str, str]) -> FillPage:
    """``orderFilledEvents`` objects as a ``FillPage`` (``fill_rows``; ``SourceError`` on drift)."""
    columns = tuple(map(list, zip(*fill_rows(events, conditions))))
    return FillPage(columns, len(events), _text(events[-1], "id") if events else None)


class _Event(msgspec.Struct, rename="camel"):
    """An ``orderFilledEvents`` object whose every field is a string (BigInts are decimal strings)."""

    id: str
    transaction_hash: str
    timestamp: str
    order_hash: str
    maker: str
    taker: str
    maker_asset_id: str
    taker_asset_id: str
    maker_amount_filled: str
    taker_amount_filled: str
    fee: str


class _FillsData(msgspec.Struct, rename="camel"):
    order_filled_events: list[_Event]


class _FillsAnswer(msgspec.Struct):
    data: _FillsData
    errors: Any = None


_FILLS_ANSWER = msgspec.json.Decoder(_FillsAnswer)


def _lowered(values: list[str]) -> list[str] | None:
    """The non-empty strings lower-cased (the list itself when they already are); None if one is empty."""
    if "" in values:
        return None
    joined = "".join(values)
    return values if joined == joined.lower() else [v.lower() for v in values]


def typed_fill_page(body: bytes, conditions: Mapping[str, str]) -> FillPage | None:
    """A well-formed fills answer decoded straight from its bytes into the columns ``fill_page`` makes (1.9 ms
    against 3.2 ms a 1,000-fill page: no dict per fill, each check one pass over a column, no row built). None
    for anything else — GraphQL errors, a null, a field missing or of another type, a BigInt that is not
    digits — which the generic path then parses and names."""
    try:
        answer = _FILLS_ANSWER.decode(body)
    except msgspec.DecodeError:  # also a ValidationError: the generic path says what is wrong
        return None
    events = answer.data.order_filled_events
    if answer.errors:
        return None
    if not events:
        return FillPage((), 0, None)
    numbers = [e.timestamp for e in events] + [e.maker_amount_filled for e in events] + \
        [e.taker_amount_filled for e in events] + [e.fee for e in events]
    joined = "".join(numbers)
    if "" in numbers or not (joined.isascii() and joined.isdigit()):
        return None
    canonical = {}
    for value in {e.maker_asset_id for e in events} | {e.taker_asset_id for e in events}:
        if not (value.isascii() and value.isdigit()) or int(value) >= 2**256:
            return None
        canonical[value] = str(int(value))
    texts = [_lowered([getattr(e, field) for e in events])
             for field in ("id", "transaction_hash", "order_hash", "maker", "taker")]
    if None in texts:
        return None
    n = len(events)
    at, made, taken, fees = (list(map(int, numbers[i * n:(i + 1) * n])) for i in range(4))
    maker_assets = list(map(canonical.__getitem__, [e.maker_asset_id for e in events]))
    taker_assets = list(map(canonical.__getitem__, [e.taker_asset_id for e in events]))
    tokens = [taker if maker == "0" else maker for maker, taker in zip(maker_assets, taker_assets)]
    sides = ["BUY" if maker == "0" else "SELL" for maker in maker_assets]
    ids, txs, orders, makers, takers = texts
    columns = (ids, txs, orders, at, [None] * n, [None] * n, [""] * n, makers, takers, maker_assets, taker_assets,
               made, taken, fees, list(map(conditions.get, tokens, repeat(""))), tokens, sides,
               list(map(EXCHANGES.__contains__, takers)), [1] * n, ["subgraph"] * n)
    return FillPage(columns, n, events[-1].id)


# --- queries and cursors -------------------------------------------------------------------------


# --- how its units are cut ------------------------------------------------------------------------


def page_requests(fills: int, page_size: int) -> int:
    return max(1, math.ceil(fills / page_size))


@dataclass(frozen=True)
class UnitCut:
    """A unit of markets before shard assignment: markets, known expected fills, estimated requests, fill-id
    range, and the fill time it starts from (a grown market)."""

    markets: tuple[MarketFills, ...]
    fills: int
    requests: int
    id_from: str | None = None
    id_to: str | None = None
    ts_from: int | None = None


def batch_markets(work: Sequence[MarketFills], page_size: int, batch_requests: int,
                  max_batch_tokens: int) -> list[UnitCut]:
    """Small markets batched up to ``batch_requests`` and ``max_batch_tokens``; large ones alone; a market
    fetched whole before its count grew alone, from its newest stored fill's time (only newer fills are missing).

    An unknown expected count is planned as one page of work. Order: by condition id (canonical).
    """
    chunks: list[UnitCut] = []
    batch: list[MarketFills] = []
    batch_work = batch_tokens = 0

    def close_batch() -> None:
        nonlocal batch, batch_work, batch_tokens
        if batch:
            fills = sum(m.expected_fills or 0 for m in batch)
            chunks.append(UnitCut(tuple(batch), fills, page_requests(batch_work, page_size)))
        batch, batch_work, batch_tokens = [], 0, 0

    for market in sorted(work, key=lambda m: m.condition_id):
        if market.new_since_ts is not None:
            chunks.append(UnitCut((market,), market.gap, page_requests(market.gap, page_size),
                                  ts_from=market.new_since_ts))
            continue
        fills = market.expected_fills if market.expected_fills is not None else page_size
        if page_requests(fills, page_size) >= batch_requests or len(market.token_ids) > max_batch_tokens:
            chunks.append(UnitCut((market,), market.expected_fills or 0, page_requests(fills, page_size)))
            continue
        if (page_requests(batch_work + fills, page_size) > batch_requests
                or batch_tokens + len(market.token_ids) > max_batch_tokens):
            close_batch()
        batch.append(market)
        batch_work += fills
        batch_tokens += len(market.token_ids)
    close_batch()
    return chunks


def cut_by_id(chunk: UnitCut, pieces: int, page_size: int) -> list[UnitCut]:
    """A one-market chunk cut into ``pieces`` ranges of fill id (``id_bounds``), fills shared out evenly."""
    bounds = id_bounds(pieces)
    count = len(bounds) - 1
    result = []
    for i in range(count):
        fills = chunk.fills * (i + 1) // count - chunk.fills * i // count
        result.append(UnitCut(chunk.markets, fills, page_requests(fills, page_size), bounds[i], bounds[i + 1],
                             chunk.ts_from))
    return result


def id_bounds(pieces: int) -> list[str | None]:
    """Boundaries of ``pieces`` equal ranges tiling the fill-id space: None, then strictly increasing
    ``0x`` hex prefixes shorter than any id, then None (at most ``16**ID_DIGITS`` ranges)."""
    pieces = min(pieces, 16**ID_DIGITS)
    inner = ("0x" + format(i * 16**ID_DIGITS // pieces, f"0{ID_DIGITS}x") for i in range(1, pieces))
    return [None, *inner, None]



@lru_cache(maxsize=None)
def fills_query(by_tokens: bool, since: bool, until: bool, upto: bool = False) -> str:
    """The fills query for a token set (or a time window), with the time filters and the id upper bound
    (``id_lt: $upto``) present."""
    params, common = ["$after: ID!"], ["id_gt: $after"]
    if upto:
        params.append("$upto: ID!")
        common.append("id_lt: $upto")
    if since:
        params.append("$from: BigInt!")
        common.append("timestamp_gte: $from")
    if until:
        params.append("$to: BigInt!")
        common.append("timestamp_lt: $to")
    if by_tokens:
        params.append("$tokens: [String!]!")
        branch = ", ".join(common)
        where = f"{{or: [{{makerAssetId_in: $tokens, {branch}}}, {{takerAssetId_in: $tokens, {branch}}}]}}"
    else:
        where = "{" + ", ".join(common) + "}"
    return (f"query Fills({', '.join(params)}) {{ orderFilledEvents(first: {PAGE_SIZE}, orderBy: id, "
            f"orderDirection: asc, where: {where}) {{ {' '.join(FILL_FIELDS)} }} }}")


EXPECTED_QUERY = (f"query Expected($ids: [ID!]!) {{ orderbooks(first: {PAGE_SIZE}, where: {{id_in: $ids}}) "
                  "{ id tradesQuantity } }")


MARKET_DATA_QUERY = (f"query Known($ids: [ID!]!) {{ marketDatas(first: {PAGE_SIZE}, where: {{id_in: $ids}}) "
                     "{ id condition } }")

TOKEN_ID_RANGES: tuple[tuple[str, str | None], ...] = (
    ("", "2"), *((str(d), str(d + 1)) for d in range(2, 9)), ("9", None))
"""Token ids are decimal strings, ordered as strings: a collection keyed by token id is paged as one keyset
paging per leading digit, all at once (the real collections hold hundreds of thousands)."""


def _collection_query(entity: str, fields: str, bounded: bool) -> str:
    upto = ", id_lt: $upto" if bounded else ""
    return (f"query Page($after: ID!{', $upto: ID!' if bounded else ''}) {{ {entity}(first: {PAGE_SIZE}, "
            f"orderBy: id, orderDirection: asc, where: {{id_gt: $after{upto}}}) {{ {fields} }} }}")


@dataclass(eq=False)
class Segment:
    """Tokens ``unit.token_ids[lo:hi]`` still to page after fill id ``after`` and, with ``upto``, before it
    (None: up to the unit's ``id_to``)."""

    lo: int
    hi: int
    after: str = ""
    upto: str | None = None


def start_segments(unit: WorkUnit, max_tokens: int) -> list[Segment]:
    """The segments of a unit not started yet: its tokens in batches of ``max_tokens``, each from ``id_from``
    (a boundary shorter than any id, so ``id_gt`` on it keeps the ids that start with it)."""
    count, start = len(unit.token_ids), unit.id_from or ""
    if not count:
        return [Segment(0, 0, start)]
    return [Segment(lo, min(lo + max_tokens, count), start) for lo in range(0, count, max_tokens)]


def encode_cursor(segments: Sequence[Segment]) -> str:
    """The opaque cursor of the pending segments (``[]`` when the unit is done)."""
    return json.dumps([[s.lo, s.hi, s.after] if s.upto is None else [s.lo, s.hi, s.after, s.upto]
                       for s in segments], separators=(",", ":"))


def decode_cursor(unit: WorkUnit, cursor: str, max_tokens: int) -> list[Segment]:
    """The pending segments a cursor stands for; ``SourceError`` if it is not one this source made."""
    if not cursor:
        return start_segments(unit, max_tokens)
    try:
        raw = json.loads(cursor)
        listed = raw if isinstance(raw, list) else []
        segments = [Segment(*s) for s in listed if isinstance(s, list) and len(s) in (3, 4)]
        valid = isinstance(raw, list) and len(segments) == len(raw) and all(
            type(s.lo) is int and type(s.hi) is int and isinstance(s.after, str) and isinstance(s.upto, str | None)
            and (0 <= s.lo < s.hi <= len(unit.token_ids) or s.lo == s.hi == 0 == len(unit.token_ids))
            for s in segments
        )
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise SourceError(f"unit {unit.unit_id}: cursor {cursor[:120]!r} was not made by the subgraph source "
                          f"for these {len(unit.token_ids)} tokens")
    return segments


def _id_point(bound: str | None, unbounded: int) -> int | None:
    """An id bound as a point of the ``SPLIT_DIGITS``-hex-digit id space (``unbounded`` for none or "");
    None when it is not a lowercase ``0x`` hex id or prefix (such a range is not split)."""
    if not bound:
        return unbounded
    digits = bound[2:2 + SPLIT_DIGITS]
    if not bound.startswith("0x") or not digits or digits != digits.lower():
        return None
    try:
        return int(digits.ljust(SPLIT_DIGITS, "0"), 16)
    except ValueError:
        return None


def _id_span(after: str, upto: str | None) -> tuple[int, int] | None:
    """The id-space points of a range (``after``, ``upto``), or None when it cannot be cut."""
    lo, hi = _id_point(after, 0), _id_point(upto, ID_SPACE)
    return None if lo is None or hi is None else (lo, hi)


def split_segment(unit: WorkUnit, segment: Segment, keep: float = 0.5) -> Segment | None:
    """Cut ``segment`` at the point ``keep`` of the way through its remaining id range: it keeps the lower part
    (``upto`` = the point, a ``0x`` prefix shorter than any id) and the upper part is returned, starting after the
    point. Ids begin with a keccak hash, so each part holds its share of the fills. None if the range is too
    narrow."""
    upto = segment.upto if segment.upto is not None else unit.id_to
    span = _id_span(segment.after, upto)
    if span is None or span[1] - span[0] < 2:
        return None
    point = span[0] + min(max(int((span[1] - span[0]) * keep), 1), span[1] - span[0] - 1)
    middle = "0x" + format(point, f"0{SPLIT_DIGITS}x")
    segment.upto = middle
    return Segment(segment.lo, segment.hi, middle, upto)


def remaining_pages(unit: WorkUnit, segment: Segment) -> float:
    """The pages ``segment`` is expected to still hold: the unit's expected fills × its token share × the
    share of the unit's id range still ahead of it (0 when that range is not hex)."""
    whole = _id_span(unit.id_from or "", unit.id_to)
    span = _id_span(segment.after, segment.upto if segment.upto is not None else unit.id_to)
    if whole is None or span is None or whole[1] <= whole[0]:
        return 0.0
    tokens = (segment.hi - segment.lo) / len(unit.token_ids) if unit.token_ids else 1.0
    fills = unit.expected_fills or unit.expected_requests * PAGE_SIZE
    return fills * tokens * max(span[1] - span[0], 0) / (whole[1] - whole[0]) / PAGE_SIZE


def kept_pages(pages: float) -> float:
    """The pages a segment expected to hold ``pages`` keeps when it is cut: whole pages, half of them or one, less
    ``SPLIT_MARGIN`` for the randomness of the ids. Its last page is then partial, so it costs no request more
    than its full pages (a cut at the midpoint often left ~1,000 fills: one full page and one empty)."""
    return max(1.0, math.floor(pages / 2)) * (1.0 - SPLIT_MARGIN)


class _UnitPaging:
    """One unit's pending segments, paged by lanes of one request each: one lane without ``lanes``, else
    as many as ``lanes`` allows (a lane takes a pending segment, or cuts its own in two if it is among the
    unit's largest and worth ``MIN_SPLIT_PAGES``).

    A lane fetches its segment's next page, hands it over and waits until it is yielded, which is when the
    segment's ``after`` moves to the page's end. So every page's cursor (all pending segments) claims exactly
    the pages yielded before it, a segment is cut only while none of its requests is in flight, and at most
    one parsed page per lane waits (the worker's buffer is where rows wait)."""

    def __init__(self, source: SubgraphSource, unit: WorkUnit, segments: list[Segment],
                 conditions: Mapping[str, str], lanes: Lanes | None) -> None:
        self.source, self.unit, self.segments, self.conditions, self.lanes = source, unit, segments, conditions, lanes
        self._queries = {bounded: fills_query(bool(unit.token_ids), unit.ts_from is not None,
                                              unit.ts_to is not None, bounded) for bounded in (False, True)}
        self._typed = partial(typed_fill_page, conditions=conditions)
        self._base: dict[str, Any] = {}
        if unit.ts_from is not None:
            self._base["from"] = str(unit.ts_from)
        if unit.ts_to is not None:
            self._base["to"] = str(unit.ts_to)
        self._owned: set[Segment] = set()
        self._ready: asyncio.Queue[tuple[Segment, Sequence[list[Any]], str | None, float, asyncio.Future[None]]
                                   | Exception] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._start(segments[0])

    async def next_page(self) -> Page:
        """The next fetched page (of any lane), its segment advanced; raises what a lane met."""
        item = await self._ready.get()
        if isinstance(item, Exception):
            raise item
        segment, columns, last, requested_at, resume = item
        if last is None:
            self.segments.remove(segment)
        else:
            segment.after = last
        resume.set_result(None)
        return Page(columns, encode_cursor(self.segments), not self.segments, requested_at)

    async def close(self) -> None:
        """Cancel the lanes still running."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, segment: Segment) -> None:
        self._owned.add(segment)
        self._count_lanes()
        task = asyncio.create_task(self._lane(segment))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_lanes(self) -> None:
        if self.lanes is not None:
            self.lanes.active = len(self._owned)

    def _unowned(self) -> Segment | None:
        return next((s for s in self.segments if s not in self._owned), None)

    async def _lane(self, segment: Segment | None) -> None:
        try:
            while segment is not None:
                self._widen(segment)
                requested_at = time.monotonic()
                columns, last = await self._fetch(segment)
                resume = asyncio.get_running_loop().create_future()
                self._ready.put_nowait((segment, columns, last, requested_at, resume))
                columns = None
                await resume
                if last is None:  # the segment is done: take a pending one, if any
                    self._owned.discard(segment)
                    segment = self._unowned()
                    if segment is not None:
                        self._owned.add(segment)
                    self._count_lanes()
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._ready.put_nowait(exc)

    def _widen(self, segment: Segment) -> None:
        """Open lanes while ``lanes`` allows: on pending segments first, then on the upper half of ``segment``."""
        while self.lanes is not None:
            spare = self._unowned()
            if spare is not None:
                if not self.lanes.may_add(max(remaining_pages(self.unit, spare), 1.0)):
                    return
                self._start(spare)
                continue
            own = remaining_pages(self.unit, segment)
            largest = max(remaining_pages(self.unit, s) for s in self.segments)
            kept = kept_pages(own)
            worth = own - kept if own >= MIN_SPLIT_PAGES and own >= largest / 2 else 0.0
            if not self.lanes.may_add(worth) or not worth:
                return
            half = split_segment(self.unit, segment, kept / own)
            if half is None:
                return
            self.segments.insert(self.segments.index(segment) + 1, half)
            self._start(half)

    async def _fetch(self, segment: Segment) -> tuple[Sequence[list[Any]], str | None]:
        """The fills (columns) of ``segment``'s next page and the id to continue after (None: the segment is
        done)."""
        while True:
            upto = segment.upto if segment.upto is not None else self.unit.id_to
            variables = {**self._base, "after": segment.after}
            if upto is not None:
                variables["upto"] = upto
            if self.unit.token_ids:
                variables["tokens"] = list(self.unit.token_ids[segment.lo:segment.hi])
            try:
                data = await self.source.query(self._queries[upto is not None], variables,
                                               splittable=segment.hi - segment.lo > 1,
                                               priority=remaining_pages(self.unit, segment), typed=self._typed)
            except _TooHeavy as heavy:
                middle = (segment.lo + segment.hi) // 2
                logger.info("unit {}: splitting a batch of {} tokens ({})", self.unit.unit_id,
                            segment.hi - segment.lo, heavy)
                half = Segment(middle, segment.hi, segment.after, segment.upto)
                segment.hi = middle
                self.segments.insert(self.segments.index(segment) + 1, half)
                continue
            page = data if isinstance(data, FillPage) else fill_page(_entities(data, "orderFilledEvents"),
                                                                      self.conditions)
            columns, last = page.columns, page.last
            if page.events < PAGE_SIZE:
                return columns, None
            if last <= segment.after:
                raise UnitFailed(f"unit {self.unit.unit_id}: the subgraph's cursor does not advance: a full page "
                                 f"after id {segment.after[:140]!r} ends at id {last[:140]!r} (not after it)")
            return columns, last


# --- the source ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Universe:
    """What the subgraph knows of the markets: condition → token ids, and tradesQuantity per token."""

    tokens_by_condition: dict[str, tuple[str, ...]]
    trades_by_token: dict[str, int]


class SubgraphSource(OverHttp):
    """``FillSource`` over the Goldsky orderbook subgraph; one aiohttp session, one shared controller."""

    name = "subgraph"

    def __init__(
        self,
        settings: Settings,
        controller: AdaptiveRateController,
        *,
        max_tokens: int = MAX_TOKENS_PER_QUERY,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.url = settings.subgraph_url
        self.controller = controller
        self.max_tokens = max_tokens
        self.max_attempts = max_attempts
        headers = dict(JSON_HEADERS)
        if settings.subgraph_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.subgraph_api_key.get_secret_value()}"
        self._http = HttpSession(controller, settings.request_timeout_s, headers)

    # --- requests ----------------------------------------------------------------------------

    async def _send(self, payload: bytes, timeout_s: float, typed: Callable[[bytes], Any] | None = None) -> Any:
        """One POST: ``data`` (or what ``typed`` makes of it), or what the answer calls for (``_Retry``,
        ``SourceError``)."""
        return _answer(*await self._http.send("POST", self.url, timeout_s, data=payload), self.url, typed)

    async def query(self, query: str, variables: dict[str, Any], *, splittable: bool = False,
                    priority: float = 0.0, typed: Callable[[bytes], Any] | None = None) -> Any:
        """The ``data`` of one GraphQL query, retried through the controller (served by ``priority``); with
        ``typed``, what it makes of a well-formed answer's body (see ``_answer``).

        With ``splittable`` a query too heavy for the server raises ``_TooHeavy`` instead of retrying.
        """
        payload = json.dumps({"query": query, "variables": variables}).encode()
        heavy_before = False

        def on_retry(retry: Retryable) -> None:
            nonlocal heavy_before
            heavy = getattr(retry, "heavy", "")
            if splittable and (heavy == "now" or (heavy == "repeated" and heavy_before)):
                raise _TooHeavy(str(retry)) from None
            heavy_before = bool(heavy)

        return await controlled_request(
            self.controller, lambda _permit, timeout_s: self._send(payload, timeout_s, typed),
            what="subgraph", max_attempts=self.max_attempts, timeout_s=self._http.request_timeout_s,
            on_retry=on_retry, priority=priority)

    # --- fills -------------------------------------------------------------------------------

    def check_cursor(self, unit: WorkUnit, cursor: str) -> None:
        """``SourceError`` unless this source made ``cursor`` for ``unit``."""
        decode_cursor(unit, cursor, self.max_tokens)

    async def pages(self, unit: WorkUnit, cursor: str, conditions: Mapping[str, str],
                    lanes: Lanes | None = None) -> AsyncIterator[Page]:
        """Pages of ``unit``'s fills resuming after ``cursor`` (see the module doc for its format); with
        ``lanes``, several of its id ranges at once (``_UnitPaging``)."""
        segments = decode_cursor(unit, cursor, self.max_tokens)
        if not segments:
            yield Page((), encode_cursor(()), True)
            return
        paging = _UnitPaging(self, unit, segments, conditions, lanes)
        try:
            while True:
                page = await paging.next_page()
                done = page.done
                yield page
                # Nothing of this page may stay referenced from this frame while the unit waits for its next
                # page: with hundreds of units parked per process, stale parsed pages were most of the heap.
                page = None
                if done:
                    return
        finally:
            await paging.close()

    # --- markets -----------------------------------------------------------------------------

    async def _collection(self, entity: str, fields: str, parse: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """Every entity of a collection keyed by token id, parsed with ``parse`` (SourceError on drift): one
        ``id_gt`` keyset paging per ``TOKEN_ID_RANGES`` range, run together under the rate controller."""
        ranges = await asyncio.gather(*(self._id_range(entity, fields, parse, after, upto)
                                        for after, upto in TOKEN_ID_RANGES))
        return [item for found in ranges for item in found]

    async def _id_range(self, entity: str, fields: str, parse: Callable[[dict[str, Any]], Any],
                        after: str, upto: str | None) -> list[Any]:
        query, found = _collection_query(entity, fields, upto is not None), []
        bound = {} if upto is None else {"upto": upto}
        while True:
            items = _entities(await self.query(query, {"after": after, **bound}), entity)
            found += self._parsed(entity, items, parse)
            if len(items) < PAGE_SIZE:
                return found
            after = _text(items[-1], "id")

    @staticmethod
    def _parsed(entity: str, items: list[Any], parse: Callable[[dict[str, Any]], Any]) -> list[Any]:
        parsed = []
        for index, item in enumerate(items):
            try:
                parsed.append(parse(item))
            except (_Drift, KeyError, TypeError) as exc:
                raise _drift(entity, index, exc) from None
        return parsed

    async def _by_ids(self, query: str, entity: str, ids: Sequence[str],
                      parse: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """The entities of ``ids`` that exist: batched ``id_in`` queries of ``PAGE_SIZE`` ids, sent together under
        the rate controller."""
        batches = [list(ids[i:i + PAGE_SIZE]) for i in range(0, len(ids), PAGE_SIZE)]
        answers = await asyncio.gather(*(self.query(query, {"ids": batch}) for batch in batches))
        return [item for answer in answers for item in self._parsed(entity, _entities(answer, entity), parse)]

    async def market_tokens(self) -> dict[str, tuple[str, ...]]:
        """Condition id → token ids (in token id order) from every ``marketDatas`` entity."""
        pairs = await self._collection("marketDatas", "id condition", _market_data)
        tokens: dict[str, list[str]] = {}
        for token, condition in pairs:
            tokens.setdefault(condition, []).append(token)
        return {condition: tuple(found) for condition, found in tokens.items()}

    async def trades_quantity(self) -> dict[str, int]:
        """Token id → ``tradesQuantity`` (the number of fills the subgraph holds) from every ``orderbooks``."""
        return dict(await self._collection("orderbooks", "id tradesQuantity", _orderbook))

    async def expected_fills(self, tokens: Sequence[str]) -> dict[str, int]:
        """``tradesQuantity`` of each token. The subgraph creates a token's Orderbook at its first fill, so a token
        without one has none: 0."""
        found = dict.fromkeys(tokens, 0)
        found.update(await self._by_ids(EXPECTED_QUERY, "orderbooks", tokens, _orderbook))
        return found

    async def token_markets(self, tokens: Sequence[str]) -> dict[str, str]:
        """The condition id the subgraph's ``marketDatas`` gives each of ``tokens`` it knows."""
        return dict(await self._by_ids(MARKET_DATA_QUERY, "marketDatas", tokens, _market_data))

    async def universe(self) -> Universe:
        """The subgraph's market universe and expected fills per token."""
        return Universe(await self.market_tokens(), await self.trades_quantity())


def _normalised(entity: dict[str, Any], field: str, normalize: Callable[[str], str]) -> str:
    value = _text(entity, field)
    try:
        return normalize(value)
    except BadValue as exc:
        raise _Drift(field, str(exc)) from None


def _market_data(entity: dict[str, Any]) -> tuple[str, str]:
    return _normalised(entity, "id", normalize_token_id), _normalised(entity, "condition", normalize_condition_id)


def _orderbook(entity: dict[str, Any]) -> tuple[str, int]:
    return _normalised(entity, "id", normalize_token_id), _bigint(entity, "tradesQuantity")


def merge_universe(existing: Iterable[Market], universe: Universe) -> tuple[list[Market], dict[str, tuple[str, int]]]:
    """Markets to add (those the subgraph knows and ``existing`` lacks; existing rows keep their metadata)
    and the orderbook rows ``{token: (condition, tradesQuantity)}``.

    The subgraph creates a token's ``Orderbook`` at its first fill, so a token it knows (``marketDatas``)
    without one has 0 expected fills; a token with an orderbook but no market gets condition "".
    """
    known = {m.condition_id: m for m in existing}
    added = [Market(condition_id=c, token_ids=t, source="subgraph")
             for c, t in universe.tokens_by_condition.items() if c not in known]
    condition_of = {t: c for c, tokens in universe.tokens_by_condition.items() for t in tokens}
    subgraph_tokens = set(condition_of) | set(universe.trades_by_token)
    condition_of.update({t: m.condition_id for m in known.values() for t in m.token_ids})
    orderbooks = {t: (condition_of.get(t, ""), universe.trades_by_token.get(t, 0)) for t in subgraph_tokens}
    return added, orderbooks
