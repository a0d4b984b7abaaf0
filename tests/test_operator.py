"""What the operator sees, on a real terminal (a pty) and in a second terminal: the progress line with log
lines above it, Ctrl+C once (stopped, checkpointed, the resume hint, exit 143) and twice (out at once), and
``status --watch`` before, during and after a run on the embedded database and behind ``clobjob db serve``."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clobjob.monitor import STOPPED_HINT
from clobjob.sim import Dataset, SimConfig, SimServer
from tests.terminal import CTRL_C, REPO, TerminalProcess
from tests.test_backfill import prepared
from tests.truth import run_cli

pytestmark = pytest.mark.timeout(120)

PROGRESS = r"\] +\d+\.\d% [\d,]+/[\d,]+ fills · ETA"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def operator_env(tmp_path: Path, sim: SimServer, markets: int, seed: int, **extra: str) -> dict:
    env = prepared(tmp_path, Dataset.generate(markets=markets, seed=seed), sim, markets, seed,
                   CLOBJOB_HEARTBEAT_INTERVAL_S="1", CLOBJOB_FLUSH_INTERVAL_S="1", **extra)
    env.pop("CLOBJOB_LOG_FORMAT")
    return env


@pytest.fixture
def slow_sim():
    """A throttled simulator slow enough that a backfill lasts several progress intervals."""
    dataset = Dataset.generate(markets=800, seed=21)
    config = SimConfig.for_profile("throttled", seed=21, rate_limit_rps=12.0, latency_base_s=0.05)
    with SimServer(dataset, config).run_in_thread() as sim:
        yield sim


def test_progress_line_in_fills_with_a_warning_in_the_middle(tmp_path):
    dataset = Dataset.generate(markets=800, seed=22)
    config = SimConfig.for_profile("throttled", seed=22, rate_limit_rps=15.0, p_hang=0.15, hang_s=4.0)
    with SimServer(dataset, config).run_in_thread() as sim:
        env = operator_env(tmp_path, sim, 800, 22, CLOBJOB_STALL_TIMEOUT_S="1", CLOBJOB_REQUEST_TIMEOUT_S="10")
        term = TerminalProcess(["backfill", "--shards", "3"], env)
        try:
            assert term.wait(90) == 0, "\n".join(term.screen())
        finally:
            term.close()
    text, screen = term.text, term.screen()
    first_bar = re.search(PROGRESS, text)
    first_warning = text.find("WARNING")
    assert first_bar and 0 <= first_bar.start() < first_warning, "a warning came while the bar was drawn"
    assert any("unit attempt 1 failed" in line for line in screen)
    for line in screen:  # a log line is never glued to the bar, nor the bar to a log line
        assert not (re.search(PROGRESS, line) and re.search(r"\d\d:\d\d:\d\d (INFO|WARNING)", line)), line
    frames = re.findall(r"\[[#.]{10}\][^\r\n\x1b]*", text)  # every drawing of the bar
    assert len(frames) > 3 and all(len(frame) < 100 for frame in frames)  # fits the terminal, a column spare
    assert not any(re.search(PROGRESS, line) for line in screen)  # taken off once the run is over
    assert "DONE" in "\n".join(screen)
    logged = [line for line in screen if re.search(r" (INFO|WARNING) ", line)]
    assert logged and all(LOG_LINE.match(line) for line in logged)  # each log line starts its own line


def test_ctrl_c_once_stops_checkpoints_and_says_how_to_resume(tmp_path, slow_sim):
    env = operator_env(tmp_path, slow_sim, 800, 21)
    term = TerminalProcess(["backfill", "--shards", "3"], env)
    try:
        term.expect(PROGRESS, 60)
        term.send(CTRL_C)
        code = term.wait(60)
    finally:
        term.close()
    screen = [line for line in term.screen() if line]
    assert code == 143, "\n".join(screen)
    assert screen[-1] == STOPPED_HINT
    shown = "\n".join(screen)
    assert "SIGINT: stopping — flushing and checkpointing (Ctrl+C again to exit at once)" in shown
    assert "STOPPED" in shown and "retrying" not in shown and "STALLED" not in shown and "failed (" not in shown
    assert re.search(r"shard (stopped|done): ", shown)
    status = json.loads(run_cli(env, "status", "--json").stdout)
    assert status["state"] == "stopped" and status["ended"]
    assert {s["state"] for s in status["shards"]} <= {"stopped", "done"}
    assert "stopped" in {s["state"] for s in status["shards"]}


def test_ctrl_c_twice_exits_at_once(tmp_path, slow_sim):
    env = operator_env(tmp_path, slow_sim, 800, 21)
    term = TerminalProcess(["backfill", "--shards", "3"], env)
    try:
        term.expect(PROGRESS, 60)
        term.send(CTRL_C)
        term.expect("Ctrl\\+C again to exit at once", 10)
        term.send(CTRL_C)
        assert term.wait(10) == 130
    finally:
        term.close()
    assert STOPPED_HINT not in term.text  # it did not wait to checkpoint and report


# --- the second terminal ---------------------------------------------------------------------------


def clobjob(env: dict, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clobjob", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def read_until(stream, pattern: str, timeout_s: float) -> str:
    """Lines of ``stream`` until one matches ``pattern``."""
    seen, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([stream], [], [], 0.5)[0]:
            line = stream.readline()
            if not line:
                break
            seen += line
            if re.search(pattern, line):
                return seen
    raise AssertionError(f"{pattern!r} not seen within {timeout_s}s:\n{seen}")


def finish(process: subprocess.Popen, timeout_s: float = 60) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout_s}s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return process.returncode, out, err


def watch_a_run(env: dict, *, live: bool) -> None:
    """``status --watch`` started before a run waits for it and exits 0 only once it is done; started during
    one that is then stopped, it exits 143; started after, it exits at once."""
    before = clobjob(env, "status", "--watch", "3")
    read_until(before.stdout, "no run yet", 30)  # the watch just let go of the database
    backfill = clobjob(env, "backfill", "--shards", "2")
    code, out, err = finish(before, 90)
    assert code == 0, out[-3000:] + err[-3000:]
    assert backfill.wait(timeout=30) == 0, backfill.stderr.read()[-3000:]
    assert "DONE" in out  # out: what the watch showed after "no run yet"
    if live:
        assert "[live," in out and "progress [" in out and "coverage" in out.split("[live,", 1)[1]

    after = clobjob(env, "status", "--watch", "3")
    code, out, _ = finish(after, 30)
    assert code == 0 and out.count("Ctrl+C to stop") == 1 and "DONE" in out


def test_watch_before_and_after_a_run_on_the_embedded_database(tmp_path, slow_sim):
    watch_a_run(operator_env(tmp_path, slow_sim, 800, 21), live=True)


def test_watch_during_a_run_that_is_stopped_exits_143(tmp_path, slow_sim):
    env = operator_env(tmp_path, slow_sim, 800, 21)
    backfill = clobjob(env, "backfill", "--shards", "3")  # off a terminal: JSON log lines, one per progress
    read_until(backfill.stderr, '"message": "progress: ', 60)  # running and publishing
    watch = clobjob(env, "status", "--watch", "1")
    read_until(watch.stdout, r"\[live, ", 30)
    backfill.send_signal(signal.SIGTERM)
    assert backfill.wait(timeout=60) == 143
    code, out, err = finish(watch, 30)
    assert code == 143, out[-3000:] + err[-3000:]
    assert "STOPPED" in out and out.rstrip().endswith(STOPPED_HINT)


@pytest.fixture
def served(tmp_path):
    """``clobjob db serve`` of a fresh embedded database: its URL."""
    home = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path / 'served'}",
            "CLOBJOB_HOME": str(tmp_path / "home")}
    server = clobjob(home, "db", "serve", "--port", "0")
    try:
        yield re.search(r"http://[\d.]+:\d+", read_until(server.stdout, r"http://", 60)).group(0)
    finally:
        server.send_signal(signal.SIGINT)
        finish(server, 30)


def test_watch_behind_db_serve(tmp_path, slow_sim, served):
    watch_a_run(operator_env(tmp_path, slow_sim, 800, 21, CLOBJOB_CLICKHOUSE_URL=served), live=False)


def test_worker_processes_behind_db_serve_log_above_the_bar_and_stop_cleanly(tmp_path, slow_sim, served):
    env = operator_env(tmp_path, slow_sim, 800, 21, CLOBJOB_CLICKHOUSE_URL=served)
    term = TerminalProcess(["backfill", "--shards", "2"], env)
    try:
        term.expect(PROGRESS, 60)
        term.expect(r"shard starts", 30)
        term.send(CTRL_C)
        code = term.wait(60)
    finally:
        term.close()
    screen = [line for line in term.screen() if line]
    assert code == 143 and screen[-1] == STOPPED_HINT, "\n".join(screen)
    assert not any(line.lstrip().startswith("{") for line in screen)  # the workers' JSON lines, shown as text
    assert any(re.match(r"^\d\d:\d\d:\d\d INFO +run-\S+/\d shard starts", line) for line in screen)
    for line in screen:
        assert not (re.search(PROGRESS, line) and re.search(r"\d\d:\d\d:\d\d (INFO|WARNING)", line)), line
    assert "failed (" not in "\n".join(screen) and "STOPPED" in "\n".join(screen)


# --- what status shows ---------------------------------------------------------------------------------------


def test_status_of_a_run_a_rerun_finished_names_the_rerun(store):
    from clobjob import monitor
    from clobjob.models import Run, UnitState, WorkUnit
    from tests.test_monitor import NOW, beat, checkpoint

    store.create_run(Run(run_id="a", shards=1, source="subgraph"),
                     [WorkUnit(run_id="a", unit_id=0, shard=0, expected_fills=3)])
    store.save_checkpoints([checkpoint("a", 0, 0, UnitState.FAILED, error="TransientSourceError: HTTP 503")])
    store.save_heartbeat(beat("a", 0, 100, "failed"))
    assert monitor.run_status(store, "a", now=NOW)["finished_by"] is None
    store.create_run(Run(run_id="a-r1", shards=1, source="subgraph", parent_run_id="a"),
                     [WorkUnit(run_id="a-r1", unit_id=0, shard=0, expected_fills=3)])
    store.save_checkpoints([checkpoint("a-r1", 0, 0, UnitState.DONE, fills=3)])
    status = monitor.run_status(store, "a", now=NOW)
    assert status["state"] == "failed" and status["finished_by"] == "a-r1"
    assert status["reruns"] == [{"run_id": "a-r1", "state": "done"}]
    assert "finished by rerun a-r1 (done)" in monitor.render_status(status)


def test_the_status_table_fits_100_columns_and_keeps_the_error_code(store):
    from clobjob import monitor
    from clobjob.models import Run, UnitState, WorkUnit
    from tests.test_monitor import NOW, beat, checkpoint

    error = ("TransientSourceError: subgraph: gave up after 8 attempts: HTTP 503: 'upstream connect error or "
             "disconnect/reset before headers. reset reason: overflow, and a very long tail of text'")
    store.create_run(Run(run_id="w", shards=2, source="subgraph"),
                     [WorkUnit(run_id="w", unit_id=0, shard=0, expected_fills=48_247),
                      WorkUnit(run_id="w", unit_id=1, shard=1, expected_fills=10)])
    store.save_checkpoints([checkpoint("w", 0, 0, UnitState.DONE, fills=48_800, pages=49),
                            checkpoint("w", 1, 1, UnitState.FAILED, error=error)])
    store.save_heartbeat(beat("w", 1, 1, "running", now=NOW).model_copy(update={"pod": "x" * 60}))
    text = monitor.render_status(monitor.run_status(store, "w", now=NOW))
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert "TransientSourceError(HTTP 503): subgraph: gave up after 8 attempts:" in text
    assert "48,800+" in text and monitor.status.MORE_THAN_EXPECTED in text
    assert monitor.short_error(error, 40) == "TransientSourceError(HTTP 503): subgrap…"  # 40 columns


def test_progress_is_in_fills_with_an_eta_from_the_measured_rate():
    from clobjob.monitor import ProgressMeter, Requests, render_progress

    clock = iter([0.0, 10.0])
    meter = ProgressMeter(clock=lambda: next(clock))

    def status(fills: int, state: str = "running", error: str = "") -> dict:
        shards = [{"state": "done", "fills": 500, "expected_fills": 500, "last_error": ""},
                  {"state": state, "fills": fills - 500, "expected_fills": 9_500, "last_error": error}]
        return {"state": "running", "aggregate": {"fills": fills, "expected_fills": 10_000}, "shards": shards}

    first = meter.update(status(1_000), Requests(requests=10, throttled=0, errors=0))
    assert first["done_share"] == 0.1 and first["eta_s"] is None and first["remaining_fills"] == 9_000
    second = meter.update(status(3_000, error="TransientSourceError: HTTP 503: busy"),
                          Requests(requests=110, throttled=10, errors=5, retries=4), retrying=[1])
    assert second["fills_per_s"] == 200.0 and second["rps"] == 10.0 and second["eta_s"] == 35.0
    assert second["share_429"] == 0.1 and second["share_errors"] == 0.05
    wide = render_progress(second, 200)
    assert wide == ("[###.......] 30.0% 3,000/10,000 fills · ETA 35s · 200 fills/s · 10.0 req/s · 429s 10.0% · "
                    "errors 5.0% · retrying shard 1 · retries 4 · last: TransientSourceError(HTTP 503): busy")
    narrow = render_progress(second, 100)  # the least telling figures give way
    assert len(narrow) <= 100 and narrow.startswith("[###.......] 30.0% 3,000/10,000 fills · ETA 35s · 200 fills/s")
    assert "retrying shard 1 · retries 4" in narrow and "req/s" not in narrow
