"""The shard worker's contract, driven through a scripted FillSource on the real store (chDB).

The scripted source is a test double of the source *interface* only: it lets each test place a failure,
a stall or a stop at an exact page. End-to-end runs against the simulator live in test_backfill.py.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from clobjob.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, BadInput, SourceError, TransientSourceError
from clobjob.models import FILL_COLUMNS, Market, UnitState, WorkUnit
from clobjob.sources.base import Page
from clobjob.worker import ShardWorker, make_controller

PAGE = 10


def fill_row(unit_id: int, i: int, token: str, condition: str) -> tuple:
    values = {c: None for c in FILL_COLUMNS}
    values.update(
        id=f"0x{unit_id:032x}{i:032x}_0x{i:064x}", transaction_hash=f"0x{unit_id:032x}{i:032x}",
        order_hash=f"0x{i:064x}", timestamp=1_700_000_000 + i, exchange="", maker="0x" + "1" * 40,
        taker="0x" + "2" * 40, maker_asset_id="0", taker_asset_id=token, maker_amount_filled=i + 1,
        taker_amount_filled=2 * i + 1, fee=0, condition_id=condition, token_id=token, side="BUY",
        is_relay_leg=False, exchange_version=1, source="test",
    )
    return tuple(values[c] for c in FILL_COLUMNS)


class ScriptedSource:
    """Pages of PAGE rows per unit; cursor = rows served so far. Faults are scripted per (unit, page)."""

    name = "scripted"

    def __init__(self, fills: dict[int, list[tuple]]) -> None:
        self.fills = fills
        self.calls: list[tuple[int, str]] = []
        self.fail_at: dict[tuple[int, int], list[BaseException]] = {}
        self.hang_at: dict[tuple[int, int], int] = {}
        self.on_page = None

    async def pages(self, unit, cursor, conditions):
        rows = self.fills[unit.unit_id]
        start = int(cursor or 0)
        while True:
            page_no = start // PAGE
            self.calls.append((unit.unit_id, str(start)))
            faults = self.fail_at.get((unit.unit_id, page_no))
            if faults:
                raise faults.pop(0)
            if self.hang_at.get((unit.unit_id, page_no), 0) > 0:
                self.hang_at[(unit.unit_id, page_no)] -= 1
                await asyncio.sleep(3600)
            chunk = rows[start:start + PAGE]
            start += len(chunk)
            if self.on_page:
                await self.on_page(unit.unit_id, page_no)
            yield Page(rows=chunk, cursor=str(start), done=start >= len(rows))
            if start >= len(rows):
                return

    async def close(self):
        pass


@pytest.fixture
def plan(store, settings):
    """A run of 2 shards with 3 units each of 0..95 rows."""
    rng = random.Random(5)
    units, fills = [], {}
    for unit_id in range(6):
        token, condition = str(1000 + unit_id), f"0x{unit_id:064x}"
        store.upsert_markets([Market(condition_id=condition, token_ids=(token,))])
        n = rng.randrange(0, 96)
        fills[unit_id] = [fill_row(unit_id, i, token, condition) for i in range(n)]
        units.append(WorkUnit(run_id="r", unit_id=unit_id, shard=unit_id % 2, condition_ids=(condition,),
                              token_ids=(token,), expected_fills=n, expected_requests=n // PAGE + 1))
    store.create_run("r", 2, units, params={})
    return fills


def fast(settings, **extra):
    return settings.with_overrides(flush_interval_s=0.05, heartbeat_interval_s=0.05, batch_rows=25,
                                   stall_timeout_s=0.5, unit_attempts=3, initial_rps=1000, **extra)


def worker(settings, store, source, shard, stop=None):
    s = fast(settings)
    return ShardWorker(s, store, source, make_controller(s), "r", shard, stop=stop, pod=f"test-{shard}")


def stored_ids(store) -> set[str]:
    return {r[0] for r in store.db.rows("SELECT id FROM {db}.clob_fills FINAL")}


async def test_shards_complete_store_everything_and_a_rerun_fetches_nothing(store, settings, plan):
    source = ScriptedSource(plan)
    assert await worker(settings, store, source, 0).run() == EXIT_OK
    assert await worker(settings, store, source, 1).run() == EXIT_OK
    assert stored_ids(store) == {row[0] for rows in plan.values() for row in rows}
    saved = store.checkpoints("r")
    assert all(cp.state is UnitState.DONE and cp.fills == len(plan[u]) for u, cp in saved.items())
    beats = store.heartbeats("r")
    assert beats[0].state == "done" and beats[1].units_done == 3
    source.calls.clear()
    assert await worker(settings, store, source, 0).run() == EXIT_OK
    assert source.calls == []


async def test_transient_errors_and_stalls_resume_from_the_cursor(store, settings, plan):
    source = ScriptedSource(plan)
    big = max(plan, key=lambda u: len(plan[u]) if u % 2 == 0 else -1)
    source.fail_at[(big, 1)] = [TransientSourceError("HTTP 503")]
    source.hang_at[(big, 2)] = 1
    assert await worker(settings, store, source, 0).run() == EXIT_OK
    assert stored_ids(store) == {row[0] for u in (0, 2, 4) for row in plan[u]}
    restarts = [c for c in source.calls if c[0] == big]
    assert (big, "10") in restarts and restarts.count((big, "10")) == 2  # resumed at page 1, not page 0
    assert restarts.count((big, "0")) == 1


async def test_a_unit_that_keeps_failing_is_marked_failed_and_the_others_finish(store, settings, plan):
    source = ScriptedSource(plan)
    source.fail_at[(2, 0)] = [TransientSourceError(f"HTTP 502 #{i}") for i in range(5)]
    assert await worker(settings, store, source, 0).run() == EXIT_FAILED
    saved = store.checkpoints("r", 0)
    assert saved[2].state is UnitState.FAILED and "HTTP 502 #2" in saved[2].last_error
    assert saved[2].attempts == 3
    assert saved[0].state is saved[4].state is UnitState.DONE


async def test_a_permanent_source_error_fails_the_shard_at_once(store, settings, plan):
    source = ScriptedSource(plan)
    source.fail_at[(0, 0)] = [SourceError("Cannot mix column filters with 'or' operator at the same level")]
    with pytest.raises(SourceError):
        await worker(settings, store, source, 0).run()


async def test_stop_checkpoints_only_what_is_stored_and_exits_143(store, settings, plan):
    source = ScriptedSource(plan)
    stop = asyncio.Event()

    async def stop_midway(unit_id, page_no):
        if page_no == 2:
            stop.set()
        await asyncio.sleep(0.01)

    source.on_page = stop_midway
    assert await worker(settings, store, source, 0, stop=stop).run() == EXIT_SIGTERM
    ids = stored_ids(store)
    saved = store.checkpoints("r", 0)
    assert any(cp.state is not UnitState.DONE for cp in saved.values())  # it did stop midway
    for unit_id, cp in saved.items():
        covered = {row[0] for row in plan[unit_id][: int(cp.cursor or 0)]}
        assert covered <= ids  # a checkpoint never points past rows that are not stored
    source.on_page = None
    assert await worker(settings, store, source, 0).run() == EXIT_OK
    assert stored_ids(store) == {row[0] for u in (0, 2, 4) for row in plan[u]}


async def test_unknown_run_or_shard_is_bad_input(store, settings, plan):
    source = ScriptedSource(plan)
    with pytest.raises(BadInput, match="shard 5"):
        await worker(settings, store, source, 5).run()
    s = fast(settings)
    with pytest.raises(BadInput, match="'nope'"):
        await ShardWorker(s, store, source, make_controller(s), "nope", 0).run()
