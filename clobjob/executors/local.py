"""The local executor: every shard of a run on this machine, with the Indexed-Job rules of ``executors.base``.

``IndexedJob`` applies the rules to any way of running one attempt of an index. ``LocalExecutor`` picks the
way: on embedded chDB (one process per database path) the indexes are asyncio tasks of this process sharing
its parts (one store writer, one rate controller, one source session); against a ClickHouse server (or the
embedded database behind ``clobjob db serve``) each index is a ``clobjob worker`` process with
``JOB_COMPLETION_INDEX`` set, exactly as a pod runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, ClobjobError
from clobjob.executors.base import IndexOutcome, JobOutcome, pod_exit_code, retryable
from clobjob.logs import TERMINAL
from clobjob.models import Heartbeat, Run, RunState
from clobjob.monitor.progress import Requests
from clobjob.parts import Parts, process_parts
from clobjob.store import Store, open_store
from clobjob.worker import ShardWorker

RunIndex = Callable[[int], Awaitable[int]]
OnRetry = Callable[[int, RunState], Awaitable[None]]
"""Told ``(index, starting)`` when an index will be retried, ``(index, stopped)`` when a stop cancels that retry."""


class IndexedJob:
    """Indexed-Job semantics on one machine; ``run_index`` runs one attempt of one index. ``retrying`` holds
    the indexes waiting for their retry, ``retries`` counts the retries so far."""

    def __init__(self, parallelism: int, backoff_limit_per_index: int = 2, retry_delay_s: float = 1.0, *,
                 run_id: str = "", on_retry: OnRetry | None = None) -> None:
        self.parallelism = max(1, parallelism)
        self.backoff_limit_per_index = backoff_limit_per_index
        self.retry_delay_s = retry_delay_s
        self.run_id, self.on_retry = run_id, on_retry
        self.retrying: set[int] = set()
        self.retries = 0

    async def run(self, shards: Sequence[int], run_index: RunIndex, stop: asyncio.Event) -> JobOutcome:
        """Run every index to completion, failure or stop."""
        outcome = JobOutcome({s: IndexOutcome(s) for s in shards})
        gate = asyncio.Semaphore(self.parallelism)
        fail_job = asyncio.Event()

        async def index(shard: int) -> None:
            state = outcome.indexes[shard]
            async with gate:
                while not (stop.is_set() or fail_job.is_set()):
                    state.runs += 1
                    state.exit_code = await run_index(shard)
                    if state.exit_code == EXIT_BAD_INPUT:
                        fail_job.set()
                        stop.set()
                    if stop.is_set() or not retryable(state.exit_code) or state.runs > self.backoff_limit_per_index:
                        return
                    delay = self.retry_delay_s * 2 ** (state.runs - 1)
                    logger.bind(run_id=self.run_id, shard=shard).warning(
                        "index {} failed (attempt {} of {}, exit {}); retrying in {:g}s", shard, state.runs,
                        self.backoff_limit_per_index + 1, state.exit_code, delay)
                    self.retrying.add(shard)
                    await self._tell(shard, RunState.STARTING)
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        await self._tell(shard, RunState.STOPPED)
                    except asyncio.TimeoutError:
                        self.retries += 1
                    finally:
                        self.retrying.discard(shard)

        await asyncio.gather(*(index(s) for s in shards))
        return outcome

    async def _tell(self, shard: int, state: RunState) -> None:
        if self.on_retry is not None:
            await self.on_retry(shard, state)


def in_process_index(parts: Parts, run_id: str, stop: asyncio.Event) -> RunIndex:
    """One attempt of a shard as a task of this process (embedded chDB: one process per database), sharing
    the process's parts with every other shard."""
    assert parts.writer is not None

    async def run_index(shard: int) -> int:
        worker = ShardWorker(parts.settings, parts.writer.store, parts.source, parts.controller, run_id, shard,
                             stop=stop, pod=f"local-{shard}", writer=parts.writer)
        if parts.metrics:
            parts.metrics.add(worker.metrics, {"run_id": run_id, "shard": shard})
        try:
            return await worker.run()
        except ClobjobError as exc:
            logger.bind(run_id=run_id, shard=shard).error("{}", exc)
            return exc.exit_code

    return run_index


def subprocess_index(settings: Settings, run_id: str, stop: asyncio.Event) -> RunIndex:
    """One attempt of a shard as a ``clobjob worker`` process with ``JOB_COMPLETION_INDEX`` (a server URL), in
    its own session: a stop reaches it only as SIGTERM from here, as the kubelet stops a pod (a Ctrl+C on the
    terminal never kills a worker that has not yet installed its handlers)."""

    async def run_index(shard: int) -> int:
        env = {**os.environ, **settings.as_env(), "JOB_COMPLETION_INDEX": str(shard), "POD_NAME": f"local-{shard}"}
        relay = sys.stderr.isatty()  # on a terminal, this process's one writer shows the worker's lines
        if relay:
            env["CLOBJOB_LOG_FORMAT"] = "json"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clobjob", "worker", "--run-id", run_id, env=env,
            stderr=asyncio.subprocess.PIPE if relay else None, start_new_session=True)
        relaying = asyncio.create_task(_relay_logs(process.stderr)) if process.stderr is not None else None
        waiter = asyncio.create_task(process.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            process.send_signal(signal.SIGTERM)
        stopper.cancel()
        code = pod_exit_code(await waiter)
        if relaying is not None:
            await relaying
        return code

    return run_index


async def _relay_logs(stream: asyncio.StreamReader) -> None:
    """A worker process's JSON log lines, logged again by this process (other lines written as they are)."""
    async for raw in stream:
        text = raw.decode(errors="replace").rstrip("\n")
        try:
            line = json.loads(text)
            logger.bind(run_id=line.get("run_id", ""), shard=line.get("shard")).log(
                line.get("level", "INFO"), "{}", line.get("message", ""))
        except (ValueError, AttributeError, TypeError):
            TERMINAL.write(text + "\n")


class LocalExecutor:
    """Runs a run's shards on this machine: tasks on embedded chDB, ``clobjob worker`` processes on a server."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.job: IndexedJob | None = None
        self._parts: Parts | None = None

    async def launch(self, run: Run, *, parallelism: int, stop: asyncio.Event) -> JobOutcome:
        """Run every shard of ``run`` to completion, failure or stop."""
        self.job, shards = IndexedJob(parallelism, run_id=run.run_id, on_retry=self._on_retry), range(run.shards)
        if not self.settings.embedded:
            return await self.job.run(shards, subprocess_index(self.settings, run.run_id, stop), stop)
        async with process_parts(self.settings, run.source, self.store) as parts:
            self._parts = parts
            try:
                return await self.job.run(shards, in_process_index(parts, run.run_id, stop), stop)
            finally:
                self._parts = None

    def requests(self) -> Requests | None:
        """This process's request totals while its shards run in-process (None: they run as processes)."""
        if self._parts is None:
            return None
        rate = self._parts.controller.snapshot()
        index_retries = self.job.retries if self.job else 0
        return Requests(rate.requests, rate.throttled, rate.errors, rate.retries + index_retries)

    async def _on_retry(self, shard: int, state: RunState) -> None:
        """Record in the shard's heartbeat that its index is about to be retried (``status`` shows it running, not
        failed for good) or that a stop cancelled the retry."""
        assert self.job is not None
        beat = Heartbeat(run_id=self.job.run_id, shard=shard, pod=f"local-{shard}", at=datetime.now(timezone.utc),
                         state=state)
        if self._parts is not None and self._parts.writer is not None:
            await self._parts.writer.call(self._parts.writer.store.save_heartbeat, beat)
        else:
            await asyncio.to_thread(_save_heartbeat, self.settings, beat)


def _save_heartbeat(settings: Settings, beat: Heartbeat) -> None:
    """Save a heartbeat over a connection of its own (a server session runs one query at a time, and the
    progress publisher may be using the executor's)."""
    with open_store(settings, migrate=False) as store:
        store.save_heartbeat(beat)
