"""A process's one path to the store: store calls in order on one thread, and one fill buffer for every
shard the process runs, flushed in large batches (one insert stream per process, as ClickHouse prefers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clobjob.models import Checkpoint
from clobjob.store import FillBuffer, Store

T = TypeVar("T")


class StoreWriter:
    """Store calls run in order on one thread, off the event loop. A flush stores the buffered rows, then
    the checkpoints queued with them (never the other way round)."""

    def __init__(self, store: Store, batch_rows: int) -> None:
        self.store, self._batch_rows = store, batch_rows
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._buffer = FillBuffer()
        self._pending: dict[tuple[int, int], tuple[Checkpoint, str]] = {}
        self._lock = asyncio.Lock()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread. Once submitted it runs to the end even if the caller is
        cancelled (a stop must never drop a queued insert or checkpoint)."""
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._thread, fn, *args))

    async def add(self, checkpoint: Checkpoint, pod: str, rows: Sequence[tuple[Any, ...]] = ()) -> None:
        """Queue a page's rows and the unit's new checkpoint; flush when the batch is full."""
        self._buffer.extend(rows)
        self._pending[(checkpoint.shard, checkpoint.unit_id)] = (checkpoint, pod)
        if len(self._buffer) >= self._batch_rows:
            await self.flush()

    async def flush(self) -> None:
        """Store buffered rows, then the checkpoints queued with them."""
        async with self._lock:
            columns, checkpoints = self._buffer.take(), list(self._pending.values())
            self._pending = {}
            if columns[0] or checkpoints:
                await self.call(self._write, columns, checkpoints)

    def _write(self, columns: list[list[Any]], checkpoints: list[tuple[Checkpoint, str]]) -> None:
        """One job on the store thread, so the checkpoints cannot be written without their rows."""
        if columns[0]:
            self.store.insert_fills(columns)
        for pod in sorted({pod for _, pod in checkpoints}):
            self.store.save_checkpoints([cp for cp, owner in checkpoints if owner == pod], pod)

    async def flush_every(self, interval_s: float) -> None:
        """Flush on a timer (the time bound of a batch)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    def close(self) -> None:
        """Stop the thread (after pending calls finish)."""
        self._thread.shutdown(wait=True)
