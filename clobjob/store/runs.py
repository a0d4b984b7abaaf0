"""The run tables: ``backfill_runs``, ``backfill_units`` (the plan), ``backfill_progress`` (checkpoints,
latest version wins; every version also kept in ``backfill_progress_history``) and ``backfill_heartbeats``
(latest per shard)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import ValidationError

from clobjob.models import (
    Checkpoint,
    Heartbeat,
    Run,
    RunParams,
    WorkUnit,
    as_utc,
)
from clobjob.store.database import Database

UNIT_COLUMNS = ("run_id", "shard", "unit_id", "source", "condition_ids", "token_ids", "ts_from", "ts_to",
                "block_from", "block_to", "id_from",
                "id_to", "expected_fills", "expected_requests")
PROGRESS_COLUMNS = ("run_id", "shard", "unit_id", "state", "cursor", "fills", "pages", "attempts",
                    "last_error")
# Read beside a progress row: the state's Enum8 code (the driver reads a code outside the enum as None), and
# where the row is stored.
STORED_PROGRESS = ", ".join(PROGRESS_COLUMNS) + ", toInt8(state), version, pod, updated_at"
HEARTBEAT_COLUMNS = tuple(Heartbeat.model_fields)
RUN_COLUMNS = ("run_id", "parent_run_id", "source", "shards", "params", "created_at")

SHARD_PROGRESS_SQL = """
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


CheckpointCheck = Callable[[Checkpoint], str | None]
"""A further check of a stored checkpoint (the source's of its cursor): the reason it is invalid, or None."""


@dataclass(frozen=True)
class InvalidCheckpoint:
    """A unit's latest stored progress row that fails validation: why, where it is stored, and the newest older
    version of the unit that passes, which the unit resumes from (None: none is left, it starts again)."""

    run_id: str
    shard: int
    unit_id: int
    reason: str
    where: str
    resumed: Checkpoint | None

    def __str__(self) -> str:
        resumed = "the unit's start (no valid version left)" if self.resumed is None else (
            f"its last valid checkpoint ({self.resumed.pages} pages, {self.resumed.fills} fills)")
        return (f"run {self.run_id} shard {self.shard} unit {self.unit_id}: stored checkpoint is invalid "
                f"({self.reason}) in {self.where}; resuming from {resumed}")


def _checked(row: Sequence, check: CheckpointCheck | None) -> tuple[Checkpoint | None, str]:
    """A ``STORED_PROGRESS`` row as a checkpoint, or None and the reason naming each bad field and its value."""
    values = dict(zip(PROGRESS_COLUMNS, row))
    if values["state"] is None:  # an Enum8 code outside the enum: validate the code itself
        values["state"] = row[len(PROGRESS_COLUMNS)]
    try:
        checkpoint = Checkpoint(**values)
    except ValidationError as exc:
        return None, "; ".join(f"{'.'.join(map(str, e['loc']))} {e['input']!r}: {e['msg']}" for e in exc.errors())
    reason = check(checkpoint) if check is not None else None
    return (None, reason) if reason else (checkpoint, "")


def _where(row: Sequence) -> str:
    version, pod, updated_at = row[len(PROGRESS_COLUMNS) + 1:]
    return f"backfill_progress version {version} (pod {pod or '?'}, written {as_utc(updated_at):%Y-%m-%d %H:%M:%S} UTC)"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _version() -> int:
    """A version that grows with wall time, so the latest write wins across processes and pods."""
    return time.time_ns()


class RunTables:
    """Reads and writes of runs, their units, checkpoints and heartbeats."""

    db: Database

    # --- runs and plans --------------------------------------------------------------------------

    def create_run(self, run: Run, units: Sequence[WorkUnit]) -> None:
        """Write a run and its units (replacing any earlier plan of the same run id)."""
        self.delete_run(run.run_id)
        self.db.insert("backfill_units", UNIT_COLUMNS,
                       [[getattr(u, c) for u in units] for c in UNIT_COLUMNS])
        params = json.dumps(run.params.model_dump(mode="json", exclude_none=True), sort_keys=True)
        self.db.insert("backfill_runs", RUN_COLUMNS + ("version",),
                       [[run.run_id], [run.parent_run_id], [run.source], [run.shards], [params],
                        [run.created_at or _now()], [_version()]])

    def delete_run(self, run_id: str) -> None:
        """Remove a run, its plan and its progress (used to re-plan with --force)."""
        for table in ("backfill_runs", "backfill_units", "backfill_progress", "backfill_progress_history",
                      "backfill_heartbeats"):
            self.db.command(f"DELETE FROM {{db}}.{table} WHERE run_id = {{run:String}}", {"run": run_id})

    def runs(self) -> list[Run]:
        """Every run, newest first."""
        found = self.db.rows(f"SELECT {', '.join(RUN_COLUMNS)} FROM {{db}}.backfill_runs FINAL "
                             "ORDER BY created_at DESC, run_id DESC")
        return [Run(**{**dict(zip(RUN_COLUMNS, row)), "params": RunParams.model_validate_json(row[4])})
                for row in found]

    def run(self, run_id: str) -> Run | None:
        """One run, or None."""
        return next((r for r in self.runs() if r.run_id == run_id), None)

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

    def checkpoints(self, run_id: str, shard: int | None = None, *,
                    check: CheckpointCheck | None = None) -> dict[int, Checkpoint]:
        """The latest valid checkpoint of every unit that has one, by unit id (see ``checked_checkpoints``)."""
        return self.checked_checkpoints(run_id, shard, check=check)[0]

    def checked_checkpoints(self, run_id: str, shard: int | None = None, *, check: CheckpointCheck | None = None
                            ) -> tuple[dict[int, Checkpoint], list[InvalidCheckpoint]]:
        """The latest checkpoint of every unit that has one, by unit id, and the units whose latest stored row
        fails validation (``Checkpoint``'s, then ``check``'s): each of those has its newest older version that
        passes instead (from the kept history), or none."""
        where = "run_id = {run:String}" + (" AND shard = {shard:UInt32}" if shard is not None else "")
        found = self.db.rows(f"SELECT {STORED_PROGRESS} FROM {{db}}.backfill_progress FINAL WHERE {where}",
                             {"run": run_id, "shard": shard})
        result, invalid = {}, []
        for row in found:
            checkpoint, reason = _checked(row, check)
            unit_shard, unit_id, version = row[1], row[2], row[len(PROGRESS_COLUMNS) + 1]
            if checkpoint is None:
                checkpoint = self._last_valid(run_id, unit_shard, unit_id, version, check)
                invalid.append(InvalidCheckpoint(run_id, unit_shard, unit_id, reason, _where(row), checkpoint))
            if checkpoint is not None:
                result[unit_id] = checkpoint
        return result, sorted(invalid, key=lambda bad: (bad.shard, bad.unit_id))

    def _last_valid(self, run_id: str, shard: int, unit_id: int, below: int,
                    check: CheckpointCheck | None) -> Checkpoint | None:
        """The newest version of a unit's checkpoint older than ``below`` that validates, None when none does."""
        key = ("run_id = {run:String} AND shard = {shard:UInt32} AND unit_id = {unit:UInt32} "
               "AND version < {below:UInt64}")
        found = self.db.rows(
            f"SELECT * FROM (SELECT {STORED_PROGRESS} FROM {{db}}.backfill_progress_history WHERE {key} UNION ALL "
            f"SELECT {STORED_PROGRESS} FROM {{db}}.backfill_progress WHERE {key}) ORDER BY version DESC",
            {"run": run_id, "shard": shard, "unit": unit_id, "below": below})
        return next((cp for cp in (_checked(row, check)[0] for row in found) if cp is not None), None)

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

    def blocks_done_through(self, start: int | None = None) -> int | None:
        """The end (exclusive) of the blocks that finished block units of any run cover without a gap from
        ``start`` (default: the first block a block unit of a run without a time window was planned from, the
        exchanges' first block since every such run reads from there); ``start`` itself when none covers it
        (None: no ``start`` and no such block unit yet)."""
        found = self.db.rows(
            """SELECT u.block_from, u.block_to
               FROM (SELECT run_id, shard, unit_id, block_from, block_to FROM {db}.backfill_units FINAL
                     WHERE block_from IS NOT NULL AND block_to IS NOT NULL) AS u
               JOIN (SELECT run_id, shard, unit_id FROM {db}.backfill_progress FINAL WHERE state = 'done') AS p
               ON u.run_id = p.run_id AND u.shard = p.shard AND u.unit_id = p.unit_id
               ORDER BY u.block_from""")
        reached = start if start is not None else self.db.scalar(
            """SELECT minOrNull(u.block_from) FROM {db}.backfill_units AS u FINAL
               JOIN (SELECT run_id, params FROM {db}.backfill_runs FINAL) AS r ON u.run_id = r.run_id
               WHERE JSONExtractString(r.params, 'since') = ''""")
        if reached is None:
            return None
        for low, high in found:
            if low > reached:
                break
            reached = max(reached, high)
        return reached

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

    def shard_progress(self, run_id: str) -> dict[int, tuple]:
        """Per shard of a run: (units, done, failed, started, stored fills, expected fills, remaining requests,
        last error). Remaining requests count max(expected − pages, 1) over units not done or failed; the
        last error is that of the latest failed unit, else of the latest unfinished unit with one."""
        found = self.db.rows(SHARD_PROGRESS_SQL, {"run": run_id})
        return {row[0]: row[1:] for row in found}

    # --- heartbeats ------------------------------------------------------------------------------

    def save_heartbeat(self, beat: Heartbeat) -> None:
        """Record a shard's latest heartbeat."""
        self.db.insert("backfill_heartbeats", HEARTBEAT_COLUMNS,
                       [[getattr(beat, name)] for name in HEARTBEAT_COLUMNS])

    def runs_beating_since(self, since: datetime) -> list[str]:
        """Runs with a heartbeat at or after ``since``, by run id."""
        found = self.db.rows("SELECT run_id FROM {db}.backfill_heartbeats FINAL GROUP BY run_id "
                             "HAVING max(at) >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') ORDER BY run_id",
                             {"since": int(since.timestamp() * 1000)})
        return [run_id for (run_id,) in found]

    def heartbeats(self, run_id: str) -> dict[int, Heartbeat]:
        """The latest heartbeat of each shard of a run."""
        found = self.db.rows(
            f"SELECT {', '.join(HEARTBEAT_COLUMNS)} FROM {{db}}.backfill_heartbeats FINAL "
            "WHERE run_id = {run:String}",
            {"run": run_id},
        )
        beats = [Heartbeat(**dict(zip(HEARTBEAT_COLUMNS, row))) for row in found]
        return {b.shard: b for b in beats}
