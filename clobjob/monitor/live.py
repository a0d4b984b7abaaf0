"""Live status while a run holds the embedded database: chDB lets one process open a database path, so a
backfill on the embedded database calls ``publish_live(run_status(...), live_path(settings))`` every few
seconds; ``current_status`` reads ClickHouse, or that file (``live`` true, ``live_age_s`` set) while another
process holds the database."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
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
            json.dump({**status, "live": True}, out)
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

