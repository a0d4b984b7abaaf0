"""The run tables: ``backfill_runs``, ``backfill_units`` (the plan), ``backfill_progress`` (checkpoints,
latest version wins) and ``backfill_heartbeats`` (latest per shard)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from clobjob.models import Checkpoint, Heartbeat, UnitState, WorkUnit, as_utc
from clobjob.store.database import Database

UNIT_COLUMNS = ("run_id", "shard", "unit_id", "condition_ids", "token_ids", "ts_from", "ts_to", "id_from",
                "id_to", "expected_fills", "expected_requests")
PROGRESS_COLUMNS = ("run_id", "shard", "unit_id", "state", "cursor", "fills", "pages", "attempts",
                    "last_error")
HEARTBEAT_COLUMNS = tuple(Heartbeat.model_fields)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _version() -> int:
    """A version that grows with wall time, so the latest write wins across processes and pods."""
    return time.time_ns()


class RunTables:
    """Reads and writes of runs, their units, checkpoints and heartbeats."""

    db: Database

    # --- runs and plans --------------------------------------------------------------------------

    def create_run(self, run_id: str, shards: int, units: Sequence[WorkUnit], *, params: dict[str, Any],
                   source: str = "subgraph", parent_run_id: str = "") -> None:
        """Write a run and its units (replacing any earlier plan of the same run id)."""
        self.delete_run(run_id)
        self.db.insert("backfill_units", UNIT_COLUMNS,
                       [[getattr(u, c) for u in units] for c in UNIT_COLUMNS])
        self.db.insert(
            "backfill_runs",
            ("run_id", "parent_run_id", "source", "shards", "params", "created_at", "version"),
            [[run_id], [parent_run_id], [source], [shards], [json.dumps(params, sort_keys=True)], [_now()],
             [_version()]],
        )

    def delete_run(self, run_id: str) -> None:
        """Remove a run, its plan and its progress (used to re-plan with --force)."""
        for table in ("backfill_runs", "backfill_units", "backfill_progress", "backfill_heartbeats"):
            self.db.command(f"DELETE FROM {{db}}.{table} WHERE run_id = {{run:String}}", {"run": run_id})

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first: run_id, parent_run_id, source, shards, params (dict), created_at."""
        found = self.db.rows(
            "SELECT run_id, parent_run_id, source, shards, params, created_at FROM {db}.backfill_runs FINAL "
            "ORDER BY created_at DESC, run_id DESC"
        )
        keys = ("run_id", "parent_run_id", "source", "shards", "params", "created_at")
        return [{**dict(zip(keys, row)), "params": json.loads(row[4])} for row in found]

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run (see ``runs``), or None."""
        return next((r for r in self.runs() if r["run_id"] == run_id), None)

    def units(self, run_id: str, shard: int | None = None) -> list[WorkUnit]:
        """The planned units of a run (one shard, or all), ordered by shard and unit id."""
        where = "run_id = {run:String}" + (" AND shard = {shard:UInt32}" if shard is not None else "")
        found = self.db.rows(
            f"SELECT {', '.join(UNIT_COLUMNS)} FROM {{db}}.backfill_units FINAL WHERE {where} "
            "ORDER BY shard, unit_id",
            {"run": run_id, "shard": shard},
        )
        return [WorkUnit(**dict(zip(UNIT_COLUMNS, row))) for row in found]

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoints(self, checkpoints: Iterable[Checkpoint], pod: str = "") -> None:
        """Write checkpoints (call only after the fills they cover are stored)."""
        rows = list(checkpoints)
        if not rows:
            return
        now, version = _now(), _version()
        columns = [[getattr(c, name) for c in rows] for name in PROGRESS_COLUMNS]
        columns[PROGRESS_COLUMNS.index("state")] = [c.state.value for c in rows]
        self.db.insert("backfill_progress", PROGRESS_COLUMNS + ("pod", "updated_at", "version"),
                       columns + [[pod] * len(rows), [now] * len(rows), [version + i for i in range(len(rows))]])

    def checkpoints(self, run_id: str, shard: int | None = None) -> dict[int, Checkpoint]:
        """The latest checkpoint of every unit that has one, by unit id."""
        where = "run_id = {run:String}" + (" AND shard = {shard:UInt32}" if shard is not None else "")
        found = self.db.rows(
            f"SELECT {', '.join(PROGRESS_COLUMNS)} FROM {{db}}.backfill_progress FINAL WHERE {where}",
            {"run": run_id, "shard": shard},
        )
        result = {}
        for row in found:
            values = dict(zip(PROGRESS_COLUMNS, row))
            values["state"] = UnitState(values["state"])
            result[values["unit_id"]] = Checkpoint(**values)
        return result

    def fetched_markets(self) -> dict[str, datetime]:
        """Markets fetched whole by some run (every unit holding them done) → when the last unit finished.

        Time-window units (no token ids) do not count: they fetch a slice of every market.
        """
        found = self.db.rows(
            """SELECT condition_id, max(finished) FROM (
                   SELECT u.run_id AS run_id, arrayJoin(u.condition_ids) AS condition_id,
                          countIf(p.state = 'done') AS done, count() AS units, max(p.updated_at) AS finished
                   FROM (SELECT * FROM {db}.backfill_units FINAL WHERE length(token_ids) > 0) AS u
                   LEFT JOIN (SELECT run_id, shard, unit_id, state, updated_at FROM {db}.backfill_progress FINAL) AS p
                   ON u.run_id = p.run_id AND u.shard = p.shard AND u.unit_id = p.unit_id
                   GROUP BY run_id, condition_id
               ) WHERE done = units GROUP BY condition_id"""
        )
        return {condition: as_utc(finished) for condition, finished in found}

    def unfinished_units(self, run_id: str) -> int:
        """Units of a run that are not done (failed ones included)."""
        return self.db.scalar(
            """SELECT countIf(p.state != 'done' OR p.state IS NULL)
               FROM (SELECT run_id, shard, unit_id FROM {db}.backfill_units FINAL WHERE run_id = {run:String}) AS u
               LEFT JOIN (SELECT run_id, shard, unit_id, toNullable(state) AS state FROM {db}.backfill_progress FINAL
                          WHERE run_id = {run:String}) AS p
               ON u.run_id = p.run_id AND u.shard = p.shard AND u.unit_id = p.unit_id""",
            {"run": run_id},
        ) or 0

    # --- heartbeats ------------------------------------------------------------------------------

    def save_heartbeat(self, beat: Heartbeat) -> None:
        """Record a shard's latest heartbeat."""
        self.db.insert("backfill_heartbeats", HEARTBEAT_COLUMNS,
                       [[getattr(beat, name)] for name in HEARTBEAT_COLUMNS])

    def heartbeats(self, run_id: str) -> dict[int, Heartbeat]:
        """The latest heartbeat of each shard of a run."""
        found = self.db.rows(
            f"SELECT {', '.join(HEARTBEAT_COLUMNS)} FROM {{db}}.backfill_heartbeats FINAL "
            "WHERE run_id = {run:String}",
            {"run": run_id},
        )
        beats = [Heartbeat(**dict(zip(HEARTBEAT_COLUMNS, row))) for row in found]
        return {b.shard: b for b in beats}
