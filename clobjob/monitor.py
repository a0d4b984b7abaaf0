"""Monitor: the status of a run over all its shards, live status for the embedded database, and ``verify``
(readiness for P&L) with a self-contained HTML report.

Market coverage (status and verify) is ``models.coverage_summary`` of ``Store.market_fill_counts``: every
market of the universe classified by ``models.MarketStatus``, the one definition diagnose and plan share.

Status JSON (``run_status``), ``schema_version`` 2; every key is always present:

- ``schema_version`` int; ``generated_at`` ISO time; ``live`` bool (true when read from the live file);
  ``live_age_s`` float|null (age of the live file); ``stalled_after_s`` float (heartbeat age that stalls).
- ``run_id``, ``parent_run_id``, ``created_at``, ``source``, ``state``: the run (default: the latest); all
  null when there is no run. ``state`` is the run state (below).
- ``markets``: ``universe, covered, not_covered, coverage`` and the count of each ``MarketStatus``:
  ``complete, zero_fill, incomplete, missing, unknown`` (null when computed with ``coverage=False``).
  Version 2 (from 1): ``missing`` counts status missing (nothing stored); v1's ``missing`` is ``not_covered``.
- ``recent``: ``fills_24h, fills_7d``: distinct stored fills whose fill timestamp lies in (now − 24 h, now]
  and (now − 7 d, now] (null with ``coverage=False``).
- ``aggregate``: ``units_done, units_failed, units_total, fills, expected_fills, rps, share_429,
  remaining_requests, eta_s``.
- ``shards``: one object per shard (``models.ShardStatus``): ``shard, state, units_done, units_failed,
  units_total, fills, expected_fills, rps, share_429, remaining_requests, heartbeat_age_s, eta_s,
  last_error, pod``.

Shard figures: ``fills`` = checkpointed (stored) fills of its units; ``remaining_requests`` = over units not
done or failed, max(expected_requests − pages, 1); ``rps`` = the last heartbeat's request rate when the
shard is running, else 0; ``share_429`` = throttled ÷ requests of the last heartbeat; ``eta_s`` =
remaining_requests ÷ rps (0 when nothing remains, null when nothing runs); ``last_error`` = the latest error of
a failed unit, else of an unfinished unit. Aggregate: sums, rps of running shards, share_429 over all
heartbeats, ``eta_s`` = total remaining ÷ total rps.

Shard state, first rule that matches: ``done`` every unit done (or no units); ``failed`` every unit done or
failed; ``running`` a *live* heartbeat: age ≤ stalled_after × heartbeat interval and its state is not one a
worker writes on exit (stopped/done/failed); ``stalled`` a heartbeat that is not live, or none but some unit
has left pending; ``pending`` otherwise. Run state: ``done`` all shards done; ``failed`` all shards done or
failed; else ``running`` if any shard runs, ``stalled`` if any is stalled, else ``pending``.

Live status: chDB lets one process open a database path, so a backfill on the embedded database calls
``publish_live(run_status(...), live_path(settings))`` every few seconds; ``current_status`` reads
ClickHouse, or that file (``live`` true, ``live_age_s`` set) while another process holds the database.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from clobjob.config import Settings
from clobjob.errors import BadInput, ClobjobError
from clobjob.logs import printable
from clobjob.models import Heartbeat, MarketFills, ShardStatus, as_utc, coverage_summary
from clobjob.store import DatabaseBusy, Store, open_store

SCHEMA_VERSION = 2
ENDED_BEAT_STATES = frozenset({"stopped", "done", "failed"})
"""Heartbeat states a worker writes when its process ends: such a heartbeat is never live."""
SOURCE_UNTIL = {"subgraph": datetime(2026, 4, 28, 11, tzinfo=timezone.utc)}
"""The newest fill a source can hold (data-sources.md §2: the last v1 fill; the subgraph indexes only v1)."""


def _utcnow(now: datetime | None) -> datetime:
    return as_utc(now) or datetime.now(timezone.utc)


# --- market coverage -----------------------------------------------------------------------------


def recent_fills(store: Store, now: datetime) -> dict[str, int]:
    """Distinct stored fills by fill timestamp in the last 24 h and 7 days before ``now``."""
    day, week = now - timedelta(days=1), now - timedelta(days=7)
    found = store.db.rows(
        "SELECT uniqExactIf(id, timestamp > toDateTime({day:Int64}, 'UTC')), uniqExact(id) "
        "FROM {db}.clob_fills WHERE timestamp > toDateTime({week:Int64}, 'UTC') "
        "AND timestamp <= toDateTime({now:Int64}, 'UTC')",
        {"day": int(day.timestamp()), "week": int(week.timestamp()), "now": int(now.timestamp())},
    )
    return {"fills_24h": found[0][0], "fills_7d": found[0][1]}


def _date(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


def coverage_by_month(markets: Sequence[MarketFills]) -> list[dict[str, Any]]:
    """Covered vs not covered markets per market end month (``YYYY-MM``; undated markets last)."""
    buckets: dict[str, list[int]] = {}
    for m in markets:
        month = _date(m.end_ts).strftime("%Y-%m") if m.end_ts is not None else "no end date"
        buckets.setdefault(month, [0, 0])[0 if m.status.covered else 1] += 1
    order = sorted(buckets, key=lambda month: (month == "no end date", month))
    return [{"month": k, "covered": buckets[k][0], "not_covered": buckets[k][1]} for k in order]


def worst_gaps(markets: Sequence[MarketFills], n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` markets with the most expected fills not stored."""
    gaps = sorted((m for m in markets if m.gap), key=lambda m: (-m.gap, m.condition_id))[:n]
    return [{"condition_id": m.condition_id, "question": m.question,
             "end_date": _date(m.end_ts).isoformat() if m.end_ts is not None else None,
             "expected": m.expected_fills, "stored": m.stored_fills, "missing": m.gap} for m in gaps]


def report_sections(store: Store, *, gaps: int = 20) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Coverage by month and the worst gaps, as ``render_report_html`` takes them."""
    markets = store.market_fill_counts()
    return coverage_by_month(markets), worst_gaps(markets, gaps)


# --- run status ----------------------------------------------------------------------------------


def shard_state(*, units_total: int, units_done: int, units_failed: int, started: bool,
                beat: Heartbeat | None, beat_age_s: float | None, stalled_after_s: float) -> str:
    """A shard's state by the precedence in the module docstring."""
    if units_done == units_total:
        return "done"
    if units_done + units_failed == units_total:
        return "failed"
    if beat is not None and beat_age_s is not None and beat_age_s <= stalled_after_s \
            and beat.state not in ENDED_BEAT_STATES:
        return "running"
    if beat is not None or started:
        return "stalled"
    return "pending"


def run_state(states: Sequence[str]) -> str:
    """A run's state from its shards' states (module docstring)."""
    if all(s == "done" for s in states):
        return "done"
    if all(s in ("done", "failed") for s in states):
        return "failed"
    return next((s for s in ("running", "stalled") if s in states), "pending")


def _eta(remaining: int, rps: float) -> float | None:
    if remaining == 0:
        return 0.0
    return round(remaining / rps, 1) if rps > 0 else None


_SHARD_SQL = """
SELECT shard, count(), countIf(p.state = 'done'), countIf(p.state = 'failed'), countIf(p.state != 'pending'),
       sum(p.fills), sum(u.expected_fills),
       sumIf(greatest(toInt64(u.expected_requests) - toInt64(p.pages), 1), p.state NOT IN ('done', 'failed')),
       argMaxIf(p.last_error, (p.state = 'failed', p.updated_at), p.last_error != '' AND p.state != 'done')
FROM (SELECT shard, unit_id, expected_fills, expected_requests FROM {db}.backfill_units FINAL
      WHERE run_id = {run:String}) AS u
LEFT JOIN (SELECT shard, unit_id, state, fills, pages, last_error, updated_at FROM {db}.backfill_progress FINAL
           WHERE run_id = {run:String}) AS p USING (shard, unit_id)
GROUP BY shard ORDER BY shard
"""


def shard_statuses(store: Store, run: Mapping[str, Any], beats: Mapping[int, Heartbeat], now: datetime,
                   stalled_after_s: float) -> list[ShardStatus]:
    """The status of every shard of a run (shards without units included)."""
    rows = {row[0]: row[1:] for row in store.db.rows(_SHARD_SQL, {"run": run["run_id"]})}
    result = []
    for shard in sorted(set(range(run["shards"])) | set(rows) | set(beats)):
        total, done, failed, started, fills, expected, remaining, error = rows.get(shard, (0,) * 7 + ("",))
        beat = beats.get(shard)
        age = round((now - beat.at).total_seconds(), 3) if beat else None
        state = shard_state(units_total=total, units_done=done, units_failed=failed, started=started > 0,
                            beat=beat, beat_age_s=age, stalled_after_s=stalled_after_s)
        rps = beat.rps if beat and state == "running" else 0.0
        result.append(ShardStatus(
            shard=shard, state=state, units_done=done, units_failed=failed, units_total=total, fills=fills,
            expected_fills=expected, rps=rps, share_429=_share(beat.throttled, beat.requests) if beat else 0.0,
            remaining_requests=remaining, heartbeat_age_s=age, eta_s=_eta(remaining, rps), last_error=error,
            pod=beat.pod if beat else "",
        ))
    return result


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _aggregate(shards: Sequence[ShardStatus], beats: Mapping[int, Heartbeat]) -> dict[str, Any]:
    remaining = sum(s.remaining_requests for s in shards)
    rps = sum(s.rps for s in shards)
    return {
        **{key: sum(getattr(s, key) for s in shards)
           for key in ("units_done", "units_failed", "units_total", "fills", "expected_fills")},
        "rps": rps,
        "share_429": _share(sum(b.throttled for b in beats.values()), sum(b.requests for b in beats.values())),
        "remaining_requests": remaining, "eta_s": _eta(remaining, rps),
    }


def _pick_run(store: Store, run_id: str | None) -> dict[str, Any] | None:
    if run_id is None:
        return next(iter(store.runs()), None)
    run = store.run(run_id)
    if run is None:
        raise BadInput(f"no run {run_id!r} in the database")
    return run


def run_status(store: Store, run_id: str | None = None, *, now: datetime | None = None,
               heartbeat_interval_s: float = 5, stalled_after: float = 3, coverage: bool = True) -> dict[str, Any]:
    """The status of a run (default: the latest) as the JSON-able schema of the module docstring.

    ``coverage=False`` skips the whole-table sections (``markets``, ``recent``: null), e.g. for frequent
    live publishing during a run.
    """
    now = _utcnow(now)
    stalled_after_s = heartbeat_interval_s * stalled_after
    run = _pick_run(store, run_id)
    beats = store.heartbeats(run["run_id"]) if run else {}
    shards = shard_statuses(store, run, beats, now, stalled_after_s) if run else []
    markets = store.market_fill_counts() if coverage else None
    return {
        "schema_version": SCHEMA_VERSION, "generated_at": now.isoformat(), "live": False, "live_age_s": None,
        "stalled_after_s": stalled_after_s,
        "run_id": run["run_id"] if run else None,
        "parent_run_id": (run["parent_run_id"] or None) if run else None,
        "created_at": as_utc(run["created_at"]).isoformat() if run else None,
        "source": run["source"] if run else None,
        "state": run_state([s.state for s in shards]) if run else None,
        "markets": coverage_summary(markets) if markets is not None else None,
        "recent": recent_fills(store, now) if coverage else None,
        "aggregate": _aggregate(shards, beats),
        "shards": [s.model_dump() for s in shards],
    }


# --- rendering -----------------------------------------------------------------------------------


def render_duration(seconds: float | None) -> str:
    """Seconds as "42s", "3m 05s" or "2h 07m" ("-" when unknown)."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.2f}%"


def render_status(status: Mapping[str, Any]) -> str:
    """A compact human view of ``run_status`` (or a live status)."""
    lines = []
    if status["run_id"] is None:
        lines.append("no run yet")
    else:
        parent = f" · rerun of {status['parent_run_id']}" if status["parent_run_id"] else ""
        created = status["created_at"][:19].replace("T", " ")
        lines.append(f"run {status['run_id']}{parent} · created {created} UTC · source "
                     f"{status['source']} · {status['state'].upper()}")
    if status["live"]:
        lines[0] += f"  [live, {status['live_age_s']:.1f}s old]"
    if status["markets"] is not None:
        m = status["markets"]
        lines.append(f"markets  {m['universe']:,} · coverage {_pct(m['coverage'])} ({m['covered']:,} covered: "
                     f"complete {m['complete']:,}, zero-fill {m['zero_fill']:,}) · not covered {m['not_covered']:,} "
                     f"(missing {m['missing']:,}, incomplete {m['incomplete']:,}, unknown {m['unknown']:,})")
    if status["recent"] is not None:
        lines.append(f"recent   fills by fill time: last 24 h {status['recent']['fills_24h']:,} · "
                     f"last 7 d {status['recent']['fills_7d']:,}")
    if status["run_id"] is not None:
        a = status["aggregate"]
        lines.append(f"total    units {a['units_done']:,}/{a['units_total']:,} done, {a['units_failed']:,} failed · "
                     f"fills {a['fills']:,} of {a['expected_fills']:,} expected · {a['rps']:.1f} req/s · "
                     f"429s {_pct(a['share_429'])} · ETA {render_duration(a['eta_s'])}")
        lines.append("")
        lines.append(f"{'shard':>5} {'state':<8} {'units done/fail/all':>19} {'fills':>11} {'expected':>11} "
                     f"{'req/s':>6} {'429s':>7} {'ETA':>8} {'beat':>7}  {'pod':<16} last error")
        for s in status["shards"]:
            units = f"{s['units_done']}/{s['units_failed']}/{s['units_total']}"
            lines.append(f"{s['shard']:>5} {s['state']:<8} {units:>19} {s['fills']:>11,} {s['expected_fills']:>11,} "
                         f"{s['rps']:>6.1f} {_pct(s['share_429']):>7} {render_duration(s['eta_s']):>8} "
                         f"{render_duration(s['heartbeat_age_s']):>7}  {printable(s['pod'])[:16]:<16} "
                         f"{printable(s['last_error'])[:60]}")
    return "\n".join(line.rstrip() for line in lines)


# --- live status for the embedded database --------------------------------------------------------


def live_path(settings: Settings) -> Path:
    """Where a running backfill publishes its live status."""
    return settings.home / "live" / "status.json"


def publish_live(status: Mapping[str, Any], path: Path) -> None:
    """Write ``status`` (marked live) to ``path`` atomically: a temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({**status, "live": True}, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_live(path: Path, max_age_s: float, *, now: datetime | None = None) -> dict[str, Any] | None:
    """The published live status with its age in ``live_age_s``; None when missing, unreadable or older."""
    try:
        status = json.loads(path.read_text())
        age = (_utcnow(now) - datetime.fromisoformat(status["generated_at"])).total_seconds()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if age > max_age_s:
        return None
    return {**status, "live": True, "live_age_s": round(max(age, 0.0), 1)}


LIVE_MAX_AGE_S = 60.0
"""A live status older than this is ignored (the backfill that published it is gone or stuck)."""


def current_status(settings: Settings, run_id: str | None = None, *, now: datetime | None = None) -> dict[str, Any]:
    """``run_status`` from ClickHouse; while another process holds the embedded database, its live status."""
    try:
        with open_store(settings) as store:  # DatabaseBusy while another process holds the embedded database
            return run_status(store, run_id, now=now, heartbeat_interval_s=settings.heartbeat_interval_s)
    except DatabaseBusy as busy:
        path = live_path(settings)
        live = read_live(path, LIVE_MAX_AGE_S, now=now)
        if live is None or run_id not in (None, live["run_id"]):
            wanted = f" for run {run_id}" if run_id else ""
            raise ClobjobError(f"{busy}, and no fresh live status{wanted} is published at {path}") from None
        return live


# --- verify: readiness for P&L -------------------------------------------------------------------


def _criterion(name: str, status: str, detail: str, examples: Sequence[MarketFills] = ()) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail,
            "examples": [f"{m.condition_id} {m.question}".strip() for m in examples[:10]]}


def _coverage_criterion(summary: Mapping[str, Any], min_coverage: float) -> dict[str, Any]:
    if summary["coverage"] is None:
        return _criterion("coverage", "fail", "no markets in the universe (load them: clobjob markets load)")
    ok = summary["coverage"] >= min_coverage
    return _criterion("coverage", "pass" if ok else "fail",
                      f"{_pct(summary['coverage'])} of {summary['universe']:,} markets covered "
                      f"({'≥' if ok else '<'} {_pct(min_coverage)}); {summary['missing']:,} missing, "
                      f"{summary['incomplete']:,} incomplete, {summary['unknown']:,} unknown")


def _recent_criterion(markets: Sequence[MarketFills], now: datetime, days: int) -> dict[str, Any]:
    since, until = int((now - timedelta(days=days)).timestamp()), int(now.timestamp())
    bad = [m for m in markets if not m.status.covered and m.end_ts is not None and since <= m.end_ts <= until]
    return _criterion("recent_markets_complete", "fail" if bad else "pass",
                      f"{len(bad):,} market(s) that ended in the last {days} days are not covered", bad)


def _top_criterion(markets: Sequence[MarketFills], top_n: int) -> dict[str, Any]:
    top = sorted((m for m in markets if m.volume_rank <= top_n), key=lambda m: m.volume_rank)
    bad = [m for m in top if not m.status.covered]
    return _criterion("top_markets_complete", "fail" if bad else "pass",
                      f"{len(bad):,} of the top {len(top):,} markets by volume are not covered", bad)


def _fills_24h_criterion(store: Store, markets: Sequence[MarketFills], now: datetime) -> dict[str, Any]:
    """Applicable when the latest run's source (with no run: the subgraph, which the expected counts come
    from) holds fills of the last 24 h (``SOURCE_UNTIL``) and some market with expected fills was open then
    (started by now, ended within 24 h or, undated, not closed)."""
    name, day_ago = "fills_last_24h", now - timedelta(days=1)
    source = next(iter(store.runs()), {}).get("source", "subgraph")
    until = SOURCE_UNTIL.get(source)
    if until is not None and until < day_ago:
        return _criterion(name, "n/a", f"the {source} source has no fills after {until.isoformat()}")
    now_ts, day_ago_ts = int(now.timestamp()), int(day_ago.timestamp())
    open_markets = [m for m in markets if m.expected_fills
                    and (m.start_ts is None or m.start_ts <= now_ts)
                    and (m.end_ts >= day_ago_ts if m.end_ts is not None else not m.closed)]
    if not open_markets:
        return _criterion(name, "n/a", "no market with expected fills was open in the last 24 h")
    count = recent_fills(store, now)["fills_24h"]
    return _criterion(name, "pass" if count else "fail",
                      f"{count:,} fill(s) in the last 24 h; {len(open_markets):,} market(s) open then")


def _runs_criterion(store: Store, now: datetime, stalled_after_s: float) -> dict[str, Any]:
    """A run is in progress when one of its shards is running (unfinished units and a live heartbeat)."""
    since = now - timedelta(seconds=stalled_after_s)
    fresh = store.db.rows("SELECT run_id FROM {db}.backfill_heartbeats FINAL GROUP BY run_id "
                          "HAVING max(at) >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') ORDER BY run_id",
                          {"since": int(since.timestamp() * 1000)})
    running = []
    for (run_id,) in fresh:
        run = store.run(run_id)
        if run and any(s.state == "running" for s in
                       shard_statuses(store, run, store.heartbeats(run_id), now, stalled_after_s)):
            running.append(run_id)
    return _criterion("no_run_in_progress", "fail" if running else "pass",
                      f"run(s) in progress: {', '.join(running)}" if running else "no run in progress")


def verify(store: Store, *, min_coverage: float = 0.95, now: datetime | None = None, top_n: int = 100,
           recent_days: int = 30, heartbeat_interval_s: float = 5, stalled_after: float = 3) -> dict[str, Any]:
    """Readiness for P&L: every criterion as pass / fail / n/a with details; ``ready`` when none fails.

    Criteria: ``coverage`` ≥ min_coverage; ``recent_markets_complete`` (no market that ended in the last
    ``recent_days`` days is not covered); ``top_markets_complete`` (the ``top_n`` markets by volume rank);
    ``fills_last_24h`` (n/a when the source or the universe cannot have such fills); ``no_run_in_progress``.
    """
    now = _utcnow(now)
    markets = store.market_fill_counts()
    summary = coverage_summary(markets)
    criteria = [
        _coverage_criterion(summary, min_coverage),
        _recent_criterion(markets, now, recent_days),
        _top_criterion(markets, top_n),
        _fills_24h_criterion(store, markets, now),
        _runs_criterion(store, now, heartbeat_interval_s * stalled_after),
    ]
    return {"schema_version": SCHEMA_VERSION, "generated_at": now.isoformat(),
            "ready": all(c["status"] != "fail" for c in criteria), "min_coverage": min_coverage,
            "markets": summary, "criteria": criteria}


def render_verify(result: Mapping[str, Any]) -> str:
    """Every criterion with its status and detail, failed ones with example markets."""
    lines = ["READY for P&L" if result["ready"] else "NOT READY for P&L"]
    for c in result["criteria"]:
        lines.append(f"  [{c['status'].upper():>4}] {c['name']}: {c['detail']}")
        if c["status"] == "fail":
            lines.extend(f"           {printable(example)}" for example in c["examples"])
    return "\n".join(lines)


# --- HTML report ---------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:24px 32px;}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.pass,.ready{background:#2e7d32}.fail,.notready{background:#c62828}.na{background:#78828c}
.meta{color:#5b6573;margin:0 0 12px}
table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e6ea}
th{background:#f4f6f8;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.q{color:#5b6573} code{font-size:12px}
"""


def _bar_chart(months: Sequence[Mapping[str, Any]]) -> str:
    """An inline SVG stacked bar chart of covered / not covered markets per end month."""
    width, height, left, bottom, top = 1100, 310, 56, 50, 16
    plot_w, plot_h = width - left - 16, height - top - bottom
    peak = max((m["covered"] + m["not_covered"] for m in months), default=0) or 1
    step = 10 ** math.floor(math.log10(peak))
    tick = next(c for c in sorted({max(1, int(step * k)) for k in (0.1, 0.2, 0.5, 1, 2, 5, 10)}) if peak / c <= 5)
    y_max = math.ceil(peak / tick) * tick
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="coverage by market end month">']
    for value in range(0, y_max + 1, tick):
        y = top + plot_h * (1 - value / y_max)
        parts.append(f'<line x1="{left}" x2="{width - 16}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6573">'
                     f'{value:,}</text>')
    slot = plot_w / max(len(months), 1)
    label_every = math.ceil(len(months) / 14) or 1
    for i, m in enumerate(months):
        x, bar_w = left + i * slot + slot * 0.1, slot * 0.8
        y = top + plot_h
        for key, color in (("covered", "#2e7d32"), ("not_covered", "#c62828")):
            h = plot_h * m[key] / y_max
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{color}">'
                         f'<title>{html.escape(m["month"])}: {m[key]:,} {key.replace("_", " ")}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" font-size="11" '
                         f'text-anchor="middle" fill="#5b6573">{html.escape(m["month"])}</text>')
    parts.append(f'<rect x="{left}" y="{height - 14}" width="10" height="10" fill="#2e7d32"/>'
                 f'<text x="{left + 14}" y="{height - 5}" font-size="12">covered (complete or zero-fill)</text>'
                 f'<rect x="{left + 230}" y="{height - 14}" width="10" height="10" fill="#c62828"/>'
                 f'<text x="{left + 244}" y="{height - 5}" font-size="12">'
                 'not covered (missing, incomplete or unknown)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int] = frozenset()) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report_html(verify_result: Mapping[str, Any], coverage_by_month: Sequence[Mapping[str, Any]],
                       worst_gaps: Sequence[Mapping[str, Any]]) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts or external assets)."""
    esc = html.escape
    ready = verify_result["ready"]
    m = verify_result["markets"]
    criteria = _table(["status", "criterion", "detail"], [
        (f'<span class="badge {c["status"].replace("/", "")}">{esc(c["status"].upper())}</span>', esc(c["name"]),
         esc(c["detail"]) + "".join(f'<br><code>{esc(e)}</code>' for e in c["examples"][:5] if c["status"] == "fail"))
        for c in verify_result["criteria"]])
    gaps = _table(["market", "end date", "expected", "stored", "missing"], [
        (f'<code>{esc(g["condition_id"])}</code><br><span class="q">{esc(g["question"])}</span>',
         esc((g["end_date"] or "-")[:10]), f'{g["expected"]:,}', f'{g["stored"]:,}', f'{g["missing"]:,}')
        for g in worst_gaps], numeric=frozenset({2, 3, 4})) if worst_gaps else "<p>No market is missing fills.</p>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>clobjob coverage report</title>'
        f"<style>{_CSS}</style></head><body>"
        f'<h1>Readiness for P&amp;L: <span class="badge {"ready" if ready else "notready"}">'
        f'{"READY" if ready else "NOT READY"}</span></h1>'
        f'<p class="meta">generated {esc(verify_result["generated_at"])} · {m["universe"]:,} markets · '
        f'coverage {_pct(m["coverage"])} (threshold {_pct(verify_result["min_coverage"])}) · '
        f'complete {m["complete"]:,} · zero-fill {m["zero_fill"]:,} · missing {m["missing"]:,} · '
        f'incomplete {m["incomplete"]:,} · unknown {m["unknown"]:,}</p>'
        f"<h2>Coverage by market end month</h2>{_bar_chart(coverage_by_month)}"
        f"<h2>Criteria</h2>{criteria}"
        f"<h2>Worst gaps (most expected fills not stored)</h2>{gaps}"
        "</body></html>"
    )
