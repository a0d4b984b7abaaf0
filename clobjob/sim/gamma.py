"""Polymarket's Gamma market listing, answered from a dataset's ``markets`` (the objects ``sim export`` writes).

``GET /markets`` pages by ``limit``/``offset`` and answers a JSON array; ``GET /markets/keyset`` pages by
cursor and answers ``{"markets": [...], "next_cursor": "..."}``. What the real service does, as its public
clients document it (nautilus-trader's Polymarket adapter and its issue #4086):

- a page holds at most 100 markets; a larger ``limit`` is capped silently;
- ``/markets`` refuses an offset beyond 10,000 with HTTP 422 (the real body's text is not public: this one
  follows Gamma's ``{"type", "error"}`` error shape and names the keyset endpoint);
- ``/markets/keyset`` takes the cursor as ``after_cursor``, leaves ``next_cursor`` out on the last page and
  rejects ``offset``;
- filters ``id``, ``condition_ids``, ``clob_token_ids`` (repeated or comma-separated) and ``closed``;
  ``order`` (one market field) with ``ascending``; an unknown order field is a 422 "order fields are not valid".

A market listed in ``bad_rows`` (its position in the dataset) is served without ``clobTokenIds``, as Gamma
lists markets that have no order book.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

MARKETS_PATH = "/markets"
KEYSET_PATH = "/markets/keyset"
CURSOR_PARAM = "after_cursor"
NEXT_CURSOR_FIELD = "next_cursor"
MAX_LIMIT = 100
MAX_OFFSET = 10_000
ORDER_FIELDS = ("id", "volumeNum", "endDate", "closedTime", "question", "slug", "conditionId")
_FILTERS = {"id": "id", "condition_ids": "conditionId", "clob_token_ids": "clobTokenIds"}


@dataclass
class Listing:
    """One answer: HTTP status, JSON body and how many markets it holds."""

    status: int
    body: str
    rows: int = 0


def _error(message: str, status: int = 422) -> Listing:
    return Listing(status, json.dumps({"type": "validation error", "error": message}))


class _Invalid(Exception):
    """A request parameter Gamma would refuse."""


def _values(query: MultiMapping[str], name: str) -> set[str]:
    return {part.strip() for value in query.getall(name, ()) for part in value.split(",") if part.strip()}


def _boolean(query: MultiMapping[str], name: str) -> bool | None:
    value = query.get(name)
    if value is None:
        return None
    if value.lower() not in ("true", "false"):
        raise _Invalid(f"{name}: {value!r} is not a boolean")
    return value.lower() == "true"


def _integer(query: MultiMapping[str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise _Invalid(f"{name}: {value!r} is not a non-negative integer")
    return int(value)


def _tokens(market: Mapping[str, Any]) -> set[str]:
    try:
        return set(json.loads(market.get("clobTokenIds") or "[]"))
    except ValueError:
        return set()


class GammaApi:
    """Answers Gamma ``/markets`` and ``/markets/keyset`` requests for one list of markets."""

    def __init__(self, markets: Sequence[dict[str, Any]]) -> None:
        self._markets = markets
        self._orders: dict[tuple[str, bool], list[int]] = {}

    def answer(self, path: str, query: MultiMapping[str], bad_rows: Sequence[int] = (),
               listed: int | None = None) -> Listing:
        """The answer to ``GET path?query``; ``bad_rows`` are positions served malformed; with ``listed`` only the
        first ``listed`` markets exist."""
        try:
            keyset = path.rstrip("/") == KEYSET_PATH
            if keyset and "offset" in query:
                raise _Invalid("offset is not supported by keyset pagination: use after_cursor")
            positions = self._select(query)
            if listed is not None:
                positions = [p for p in positions if p < listed]
            limit = min(_integer(query, "limit", MAX_LIMIT), MAX_LIMIT)
            if keyset:
                start = self._cursor(query.get(CURSOR_PARAM))
            else:
                start = _integer(query, "offset", 0)
                if start > MAX_OFFSET:
                    raise _Invalid(f"offset {start} exceeds the maximum of {MAX_OFFSET}: use {KEYSET_PATH}")
        except _Invalid as exc:
            return _error(str(exc))
        page = positions[start:start + limit]
        bad = set(bad_rows)
        items = [self._render(p, p in bad) for p in page]
        if not keyset:
            return Listing(200, "[" + ",".join(items) + "]", len(items))
        payload = '{"markets":[' + ",".join(items) + "]"
        if start + limit < len(positions):
            payload += f',"{NEXT_CURSOR_FIELD}":{json.dumps(_encode_cursor(start + limit))}'
        return Listing(200, payload + "}", len(items))

    def _render(self, position: int, bad: bool) -> str:
        market = self._markets[position]
        if bad:
            market = {k: v for k, v in market.items() if k != "clobTokenIds"}
        return json.dumps(market, separators=(",", ":"))

    def _select(self, query: MultiMapping[str]) -> list[int]:
        """Positions of the markets the filters keep, in the requested order."""
        order = query.get("order") or "id"
        if order not in ORDER_FIELDS:
            raise _Invalid("order fields are not valid")
        ascending = _boolean(query, "ascending")
        positions = self._ordered(order, True if ascending is None else ascending)
        closed = _boolean(query, "closed")
        wanted = {name: _values(query, name) for name in _FILTERS}
        if closed is None and not any(wanted.values()):
            return positions
        ids, conditions, tokens = wanted["id"], wanted["condition_ids"], wanted["clob_token_ids"]
        markets = self._markets
        return [
            p for p in positions
            if (closed is None or markets[p]["closed"] is closed)
            and (not ids or markets[p]["id"] in ids)
            and (not conditions or markets[p]["conditionId"] in conditions)
            and (not tokens or not tokens.isdisjoint(_tokens(markets[p])))
        ]

    def _ordered(self, order: str, ascending: bool) -> list[int]:
        found = self._orders.get((order, ascending))
        if found is None:
            def key(position: int) -> tuple[Any, ...]:
                market = self._markets[position]
                value = int(market["id"]) if order == "id" else market.get(order)
                return (value is None, value if value is not None else 0, int(market["id"]))

            found = sorted(range(len(self._markets)), key=key, reverse=not ascending)
            self._orders[(order, ascending)] = found
        return found

    @staticmethod
    def _cursor(cursor: str | None) -> int:
        if not cursor:
            return 0
        try:
            start = json.loads(base64.urlsafe_b64decode(cursor.encode()))["after"]
        except (ValueError, binascii.Error, KeyError, TypeError):
            raise _Invalid(f"{CURSOR_PARAM}: {cursor[:40]!r} is not a cursor this endpoint made") from None
        if type(start) is not int or start < 0:
            raise _Invalid(f"{CURSOR_PARAM}: {cursor[:40]!r} is not a cursor this endpoint made")
        return start


def _encode_cursor(start: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": start}).encode()).decode()
