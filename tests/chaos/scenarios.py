"""The chaos scenarios, each a whole run of worker processes against the served database and the simulator with
its faults injected, ending with the outcome against the ground truth. The CI suite (tests/chaos) and the longer
seeded schedule of bench/chaos_report.py run the same functions with different sizes."""

from __future__ import annotations

import bisect
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import clickhouse_connect

from clobjob.sim import Dataset, SimConfig, SimServer
from tests.chaos.harness import Database, Job, Outcome, client_pid, insert_raw_progress, outcome, prepare
from tests.truth import run_cli

RATE_RPS = 40.0  # the simulator's limit in every scenario (all processes share it: one client address)
HOLD_S = 0.4  # how long a trapped insert is held in flight before the kill lands


@dataclass
class Figures:
    """One scenario's figures for the report."""

    scenario: str
    faults: Counter = field(default_factory=Counter)
    restarts: int = 0
    outcome: Outcome | None = None
    fill_requests: int = 0
    fills_served: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # (unix time, shard, how long an insert was held slow before it) of each SIGKILL of a process that had started
    killed: list[tuple[float, int, float]] = field(default_factory=list)
    units_hit: int = 0  # units running in the killed process, summed over the kills
    allowance_fills: float = 0.0  # fills a running unit fetched per flush interval before a kill, on average
    # (unix time, fills served, the shards whose process is fetching) sampled during the kills
    served: list[tuple[float, float, frozenset[int]]] = field(default_factory=list)

    def kills(self) -> int:
        """The SIGKILLs injected."""
        return sum(n for fault, n in self.faults.items() if fault.startswith("kill -9"))

    @property
    def refetched_fills(self) -> int:
        """Fills the simulator served more than once (pages fetched again after a crash, a stop, a second pod)."""
        return self.fills_served - (self.outcome.expected if self.outcome else 0)

    @property
    def refetch_per_unit_hit(self) -> float | None:
        """Re-fetched fills per kill per unit the kill interrupted, in flush intervals of that unit's fetching
        (``allowance_fills``): the acceptance is at most 1."""
        if not self.units_hit or not self.allowance_fills:
            return None
        return self.refetched_fills / self.units_hit / self.allowance_fills


@dataclass
class Chaos:
    """A chaos run in the making: its dataset, simulator, database and processes' environment."""

    workdir: Path
    db: Database
    dataset: Dataset
    sim: SimServer
    env: dict[str, str]
    run_id: str
    shards: int
    rng: random.Random
    figures: Figures
    inserts_before: Counter = field(default_factory=Counter)

    def job(self, *, copies: int = 1) -> Job:
        return Job(self.env, self.run_id, self.shards, self.workdir / f"logs-{uuid.uuid4().hex[:6]}", copies=copies)

    def worker(self, shard: int, *, quiet: bool = False, **env: str) -> subprocess.Popen:
        """One worker process of ``shard`` (outside a Job: nothing restarts it); its log in ``stderr`` (read it
        once it ended), or nowhere when ``quiet`` (a pipe nobody reads would block a long run)."""
        return subprocess.Popen([sys.executable, "-m", "clobjob", "worker", "--run-id", self.run_id],
                                env={**self.env, "JOB_COMPLETION_INDEX": str(shard), **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else subprocess.PIPE,
                                text=True)

    def finish(self, job: Job, timeout_s: float = 150) -> dict:
        """Wait for the Job; every index must end done (exit 0)."""
        exits = job.wait(timeout_s)
        self.figures.restarts += job.restarts
        assert set(exits.values()) == {0}, (exits, job.log_text()[-3000:])
        return exits

    def wait_for(self, what: Callable[[], bool], timeout_s: float = 60, why: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline, f"timed out waiting for {why}"
            time.sleep(0.05)

    def query(self, sql: str, **params: object) -> list[tuple]:
        """Rows of ``sql`` on the run's database over HTTP (``{db}``, ``{run:String}`` and ``params`` bound)."""
        client = clickhouse_connect.get_client(dsn=self.db.url)
        try:
            text = sql.replace("{db}", f"`{self.env['CLOBJOB_CLICKHOUSE_DATABASE']}`")
            return client.query(text, parameters={"run": self.run_id, **params}).result_rows
        finally:
            client.close()

    def inserts(self, table: str) -> int:
        """Inserts into ``table`` the database received during this run."""
        return self.db.inserts[table] - self.inserts_before[table]


@contextmanager
def chaos(name: str, workdir: Path, db: Database, *, markets: int, seed: int, shards: int,
          **sim_knobs: object) -> Iterator[Chaos]:
    """Plan a fresh run on its own database, serve the simulator, and on exit record the outcome."""
    dataset = Dataset.generate(markets=markets, seed=seed)
    config = SimConfig.for_profile("throttled", seed=seed, rate_limit_rps=RATE_RPS, **sim_knobs)
    figures = Figures(name)
    workdir.mkdir(parents=True, exist_ok=True)
    with SimServer(dataset, config).run_in_thread() as sim:
        run_id = f"chaos-{name}"
        env = prepare(workdir, dataset, seed, db, sim.url, f"chaos_{uuid.uuid4().hex[:10]}", shards, run_id)
        served_before = sim.stats()
        started = time.monotonic()
        run = Chaos(workdir, db, dataset, sim, env, run_id, shards, random.Random(seed), figures, Counter(db.inserts))
        yield run
        figures.wall_s = time.monotonic() - started
        stats = sim.stats()
        figures.fill_requests = int(stats["fill_requests"] - served_before["fill_requests"])
        figures.fills_served = int(stats["fills_served"] - served_before["fills_served"])
        figures.faults["429 answers"] += int(stats["throttled_429"])
        figures.faults["hung answers"] += int(stats["hang"])
        figures.outcome = outcome(env, dataset, run_id)
        measure_kills(figures, run)


def measure_kills(figures: Figures, c: Chaos) -> None:
    """The allowance of each kill, from the simulator's counter of fills served (sampled during the run) and the
    kept versions of every checkpoint: the fills served in the flush interval before the kill per unit fetching
    then (not done, in a process that has started its units), over the interval and the time an insert was held
    slow before the kill (what is requested meanwhile is lost too); the units hit are the killed shard's."""
    interval = float(c.env["CLOBJOB_FLUSH_INTERVAL_S"])
    found = c.query("SELECT unit_id, any(shard), minIf(toUnixTimestamp64Milli(updated_at), state = 'done') / 1000 "
                    "FROM {db}.backfill_progress_history WHERE run_id = {run:String} AND pod != 'vandal' "
                    "GROUP BY unit_id")
    times = [sampled[0] for sampled in figures.served]

    def sampled(at: float) -> tuple[float, float, frozenset[int]]:
        return figures.served[max(bisect.bisect_right(times, at) - 1, 0)]

    hit = allowance = 0.0
    for at, shard, held in figures.killed:
        _, now, fetching = sampled(at)
        running = [s for _, s, done in found if done > at and s in fetching | {shard}]
        mine = sum(1 for s in running if s == shard)
        hit += mine
        per_unit = (now - sampled(at - interval)[1]) / len(running) if running else 0.0
        allowance += mine * per_unit * (interval + held) / interval
    figures.units_hit = int(hit)
    figures.allowance_fills = allowance / hit if hit else 0.0


# --- the scenarios -------------------------------------------------------------------------------------


def baseline(c: Chaos) -> None:
    """No fault: the reference wall time and pages."""
    with c.job() as job:
        c.finish(job)


def kills(c: Chaos, count: int = 20) -> None:
    """``count`` SIGKILLs of worker processes: a quarter while an insert of fills is held in flight, a quarter
    while a checkpoint insert is, a quarter just after a fills insert ran (before its checkpoint), the rest at
    seeded random moments; the Job restarts each index."""
    kinds = [("fills in flight", "clob_fills", False), ("checkpoint in flight", "backfill_progress", False),
             ("fills stored, checkpoint not", "clob_fills", True), ("random moment", "", False)]
    sampling = threading.Event()

    with c.job() as job:

        def sample() -> None:
            while not sampling.wait(0.1):
                fetching = frozenset(job.fetching(pid) for pid in job.live()) - {None}
                c.figures.served.append((time.time(), c.sim.stats()["fills_served"], fetching))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for n in range(count * 3):
            if c.figures.kills() >= count or job.done():
                break
            kind, table, after = kinds[n % len(kinds)]
            if table:
                assert c.db.server is not None
                trap = c.db.server.arm(table, after=after, hold_s=HOLD_S)
                if not trap.caught.wait(20):
                    continue
                pid = client_pid(trap.peer, job.live())
            else:
                time.sleep(c.rng.uniform(0.2, 1.2))
                live = job.live()
                pid = c.rng.choice(live) if live else None
            shard = job.fetching(pid) if pid is not None else None
            if pid is not None and job.signal(pid, signal.SIGKILL):
                c.figures.faults[f"kill -9, {kind}"] += 1
                if shard is not None:  # a process killed while it starts up had fetched nothing
                    c.figures.killed.append((time.time(), shard, HOLD_S if table else 0.0))
            time.sleep(c.rng.uniform(0.2, 0.6))  # let the restarted pod get going
        c.finish(job)
        sampling.set()
        sampler.join()


def two_pods(c: Chaos) -> None:
    """Two worker processes on every index for the whole run."""
    with c.job(copies=2) as job:
        c.figures.faults["second pod per index"] += c.shards
        c.finish(job)


def sigterm_throttled(c: Chaos, grace_s: float = 10.0) -> None:
    """SIGTERM to a worker while the limit answers most requests with 429: it exits 143 within the grace period
    with every fill it fetched stored and checkpointed; the Job then finishes the run."""
    c.sim.configure(rate_limit_rps=1.0, burst=1)
    worker = c.worker(0)
    c.wait_for(lambda: c.inserts("backfill_progress") >= 2 and c.sim.stats()["throttled_429"] >= 3, 60,
               "checkpoints under heavy throttling")
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        code = worker.wait(grace_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError(f"SIGTERM not honoured within {grace_s} s") from None
    c.figures.faults["SIGTERM under 429 storm"] += 1
    c.figures.notes.append(f"exit {code} {time.monotonic() - sent:.1f} s after SIGTERM")
    err = worker.stderr.read() if worker.stderr else ""
    assert code == 143, err[-2000:]
    fetched = re.search(r"shard stopped: .*?(\d+) fills fetched", err)
    assert fetched, err[-2000:]
    checkpointed = c.query("SELECT sum(fills) FROM {db}.backfill_progress FINAL WHERE run_id = {run:String} "
                           "AND shard = 0")[0][0]
    assert checkpointed == int(fetched.group(1)) > 0, (checkpointed, fetched.group(0))  # nothing fetched is lost
    c.sim.configure(rate_limit_rps=RATE_RPS, burst=10)
    with c.job() as job:
        c.finish(job)


def outage_back(c: Chaos, down_s: float = 8.0, late_s: float = 6.0) -> None:
    """Every worker started while the ClickHouse server is down, the server started ``late_s`` later; then the
    server stopped for ``down_s`` mid-run and started again on the same port: the workers wait and retry; no
    process exits, no unit fails."""
    c.db.stop()
    with c.job() as job:
        c.wait_for(lambda: job.log_text().count("unreachable, waiting for it") == c.shards, 60,
                   "every worker waiting for the server")
        time.sleep(late_s)
        c.db.start()
        c.figures.faults[f"ClickHouse up {late_s:g} s after the workers"] += 1
        c.wait_for(lambda: c.inserts("clob_fills") >= 2, 60, "the first inserts")
        with c.db.down_for(down_s):
            c.figures.faults[f"ClickHouse down {down_s:g} s"] += 1
        c.finish(job)
        assert job.restarts == 0, job.log_text()[-3000:]


def outage_away(c: Chaos, budget_s: float = 4.0) -> None:
    """A server that stays away, from a worker's start and then mid-run: each time the worker fails with exit 1
    and the reason (the DSN without its password) within its outage budget; a SIGTERM while it waits ends it at
    once; once the server is back the Job finishes the run with nothing lost."""
    secret = c.db.url.replace("http://", "http://default:s3cret@")
    shown = secret.replace("s3cret", "***")

    def gone(worker: subprocess.Popen, since: float, when: str) -> str:
        try:
            code = worker.wait(budget_s + 30)
            err = worker.stderr.read() if worker.stderr else ""
        finally:
            worker.kill()
        c.figures.faults[f"ClickHouse gone for good, {when}"] += 1
        c.figures.notes.append(f"{when}: exit {code} {time.monotonic() - since:.1f} s after the server went away")
        assert code == 1, err[-2000:]
        assert "unreachable for" in err and shown in err and "s3cret" not in err, err[-2000:]
        return err

    c.db.stop()
    try:
        since = time.monotonic()
        err = gone(c.worker(0, CLOBJOB_STORE_OUTAGE_S=str(budget_s), CLOBJOB_CLICKHOUSE_URL=secret), since,
                   "from the start")
        assert f"ClickHouse at {shown} unreachable, waiting for it" in err, err[-2000:]
        waiting = c.worker(0, CLOBJOB_STORE_OUTAGE_S="60")
        try:
            time.sleep(3)
            waiting.send_signal(signal.SIGTERM)
            assert waiting.wait(10) == -signal.SIGTERM
        finally:
            waiting.kill()
        c.figures.faults["SIGTERM while waiting for ClickHouse"] += 1
    finally:
        c.db.start()
    c.sim.configure(rate_limit_rps=1.0, burst=1)  # a page a second: the server goes away with the unit unfinished
    worker = c.worker(0, CLOBJOB_STORE_OUTAGE_S=str(budget_s), CLOBJOB_CLICKHOUSE_URL=secret)
    c.wait_for(lambda: c.inserts("clob_fills") >= 1, 60, "the first insert")
    c.db.stop()
    try:
        gone(worker, time.monotonic(), "mid-run")
    finally:
        c.db.start()
        c.sim.configure(rate_limit_rps=RATE_RPS, burst=10)
    with c.job() as job:
        c.finish(job)


def storms(c: Chaos, low_s: float = 6.0, paused_s: float = 5.0) -> None:
    """Hung answers all along (cut by the request timeout), one worker paused with SIGSTOP for longer than the
    stall timeout and resumed (the laptop that slept), then the limit dropping to a tenth for ``low_s`` (429
    storms) and recovering."""
    c.sim.configure(p_hang=0.1, hang_s=4.0)
    with c.job() as job:
        c.wait_for(lambda: c.inserts("clob_fills") >= 2, 60, "the first inserts")
        pid = c.rng.choice(job.live())
        if job.signal(pid, signal.SIGSTOP):
            time.sleep(paused_s)
            job.signal(pid, signal.SIGCONT)
            c.figures.faults[f"SIGSTOP {paused_s:g} s (stall timeout 3 s)"] += 1
        c.sim.configure(rate_limit_rps=RATE_RPS / 10, burst=1)
        c.figures.faults[f"limit ÷10 for {low_s:g} s"] += 1
        time.sleep(low_s)
        c.sim.configure(rate_limit_rps=RATE_RPS, burst=10)
        c.finish(job)


def corrupt_checkpoint(c: Chaos) -> None:
    """Units' stored checkpoints replaced by rows that fail validation (a newer version of their progress row):
    a cursor the source did not make, a state that is no unit state, a negative fill count. ``status`` shows
    each as invalid; the worker reports each (run, shard, unit, the value, where) and resumes each unit from its
    last valid checkpoint."""
    worker = c.worker(0, quiet=True)
    checkpointed = ("SELECT unit_id, pages, fills FROM {db}.backfill_progress FINAL WHERE run_id = {run:String} "
                    "AND shard = 0 AND pages > 0 ORDER BY state = 'done', unit_id LIMIT 3")
    c.wait_for(lambda: len(c.query(checkpointed)) == 3, 60, "three units checkpointed")
    worker.kill()
    worker.wait()
    found = c.query(checkpointed)
    garbage = {"cursor": {"state": 1, "cursor": "{garbage", "fills": 7, "pages": 999}, "state": {"state": 7},
               "fills": {"state": 1, "fills": -5}}
    client = clickhouse_connect.get_client(dsn=c.db.url)
    try:
        for (unit, _, _), values in zip(found, garbage.values()):
            insert_raw_progress(client, c.env["CLOBJOB_CLICKHOUSE_DATABASE"], run_id=c.run_id, unit_id=unit, **values)
    finally:
        client.close()
    c.figures.faults["corrupted checkpoints (cursor, state, fills)"] += 1
    shown = run_cli(c.env, "status", "--run-id", c.run_id, "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    invalid = {bad["unit_id"]: bad for bad in json.loads(shown.stdout)["invalid_checkpoints"]}
    assert set(invalid) == {found[1][0], found[2][0]}, invalid  # status checks the row, not the source's cursor
    assert invalid[found[1][0]]["reason"].startswith("state 7") and "fills 18446744073709551611" in \
        invalid[found[2][0]]["reason"], invalid
    with c.job() as job:
        c.finish(job)
        logs = job.log_text()
    for (unit, pages, fills), value in zip(found, ("{garbage", "state 7", "fills 18446744073709551611")):
        warned = [line for line in logs.splitlines() if f"unit {unit}: stored checkpoint is invalid" in line]
        assert warned and value in warned[0] and c.run_id in warned[0] and "pod vandal" in warned[0], logs[-3000:]
        assert f"resuming from its last valid checkpoint ({pages} pages, {fills} fills)" in warned[0], warned[0]
    c.figures.notes.append(f"units {', '.join(str(u) for u, _, _ in found)} resumed from their last valid "
                           f"checkpoints ({', '.join(str(p) for _, p, _ in found)} pages)")


SCENARIOS: dict[str, Callable[..., None]] = {
    "kill -9 ×N": kills, "two pods per index": two_pods, "SIGTERM throttled": sigterm_throttled,
    "ClickHouse outage, back": outage_back, "ClickHouse outage, gone": outage_away, "source storms": storms,
    "corrupted checkpoint": corrupt_checkpoint,
}

# About 0.8 s a full page (graph-node's service time), so runs last long enough for faults to land mid-run.
DEFAULT = {"markets": 300, "shards": 2, "latency_base_s": 0.3, "latency_per_row_ms": 0.5}
LONG = {**DEFAULT, "markets": 1200, "shards": 3}  # enough work for a pause then a collapsed limit
KILLS = {**LONG, "markets": 2000}  # enough work for 20 kills, each a flush interval (2 s) apart or less
SIZES = {"kill -9 ×N": KILLS, "source storms": LONG, "corrupted checkpoint": LONG}


def run_exact(name: str, db: Database, workdir: Path) -> Figures:
    """Run scenario ``name`` at its size (seed 18); assert it ended with every fill stored exactly once after FINAL,
    faults injected, and ``clobjob status`` agreeing. Its figures, for the scenario's own checks."""
    with chaos(name.split()[0], workdir, db, seed=18, **SIZES.get(name, DEFAULT)) as run:
        SCENARIOS[name](run)
    figures, out = run.figures, run.figures.outcome
    assert out is not None
    assert (out.missing, out.extra, out.differing) == (0, 0, 0), figures
    assert out.stored == out.expected > 0
    assert out.status_state == "done" and out.status_units == (out.status_units[2], 0, out.status_units[2]), out
    assert out.status_fills == out.expected, out
    assert sum(figures.faults.values()) > 0
    return figures
