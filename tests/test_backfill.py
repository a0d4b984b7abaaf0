"""End to end against the simulator: `clobjob backfill` recovers exactly the ground truth on clean and hostile
profiles and waits for a reader holding the embedded database (kill -9 and SIGTERM: test_backfill_kill.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clobjob.sim import Dataset, SimConfig, SimServer, export
from tests.truth import expected_rows, run_cli, stored_rows

pytestmark = pytest.mark.timeout(240)

@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.generate(markets=2000, seed=11)


def prepared(tmp_path: Path, dataset: Dataset, sim: SimServer, markets: int, seed: int, **extra: str) -> dict:
    """Env for a fresh embedded database with the universe loaded and synced from the simulator."""
    env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path / 'db'}", "CLOBJOB_SUBGRAPH_URL": sim.url,
           "CLOBJOB_LOG_FORMAT": "json", "CLOBJOB_HOME": str(tmp_path / "home"), **extra}
    for name in ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE"):
        env.pop(name, None)
    markets_file, _ = export(tmp_path / "export", markets=markets, seed=seed)
    assert run_cli(env, "markets", "load", str(markets_file)).returncode == 0
    assert run_cli(env, "markets", "sync").returncode == 0
    return env


@pytest.mark.parametrize("profile", ["clean", "hostile"])
def test_backfill_recovers_the_ground_truth_exactly(profile, dataset, tmp_path):
    faults = {"p_5xx": 0.05, "p_graphql_timeout": 0.04, "p_overloaded": 0.03, "p_empty_body": 0.04,
              "p_truncated": 0.04, "p_slow": 0.03, "p_hang": 0.03} if profile == "hostile" else {}
    config = SimConfig.for_profile(profile, seed=3, hang_s=60.0, slow_s=0.5, **faults)
    with SimServer(dataset, config).run_in_thread() as sim:
        # starting above the limit, the first second meets the limit however slow this machine is
        env = prepared(tmp_path, dataset, sim, 2000, 11, CLOBJOB_REQUEST_TIMEOUT_S="2", CLOBJOB_STALL_TIMEOUT_S="30",
                       CLOBJOB_INITIAL_RPS="60")
        done = run_cli(env, "backfill", "--shards", "3")
        assert done.returncode == 0, done.stderr[-3000:]
        stats = sim.stats()
    found = stored_rows(env)
    truth = expected_rows(dataset)
    assert found["dups"] == 0
    assert found["rows"].keys() == truth.keys()  # no missing id, no extra id
    assert found["rows"] == truth  # every field equal
    if profile == "hostile":  # every fault really happened during the run
        for outcome in ("throttled_429", "http_5xx", "graphql_timeout", "empty_body", "truncated", "hang"):
            assert stats[outcome] > 0, (outcome, stats)


HOLD = ("import sys, time\nfrom clobjob.config import Settings\nfrom clobjob.store import open_store\n"
        "with open_store(Settings()):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[1]))\n")


def test_a_backfill_waits_for_a_reader_that_holds_the_embedded_database_a_moment(tmp_path):
    """`status --watch` in another terminal holds the embedded database at every refresh: a backfill started at
    that moment waits for it (here it gets in, and finds the universe empty), and only a database held for longer
    fails it, naming the holder."""
    env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path / 'db'}", "CLOBJOB_HOME": str(tmp_path / "home")}

    def backfill_while_held(seconds: float) -> subprocess.CompletedProcess:
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], env=env, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            return run_cli(env, "backfill", "--shards", "1")
        finally:
            holder.kill()
            holder.wait(timeout=30)

    briefly = backfill_while_held(1.5)
    assert briefly.returncode == 2 and "the market universe is empty" in briefly.stderr, briefly.stderr[-3000:]
    held = backfill_while_held(30)
    assert held.returncode == 1 and "in use by another process" in held.stderr, held.stderr[-3000:]
