"""The status of a run over all its shards, and its rendering (a table, one progress line).

Status JSON (``run_status``), ``schema_version`` 4; every key is always present:

- ``schema_version`` int; ``generated_at`` ISO time; ``live`` bool (true when read from the live file);
  ``live_age_s`` float|null (age of the live file); ``stalled_after_s`` float (heartbeat age that stalls).
- ``run_id``, ``parent_run_id``, ``created_at``, ``source``, ``state``: the run (default: the latest); all
  null when there is no run. ``state`` is the run state (below); ``ended`` bool: done, failed or stopped.
- ``markets``: ``universe, covered, not_covered, coverage`` and the count of each ``MarketStatus``:
  ``complete, zero_fill, incomplete, missing, unknown, source_short, waiting_v2`` (null when computed with
  ``coverage=False``).
  Version 2 (from 1): ``missing`` counts status missing (nothing stored); v1's ``missing`` is ``not_covered``.
  Version 3 (from 2): state ``stopped``; ``ended``, ``reruns``, ``finished_by``; a live status adds ``pid`` (of
  the process that published it) and ``progress`` (``monitor.progress``).
- ``recent``: ``fills_24h, fills_7d``: distinct stored fills whose fill timestamp lies in (now − 24 h, now]
  and (now − 7 d, now] (null with ``coverage=False``).
- ``aggregate``: ``units_done, units_failed, units_total, fills, expected_fills, rps, share_429,
  remaining_requests, eta_s``.
- ``v2``: for a run that reads the chain (source rpc or all), or when some market waits for it:
  ``blocks_done_through`` (the end of the blocks finished units cover without a gap from the v2 exchanges'
  deploy; null when no block range was planned), ``reached_at`` (ISO: about when block ``blocks_done_through − 1``
  was, from the newest v2 fill below it at 2 s per block; null without one), ``newest_fill_at`` (ISO, or null)
  and ``current`` (the ranges reach the safe head: ``reached_at`` at most ``models.V2_CURRENT_S`` old; a market
  with a v2 part is covered only then); null otherwise.
  Version 4 (from 3): status ``waiting_v2`` in ``markets``; ``reached_at`` and ``current`` in ``v2``.
- ``job`` (``clobjob status`` only): the run's Kubernetes Job beside ClickHouse — name, namespace,
  completions, parallelism, completed/failed indexes, pod counts, conditions, pods, ``failure_reason``,
  ``finished``, ``logs`` (the ``kubectl logs`` command per failed shard) and ``logs_all``; null when the run has
  no Job or no cluster is configured, ``{"error": …}`` when the cluster cannot be read.
- ``shards``: one object per shard (``models.ShardStatus``): ``shard, state, units_done, units_failed,
  units_total, fills, expected_fills, rps, share_429, remaining_requests, heartbeat_age_s, eta_s,
  last_error, pod``.

Shard figures: ``fills`` = checkpointed (stored) fills of its units; ``remaining_requests`` = over units not
done or failed, max(expected_requests − pages, 1); ``rps`` = the last heartbeat's request rate when the
shard is running, else 0; ``share_429`` = throttled ÷ requests of the last heartbeat; ``eta_s`` =
remaining_requests ÷ rps (0 when nothing remains, null when nothing runs); ``last_error`` = the latest error of
a failed unit, else of an unfinished unit. Aggregate: sums, rps of running shards, share_429 over all
heartbeats, ``eta_s`` = total remaining ÷ total rps.

Shard state, first rule that matches: ``done`` every unit done (or no units); ``running`` a live heartbeat
in state ``starting`` (a worker loading its units, or an index about to be retried); ``failed`` every unit
done or failed, or its worker exited on a permanent error (heartbeat ``failed_permanently``: its
``last_error`` then starts "do not retry until fixed: "); ``running`` a *live* heartbeat: age ≤ stalled_after
× heartbeat interval and its state is not one a worker writes on exit (``RunState.ended``); ``stopped`` its
last heartbeat says stopped (SIGTERM or Ctrl+C after checkpointing: run the same command to resume);
``stalled`` a heartbeat that is not live, or none but some unit has left pending; ``pending`` otherwise. Run
state: ``done`` all shards done; ``failed`` all shards done or failed (failed for good: no index is about to
be retried); else ``running`` if any shard runs, ``stalled`` if any is stalled, ``stopped`` if any is stopped,
else ``pending``. ``ended`` is true for done, failed and stopped: ``status --watch`` exits then.

``reruns``: the runs made from this one by ``clobjob rerun`` (``run_id, state``, latest first); ``finished_by``:
the first of them that is done, when this run is not (null otherwise).

``invalid_checkpoints``: the units whose latest stored progress row fails validation (a state that is no unit
state, a negative count): ``shard, unit_id, reason`` (each bad field and its value), ``where`` (the row's
version, pod and time) and ``resumes_from`` (``pages, fills`` of the newest older version that is valid, which
the unit resumes from; null: none is left, it starts again). The shard figures count such a row as it is.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from clobjob.errors import BadInput
from clobjob.logs import printable
from clobjob.models import (
    Heartbeat,
    MarketStatus,
    Run,
    RunState,
    ShardStatus,
    as_utc,
    coverage_summary,
)
from clobjob.store import Store

SCHEMA_VERSION = 4


def utcnow(now: datetime | None = None) -> datetime:
    """``now`` in UTC (default: the current time)."""
    return as_utc(now) or datetime.now(timezone.utc)


# --- run status ----------------------------------------------------------------------------------


def shard_state(*, units_total: int, units_done: int, units_failed: int, started: bool,
                beat: Heartbeat | None, beat_age_s: float | None, stalled_after_s: float) -> RunState:
    """A shard's state by the precedence in the module docstring."""
    if units_done == units_total:
        return RunState.DONE
    live = beat is not None and beat_age_s is not None and beat_age_s <= stalled_after_s and not beat.state.ended
    if live and beat is not None and beat.state == RunState.STARTING:
        return RunState.RUNNING
    if units_done + units_failed == units_total or (beat is not None and beat.state == RunState.FAILED_PERMANENTLY):
        return RunState.FAILED
    if live:
        return RunState.RUNNING
    if beat is not None and beat.state == RunState.STOPPED:
        return RunState.STOPPED
    if beat is not None or started:
        return RunState.STALLED
    return RunState.PENDING


def run_state(states: Sequence[RunState]) -> RunState:
    """A run's state from its shards' states (module docstring)."""
    if all(s == RunState.DONE for s in states):
        return RunState.DONE
    if all(s in (RunState.DONE, RunState.FAILED) for s in states):
        return RunState.FAILED
    return next((s for s in (RunState.RUNNING, RunState.STALLED, RunState.STOPPED) if s in states), RunState.PENDING)


def _eta(remaining: int, rps: float) -> float | None:
    if remaining == 0:
        return 0.0
    return round(remaining / rps, 1) if rps > 0 else None


def shard_statuses(store: Store, run: Run, beats: Mapping[int, Heartbeat], now: datetime,
                   stalled_after_s: float) -> list[ShardStatus]:
    """The status of every shard of a run (shards without units included)."""
    rows = store.shard_progress(run.run_id)
    result = []
    for shard in sorted(set(range(run.shards)) | set(rows) | set(beats)):
        total, done, failed, started, fills, expected, remaining, error = rows.get(shard, (0,) * 7 + ("",))
        beat = beats.get(shard)
        age = round((now - beat.at).total_seconds(), 3) if beat else None
        state = shard_state(units_total=total, units_done=done, units_failed=failed, started=started > 0,
                            beat=beat, beat_age_s=age, stalled_after_s=stalled_after_s)
        rps = beat.rps if beat and state == RunState.RUNNING else 0.0
        if beat is not None and beat.state == RunState.FAILED_PERMANENTLY:
            error = f"do not retry until fixed: {error}"
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


def _pick_run(store: Store, run_id: str | None) -> Run | None:
    if run_id is None:
        return next(iter(store.runs()), None)
    run = store.run(run_id)
    if run is None:
        raise BadInput(f"no run {run_id!r} in the database")
    return run


ON_CHAIN = ("rpc", "all")  # sources of a run that reads v2 fills from the chain


def _iso(ts: int | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts is not None else None


def v2_progress(store: Store, now: datetime | None = None) -> dict[str, Any]:
    """How far the v2 (on-chain) fills are fetched (``Store.chain_reach``): the blocks finished block units cover
    without a gap from where the first was planned, about when the last of them was, the newest v2 fill stored
    below it, and whether that reaches the safe head (``ChainReach.current``)."""
    reach = store.chain_reach()
    return {"blocks_done_through": reach.through, "reached_at": _iso(reach.at_ts),
            "newest_fill_at": _iso(reach.newest_fill_ts), "current": reach.current(utcnow(now).timestamp())}


def _reruns(store: Store, run: Run, now: datetime, stalled_after_s: float) -> list[dict[str, str]]:
    """The runs made from ``run`` by ``clobjob rerun`` with their states, latest first."""
    found = []
    for child in store.runs():
        if child.parent_run_id == run.run_id:
            states = [s.state for s in shard_statuses(store, child, store.heartbeats(child.run_id), now,
                                                      stalled_after_s)]
            found.append({"run_id": child.run_id, "state": run_state(states).value})
    return found


def run_status(store: Store, run_id: str | None = None, *, now: datetime | None = None,
               heartbeat_interval_s: float = 5, stalled_after: float = 3, coverage: bool = True) -> dict[str, Any]:
    """The status of a run (default: the latest) as the JSON-able schema of the module docstring.

    ``coverage=False`` skips the whole-table sections (``markets``, ``recent``: null), e.g. for frequent
    live publishing during a run.
    """
    now = utcnow(now)
    stalled_after_s = heartbeat_interval_s * stalled_after
    run = _pick_run(store, run_id)
    beats = store.heartbeats(run.run_id) if run else {}
    shards = shard_statuses(store, run, beats, now, stalled_after_s) if run else []
    markets = store.market_fill_counts(now=now.timestamp()) if coverage else None
    state = run_state([s.state for s in shards]) if run else None
    reruns = _reruns(store, run, now, stalled_after_s) if run else []
    return {
        "schema_version": SCHEMA_VERSION, "generated_at": now.isoformat(), "live": False, "live_age_s": None,
        "stalled_after_s": stalled_after_s,
        "run_id": run.run_id if run else None,
        "parent_run_id": (run.parent_run_id or None) if run else None,
        "created_at": run.created_at.isoformat() if run and run.created_at else None,
        "source": run.source if run else None,
        "state": state.value if state else None, "ended": bool(state and state.ended),
        "reruns": reruns,
        "finished_by": next((r["run_id"] for r in reruns if r["state"] == RunState.DONE), None)
        if state != RunState.DONE else None,
        "markets": coverage_summary(markets) if markets is not None else None,
        "recent": store.recent_fills(now) if coverage else None,
        "v2": v2_progress(store, now) if (run and run.source in ON_CHAIN) or (markets and any(
            m.status is MarketStatus.WAITING_V2 for m in markets)) else None,
        "aggregate": _aggregate(shards, beats),
        "shards": [s.model_dump(mode="json") for s in shards],
        "invalid_checkpoints": _invalid_checkpoints(store, run.run_id) if run else [],
    }


def _invalid_checkpoints(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The units of a run whose latest progress row fails validation, and what each resumes from."""
    return [{"shard": bad.shard, "unit_id": bad.unit_id, "reason": bad.reason, "where": bad.where,
             "resumes_from": None if bad.resumed is None else {"pages": bad.resumed.pages,
                                                               "fills": bad.resumed.fills}}
            for bad in store.checked_checkpoints(run_id)[1]]


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


def pct(ratio: float | None) -> str:
    """A ratio as a percentage with two decimals ("-" when unknown)."""
    return "-" if ratio is None else f"{100 * ratio:.2f}%"


WIDTH = 100
"""Tables and lines fit this many columns."""

_HTTP_CODE = re.compile(r"\b(HTTP \d{3})\b:?\s*")


def short_error(text: str, width: int) -> str:
    """An error as ``Type(HTTP 503): message``, cut to ``width`` with its type and code always kept."""
    kind, sep, message = text.partition(": ")
    if not (sep and kind.isidentifier()):
        kind, message = "", text
    code = _HTTP_CODE.search(message)
    if code and kind:
        message = (message[:code.start()] + message[code.end():]).strip()
        kind = f"{kind}({code.group(1)})"
    head = f"{kind}: " if kind else ""
    room = max(width - len(head), 1)
    return head + (message if len(message) <= room else message[:room - 1] + "…")


def _pct1(ratio: float) -> str:
    return f"{100 * ratio:.1f}%"


_TABLE_HEADER = (f"{'shard':>5} {'state':<8} {'units d/f/all':>13} {'fills':>12} {'expected':>12} {'req/s':>6} "
                 f"{'429s':>6} {'ETA':>8} {'beat':>7}  pod")
STOPPED_HINT = "stopped and checkpointed — run the same command to resume"
MORE_THAN_EXPECTED = "+ more fills stored than expected: the source's count is stale; `clobjob markets sync` renews it"


def render_status(status: Mapping[str, Any]) -> str:
    """A compact human view of ``run_status`` (or a live status) that fits 100 columns."""
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
    if status.get("finished_by"):
        lines.append(f"finished by rerun {status['finished_by']} (done): its units were fetched there")
    elif status.get("reruns"):
        lines.append("reruns   " + ", ".join(f"{r['run_id']} {r['state']}" for r in status["reruns"]))
    if status["markets"] is not None:
        m = status["markets"]
        lines.append(f"markets  {m['universe']:,} · coverage {pct(m['coverage'])} · complete {m['complete']:,} · "
                     f"zero-fill {m['zero_fill']:,} · missing {m['missing']:,}")
        lines.append(f"         not covered {m['not_covered']:,} (missing {m['missing']:,}, incomplete "
                     f"{m['incomplete']:,}, unknown {m['unknown']:,}, short at the source {m['source_short']:,})")
    if status["recent"] is not None:
        lines.append(f"recent   fills by fill time: last 24 h {status['recent']['fills_24h']:,} · "
                     f"last 7 d {status['recent']['fills_7d']:,}")
    if status["markets"] is not None and status["markets"].get("waiting_v2"):
        waiting = status["markets"]["waiting_v2"]
        lines.append(f"         waiting for v2 {waiting:,}: v1 fills complete, covered once the chain is read to "
                     "the safe head")
    if status.get("v2") is not None:
        lines.append("v2       " + render_v2(status["v2"]))
        if status["v2"]["newest_fill_at"] is not None:
            lines.append(f"         newest v2 fill there {_minute(status['v2']['newest_fill_at'])}")
    if status["run_id"] is not None:
        a = status["aggregate"]
        lines.append(f"total    fills {a['fills']:,} of {a['expected_fills']:,} expected · units "
                     f"{a['units_done']:,}/{a['units_total']:,} done, {a['units_failed']:,} failed")
        if status.get("progress"):  # a live status: the ETA of the remaining fills at the measured rate
            lines.append("progress " + render_progress(status["progress"], WIDTH - 9))
        else:
            lines.append(f"rate     {a['rps']:.1f} req/s · 429s {pct(a['share_429'])} · ETA "
                         f"{render_duration(a['eta_s'])} (of the remaining requests)")
        lines.append("")
        lines.append(_TABLE_HEADER)
        more = False
        for s in status["shards"]:
            units = f"{s['units_done']}/{s['units_failed']}/{s['units_total']}"
            marker = "+" if s["fills"] > s["expected_fills"] else " "
            more = more or marker == "+"
            lines.append(f"{s['shard']:>5} {s['state']:<8} {units:>13} {s['fills']:>11,}{marker} "
                         f"{s['expected_fills']:>12,} {s['rps']:>6.1f} {_pct1(s['share_429']):>6} "
                         f"{render_duration(s['eta_s']):>8} {render_duration(s['heartbeat_age_s']):>7}  "
                         f"{printable(s['pod'])[:WIDTH - 87]}")
            if s["last_error"] and s["state"] == RunState.FAILED:  # why it failed, whole, wrapped to the width
                error = printable(s["last_error"])
                wrapped = textwrap.wrap(short_error(error, len(error) + 40), WIDTH - 18) or [""]
                lines += ["      last error: " + wrapped[0], *("                  " + rest for rest in wrapped[1:])]
            elif s["last_error"]:
                lines.append("      last error: " + short_error(printable(s["last_error"]), WIDTH - 18))
        if more:
            lines += ["", MORE_THAN_EXPECTED]
        for bad in status.get("invalid_checkpoints") or ():
            resumes = bad["resumes_from"]
            lines.append(f"invalid checkpoint: shard {bad['shard']} unit {bad['unit_id']}: "
                         f"{short_error(printable(bad['reason']), WIDTH - 66)} · resumes from "
                         + (f"{resumes['pages']:,} pages" if resumes else "its start"))
    if status.get("state") == RunState.STOPPED:
        lines += render_job(status.get("job"))
        return "\n".join(line.rstrip() for line in [*lines, "", STOPPED_HINT])
    lines += render_job(status.get("job"))
    return "\n".join(line.rstrip() for line in lines)


def _minute(iso: str | None) -> str:
    return "-" if iso is None else iso[:16].replace("T", " ") + " UTC"


def render_v2(v2: Mapping[str, Any]) -> str:
    """How far the chain is read, in one line (``v2`` of ``run_status``)."""
    if v2["blocks_done_through"] is None:
        return "the chain is not read yet: set CLOBJOB_RPC_URL and run clobjob backfill"
    state = "at the safe head" if v2["current"] else "behind the safe head"
    return f"chain read through block {v2['blocks_done_through'] - 1:,} (≈ {_minute(v2['reached_at'])}): {state}"


def render_job(job: Mapping[str, Any] | None) -> list[str]:
    """The lines of a run's Kubernetes Job (``job`` of ``clobjob status``), none when it has no Job."""
    if not job:
        return []
    if "error" in job:
        return ["", f"kubernetes: cannot read the Job: {job['error']}"]
    done = ",".join(map(str, job["completed_indexes"])) or "-"
    failed = ",".join(map(str, job["failed_indexes"])) or "-"
    state = "finished" if job["finished"] else "active"
    reason = f" ({job['failure_reason']})" if job["failure_reason"] else ""
    lines = ["", f"job      {job['namespace']}/{job['name']} · {state}{reason} · completions {job['completions']} · "
             f"parallelism {job['parallelism']} · completed {done} · failed {failed} · pods active {job['active']}, "
             f"failed {job['failed']}"]
    lines += [f"  logs of shard {index}: {command}" for index, command in job["logs"].items()]
    lines.append(f"  logs of all shards: {job['logs_all']}")
    return lines


def render_progress(progress: Mapping[str, Any], width: int = WIDTH) -> str:
    """One line of ``ProgressMeter`` figures: a bar of fills stored ÷ expected, the fills and the ETA, then as
    many of retries, rates and shares as fit ``width`` columns (the least telling dropped first), then the last
    error when a retry is on."""
    filled = int(10 * progress["done_share"])
    head = (f"[{'#' * filled}{'.' * (10 - filled)}] {_pct1(progress['done_share'])} "
            f"{progress['fills']:,}/{progress['expected_fills']:,} fills · ETA {render_duration(progress['eta_s'])}")
    retrying = bool(progress["retries"] or progress["retrying"])
    parts = [(6, f"{progress['fills_per_s']:,.0f} fills/s"), (1, f"{progress['rps']:.1f} req/s"),
             (4, f"429s {_pct1(progress['share_429'])}")]
    if progress["share_errors"] is not None:
        parts.append((3, f"errors {_pct1(progress['share_errors'])}"))
    if progress["retrying"]:
        parts.append((8, f"retrying shard {','.join(map(str, progress['retrying']))}"))
    if retrying:
        parts.append((7, f"retries {progress['retries']:,}"))

    def joined() -> str:
        return " · ".join([head, *(text for _, text in parts)])

    while parts and len(joined()) > width:
        parts.remove(min(parts))
    line = joined()
    if progress["last_error"] and retrying and width - len(line) > 30:
        line += " · last: " + short_error(progress["last_error"], width - len(line) - 9)
    return line if len(line) <= width else line[:width - 1] + "…"
