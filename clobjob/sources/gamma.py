"""The market universe from Polymarket's Gamma API (``settings.gamma_url``), rate-controlled.

Paging. ``GET /markets/keyset?limit=100&order=id&ascending=true`` answers ``{"markets": [...],
"next_cursor": "..."}``; the next page is asked for with ``after_cursor=<next_cursor>``; the last page has no
``next_cursor`` (nautilus-trader's Polymarket adapter documents these names and the 100-market page cap).
Where the keyset endpoint is missing (HTTP 404) or its cursor does not advance (reported against Gamma in
Polymarket/agents#227), the listing falls back to ``GET /markets?limit=100&offset=N`` until an empty page
(Gamma caps pages silently, so a short page does not prove the end). Gamma refuses offsets beyond 10,000
(HTTP 422): offset paging then fails with that explanation instead of returning a partial universe.

Rows. Each market object is parsed by ``clobjob.sources.markets.market_from_gamma``; a bad one becomes a
``GammaBadRow`` (its ``line`` is the market's position in the listing, its text says "page P item I") and the
listing goes on. A condition id listed twice keeps its last object, like ``markets load``.

Errors. 429 → ``throttled`` (Retry-After honoured); 5xx, 408, empty or garbled bodies → ``failed``; all
retried (``clobjob.sources.http``). Any other HTTP status or a drifted envelope raises ``SourceError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import SourceError
from clobjob.models import Market
from clobjob.ratelimit import AdaptiveRateController, Retryable
from clobjob.sources.http import HttpSession, OverHttp
from clobjob.sources.markets import BadRow, market_from_gamma

MARKETS_PATH = "/markets"
KEYSET_PATH = "/markets/keyset"
CURSOR_PARAM = "after_cursor"
NEXT_CURSOR_FIELD = "next_cursor"
PAGE_SIZE = 100  # Gamma's cap per page
MAX_ATTEMPTS = 8
LISTING = {"order": "id", "ascending": "true"}  # a stable order to page in


class GammaBadRow(BadRow):
    """A market object of a Gamma listing that cannot be loaded; ``line`` is its position in the listing."""

    def __init__(self, position: int, page: int, item: int, problem: BadRow) -> None:
        detail = str(problem).removeprefix(f"line {problem.line}: ")
        ValueError.__init__(self, f"page {page} item {item} (market #{position}): {detail}")
        self.line, self.field, self.page, self.item = position, problem.field, page, item


class _KeysetUnavailable(Exception):
    """The keyset endpoint is missing or does not advance: page by offset instead."""


def _document(status: int, headers: Mapping[str, str], body: bytes, what: str) -> Any:
    """The JSON document of one answer, or the exception it calls for."""
    if status == 429:
        raise Retryable(f"throttled (HTTP 429) on {what}", "throttled", headers.get("Retry-After"))
    if status >= 500 or status == 408:
        raise Retryable(f"HTTP {status} on {what}: {body[:80].decode(errors='replace').strip()!r}", "failed")
    text = body[:300].decode(errors="replace")
    if status == 404 and what == KEYSET_PATH:
        raise _KeysetUnavailable(f"HTTP 404: {text!r}")
    if status != 200:
        raise SourceError(f"Gamma answered HTTP {status} on {what}: {text!r}")
    if not body.strip():
        raise Retryable(f"empty body on {what}", "failed")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Retryable(f"truncated or garbled body on {what} ({len(body)} bytes)", "failed") from None


def _keyset_page(status: int, headers: Mapping[str, str], body: bytes) -> tuple[list[Any], str | None]:
    doc = _document(status, headers, body, KEYSET_PATH)
    if not isinstance(doc, dict) or not isinstance(doc.get("markets"), list):
        raise SourceError(f"Gamma {KEYSET_PATH} response drifted: expected an object with a 'markets' list")
    cursor = doc.get(NEXT_CURSOR_FIELD)
    if cursor is not None and not isinstance(cursor, str):
        raise SourceError(f"Gamma {KEYSET_PATH} response drifted: {NEXT_CURSOR_FIELD} is {cursor!r}")
    return doc["markets"], cursor or None


def _offset_page(status: int, headers: Mapping[str, str], body: bytes) -> list[Any]:
    if status == 422:
        raise SourceError(f"Gamma refused to page further by offset (it stops at 10,000 markets and its keyset "
                          f"endpoint is unavailable): HTTP 422 {body[:300].decode(errors='replace')!r}")
    doc = _document(status, headers, body, MARKETS_PATH)
    if not isinstance(doc, list):
        raise SourceError(f"Gamma {MARKETS_PATH} response drifted: expected a JSON array")
    return doc


class _Collected:
    """Markets (last object wins per condition id) and bad rows, in listing order."""

    def __init__(self) -> None:
        self.markets: dict[str, Market] = {}
        self.bad: list[BadRow] = []
        self.pages = 0
        self.position = 0

    def add_page(self, items: list[Any]) -> None:
        self.pages += 1
        for item, obj in enumerate(items, start=1):
            self.position += 1
            try:
                market = market_from_gamma(obj, self.position)
            except BadRow as problem:
                self.bad.append(GammaBadRow(self.position, self.pages, item, problem))
                continue
            self.markets[market.condition_id] = market


class GammaSource(OverHttp):
    """Every market Gamma lists, through the process's rate controller."""

    name = "gamma"

    def __init__(self, settings: Settings, controller: AdaptiveRateController, url: str | None = None) -> None:
        self.url = (url or settings.gamma_url).rstrip("/")
        self._http = HttpSession(controller, settings.request_timeout_s, {"Accept": "application/json"})

    async def markets(self) -> tuple[list[Market], list[BadRow]]:
        """Every listed market (keyset paging, offset paging where keyset is unavailable) and the bad rows."""
        try:
            found = await self._keyset()
        except _KeysetUnavailable as why:
            logger.warning("Gamma keyset paging unavailable ({}); paging {} by offset", why, MARKETS_PATH)
            found = await self._offsets()
        logger.info("Gamma: {} markets, {} bad rows in {} pages", len(found.markets), len(found.bad), found.pages)
        return list(found.markets.values()), found.bad

    async def _keyset(self) -> _Collected:
        found, cursor, seen = _Collected(), None, set()
        while True:
            params = {**LISTING, "limit": str(PAGE_SIZE)} | ({CURSOR_PARAM: cursor} if cursor else {})
            items, cursor = await self._http.request("gamma", "GET", self.url + KEYSET_PATH, _keyset_page,
                                                     max_attempts=MAX_ATTEMPTS, params=params)
            if cursor in seen:
                raise _KeysetUnavailable(f"{NEXT_CURSOR_FIELD} {cursor[:40]!r} repeats: the cursor does not advance")
            found.add_page(items)
            if cursor is None:
                return found
            seen.add(cursor)

    async def _offsets(self) -> _Collected:
        found = _Collected()
        while True:
            params = {**LISTING, "limit": str(PAGE_SIZE), "offset": str(found.position)}
            items = await self._http.request("gamma", "GET", self.url + MARKETS_PATH, _offset_page,
                                             max_attempts=MAX_ATTEMPTS, params=params)
            if not items:
                return found
            found.add_page(items)


async def fetch_universe(settings: Settings, controller: AdaptiveRateController,
                         url: str | None = None) -> tuple[list[Market], list[BadRow]]:
    """Every market Gamma lists at ``url`` (default ``settings.gamma_url``) and the bad rows; the caller
    upserts them."""
    async with GammaSource(settings, controller, url) as source:
        return await source.markets()
