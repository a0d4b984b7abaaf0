"""Monitor on chDB: status math, shard states, the JSON schema, live status, verify and the HTML report."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from clobjob import cli, monitor
from clobjob.errors import BadInput
from clobjob.models import FILL_COLUMNS, Checkpoint, Heartbeat, Market, Run, UnitState, WorkUnit, coverage_summary
from tests.terminal import readable
from tests.test_store import make_fill

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
RNG = random.Random(7)
REPO = Path(__file__).resolve().parents[1]


def cid(n: int) -> str:
    return f"0x{n:064x}"


def market(n: int, tokens: tuple[str, ...], *, end: datetime | None = None, volume: float = 0.0,
           start: datetime | None = None) -> Market:
    return Market(condition_id=cid(n), token_ids=tokens, question=f"market {n}?", end_date=end, volume=volume,
                  start_date=start)


def fills(token: str, *times: datetime) -> list[tuple]:
    rows = []
    for at in times:
        values = dict(zip(FILL_COLUMNS, make_fill(RNG.randrange(10**6), RNG)))
        values.update(token_id=token, timestamp=int(at.timestamp()))
        rows.append(tuple(values[c] for c in FILL_COLUMNS))
    return rows


def beat(run_id: str, shard: int, age_s: float, state: str = "running", *, rps: float = 0.0, requests: int = 0,
         throttled: int = 0, now: datetime = NOW) -> Heartbeat:
    return Heartbeat(run_id=run_id, shard=shard, pod=f"pod-{shard}", at=now - timedelta(seconds=age_s),
                     state=state, rps=rps, requests=requests, throttled=throttled)


def checkpoint(run_id: str, shard: int, unit_id: int, state: UnitState, fills: int = 0, pages: int = 0,
               error: str = "") -> Checkpoint:
    return Checkpoint(run_id=run_id, shard=shard, unit_id=unit_id, state=state, fills=fills, pages=pages,
                      last_error=error)


# --- market coverage -----------------------------------------------------------------------------


def seed_coverage(store) -> None:
    """A complete, B incomplete, C and E zero-fill (E has no orderbook row but predates the sync),
    D missing (added after the sync, no orderbook row: expected unknown, nothing stored)."""
    store.upsert_markets([
        market(1, ("11", "12"), end=datetime(2026, 10, 15, tzinfo=timezone.utc), volume=50),
        market(2, ("21",), end=datetime(2026, 10, 20, tzinfo=timezone.utc), volume=40),
        market(3, ("31",), end=datetime(2026, 11, 1, tzinfo=timezone.utc)),
        market(5, ("51",), end=datetime(2026, 11, 2, tzinfo=timezone.utc)),
    ])
    store.upsert_orderbooks({"11": (cid(1), 3), "12": (cid(1), 2), "21": (cid(2), 4), "31": (cid(3), 0)})
    time.sleep(0.01)
    store.upsert_markets([market(4, ("41",))])
    hour, day = timedelta(hours=1), timedelta(days=1)
    store.insert_fill_rows(fills("11", NOW - hour, NOW, NOW - 3 * day) + fills("12", NOW - 30 * day, NOW + hour)
                           + fills("21", NOW - day))


def test_market_categories_and_coverage(store):
    seed_coverage(store)
    markets = {m.condition_id: m for m in store.market_fill_counts()}
    assert {c: (m.status.value, m.expected_fills, m.stored_fills, m.gap) for c, m in markets.items()} == {
        cid(1): ("complete", 5, 5, 0), cid(2): ("incomplete", 4, 1, 3), cid(3): ("zero_fill", 0, 0, 0),
        cid(4): ("missing", None, 0, 0), cid(5): ("zero_fill", 0, 0, 0),
    }
    assert coverage_summary(list(markets.values())) == {
        "universe": 5, "covered": 3, "not_covered": 2, "coverage": 0.6, "complete": 1, "zero_fill": 2,
        "incomplete": 1, "missing": 1, "unknown": 0, "source_short": 0, "waiting_v2": 0,
    }
    assert coverage_summary([])["coverage"] is None


def test_recent_fills_by_fill_timestamp(store):
    seed_coverage(store)
    # (now - 24h, now]: now - 1h and now; 7 days adds now - 3d and now - 24h; now + 1h and now - 30d never
    assert store.recent_fills(NOW) == {"fills_24h": 2, "fills_7d": 4}


def test_coverage_by_month_and_worst_gaps(store):
    seed_coverage(store)
    markets = store.market_fill_counts()
    assert monitor.coverage_by_month(markets) == [
        {"month": "2026-10", "covered": 1, "not_covered": 1},
        {"month": "2026-11", "covered": 2, "not_covered": 0},
        {"month": "no end date", "covered": 0, "not_covered": 1},
    ]
    assert monitor.worst_gaps(markets) == [{"condition_id": cid(2), "question": "market 2?",
                                            "end_date": "2026-10-20T00:00:00+00:00", "expected": 4,
                                            "stored": 1, "missing": 3}]


# --- run status ----------------------------------------------------------------------------------

STATUS_KEYS = {"schema_version", "generated_at", "live", "live_age_s", "stalled_after_s", "run_id",
               "parent_run_id", "created_at", "source", "state", "ended", "reruns", "finished_by", "markets", "recent",
               "v2", "aggregate", "shards", "invalid_checkpoints"}
MARKETS_KEYS = {"universe", "covered", "not_covered", "coverage", "complete", "zero_fill", "incomplete", "missing",
                "unknown", "source_short", "waiting_v2"}
AGGREGATE_KEYS = {"units_done", "units_failed", "units_total", "fills", "expected_fills", "rps", "share_429",
                  "remaining_requests", "eta_s"}
SHARD_KEYS = {"shard", "state", "units_done", "units_failed", "units_total", "fills", "expected_fills", "rps",
              "share_429", "remaining_requests", "heartbeat_age_s", "eta_s", "last_error", "pod"}


def seed_run(store) -> None:
    """Six shards, one per state: 0 done, 1 failed, 2 running, 3 stalled, 4 pending, 5 done (no units)."""
    plan = [(0, 0, 10, 1), (0, 1, 20, 1), (1, 2, 5, 1), (1, 3, 5, 1), (2, 4, 7, 2), (2, 5, 100, 5), (2, 6, 50, 4),
            (3, 7, 30, 3), (4, 8, 1, 1)]
    units = [WorkUnit(run_id="r1", shard=s, unit_id=u, token_ids=(str(u),), expected_fills=f, expected_requests=r)
             for s, u, f, r in plan]
    store.create_run(Run(run_id="r1", shards=6, source="subgraph", parent_run_id="r0"), units)
    store.save_checkpoints([
        checkpoint("r1", 0, 0, UnitState.DONE, 10, 1), checkpoint("r1", 0, 1, UnitState.DONE, 20, 1),
        checkpoint("r1", 1, 2, UnitState.DONE, 5, 1), checkpoint("r1", 1, 3, UnitState.RUNNING, 2, 1, "HTTP 502"),
        checkpoint("r1", 2, 4, UnitState.DONE, 7, 2), checkpoint("r1", 2, 5, UnitState.RUNNING, 40, 2, "timeout"),
        checkpoint("r1", 3, 7, UnitState.RUNNING),
    ])
    time.sleep(0.01)
    store.save_checkpoints([checkpoint("r1", 1, 3, UnitState.FAILED, 2, 1, "HTTP 500 forever")])
    for hb in (beat("r1", 0, 100, "done", requests=10), beat("r1", 1, 50, "failed", requests=10),
               beat("r1", 2, 15, rps=2.0, requests=100, throttled=5),
               beat("r1", 3, 15.001, rps=3.0, requests=10, throttled=1)):
        store.save_heartbeat(hb)


def test_run_status_math_is_exact(store):
    seed_coverage(store)
    seed_run(store)
    status = monitor.run_status(store, now=NOW, heartbeat_interval_s=5, stalled_after=3)
    shards = {s["shard"]: s for s in status["shards"]}
    assert [shards[i]["state"] for i in range(6)] == ["done", "failed", "running", "stalled", "pending", "done"]
    assert shards[0] == {"shard": 0, "state": "done", "units_done": 2, "units_failed": 0, "units_total": 2,
                         "fills": 30, "expected_fills": 30, "rps": 0.0, "share_429": 0.0, "remaining_requests": 0,
                         "heartbeat_age_s": 100.0, "eta_s": 0.0, "last_error": "", "pod": "pod-0"}
    assert shards[1]["last_error"] == "HTTP 500 forever" and (shards[1]["units_done"], shards[1]["units_failed"]) \
        == (1, 1)
    # running: remaining = (5 - 2 pages) + max(4 - 0, 1) = 7 requests at 2 req/s
    assert {k: shards[2][k] for k in ("units_done", "units_total", "fills", "expected_fills", "rps", "share_429",
                                      "remaining_requests", "eta_s", "heartbeat_age_s", "last_error")} == {
        "units_done": 1, "units_total": 3, "fills": 47, "expected_fills": 157, "rps": 2.0, "share_429": 0.05,
        "remaining_requests": 7, "eta_s": 3.5, "heartbeat_age_s": 15.0, "last_error": "timeout"}
    assert (shards[3]["rps"], shards[3]["eta_s"], shards[3]["remaining_requests"], shards[3]["heartbeat_age_s"]) \
        == (0.0, None, 3, 15.001)
    assert (shards[4]["heartbeat_age_s"], shards[4]["pod"], shards[4]["remaining_requests"]) == (None, "", 1)
    assert shards[5]["units_total"] == 0
    assert status["aggregate"] == {"units_done": 4, "units_failed": 1, "units_total": 9, "fills": 84,
                                   "expected_fills": 228, "rps": 2.0, "share_429": 6 / 130,
                                   "remaining_requests": 11, "eta_s": 5.5}
    assert (status["run_id"], status["parent_run_id"], status["source"], status["state"]) == \
        ("r1", "r0", "subgraph", "running")
    assert status["markets"]["coverage"] == 0.6 and status["markets"]["not_covered"] == 2
    assert status["recent"] == {"fills_24h": 2, "fills_7d": 4}
    assert status["stalled_after_s"] == 15 and status["generated_at"] == NOW.isoformat()


def test_status_json_schema_is_stable(store):
    empty = monitor.run_status(store, now=NOW)
    assert set(empty) == STATUS_KEYS and set(empty["aggregate"]) == AGGREGATE_KEYS
    assert empty["run_id"] is None and empty["state"] is None and empty["shards"] == []
    seed_run(store)
    status = json.loads(json.dumps(monitor.run_status(store, now=NOW)))
    assert set(status) == STATUS_KEYS and status["schema_version"] == 4 and status["live"] is False
    assert set(status["markets"]) == MARKETS_KEYS and set(status["recent"]) == {"fills_24h", "fills_7d"}
    assert set(status["aggregate"]) == AGGREGATE_KEYS
    assert all(set(s) == SHARD_KEYS for s in status["shards"])
    light = monitor.run_status(store, now=NOW, coverage=False)
    assert set(light) == STATUS_KEYS and light["markets"] is None and light["recent"] is None


def test_status_shows_a_progress_row_that_fails_validation_and_what_its_unit_resumes_from(store):
    from tests.chaos.harness import insert_raw_progress

    seed_run(store)
    insert_raw_progress(store.db.client, store.db.database, run_id="r1", shard=2, unit_id=5, state=7, fills=40)
    status = json.loads(json.dumps(monitor.run_status(store, "r1", now=NOW)))
    (bad,) = status["invalid_checkpoints"]
    assert (bad["shard"], bad["unit_id"], bad["resumes_from"]) == (2, 5, {"pages": 2, "fills": 40})
    assert bad["reason"].startswith("state 7: ") and "pod vandal" in bad["where"]
    shard = next(s for s in status["shards"] if s["shard"] == 2)
    assert (shard["units_done"], shard["units_failed"], shard["units_total"]) == (1, 0, 3)
    assert "invalid checkpoint: shard 2 unit 5: state 7: " in monitor.render_status(status)
    assert "resumes from 2 pages" in monitor.render_status(status)


def test_default_run_is_the_latest_and_unknown_run_is_bad_input(store):
    store.create_run(Run(run_id="old", shards=1, source="subgraph"), [])
    store.create_run(Run(run_id="new", shards=1, source="subgraph"), [])
    assert monitor.run_status(store, now=NOW)["run_id"] == "new"
    assert monitor.run_status(store, "old", now=NOW)["state"] == "done"
    with pytest.raises(BadInput, match="no run 'nope'"):
        monitor.run_status(store, "nope")


@pytest.mark.parametrize(("total", "done", "failed", "started", "beat_state", "age", "expected"), [
    (3, 3, 0, True, "running", 1.0, "done"),
    (0, 0, 0, False, None, None, "done"),
    (3, 2, 1, True, "running", 1.0, "failed"),
    (3, 1, 1, True, "running", 15.0, "running"),
    (3, 1, 1, True, "running", 15.001, "stalled"),
    (3, 0, 0, False, "starting", 0.0, "running"),
    (3, 1, 0, True, "stopped", 1.0, "stopped"),
    (3, 1, 0, True, "stopped", 99.0, "stopped"),
    (3, 2, 1, True, "starting", 1.0, "running"),  # an index about to be retried: not failed for good
    (3, 2, 1, True, "starting", 16.0, "failed"),
    (3, 1, 0, True, None, None, "stalled"),
    (3, 0, 0, False, None, None, "pending"),
])
def test_shard_state_precedence(total, done, failed, started, beat_state, age, expected):
    hb = beat("r", 0, age, beat_state) if beat_state else None
    assert monitor.shard_state(units_total=total, units_done=done, units_failed=failed, started=started, beat=hb,
                               beat_age_s=age, stalled_after_s=15) == expected


@pytest.mark.parametrize(("states", "expected"), [
    ([], "done"), (["done", "done"], "done"), (["done", "failed"], "failed"),
    (["failed", "running", "stalled"], "running"), (["failed", "stalled", "pending"], "stalled"),
    (["failed", "pending"], "pending"), (["pending", "done"], "pending"),
    (["stopped", "done"], "stopped"), (["stopped", "pending"], "stopped"), (["stopped", "running"], "running"),
])
def test_run_state(states, expected):
    assert monitor.run_state(states) == expected


def test_render_status(store):
    assert "no run yet" in monitor.render_status(monitor.run_status(store, now=NOW))
    seed_coverage(store)
    seed_run(store)
    text = monitor.render_status(monitor.run_status(store, now=NOW))
    assert "run r1 · rerun of r0" in text and "RUNNING" in text and "coverage 60.00%" in text
    assert "HTTP 500 forever" in text and "stalled" in text and "ETA 6s" in text
    live = {**monitor.run_status(store, now=NOW), "live": True, "live_age_s": 2.5}
    assert "[live, 2.5s old]" in monitor.render_status(live)


# --- live status ---------------------------------------------------------------------------------


def test_publish_and_read_live(store, tmp_path):
    seed_run(store)
    status = monitor.run_status(store, now=NOW)
    path = tmp_path / "live" / "status.json"
    assert monitor.read_live(path, 60, now=NOW) is None
    monitor.publish_live(status, path)
    monitor.publish_live(status, path)
    assert os.listdir(path.parent) == ["status.json"]  # atomic replace leaves no temp file
    live = monitor.read_live(path, 60, now=NOW + timedelta(seconds=5))
    assert live == {**status, "live": True, "live_age_s": 5.0, "pid": os.getpid()}
    assert monitor.read_live(path, 60, now=NOW + timedelta(seconds=61)) is None
    path.write_text("{not json")
    assert monitor.read_live(path, 60, now=NOW) is None


HOLDER = """
import time
from clobjob.config import Settings
from clobjob.models import Run, WorkUnit
from clobjob.monitor import live_path, publish_live, run_status
from clobjob.store import open_store

settings = Settings()
with open_store(settings) as store:
    store.create_run(Run(run_id="live-run", shards=1, source="subgraph"),
                     [WorkUnit(run_id="live-run", unit_id=0, shard=0, expected_fills=5)])
    publish_live(run_status(store), live_path(settings))
    print("ready", flush=True)
    time.sleep(90)
"""


def test_status_reads_live_file_while_another_process_holds_the_database(tmp_path):
    env = {**os.environ, "CLOBJOB_HOME": str(tmp_path / "home"), "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path}/db",
           "CLOBJOB_LOG_FORMAT": "json"}

    def clobjob(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clobjob", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert readable(holder.stdout, 60), "holder did not start"
        assert holder.stdout.readline().strip() == "ready"
        shown = clobjob("status", "--json")
        assert shown.returncode == 0, shown.stderr
        live = json.loads(shown.stdout)
        assert live["live"] is True and live["run_id"] == "live-run" and 0 <= live["live_age_s"] < 60
        assert "[live," in clobjob("status").stdout
        verify = clobjob("verify")
        assert verify.returncode == 1 and f"in use by another process (pid {holder.pid})" in verify.stderr
        live_file = tmp_path / "home" / "live" / "status.json"
        earlier = {**json.loads(live_file.read_text()), "pid": holder.pid + 1}  # what an earlier process wrote
        live_file.write_text(json.dumps(earlier))
        stale = clobjob("status", "--wait", "1")
        assert stale.returncode == 1 and "has published no live status" in stale.stderr
        live_file.unlink()
        gone = clobjob("status", "--wait", "1")
        assert gone.returncode == 1 and "waiting up to 1s for its live status" in gone.stderr
        assert "has published no live status" in gone.stderr and "Traceback" not in gone.stderr
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    after = clobjob("status", "--json")  # the run is over: ClickHouse again
    assert after.returncode == 0, after.stderr
    status = json.loads(after.stdout)
    assert status["live"] is False and status["run_id"] == "live-run" and status["state"] == "pending"


# --- CLI: status --watch, verify ----------------------------------------------------------------


def run_cli(settings, *args: str) -> int:
    return cli.main(["--clickhouse-url", settings.dsn(), "--database", settings.clickhouse_database, *args])


def one_unit_run(store, run_id: str, state: UnitState, *, beat_state: str = "running", beat_age_s: float = 1.0,
                 now: datetime = NOW, source: str = "subgraph", unit: dict | None = None) -> None:
    store.create_run(Run(run_id=run_id, shards=1, source=source),
                     [WorkUnit(run_id=run_id, unit_id=0, shard=0, expected_fills=1, **(unit or {}))])
    store.save_checkpoints([checkpoint(run_id, 0, 0, state)])
    store.save_heartbeat(beat(run_id, 0, beat_age_s, beat_state, now=now))


@pytest.mark.parametrize(("state", "beat_state", "code", "shown"), [
    (UnitState.DONE, "running", 0, "DONE"), (UnitState.FAILED, "running", 1, "FAILED"),
    (UnitState.RUNNING, "stopped", 143, "STOPPED"),
])
def test_watch_exits_with_the_run_outcome(store, settings, capsys, state, beat_state, code, shown):
    one_unit_run(store, "w", state, beat_state=beat_state)
    assert run_cli(settings, "status", "--watch", "0.01") == code
    out = capsys.readouterr().out
    assert "Ctrl+C to stop" in out and shown in out


def test_watch_redraws_until_interrupted(store, settings, capsys, monkeypatch):
    one_unit_run(store, "w", UnitState.RUNNING, now=datetime.now(timezone.utc))
    sleeps = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", fake_sleep)
    assert run_cli(settings, "status", "--watch", "2", "--json") == 130
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["state"] == "running" for line in lines)


def test_status_json_cli(store, settings, capsys):
    seed_run(store)
    assert run_cli(settings, "status", "--json", "--run-id", "r1") == 0
    assert set(json.loads(capsys.readouterr().out)) == STATUS_KEYS | {"job"}  # the Kubernetes Job beside it
    assert run_cli(settings, "status", "--run-id", "missing") == 2


# --- verify --------------------------------------------------------------------------------------


def seed_ready(store, *, source: str = "rpc", fill_age: timedelta = timedelta(hours=1),
               open_until: datetime = NOW + timedelta(days=30)) -> None:
    """40 markets by falling volume, all old and complete except: market 2 open until ``open_until`` with
    its fill ``fill_age`` ago, and market 40 (lowest volume, old) incomplete; one finished run."""
    markets = [market(i, (str(1000 + i),), volume=1000 - i,
                      end=open_until if i == 2 else NOW - timedelta(days=100 + i)) for i in range(1, 41)]
    store.upsert_markets(markets)
    store.upsert_orderbooks({m.token_ids[0]: (m.condition_id, 2 if i == 40 else 1)
                             for i, m in enumerate(markets, start=1)})
    rows = []
    for i, m in enumerate(markets, start=1):
        rows += fills(m.token_ids[0], NOW - fill_age if i == 2 else m.end_date - timedelta(days=1))
    block, on_chain = 90_000_000, {}
    if source in ("rpc", "all"):  # the recent fill comes from the chain, read by the run up to now
        rows = [tuple({"source": "rpc", "block_number": block, "exchange_version": 2}.get(c, v)
                      for c, v in zip(FILL_COLUMNS, row))
                if row[FILL_COLUMNS.index("token_id")] == markets[1].token_ids[0] else row for row in rows]
        rows += fills(markets[1].token_ids[0], NOW - timedelta(days=200))  # its v1 fill, which the count describes
        on_chain = {"source": "rpc", "block_from": block - 10, "block_to": block + int(fill_age.total_seconds()) // 2}
    store.insert_fill_rows(rows)
    one_unit_run(store, "finished", UnitState.DONE, beat_state="done", beat_age_s=86_400, source=source,
                 unit=on_chain)


def statuses(result) -> dict[str, str]:
    return {c["name"]: c["status"] for c in result["criteria"]}


ALL_PASS = {"coverage": "pass", "recent_markets_complete": "pass", "top_markets_complete": "pass",
            "fills_last_24h": "pass", "no_run_in_progress": "pass"}


def test_verify_passes_when_every_criterion_is_met(store):
    seed_ready(store)
    result = monitor.verify(store, now=NOW, top_n=5)
    assert statuses(result) == ALL_PASS and result["ready"] is True
    assert result["markets"]["coverage"] == 39 / 40
    assert "READY for P&L" in monitor.render_verify(result)


def break_recent(store):
    store.upsert_markets([market(41, ("1041",), end=NOW - timedelta(days=10), volume=0.5)])
    store.upsert_orderbooks({"1041": (cid(41), 3)})


def break_top(store):
    store.upsert_orderbooks({"1001": (cid(1), 5)})


def break_run(store):
    one_unit_run(store, "busy", UnitState.RUNNING, source="rpc")


@pytest.mark.parametrize(("criterion", "seed", "breaker", "min_coverage"), [
    ("coverage", {}, None, 0.99),
    ("recent_markets_complete", {}, break_recent, 0.9),
    ("top_markets_complete", {}, break_top, 0.9),
    ("fills_last_24h", {"fill_age": timedelta(days=2)}, None, 0.9),
    ("no_run_in_progress", {}, break_run, 0.9),
])
def test_verify_fails_on_each_criterion_alone(store, criterion, seed, breaker, min_coverage):
    seed_ready(store, **seed)
    if breaker:
        breaker(store)
    result = monitor.verify(store, now=NOW, top_n=5, min_coverage=min_coverage)
    assert statuses(result) == {**ALL_PASS, criterion: "fail"} and result["ready"] is False
    text = monitor.render_verify(result)
    assert "NOT READY" in text and f"[FAIL] {criterion}" in text


def test_verify_failure_details_name_the_markets(store):
    seed_ready(store)
    break_recent(store)
    failed = next(c for c in monitor.verify(store, now=NOW, top_n=5)["criteria"]
                  if c["name"] == "recent_markets_complete")
    assert failed["examples"] == [f"{cid(41)} market 41?"] and failed["detail"].startswith("1 market(s)")


@pytest.mark.parametrize(("seed", "why"), [
    ({"source": "subgraph", "fill_age": timedelta(days=2)}, "has no fills after 2026-04-28"),
    ({"open_until": NOW - timedelta(days=2), "fill_age": timedelta(days=3)}, "no market with expected fills"),
])
def test_fills_last_24h_is_not_applicable_without_a_source_for_them(store, seed, why):
    seed_ready(store, **seed)
    result = monitor.verify(store, now=NOW, top_n=5)
    criterion = next(c for c in result["criteria"] if c["name"] == "fills_last_24h")
    assert criterion["status"] == "n/a" and why in criterion["detail"] and result["ready"] is True


def test_a_stopped_or_stale_run_is_not_in_progress(store):
    seed_ready(store)
    one_unit_run(store, "stopped", UnitState.RUNNING, beat_state="stopped", source="rpc")
    one_unit_run(store, "stale", UnitState.RUNNING, beat_age_s=16, source="rpc")
    assert monitor.verify(store, now=NOW, top_n=5)["ready"] is True


def test_verify_empty_universe_is_not_ready(store):
    result = monitor.verify(store, now=NOW)
    assert statuses(result)["coverage"] == "fail" and result["ready"] is False


def test_verify_cli_exit_codes_and_report(store, settings, tmp_path, capsys):
    seed_ready(store, source="subgraph")
    store.insert_fill_rows(fills("1040", NOW - timedelta(days=200)))  # market 40 complete: all top 100 are
    report = tmp_path / "report.html"
    assert run_cli(settings, "verify", "--report", str(report), "--min-coverage", "1") == 0
    assert "READY for P&L" in capsys.readouterr().out and "<svg" in report.read_text()
    break_top(store)
    assert run_cli(settings, "verify", "--json") == 1
    assert json.loads(capsys.readouterr().out)["ready"] is False
    with pytest.raises(SystemExit):
        run_cli(settings, "verify", "--min-coverage", "95")


# --- HTML report ---------------------------------------------------------------------------------


class TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


def test_html_report_is_self_contained(store):
    seed_ready(store)
    break_top(store)
    store.upsert_markets([market(99, ("1099",), volume=1)])  # no end date, loaded after the sync: missing
    result = monitor.verify(store, now=NOW, top_n=5)
    months, gaps = monitor.report_sections(store)
    page = monitor.render_report_html(result, months, gaps)
    parser = TagCollector()
    parser.feed(page)
    parser.close()
    assert {"html", "style", "svg", "rect", "table"} <= set(parser.tags)
    assert not {"script", "link", "img", "iframe"} & set(parser.tags)
    assert "http://" not in page and "https://" not in page and not any(k in ("src", "href") for k, _ in parser.attrs)
    svg = page[page.index("<svg"):page.index("</svg>") + len("</svg>")]
    assert ET.fromstring(svg).tag == "svg"  # well-formed
    assert "NOT READY" in page and cid(1) in page and "no end date" in page
    assert gaps[0]["condition_id"] == cid(1) and gaps[0]["missing"] == 4


# --- terminal output of data is printable; a held database is named for every command ------------

HOSTILE = "\x1b[2J\x1b]0;pwned\x07 Will it\r\n\u202e rain?"


def test_data_reaches_the_terminal_with_control_characters_escaped(settings, store, capsys):
    store.upsert_markets([market(1, ("11", "12"), volume=5.0).model_copy(update={"question": HOSTILE})])
    assert cli.main(["--clickhouse-url", settings.clickhouse_url.get_secret_value(), "--database",
                     settings.clickhouse_database, "verify"]) == 1
    shown = capsys.readouterr().out
    assert "\\x1b[2J\\x1b]0;pwned\\x07 Will it\\r\\n\\u202e rain?" in shown
    assert not any(ch in shown for ch in "\x1b\x07\r\u202e")
    status = {**monitor.run_status(store, now=NOW)}
    status["run_id"], status["parent_run_id"], status["created_at"] = "r", None, NOW.isoformat()
    status["source"], status["state"] = "subgraph", "failed"
    status["aggregate"] = {k: 0 for k in ("units_done", "units_failed", "units_total", "fills", "expected_fills",
                                          "rps", "share_429", "remaining_requests")} | {"eta_s": None}
    status["shards"] = [{"shard": 0, "state": "failed", "units_done": 0, "units_failed": 1, "units_total": 1,
                         "fills": 0, "expected_fills": 0, "rps": 0.0, "share_429": 0.0, "remaining_requests": 0,
                         "heartbeat_age_s": None, "eta_s": None, "last_error": "SourceError: " + HOSTILE,
                         "pod": "\x1bpod"}]
    rendered = monitor.render_status(status)
    assert "\x1b" not in rendered and "SourceError: \\x1b[2J" in rendered
    table = cli._table(["sample", "error"], [["0xab", HOSTILE]])
    assert "\x1b" not in table and "\\x1b[2J" in table


def test_a_held_embedded_database_names_its_holder_for_every_command(tmp_path, capsys):
    db = tmp_path / "db"
    env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{db}", "CLOBJOB_HOME": str(tmp_path / "home")}
    listed = tmp_path / "ids.txt"
    listed.write_text(cid(1) + "\n")
    gamma = tmp_path / "markets.jsonl"
    gamma.write_text(json.dumps({"conditionId": cid(1), "clobTokenIds": '["11", "12"]'}) + "\n")
    holder = subprocess.Popen([sys.executable, "-m", "clobjob", "db", "serve", "--port", "0"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert readable(holder.stdout, 60), "db serve did not start"
        url = holder.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        named = f"in use by another process (pid {holder.pid}); it is clobjob db serve at {url}: " \
                f"use --clickhouse-url {url}"
        for command in (["db", "migrate"], ["markets", "load", str(gamma)], ["plan", "--shards", "1"],
                        ["backfill", "--markets", str(listed)], ["diagnose", "--offline"], ["verify"],
                        ["rerun", "--run-id", "r1"], ["status"]):
            started = time.monotonic()
            assert cli.main(["--clickhouse-url", f"chdb://{db}", *command]) == 1, command
            assert named in capsys.readouterr().err, command
            if command == ["status"]:  # a server publishes no live status: nothing to wait for
                assert time.monotonic() - started < monitor.LIVE_WAIT_S / 2
        second = subprocess.run([sys.executable, "-m", "clobjob", "backfill"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and named in second.stderr and "Cannot lock" not in second.stderr
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    assert not (db / "served-at.json").exists()  # a stopped server leaves no URL behind
