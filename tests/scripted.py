"""A scripted FillSource and a small planned run: a test double of the source *interface* only, so
worker and executor tests can place a failure, a stall or a stop at an exact page."""

from __future__ import annotations

import asyncio
import random

from clobjob.errors import SourceError
from clobjob.models import FILL_COLUMNS, Market, Run, WorkUnit
from clobjob.parts import make_controller
from clobjob.sources.base import Page
from clobjob.worker import ShardWorker

PAGE = 10


def fill_row(unit_id: int, i: int, token: str, condition: str) -> tuple:
    values = {c: None for c in FILL_COLUMNS}
    values.update(
        id=f"0x{unit_id:032x}{i:032x}_0x{i:064x}", transaction_hash=f"0x{unit_id:032x}{i:032x}",
        order_hash=f"0x{i:064x}", timestamp=1_700_000_000 + i, exchange="", maker="0x" + "1" * 40,
        taker="0x" + "2" * 40, maker_asset_id="0", taker_asset_id=token, maker_amount_filled=i + 1,
        taker_amount_filled=2 * i + 1, fee=0, condition_id=condition, token_id=token, side="BUY",
        is_relay_leg=False, exchange_version=1, source="test",
    )
    return tuple(values[c] for c in FILL_COLUMNS)


class ScriptedSource:
    """Pages of PAGE rows per unit; cursor = rows served so far. Faults are scripted per (unit, page)."""

    name = "scripted"

    def __init__(self, fills: dict[int, list[tuple]]) -> None:
        self.fills = fills
        self.calls: list[tuple[int, str]] = []
        self.fail_at: dict[tuple[int, int], list[BaseException]] = {}
        self.hang_at: dict[tuple[int, int], int] = {}
        self.on_page = None

    def check_cursor(self, unit, cursor):
        if cursor and not cursor.isdigit():
            raise SourceError(f"unit {unit.unit_id}: cursor {cursor!r} is not a row count")

    async def pages(self, unit, cursor, conditions, lanes=None):
        rows = self.fills[unit.unit_id]
        start = int(cursor or 0)
        while True:
            page_no = start // PAGE
            self.calls.append((unit.unit_id, str(start)))
            faults = self.fail_at.get((unit.unit_id, page_no))
            if faults:
                raise faults.pop(0)
            if self.hang_at.get((unit.unit_id, page_no), 0) > 0:
                self.hang_at[(unit.unit_id, page_no)] -= 1
                await asyncio.sleep(3600)
            chunk = rows[start:start + PAGE]
            start += len(chunk)
            if self.on_page:
                await self.on_page(unit.unit_id, page_no)
            yield Page.of_rows(chunk, str(start), start >= len(rows))
            if start >= len(rows):
                return

    async def close(self):
        pass


def plan_scripted_run(store) -> dict[int, list[tuple]]:
    """Plan run "r": 2 shards with 3 units each of 0..95 rows; returns the rows of each unit."""
    rng = random.Random(5)
    units, fills = [], {}
    for unit_id in range(6):
        token, condition = str(1000 + unit_id), f"0x{unit_id:064x}"
        store.upsert_markets([Market(condition_id=condition, token_ids=(token,))])
        n = rng.randrange(0, 96)
        fills[unit_id] = [fill_row(unit_id, i, token, condition) for i in range(n)]
        units.append(WorkUnit(run_id="r", unit_id=unit_id, shard=unit_id % 2, condition_ids=(condition,),
                              token_ids=(token,), expected_fills=n, expected_requests=n // PAGE + 1))
    store.create_run(Run(run_id="r", shards=2, source="scripted"), units)
    return fills


def fast(settings, **extra):
    return settings.with_overrides(flush_interval_s=0.05, heartbeat_interval_s=0.05, batch_rows=25,
                                   stall_timeout_s=0.5, unit_attempts=3, initial_rps=1000, **extra)


def worker(settings, store, source, shard, stop=None):
    s = fast(settings)
    return ShardWorker(s, store, source, make_controller(s), "r", shard, stop=stop, pod=f"test-{shard}")


def stored_ids(store) -> set[str]:
    return {r[0] for r in store.db.rows("SELECT id FROM {db}.clob_fills FINAL")}
