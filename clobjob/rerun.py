"""Reruns: a new run made of the failed or unfinished units of an earlier one (``clobjob rerun``).

A rerun keeps each unit's tokens, time range and fill-id range (a copy of the unit), re-assigns the units
over shards with the planner's LPT ``assign`` (by the requests each still needs), records ``parent_run_id``
and kind ``rerun``, and is launched like any other run. Each unit resumes from the cursor its
last attempt stored: the rerun starts with a pending checkpoint holding that cursor, fills and pages. That
is safe because a checkpoint never points past rows that are not stored (data first, checkpoint second),
and any re-sent fill deduplicates by id.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

from clobjob.errors import BadInput
from clobjob.models import Checkpoint, Run, RunKind, RunParams, UnitState, WorkUnit
from clobjob.plan import assign
from clobjob.store import Store

UNFINISHED = frozenset({UnitState.PENDING, UnitState.RUNNING, UnitState.FAILED})


def rerun_id(store: Store, run_id: str) -> str:
    """The first free run id ``<run_id>-rN`` (N = 1, 2, …)."""
    taken = {r.run_id for r in store.runs()}
    return next(f"{run_id}-r{n}" for n in itertools.count(1) if f"{run_id}-r{n}" not in taken)


def _selected(store: Store, run: Run, failed_only: bool,
              shards: Collection[int] | None) -> list[tuple[WorkUnit, Checkpoint | None]]:
    """The run's units to rerun with their latest checkpoints (None: never started)."""
    outside = sorted(set(shards or ()) - set(range(run.shards)))
    if outside:
        raise BadInput(f"run {run.run_id!r} has shards 0..{run.shards - 1}: no shard "
                       f"{', '.join(map(str, outside))}")
    wanted = {UnitState.FAILED} if failed_only else UNFINISHED
    saved = store.checkpoints(run.run_id)
    return [(unit, saved.get(unit.unit_id)) for unit in store.units(run.run_id)
            if (shards is None or unit.shard in shards)
            and (saved[unit.unit_id].state if unit.unit_id in saved else UnitState.PENDING) in wanted]


def plan_rerun(store: Store, run_id: str, new_run_id: str, *, failed_only: bool = False,
               shards: Collection[int] | None = None, new_shards: int | None = None) -> list[WorkUnit]:
    """Record run ``new_run_id`` made of ``run_id``'s failed units (``failed_only``) or unfinished ones (pending,
    running, failed), of every shard or only ``shards``; returns its units (none recorded when nothing is left).

    The units go to ``new_shards`` shards (default: as many shards as held them), longest remaining first.
    """
    run = store.run(run_id)
    if run is None:
        raise BadInput(f"no run {run_id!r} in the database")
    chosen = _selected(store, run, failed_only, shards)
    if not chosen:
        return []
    count = new_shards if new_shards is not None else len({unit.shard for unit, _ in chosen})
    remaining = [max(unit.expected_requests - (cp.pages if cp else 0), 1) for unit, cp in chosen]
    units, carried = [], []
    for unit_id, (i, shard) in enumerate(assign(remaining, count)):
        unit, cp = chosen[i]
        units.append(unit.model_copy(update={"run_id": new_run_id, "unit_id": unit_id, "shard": shard}))
        if cp is not None and (cp.cursor or cp.pages):
            carried.append(Checkpoint(run_id=new_run_id, shard=shard, unit_id=unit_id, cursor=cp.cursor,
                                      fills=cp.fills, pages=cp.pages))
    params = RunParams(kind=RunKind.RERUN, failed_only=failed_only, units=len(units),
                       from_shards=tuple(sorted(shards)) if shards is not None else None)
    store.create_run(Run(run_id=new_run_id, shards=count, source=run.source, params=params, parent_run_id=run_id),
                     units)
    store.save_checkpoints(carried)
    return units


def lineage(store: Store, run: Run) -> list[str]:
    """The runs ``run`` descends from: its parent first, then the parent's parent, up to the original run."""
    chain, parent = [], run.parent_run_id
    while parent and parent not in chain:
        chain.append(parent)
        found = store.run(parent)
        parent = found.parent_run_id if found else ""
    return chain
