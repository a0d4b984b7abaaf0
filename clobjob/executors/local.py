"""The local executor: every shard of a run on this machine, with the Indexed-Job rules of ``executors.base``.

``IndexedJob`` applies the rules to any way of running one attempt of an index. ``LocalExecutor`` picks the
way: on embedded chDB (one process per database path) the indexes are asyncio tasks of this process sharing
its parts (one store writer, one rate controller, one source session); against a ClickHouse server (or the
embedded database behind ``clobjob db serve``) each index is a ``clobjob worker`` process with
``JOB_COMPLETION_INDEX`` set, exactly as a pod runs it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, ClobjobError
from clobjob.executors.base import IndexOutcome, JobOutcome, pod_exit_code, retryable
from clobjob.models import Run
from clobjob.parts import Parts, process_parts
from clobjob.store import Store
from clobjob.worker import ShardWorker

RunIndex = Callable[[int], Awaitable[int]]


class IndexedJob:
    """Indexed-Job semantics on one machine; ``run_index`` runs one attempt of one index."""

    def __init__(self, parallelism: int, backoff_limit_per_index: int = 2, retry_delay_s: float = 1.0) -> None:
        self.parallelism = max(1, parallelism)
        self.backoff_limit_per_index = backoff_limit_per_index
        self.retry_delay_s = retry_delay_s

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
                    if not retryable(state.exit_code) or state.runs > self.backoff_limit_per_index:
                        return
                    delay = self.retry_delay_s * 2 ** (state.runs - 1)
                    logger.bind(shard=shard).warning("index {} failed (run {}); retrying in {:.0f}s",
                                                     shard, state.runs, delay)
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass

        await asyncio.gather(*(index(s) for s in shards))
        return outcome


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
    """One attempt of a shard as a ``clobjob worker`` process with ``JOB_COMPLETION_INDEX`` (a server URL)."""

    async def run_index(shard: int) -> int:
        env = {**os.environ, **settings.as_env(), "JOB_COMPLETION_INDEX": str(shard), "POD_NAME": f"local-{shard}"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clobjob", "worker", "--run-id", run_id, env=env)
        waiter = asyncio.create_task(process.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            process.send_signal(signal.SIGTERM)
        stopper.cancel()
        return pod_exit_code(await waiter)

    return run_index


class LocalExecutor:
    """Runs a run's shards on this machine: tasks on embedded chDB, ``clobjob worker`` processes on a server."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store

    async def launch(self, run: Run, *, parallelism: int, stop: asyncio.Event) -> JobOutcome:
        """Run every shard of ``run`` to completion, failure or stop."""
        job, shards = IndexedJob(parallelism), range(run.shards)
        if not self.settings.embedded:
            return await job.run(shards, subprocess_index(self.settings, run.run_id, stop), stop)
        async with process_parts(self.settings, run.source, self.store) as parts:
            return await job.run(shards, in_process_index(parts, run.run_id, stop), stop)
