"""Domain models shared by every room: identifiers, markets, fills, market completeness, work units, progress.

Identifiers are normalised once, here, at the edge: hex is lower-case with ``0x``, condition ids are
32 bytes (64 hex digits, left-padded), token ids are canonical decimal strings. Amounts are exact ints.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from itertools import repeat
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import ijson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from clobjob.errors import BadFill

USDC_ASSET_ID = "0"
STORABLE_TIMES = (datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2106, 2, 7, 6, 28, 15, tzinfo=timezone.utc))
"""The first and last instant a ClickHouse ``DateTime`` holds (seconds since the epoch in a UInt32)."""

# Exchange contracts (shared/reference/data-sources.md §2), lower-cased: a fill whose taker is one of
# these is the taker order's own leg of a match ("relay leg").
EXCHANGES = {
    "0x4bfb41d5b3570defd03c39a9a4d8de6bd8b8982e": 1,  # CTF Exchange v1
    "0xc5d563a36ae78145c45a50134d48a1215220f80a": 1,  # NegRisk Exchange v1
    "0xe111180000d2663c0091e4f400237545b87b996b": 2,  # CTF Exchange v2
    "0xe2222d279d744050d28e00520010520000310f59": 2,  # NegRisk Exchange v2
}
EXCHANGE_FIRST_BLOCKS = dict(zip(EXCHANGES, (33_605_403, 50_505_492, 84_902_353, 85_058_176), strict=True))
"""Each exchange contract's deploy block on Polygon (no log of it is older)."""
V2_CUTOVER = datetime(2026, 4, 28, 11, tzinfo=timezone.utc)
"""The CLOB v2 cutover (data-sources.md §2): the last v1 fill on the main v1 exchanges. The subgraph holds no fill
after it; a market that starts after it trades on the v2 exchanges only."""
BLOCK_S = 2
"""About one Polygon block, in seconds (to tell how old a block is, never a fill's time)."""
V2_CURRENT_S = 3600
"""The v2 block ranges count as reaching the safe head while the last block they are complete through is at most
this old (the reorg lag, 128 blocks ≈ 4 min by default, and the time between two backfills of new blocks)."""

_HEX = re.compile(r"^(0x)?[0-9a-fA-F]+$")
_DEC = re.compile(r"^[0-9]+$")
_AT_OFFSET = re.compile(r" at \d+$")
_IJSON = ijson.get_backend("python")
_BOM = "\ufeff".encode()


class BadValue(ValueError):
    """An input value that cannot be normalised; the message names the value."""


def normalize_hex(value: str, *, nbytes: int | None = None, what: str = "hex value") -> str:
    """Lower-case ``0x`` hex; with ``nbytes`` left-pad to exactly that many bytes (longer is an error)."""
    if not isinstance(value, str) or not _HEX.match(value.strip()):
        raise BadValue(f"{what} {value!r} is not hex")
    digits = value.strip().lower().removeprefix("0x")
    if nbytes is not None:
        if len(digits) > 2 * nbytes:
            raise BadValue(f"{what} {value!r} is longer than {nbytes} bytes")
        digits = digits.rjust(2 * nbytes, "0")
    return "0x" + digits


CONDITION_ID_MIN_DIGITS = 62
"""Fewest hex digits a condition id may have: some exports drop its leading zeros (62 vs 64 digits seen in real
data, shared/reference/data-sources.md §1); anything shorter is not a condition id."""


def normalize_condition_id(value: str) -> str:
    """A condition id as 0x + 64 lower-case hex digits (left-padded from at least ``CONDITION_ID_MIN_DIGITS``)."""
    normalized = normalize_hex(value, nbytes=32, what="condition id")
    digits = len(value.strip().lower().removeprefix("0x"))
    if digits < CONDITION_ID_MIN_DIGITS:
        raise BadValue(f"condition id {value!r} has {digits} hex digits: a condition id has 64 "
                       f"({CONDITION_ID_MIN_DIGITS} or 63 when an export dropped leading zeros)")
    return normalized


def normalize_token_id(value: str | int) -> str:
    """A token id (uint256) as its canonical decimal string; accepts decimal or 0x-hex."""
    if isinstance(value, bool):
        raise BadValue(f"token id {value!r} is not an integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DEC.match(value.strip()):
        number = int(value.strip())
    elif isinstance(value, str) and value.strip().lower().startswith("0x") and _HEX.match(value.strip()):
        number = int(value.strip(), 16)
    else:
        raise BadValue(f"token id {value!r} is not a decimal or hex integer")
    if not 0 <= number < 2**256:
        raise BadValue(f"token id {value!r} is outside uint256")
    return str(number)


class JsonError(BadValue):
    """Input that is not the JSON it should be, located by its line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


JSON_CHUNK = 1 << 16
"""Bytes read at a time: a longer line is read in pieces, so memory stays bounded."""
MAX_LINE_BYTES = 16 << 20
"""A line of one-value-per-line input longer than this is rejected unread (it cannot be a market or an id)."""


def json_line(text: str) -> Any:
    """One line of JSONL: numbers with a fraction or exponent as ``Decimal`` (as in arrays); NaN and
    Infinity, which are not JSON, are refused."""
    return json.loads(text, parse_float=Decimal, parse_constant=_not_json)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_rows(path: str | Path, *, parse_line: Callable[[str], Any] = json_line) -> Iterator[tuple[int, Any]]:
    """(line, value) of each element of the JSON array in the file, or — when it does not start with ``[`` — of
    each non-blank line converted by ``parse_line`` (default: JSONL). Linear time; memory holds one element.

    Numbers with a fraction or exponent come as ``Decimal`` (``1e309`` is a value to reject, not a crash).
    An array that is not JSON raises ``JsonError`` at its first fault (nothing after it can be located); a line
    that ``parse_line`` refuses (``ValueError``), is not UTF-8 or is longer than ``MAX_LINE_BYTES`` is yielded as
    a ``JsonError`` in place of its value, and reading goes on. ``BadValue`` when the file cannot be read.
    """
    try:
        with open(path, "rb") as file:
            first = file.read(JSON_CHUNK).removeprefix(_BOM).lstrip()[:1]
            file.seek(0)
            yield from (_array_items(file) if first == b"[" else _line_values(file, parse_line))
    except OSError as exc:
        raise BadValue(f"cannot read {path}: {exc.strerror or exc}") from None


class _Lines:
    """A binary file read for ijson one line (at most ``JSON_CHUNK`` bytes) at a time; ``line`` is the line the
    last piece is on, so every parse event is located by the line it occurs on."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.line, self._next = file, 0, 1

    def read(self, size: int) -> bytes:
        if size == 0:  # ijson probes bytes-or-text with an empty read
            return b""
        piece = self.file.readline(JSON_CHUNK)
        self.line = self._next
        self._next += piece.endswith(b"\n")
        return piece


def _array_items(file: BinaryIO) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array, each with the line it starts on (ijson's pure-Python parser:
    the C one turns lone surrogate escapes into '?' or into other characters)."""
    if file.read(len(_BOM)) != _BOM:
        file.seek(0)
    lines = _Lines(file)
    depth, start, builder = 0, 0, ijson.ObjectBuilder()
    try:
        for prefix, event, value in _IJSON.parse(lines):
            if depth == 0:
                if prefix != "item":
                    continue  # the array's own start and end
                start, builder = lines.line, ijson.ObjectBuilder()
            builder.event(event, value)
            depth += event in ("start_map", "start_array")
            depth -= event in ("end_map", "end_array")
            if depth == 0:
                yield start, builder.value
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise JsonError(lines.line, f"invalid JSON: {_AT_OFFSET.sub('', str(exc).splitlines()[0])}") from None


def _line_values(file: BinaryIO, parse_line: Callable[[str], Any]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(iter(lambda: file.readline(MAX_LINE_BYTES), b""), start=1):
        if not raw.endswith(b"\n") and len(raw) == MAX_LINE_BYTES:
            while (rest := file.readline(JSON_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, JsonError(number, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
            continue
        try:
            text = raw.decode("utf-8").strip()
            if text:
                yield number, parse_line(text.removeprefix("\ufeff") if number == 1 else text)
        except UnicodeDecodeError:
            yield number, JsonError(number, "not valid UTF-8")
        except json.JSONDecodeError as exc:
            yield number, JsonError(number, f"invalid JSON at column {exc.colno}: {exc.msg}")
        except ValueError as exc:
            yield number, JsonError(number, f"invalid JSON: {exc}")


def as_utc(value: datetime | None) -> datetime | None:
    """A datetime in UTC; naive values (as ClickHouse returns DateTime('UTC')) are taken as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


ConditionId = Annotated[str, AfterValidator(normalize_condition_id)]
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
TokenId = Annotated[str, AfterValidator(normalize_token_id)]


class Side(str, Enum):
    BUY = "BUY"
    SELL = "SELL"


class Market(BaseModel):
    """One market (condition) of the universe with its outcome token ids and Gamma metadata."""

    model_config = ConfigDict(frozen=True)

    condition_id: ConditionId
    token_ids: tuple[TokenId, ...]
    question: str = ""
    slug: str = ""
    start_date: UtcDatetime | None = None
    end_date: UtcDatetime | None = None
    closed: bool = False
    volume: float = 0.0
    neg_risk: bool = False
    source: str = "gamma"


class MarketStatus(str, Enum):
    """How complete a market's stored fills are: the ONE classification behind diagnose, plan, status and verify.

    Per market of the universe (a ``markets`` row with token ids):

    - ``stored``: distinct stored fills of its tokens;
    - ``expected``: the sum of the subgraph's ``tradesQuantity`` (table ``orderbooks``) over its tokens, a token
      without an orderbooks row counting 0 (the subgraph has no Orderbook for a never-traded token), provided
      some token has a row or the market row is not newer than the latest count; otherwise unknown. A token
      two markets claim counts for one of them;
    - ``proven``: a run fetched every fill of its tokens to the end of the source after their counts were last
      changed (the market is complete as of then, whatever its count says).

    The status is ``MarketStatus.of(expected, stored, proven)``, first rule that matches: unknown expected →
    ``complete``/``zero_fill`` when proven (by what is stored), else ``missing`` (nothing stored) or ``unknown``;
    nothing stored and nothing expected → ``zero_fill``; stored ≥ expected → ``complete``; proven →
    ``source_short`` (the source holds fewer fills than its own count: reported, not refetched until the count
    changes); nothing stored → ``missing``; else ``incomplete``. To fetch: missing and incomplete.
    Covered (counts towards coverage): complete and zero_fill.

    That is the market's v1 part (``stored`` counts its v1 fills only: the subgraph's count knows no other). A market
    has a v2 part when it has stored v2 fills or starts after ``V2_CUTOVER``; the v2 part is complete when every v2
    block range up to the safe head is done (``ChainReach.current``). A market with a v2 part whose v1 part is
    covered is ``waiting_v2`` until then, and ``complete`` (or ``zero_fill``) after (``with_v2``).
    """

    COMPLETE = "complete"  # stored ≥ expected (known), something stored; or fetched to the end
    INCOMPLETE = "incomplete"  # 0 < stored < expected
    MISSING = "missing"  # nothing stored; expected > 0 or unknown
    ZERO_FILL = "zero_fill"  # nothing stored and nothing expected (or nothing found by a complete fetch)
    UNKNOWN = "unknown"  # something stored, expected unknown, never fetched to the end: cannot tell
    SOURCE_SHORT = "source_short"  # fetched to the end, but the source holds fewer fills than its count
    WAITING_V2 = "waiting_v2"  # v1 part covered; trades on v2, whose block ranges do not reach the safe head yet

    @classmethod
    def of(cls, expected: int | None, stored: int, proven: bool = False) -> MarketStatus:
        """The status of a market with ``expected`` (None = unknown) and ``stored`` fills (see the class doc)."""
        if expected is None:
            if proven:
                return cls.COMPLETE if stored else cls.ZERO_FILL
            return cls.MISSING if stored == 0 else cls.UNKNOWN
        if stored == 0 and expected == 0:
            return cls.ZERO_FILL
        if stored >= expected:
            return cls.COMPLETE
        if proven:
            return cls.SOURCE_SHORT
        return cls.MISSING if stored == 0 else cls.INCOMPLETE

    @classmethod
    def with_v2(cls, v1: MarketStatus, stored: int, v2_complete: bool | None) -> MarketStatus:
        """The status of a market whose v1 part has status ``v1`` and that has ``stored`` fills in all, given its
        v2 part: ``v2_complete`` None = it has none (the v1 status stands), True = the v2 block ranges reach the
        safe head, False = they do not yet (``waiting_v2`` once the v1 part is covered)."""
        if v2_complete is None or not v1.covered:
            return v1
        if not v2_complete:
            return cls.WAITING_V2
        return cls.COMPLETE if stored else cls.ZERO_FILL

    @property
    def to_fetch(self) -> bool:
        """Missing or incomplete: the planner fetches it."""
        return self in (MarketStatus.MISSING, MarketStatus.INCOMPLETE)

    @property
    def covered(self) -> bool:
        """Complete or zero-fill: it counts towards coverage."""
        return self in (MarketStatus.COMPLETE, MarketStatus.ZERO_FILL)


@dataclass(frozen=True, slots=True)
class MarketFills:
    """One market with its expected (None = unknown) and stored fill counts (``Store.market_fill_counts``).

    A slotted dataclass, not a pydantic model: the whole universe (hundreds of thousands) is read at once.
    ``volume_rank`` is the rank in the universe by volume (1 = highest; ties by condition id).
    """

    condition_id: str
    token_ids: tuple[str, ...]
    start_ts: int | None
    end_ts: int | None
    volume: float
    expected_fills: int | None
    stored_fills: int
    volume_rank: int
    question: str = ""
    closed: bool = False
    proven: bool = False  # fetched to the end of the source after its counts last changed
    new_since_ts: int | None = None  # fetched to the end before its counts last changed: v1 fills from then on
    v2_fills: int = 0  # of the stored fills, those from the v2 exchanges
    chain_current: bool = False  # the v2 block ranges reach the safe head (the same for every market)

    @property
    def v1_fills(self) -> int:
        """Stored fills from the v1 exchanges (what the subgraph's count describes)."""
        return self.stored_fills - self.v2_fills

    @property
    def has_v2_part(self) -> bool:
        """It trades on the v2 exchanges: v2 fills stored, or it starts after the cutover."""
        return self.v2_fills > 0 or (self.start_ts is not None and self.start_ts >= V2_CUTOVER.timestamp())

    @property
    def v1_status(self) -> MarketStatus:
        """``MarketStatus.of(expected_fills, v1_fills, proven)``: the v1 part alone."""
        return MarketStatus.of(self.expected_fills, self.v1_fills, self.proven)

    @property
    def status(self) -> MarketStatus:
        """The v1 status combined with the v2 part (``MarketStatus.with_v2``)."""
        return MarketStatus.with_v2(self.v1_status, self.stored_fills,
                                    self.chain_current if self.has_v2_part else None)

    @property
    def gap(self) -> int:
        """Expected v1 fills not stored (0 when expected is unknown)."""
        return max((self.expected_fills or 0) - self.v1_fills, 0)


@dataclass(frozen=True, slots=True)
class ChainReach:
    """How far the v2 part of the universe is complete: every v2 block range below ``through`` is done (None: no
    block range was ever planned). ``at_ts`` is about the time of block ``through − 1``: the newest stored v2 fill
    below it, plus ``BLOCK_S`` per block after that fill's (None without such a fill)."""

    through: int | None
    at_ts: int | None
    newest_fill_ts: int | None

    def current(self, now: float) -> bool:
        """Whether the ranges reach the safe head: their last block is at most ``V2_CURRENT_S`` old."""
        return self.at_ts is not None and self.at_ts >= now - V2_CURRENT_S


def coverage_summary(markets: Iterable[MarketFills]) -> dict[str, Any]:
    """Universe, covered, not covered, coverage (covered ÷ universe; None when empty) and the count per status."""
    counts = Counter(m.status for m in markets)
    universe = sum(counts.values())
    covered = sum(n for status, n in counts.items() if status.covered)
    return {"universe": universe, "covered": covered, "not_covered": universe - covered,
            "coverage": covered / universe if universe else None,
            **{status.value: counts[status] for status in MarketStatus}}


class Fill(BaseModel):
    """One stored order fill (a row of ``clob_fills``). ``id`` = tx hash + "_" + order hash is the dedup key."""

    model_config = ConfigDict(frozen=True)

    id: str
    transaction_hash: str
    order_hash: str
    timestamp: int
    block_number: int | None = None
    log_index: int | None = None
    exchange: str = ""
    maker: str
    taker: str
    maker_asset_id: str
    taker_asset_id: str
    maker_amount_filled: int = Field(ge=0)
    taker_amount_filled: int = Field(ge=0)
    fee: int = Field(ge=0)
    condition_id: str
    token_id: str
    side: Side
    is_relay_leg: bool
    exchange_version: int = 1
    source: str = "subgraph"


class UnitState(str, Enum):
    """Where one work unit is (stored in ``backfill_progress``)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class RunState(str, Enum):
    """The state of a shard or of a whole run: what a worker writes in its heartbeat (starting, running, and on
    exit stopped, failed, failed permanently or done) and what ``clobjob status`` derives (pending, stalled)."""

    PENDING = "pending"  # nothing started yet
    STARTING = "starting"  # the worker is loading its units
    RUNNING = "running"  # a live heartbeat
    STALLED = "stalled"  # started, but its heartbeat is not live
    STOPPED = "stopped"  # stopped by SIGTERM / Ctrl+C after checkpointing: run the same command to resume
    FAILED = "failed"  # every unit done or failed, some failed
    FAILED_PERMANENTLY = "failed_permanently"  # the worker exited 2 (bad input, a drifted source): do not retry
    DONE = "done"  # every unit done

    @property
    def ended(self) -> bool:
        """A state a worker writes when its process ends (such a heartbeat is never live)."""
        return self in (RunState.STOPPED, RunState.FAILED, RunState.FAILED_PERMANENTLY, RunState.DONE)


class RunKind(str, Enum):
    """What made a run: ``backfill`` (resumed by the next backfill), ``plan`` (``clobjob plan``; a time window
    with ``since``/``until``) or ``rerun`` (a run's failed or unfinished units, ``parent_run_id`` set)."""

    BACKFILL = "backfill"
    PLAN = "plan"
    RERUN = "rerun"


class RunParams(BaseModel):
    """How a run was planned: one shape for every kind (a field that does not apply to the kind is None)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: RunKind = RunKind.PLAN
    as_of: int | None = None  # unix time of the market classification the plan used
    markets: int | None = None  # markets planned
    markets_file: str | None = None  # the --markets list it was restricted to
    not_found: int | None = None  # listed ids absent from the universe
    since: str | None = None  # time-window plan
    until: str | None = None
    failed_only: bool | None = None  # rerun: only failed units
    from_shards: tuple[int, ...] | None = None  # rerun: only units of these shards of the parent
    units: int | None = None


class Run(BaseModel):
    """One planned run (a row of ``backfill_runs``): its shards, the source that fetches it and how it was made."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    shards: int
    source: str
    params: RunParams = RunParams()
    parent_run_id: str = ""
    created_at: UtcDatetime | None = None

    @property
    def kind(self) -> RunKind:
        """What made the run."""
        return self.params.kind


class WorkUnit(BaseModel):
    """A piece of planned work: all fills of ``token_ids``, optionally only those within [ts_from, ts_to) and
    with an id within [id_from, id_to) in byte order (None: unbounded on that side).

    An empty ``token_ids`` with a time range is a time-window unit over every market. An RPC unit (``source``
    "rpc") is the blocks [block_from, block_to) of the exchange contracts' logs (None: from the first contract's
    deploy block / to the safe head when the unit starts). ``source`` names the source that fetches the unit.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    unit_id: int
    shard: int
    source: str = "subgraph"
    condition_ids: tuple[str, ...] = ()
    token_ids: tuple[str, ...] = ()
    ts_from: int | None = None
    ts_to: int | None = None
    id_from: str | None = None
    id_to: str | None = None
    block_from: int | None = Field(None, ge=0)
    block_to: int | None = Field(None, ge=0)
    expected_fills: int = 0
    expected_requests: int = 1


COUNT_MAX = 2**63 - 1  # a stored count above this is a negative number written into the unsigned column


class Checkpoint(BaseModel):
    """The latest progress of one unit; ``cursor`` is opaque to everyone but the source that made it. A stored
    row that does not validate (a state that is no ``UnitState``, a negative count) is not a checkpoint."""

    run_id: str
    shard: int
    unit_id: int
    state: UnitState = UnitState.PENDING
    cursor: str = ""
    fills: int = Field(0, ge=0, le=COUNT_MAX)
    pages: int = Field(0, ge=0, le=COUNT_MAX)
    attempts: int = Field(0, ge=0, le=2**31 - 1)
    last_error: str = ""


class Heartbeat(BaseModel):
    """A shard's liveness and rates, written every few seconds by its worker."""

    run_id: str
    shard: int
    pod: str
    at: UtcDatetime
    state: RunState
    fills: int = 0
    requests: int = 0
    throttled: int = 0
    rps: float = 0.0
    rate_limit: float = 0.0
    in_flight: int = 0
    units_done: int = 0
    units_total: int = 0


class ShardStatus(BaseModel):
    """Aggregated status of one shard as ``clobjob status`` shows it."""

    shard: int
    state: RunState
    units_done: int
    units_failed: int
    units_total: int
    fills: int
    expected_fills: int
    rps: float = 0.0
    share_429: float = 0.0
    remaining_requests: int = 0
    heartbeat_age_s: float | None = None
    eta_s: float | None = None
    last_error: str = ""
    pod: str = ""


FILL_COLUMNS: tuple[str, ...] = tuple(Fill.model_fields)
"""The stored fill columns in order; sources emit fill rows as tuples in this order."""


# --- the storage contract of a fill row ------------------------------------------------------------

FILL_TIME_MIN = 1_577_836_800
"""2020-01-01 UTC: no CLOB fill is older; a timestamp must also be < now + ``FILL_TIME_AHEAD_S``."""
FILL_TIME_AHEAD_S = 86_400
UINT256_LIMIT = 2**256


class _Shape:
    """Strings of one fixed shape: ``h`` in ``template`` is a lower-case hex digit, any other character itself
    (``optional``: "" allowed too). ASCII only, so no lone surrogate or other non-UTF-8 text passes.

    A column is checked with a few C-speed passes over it joined (lengths, ASCII encoding, hex digits
    deleted leaving exactly the literals, each literal at its position): ~20 µs per 1,000 values where a
    regular expression takes ~600 µs."""

    _HEX = b"0123456789abcdef"

    def __init__(self, template: str, why: str, *, optional: bool = False) -> None:
        self.length, self.why, self.optional = len(template), why, optional
        self._literals = tuple((at, char) for at, char in enumerate(template) if char != "h")
        self._rest = "".join(c for c in template if c != "h").encode().translate(None, self._HEX)

    def all_ok(self, values: tuple[Any, ...]) -> bool:
        try:
            if self.optional:
                values = tuple(set(values) - {""})
                if not values:
                    return True
            joined, n = "".join(values), len(values)
            encoded = joined.encode("ascii")
        except (TypeError, UnicodeEncodeError):  # not all strings (or not hashable); not ASCII
            return False
        if len(joined) != n * self.length or set(map(len, values)) != {self.length}:
            return False
        return (encoded.translate(None, self._HEX) == self._rest * n
                and all(joined[at::self.length] == char * n for at, char in self._literals))

    def bad(self, value: Any) -> bool:
        return not self.all_ok((value,))


def _each_distinct(values: tuple[Any, ...], bad: Any) -> bool:
    """No distinct value of a column is ``bad`` (False when some value is not even hashable)."""
    try:
        return not any(map(bad, set(values)))
    except TypeError:
        return False


class _Decimal:
    """Canonical decimal strings of an unsigned integer below 2^256 (checked once per distinct value)."""

    why = "is not a canonical uint256 decimal"

    def all_ok(self, values: tuple[Any, ...]) -> bool:
        return _each_distinct(values, self.bad)

    def bad(self, value: Any) -> bool:
        return not (type(value) is str and value.isascii() and value.isdigit() and len(value) <= 78
                    and (value == "0" or value[0] != "0") and int(value) < UINT256_LIMIT)


class _Name:
    """A short lower-case identifier (the ``source`` column)."""

    why = "is not a source name (lower-case letters, digits, _)"

    def all_ok(self, values: tuple[Any, ...]) -> bool:
        return _each_distinct(values, self.bad)

    def bad(self, value: Any) -> bool:
        return not (type(value) is str and 0 < len(value) <= 32 and value.isascii()
                    and value.replace("_", "a").isalnum() and value == value.lower())


class _Int:
    """An integer column within [lo, hi) (``None`` allowed when ``nullable``); ``bool`` is not an integer."""

    def __init__(self, lo: int, hi: int, why: str, nullable: bool = False) -> None:
        self.lo, self.hi, self.why = lo, hi, why
        self._types = {int, type(None)} if nullable else {int}

    def all_ok(self, values: tuple[Any, ...]) -> bool:
        if not set(map(type, values)) <= self._types:
            return False
        numbers = [v for v in values if v is not None] if type(None) in self._types else values
        return not numbers or (min(numbers) >= self.lo and max(numbers) < self.hi)

    def bad(self, value: Any) -> bool:
        return not (value is None and type(None) in self._types) and not (
            type(value) is int and self.lo <= value < self.hi)


class _Members:
    """A column whose values are members of a fixed set."""

    def __init__(self, members: tuple[Any, ...], why: str) -> None:
        self.members, self.why = frozenset(members), why

    def all_ok(self, values: tuple[Any, ...]) -> bool:
        return set(map(type, values)) <= {type(m) for m in self.members} and set(values) <= self.members

    def bad(self, value: Any) -> bool:
        return type(value) not in {type(m) for m in self.members} or value not in self.members


_SIDE_BY_MAKER_ASSET = {USDC_ASSET_ID: "BUY"}
_HASH = "0x" + "h" * 64
_ADDRESS = "0x" + "h" * 40
_HASH_SHAPE = _Shape(_HASH, "is not a 32-byte lower-case 0x hash")


def _fill_checks(now: float) -> dict[str, Any]:
    """The check of each column (``FILL_COLUMNS`` order) as of ``now``."""
    amount = _Int(0, UINT256_LIMIT, "is not within UInt256 (0 <= x < 2^256)")
    return {
        "id": _Shape(f"{_HASH}_{_HASH}", "is not 0x + 64 lower-case hex digits, '_', 0x + 64 hex digits"),
        "transaction_hash": None,  # with a valid id, id = transaction_hash + "_" + order_hash implies both
        "order_hash": None,
        "timestamp": _Int(FILL_TIME_MIN, int(now) + FILL_TIME_AHEAD_S,
                          f"is not a Unix time from 2020-01-01 to now + {FILL_TIME_AHEAD_S // 3600} h"),
        "block_number": _Int(0, 2**64, "is not a UInt64 block number", nullable=True),
        "log_index": _Int(0, 2**32, "is not a UInt32 log index", nullable=True),
        "exchange": _Shape(_ADDRESS, "is not empty or a 20-byte lower-case 0x address", optional=True),
        "maker": _Shape(_ADDRESS, "is not a 20-byte lower-case 0x address"),
        "taker": _Shape(_ADDRESS, "is not a 20-byte lower-case 0x address"),
        "maker_asset_id": _Decimal(),
        "taker_asset_id": _Decimal(),
        "maker_amount_filled": amount,
        "taker_amount_filled": amount,
        "fee": amount,
        "condition_id": _Shape(_HASH, "is not empty or a 32-byte lower-case 0x condition id", optional=True),
        "token_id": _Decimal(),
        "side": _Members(("BUY", "SELL"), "is not BUY or SELL"),
        "is_relay_leg": _Members((True, False), "is not a bool"),
        "exchange_version": _Members((1, 2), "is not exchange version 1 or 2"),
        "source": _Name(),
    }


def _shown(value: Any) -> str:
    """A value for a message: escaped (``ascii``: no control character, no lone surrogate) and truncated."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _row_fault(row: tuple[Any, ...]) -> tuple[str, str] | None:
    """The relation between a row's fields that it breaks (id = tx + "_" + order; side, token and assets agree)."""
    values = dict(zip(FILL_COLUMNS, row))
    for name in ("transaction_hash", "order_hash"):
        if _HASH_SHAPE.bad(values[name]):
            return name, _HASH_SHAPE.why
    if values["id"] != f"{values['transaction_hash']}_{values['order_hash']}":
        return "id", "is not transaction_hash + '_' + order_hash"
    maker_asset, taker_asset = values["maker_asset_id"], values["taker_asset_id"]
    buy = maker_asset == USDC_ASSET_ID
    if buy == (taker_asset == USDC_ASSET_ID):
        return "maker_asset_id", f"and taker_asset_id {_shown(taker_asset)}: exactly one must be the collateral (0)"
    if values["side"] != ("BUY" if buy else "SELL"):
        return "side", f"disagrees with the assets (maker asset {_shown(maker_asset)})"
    if values["token_id"] != (taker_asset if buy else maker_asset):
        return "token_id", "is not the fill's outcome token (the asset that is not 0)"
    return None


def _relations_hold(values: dict[str, tuple[Any, ...]]) -> bool:
    """Whether every row's id, hashes, side, token and assets agree (``_row_fault`` says how one does not)."""
    makers, takers = values["maker_asset_id"], values["taker_asset_id"]
    try:
        ids = list(map("_".join, zip(values["transaction_hash"], values["order_hash"])))
    except TypeError:  # a hash that is not a string
        return False
    return (list(values["id"]) == ids
            and list(values["side"]) == list(map(_SIDE_BY_MAKER_ASSET.get, makers, repeat("SELL")))
            and list(values["token_id"]) == [t if m == "0" != t else (m if t == "0" != m else None)
                                             for m, t in zip(makers, takers)])


def check_fills(rows: Sequence[tuple[Any, ...]], where: str = "") -> None:
    """Raise ``BadFill`` unless every row (a tuple in ``FILL_COLUMNS`` order) is within the storage contract
    (``check_fill_columns``)."""
    width = len(FILL_COLUMNS)
    for index, row in enumerate(rows):
        if type(row) is not tuple or len(row) != width:
            raise BadFill(f"{where}fill {index}: expected a tuple of {width} columns, got {_shown(row)}")
    check_fill_columns(tuple(zip(*rows)), where)


def check_fill_columns(columns: Sequence[Sequence[Any]], where: str = "") -> None:
    """Raise ``BadFill`` unless every fill of ``columns`` (one sequence per ``FILL_COLUMNS`` field, or none
    for no fills) is within the storage contract.

    The contract: ``id`` = ``transaction_hash`` + "_" + ``order_hash``, both 32-byte lower-case ``0x`` hex;
    maker, taker (and a non-empty exchange) 20-byte lower-case ``0x`` addresses; asset and token ids canonical
    uint256 decimals; amounts and fee integers within UInt256; timestamp from 2020-01-01 to now + 1 day; block
    number UInt64 and log index UInt32 (or None); condition id empty or 32-byte hex; side BUY when the maker
    gives the collateral (asset "0") and SELL when the taker does, the token being the other asset; every
    text ASCII (so valid UTF-8). Checked column by column in C-speed passes; the message of the first bad
    value names ``where`` (the page), the fill's index, the field and the value, escaped and truncated.
    """
    if not columns:
        return
    if len(columns) != len(FILL_COLUMNS) or len(set(map(len, columns))) != 1:
        raise BadFill(f"{where}expected {len(FILL_COLUMNS)} columns of one length, got lengths "
                      f"{[len(column) for column in columns]}")
    ids = columns[0]
    for name, column, check in zip(FILL_COLUMNS, columns, _fill_checks(time.time()).values()):
        if check is not None and not check.all_ok(column):
            index = next(i for i, value in enumerate(column) if check.bad(value))
            raise BadFill(f"{where}fill {index} ({_shown(ids[index])}): {name} {_shown(column[index])} {check.why}")
    if not _relations_hold(dict(zip(FILL_COLUMNS, columns))):
        index, fault = next((i, f) for i, f in enumerate(map(_row_fault, zip(*columns))) if f is not None)
        field, why = fault
        raise BadFill(f"{where}fill {index} ({_shown(ids[index])}): {field} "
                      f"{_shown(columns[FILL_COLUMNS.index(field)][index])} {why}")
