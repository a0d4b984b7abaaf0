"""`clobjob rerun` on chDB: exactly the failed / unfinished units, shard selection, cursors carried over, nothing
to rerun; and end to end against the simulator: a run that fails for real, fixed by a rerun, then `verify`."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

import pytest

from clobjob.cli import main
from clobjob.errors import BadInput
from clobjob.models import Checkpoint, Heartbeat, Run, RunKind, RunParams, UnitState, WorkUnit
from clobjob.parts import make_controller
from clobjob.plan import resumable_run
from clobjob.rerun import plan_rerun, rerun_id
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sources.subgraph import SubgraphIndexingError
from clobjob.store import open_store
from clobjob.worker import ShardWorker
from tests.scripted import PAGE, ScriptedSource, fast, stored_ids

# (shard, unit id, state of the latest checkpoint (None = never started), cursor, pages)
SEED = [
    (0, 0, UnitState.DONE, "c0", 3), (0, 1, UnitState.FAILED, "c1", 2), (0, 2, None, "", 0),
    (1, 3, UnitState.FAILED, "", 0), (1, 4, UnitState.RUNNING, "c4", 1), (1, 5, UnitState.DONE, "c5", 1),
    (2, 6, UnitState.PENDING, "", 0), (2, 7, UnitState.FAILED, "c7", 5), (2, 8, UnitState.DONE, "c8", 9),
]


def seed_run(store, run_id: str = "r") -> dict[int, WorkUnit]:
    """A 3-shard subgraph backfill run: units 1, 3, 7 failed; 2, 4, 6 unfinished; 0, 5, 8 done."""
    units = {u: WorkUnit(run_id=run_id, shard=s, unit_id=u, condition_ids=(f"0x{u:064x}",), token_ids=(str(100 + u),),
                         ts_from=1000 * u if u % 2 else None, ts_to=1000 * u + 500 if u % 2 else None,
                         id_from=f"0x{u:08x}" if u % 3 else None, id_to=f"0x{u + 1:08x}" if u % 3 == 1 else None,
                         expected_fills=1000 * u, expected_requests=u + 10)
             for s, u, *_ in SEED}
    store.create_run(Run(run_id=run_id, shards=3, source="subgraph", params=RunParams(kind=RunKind.BACKFILL)),
                     list(units.values()))
    store.save_checkpoints([Checkpoint(run_id=run_id, shard=s, unit_id=u, state=state, cursor=cursor, pages=pages,
                                       fills=10 * pages, attempts=3, last_error="boom")
                            for s, u, state, cursor, pages in SEED if state is not None])
    return units


def work(unit: WorkUnit) -> tuple:
    """What a unit fetches (its identity across runs)."""
    return (unit.condition_ids, unit.token_ids, unit.ts_from, unit.ts_to, unit.id_from, unit.id_to,
            unit.expected_fills, unit.expected_requests)


def test_rerun_failed_creates_a_run_of_exactly_the_failed_units(store):
    parent = seed_run(store)
    units = plan_rerun(store, "r", "r-r1", failed_only=True)
    assert Counter(map(work, units)) == Counter(work(parent[u]) for u in (1, 3, 7))
    assert store.units("r-r1") == sorted(units, key=lambda u: (u.shard, u.unit_id))
    assert sorted(u.unit_id for u in units) == [0, 1, 2] and {u.shard for u in units} == {0, 1, 2}  # 3 shards held them
    run = store.run("r-r1")
    assert (run.parent_run_id, run.source, run.shards) == ("r", "subgraph", 3)
    assert run.params == RunParams(kind=RunKind.RERUN, failed_only=True, from_shards=None, units=3)
    # each unit resumes from its stored cursor: a fresh pending checkpoint (unit 3 never stored one: from scratch)
    new = {u.unit_id: u for u in units}
    assert {work(new[cp.unit_id]): (cp.shard, cp.state, cp.cursor, cp.pages, cp.fills, cp.attempts, cp.last_error)
            for cp in store.checkpoints("r-r1").values()} == {
        work(parent[1]): (new_shard(units, parent[1]), UnitState.PENDING, "c1", 2, 20, 0, ""),
        work(parent[7]): (new_shard(units, parent[7]), UnitState.PENDING, "c7", 5, 50, 0, ""),
    }
    assert store.checkpoints("r")[1].state is UnitState.FAILED  # the parent run is left as it was


def new_shard(units: list[WorkUnit], old: WorkUnit) -> int:
    return next(u.shard for u in units if work(u) == work(old))


def test_rerun_shards_takes_every_unfinished_unit_of_those_shards(store):
    parent = seed_run(store)
    units = plan_rerun(store, "r", "r-r1", shards=[1, 2])
    assert Counter(map(work, units)) == Counter(work(parent[u]) for u in (3, 4, 6, 7))
    assert store.run("r-r1").shards == 2 and store.run("r-r1").params.from_shards == (1, 2)
    spread = plan_rerun(store, "r", "r-r2", shards=[0, 1, 2], new_shards=5)
    assert Counter(map(work, spread)) == Counter(work(parent[u]) for u in (1, 2, 3, 4, 6, 7))
    assert {u.shard for u in spread} == set(range(5))  # LPT over 5 shards: one unit each, the two smallest doubled
    failed_of_one = plan_rerun(store, "r", "r-r3", failed_only=True, shards=[2])
    assert [work(u) for u in failed_of_one] == [work(parent[7])] and store.run("r-r3").shards == 1
    with pytest.raises(BadInput, match="no shard 3, 7"):
        plan_rerun(store, "r", "r-r4", shards=[1, 3, 7])
    with pytest.raises(BadInput, match="no run 'nope'"):
        plan_rerun(store, "nope", "nope-r1")
    assert rerun_id(store, "r") == "r-r4"


def test_nothing_to_rerun(store, settings, capsys):
    seed_run(store)
    store.save_checkpoints([Checkpoint(run_id="r", shard=s, unit_id=u, state=UnitState.DONE)
                            for s, u, state, *_ in SEED if state is UnitState.FAILED])
    assert plan_rerun(store, "r", "r-r1", failed_only=True, shards=[0, 2]) == []
    assert store.run("r-r1") is None
    assert cli(settings, "rerun", "--run-id", "r", "--failed") == 0
    assert "run r: nothing to rerun (no failed unit)" in capsys.readouterr().out
    assert [r.run_id for r in store.runs()] == ["r"]
    assert cli(settings, "rerun", "--run-id", "nope") == 2
    assert cli(settings, "rerun", "--run-id", "r", "--shards", "9") == 2
    assert "no shard 9" in capsys.readouterr().err


def test_a_running_run_is_not_rerun(store, settings, capsys):
    seed_run(store)
    store.save_heartbeat(Heartbeat(run_id="r", shard=1, pod="p", at=datetime.now(timezone.utc), state="running"))
    assert cli(settings, "rerun", "--run-id", "r", "--failed") == 2
    assert "still running" in capsys.readouterr().err and store.run("r-r1") is None


def test_backfill_does_not_resume_a_run_a_rerun_took_over(store):
    seed_run(store)
    assert resumable_run(store).run_id == "r"
    plan_rerun(store, "r", "r-r1", failed_only=True)
    assert resumable_run(store) is None  # backfill plans what is still missing instead


async def test_rerun_resumes_each_unit_from_its_stored_cursor(store, settings, plan):
    unit_id = next(u for u, rows in plan.items() if len(rows) > 2 * PAGE)
    source = ScriptedSource(plan)
    source.fail_at[(unit_id, 2)] = [SubgraphIndexingError("indexing_error")]
    fast_settings = fast(settings)

    async def work_shards(run_id: str, shards: int) -> list[int]:
        return [await ShardWorker(fast_settings, store, source, make_controller(fast_settings), run_id, shard).run()
                for shard in range(shards)]

    assert 1 in await work_shards("r", 2)
    failed = store.checkpoints("r")[unit_id]
    assert (failed.state, failed.cursor) == (UnitState.FAILED, str(2 * PAGE))
    (unit,) = plan_rerun(store, "r", "r-r1", failed_only=True)
    source.calls.clear()
    assert await work_shards("r-r1", 1) == [0]
    assert source.calls[0] == (unit_id, str(2 * PAGE))  # not from the start
    done = store.checkpoints("r-r1")[unit.unit_id]
    assert (done.state, done.fills) == (UnitState.DONE, len(plan[unit_id]))
    assert stored_ids(store) == {row[0] for rows in plan.values() for row in rows}


# --- end to end against the simulator -------------------------------------------------------------


def cli(settings, *argv: str) -> int:
    return main(["--clickhouse-url", settings.dsn(), "--database", settings.clickhouse_database, *argv])


@pytest.mark.timeout(180)
def test_failed_run_fixed_by_rerun_then_verify_passes(settings, tmp_path, monkeypatch, capsys):
    dataset = Dataset.generate(markets=80, seed=21)
    gamma = tmp_path / "markets.jsonl"
    gamma.write_text("".join(json.dumps(m) + "\n" for m in dataset.markets))
    monkeypatch.setenv("CLOBJOB_HOME", str(tmp_path / "home"))
    with SimServer(dataset, SimConfig.for_profile("clean")).run_in_thread() as sim:
        monkeypatch.setenv("CLOBJOB_SUBGRAPH_URL", sim.url)
        assert cli(settings, "markets", "load", str(gamma)) == 0
        assert cli(settings, "markets", "sync") == 0
        sim.configure(indexing_error=True)  # every fill query now fails: the units fail for good
        assert cli(settings, "backfill", "--shards", "3") == 1
        with open_store(settings) as store:
            (failed_run,) = store.runs()
            failed = {u.unit_id for u in store.units(failed_run.run_id)}
            assert {cp.state for cp in store.checkpoints(failed_run.run_id).values()} == {UnitState.FAILED}
        assert cli(settings, "verify") == 1
        capsys.readouterr()

        sim.configure(indexing_error=False)
        assert cli(settings, "rerun", "--run-id", failed_run.run_id, "--failed", "--new-shards", "2") == 0
        assert f"rerun {failed_run.run_id}-r1 of {failed_run.run_id}: {len(failed)} unit(s) over 2 shard(s)" \
            in capsys.readouterr().out
        with open_store(settings) as store:
            rerun = store.run(f"{failed_run.run_id}-r1")
            assert rerun.parent_run_id == failed_run.run_id and rerun.kind is RunKind.RERUN
            assert store.count_fills() == sum(1 for _ in dataset.iter_truth())
        assert cli(settings, "verify", "--json") == 0
        result = json.loads(capsys.readouterr().out)
        assert result["ready"] and result["markets"]["coverage"] == 1.0
        assert {c["name"]: c["status"] for c in result["criteria"]}["no_run_in_progress"] == "pass"
        assert cli(settings, "status", "--json") == 0
        assert json.loads(capsys.readouterr().out)["parent_run_id"] == failed_run.run_id
        requests = sim.stats()["fill_requests"]
        assert cli(settings, "backfill") == 0 and "nothing to fetch" in capsys.readouterr().out
        assert sim.stats()["fill_requests"] == requests
