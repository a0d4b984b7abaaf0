"""The market universe from a Polymarket Gamma export (JSON array or JSONL of market objects).

Every field is validated with its line (shared/reference/data-sources.md §3): ``conditionId`` a condition id
(``models.normalize_condition_id``); ``clobTokenIds`` exactly two distinct outcome token ids (a JSON-encoded
string of a list, as the API sends it, or a list); ``startDate``/``createdAt`` and ``endDate`` ISO 8601 dates
within what a ClickHouse DateTime stores; ``volumeNum`` (else ``volume``) a finite number ≥ 0; ``closed`` and
``negRisk`` JSON booleans (the API sends them as booleans, so a string is refused); ``question`` and ``slug``
strings of valid Unicode. A missing or null optional field takes its default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from clobjob.errors import BadInput
from clobjob.models import (
    STORABLE_TIMES,
    USDC_ASSET_ID,
    BadValue,
    JsonError,
    Market,
    json_rows,
    normalize_condition_id,
    normalize_token_id,
)

MAX_BAD_BEFORE_FIRST_MARKET = 1000
"""A file whose first this-many rows are all bad is not a Gamma export: stop reading it."""


class BadRow(ValueError):
    """A market object that cannot be loaded, located by file line and field (None: the row as a whole)."""

    def __init__(self, line: int, field: str | None, message: str) -> None:
        super().__init__(f"line {line}: field {field}: {message}" if field else f"line {line}: {message}")
        self.line, self.field = line, field


def _shown(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadValue(f"{_shown(value)} is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadValue(f"{_shown(value)} holds a lone surrogate: not valid Unicode") from None
    return value


def _condition_id(value: Any) -> str:
    if value is None:
        raise BadValue("missing")
    return normalize_condition_id(value)


def _token_ids(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadValue(f"{_shown(value)} is not a JSON-encoded list") from None
    if not isinstance(value, list):
        raise BadValue(f"{_shown(value)} is not a list of token ids")
    if len(value) != 2:
        raise BadValue(f"{_shown(value)} has {len(value)} token id(s): a market has two outcome tokens")
    tokens = tuple(normalize_token_id(v) for v in value)
    if USDC_ASSET_ID in tokens:
        raise BadValue(f"{_shown(value)}: token id 0 is the USDC collateral, not an outcome token")
    if tokens[0] == tokens[1]:
        raise BadValue(f"{_shown(value)} lists token {tokens[0]} twice")
    return tokens


def _date(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise BadValue(f"{_shown(value)} is not an ISO 8601 date")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise BadValue(f"{_shown(value)} is not an ISO 8601 date") from None
    low, high = STORABLE_TIMES
    if not low <= parsed <= high:
        raise BadValue(f"{_shown(value)} is outside the dates ClickHouse stores "
                       f"({low:%Y-%m-%d} to {high:%Y-%m-%d %H:%M:%S} UTC)")
    return parsed


def _volume(value: Any) -> float:
    if value in (None, ""):
        return 0.0
    if not isinstance(value, (int, float, Decimal, str)) or isinstance(value, bool):
        raise BadValue(f"{_shown(value)} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise BadValue(f"{_shown(value)} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise BadValue(f"{_shown(value)} is not a finite number ≥ 0")
    return number


def _flag(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadValue(f"{_shown(value)} is not a JSON boolean (true or false)")
    return value


def market_from_gamma(obj: Any, line: int) -> Market:
    """One Gamma market object as a ``Market``; raises ``BadRow`` naming the line, the field and the value."""
    if not isinstance(obj, dict):
        raise BadRow(line, None, f"expected a JSON object (a Gamma market), got {_shown(obj)}")
    start_field = "startDate" if obj.get("startDate") not in (None, "") else "createdAt"
    volume_field = "volumeNum" if obj.get("volumeNum") is not None else "volume"
    fields: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "condition_id": ("conditionId", _condition_id),
        "token_ids": ("clobTokenIds", _token_ids),
        "question": ("question", _text),
        "slug": ("slug", _text),
        "start_date": (start_field, _date),
        "end_date": ("endDate", _date),
        "closed": ("closed", _flag),
        "volume": (volume_field, _volume),
        "neg_risk": ("negRisk", _flag),
    }
    values = {}
    for name, (field, parse) in fields.items():
        try:
            values[name] = parse(obj.get(field))
        except BadValue as exc:
            raise BadRow(line, field, str(exc)) from None
    return Market(**values, source="gamma")


def read_gamma_file(path: str | Path) -> tuple[list[Market], list[BadRow]]:
    """Parse a Gamma export; returns the good markets (last one wins per condition id) and the bad rows.

    ``BadInput`` when the file cannot be read, is a JSON array that is not JSON, or holds no market at all.
    """
    markets: dict[str, Market] = {}
    bad: list[BadRow] = []
    rows = 0
    try:
        for line, obj in json_rows(path):
            rows += 1
            try:
                if isinstance(obj, JsonError):
                    raise BadRow(line, None, str(obj).removeprefix(f"line {line}: "))
                market = market_from_gamma(obj, line)
            except BadRow as problem:
                bad.append(problem)
                if not markets and len(bad) >= MAX_BAD_BEFORE_FIRST_MARKET:
                    raise BadInput(f"{path}: the first {len(bad):,} rows are all bad (first: {bad[0]}): "
                                   "not a Gamma export of market objects") from None
                continue
            markets[market.condition_id] = market
    except JsonError as exc:
        raise BadInput(f"{path}: {exc}") from None
    except BadValue as exc:
        raise BadInput(str(exc)) from None
    if not markets:
        found = f"{rows:,} row(s), all bad (first: {bad[0]})" if bad else "nothing"
        raise BadInput(f"no market in {path}: {found}; expected a JSON array or JSONL of Gamma market objects")
    return list(markets.values()), bad
