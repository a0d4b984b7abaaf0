"""A process's one path to the store: store calls in order on one thread, and one fill buffer for every
shard the process runs, flushed in large batches (one insert stream per process, as ClickHouse prefers)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clickhouse_connect.driver.exceptions import OperationalError
from loguru import logger

from clobjob.config import Settings
from clobjob.errors import StoreUnreachable, describe
from clobjob.models import Checkpoint, UnitState
from clobjob.store import FillBuffer, Store
from clobjob.store.outage import Outage

MIN_CADENCE = 0.25  # timed flushes at most once per this share of the flush interval (inserts stay large); a store
# storing one batch for longer holds further pages back

T = TypeVar("T")
UnitKey = tuple[int, int]  # (shard, unit id)


class StoreWriter:
    """Store calls run in order on one thread, off the event loop. A flush stores the buffered rows, then
    the checkpoints queued with them (never the other way round).

    While the server is unreachable (a connection error, not a refused statement) a call — a flush's whole job
    of rows and checkpoints included — is retried with backoff for up to ``outage_s``; then it raises
    ``StoreUnreachable`` naming ``dsn`` (give the redacted one) and the last error, and so does every later call.

    A flush that fails otherwise (an insert ClickHouse refuses, fewer rows written than sent) never raises and
    never writes the checkpoints queued with it: every unit with rows or a checkpoint in it is *lost* (``lost``:
    unit → reason), its checkpoint is rewritten as failed at its last stored cursor (so a rerun refetches the
    rows), and nothing of it is queued any more. Workers read ``lost`` to fail those units."""

    def __init__(self, store: Store, batch_rows: int, *, outage_s: float = 180.0, dsn: str = "ClickHouse",
                 flush_interval_s: float = 2.0) -> None:
        self.store, self._batch_rows = store, batch_rows
        self._slow_s = MIN_CADENCE * flush_interval_s
        self._storing_since: float | None = None  # when the batch being stored was taken (monotonic)
        self._outage_s, self._dsn = outage_s, dsn
        self._unreachable: StoreUnreachable | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._buffer = FillBuffer()
        self._pending: dict[UnitKey, tuple[Checkpoint, str]] = {}
        self._lock = asyncio.Lock()
        self._flush_s = 0.0  # how long the last flush took to store
        self._oldest: float | None = None  # when the oldest page buffered was requested (monotonic)
        self.lost: dict[UnitKey, str] = {}  # written on the store thread only

    @classmethod
    def for_settings(cls, store: Store, settings: Settings) -> StoreWriter:
        """The writer the settings ask for: batch size, outage budget, flush interval, the DSN shown redacted."""
        return cls(store, settings.batch_rows, outage_s=settings.store_outage_s, dsn=settings.redacted_dsn(),
                   flush_interval_s=settings.flush_interval_s)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread. Once submitted it runs to the end even if the caller is
        cancelled (a stop must never drop a queued insert or checkpoint)."""
        return await asyncio.shield(self._until_reachable(fn, *args))

    async def _until_reachable(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread, retried whole while the server cannot be reached (a rerun insert
        is harmless: fills dedup by id, checkpoints by version)."""
        loop, outage = asyncio.get_running_loop(), Outage(self._outage_s, self._dsn)
        while True:
            if self._unreachable is not None:
                raise self._unreachable
            try:
                return await loop.run_in_executor(self._thread, fn, *args)
            except OperationalError as exc:
                try:
                    delay = outage.delay(exc)
                except StoreUnreachable as gone:
                    self._unreachable = gone
                    raise gone from None
                await asyncio.sleep(delay)

    async def add(self, checkpoint: Checkpoint, pod: str, columns: Sequence[Sequence[Any]] = (),
                  requested_at: float | None = None) -> None:
        """Queue a page's fills (``Page.columns``) and the unit's new checkpoint (nothing of a lost unit),
        ``requested_at`` when the page's request was made (``time.monotonic()``; default now). Once the batch is
        full it is stored, after the batch being stored, if any: the next batch fills while one is stored, and a
        page waits only while the store is a whole batch behind, or has been storing one for longer than
        ``MIN_CADENCE`` × the flush interval (back-pressure: a unit requests no more pages than the store keeps
        up with, and a kill during a slow insert costs it no more than it fetched in that time).
        The page is queued before any wait, so a unit cancelled meanwhile (a stop) never drops a fetched page.
        Raises ``StoreUnreachable`` once the server has been away too long (nothing more can be stored)."""
        self._queue(checkpoint, pod, columns, time.monotonic() if requested_at is None else requested_at)
        if len(self._buffer) >= self._batch_rows:
            await self.flush(when_full=True)
        elif self._storing_since is not None and time.monotonic() - self._storing_since > self._slow_s:
            async with self._lock:  # the store is slow: fetch no further until it has caught up
                pass

    def _queue(self, checkpoint: Checkpoint, pod: str, columns: Sequence[Sequence[Any]], requested_at: float) -> None:
        if self._unreachable is not None:
            raise self._unreachable
        key = (checkpoint.shard, checkpoint.unit_id)
        if key in self.lost:
            return
        self._buffer.extend_columns(columns)
        self._pending[key] = (checkpoint, pod)
        self._oldest = requested_at if self._oldest is None else min(self._oldest, requested_at)

    async def flush(self, *, when_full: bool = False) -> None:
        """Store buffered rows, then the checkpoints queued with them (``when_full``: only a full batch)."""
        async with self._lock:
            if when_full and len(self._buffer) < self._batch_rows:
                return  # stored meanwhile by the page that waited before this one
            columns, checkpoints = self._buffer.take(), self._pending
            self._pending, self._oldest = {}, None
            if columns[0] or checkpoints:
                started = self._storing_since = time.monotonic()
                try:
                    await self.call(self._write, columns, checkpoints)
                finally:
                    self._storing_since = None
                self._flush_s = time.monotonic() - started

    def _write(self, columns: list[list[Any]], checkpoints: dict[UnitKey, tuple[Checkpoint, str]]) -> None:
        """One job on the store thread, so the checkpoints cannot be written without their rows."""
        checkpoints = {key: queued for key, queued in checkpoints.items() if key not in self.lost}
        try:
            if columns[0]:
                self.store.insert_fills(columns)
            for pod in sorted({pod for _, pod in checkpoints.values()}):
                self.store.save_checkpoints([cp for cp, owner in checkpoints.values() if owner == pod], pod)
        except OperationalError:  # the server is unreachable: ``call`` runs this whole job again, nothing is lost
            raise
        except Exception as exc:  # noqa: BLE001 - whatever else failed, the batch's units are lost, not the process
            self._lose(checkpoints, len(columns[0]), exc)

    def _lose(self, checkpoints: dict[UnitKey, tuple[Checkpoint, str]], rows: int, exc: Exception) -> None:
        """(store thread) A batch was not stored: mark its units lost and record each as failed at its last
        stored checkpoint (read back from ClickHouse), with the store's error as the reason."""
        reason = f"store write failed ({rows} fills since the unit's last checkpoint not stored): {describe(exc)}"
        self.lost.update(dict.fromkeys(checkpoints, reason))
        logger.error("{}; {} unit(s) failed: {}", reason, len(checkpoints), sorted(checkpoints)[:20])
        groups: dict[tuple[str, int, str], list[Checkpoint]] = {}
        for cp, pod in checkpoints.values():
            groups.setdefault((cp.run_id, cp.shard, pod), []).append(cp)
        failed = {"state": UnitState.FAILED, "last_error": reason}
        try:
            for (run_id, shard, pod), queued in groups.items():
                saved = self.store.checkpoints(run_id, shard)
                self.store.save_checkpoints([saved.get(cp.unit_id, Checkpoint(
                    run_id=run_id, shard=shard, unit_id=cp.unit_id)).model_copy(update={
                        **failed, "attempts": cp.attempts}) for cp in queued], pod)
        except Exception as again:  # noqa: BLE001 - the stored checkpoints stay at their last stored cursor
            logger.error("could not record the failed units either: {}", describe(again))

    async def flush_every(self, interval_s: float) -> None:
        """Flush on a timer, early enough that a page's rows are stored within ``interval_s`` of its request: once
        the oldest page buffered was requested ``interval_s`` ago less the last flush's duration — but at least
        ``MIN_CADENCE`` × ``interval_s`` after the previous flush (inserts stay large when requests are slow). A
        failed flush is handled by ``flush`` itself, and anything else is logged, never ends the timer (but a store
        away for good does)."""
        step = interval_s * MIN_CADENCE
        while True:
            await asyncio.sleep(step)
            while (due := self._due_in(interval_s)) > 0:
                await asyncio.sleep(min(due, step))  # an older page may be queued meanwhile
            try:
                await self.flush()
            except StoreUnreachable:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead timer would leave batches unflushed, silently
                logger.opt(exception=exc).error("timed flush failed: {}", describe(exc))

    def _due_in(self, interval_s: float) -> float:
        """Seconds until the oldest page buffered was requested ``interval_s`` ago less the last flush's duration
        (infinite when nothing is buffered)."""
        if self._oldest is None:
            return math.inf
        return interval_s - self._flush_s - (time.monotonic() - self._oldest)

    def close(self) -> None:
        """Stop the thread (after pending calls finish)."""
        self._thread.shutdown(wait=True)
