"""Indexed-Job semantics of the local executor."""

from __future__ import annotations

import asyncio

from clobjob.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SIGTERM
from clobjob.executors.local import IndexedJob, in_process_index
from clobjob.parts import GC_YOUNG_OBJECTS, Parts, make_controller, process_parts
from clobjob.store.writer import StoreWriter
from tests.scripted import ScriptedSource, fast, stored_ids


def scripted(codes: dict[int, list[int]], log: list[tuple[int, int]], running: list[int] | None = None):
    async def run_index(shard: int) -> int:
        if running is not None:
            running.append(1)
            assert len(running) <= 2  # parallelism respected
        await asyncio.sleep(0.01)
        if running is not None:
            running.pop()
        code = codes[shard].pop(0)
        log.append((shard, code))
        return code

    return run_index


async def test_failed_index_is_retried_per_index_and_does_not_stop_others():
    log: list[tuple[int, int]] = []
    killed = 128 + 9  # a pod killed by SIGKILL or the OOM killer fails like exit 1
    codes = {0: [EXIT_FAILED, EXIT_OK], 1: [EXIT_FAILED, killed, EXIT_FAILED], 2: [killed, EXIT_OK], 3: [EXIT_OK]}
    outcome = await IndexedJob(parallelism=2, backoff_limit_per_index=2, retry_delay_s=0.01).run(
        [0, 1, 2, 3], scripted(codes, log, running=[]), asyncio.Event())
    assert outcome.completed == [0, 2, 3] and outcome.failed == [1]
    assert outcome.indexes[1].runs == 3 and outcome.indexes[0].runs == 2 and outcome.indexes[2].runs == 2
    assert outcome.exit_code == EXIT_FAILED


async def test_a_retry_is_logged_with_the_run_and_told_but_a_stop_is_never_retried():
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(f"{message.record['extra'].get('run_id')} {message}"),
                      format="{message}")
    told: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def on_retry(shard: int, state) -> None:
        told.append((shard, state.value))

    async def run_index(shard: int) -> int:
        if shard == 1:
            await asyncio.sleep(0.1)  # index 0 has failed and waits for its retry
            stop.set()
            return EXIT_SIGTERM
        return EXIT_FAILED

    try:
        job = IndexedJob(parallelism=2, retry_delay_s=0.5, run_id="run-x", on_retry=on_retry)
        outcome = await job.run([0, 1], run_index, stop)
    finally:
        logger.remove(sink)
    assert lines == ["run-x index 0 failed (attempt 1 of 3, exit 1); retrying in 0.5s\n"]
    assert told == [(0, "starting"), (0, "stopped")]  # the stop came during the retry's delay
    assert outcome.indexes[1].exit_code == EXIT_SIGTERM and outcome.indexes[1].runs == 1
    assert job.retries == 0 and job.retrying == set()


async def test_bad_input_fails_the_whole_job():
    log: list[tuple[int, int]] = []
    codes = {0: [EXIT_BAD_INPUT], 1: [EXIT_FAILED, EXIT_FAILED, EXIT_OK]}
    outcome = await IndexedJob(parallelism=2, retry_delay_s=0.2).run([0, 1], scripted(codes, log),
                                                                       asyncio.Event())
    assert outcome.exit_code == EXIT_BAD_INPUT
    assert outcome.indexes[1].runs == 1  # no retry after the job failed


async def test_stop_ends_every_index_with_143(store, settings, plan):
    source = ScriptedSource(plan)
    stop = asyncio.Event()

    async def slow(unit_id, page_no):
        await asyncio.sleep(0.05)
        if page_no == 1:
            stop.set()

    source.on_page = slow
    s = fast(settings)
    writer = StoreWriter(store, s.batch_rows)  # shared by both shards: one buffer, one insert stream
    parts = Parts(s, make_controller(s), source, writer, None)
    outcome = await IndexedJob(parallelism=2).run([0, 1], in_process_index(parts, "r", stop), stop)
    assert outcome.exit_code == EXIT_SIGTERM
    source.on_page = None
    outcome = await IndexedJob(parallelism=2).run([0, 1], in_process_index(parts, "r", asyncio.Event()),
                                                  asyncio.Event())
    writer.close()
    assert outcome.exit_code == EXIT_OK and outcome.completed == [0, 1]
    assert stored_ids(store) == {row[0] for rows in plan.values() for row in rows}


class HeldInserts:
    """The store's fill inserts held in flight until ``release`` (``held`` once one is)."""

    def __init__(self, store) -> None:
        import threading

        self.store, self.insert = store, store.insert_fills
        self.held, self.release = threading.Event(), threading.Event()
        store.insert_fills = self._slow

    def _slow(self, columns):
        self.held.set()
        self.release.wait(10)
        return self.insert(columns)

    def restore(self) -> None:
        self.release.set()
        self.store.insert_fills = self.insert


def unit_page(cursor: str, *rows: int) -> tuple:
    """``StoreWriter.add`` arguments: unit 1's checkpoint at ``cursor`` and its fills ``rows`` (as a page's columns)."""
    from clobjob.models import Checkpoint
    from clobjob.sources.base import Page
    from tests.scripted import fill_row

    return (Checkpoint(run_id="r", shard=0, unit_id=1, cursor=cursor, fills=max(rows) + 1, pages=1), "p",
            Page.of_rows([fill_row(1, i, "7", "0x07") for i in rows], cursor, False).columns)


async def test_pages_fill_the_next_batch_while_one_is_stored_and_wait_only_when_it_is_full(store, settings):
    """Back-pressure without a stall: while a batch is being stored, pages are queued at once; a page that fills
    the next batch waits for the stored one, and a unit cancelled meanwhile (a stop) still has that page queued,
    so the next flush stores it with its checkpoint."""
    writer, inserts = StoreWriter(store, 2), HeldInserts(store)  # the first batch is held in flight
    try:
        storing = asyncio.create_task(writer.add(*unit_page("a", 0, 1)))  # a full batch: stored at once
        await asyncio.to_thread(inserts.held.wait, 10)
        await asyncio.wait_for(writer.add(*unit_page("b", 2)), 1)  # queued while the first batch is stored
        filling = asyncio.create_task(writer.add(*unit_page("c", 3)))  # fills the next batch: waits for the first
        await asyncio.sleep(0.1)
        assert not filling.done() and store.checkpoints("r") == {}
        filling.cancel()
        inserts.release.set()
        await storing
        assert filling.cancelled() and store.checkpoints("r")[1].cursor == "a"
        inserts.restore()
        await writer.flush()
        assert store.checkpoints("r")[1].cursor == "c" and stored_ids(store) == {
            unit_page("-", i)[2][0][0] for i in range(4)}
    finally:
        inserts.restore()
        writer.close()


async def test_a_page_waits_while_the_store_is_slow_and_is_kept_meanwhile(store):
    """Once a batch has been storing for longer than a quarter of the flush interval, a unit's next page waits for it
    (queued already): a kill during a slow insert costs a unit no more than it fetched in that time."""
    writer, inserts = StoreWriter(store, 1_000, flush_interval_s=0.4), HeldInserts(store)
    try:
        await writer.add(*unit_page("a", 0))
        storing = asyncio.create_task(writer.flush())
        await asyncio.to_thread(inserts.held.wait, 10)
        await asyncio.wait_for(writer.add(*unit_page("b", 1)), 1)  # the store is not slow yet
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(writer.add(*unit_page("c", 2)))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        inserts.release.set()
        await asyncio.wait_for(waiting, 5)
        await storing
        inserts.restore()
        await writer.flush()
        assert store.checkpoints("r")[1].cursor == "c" and len(stored_ids(store)) == 3
    finally:
        inserts.restore()
        writer.close()


async def test_a_fetching_process_collects_cyclic_garbage_in_fewer_larger_rounds(settings, store):
    """Pages of row tuples would otherwise run the collector every 700 objects; reference cycles are still freed."""
    import gc
    import weakref

    class Node:
        pass

    async with process_parts(settings, "subgraph", store):
        assert gc.isenabled() and gc.get_threshold()[0] == GC_YOUNG_OBJECTS
        freed = []
        for _ in range(10):
            node = Node()
            node.self = node  # a cycle: only the collector frees it
            weakref.finalize(node, freed.append, 1)
            del node
        keep = [[] for _ in range(2 * GC_YOUNG_OBJECTS)]  # enough young containers to start a collection
        assert len(freed) == 10
        del keep
