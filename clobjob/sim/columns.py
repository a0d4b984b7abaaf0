"""Column kinds of the simulator's in-memory entity tables.

Every column answers three questions about a set of row numbers, vectorised with numpy: render the
values as the GraphQL API returns them, which rows satisfy a graph-node filter operator, and the sort
keys for ``orderBy``. Rows of every table are stored in ascending ``id`` order (byte-wise), so a row
number is also the rank of its id.
"""

from __future__ import annotations

import bisect
import math
import operator
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)
EQUALITY_OPS = ("", "not", "in", "not_in")


_TESTS: dict[str, Callable[[Any, Any], bool]] = {
    "": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "in": lambda value, target: value in target,
    "contains": lambda value, target: target in value,
    "starts_with": lambda value, target: value.startswith(target),
    "ends_with": lambda value, target: value.endswith(target),
}


def predicate(op: str, target: Any) -> Callable[[Any], bool]:
    """A Python predicate for one graph-node filter operator (``""`` is equality, ``not`` inequality)."""
    if op.endswith("_nocase"):
        base = predicate(op.removesuffix("_nocase"), target.lower())
        return lambda value: base(value.lower())
    negated = op == "not" or op.startswith("not_")
    positive = "" if op == "not" else op.removeprefix("not_")
    test = _TESTS[positive]
    target = set(target) if positive == "in" else target
    return (lambda value: not test(value, target)) if negated else (lambda value: test(value, target))


def _clamp(value: int) -> int:
    return min(max(value, I64_MIN), I64_MAX)


def _positions(rows: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Positions in ``rows`` whose row number is in ``members``."""
    if not len(members):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.isin(rows, members))


def plain_strings(values: Sequence[Any]) -> bool:
    """Whether every value is a string JSON holds between quotes as it is (printable ASCII, no quote or backslash)."""
    try:
        joined = "".join(values)
    except TypeError:  # not only strings
        return False
    return joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined


class Column:
    """One field of an entity table; ``plain`` when it renders only strings JSON holds between quotes as they
    are (then a page need not be scanned for characters to escape)."""

    plain = False

    def render(self, rows: np.ndarray) -> list:
        """The JSON values of ``rows``, in the order given."""
        raise NotImplementedError

    def mask(self, op: str, target: Any, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` satisfy ``field_<op>: target`` (target is never None: callers handle null)."""
        values = self.render(rows)
        test = predicate(op, target)
        return np.fromiter((test(v) for v in values), dtype=bool, count=len(values))

    def sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Sort keys of ``rows``, most significant first."""
        raise NotImplementedError

    def index(self, op: str, target: Any) -> np.ndarray | None:
        """All matching rows (sorted) when the column has an index for ``op``, else None."""
        return None


_HEX_PREFIX = re.compile(r"0x([0-9a-f]{0,16})")


def hex_prefix(value: str) -> tuple[np.uint64, np.uint64] | None:
    """The range [low, high] of the first 64 bits of the ids that share the leading hex digits of a lower-case
    ``0x`` string (up to 16 of them; None if it is not one): any id whose first 64 bits fall outside compares
    with ``value`` as those bits do. numpy scalars, so that a search never converts the prefix array."""
    match = _HEX_PREFIX.match(value)
    if match is None:
        return None
    digits = match[1]
    return np.uint64(int(digits.ljust(16, "0"), 16)), np.uint64(int(digits.ljust(16, "f"), 16))


class IdColumn(Column):
    """Entity ids; rows are in id order, so comparisons are binary searches over lazily rendered ids.

    For ``0x`` hex ids, ``prefix`` (each row's first 64 bits, ascending) narrows a search to the few rows
    sharing the query's leading hex digits (``hex_prefix``) before any id is rendered.
    """

    def __init__(self, n: int, render: Callable[[np.ndarray], list[str]], prefix: np.ndarray | None = None,
                 *, plain: bool = False) -> None:
        self.n = n
        self._render = render
        self.prefix = prefix
        self.plain = plain
        self.rank = lru_cache(maxsize=4096)(self._rank)  # a unit's bounds are asked at every page

    def render(self, rows: np.ndarray) -> list[str]:
        return self._render(rows)

    def _at(self, row: int) -> str:
        return self._render(np.array([row], dtype=np.int64))[0]

    def _rank(self, value: str, *, right: bool = False) -> int:
        """Number of ids < value (or <= value with ``right``), byte-wise."""
        lo, hi = 0, self.n
        if self.prefix is not None and (keys := hex_prefix(value)) is not None:
            lo, hi = (int(np.searchsorted(self.prefix, keys[0], "left")),
                      int(np.searchsorted(self.prefix, keys[1], "right")))
        find = bisect.bisect_right if right else bisect.bisect_left
        return find(range(self.n), value, lo, hi, key=self._at)

    def bounds(self, op: str, target: str) -> tuple[int, int] | None:
        """The row range satisfying an equality/range operator, or None for other operators."""
        match op:
            case "":
                return self.rank(target), self.rank(target, right=True)
            case "gt":
                return self.rank(target, right=True), self.n
            case "gte":
                return self.rank(target), self.n
            case "lt":
                return 0, self.rank(target)
            case "lte":
                return 0, self.rank(target, right=True)
        return None

    def index(self, op: str, target: Any) -> np.ndarray | None:
        if op != "in":
            return None
        found = {self.rank(v) for v in target}
        return np.array(sorted(r for r in found if r < self.n and self._at(r) in target), dtype=np.int64)

    def sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return (rows,)


class IntColumn(Column):
    """Exact integers (BigInt, Int, or BigDecimal stored in units of 10**-scale).

    Values are int64; the rare values outside int64 live in ``big`` (row -> int) with I64_MAX in the array.
    """

    def __init__(self, values: np.ndarray, big: dict[int, int] | None = None, *, kind: str = "BigInt",
                 scale: int = 0) -> None:
        self.values = values
        self.big = big or {}
        self.kind = kind
        self.scale = scale
        self.plain = kind != "Int"  # BigInt and BigDecimal render as decimal strings
        self._big_rows = np.array(sorted(self.big), dtype=np.int64)

    @classmethod
    def from_ints(cls, values: list[int], *, kind: str = "BigInt", scale: int = 0) -> IntColumn:
        """A column holding exact Python ints (those beyond int64 go to ``big``)."""
        big = {i: v for i, v in enumerate(values) if v >= I64_MAX}
        return cls(np.array([min(v, I64_MAX) for v in values], dtype=np.int64), big, kind=kind, scale=scale)

    def take(self, rows: np.ndarray) -> IntColumn:
        """The column restricted to ``rows``, renumbered from 0."""
        big = {int(p): self.big[int(rows[p])] for p in _positions(rows, self._big_rows)}
        return IntColumn(self.values[rows], big, kind=self.kind, scale=self.scale)

    def group_sums(self, rows: np.ndarray, keys: np.ndarray, size: int) -> list[int]:
        """Exact sums of the values of ``rows`` grouped by ``keys`` (0 <= key < size)."""
        values = self.values[rows].copy()
        big = _positions(rows, self._big_rows)
        values[big] = 0
        sums = np.zeros(size, dtype=np.int64)
        np.add.at(sums, keys, values)
        out = sums.tolist()
        for pos in big.tolist():
            out[keys[pos]] += self.big[int(rows[pos])]
        return out

    def exact(self, rows: np.ndarray) -> list[int]:
        """The exact Python ints of ``rows``."""
        out = self.values[rows].tolist()
        for pos in _positions(rows, self._big_rows):
            out[pos] = self.big[int(rows[pos])]
        return out

    def render(self, rows: np.ndarray) -> list:
        values = self.exact(rows)
        if self.kind == "Int":
            return values
        if self.kind == "BigDecimal":
            return [decimal_string(v, self.scale) for v in values]
        return list(map(str, values))

    def _scaled(self, target: Any) -> Fraction:
        return Fraction(target) * 10**self.scale

    def mask(self, op: str, target: Any, rows: np.ndarray) -> np.ndarray:
        vals = self.values[rows]
        if op in ("in", "not_in"):
            scaled = {self._scaled(t) for t in target}
            wanted = [_clamp(int(t)) for t in scaled if t.denominator == 1]
            out = np.isin(vals, np.array(wanted, dtype=np.int64))
            out = ~out if op == "not_in" else out
            exact = predicate(op, scaled)
        else:
            t = self._scaled(target)
            out = _compare(vals, op, t)
            exact = predicate(op, t)
        for pos in _positions(rows, self._big_rows):
            out[pos] = exact(self.big[int(rows[pos])])
        return out

    def sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        vals = self.values[rows]
        if not self.big:
            return (vals,)
        ranks = {v: i + 1 for i, v in enumerate(sorted(set(self.big.values())))}
        minor = np.zeros(len(rows), dtype=np.int64)
        for pos in _positions(rows, self._big_rows):
            minor[pos] = ranks[self.big[int(rows[pos])]]
        return vals, minor


def _compare(vals: np.ndarray, op: str, t: Fraction) -> np.ndarray:
    """``vals <op> t`` for int64 values and an exact threshold (rows holding I64_MAX are fixed by callers)."""
    match op:
        case "" | "not":
            out = vals == _clamp(int(t)) if t.denominator == 1 else np.zeros(len(vals), dtype=bool)
            return ~out if op == "not" else out
        case "gt":
            return vals > _clamp(math.floor(t))
        case "gte":
            return vals >= _clamp(math.ceil(t))
        case "lt":
            return vals < _clamp(math.ceil(t))
        case "lte":
            return vals <= _clamp(math.floor(t))
    raise ValueError(f"operator {op!r} does not apply to numbers")


def decimal_string(units: int, scale: int) -> str:
    """``units * 10**-scale`` as graph-node prints a BigDecimal: plain digits, no trailing zeros."""
    if scale == 0:
        return str(units)
    whole, frac = divmod(abs(units), 10**scale)
    text = f"{whole}.{frac:0{scale}d}".rstrip("0").rstrip(".")
    return "-" + text if units < 0 else text


class CodeColumn(Column):
    """A column with few distinct values (addresses, asset ids, condition ids) stored as int32 codes.

    ``values`` are str (GraphQL String) or int (BigInt). Equality and ``_in`` use a lazily built
    inverted index; other operators evaluate once per distinct value.
    """

    def __init__(self, codes: np.ndarray, values: Sequence[Any]) -> None:
        self.codes = codes
        self.values = values
        self._rows_of = lru_cache(maxsize=256)(self._union)  # a pager asks for the same tokens page after page

    @cached_property
    def _labels(self) -> np.ndarray:
        return np.array([str(v) for v in self.values], dtype=object)

    @cached_property
    def plain(self) -> bool:  # type: ignore[override]
        return plain_strings(self._labels.tolist())

    def render(self, rows: np.ndarray) -> list[str]:
        return self._labels[self.codes[rows]].tolist()

    @cached_property
    def _code_of(self) -> dict[Any, int]:
        return {v: i for i, v in enumerate(self.values)}

    @cached_property
    def _postings(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.codes, kind="stable")
        offsets = np.searchsorted(self.codes[order], np.arange(len(self.values) + 1))
        return order, offsets

    @cached_property
    def _rank(self) -> np.ndarray:
        rank = np.empty(len(self.values), dtype=np.int64)
        rank[sorted(range(len(self.values)), key=self.values.__getitem__)] = np.arange(len(self.values))
        return rank

    def codes_of(self, targets: Any) -> list[int]:
        """Codes of the listed values that occur in the column's dictionary."""
        return [self._code_of[t] for t in targets if t in self._code_of]

    def index(self, op: str, target: Any) -> np.ndarray | None:
        if op not in ("", "in"):
            return None
        return self._rows_of(tuple(sorted(self.codes_of([target] if op == "" else set(target)))))

    def _union(self, codes: tuple[int, ...]) -> np.ndarray:
        """The sorted rows holding any of ``codes`` (read-only: it is shared by every query that asks)."""
        order, offsets = self._postings
        parts = [order[offsets[c]:offsets[c + 1]] for c in codes]
        rows = np.sort(np.concatenate(parts)) if len(parts) > 1 else np.array(parts[0] if parts else (), np.int64)
        rows.flags.writeable = False
        return rows

    def count(self, targets: Any) -> int:
        """Rows whose value is one of ``targets``."""
        _, offsets = self._postings
        return sum(int(offsets[c + 1] - offsets[c]) for c in self.codes_of(set(targets)))

    def mask(self, op: str, target: Any, rows: np.ndarray) -> np.ndarray:
        lut = np.zeros(len(self.values), dtype=bool)
        if op in EQUALITY_OPS:
            lut[self.codes_of([target] if op in ("", "not") else target)] = True
            if op.startswith("not"):
                lut = ~lut
        else:
            test = predicate(op, target)
            lut = np.fromiter((test(v) for v in self.values), dtype=bool, count=len(self.values))
        return lut[self.codes[rows]]

    def sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return (self._rank[self.codes[rows]],)


class BytesColumn(Column):
    """32-byte values (hashes) computed on demand from ``words(rows) -> (len, 4) uint64``. The last rows rendered
    are kept: a fill's id renders its transaction and order hashes, which the same page also selects."""

    plain = True

    def __init__(self, words: Callable[[np.ndarray], np.ndarray]) -> None:
        self._words = words
        self._last: tuple[np.ndarray | None, list[str]] = (None, [])

    def raw(self, rows: np.ndarray) -> bytes:
        """The concatenated 32-byte big-endian values of ``rows``."""
        return self._words(rows).astype(">u8").tobytes()

    def render(self, rows: np.ndarray) -> list[str]:
        last, rendered = self._last
        if rows is not last:
            text = self.raw(rows).hex()
            rendered = ["0x" + text[i:i + 64] for i in range(0, len(text), 64)]
            self._last = (rows, rendered)
        return list(rendered)

    def mask(self, op: str, target: Any, rows: np.ndarray) -> np.ndarray:
        targets = [target] if op in ("", "not") else target
        if op in EQUALITY_OPS and all(len(t) == 32 for t in targets):
            keys = np.frombuffer(self.raw(rows), dtype="S32")
            out = np.isin(keys, np.array(targets, dtype="S32"))
            return ~out if op.startswith("not") else out
        raw, test = self.raw(rows), predicate(op, target)
        return np.fromiter((test(raw[i:i + 32]) for i in range(0, len(raw), 32)), dtype=bool, count=len(rows))

    def sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.frombuffer(self.raw(rows), dtype="S32"),)


class NullColumn(Column):
    """A nullable field that is always null (``MarketData.outcomeIndex``): no comparison with a value holds."""

    def render(self, rows: np.ndarray) -> list[None]:
        return [None] * len(rows)

    def mask(self, op: str, target: Any, rows: np.ndarray) -> np.ndarray:
        return np.zeros(len(rows), dtype=bool)

    def sort_keys(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.zeros(len(rows), dtype=np.int64),)
