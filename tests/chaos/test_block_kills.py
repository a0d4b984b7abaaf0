"""kill -9 of block-range units, as pods against servers: ``clobjob worker`` processes of an rpc run against the
served database and the simulated Polygon node, each SIGKILLed once its unit's checkpoint shows it mid-way (not at
a random moment), restarted as the Job does, ending with exactly the chain's fills after FINAL — per provider
profile (infura: result caps that split ranges; tiny: 10-block ranges and no batches)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import clickhouse_connect
import pytest

from clobjob.models import FILL_COLUMNS
from clobjob.sim import Dataset, SimConfig, SimServer, export
from clobjob.sim.rpc import CTF_V2, NEGRISK_V2, Chain, RpcConfig, RpcNode
from tests.chaos.harness import FAST, Database, Job
from tests.truth import run_cli, stored_rows

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

MARKETS, SEED, SHARDS = 150, 21, 2
START = 85_100_000  # both v2 exchanges trade here
BLOCKS = 20_000  # two block units (a unit holds at least 10,000 blocks)
KILL_AFTER_PAGES = 3  # a unit is killed once this many of its pages are checkpointed
# Per profile: the node's limits and latency, the client's settings (pages of small ranges, so that a unit takes
# many checkpoints). "tiny" with inline timestamps is Alchemy's free tier.
PROFILES = {
    "infura": ({"latency_s": 0.05}, {"CLOBJOB_RPC_MAX_SPAN": "50", "CLOBJOB_RPC_INITIAL_SPAN": "50"}),
    "tiny": ({"latency_s": 0.05, "inline_timestamps": True}, {"CLOBJOB_RPC_BATCH": "4"}),
}


class RecordingNode(RpcNode):
    """The simulated node, recording when each eth_getLogs call arrived and the block it started from."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.starts: list[tuple[float, int]] = []

    def _get_logs(self, query: dict) -> list[dict]:
        self.starts.append((time.monotonic(), int(query["fromBlock"], 16)))
        return super()._get_logs(query)


@pytest.fixture(scope="module")
def world():
    dataset = Dataset.generate(markets=MARKETS, seed=SEED)
    return dataset, Chain(dataset, start_block=START, blocks=BLOCKS, matches_per_block=0.4, seed=3)


@pytest.fixture(scope="module")
def db(chdb_dir):
    served = Database(chdb_dir)
    yield served
    served.stop()


def query(db: Database, sql: str, run_id: str) -> list[tuple]:
    """Rows of ``sql`` (``{run:String}`` bound) on the served database."""
    client = clickhouse_connect.get_client(dsn=db.url)
    try:
        return client.query(sql, parameters={"run": run_id}).result_rows
    finally:
        client.close()


def progress(db: Database, database: str, run_id: str) -> list[tuple]:
    """(shard, unit, state, pages, fills, cursor) of every started unit of the run."""
    return query(db, f"SELECT shard, unit_id, state, pages, fills, cursor FROM `{database}`.backfill_progress FINAL "
                     "WHERE run_id = {run:String}", run_id)


def midway(rows: list[tuple], killed: set[int]) -> tuple[int, int, int, dict] | None:
    """A unit not killed yet whose checkpoint is past ``KILL_AFTER_PAGES`` pages and short of its end:
    (shard, unit, checkpointed fills, cursor)."""
    for shard, unit, state, pages, fills, cursor in rows:
        if unit in killed or state != "running" or pages < KILL_AFTER_PAGES or not cursor:
            continue
        at = json.loads(cursor)
        if at["next"] < at["to"]:
            return shard, unit, fills, at
    return None


@pytest.mark.parametrize("profile", list(PROFILES))
def test_block_units_killed_mid_way_resume_and_end_exact(profile, world, db, tmp_path: Path):
    dataset, chain = world
    node_knobs, client_env = PROFILES[profile]
    node = RecordingNode(chain, RpcConfig.for_profile(profile, seed=SEED, head=chain.end_block + 10, **node_knobs))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        database, run_id = f"blocks_{uuid.uuid4().hex[:10]}", f"blocks-{profile}"
        env = {**FAST, **client_env, "CLOBJOB_CLICKHOUSE_URL": db.url, "CLOBJOB_CLICKHOUSE_DATABASE": database,
               "CLOBJOB_SUBGRAPH_URL": sim.url, "CLOBJOB_HOME": str(tmp_path / "home"), "CLOBJOB_RPC_URL": sim.rpc_url,
               "CLOBJOB_RPC_CONTRACTS": f"{CTF_V2}@{START},{NEGRISK_V2}@{START}", "CLOBJOB_RPC_LAG_BLOCKS": "10"}
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLOBJOB_")}, **env}
        markets, _ = export(tmp_path / "export", markets=MARKETS, seed=SEED)
        for args in (("markets", "load", str(markets)), ("plan", "--shards", str(SHARDS), "--run-id", run_id,
                                                          "--source", "rpc")):
            done = run_cli(env, *args)
            assert done.returncode == 0, (args, done.stderr[-2000:])
        kills: list[tuple[int, int, int, dict]] = []
        killed_at: list[float] = []
        with Job(env, run_id, SHARDS, tmp_path / "logs") as job:
            deadline = time.monotonic() + 90
            while len(kills) < SHARDS and not job.done() and time.monotonic() < deadline:
                found = midway(progress(db, database, run_id), {unit for _, unit, _, _ in kills})
                pid = job.procs[(found[0], 0)].pid if found else None
                if found and pid in job.live() and job.signal(pid, signal.SIGKILL):
                    kills.append(found)
                    killed_at.append(time.monotonic())
                time.sleep(0.05)
            exits = job.wait(150)
            restarts, logs = job.restarts, job.log_text()
        first_blocks = dict(query(db, f"SELECT unit_id, block_from FROM `{database}`.backfill_units FINAL "
                                      "WHERE run_id = {run:String}", run_id))
    assert len(kills) == SHARDS, (kills, logs[-3000:])  # every unit was killed mid-way, once
    assert set(exits.values()) == {0} and restarts >= len(kills), (exits, logs[-3000:])
    universe = {t: m["conditionId"] for m in dataset.markets for t in json.loads(m["clobTokenIds"])}
    truth = {row[0]: row for row in chain.truth(universe)}
    found = stored_rows(env, FILL_COLUMNS)
    assert found["dups"] == 0 and found["rows"] == truth  # nothing missing, nothing extra, every value exact
    status = json.loads(run_cli(env, "status", "--run-id", run_id, "--json").stdout)
    assert status["state"] == "done" and status["aggregate"]["fills"] == len(truth), status["aggregate"]
    assert status["v2"]["blocks_done_through"] == chain.end_block + 1
    for (_, unit, _, cursor), at in zip(kills, killed_at, strict=True):  # each resumed from its checkpoint
        low, high = first_blocks[unit], cursor["to"]
        before = [block for t, block in node.starts if t <= at and low <= block < high]
        after = [block for t, block in node.starts if t > at and low <= block < high]
        assert min(before) == low < cursor["next"] <= min(after), (unit, low, cursor, min(after))

