"""Run every shard of a run on one machine with the semantics of a Kubernetes Indexed Job.

Each shard is a completion index. At most ``parallelism`` indexes run at once; an index that fails — exit 1,
or killed like a pod by a signal (128 + signal: 137 for SIGKILL or an OOM kill) — is retried up to
``backoff_limit_per_index`` times with a doubling delay (``backoffLimitPerIndex``);
a failed index does not stop the others; an index that exits 2 (bad configuration or input) fails the
whole run at once (``podFailurePolicy`` FailJob); a stop request ends every index after its checkpoint.

On embedded chDB (one process per database path) the indexes are asyncio tasks of this process sharing
one store, one rate controller and one source session; against a ClickHouse server each index is a
``clobjob worker`` subprocess with ``JOB_COMPLETION_INDEX`` set, exactly as a pod would run it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, ClobjobError
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sources.base import FillSource
from clobjob.store import Store
from clobjob.worker import ShardWorker, StoreWriter, make_controller, metrics_server


@dataclass
class IndexOutcome:
    """How one completion index ended: its last exit code and how many times it ran."""

    shard: int
    exit_code: int | None = None
    runs: int = 0


@dataclass
class JobOutcome:
    """The run's result as an Indexed Job reports it."""

    indexes: dict[int, IndexOutcome] = field(default_factory=dict)

    @property
    def completed(self) -> list[int]:
        return sorted(s for s, o in self.indexes.items() if o.exit_code == EXIT_OK)

    @property
    def failed(self) -> list[int]:
        return sorted(s for s, o in self.indexes.items() if o.exit_code not in (EXIT_OK, EXIT_SIGTERM, None))

    @property
    def exit_code(self) -> int:
        """0 all indexes complete; 2 the job failed on bad input; 143 stopped; 1 some index failed."""
        codes = {o.exit_code for o in self.indexes.values()}
        if EXIT_BAD_INPUT in codes:
            return EXIT_BAD_INPUT
        if EXIT_SIGTERM in codes or None in codes:
            return EXIT_SIGTERM
        return EXIT_FAILED if self.failed else EXIT_OK


RunIndex = Callable[[int], Awaitable[int]]


class LocalExecutor:
    """Indexed-Job semantics on one machine; ``run_index`` runs one attempt of one shard."""

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
                    if state.exit_code in (EXIT_OK, EXIT_BAD_INPUT) or state.runs > self.backoff_limit_per_index:
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


def in_process_index(settings: Settings, writer: StoreWriter, source: FillSource,
                     controller: AdaptiveRateController, run_id: str, stop: asyncio.Event,
                     on_worker: Callable[[ShardWorker], None] | None = None) -> RunIndex:
    """One attempt of a shard as a task of this process (embedded chDB: one process per database).

    Every shard of the process shares its store writer (one insert stream, one bounded buffer), its
    rate controller and its source session."""

    async def run_index(shard: int) -> int:
        worker = ShardWorker(settings, writer.store, source, controller, run_id, shard, stop=stop,
                             pod=f"local-{shard}", writer=writer)
        if on_worker:
            on_worker(worker)
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
        code = await waiter
        return 128 - code if code < 0 else code  # killed by a signal: the exit code a pod reports (137, 143)

    return run_index


async def run_local(settings: Settings, store: Store, run_id: str, shards: Sequence[int], *, parallelism: int,
                    stop: asyncio.Event, source_name: str = "subgraph",
                    on_worker: Callable[[ShardWorker], None] | None = None,
                    controller: AdaptiveRateController | None = None) -> JobOutcome:
    """Run the given shards of a run locally: tasks on embedded chDB, subprocesses on a server."""
    executor = LocalExecutor(parallelism)
    if not settings.embedded:
        return await executor.run(shards, subprocess_index(settings, run_id, stop), stop)
    from clobjob.sources import open_source

    controller = controller or make_controller(settings)
    source = open_source(source_name, settings, controller)
    writer = StoreWriter(store, settings.batch_rows)
    flushing = asyncio.create_task(writer.flush_every(settings.flush_interval_s))
    try:
        async with metrics_server(settings) as metrics:

            def started(worker: ShardWorker) -> None:
                if metrics:
                    metrics.add(worker.metrics, {"run_id": run_id, "shard": worker.shard})
                if on_worker:
                    on_worker(worker)

            return await executor.run(
                shards, in_process_index(settings, writer, source, controller, run_id, stop, started), stop)
    finally:
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)
        await writer.flush()
        writer.close()
        await source.close()
