"""Live status while a run holds the embedded database: chDB lets one process open a database path, so a
backfill on the embedded database publishes its status (``publish_live``) when it starts, every heartbeat
interval and when it stops, stamped with its ``pid``; ``current_status`` reads ClickHouse, or that file
(``live`` true, ``live_age_s`` set) while the process that wrote it holds the database — waiting a bounded
time for it when the holder has not published yet (a file of an earlier process is never shown)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from clobjob.config import Settings
from clobjob.errors import ClobjobError
from clobjob.monitor.status import run_status, utcnow
from clobjob.store import DatabaseBusy, open_store


def live_path(settings: Settings) -> Path:
    """Where a running backfill publishes its live status."""
    return settings.home / "live" / "status.json"


def publish_live(status: Mapping[str, Any], path: Path) -> None:
    """Write ``status`` (marked live) to ``path`` atomically: a temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({**status, "live": True, "pid": os.getpid()}, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_live(path: Path, max_age_s: float, *, now: datetime | None = None) -> dict[str, Any] | None:
    """The published live status with its age in ``live_age_s``; None when missing, unreadable or older."""
    try:
        status = json.loads(path.read_text())
        age = (utcnow(now) - datetime.fromisoformat(status["generated_at"])).total_seconds()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if age > max_age_s:
        return None
    return {**status, "live": True, "live_age_s": round(max(age, 0.0), 1)}


LIVE_MAX_AGE_S = 60.0
"""A live status older than this is ignored (the backfill that published it is gone or stuck)."""


class NoLiveStatus(ClobjobError):
    """Another process holds the embedded database and has published no fresh live status (yet)."""


LIVE_WAIT_S = 30.0
"""How long ``status`` waits for the live status of a process that holds the database but has not published."""


def _holders_live(path: Path, busy: DatabaseBusy, run_id: str | None, now: datetime | None) -> dict[str, Any] | None:
    live = read_live(path, LIVE_MAX_AGE_S, now=now)
    if live is None or run_id not in (None, live["run_id"]) or (busy.pid and live.get("pid") != busy.pid):
        return None
    return live


def current_status(settings: Settings, run_id: str | None = None, *, now: datetime | None = None,
                   wait_s: float = 0.0, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``run_status`` from ClickHouse; while another process holds the embedded database, the live status it
    published, waiting up to ``wait_s`` for one (``say`` tells why once); ``NoLiveStatus`` when none comes."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            with open_store(settings) as store:  # DatabaseBusy while another process holds the embedded database
                return run_status(store, run_id, now=now, heartbeat_interval_s=settings.heartbeat_interval_s)
        except DatabaseBusy as busy:
            path = live_path(settings)
            live = _holders_live(path, busy, run_id, now)
            if live is not None:
                return live
            if busy.served_at:  # a server publishes no live status: the error says where to read instead
                raise
            wanted = f" for run {run_id}" if run_id else ""
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:g}s" if wait_s else ""
                raise NoLiveStatus(f"{busy}, and it has published no live status{wanted} at {path}{waited}; "
                                   "a backfill publishes one when it starts running its shards") from None
            if say is not None and not told:
                say(f"{busy}; waiting up to {wait_s:g}s for its live status{wanted}…")
                told = True
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
