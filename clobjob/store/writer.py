"""A process's one path to the store: store calls in order on one thread, and one fill buffer for every
shard the process runs, flushed in large batches (one insert stream per process, as ClickHouse prefers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clickhouse_connect.driver.exceptions import OperationalError
from loguru import logger

from clobjob.errors import StoreUnreachable, describe
from clobjob.models import Checkpoint, UnitState
from clobjob.store import FillBuffer, Store
from clobjob.store.outage import Outage

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

    def __init__(self, store: Store, batch_rows: int, *, outage_s: float = 180.0, dsn: str = "ClickHouse") -> None:
        self.store, self._batch_rows = store, batch_rows
        self._outage_s, self._dsn = outage_s, dsn
        self._unreachable: StoreUnreachable | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._buffer = FillBuffer()
        self._pending: dict[UnitKey, tuple[Checkpoint, str]] = {}
        self._lock = asyncio.Lock()
        self.lost: dict[UnitKey, str] = {}  # written on the store thread only

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

    async def add(self, checkpoint: Checkpoint, pod: str, rows: Sequence[tuple[Any, ...]] = ()) -> None:
        """Queue a page's rows and the unit's new checkpoint (nothing of a lost unit); flush when the batch is full.
        Raises ``StoreUnreachable`` once the server has been away too long (nothing more can be stored)."""
        if self._unreachable is not None:
            raise self._unreachable
        key = (checkpoint.shard, checkpoint.unit_id)
        if key in self.lost:
            return
        self._buffer.extend(rows)
        self._pending[key] = (checkpoint, pod)
        if len(self._buffer) >= self._batch_rows:
            await self.flush()

    async def flush(self) -> None:
        """Store buffered rows, then the checkpoints queued with them."""
        async with self._lock:
            columns, checkpoints = self._buffer.take(), self._pending
            self._pending = {}
            if columns[0] or checkpoints:
                await self.call(self._write, columns, checkpoints)

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
        """Flush on a timer (the time bound of a batch); a failed flush is handled by ``flush`` itself, and
        anything else is logged, never ends the timer (but a store away for good does)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except StoreUnreachable:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead timer would leave batches unflushed, silently
                logger.opt(exception=exc).error("timed flush failed: {}", describe(exc))

    def close(self) -> None:
        """Stop the thread (after pending calls finish)."""
        self._thread.shutdown(wait=True)
