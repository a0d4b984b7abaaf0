"""kill -9 at random moments, then SIGTERM, then resume: exact, and at most a flush interval refetched per kill
(its own file: the slowest tests of one file run on one xdist worker one after another)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

from clobjob.sim import Dataset, SimConfig, SimServer
from tests.test_backfill import prepared
from tests.truth import expected_rows, run_cli, stored_rows


def test_kill_9_at_random_moments_then_resume_exact_and_sigterm_checkpoints(tmp_path):
    dataset = Dataset.generate(markets=2000, seed=5)
    rng = random.Random(2026)
    config = SimConfig.for_profile("throttled", seed=5, rate_limit_rps=25.0)
    with SimServer(dataset, config).run_in_thread() as sim:
        env = prepared(tmp_path, dataset, sim, 2000, 5, CLOBJOB_FLUSH_INTERVAL_S="1",
                       CLOBJOB_HEARTBEAT_INTERVAL_S="1", CLOBJOB_INITIAL_RPS="20")
        before = sim.stats()["fill_requests"]
        kills = 0
        for _ in range(3):
            process = subprocess.Popen([sys.executable, "-m", "clobjob", "backfill", "--shards", "4"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2.0, 5.0))
            if process.poll() is None:
                process.kill()  # SIGKILL: no flush, no checkpoint, no goodbye
                kills += 1
            process.wait(timeout=30)

        # SIGTERM: stop fetching, flush, checkpoint, exit 143 within 10 s
        process = subprocess.Popen([sys.executable, "-m", "clobjob", "backfill", "--shards", "4"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(3.0)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            # the contract is an exit within 10 s (the pod's grace period); a longer wait raises TimeoutExpired
            assert process.wait(timeout=10) == 143, process.stderr.read()[-2000:]
            found = stored_rows(env)
            assert found["progress"].get("running", 0) + found["progress"].get("done", 0) > 0

        final = run_cli(env, "backfill")
        assert final.returncode == 0, final.stderr[-3000:]
        fetched = sim.stats()["fill_requests"] - before

        again = run_cli(env, "backfill")
        assert again.returncode == 0 and "nothing to fetch" in again.stdout
        assert sim.stats()["fill_requests"] - before == fetched  # zero fill requests once complete

    found = stored_rows(env)
    truth = expected_rows(dataset)
    assert found["dups"] == 0 and found["rows"] == truth

    # Pages fetched more than once: at most one flush interval of pages per kill (rate × interval) plus the
    # pages in flight — measured against the pages a single uninterrupted run needs.
    with SimServer(dataset, SimConfig.for_profile("clean", seed=5)).run_in_thread() as clean_sim:
        baseline_env = prepared(tmp_path / "baseline", dataset, clean_sim, 2000, 5)
        assert run_cli(baseline_env, "backfill", "--shards", "4").returncode == 0
        needed = clean_sim.stats()["fill_requests"]
    refetched = fetched - needed
    assert kills >= 1
    assert refetched <= (kills + 1) * (25 * 1 + 16), (fetched, needed, kills)
