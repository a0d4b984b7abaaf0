"""The controller's arithmetic: what is missing (``Store.market_fill_counts``, classified by
``models.MarketStatus``), how much work that is, and how to cut it into work units balanced over shards.

A market is fetched whole (its fills deduplicate by id, so refetching an incomplete market is safe). Each
source cuts its own units: the subgraph batches small markets into one unit (all their tokens at once, up to
its token limit, in pages of its page size), gives large markets a unit each and cuts giant ones into ranges of
fill id (``sources.subgraph.batch_markets``, ``cut_by_id``: ids begin with a keccak hash, so equal ranges hold
equal shares of a market's fills whatever their spread in time); the RPC source cuts block ranges
(``sources.rpc.block_ranges``). This module decides when a market is giant and sends every unit to a shard,
longest first (LPT), so that no shard becomes the straggler.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from clobjob.errors import BadInput
from clobjob.models import (
    BadValue,
    JsonError,
    MarketFills,
    MarketStatus,
    Run,
    RunKind,
    RunParams,
    WorkUnit,
    coverage_summary,
    json_rows,
    normalize_condition_id,
)
from clobjob.sources.rpc import block_ranges
from clobjob.sources.subgraph import MAX_TOKENS_PER_QUERY as MAX_BATCH_TOKENS
from clobjob.sources.subgraph import PAGE_SIZE, batch_markets, cut_by_id
from clobjob.store import Store

BATCH_REQUESTS = 10  # small markets are batched into units of about this many requests
SOURCE = "subgraph"  # the source whose fills the markets' expected counts describe
GIANT_FACTOR = 0.05  # a market above this share of a shard's mean work is cut into fill-id ranges
DAY_S = 86_400
BLOCKS_PER_REQUEST = 2_000  # blocks one eth_getLogs request covers, to weigh block units against market units
AGE_BUCKETS = ("<30d", "30d-1y", "1y-2y", ">2y", "unknown")
VOLUME_BUCKETS = ("top100", "top1000", "rest")


# --- the missing work ----------------------------------------------------------------------------


def age_bucket(end_ts: int | None, now: int) -> str:
    """The age bucket of a market by its end date (future end dates count as recent)."""
    if end_ts is None:
        return "unknown"
    age = now - end_ts
    return "<30d" if age < 30 * DAY_S else "30d-1y" if age < 365 * DAY_S else "1y-2y" if age < 730 * DAY_S else ">2y"


def volume_bucket(rank: int) -> str:
    """The volume bucket of a market by its rank (1 = highest volume)."""
    return "top100" if rank <= 100 else "top1000" if rank <= 1000 else "rest"


def _matrix(pairs: Counter[tuple[str, MarketStatus]], buckets: Sequence[str]) -> dict[str, dict[str, int]]:
    return {b: {s.value: pairs[(b, s)] for s in MarketStatus} for b in buckets}


@dataclass(frozen=True)
class MissingReport:
    """Every market of the universe (or of a custom list) classified (``MarketStatus``), with aggregates."""

    as_of: int
    markets: tuple[MarketFills, ...]
    not_found: tuple[str, ...] = ()  # requested condition ids absent from the universe

    @cached_property
    def work(self) -> tuple[MarketFills, ...]:
        """Markets to fetch (missing and incomplete), by condition id."""
        return tuple(m for m in self.markets if m.status.to_fetch)

    @cached_property
    def summary(self) -> dict[str, Any]:
        """``models.coverage_summary`` of the markets (the same figures status and verify show)."""
        return coverage_summary(self.markets)

    def by_status(self) -> dict[str, int]:
        """Market count per status."""
        return {s.value: self.summary[s.value] for s in MarketStatus}

    def by_age(self) -> dict[str, dict[str, int]]:
        """Market count per end-date age bucket and status."""
        return _matrix(Counter((age_bucket(m.end_ts, self.as_of), m.status) for m in self.markets), AGE_BUCKETS)

    def by_volume(self) -> dict[str, dict[str, int]]:
        """Market count per volume-rank bucket and status."""
        return _matrix(Counter((volume_bucket(m.volume_rank), m.status) for m in self.markets), VOLUME_BUCKETS)

    @property
    def coverage(self) -> float | None:
        """Share of markets covered (complete or zero-fill); None for an empty universe."""
        return self.summary["coverage"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary with stable keys."""
        status = self.by_status()
        return {
            "as_of": datetime.fromtimestamp(self.as_of, timezone.utc).isoformat(),
            "markets": len(self.markets),
            "not_found": list(self.not_found),
            "by_status": status,
            "coverage": None if self.coverage is None else round(self.coverage, 6),
            "by_age": self.by_age(),
            "by_volume": self.by_volume(),
            "to_fetch": {
                "markets": len(self.work),
                "missing": status[MarketStatus.MISSING.value],
                "incomplete": status[MarketStatus.INCOMPLETE.value],
                "unknown_expected": sum(1 for m in self.work if m.expected_fills is None),
                "expected_fills": sum(m.expected_fills or 0 for m in self.work),
                "requests": estimate_requests(self),
            },
            "count_mismatches": self.count_mismatches(),
        }

    def count_mismatches(self, examples: int = 5) -> dict[str, Any]:
        """Markets fetched to the end of the source whose stored fills differ from the source's own count:
        how many hold fewer and more fills than counted, with examples ("the source holds N fewer/more")."""
        off = [m for m in self.markets if m.proven and m.expected_fills is not None
               and m.v1_fills != m.expected_fills]
        fewer = [m for m in off if m.v1_fills < m.expected_fills]
        shown = sorted(off, key=lambda m: (-abs(m.v1_fills - m.expected_fills), m.condition_id))[:examples]
        return {"fewer": len(fewer), "more": len(off) - len(fewer),
                "examples": [f"{m.condition_id}: the source holds {abs(m.expected_fills - m.v1_fills):,} "
                             f"{'fewer' if m.v1_fills < m.expected_fills else 'more'} fills than its count "
                             f"({m.v1_fills:,} vs {m.expected_fills:,})" for m in shown]}


def missing_work(store: Store, condition_ids: list[str] | None = None, *, now: int | None = None) -> MissingReport:
    """Classify every market (or those listed) with the store's one fill-count query (v1 and v2 parts: a market
    waiting for the chain is not fetched by market units; the block units fetch its v2 fills)."""
    ids = [normalize_condition_id(c) for c in condition_ids] if condition_ids is not None else None
    as_of = int(datetime.now(timezone.utc).timestamp()) if now is None else now
    markets = tuple(store.market_fill_counts(ids, now=as_of))
    found = {m.condition_id for m in markets}
    not_found = tuple(sorted({c for c in ids or () if c not in found}))
    return MissingReport(as_of, markets, not_found)


@dataclass(frozen=True)
class SubgraphAgreement:
    """Where the universe and the subgraph disagree on tokens (diagnose). None of it is counted twice: expected
    fills are counted per token, for the market of the universe that claims it."""

    unknown_markets: tuple[str, ...]  # markets none of whose tokens the subgraph knows (no ``marketDatas``)
    other_market: tuple[tuple[str, str, str], ...]  # (token, its market here, its market in the subgraph)
    unclaimed: tuple[tuple[str, int], ...]  # subgraph tokens with fills no market claims: (token, fills)
    requests: int  # what finding this out cost

    def to_dict(self, examples: int = 5) -> dict[str, Any]:
        """A JSON-ready summary with up to ``examples`` examples of each kind."""
        return {
            "markets_unknown_to_subgraph": len(self.unknown_markets),
            "unknown_examples": list(self.unknown_markets[:examples]),
            "tokens_of_another_market": len(self.other_market),
            "another_market_examples": [{"token_id": t, "condition_id": here, "subgraph_condition_id": there}
                                        for t, here, there in self.other_market[:examples]],
            "unclaimed_subgraph_tokens": len(self.unclaimed),
            "unclaimed_fills": sum(fills for _, fills in self.unclaimed),
            "unclaimed_examples": [{"token_id": t, "fills": fills} for t, fills in self.unclaimed[:examples]],
            "requests": self.requests,
        }


def subgraph_agreement(markets: Sequence[MarketFills], claimed: Collection[str], subgraph_markets: dict[str, str],
                       trades: dict[str, int], requests: int) -> SubgraphAgreement:
    """Compare ``markets`` (their tokens looked up in the subgraph: ``subgraph_markets`` token → condition) and
    the whole universe's ``claimed`` tokens with every subgraph token that has fills (``trades``)."""
    unknown = tuple(m.condition_id for m in markets if not any(t in subgraph_markets for t in m.token_ids))
    other = tuple((t, m.condition_id, subgraph_markets[t]) for m in markets for t in m.token_ids
                  if subgraph_markets.get(t, m.condition_id) != m.condition_id)
    unclaimed = tuple(sorted(((t, n) for t, n in trades.items() if n and t not in claimed),
                             key=lambda item: (-item[1], item[0])))
    return SubgraphAgreement(unknown, other, unclaimed, requests)


# --- units ---------------------------------------------------------------------------------------


def assign(sizes: Sequence[int], shards: int) -> list[tuple[int, int]]:
    """Longest processing time first: ``(index, shard)`` pairs, largest first, ties by index then shard."""
    if shards < 1:
        raise BadInput(f"shards must be at least 1, got {shards}")
    loads = [(0, shard) for shard in range(shards)]
    result = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, shard = heapq.heappop(loads)
        result.append((index, shard))
        heapq.heappush(loads, (load + sizes[index], shard))
    return result


def estimate_requests(report: MissingReport, *, page_size: int = PAGE_SIZE, batch_requests: int = BATCH_REQUESTS,
                      max_batch_tokens: int = MAX_BATCH_TOKENS) -> int:
    """Requests needed to fetch the report's work (pages of ``page_size``, small markets batched)."""
    return sum(c.requests for c in batch_markets(report.work, page_size, batch_requests, max_batch_tokens))


def plan_units(report: MissingReport, shards: int, run_id: str, *, blocks: tuple[int, int] | None = None,
               page_size: int = PAGE_SIZE, batch_requests: int = BATCH_REQUESTS,
               max_batch_tokens: int = MAX_BATCH_TOKENS, giant_factor: float = GIANT_FACTOR) -> list[WorkUnit]:
    """Work units for the report's missing and incomplete markets (subgraph) and, with ``blocks`` = [first, end),
    for the on-chain blocks of v2 fills (rpc), assigned together to ``shards`` (deterministic).

    A single-market unit above ``giant_factor`` × the mean requests per shard (and above
    ``batch_requests``) is cut into fill-id ranges of about that size (``id_bounds``), which hold equal shares
    of its fills whatever their spread in time. The blocks are cut by the RPC source (``block_ranges``). Units
    are numbered largest first.
    """
    chunks = batch_markets(report.work, page_size, batch_requests, max_batch_tokens)
    limit = max(batch_requests, giant_factor * sum(c.requests for c in chunks) / max(shards, 1))
    cut = [piece for c in chunks
           for piece in (cut_by_id(c, math.ceil(c.requests / limit), page_size)
                         if len(c.markets) == 1 and c.requests > limit else [c])]
    pieces: list[tuple[dict[str, Any], int]] = [
        ({"condition_ids": tuple(m.condition_id for m in c.markets),
          "token_ids": tuple(t for m in c.markets for t in m.token_ids), "id_from": c.id_from, "id_to": c.id_to,
          "ts_from": c.ts_from, "expected_fills": c.fills}, c.requests) for c in cut]
    return _assigned(pieces + _block_pieces(blocks, shards), shards, run_id)


def _block_pieces(blocks: tuple[int, int] | None, shards: int) -> list[tuple[dict[str, Any], int]]:
    """The block-range units of [first, end) (none for None) with their expected requests."""
    if blocks is None:
        return []
    return [({"source": "rpc", "block_from": low, "block_to": high}, math.ceil((high - low) / BLOCKS_PER_REQUEST))
            for low, high in block_ranges(*blocks, shards)]


def _assigned(pieces: list[tuple[dict[str, Any], int]], shards: int, run_id: str) -> list[WorkUnit]:
    """Units of (fields, expected requests) pieces, numbered and assigned to shards largest first."""
    return [WorkUnit(run_id=run_id, unit_id=unit_id, shard=shard, expected_requests=pieces[i][1], **pieces[i][0])
            for unit_id, (i, shard) in enumerate(assign([requests for _, requests in pieces], shards))]


def plan_window(since: datetime, until: datetime, shards: int, run_id: str, *, markets: bool = True,
                blocks: tuple[int, int] | None = None, slices_per_shard: int = 4,
                min_slice_s: int = 60) -> list[WorkUnit]:
    """Time-window units: [ts_from, ts_to) slices tiling [since, until) over every market (unless not
    ``markets``), and with ``blocks`` = [first, end) — the chain's blocks whose timestamps fall in the window —
    block-range units of them."""
    start, end = int(since.timestamp()), int(until.timestamp())
    if end <= start:
        raise BadInput(f"--until ({until.isoformat()}) must be after --since ({since.isoformat()})")
    slices = max(1, min(shards * slices_per_shard, (end - start) // min_slice_s)) if markets else 0
    bounds = [start + (end - start) * i // slices for i in range(slices + 1)] if slices else []
    pieces: list[tuple[dict[str, Any], int]] = [
        ({"ts_from": low, "ts_to": high, "expected_fills": 0}, 1) for low, high in zip(bounds, bounds[1:])]
    return _assigned(pieces + _block_pieces(blocks, shards), shards, run_id)


# --- shards --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLoad:
    """The planned work of one shard."""

    shard: int
    units: int
    markets: int
    expected_fills: int
    expected_requests: int


def shard_loads(units: Sequence[WorkUnit], shards: int) -> list[ShardLoad]:
    """Planned work per shard (every shard listed, empty ones too)."""
    loads = []
    for shard in range(shards):
        mine = [u for u in units if u.shard == shard]
        loads.append(ShardLoad(shard, len(mine), len({c for u in mine for c in u.condition_ids}),
                               sum(u.expected_fills for u in mine), sum(u.expected_requests for u in mine)))
    return loads


def imbalance(requests_per_shard: Sequence[int]) -> float:
    """Largest shard's requests ÷ mean (1.0 = perfect; 1.0 when there is no work)."""
    total = sum(requests_per_shard)
    return max(requests_per_shard) * len(requests_per_shard) / total if total else 1.0


@dataclass(frozen=True)
class Recommendation:
    """How to run the work at a given request rate."""

    rate_rps: float
    duration_s: float
    shards: int
    in_flight: int  # per shard (Little's law: rate × latency, plus one)


def recommend(requests: int, rate_rps: float, *, latency_s: float = 0.5, shard_rps: float = 10.0,
              max_shards: int = 64, min_shard_s: float = 300.0) -> Recommendation:
    """Shards and in-flight window for ``requests`` at ``rate_rps``.

    One shard per ``shard_rps`` of rate, but no shard with less than ``min_shard_s`` of work.
    """
    if rate_rps <= 0:
        raise BadInput(f"rate must be positive, got {rate_rps}")
    duration = requests / rate_rps
    shards = max(1, min(max_shards, math.ceil(rate_rps / shard_rps), int(duration // min_shard_s)))
    return Recommendation(rate_rps, duration, shards, math.ceil(rate_rps / shards * latency_s) + 1)


def write_plan(store: Store, run: Run, units: Sequence[WorkUnit], *, force: bool = False) -> None:
    """Record the run and its units; a run that already has progress is replaced only with ``force``."""
    progress = store.checkpoints(run.run_id)
    if progress and not force:
        raise BadInput(f"run {run.run_id!r} already has progress for {len(progress)} unit(s); refusing to "
                       "overwrite it (pass --force to replace its plan and progress, or choose another --run-id)")
    store.create_run(run, units)


def default_run_id(store: Store, now: datetime | None = None) -> str:
    """``run-YYYYmmdd-HHMMSS`` (UTC), with ``-2``, ``-3``… when a run of that second exists already."""
    base = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    taken = {r.run_id for r in store.runs()}
    return next(run_id for n in itertools.count(1) if (run_id := base if n == 1 else f"{base}-{n}") not in taken)


# --- custom market lists -------------------------------------------------------------------------


SHOWN_IDS = 10
"""Bad or unknown ids a message lists (then a count)."""
MAX_BAD_IDS = 1000
"""Reading a market list stops at this many bad ids: it is not a list of condition ids."""
_COMMENT = object()


def _listing(items: Sequence[str]) -> str:
    more = f"; and {len(items) - SHOWN_IDS:,} more" if len(items) > SHOWN_IDS else ""
    return "; ".join(items[:SHOWN_IDS]) + more


def read_condition_ids(path: str | Path) -> list[str]:
    """Condition ids from a JSON array or one per line (``#`` comments), normalised and deduplicated.

    Raises ``BadInput`` listing the bad ids with their lines (the first ``SHOWN_IDS`` and a count).
    """
    ids, bad = [], []
    try:
        for line, value in json_rows(path, parse_line=lambda text: _COMMENT if text.startswith("#") else text):
            if value is _COMMENT:
                continue
            try:
                if isinstance(value, JsonError):
                    raise value
                ids.append(normalize_condition_id(value))
            except BadValue as exc:
                bad.append(str(exc) if isinstance(exc, JsonError) else f"line {line}: {exc}")
                if len(bad) >= MAX_BAD_IDS:
                    break
    except BadValue as exc:  # unreadable, or an array that is not JSON
        raise BadInput(f"market list {path}: {exc}") from None
    if bad:
        stopped = f" (stopped reading at {MAX_BAD_IDS:,})" if len(bad) >= MAX_BAD_IDS else ""
        raise BadInput(f"{len(bad):,} bad condition id(s){stopped} in {path}: {_listing(bad)}")
    if not ids:
        raise BadInput(f"{path} lists no condition ids")
    return list(dict.fromkeys(ids))


def check_listed(store: Store, condition_ids: list[str]) -> list[str]:
    """The listed condition ids, all of them in the universe; ``BadInput`` naming those that are not (a list
    of markets nobody loaded would plan an empty run)."""
    known = {m.condition_id for m in store.markets(condition_ids)}
    unknown = [c for c in condition_ids if c not in known]
    if unknown:
        raise BadInput(f"{len(unknown):,} listed condition id(s) are not in the market universe (load them with "
                       f"`clobjob markets load` or `markets sync`, or drop them from the list): {_listing(unknown)}")
    return condition_ids


# --- backfill: resume or plan --------------------------------------------------------------------


def resumable_run(store: Store) -> Run | None:
    """The latest backfill run if it still has unfinished (or failed) units: resume it, do not re-plan.

    Not once a rerun (``clobjob rerun``) took its units over: then what is still missing is planned afresh.
    """
    runs = store.runs()
    latest = next((r for r in runs if r.kind is RunKind.BACKFILL), None)
    if latest is None or any(r.parent_run_id == latest.run_id for r in runs):
        return None
    return latest if store.unfinished_units(latest.run_id) else None


def tokens_to_count(report: MissingReport, counted: Collection[str]) -> dict[str, str]:
    """Token → condition id of the tokens whose expected fills to (re)fetch before planning: every token of a
    market with a token never counted, or whose v1 part is not covered, or still open (its count may have grown)."""
    wanted = {}
    for market in report.markets:
        if (not market.v1_status.covered or not market.closed
                or any(token not in counted for token in market.token_ids)):
            wanted.update(dict.fromkeys(market.token_ids, market.condition_id))
    return wanted


def plan_backfill(store: Store, shards: int, run_id: str, report: MissingReport, *, source: str = SOURCE,
                  blocks: tuple[int, int] | None = None) -> list[WorkUnit]:
    """Plan and record a backfill run of the report's markets to fetch and the v2 ``blocks`` (from ``source``);
    an empty list means nothing to do."""
    units = plan_units(report, shards, run_id, blocks=blocks)
    if units:
        params = RunParams(kind=RunKind.BACKFILL, as_of=report.as_of, markets=len(report.work), units=len(units))
        write_plan(store, Run(run_id=run_id, shards=shards, source=source, params=params), units)
    return units
