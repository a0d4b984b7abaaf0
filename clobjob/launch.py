"""What each command does, as a short list of steps: load the universe → find the missing work → resume or plan
a run → launch its shards → report. ``clobjob backfill``, ``rerun``, ``demo``, ``diagnose``, ``plan`` and
``worker`` are calls into this module; the command line only parses flags and renders what comes back.

Every step that fetches builds its parts with ``parts.process_parts``; every step that runs shards goes
through an executor (``executors.local`` here; ``executors.kubernetes`` on a cluster).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from loguru import logger

from clobjob import monitor, plan, rerun
from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, BadInput, ClobjobError
from clobjob.executors import kubernetes
from clobjob.executors.base import JobOutcome
from clobjob.executors.local import LocalExecutor
from clobjob.logs import TERMINAL
from clobjob.models import Run, RunKind, RunParams, RunState, WorkUnit
from clobjob.parts import StopBetweenRuns, install_stop_handlers, make_controller, process_parts
from clobjob.probe import LiveCheck, live_check
from clobjob.sources.gamma import fetch_universe
from clobjob.sources.markets import BadRow, market_from_gamma, read_gamma_file
from clobjob.sources.rpc import V1_EXCHANGE_CONTRACTS, RpcSource
from clobjob.sources.subgraph import SubgraphSource, Universe, merge_universe
from clobjob.store import Store, open_store
from clobjob.worker import ShardWorker

Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


# --- the universe --------------------------------------------------------------------------------


def load_markets(settings: Settings, path: str, *, strict: bool) -> tuple[int, list[BadRow]]:
    """Load a Gamma export into the universe; returns the markets loaded and the bad rows skipped.
    With ``strict`` a bad row loads nothing (``BadInput``)."""
    markets, bad = read_gamma_file(path)
    if bad and strict:
        shown = "; ".join(str(problem) for problem in bad[:10]) + ("; …" if len(bad) > 10 else "")
        raise BadInput(f"{len(bad)} bad row(s) in {path}; nothing loaded (--strict): {shown}")
    with open_store(settings) as store:
        store.upsert_markets(markets)
    return len(markets), bad


def sync_markets(settings: Settings, *, gamma: bool = False, subgraph_markets: bool = False
                 ) -> tuple[list[str], list[BadRow]]:
    """Bring the universe up to date: with ``gamma`` upsert every market of the Gamma API; with
    ``subgraph_markets`` add the markets the subgraph knows and the universe lacks; then count the expected
    fills of the universe's tokens. Returns summary lines and Gamma's bad rows (skipped)."""
    lines, bad = [], []
    with open_store(settings) as store:
        if gamma:
            line, bad = _sync_gamma(settings, store)
            lines.append(line)
        if subgraph_markets:
            universe = asyncio.run(_subgraph_universe(settings))
            added, orderbooks = merge_universe(store.markets(), universe)
            store.upsert_markets(added)
            store.upsert_orderbooks(orderbooks)
            lines.append(f"subgraph knows {len(universe.tokens_by_condition):,} markets: added {len(added):,} new")
        _require_universe(store)
        lines.append(count_expected(settings, store, plan.missing_work(store))[0])
    return lines, bad


def _sync_gamma(settings: Settings, store: Store) -> tuple[str, list[BadRow]]:
    """Upsert every market of the Gamma API; a summary line and the bad rows skipped."""
    markets, bad = asyncio.run(fetch_universe(settings, make_controller(settings)))
    store.upsert_markets(markets)
    return f"Gamma {settings.gamma_url}: upserted {len(markets):,} markets; skipped {len(bad)} bad row(s)", bad


async def _subgraph_universe(settings: Settings) -> Universe:
    async with process_parts(settings, plan.SOURCE) as parts:
        source = parts.source
        assert isinstance(source, SubgraphSource)
        return await source.universe()


def count_expected(settings: Settings, store: Store, report: plan.MissingReport) -> tuple[str, bool]:
    """Fetch the expected fills (the subgraph's ``tradesQuantity``) of the report's tokens that have no count
    yet or whose market is not covered or still open, and store the counts that changed; returns a summary line
    and whether any count changed (the report is then out of date). This never adds markets to the universe. A
    source that cannot be reached leaves the counts as they were (said)."""
    known = store.orderbook_counts()
    wanted = plan.tokens_to_count(report, known)
    if not wanted:
        return "expected fills: every count is up to date", False
    try:
        counts, requests = asyncio.run(_fetch_counts(settings, list(wanted)))
    except ClobjobError as exc:
        return f"expected fills: could not be fetched ({exc}); planning with the counts stored before", False
    changed = {token: (wanted[token], count) for token, count in counts.items() if known.get(token) != count}
    store.upsert_orderbooks(changed)
    cost = f"{requests:,} request{'s' if requests != 1 else ''}"
    return (f"expected fills: counted {len(counts):,} tokens of {len(set(wanted.values())):,} markets "
            f"({sum(counts.values()):,} fills) in {cost}; {len(changed):,} counts new or changed"), bool(changed)


def _classified(settings: Settings, store: Store, ids: list[str] | None) -> tuple[plan.MissingReport, str]:
    """The markets classified after their expected fills are counted, and the counting's summary line."""
    report = plan.missing_work(store, ids)
    line, changed = count_expected(settings, store, report)
    return (plan.missing_work(store, ids) if changed else report), line


COUNT_ATTEMPTS = 3
"""Tries per counting request: counting is a first step that falls back on the stored counts, so a subgraph that
cannot be reached costs seconds here, not the fetch's full retry budget."""


async def _fetch_counts(settings: Settings, tokens: list[str]) -> tuple[dict[str, int], int]:
    """The tokens' expected fills and the requests counting them took."""
    async with process_parts(settings, plan.SOURCE) as parts:
        source = parts.source
        assert isinstance(source, SubgraphSource)
        source.max_attempts = COUNT_ATTEMPTS
        return await source.expected_fills(tokens), parts.controller.snapshot().requests


def _require_universe(store: Store) -> None:
    if not store.count_markets():
        raise BadInput("the market universe is empty: run `clobjob markets load FILE` or "
                       "`clobjob markets sync --gamma`")


def _market_list(path: str | None, store: Store | None = None) -> list[str] | None:
    """The ids of a ``--markets`` file; with ``store``, every one must be in the universe (plan, backfill)."""
    if not path:
        return None
    ids = plan.read_condition_ids(path)
    return ids if store is None else plan.check_listed(store, ids)


# --- diagnose and plan ---------------------------------------------------------------------------


def diagnose(settings: Settings, *, markets_file: str | None, offline: bool, sample: int, probe_s: float,
             rate: float | None, out: str | None) -> dict[str, Any]:
    """What is missing, how old, how much work, and how to run it: the report as a JSON-ready dict.

    Unless ``offline``, a few missing markets are fetched for real and the sustainable rate is probed (not
    when ``rate`` is given). ``out`` receives the condition ids to fetch (a JSON array)."""
    ids = _market_list(markets_file)
    with open_store(settings) as store:
        if offline:
            report, counted = plan.missing_work(store, ids), None
        else:
            report, counted = _classified(settings, store, ids)
        conflicts, examples = store.token_conflicts()
        agreement = None if offline else _subgraph_agreement(settings, store, report)
    live = None if offline else asyncio.run(_probe(settings, report, sample, 0.0 if rate is not None else probe_s))
    rate_rps, origin = _planning_rate(settings, rate, live)
    shown = report.to_dict()
    latency = live.latency_s if live is not None and live.latency_s else 0.5
    recommendation = plan.recommend(shown["to_fetch"]["requests"], rate_rps, latency_s=latency)
    shown["recommendation"] = {**dataclasses.asdict(recommendation), "rate_origin": origin}
    shown["live"] = dataclasses.asdict(live) if live is not None else None
    shown["expected_counts"] = counted
    shown["conflicts"] = {"tokens_in_two_markets": conflicts,
                          "examples": [{"token_id": token, "condition_ids": markets} for token, markets in examples]}
    shown["subgraph"] = agreement
    if out:
        with open(out, "w") as written:
            json.dump([m.condition_id for m in report.work], written, indent=1)
    return shown


def _subgraph_agreement(settings: Settings, store: Store, report: plan.MissingReport) -> dict[str, Any]:
    """How the universe and the subgraph agree on tokens (``plan.SubgraphAgreement``), or why that is not known."""
    try:
        return asyncio.run(_ask_subgraph(settings, report, store.claimed_tokens())).to_dict()
    except ClobjobError as exc:
        return {"error": str(exc)}


async def _ask_subgraph(settings: Settings, report: plan.MissingReport, claimed: set[str]
                        ) -> plan.SubgraphAgreement:
    async with process_parts(settings, plan.SOURCE) as parts:
        source = parts.source
        assert isinstance(source, SubgraphSource)
        source.max_attempts = COUNT_ATTEMPTS
        tokens = [t for m in report.markets for t in m.token_ids]
        known, trades = await asyncio.gather(source.token_markets(tokens), source.trades_quantity())
        return plan.subgraph_agreement(report.markets, claimed, known, trades, parts.controller.snapshot().requests)


async def _probe(settings: Settings, report: plan.MissingReport, sample: int, probe_s: float) -> LiveCheck | None:
    async with process_parts(settings, plan.SOURCE) as parts:
        return await live_check(report, parts.source, parts.controller, sample=sample, probe_s=probe_s,
                                timeout_s=3 * settings.request_timeout_s, concurrency=settings.max_in_flight)


def _planning_rate(settings: Settings, rate: float | None, live: LiveCheck | None) -> tuple[float, str]:
    """The request rate to plan with and where it comes from."""
    if rate is not None:
        return rate, "--rate"
    if live is not None and live.rate_rps > 0:
        return live.rate_rps, "found by probing: the limit" if live.limited else \
            "found by probing: a lower bound, never throttled"
    if settings.max_rps is not None:
        return settings.max_rps, "assumed: --max-rps / CLOBJOB_MAX_RPS"
    return settings.initial_rps, "assumed: CLOBJOB_INITIAL_RPS"


def _utc(flag: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"{flag} {value!r} is not an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def plan_run(settings: Settings, *, shards: int, run_id: str | None, markets_file: str | None = None,
             since: str | None = None, until: str | None = None, force: bool = False, source: str | None = None,
             say: Say = _say) -> tuple[Run, list[WorkUnit]]:
    """Plan a run of the missing markets and, from the chain, the v2 blocks not fetched yet (``source``, as for
    ``backfill``), or of a time window (``since``/``until``, as for ``backfill``), and record it."""
    source = _source(settings, source)
    _check_window(since, until, markets_file)
    with open_store(settings) as store:
        run_id = run_id or plan.default_run_id(store)
        if since is not None and until is not None:
            units = _window_units(settings, since, until, shards, run_id, source, say)
            params = RunParams(kind=RunKind.PLAN, since=since, until=until, units=len(units))
        else:
            work = _find_work(settings, store, _market_list(markets_file, store), source, say)
            report, source = work.report, work.source
            units = plan.plan_units(report, shards, run_id, blocks=work.blocks)
            params = RunParams(kind=RunKind.PLAN, as_of=report.as_of, markets=len(report.work),
                               markets_file=markets_file, not_found=len(report.not_found), units=len(units))
        run = Run(run_id=run_id, shards=shards, source=source, params=params)
        plan.write_plan(store, run, units, force=force)
    return run, units


# --- running a run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """What a backfill fetches: the shards of a new run, a ``--markets`` list, the source, a time window, and
    whether the universe is synced from Gamma first."""

    shards: int
    markets_file: str | None = None
    source: str | None = None
    since: str | None = None
    until: str | None = None
    gamma: bool = False


HELD_DATABASE_WAIT_S = 5.0
"""A backfill started while another process holds the embedded database waits this long for it: a
``status --watch`` in another terminal holds it a moment at every refresh."""


def backfill(settings: Settings, *, shards: int, parallelism: int | None, markets_file: str | None = None,
             source: str | None = None, since: str | None = None, until: str | None = None, gamma: bool = False,
             follow_s: float | None = None, if_idle: bool = False, say: Say = _say) -> int:
    """Resume the latest unfinished backfill run, or plan one of what is still missing, and run it locally.

    ``source``: ``subgraph`` (v1 fills of the universe's markets), ``rpc`` (v2 fills: the blocks from the v2
    exchanges' deploy to the safe head not fetched yet) or ``all``; default ``all`` when an RPC URL is set.
    ``since``/``until`` (ISO 8601, UTC unless a zone is given): instead, the window [since, until) — every
    market's fills in it from the subgraph and the chain's blocks whose timestamps fall in it; a window run is
    resumed only by the same window. ``gamma``: upsert every market of the Gamma API first. ``follow_s``: then
    keep fetching what is new, a round every ``follow_s`` seconds, until stopped (``_follow``). ``if_idle``: start
    only when no other run is in progress, else exit 0 at once (a scheduled round never runs beside the main run
    or a late round)."""
    scope = _Scope(shards, markets_file, source, since, until, gamma)
    _check_window(since, until, markets_file)
    if follow_s is not None and since is not None:
        raise BadInput("--follow keeps fetching the new blocks: it does not go with --since/--until")
    if follow_s is not None and not (math.isfinite(follow_s) and follow_s > 0):
        raise BadInput(f"--interval {follow_s!r} is not a positive number of seconds")
    with open_store(settings, busy_wait_s=HELD_DATABASE_WAIT_S) as store:
        if if_idle and (busy := _run_in_progress(settings, store)) is not None:
            say(f"run {busy} is in progress: nothing done now (--if-idle); the next round continues after it")
            return EXIT_OK
        if follow_s is not None:
            return _follow(settings, store, scope, parallelism, follow_s, say)
        return _backfill(settings, store, scope, parallelism, say)


def _backfill(settings: Settings, store: Store, scope: _Scope, parallelism: int | None, say: Say,
              stop: StopBetweenRuns | None = None) -> int:
    """Resume or plan, then run with a progress line and report (a stop requested before the run: 143)."""
    run, chain_unread = _resume_or_plan(settings, store, scope, say)
    if run is None:
        say("everything is complete: nothing to fetch")
        return EXIT_FAILED if chain_unread else EXIT_OK
    if stop is not None and stop.requested:
        return EXIT_SIGTERM
    code = _run_and_report(settings, store, run, parallelism, say, stop)
    return EXIT_FAILED if chain_unread and code == EXIT_OK else code


def _resume_or_plan(settings: Settings, store: Store, scope: _Scope, say: Say) -> tuple[Run | None, bool]:
    """The run to work — the latest unfinished backfill run (for a window, only a run of the same window), else a
    new one of what is still missing (None: nothing is) — and whether the chain could not be read although the
    source wanted it."""
    if scope.gamma:
        say(_sync_gamma(settings, store)[0])
    _require_universe(store)
    run = plan.resumable_run(store)
    if run is not None and (scope.since is None or (run.params.since, run.params.until) == (scope.since, scope.until)):
        say(f"resuming run {run.run_id}: {store.unfinished_units(run.run_id):,} unit(s) left")
        return run, False
    run_id, source = plan.default_run_id(store), _source(settings, scope.source)
    if scope.since is not None and scope.until is not None:
        units = _window_units(settings, scope.since, scope.until, scope.shards, run_id, source, say)
        plan.write_plan(store, Run(run_id=run_id, shards=scope.shards, source=source, params=RunParams(
            kind=RunKind.BACKFILL, since=scope.since, until=scope.until, units=len(units))), units)
        chain_unread = False
    else:
        work = _find_work(settings, store, _market_list(scope.markets_file, store), source, say)
        chain_unread = work.chain_unread
        units = plan.plan_backfill(store, scope.shards, run_id, work.report, source=work.source, blocks=work.blocks)
    if not units:
        return None, chain_unread
    say(f"planned run {run_id}: {len(units):,} units, {sum(u.expected_fills for u in units):,} "
        f"expected fills in ≈ {sum(u.expected_requests for u in units):,} requests over {scope.shards} shard(s)")
    return store.run(run_id), chain_unread


# --- staying current -----------------------------------------------------------------------------


LIVE_BEATS = 3
"""A run is in progress while it has units not done and a heartbeat within this many heartbeat intervals (as
``status`` counts a shard stalled after them)."""


def _run_in_progress(settings: Settings, store: Store) -> str | None:
    """A run in progress (by ``LIVE_BEATS``), if any."""
    since = datetime.now(timezone.utc) - timedelta(seconds=LIVE_BEATS * settings.heartbeat_interval_s)
    return next((run_id for run_id in store.runs_beating_since(since) if store.unfinished_units(run_id)), None)


def _follow(settings: Settings, store: Store, scope: _Scope, parallelism: int | None, interval_s: float,
            say: Say) -> int:
    """``backfill``, then a round every ``interval_s`` seconds until stopped: the same resume-or-plan (the latest
    unfinished run, else the blocks from the last one done to the new safe head and the markets still missing,
    after Gamma's markets with ``scope.gamma``), run, and one summary line. ClickHouse holds all the state, as for
    any run: a loop killed at any moment resumes where it stopped. SIGTERM or Ctrl+C ends it after checkpointing
    (143); a round that fails (exit 1) is tried again the next round; exit 2 ends the loop."""
    stop = StopBetweenRuns()
    stop.arm()
    started = time.monotonic()
    code, rounds = _backfill(settings, store, scope, parallelism, say, stop), 0
    while True:
        if code == EXIT_BAD_INPUT:
            return code
        if code == EXIT_SIGTERM or stop.pause(interval_s - (time.monotonic() - started)):
            say(f"follow: stopped after {rounds} round(s); {monitor.STOPPED_HINT}")
            return EXIT_SIGTERM
        started, rounds = time.monotonic(), rounds + 1
        code = _follow_round(settings, store, scope, parallelism, rounds, stop, say)


def _follow_round(settings: Settings, store: Store, scope: _Scope, parallelism: int | None, number: int,
                  stop: StopBetweenRuns, say: Say) -> int:
    """One round of ``_follow``: its exit code, after one line saying what it fetched and how far the chain is
    read."""
    try:
        run, chain_unread = _resume_or_plan(settings, store, scope, _detail)
        if stop.requested:
            return EXIT_SIGTERM
        code, fetched = EXIT_OK, "nothing new"
        if run is not None:
            code, fetched = _run(settings, store, run, parallelism, stop)[0].exit_code, _fetched(store, run)
        head = f"; {_chain_read(store)}" if settings.rpc_url else ""
    except ClobjobError as exc:
        if exc.exit_code != EXIT_FAILED:
            raise
        say(f"round {number}: failed ({exc}); trying again next round")
        return EXIT_FAILED
    if chain_unread:
        head, code = "; the chain's head could not be read (v1 fills only)", EXIT_FAILED if code == EXIT_OK else code
    ending = "" if code == EXIT_OK else f"; exit {code} ({'stopped' if code == EXIT_SIGTERM else 'see clobjob status'})"
    say(f"round {number}: {fetched}{head}{ending}")
    return code


def _chain_read(store: Store) -> str:
    """How far the chain is read without a gap from the exchanges' first block, and the newest v2 fill there."""
    reach = store.chain_reach()
    if reach.through is None:
        return "chain not read yet"
    newest = reach.newest_fill_ts
    shown = datetime.fromtimestamp(newest, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if newest else "none"
    return f"chain read to block {reach.through - 1:,} (newest v2 fill {shown})"


def _detail(line: str) -> None:
    """A step's line within a follow round (the round says one line of its own)."""
    logger.debug("{}", line)


def _fetched(store: Store, run: Run) -> str:
    """What a run covered: its blocks and markets, and the fills its units stored."""
    units = store.units(run.run_id)
    fills = sum(c.fills for c in store.checkpoints(run.run_id).values())
    blocks = [(u.block_from, u.block_to) for u in units if u.block_from is not None and u.block_to is not None]
    markets = len({c for u in units for c in u.condition_ids})
    shown = [f"run {run.run_id}"]
    if blocks:
        low, high = min(b for b, _ in blocks), max(b for _, b in blocks)
        shown.append(f"blocks {low:,}–{high - 1:,} ({high - low:,})")
    if markets:
        shown.append(f"{markets:,} market(s)")
    return ", ".join(shown) + f", {fills:,} fills stored"


# --- time windows --------------------------------------------------------------------------------


def _check_window(since: str | None, until: str | None, markets_file: str | None) -> None:
    if (since is None) != (until is None):
        raise BadInput("--since and --until go together")
    if since is not None and markets_file:
        raise BadInput("--since/--until plan every market in the window: drop --markets")
    if since is not None and until is not None and _utc("--until", until) <= _utc("--since", since):
        raise BadInput(f"--until ({until}) must be after --since ({since})")


def _window_units(settings: Settings, since: str, until: str, shards: int, run_id: str, source: str,
                  say: Say) -> list[WorkUnit]:
    """The units of the window [since, until): slices of every market's fills (unless ``source`` is rpc) and the
    chain's blocks whose timestamps fall in it (unless it is subgraph)."""
    start, end = _utc("--since", since), _utc("--until", until)
    blocks = None if source == plan.SOURCE else asyncio.run(
        _window_blocks(settings, int(start.timestamp()), int(end.timestamp()), say))
    return plan.plan_window(start, end, shards, run_id, markets=source != "rpc", blocks=blocks)


async def _window_blocks(settings: Settings, since: int, until: int, say: Say) -> tuple[int, int]:
    """[first, end): the v2 blocks whose timestamps are in [since, until), up to the safe head — found by a
    binary search over the blocks' own timestamps (``RpcSource.first_block_at``)."""
    _require_rpc(settings)
    async with process_parts(settings, "rpc") as parts:
        source = parts.source
        assert isinstance(source, RpcSource)
        head, low = await source.safe_head() + 1, min(settings.rpc_contract_blocks().values())
        first, end = await asyncio.gather(source.first_block_at(since, low, head),
                                          source.first_block_at(until, low, head))
    past = " (the window reaches past the safe head: up to it)" if end == head else ""
    say(f"v2 fills: blocks {first:,} to {end - 1:,} are in the window ({max(end - first, 0):,} blocks){past}")
    return first, end


@dataclass(frozen=True)
class _Work:
    """What a plan covers: the markets' report, the v2 blocks (None: none), the run's source, and whether the
    chain could not be read although the source wanted it."""

    report: plan.MissingReport
    blocks: tuple[int, int] | None
    source: str
    chain_unread: bool


def _find_work(settings: Settings, store: Store, ids: list[str] | None, source: str, say: Say) -> _Work:
    """Count the expected fills and classify the markets (unless ``source`` is rpc), and find the v2 blocks to
    fetch (unless it is subgraph)."""
    if source == "rpc":  # no market units: nothing to count or classify
        report = plan.MissingReport(int(datetime.now(timezone.utc).timestamp()), ())
    else:
        report, line = _classified(settings, store, ids)
        say(line)
    blocks = _blocks_to_fetch(settings, store, source, say) if source != "subgraph" else None
    unread = blocks is None and source == "all"
    return _Work(report, blocks, plan.SOURCE if unread else source, unread)


def _source(settings: Settings, given: str | None) -> str:
    """What to fetch: the flag, else ``CLOBJOB_SOURCE``, else all when an RPC URL is set, else the subgraph."""
    return given or settings.source or ("all" if settings.rpc_url else plan.SOURCE)


def _blocks_to_fetch(settings: Settings, store: Store, source: str, say: Say) -> tuple[int, int] | None:
    """[first, end): the v2 blocks no finished unit covers yet, up to the RPC's safe head. With ``source`` all
    and a chain that cannot be read, None (said): the v1 fills are fetched all the same."""
    _require_rpc(settings)
    first = store.blocks_done_through(min(settings.rpc_contract_blocks().values()))
    try:
        end = asyncio.run(_safe_head(settings)) + 1
    except ClobjobError as exc:
        if source != "all":
            raise
        say(f"v2 fills: cannot read the chain's head ({exc}); fetching the v1 fills only, exit 1")
        return None
    say(f"v2 fills: blocks {first:,} to {end - 1:,} to fetch ({max(end - first, 0):,} blocks, up to the safe head)")
    return first, end


def _require_rpc(settings: Settings) -> None:
    if settings.rpc_url is None:
        raise BadInput("v2 fills come from a Polygon JSON-RPC endpoint: set CLOBJOB_RPC_URL (or use --source "
                       "subgraph)")


async def _safe_head(settings: Settings) -> int:
    async with process_parts(settings, "rpc") as parts:
        source = parts.source
        assert isinstance(source, RpcSource)
        return await source.safe_head()


def cross_check(settings: Settings, low: int, high: int) -> dict[str, Any]:
    """The v1 exchanges' ``OrderFilled`` logs of blocks [low, high] read from the chain against the subgraph fills
    stored from the first block's time to the last's (``monitor.cross_check``)."""
    with open_store(settings) as store:
        conditions = store.token_conditions()
        rows, times = asyncio.run(_v1_fills(settings, low, high, conditions))
        stored = store.fills_between(plan.SOURCE, times[low], times[high])
    return monitor.cross_check(rows, stored, blocks=(low, high), times=(times[low], times[high]))


async def _v1_fills(settings: Settings, low: int, high: int, conditions: dict[str, str]
                    ) -> tuple[list[tuple], dict[int, int]]:
    """The v1 fill rows of blocks [low, high] and the timestamps of those two blocks; ``BadInput`` past the safe
    head."""
    async with process_parts(settings.with_overrides(rpc_contracts=V1_EXCHANGE_CONTRACTS), "rpc") as parts:
        source = parts.source
        assert isinstance(source, RpcSource)
        safe = await source.safe_head()
        if high > safe:
            raise BadInput(f"--cross-check {low}:{high}: block {high:,} is past the chain's safe head {safe:,} "
                           "(head − CLOBJOB_RPC_LAG_BLOCKS)")
        unit = WorkUnit(run_id="cross-check", unit_id=0, shard=0, source="rpc", block_from=low, block_to=high + 1)
        rows = [row async for page in source.pages(unit, "", conditions) for row in page.rows]
        return rows, await source.timestamps([low, high])


def rerun_run(settings: Settings, *, run_id: str, failed_only: bool, shards: list[int] | None,
              new_shards: int | None, parallelism: int | None, on: str = "auto", say: Say = _say) -> int:
    """Make a new run of ``run_id``'s failed (or unfinished) units and run it: locally, or on Kubernetes
    (``on``; ``auto`` = Kubernetes inside a pod) as a new Indexed Job copied from the run's own Job."""
    with open_store(settings) as store:
        state = monitor.run_status(store, run_id, coverage=False,
                                   heartbeat_interval_s=settings.heartbeat_interval_s)["state"]
        if state == RunState.RUNNING:
            raise BadInput(f"run {run_id} is still running: wait for it (or stop it) before rerunning it")
        new_id = rerun.rerun_id(store, run_id)
        units = rerun.plan_rerun(store, run_id, new_id, failed_only=failed_only, shards=shards,
                                 new_shards=new_shards)
        if not units:
            where = f" in shard(s) {','.join(map(str, shards))}" if shards else ""
            say(f"run {run_id}: nothing to rerun (no {'failed' if failed_only else 'unfinished'} unit{where})")
            return 0
        run = store.run(new_id)
        assert run is not None
        say(f"rerun {new_id} of {run_id}: {len(units):,} unit(s) over {run.shards} shard(s), each resuming from "
            "its stored cursor")
        if _on_kubernetes(on):
            return _launch_on_kubernetes(run, rerun.lineage(store, run), parallelism or run.shards, say)
        return _run_and_report(settings, store, run, parallelism, say)


def _on_kubernetes(on: str) -> bool:
    return on == "kubernetes" or (on == "auto" and kubernetes.in_a_cluster())


def _launch_on_kubernetes(run: Run, lineage: list[str], parallelism: int, say: Say) -> int:
    """Start ``run`` as an Indexed Job copied from its lineage's Job; the Job runs on after this returns."""
    executor = kubernetes.KubernetesExecutor()
    asyncio.run(executor.launch(run, parallelism=parallelism, stop=asyncio.Event(), lineage=lineage))
    view = executor.job_status(run.run_id)
    name = view.name if view else "?"
    say(f"launched Job {executor.namespace}/{name}: {run.shards} shard(s), parallelism {parallelism}\n"
        f"watch it: clobjob status --run-id {run.run_id} --watch 10\n"
        f"logs of shard N: {kubernetes.kubectl_logs(executor.namespace, name, 0).replace('=0', '=N')}\n"
        f"all shards: {kubernetes.kubectl_logs(executor.namespace, name, shards=run.shards)}")
    return 0


def status(settings: Settings, run_id: str | None, *, on: str = "auto", wait_s: float = 0.0,
           say: Say | None = None) -> dict[str, Any]:
    """``monitor.current_status`` of a run (waiting up to ``wait_s`` for a live status), with its Kubernetes Job
    beside it (``job``: null when the run has no Job or no cluster is configured; ``{"error": …}`` when the
    cluster cannot be read)."""
    found = monitor.current_status(settings, run_id, wait_s=wait_s, say=say)
    found["job"] = None
    wanted = on == "kubernetes" or (on == "auto" and (kubernetes.in_a_cluster() or kubernetes.kube_config_present()))
    if found["run_id"] is not None and wanted:
        try:
            view = kubernetes.KubernetesExecutor().job_status(found["run_id"])
        except ClobjobError as exc:
            found["job"] = {"error": str(exc)}
        else:
            found["job"] = kubernetes.job_summary(view) if view is not None else None
    return found


def _run_and_report(settings: Settings, store: Store, run: Run, parallelism: int | None, say: Say,
                    stop: StopBetweenRuns | None = None) -> int:
    """Launch every shard of ``run`` here, with a progress line, then print its status and what to do next."""
    outcome, final = _run(settings, store, run, parallelism, stop)
    if outcome.exit_code == EXIT_BAD_INPUT:
        say(f"failed shards: {','.join(map(str, outcome.failed))} on a permanent error (bad input or a drifted "
            f"source) — do not retry until it is fixed; the reason is in `clobjob status --run-id {run.run_id}`")
    elif outcome.failed:
        say(f"failed shards: {','.join(map(str, outcome.failed))} — see `clobjob status --run-id {run.run_id}`; "
            f"rerun them with `clobjob backfill` (resumes) or `clobjob rerun --run-id {run.run_id} --failed`")
    shown = monitor.render_status(final)
    say(shown)
    if outcome.exit_code == EXIT_SIGTERM and not shown.endswith(monitor.STOPPED_HINT):
        say(monitor.STOPPED_HINT)
    return outcome.exit_code


def _run(settings: Settings, store: Store, run: Run, parallelism: int | None, stop: StopBetweenRuns | None = None
         ) -> tuple[JobOutcome, dict[str, Any]]:
    """Launch every shard of ``run`` here, with a progress line; its outcome and final status (on the embedded
    database also published as the live status). ``stop`` (a loop of runs) takes the signals back after it."""
    outcome = asyncio.run(_launch(settings, store, run, parallelism or run.shards))
    if stop is not None:
        stop.arm()
    final = monitor.run_status(store, run.run_id, heartbeat_interval_s=settings.heartbeat_interval_s)
    if settings.embedded:
        monitor.publish_live(final, monitor.live_path(settings))
    return outcome, final


async def _launch(settings: Settings, store: Store, run: Run, parallelism: int) -> JobOutcome:
    stop = asyncio.Event()
    install_stop_handlers(stop)
    executor = LocalExecutor(settings, store)
    progress = asyncio.create_task(_publish_progress(settings, store, run.run_id, executor))
    try:
        return await executor.launch(run, parallelism=parallelism, stop=stop)
    finally:
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
        TERMINAL.close()


COVERAGE_EVERY = 6
"""The live status's coverage and recent-activity sections are measured every this many intervals (whole-table
queries), the shard figures every interval."""


async def _publish_progress(settings: Settings, store: Store, run_id: str, executor: LocalExecutor) -> None:
    """From the start, every heartbeat interval: the run's progress (``monitor.ProgressMeter``) drawn on the
    terminal, or logged as one line (JSON off a terminal), and — on the embedded database — the live status
    that ``clobjob status`` shows in another terminal."""
    meter, path, log = monitor.ProgressMeter(), monitor.live_path(settings), logger.bind(run_id=run_id)
    measured: dict[str, Any] = {}
    for tick in itertools.count():
        coverage = tick % COVERAGE_EVERY == 0
        status = await asyncio.to_thread(monitor.run_status, store, run_id, coverage=coverage,
                                         heartbeat_interval_s=settings.heartbeat_interval_s)
        if coverage:
            measured = {"markets": status["markets"], "recent": status["recent"]}
        status.update(measured)
        requests = executor.requests()
        if requests is None:  # the shards are worker processes
            requests = await asyncio.to_thread(_heartbeat_requests, store, run_id, executor)
        status["progress"] = meter.update(status, requests, sorted(executor.job.retrying) if executor.job else [])
        if settings.embedded:
            await asyncio.to_thread(monitor.publish_live, status, path)
        if sys.stderr.isatty():
            TERMINAL.show(monitor.render_progress(status["progress"], TERMINAL.width()))
        else:
            log.bind(progress=status["progress"]).info("progress: {}", monitor.render_progress(status["progress"]))
        await asyncio.sleep(settings.heartbeat_interval_s)


def _heartbeat_requests(store: Store, run_id: str, executor: LocalExecutor) -> monitor.Requests:
    """Request totals of a run's worker processes, from their heartbeats."""
    beats = store.heartbeats(run_id).values()
    return monitor.Requests(sum(b.requests for b in beats), sum(b.throttled for b in beats), None,
                            executor.job.retries if executor.job else 0)


def work_shard(settings: Settings, run_id: str, shard: int) -> int:
    """A whole worker process (one pod of the Indexed Job): work one shard of a planned run; its exit code."""
    return asyncio.run(_work_shard(settings, run_id, shard))


async def _work_shard(settings: Settings, run_id: str, shard: int) -> int:
    stop = asyncio.Event()
    with open_store(settings, wait_s=settings.store_outage_s) as store:  # SIGTERM while it waits: exit 143 at once
        install_stop_handlers(stop)
        run = store.run(run_id)
        if run is None:
            raise BadInput(f"run {run_id!r} does not exist (plan it first)")
        async with process_parts(settings, run.source, store) as parts:
            assert parts.writer is not None
            worker = ShardWorker(settings, store, parts.source, parts.controller, run_id, shard, stop=stop,
                                 writer=parts.writer, shares_limit=True)
            if parts.metrics:
                parts.metrics.add(worker.metrics, {"run_id": run_id, "shard": shard})
            return await worker.run()


# --- demo ----------------------------------------------------------------------------------------


def demo(settings: Settings, *, markets: int, seed: int, profile: str, shards: int, fresh: bool,
         say: Say = _say) -> int:
    """The simulator in-process → its markets loaded → backfill (which counts the expected fills itself) →
    verify → comparison with the simulator's ground truth."""
    from clobjob.sim import Dataset, SimConfig, SimServer

    dataset = Dataset.generate(markets=markets, seed=seed)
    say(f"demo: simulated subgraph with {len(dataset.markets):,} markets and {dataset.n_fills:,} fills "
        f"(profile {profile}, seed {seed}); database {settings.redacted_dsn()} / {settings.clickhouse_database}")
    with SimServer(dataset, SimConfig.for_profile(profile, seed=seed)).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url)
        with open_store(settings) as store:
            if fresh:
                store.drop_database()
                store.migrate()
            store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(dataset.markets, start=1)])
        say(f"loaded {len(dataset.markets):,} markets (Gamma shape)")
        code = backfill(settings, shards=shards, parallelism=None, say=say)
        fill_requests = sim.stats()["fill_requests"]
    if code == EXIT_SIGTERM:
        return code
    with open_store(settings) as store:
        stored = store.count_fills()
        say(monitor.render_verify(monitor.verify(store, heartbeat_interval_s=settings.heartbeat_interval_s)))
    say(f"ground truth {dataset.n_fills:,} fills; stored {stored:,} distinct fills "
        f"({'exact' if stored == dataset.n_fills else 'DIFFERENT'}); {fill_requests:,} fill requests this time")
    database = f"--database {settings.clickhouse_database}"
    say("look around:\n" + "\n".join(f"  clobjob {database} {command}"
                                      for command in ("status", "diagnose --offline", "verify --report report.html")))
    return code
