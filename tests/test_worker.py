"""The shard worker's contract, driven through a scripted FillSource on the real store (chDB).

End-to-end runs against the simulator live in test_backfill.py.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from clobjob.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, BadInput, SourceError, TransientSourceError
from clobjob.models import Heartbeat, RunState, UnitState
from clobjob.parts import make_controller
from clobjob.worker import ShardWorker
from tests.scripted import ScriptedSource, fast, stored_ids, worker


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


async def test_units_waiting_their_turn_at_a_low_rate_are_not_stalled(store, settings, plan):
    """Three units sharing 4 req/s wait ~0.75 s a page, beyond the 0.5 s stall timeout: that is their turn at the
    rate limit, not a stall, so no unit is restarted (a hang with nothing queued still is: the test above)."""
    s = fast(settings, max_rps=4.0)
    controller = make_controller(s)
    source = ScriptedSource(plan)

    async def through_the_rate(_unit: int, _page: int) -> None:
        async with controller.slot() as permit:
            permit.success()

    source.on_page = through_the_rate
    assert await ShardWorker(s, store, source, controller, "r", 0, pod="test-0").run() == EXIT_OK
    assert stored_ids(store) == {row[0] for u in (0, 2, 4) for row in plan[u]}
    assert len(source.calls) == len(set(source.calls))  # no unit resumed a cursor: none was restarted


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


async def test_a_pod_is_told_its_fair_share_of_the_limit_from_the_runs_heartbeats(store, settings, plan):
    """A worker working its shard alone (a pod) is told, at every beat, the fair share of the limit among the
    shards fetching now by their heartbeats (running, heard from lately), once some were throttled since its last
    beat; a finished or silent shard and one held by its own demand (this one: a few pages/s at a token rate of
    1,000) are no sharers."""
    peers = ((1, RunState.RUNNING, 6.0, 7.0, 0), (2, RunState.RUNNING, 4.0, 5.0, 0),
             (3, RunState.RUNNING, 90.0, 90.0, 60), (4, RunState.DONE, 50.0, 50.0, 0))

    def beat(requests: int, throttled: int) -> None:
        at = datetime.now(timezone.utc)
        for shard, state, rps, rate, age_s in peers:
            store.save_heartbeat(Heartbeat(run_id="r", shard=shard, pod=f"p-{shard}", state=state, rps=rps,
                                           rate_limit=rate, requests=requests, throttled=throttled,
                                           at=at - timedelta(seconds=age_s)))

    beat(requests=30, throttled=3)
    s = fast(settings).with_overrides(heartbeat_interval_s=0.3)
    controller, told = make_controller(s), []
    controller.share = told.append
    source = ScriptedSource(plan)

    async def slowly(_unit: int, page: int) -> None:
        await asyncio.sleep(0.05)
        if page == 3:  # the peers are throttled from now on
            beat(requests=60, throttled=9)

    source.on_page = slowly
    assert await ShardWorker(s, store, source, controller, "r", 0, pod="test-0", shares_limit=True).run() == EXIT_OK
    assert told[0] is None and 5.0 in told and set(told) <= {None, 5.0}  # told a share while the limit is contended


async def test_unknown_run_or_shard_is_bad_input(store, settings, plan):
    source = ScriptedSource(plan)
    with pytest.raises(BadInput, match="shard 5"):
        await worker(settings, store, source, 5).run()
    s = fast(settings)
    with pytest.raises(BadInput, match="'nope'"):
        await ShardWorker(s, store, source, make_controller(s), "nope", 0).run()


async def test_worker_serves_prometheus_metrics(store, settings, plan):
    import aiohttp

    from clobjob.parts import metrics_server

    s = fast(settings, metrics_port=0)
    source = ScriptedSource(plan)
    shard = ShardWorker(s, store, source, make_controller(s), "r", 0, pod="test-0")
    async with metrics_server(s) as metrics:
        metrics.add(shard.metrics, {"run_id": "r", "shard": 0})
        metrics.add(shard.metrics, {"run_id": "r", "shard": 0})  # a retried shard replaces, never duplicates
        assert await shard.run() == EXIT_OK
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics.port}/metrics") as answer:
                text = await answer.text()
    expected = sum(len(plan[u]) for u in (0, 2, 4))
    assert f'clobjob_fills_total{{run_id="r",shard="0"}} {expected}' in text
    assert text.count("clobjob_fills_total{") == 1
    assert "# TYPE clobjob_rate_limit_rps gauge" in text
