"""An entity table and graph-node's collection semantics over it: ``where``, ``orderBy``, ``first``/``skip``.

Rows are kept in ascending id order, so row sets are sorted int64 arrays and ``orderBy: id`` needs no sort.
A filter is answered by narrowing candidates cheaply first (id ranges by binary search, ``_in``/equality on
indexed columns by posting lists), then masking the remaining predicates chunk by chunk until the page is
full. The same path serves every filter combination; hot fetcher queries only touch their tokens' rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from clobjob.sim.columns import Column, IdColumn, IntColumn, NullColumn, plain_strings
from clobjob.sim.schema import split_filter_key

BLOCK = "_block"  # pseudo-column: the block at which each row last changed
_FIRST_CHUNK = 8192

Pred = tuple[str, str, Any]  # (field, operator, target)


class QueryError(Exception):
    """A query that graph-node rejects: one or more ``{"message": ..., "locations": [...]}`` errors."""

    def __init__(self, message: str, locations: list[dict[str, int]] | None = None,
                 *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"locations": locations, "message": message} if locations else {"message": message}]

    @classmethod
    def many(cls, errors: list[QueryError]) -> QueryError:
        """One exception carrying several errors, in order."""
        return cls(str(errors[0]), errors=[e for error in errors for e in error.errors])


@dataclass(eq=False)
class Table:
    """One entity type: its columns (``columns["id"]`` is an IdColumn) and each row's last-change block."""

    entity: str
    columns: dict[str, Column]
    blocks: Callable[[], np.ndarray]

    @property
    def ids(self) -> IdColumn:
        column = self.columns["id"]
        assert isinstance(column, IdColumn)
        return column

    @property
    def n(self) -> int:
        return self.ids.n

    @cached_property
    def block(self) -> IntColumn:
        """Per-row block numbers (for ``_change_block`` and pinned queries)."""
        return IntColumn(self.blocks(), kind="Int")

    def column(self, name: str) -> Column:
        return self.block if name == BLOCK else self.columns[name]

    def _values(self, rows: np.ndarray, selection: list[tuple[str, str]]) -> list[list[Any]]:
        return [
            [self.entity] * len(rows) if name == "__typename" else self.columns[name].render(rows)
            for _, name in selection
        ]

    def render(self, rows: np.ndarray, selection: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Objects for ``rows`` with the selected (response key, field) pairs."""
        keys = [key for key, _ in selection]
        return [dict(zip(keys, row, strict=True)) for row in zip(*self._values(rows, selection), strict=True)]

    def render_json(self, rows: np.ndarray, selection: list[tuple[str, str]]) -> list[str]:
        """The same objects as JSON texts, encoded column by column (the hot path: no dicts); a column of strings
        that need no escaping (hex ids, decimal numbers: most of them) goes into the template as it is."""
        parts, encoded = [], []
        for (key, name), column in zip(selection, self._values(rows, selection), strict=True):
            plain = (name != "__typename" and self.columns[name].plain) or plain_strings(column)
            parts.append(f"{json.dumps(key)}:" + ('"%s"' if plain else "%s"))
            encoded.append(column if plain else _json_values(column))
        template = "{" + ",".join(parts) + "}"
        return [template % row for row in zip(*encoded, strict=True)]


def _json_values(column: list[Any]) -> list[str]:
    """A column's values as JSON texts."""
    return [encode_basestring_ascii(v) if type(v) is str else json.dumps(v) for v in column]


@dataclass
class Span:
    """The contiguous candidate rows [lo, hi)."""

    lo: int
    hi: int


Candidates = Span | np.ndarray


@dataclass
class Selection:
    """The rows of one answered collection query and what answering it cost."""

    rows: np.ndarray
    in_rows: int = 0  # rows matched by ``_in`` lists before any other narrowing (heavy-query signal)


@dataclass
class _Run:
    table: Table
    in_rows: int = 0


def collection(table: Table, where: dict[str, Any] | None, *, order_by: str = "id", desc: bool = False,
               first: int = 100, skip: int = 0, pins: list[Pred] | None = None) -> Selection:
    """The page graph-node returns: filter, order by ``(order_by, id)`` in ``desc``/asc, then skip/first."""
    run = _Run(table)
    where, pins = where or {}, pins or []
    if order_by == "id":
        rows = _select(run, where, Span(0, table.n), (skip + first, desc), pins)
        rows = rows[::-1] if desc else rows
        return Selection(rows[skip:skip + first], run.in_rows)
    rows = _select(run, where, Span(0, table.n), None, pins)
    keys = table.column(order_by).sort_keys(rows)
    order = np.lexsort((rows, *reversed(keys)))
    order = order[::-1] if desc else order
    return Selection(rows[order[skip:skip + first]], run.in_rows)


def _predicates(table: Table, where: dict[str, Any]) -> list[Pred]:
    preds = []
    for key, target in where.items():
        if key in ("and", "or") or (key == "_change_block" and target is None):
            continue
        if key == "_change_block":
            preds.append((BLOCK, "gte", target["number_gte"]))
        else:
            name, op = split_filter_key(key, table.columns)
            preds.append((name, op, target))
    return preds


def _select(run: _Run, where: dict[str, Any], cand: Candidates, limit: tuple[int, bool] | None,
            extra: list[Pred]) -> np.ndarray:
    """Sorted rows of ``cand`` matching ``where`` and ``extra``; with ``limit=(k, desc)`` only the first/last
    k are needed. ``extra`` predicates are pushed into ``or`` branches so limited branches stay exact."""
    table = run.table
    columns = [key for key in where if key not in ("and", "or")]
    if "or" in where and columns:
        found = ", ".join(f"'{key}'" for key in columns)
        raise QueryError(
            "Cannot mix column filters with 'or' operator at the same level. "
            f"Found column filter(s) {found} alongside 'or' operator."
        )
    masks = []
    branching = where.get("or") is not None
    for name, op, target in _predicates(table, where) + ([] if branching else extra):
        column = table.column(name)
        if target is None:  # graph-node: `f: null` is IS NULL, `f_not: null` IS NOT NULL, others match nothing
            if op not in ("", "not") or (op == "not") == isinstance(column, NullColumn):
                cand = Span(0, 0)
            continue
        bounds = column.bounds(op, target) if isinstance(column, IdColumn) else None
        hits = None if bounds else column.index(op, target)
        if bounds:
            cand = _narrow(cand, *bounds)
        elif hits is not None:
            run.in_rows += len(hits) if op == "in" else 0
            cand = _intersect(cand, hits)
        else:
            masks.append((column, op, target))
    for sub in where.get("and") or ():
        cand = _select(run, sub, cand, None, [])
    if branching:
        parts = [_select(run, branch, cand, limit, extra) for branch in where["or"]]
        cand = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    return _filter(cand, masks, limit)


def _narrow(cand: Candidates, lo: int, hi: int) -> Candidates:
    if isinstance(cand, Span):
        return Span(max(cand.lo, lo), min(cand.hi, hi))
    return cand[np.searchsorted(cand, lo):np.searchsorted(cand, hi)]


def _intersect(cand: Candidates, rows: np.ndarray) -> np.ndarray:
    if isinstance(cand, Span):
        return rows[np.searchsorted(rows, cand.lo):np.searchsorted(rows, max(cand.lo, cand.hi))]
    return np.intersect1d(cand, rows, assume_unique=True)


def _chunks(cand: Candidates, desc: bool, size: int) -> Iterator[np.ndarray]:
    """Ascending slices of the candidates, walking from the front (or the back with ``desc``)."""
    lo, hi = (cand.lo, cand.hi) if isinstance(cand, Span) else (0, len(cand))
    while lo < hi:
        start, stop = (max(lo, hi - size), hi) if desc else (lo, min(hi, lo + size))
        yield np.arange(start, stop, dtype=np.int64) if isinstance(cand, Span) else cand[start:stop]
        lo, hi = (lo, start) if desc else (stop, hi)
        size *= 2


def _filter(cand: Candidates, masks: list[tuple[Column, str, Any]], limit: tuple[int, bool] | None) -> np.ndarray:
    """Apply mask predicates; with a limit stop as soon as enough rows are found from the wanted end."""
    want, desc = limit if limit else (None, False)
    size = max(4 * want, _FIRST_CHUNK) if want is not None else max(_length(cand), 1)
    found: list[np.ndarray] = []
    total = 0
    for chunk in _chunks(cand, desc, size):
        for column, op, target in masks:
            chunk = chunk[column.mask(op, target, chunk)]
        found.append(chunk)
        total += len(chunk)
        if want is not None and total >= want:
            break
    if not found:
        return np.empty(0, dtype=np.int64)
    rows = np.concatenate(found[::-1] if desc else found)
    if want is None:
        return rows
    return rows[-want:] if desc and want else rows[:want]


def _length(cand: Candidates) -> int:
    return max(cand.hi - cand.lo, 0) if isinstance(cand, Span) else len(cand)
