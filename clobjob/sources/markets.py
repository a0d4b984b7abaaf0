"""The market universe from a Polymarket Gamma export (JSON array or JSONL of market objects)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clobjob.errors import BadInput
from clobjob.models import (
    BadValue,
    Market,
    json_array_items,
    normalize_condition_id,
    normalize_token_id,
)


class BadRow(ValueError):
    """A market object that cannot be loaded, located by file line and field."""

    def __init__(self, line: int, field: str, message: str) -> None:
        super().__init__(f"line {line}: field {field}: {message}")
        self.line, self.field = line, field


def _token_ids(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadValue(f"{value[:80]!r} is not a JSON-encoded list") from exc
    if not isinstance(value, list) or not value:
        raise BadValue(f"{str(value)[:80]!r} is not a non-empty list of token ids")
    return tuple(normalize_token_id(v) for v in value)


def _date(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise BadValue(f"{value!r} is not an ISO 8601 date")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadValue(f"{value!r} is not an ISO 8601 date") from exc
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _volume(obj: dict[str, Any]) -> float:
    value = obj.get("volumeNum")
    if value is None:
        value = obj.get("volume")
    if value in (None, ""):
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise BadValue(f"{value!r} is not a number") from exc


def market_from_gamma(obj: Any, line: int) -> Market:
    """One Gamma market object as a ``Market``; raises ``BadRow`` naming the line and field."""
    if not isinstance(obj, dict):
        raise BadRow(line, "-", f"expected a JSON object, got {type(obj).__name__}")
    parsers = {
        "conditionId": lambda: normalize_condition_id(obj.get("conditionId") or ""),
        "clobTokenIds": lambda: _token_ids(obj.get("clobTokenIds")),
        "startDate": lambda: _date(obj.get("startDate") or obj.get("createdAt")),
        "endDate": lambda: _date(obj.get("endDate")),
        "volumeNum": lambda: _volume(obj),
    }
    values = {}
    for field, parse in parsers.items():
        try:
            values[field] = parse()
        except BadValue as exc:
            raise BadRow(line, field, str(exc)) from None
    return Market(
        condition_id=values["conditionId"],
        token_ids=values["clobTokenIds"],
        question=str(obj.get("question") or ""),
        slug=str(obj.get("slug") or ""),
        start_date=values["startDate"],
        end_date=values["endDate"],
        closed=bool(obj.get("closed", False)),
        volume=values["volumeNum"],
        neg_risk=bool(obj.get("negRisk", False)),
        source="gamma",
    )


def _json_objects(text: str) -> list[tuple[int, Any]]:
    """(line, value) of each element of a JSON array, or of each non-empty line of JSONL."""
    if text.lstrip().startswith("["):
        try:
            return json_array_items(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"line {exc.lineno}: invalid JSON: {exc.msg}") from None
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                rows.append((number, json.loads(raw)))
            except json.JSONDecodeError as exc:
                rows.append((number, BadRow(number, "-", f"invalid JSON: {exc.msg}")))
    return rows


def read_gamma_file(path: str | Path) -> tuple[list[Market], list[BadRow]]:
    """Parse a Gamma export; returns the good markets (last one wins per condition id) and the bad rows."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read markets file {str(path)!r}: {exc}") from None
    markets: dict[str, Market] = {}
    bad: list[BadRow] = []
    for line, obj in _json_objects(text):
        try:
            if isinstance(obj, BadRow):
                raise obj
            market = market_from_gamma(obj, line)
        except BadRow as problem:
            bad.append(problem)
            continue
        markets[market.condition_id] = market
    return list(markets.values()), bad
