"""The shard worker: one process (a pod of the Indexed Job) or one local task per shard.

It loads its units and their checkpoints, skips done units, resumes each unit from its stored cursor,
runs units concurrently under the process's rate controller, buffers fills and flushes them in large
batches, and writes a unit's checkpoint only after the rows it covers are stored. A heartbeat records
the shard's liveness and rates; a per-page stall timeout (not counted while the process's requests wait their
turn at the rate controller) cancels a stuck fetch and retries the unit.
State lives only in ClickHouse, so a killed worker resumes where its last checkpoint points, and two
pods running the same index are harmless (fills dedup by id, the latest checkpoint wins).

A row is stored or its unit fails: every page is checked against the storage contract
(``models.check_fill_columns``) before it is buffered — a bad value fails the unit, naming it, with its checkpoint
before the page — and fills of tokens outside the unit are dropped and reported; a flush that fails fails
the units of its batch at their last stored cursor (``StoreWriter.lost``); a permanent error is recorded
as the unit's last error before it is raised.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import compress
from typing import Any

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGTERM,
    BadInput,
    ClobjobError,
    SourceError,
    StoreUnreachable,
    UnitFailed,
    describe,
)
from clobjob.lanes import ShardLanes
from clobjob.models import FILL_COLUMNS, Checkpoint, Heartbeat, RunState, UnitState, WorkUnit, check_fill_columns
from clobjob.ratelimit import AdaptiveRateController, fair_share
from clobjob.sources.base import FillSource, Page
from clobjob.store import Store
from clobjob.store.writer import StoreWriter, UnitKey

_TOKEN_AT = FILL_COLUMNS.index("token_id")


def pod_name(shard: int) -> str:
    """This process's name in heartbeats: the pod name in Kubernetes, ``local-<shard>`` elsewhere."""
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or f"local-{shard}"


@dataclass
class UnitProgress:
    """A unit's live progress; ``checkpoint()`` is what gets stored once its rows are."""

    unit: WorkUnit
    cursor: str = ""
    fills: int = 0
    pages: int = 0
    attempts: int = 0
    state: UnitState = UnitState.PENDING
    last_error: str = ""
    foreign: int = 0  # fills of tokens outside the unit, not stored

    @property
    def key(self) -> UnitKey:
        return self.unit.shard, self.unit.unit_id

    def checkpoint(self) -> Checkpoint:
        """The unit's checkpoint as of now."""
        return Checkpoint(run_id=self.unit.run_id, shard=self.unit.shard, unit_id=self.unit.unit_id,
                          state=self.state, cursor=self.cursor, fills=self.fills, pages=self.pages,
                          attempts=self.attempts, last_error=self.last_error)


@dataclass
class ShardCounters:
    """What a shard did in this process (for heartbeats, progress displays and the final summary)."""

    units_total: int = 0
    units_done: int = 0
    units_failed: int = 0
    fills: int = 0
    pages: int = 0
    started_at: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)


def sharers(beats: Iterable[Heartbeat], interval_s: float,
            seen: dict[int, tuple[int, int]]) -> list[tuple[float, float, int, int]]:
    """(accepted req/s, token rate, requests and throttles since the last read) of the shards fetching now, by
    their heartbeats (``ratelimit.fair_share``): running, and heard from within three heartbeat intervals.
    ``seen`` holds each shard's counts at the last read and is brought up to date."""
    since, found = datetime.now(timezone.utc) - timedelta(seconds=3 * interval_s), []
    for beat in beats:
        requests, throttled = seen.get(beat.shard, (beat.requests, beat.throttled))
        seen[beat.shard] = beat.requests, beat.throttled
        if beat.state is RunState.RUNNING and beat.at >= since:
            found.append((beat.rps, beat.rate_limit, beat.requests - requests, beat.throttled - throttled))
    return found


class ShardWorker:
    """Runs every unfinished unit of one shard of a run to completion, failure or stop."""

    def __init__(self, settings: Settings, store: Store, source: FillSource, controller: AdaptiveRateController,
                 run_id: str, shard: int, *, stop: asyncio.Event | None = None, pod: str | None = None,
                 writer: StoreWriter | None = None, shares_limit: bool = False) -> None:
        """``shares_limit``: the process works this shard alone (a pod), so its rate controller is its own and is
        told its fair share of the limit, from the run's heartbeats, at every beat."""
        self.settings, self.source, self.controller = settings, source, controller
        self.shares_limit, self._throttles_seen = shares_limit, {}
        self.run_id, self.shard = run_id, shard
        self.stop = stop or asyncio.Event()
        self.pod = pod or pod_name(shard)
        self.counters = ShardCounters()
        self.state = RunState.STARTING
        self._owns_writer = writer is None
        self._writer = writer or StoreWriter.for_settings(store, settings)
        self.lanes = ShardLanes(controller)  # a unit pages several of its ranges at once up to the target
        self._log = logger.bind(run_id=run_id, shard=shard)
        self._last_beat, self._last_rps = (time.monotonic(), 0), 0.0

    async def run(self) -> int:
        """Work the shard; returns the exit code (0 done, 1 some unit failed, 143 stopped)."""
        try:
            todo, conditions = await self._writer.call(self._load)
            return await self._work(todo, conditions)
        finally:
            if self._owns_writer:
                self._writer.close()

    def _load(self) -> tuple[list[UnitProgress], Mapping[str, str]]:
        store = self._writer.store
        run = store.run(self.run_id)
        if run is None:
            raise BadInput(f"run {self.run_id!r} does not exist (plan it first)")
        if not 0 <= self.shard < run.shards:
            raise BadInput(f"shard {self.shard} is outside run {self.run_id!r} (shards 0..{run.shards - 1})")
        units = store.units(self.run_id, self.shard)
        by_id = {unit.unit_id: unit for unit in units}
        saved, invalid = store.checked_checkpoints(self.run_id, self.shard,
                                                   check=lambda cp: self._cursor_error(by_id.get(cp.unit_id), cp))
        for bad in invalid:
            self._log.bind(unit=bad.unit_id).warning("{}", bad)
        progress = []
        for unit in units:
            cp = saved.get(unit.unit_id)
            p = UnitProgress(unit) if cp is None else UnitProgress(
                unit, cursor=cp.cursor, fills=cp.fills, pages=cp.pages, attempts=0, state=cp.state)
            if p.state is UnitState.DONE:
                self.counters.units_done += 1
            else:
                progress.append(p)
        self.counters.units_total = len(units)
        windowed = any(not u.token_ids for u in units)
        conditions = store.token_conditions(None if windowed else {c for u in units for c in u.condition_ids})
        progress.sort(key=lambda p: (-p.unit.expected_requests, p.unit.unit_id))  # longest first
        return progress, conditions

    def _cursor_error(self, unit: WorkUnit | None, checkpoint: Checkpoint) -> str | None:
        """Why a stored checkpoint's cursor is not one the source made for its unit (None: it is)."""
        try:
            if unit is not None:
                self.source.check_cursor(unit, checkpoint.cursor)
        except SourceError as exc:
            return f"cursor: {exc}"
        return None

    async def _work(self, todo: list[UnitProgress], conditions: Mapping[str, str]) -> int:
        self.state = RunState.RUNNING
        self._log.info("shard starts: {} units to do, {} done already", len(todo), self.counters.units_done)
        gate = asyncio.Semaphore(self.settings.max_in_flight)

        async def gated(progress: UnitProgress) -> None:
            async with gate:
                if not self.stop.is_set():
                    try:
                        await self._run_unit(progress, conditions)
                    finally:
                        self.lanes.close(progress.unit.unit_id)

        async def every_unit() -> None:  # the first permanent error cancels the other units
            async with asyncio.TaskGroup() as group:
                for progress in todo:
                    group.create_task(gated(progress))

        background = [asyncio.create_task(self._beat_every(self.settings.heartbeat_interval_s))]
        if self._owns_writer:
            background.append(asyncio.create_task(self._writer.flush_every(self.settings.flush_interval_s)))
        units = asyncio.create_task(every_unit())
        stopper = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({units, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not units.done():  # stop requested: abandon in-flight fetches, keep what is fetched
                units.cancel()
            await asyncio.gather(units, return_exceptions=True)
            error = None if units.cancelled() else units.exception()
            if isinstance(error, BaseExceptionGroup):
                error = error.exceptions[0]
        finally:
            stopper.cancel()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._writer.flush()
        for progress in todo:  # a unit done in memory whose rows a failed flush lost is failed
            self._lost(progress)
        if error is not None:
            permanent = isinstance(error, ClobjobError) and error.exit_code != EXIT_FAILED
            self.state = RunState.FAILED_PERMANENTLY if permanent else RunState.FAILED
            await self._beat()
            raise error
        finished = self.counters.units_done + self.counters.units_failed
        stopped = self.stop.is_set() and finished < self.counters.units_total
        self.state = RunState.STOPPED if stopped else RunState.FAILED if self.counters.units_failed else RunState.DONE
        await self._beat()
        self._log.info("shard {}: {} units done, {} failed, {} fills fetched", self.state.value,
                       self.counters.units_done, self.counters.units_failed, self.counters.fills)
        if stopped:
            return EXIT_SIGTERM
        return EXIT_FAILED if self.counters.units_failed else EXIT_OK

    async def _run_unit(self, progress: UnitProgress, conditions: Mapping[str, str]) -> None:
        """Fetch one unit from its cursor to the end, retrying failed attempts up to the limit."""
        log = self._log.bind(unit=progress.unit.unit_id)
        progress.state = UnitState.RUNNING
        tokens = frozenset(progress.unit.token_ids)
        lanes = self.lanes.open(progress.unit.unit_id)
        while True:
            pages = self.source.pages(progress.unit, progress.cursor, conditions, lanes)
            try:
                while True:
                    page = await self._next_page(pages)
                    if self._lost(progress):
                        return
                    page = self._admit(progress, page, tokens, log)
                    self._advance(progress, page)
                    await self._writer.add(progress.checkpoint(), self.pod, page.columns, self._requested_at(page))
                    done, page = page.done, None  # the buffer has the rows; hold none while the next is fetched
                    if self._lost(progress):
                        return
                    if done:
                        self.counters.units_done += 1
                        log.debug("unit done: {} fills, {} pages", progress.fills, progress.pages)
                        return
            except StopAsyncIteration:
                raise ClobjobError(f"source {self.source.name!r} ended unit {progress.unit.unit_id} "
                                   "without a final page") from None
            except (asyncio.CancelledError, BadInput, StoreUnreachable):
                raise
            except ClobjobError as exc:
                if exc.exit_code != EXIT_FAILED:  # permanent (a bad query, a drifted schema): recorded, then raised
                    progress.attempts += 1
                    await self._fail(progress, exc, log)
                    raise
                if await self._retry_or_fail(progress, exc, log):
                    return
            except Exception as exc:  # noqa: BLE001 - any other fault fails this attempt, not the shard
                if await self._retry_or_fail(progress, exc, log):
                    return
            finally:
                await pages.aclose()

    async def _next_page(self, pages: AsyncIterator[Page]) -> Page:
        """The unit's next page; ``TimeoutError`` (a stall) when none came within the stall timeout while none of the
        process's requests waited their turn at the rate controller. A unit queued behind the others at a low rate
        (256 units at 2 req/s wait 128 s a page) is not stalled; a hung request is cut by its attempt timeout."""
        fetch = asyncio.ensure_future(anext(pages))
        try:
            while True:
                done, _ = await asyncio.wait({fetch}, timeout=self.settings.stall_timeout_s)
                if done:
                    return fetch.result()
                if self.controller.demand() <= self.controller.snapshot().in_flight:  # nothing queued: stalled
                    raise TimeoutError
        finally:
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    def _admit(self, progress: UnitProgress, page: Page, tokens: frozenset[str], log: Any) -> Page:
        """The page as it may be buffered: every fill within the storage contract (else ``BadFill`` fails the
        unit, naming the page), fills of tokens outside the unit dropped, counted and reported."""
        check_fill_columns(page.columns, f"unit {progress.unit.unit_id} page {progress.pages + 1} "
                                         f"(after cursor {progress.cursor[:80]!r}): ")
        if not tokens or not page.columns:  # a time-window unit: every token belongs to it
            return page
        page_tokens = page.columns[_TOKEN_AT]
        kept = [token in tokens for token in page_tokens]
        if all(kept):
            return page
        progress.foreign += kept.count(False)
        progress.last_error = f"{progress.foreign} fill(s) of tokens outside the unit were not stored"
        log.warning("unit {} page {}: {} fill(s) of tokens outside the unit not stored (e.g. token {})",
                    progress.unit.unit_id, progress.pages + 1, kept.count(False),
                    next(token for token in page_tokens if token not in tokens)[:80])
        columns = tuple(list(compress(column, kept)) for column in page.columns)
        return Page(columns, page.cursor, page.done, page.requested_at)

    def _requested_at(self, page: Page) -> float:
        """When the page's request was made: as its source says, else now less the requests' smoothed latency."""
        if page.requested_at is not None:
            return page.requested_at
        return time.monotonic() - (self.controller.snapshot().latency_s or 0.0)

    def _lost(self, progress: UnitProgress) -> bool:
        """True when a failed flush lost rows of this unit (``StoreWriter.lost``): the unit is failed."""
        reason = self._writer.lost.get(progress.key)
        if reason is None:
            return False
        if progress.state is not UnitState.FAILED:
            if progress.state is UnitState.DONE:
                self.counters.units_done -= 1
            self.counters.units_failed += 1
            progress.state, progress.last_error = UnitState.FAILED, reason
            self._log.bind(unit=progress.unit.unit_id).error("unit failed: {}", reason)
        return True

    def _advance(self, progress: UnitProgress, page: Page) -> None:
        progress.cursor = page.cursor
        progress.fills += page.size
        progress.pages += 1
        if page.done:
            progress.state = UnitState.DONE
        self.counters.fills += page.size
        self.counters.pages += 1
        self.counters.last_progress = time.monotonic()

    async def _retry_or_fail(self, progress: UnitProgress, exc: BaseException, log: Any) -> bool:
        """Count a failed attempt; returns True when the unit has failed for good."""
        if self._lost(progress):
            return True
        progress.attempts += 1
        progress.last_error = self.settings.redact(describe(exc))  # stored, then shown by status
        if progress.attempts >= self.settings.unit_attempts or isinstance(exc, UnitFailed):
            await self._fail(progress, exc, log)
            return True
        log.warning("unit attempt {} failed, resuming from its cursor: {}", progress.attempts, progress.last_error)
        await asyncio.sleep(self.controller.backoff(progress.attempts))
        return False

    async def _fail(self, progress: UnitProgress, exc: BaseException, log: Any) -> None:
        """Mark the unit failed with ``exc`` as its last error and queue that checkpoint (at its cursor, which
        never points past the rows buffered so far)."""
        if progress.state is UnitState.FAILED:
            return
        progress.state, progress.last_error = UnitState.FAILED, describe(exc)
        self.counters.units_failed += 1
        log.error("unit failed after {} attempt(s): {}", progress.attempts, progress.last_error)
        await self._writer.add(progress.checkpoint(), self.pod)

    async def _beat_every(self, interval_s: float) -> None:
        while True:
            await self._beat()
            await asyncio.sleep(interval_s)

    async def _beat(self) -> None:
        await self._writer.call(self._writer.store.save_heartbeat, self.heartbeat())
        if self.shares_limit:
            beats = await self._writer.call(self._writer.store.heartbeats, self.run_id)
            peers = sharers(beats.values(), self.settings.heartbeat_interval_s, self._throttles_seen)
            self.controller.share(fair_share(peers))

    def metrics(self) -> dict[str, float]:
        """The shard's figures for Prometheus (see clobjob.metrics)."""
        rate = self.controller.snapshot()
        return {"fills_total": self.counters.fills, "requests_total": rate.requests,
                "throttled_total": rate.throttled, "rate_limit_rps": rate.rate_rps, "in_flight": rate.in_flight,
                "rps": self._last_rps, "heartbeat_age_seconds": time.monotonic() - self._last_beat[0]}

    def heartbeat(self) -> Heartbeat:
        """The shard's heartbeat as of now."""
        rate = self.controller.snapshot()
        now, pages = time.monotonic(), self.counters.pages
        rps = (pages - self._last_beat[1]) / max(now - self._last_beat[0], 1e-9)
        self._last_beat, self._last_rps = (now, pages), rps
        return Heartbeat(
            run_id=self.run_id, shard=self.shard, pod=self.pod, at=datetime.now(timezone.utc), state=self.state,
            fills=self.counters.fills, requests=rate.requests, throttled=rate.throttled,
            rps=rps, rate_limit=rate.rate_rps, in_flight=rate.in_flight,
            units_done=self.counters.units_done, units_total=self.counters.units_total,
        )
