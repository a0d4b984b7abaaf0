"""Concurrency from the work: a unit's remaining id range is cut into sub-ranges paged at once, all of them
in the unit's one cursor, resumed together (also from the cursors of before), each fill fetched once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from clobjob.config import Settings
from clobjob.lanes import ShardLanes
from clobjob.models import WorkUnit
from clobjob.parts import make_controller
from clobjob.sim import Dataset, SimConfig, SimServer, export
from clobjob.sources.subgraph import (
    PAGE_SIZE,
    SPLIT_MARGIN,
    Segment,
    SubgraphSource,
    decode_cursor,
    kept_pages,
    remaining_pages,
    split_segment,
)
from clobjob.store import open_store
from clobjob.store.serve import EngineServer
from tests.truth import expected_rows, run_cli, stored_rows

GIANT = 24_000  # fills of the dataset's largest market: 24 pages


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.generate(markets=30, seed=13, top_fills=GIANT)


def giant_unit(ds: Dataset, **changes: Any) -> WorkUnit:
    """The largest market of ``ds`` as one unit, as the planner writes it."""
    tokens: dict[str, list[str]] = {}
    for token, condition in ds.token_to_condition.items():
        tokens.setdefault(condition, []).append(token)
    condition = max(tokens, key=lambda c: sum(ds.trades_quantity(t) for t in tokens[c]))
    fills = sum(ds.trades_quantity(t) for t in tokens[condition])
    return WorkUnit(**{"run_id": "r", "unit_id": 0, "shard": 0, "condition_ids": (condition,),
                       "token_ids": tuple(sorted(tokens[condition])), "expected_fills": fills,
                       "expected_requests": fills // PAGE_SIZE + 1, **changes})


async def page_through(server: SimServer, unit: WorkUnit, cursor: str = "", *, stop_after: int | None = None,
                       lanes: bool = True) -> tuple[list[tuple], list[str]]:
    """Rows and cursors of ``unit``'s pages (the first ``stop_after`` only), with lanes granted as a worker does."""
    settings = Settings(subgraph_url=server.url)
    controller = make_controller(settings)
    shard = ShardLanes(controller)
    rows, cursors = [], []
    async with SubgraphSource(settings, controller) as source:
        pages = source.pages(unit, cursor, {}, shard.open(unit.unit_id) if lanes else None)
        try:
            async for page in pages:
                rows += page.rows
                cursors.append(page.cursor)
                if stop_after is not None and len(cursors) == stop_after:
                    break
        finally:
            await pages.aclose()
    return rows, cursors


def giant_ids(ds: Dataset, unit: WorkUnit) -> set[str]:
    tokens = set(unit.token_ids)
    return {f["id"] for f in ds.iter_truth() if f["tokenId"] in tokens}


def test_a_segment_is_cut_at_the_midpoint_of_what_remains():
    unit = giant_unit(Dataset.generate(markets=5, seed=1), id_from="0x40000000", id_to="0x80000000")
    segment = Segment(0, 2, "0x40000000")
    upper = split_segment(unit, segment)
    assert (segment.upto, upper.after, upper.upto) == ("0x6000000000000000", "0x6000000000000000", "0x80000000")
    running = Segment(0, 2, "0x7" + "f" * 63 + "_0x" + "1" * 64)  # after a full id: only prefixes are cut
    assert split_segment(unit, running) is None  # nothing left between it and the bound
    assert split_segment(unit, Segment(0, 2, "0x5" + "0" * 63 + "_0x00")).after == "0x6800000000000000"
    assert split_segment(unit, Segment(0, 2, "not-hex")) is None


def test_a_cut_keeps_whole_pages_less_a_margin_and_hands_on_the_rest():
    """A lane that cuts its range keeps about half of it rounded down to whole pages, less ``SPLIT_MARGIN``: its
    last page is then partial, so the part costs exactly its pages (a midpoint cut of 2 pages left two parts of
    ~1,000 fills, each a full page and an empty one)."""
    unit = giant_unit(Dataset.generate(markets=5, seed=1, top_fills=24_000), id_from="0x40000000",
                      id_to="0x80000000")
    for pages, kept in ((2.0, 1), (3.9, 1), (7.3, 3), (24.0, 12)):
        assert kept_pages(pages) == pytest.approx(kept * (1 - SPLIT_MARGIN))
    segment = Segment(0, 2, "0x40000000")
    whole = remaining_pages(unit, segment)
    upper = split_segment(unit, segment, kept_pages(whole) / whole)
    assert remaining_pages(unit, segment) == pytest.approx(kept_pages(whole), rel=1e-6)
    assert remaining_pages(unit, upper) == pytest.approx(whole - kept_pages(whole), rel=1e-6)
    assert segment.upto == upper.after and upper.upto == "0x80000000"


async def test_a_giant_unit_pages_its_ranges_at_once_and_fetches_each_fill_once(dataset):
    unit = giant_unit(dataset)
    config = SimConfig.for_profile("clean", seed=13, latency_base_s=0.2, rate_limit_rps=60.0, burst=10)
    async with SimServer(dataset, config) as server:
        rows, cursors = await page_through(server, unit)
        stats = server.stats()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == giant_ids(dataset, unit)
    assert stats["fills_served"] == len(ids)  # no fill fetched twice by the split ranges
    assert stats["in_service_peak"] > 1  # one unit, several requests at once
    assert max(len(json.loads(c)) for c in cursors) > 1  # the cursor held several ranges
    assert json.loads(cursors[-1]) == [] and len(cursors) <= unit.expected_requests * 1.5


async def test_without_lanes_a_unit_pages_one_request_at_a_time(dataset):
    unit = giant_unit(dataset)
    config = SimConfig.for_profile("clean", seed=13, latency_base_s=0.05)
    async with SimServer(dataset, config) as server:
        rows, cursors = await page_through(server, unit, lanes=False)
        stats = server.stats()
    assert {r[0] for r in rows} == giant_ids(dataset, unit)
    assert stats["in_service_peak"] == 1 and len(cursors) == unit.expected_requests


async def test_a_cursor_of_several_ranges_resumes_every_one_of_them_exactly(dataset):
    unit = giant_unit(dataset)
    config = SimConfig.for_profile("clean", seed=13, latency_base_s=0.2, rate_limit_rps=60.0, burst=10)
    async with SimServer(dataset, config) as server:
        first, cursors = await page_through(server, unit, stop_after=8)
        split = cursors[-1]
        served = server.stats()["fills_served"]
        rest, _ = await page_through(server, unit, split)
        again = server.stats()["fills_served"] - served
    assert len(json.loads(split)) > 1
    ids = [r[0] for r in first + rest]
    assert len(ids) == len(set(ids)) and set(ids) == giant_ids(dataset, unit)
    assert again == len(rest)  # the resumed ranges fetched nothing the first pages had


async def test_a_cursor_of_before_the_split_resumes(dataset):
    """A checkpoint written before ranges could be cut (``[lo, hi, after]``) resumes, and may be cut."""
    unit = giant_unit(dataset)
    config = SimConfig.for_profile("clean", seed=13, latency_base_s=0.1, rate_limit_rps=60.0, burst=10)
    async with SimServer(dataset, config) as server:
        first, _ = await page_through(server, unit, stop_after=3, lanes=False)
        old = json.dumps([[0, len(unit.token_ids), first[-1][0]]])
        assert decode_cursor(unit, old, 200)[0].upto is None
        rest, cursors = await page_through(server, unit, old)
    assert {r[0] for r in first + rest} == giant_ids(dataset, unit) and len(first + rest) == GIANT
    assert any(len(json.loads(c)[0]) == 4 for c in cursors[:-1])  # cut after resuming


# --- a real worker process killed mid-split -------------------------------------------------------


def checkpoints(settings: Settings, run_id: str) -> list:
    with open_store(settings) as store:
        return list(store.checkpoints(run_id).values())


@pytest.mark.slow
def test_a_worker_killed_while_a_unit_is_split_resumes_every_range_from_its_checkpoint(dataset, chdb_dir, settings,
                                                                                     tmp_path):
    config = SimConfig.for_profile("clean", seed=13, latency_base_s=0.3, latency_jitter=0.2, rate_limit_rps=40.0,
                                   burst=10)
    with EngineServer(str(chdb_dir)).run_in_thread() as db, SimServer(dataset, config).run_in_thread() as sim:
        served = settings.with_overrides(clickhouse_url=db.url)
        env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": db.url, "CLOBJOB_SUBGRAPH_URL": sim.url,
               "CLOBJOB_CLICKHOUSE_DATABASE": settings.clickhouse_database, "CLOBJOB_HOME": str(tmp_path / "home"),
               "CLOBJOB_LOG_FORMAT": "json", "CLOBJOB_FLUSH_INTERVAL_S": "0.5", "CLOBJOB_BATCH_ROWS": "3000"}
        for name in ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE"):
            env.pop(name, None)
        markets_file, _ = export(tmp_path / "export", markets=30, seed=13, top_fills=GIANT)
        assert run_cli(env, "markets", "load", str(markets_file)).returncode == 0
        assert run_cli(env, "markets", "sync").returncode == 0
        assert run_cli(env, "plan", "--shards", "1", "--run-id", "split").returncode == 0
        worker = subprocess.Popen([sys.executable, "-m", "clobjob", "worker", "--run-id", "split", "--shard", "0"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, split = time.monotonic() + 90, []
        while not split and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
            split = [cp for cp in checkpoints(served, "split") if cp.cursor and len(json.loads(cp.cursor)) > 1]
        assert split, "no unit was split into ranges stored in its checkpoint"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        time.sleep(1.0)  # answers in service when the worker died are counted by now
        at_kill = sim.stats()["fills_served"]
        covered = sum(cp.fills for cp in checkpoints(served, "split"))
        assert 0 < covered < GIANT  # killed mid-run, with part of it stored
        assert any(len(json.loads(cp.cursor or "[]")) > 1 for cp in checkpoints(served, "split"))
        resumed = run_cli(env, "worker", "--run-id", "split", "--shard", "0")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        stats = sim.stats()
        found = stored_rows(env)
    truth = expected_rows(dataset)
    assert found["dups"] == 0 and found["rows"] == truth
    # Each range resumed exactly at its checkpoint: the resumed worker fetched what no checkpoint covered, and
    # only that; the fills fetched twice are those fetched but not yet flushed when the worker died.
    assert stats["fills_served"] - at_kill == len(truth) - covered
    assert stats["in_service_peak"] > 1
