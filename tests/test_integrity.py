"""A row is stored or its unit fails (issue 11, the fetch path), on the real store (chDB): a value out of the
storage contract fails its unit before it is buffered; an insert that fails fails the units of its batch at
their last stored cursor (never a checkpoint past lost rows, never a timer that dies); the written count of
every insert is checked; rows of tokens outside the unit are dropped and reported; a permanent failure is
recorded before the process exits."""

from __future__ import annotations

import asyncio
import json

import pytest

from clobjob import monitor
from clobjob.errors import EXIT_FAILED, EXIT_OK, ClobjobError, SourceError, UnitFailed
from clobjob.models import FILL_COLUMNS, UnitState
from clobjob.parts import make_controller
from clobjob.store import open_store
from clobjob.worker import ShardWorker
from tests.scripted import PAGE, ScriptedSource, fast, stored_ids, worker

pytestmark = pytest.mark.timeout(120)

FEE = FILL_COLUMNS.index("fee")
TOKEN = FILL_COLUMNS.index("token_id")


def changed(row: tuple, **values) -> tuple:
    """``row`` with some columns replaced."""
    return tuple(values.get(name, value) for name, value in zip(FILL_COLUMNS, row))


def longest(plan: dict[int, list[tuple]], shard: int) -> int:
    """The unit of ``shard`` with the most rows (at least 3 pages in the scripted plan)."""
    unit = max((u for u in plan if u % 2 == shard), key=lambda u: len(plan[u]))
    assert len(plan[unit]) > 2 * PAGE
    return unit


def all_ids(plan: dict[int, list[tuple]], units) -> set[str]:
    return {row[0] for u in units for row in plan[u]}


# --- a value out of contract ----------------------------------------------------------------------


async def test_a_bad_value_fails_its_unit_before_buffering_and_the_others_finish(store, settings, plan):
    bad = longest(plan, 0)
    plan[bad][PAGE + 3] = changed(plan[bad][PAGE + 3], fee=10**100)  # page 2, 4th fill
    assert await worker(settings, store, ScriptedSource(plan), 0).run() == EXIT_FAILED
    saved = store.checkpoints("r", 0)
    assert saved[bad].state is UnitState.FAILED
    error = saved[bad].last_error
    assert f"unit {bad} page 2" in error and "fill 3" in error and "fee 1000000000" in error and "UInt256" in error
    assert saved[bad].cursor == str(PAGE)  # never past the bad page
    others = [u for u in plan if u % 2 == 0 and u != bad]
    assert all(saved[u].state is UnitState.DONE for u in others)
    assert stored_ids(store) == all_ids(plan, others) | {row[0] for row in plan[bad][:PAGE]}


async def test_rows_of_tokens_outside_the_unit_are_not_stored_and_are_reported(store, settings, plan):
    unit = longest(plan, 0)
    foreign = [changed(row, token_id="999", taker_asset_id="999") for row in plan[unit][:2]]
    plan[unit][:2] = foreign
    assert await worker(settings, store, ScriptedSource(plan), 0).run() == EXIT_OK
    saved = store.checkpoints("r", 0)
    assert saved[unit].state is UnitState.DONE and saved[unit].fills == len(plan[unit]) - 2
    assert "2 fill(s) of tokens outside the unit were not stored" in saved[unit].last_error
    assert stored_ids(store) == all_ids(plan, [u for u in plan if u % 2 == 0]) - {row[0] for row in foreign}


# --- an insert that fails ---------------------------------------------------------------------------


def unchecked(monkeypatch):
    """The worker without its fill contract check, so a bad value reaches ClickHouse's insert."""
    monkeypatch.setattr("clobjob.worker.check_fill_columns", lambda columns, where="": None)


async def test_a_refused_insert_on_the_timer_fails_its_units_at_their_stored_cursor(store, settings, plan,
                                                                                     monkeypatch):
    """The issue's case: a 100-digit fee reaches the timed flush. Units run one at a time and every page
    gets its own timed flush, so the failed batch holds exactly the bad page."""
    unchecked(monkeypatch)
    bad = longest(plan, 0)
    plan[bad][PAGE + 3] = changed(plan[bad][PAGE + 3], fee=10**100)
    source = ScriptedSource(plan)

    async def one_flush_per_page(unit_id, page_no):
        await asyncio.sleep(0.15)  # three flush intervals

    source.on_page = one_flush_per_page
    s = fast(settings).with_overrides(batch_rows=100_000, max_in_flight=1)
    shard = ShardWorker(s, store, source, make_controller(s), "r", 0, pod="test-0")
    assert await shard.run() == EXIT_FAILED
    saved = store.checkpoints("r", 0)
    assert saved[bad].state is UnitState.FAILED
    assert "store write failed" in saved[bad].last_error and "column fee of clob_fills" in saved[bad].last_error
    assert saved[bad].cursor == str(PAGE) and saved[bad].fills == PAGE  # the last cursor whose rows are stored
    others = [u for u in plan if u % 2 == 0 and u != bad]
    assert all(saved[u].state is UnitState.DONE for u in others)  # the timer went on flushing
    assert all_ids(plan, others) <= stored_ids(store)

    plan[bad][PAGE + 3] = changed(plan[bad][PAGE + 3], fee=7)  # fixed at the source: a rerun refetches the rest
    source.on_page = None
    assert await worker(settings, store, source, 0).run() == EXIT_OK
    assert stored_ids(store) == all_ids(plan, [u for u in plan if u % 2 == 0])
    assert (bad, str(PAGE)) in source.calls  # resumed at the stored cursor


async def test_a_refused_insert_on_a_full_batch_fails_the_units_of_that_batch(store, settings, plan, monkeypatch):
    unchecked(monkeypatch)
    bad = longest(plan, 1)
    plan[bad][3] = changed(plan[bad][3], fee=-1)
    assert await worker(settings, store, ScriptedSource(plan), 1).run() == EXIT_FAILED
    saved = store.checkpoints("r", 1)
    assert saved[bad].state is UnitState.FAILED and "store write failed" in saved[bad].last_error
    for unit_id, cp in saved.items():  # no checkpoint points past rows that are not stored
        assert {row[0] for row in plan[unit_id][: int(cp.cursor or 0)]} <= stored_ids(store)


async def test_a_table_gone_mid_run_fails_the_units_and_a_rerun_stores_everything(store, settings, plan):
    source = ScriptedSource(plan)
    shard = worker(settings, store, source, 0)
    big = longest(plan, 0)
    moved = asyncio.Event()

    async def move_the_table(unit_id, page_no):
        if unit_id == big and page_no == 2 and not moved.is_set():
            moved.set()
            await shard._writer.call(store.db.command, "RENAME TABLE {db}.clob_fills TO {db}.clob_fills_away")
        await asyncio.sleep(0.01)

    source.on_page = move_the_table
    assert await shard.run() == EXIT_FAILED
    saved = store.checkpoints("r", 0)
    failed = [u for u, cp in saved.items() if cp.state is UnitState.FAILED]
    assert big in failed and all("store write failed" in saved[u].last_error for u in failed)
    store.db.command("RENAME TABLE {db}.clob_fills_away TO {db}.clob_fills")
    for unit_id, cp in saved.items():
        assert {row[0] for row in plan[unit_id][: int(cp.cursor or 0)]} <= stored_ids(store)

    source.on_page = None
    assert await worker(settings, store, source, 0).run() == EXIT_OK
    assert stored_ids(store) == all_ids(plan, [u for u in plan if u % 2 == 0])


# --- the written count ------------------------------------------------------------------------------


def test_an_insert_that_stores_fewer_rows_than_sent_fails(chdb_dir, settings, monkeypatch):
    """A server that keeps only the first block of an insert (the first version of ``db serve`` did: it decoded
    one lz4 frame of several) acknowledges the insert; the written count gives it away."""
    import lz4.frame

    from clobjob.store.serve import EngineServer
    from tests.scripted import fill_row

    def first_frame_only(body: bytes, encoding: str) -> bytes:
        return lz4.frame.LZ4FrameDecompressor().decompress(body) if encoding == "lz4" else body

    rows = [fill_row(1, i, token=str(10**70 + i % 7), condition="0x" + "ab" * 32) for i in range(20_000)]
    with EngineServer(str(chdb_dir)).run_in_thread() as server:
        with open_store(settings.with_overrides(clickhouse_url=server.url)) as store:
            assert store.insert_fill_rows(rows[:5000]) == 5000  # an honest insert: counted and accepted
            monkeypatch.setattr("clobjob.store.serve.decompress", first_frame_only)
            with pytest.raises(ClobjobError, match="ClickHouse reports [0-9,]+ of 20,000 fills written"):
                store.insert_fill_rows(rows)


# --- a permanent failure ----------------------------------------------------------------------------


async def test_a_permanent_failure_is_recorded_and_status_says_do_not_retry(store, settings, plan):
    source = ScriptedSource(plan)
    unit = longest(plan, 0)
    source.fail_at[(unit, 1)] = [SourceError("subgraph response drifted: orderFilledEvents[0].fee: missing field")]
    with pytest.raises(SourceError):
        await worker(settings, store, source, 0).run()
    saved = store.checkpoints("r", 0)
    assert saved[unit].state is UnitState.FAILED and "drifted" in saved[unit].last_error
    assert saved[unit].cursor == str(PAGE)
    status = monitor.run_status(store, "r", coverage=False)
    shard = status["shards"][0]
    assert shard["state"] == "failed"
    assert shard["last_error"].startswith("do not retry until fixed: SourceError: subgraph response drifted")
    shown = " ".join(monitor.render_status(status).split())  # the whole reason, wrapped to the table's width
    assert "do not retry until fixed: SourceError: subgraph response drifted: orderFilledEvents[0].fee" in shown


def test_backfill_on_a_drifted_answer_exits_2_and_says_do_not_retry(tmp_path):
    from clobjob.sim import Dataset, SimConfig, SimServer
    from tests.test_backfill import prepared
    from tests.truth import run_cli

    dataset = Dataset.generate(markets=200, seed=13)
    victim = next(iter(dataset.iter_truth()))["id"]
    with SimServer(dataset, SimConfig(seed=5, bad_fill_values={victim: {"fee": 5}})).run_in_thread() as sim:
        env = prepared(tmp_path, dataset, sim, 200, 13)
        done = run_cli(env, "backfill", "--shards", "1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "on a permanent error (bad input or a drifted source) — do not retry until it is fixed" in done.stdout
    assert "rerun them with" not in done.stdout
    assert "do not retry until fixed: SourceError: subgraph response drifted" in done.stdout  # the status table


# --- what the source answers -------------------------------------------------------------------------

from tests.test_subgraph import canned, collect, event, fills_body, unit  # noqa: E402, F401 - fixture and helpers


async def test_a_cursor_that_does_not_advance_fails_the_unit_at_once(canned):  # noqa: F811 - the fixture
    same_page = fills_body([event(i) for i in range(1000)])  # a full page, served whatever the cursor
    source, fake = await canned([(200, same_page)])
    pages = 0
    with pytest.raises(ClobjobError, match="cursor does not advance: a full page after id '0x0*3e7_0x") as failure:
        async for _ in source.pages(unit(), "", {}):
            pages += 1
            assert pages < 5, "the same full page is paged forever"
    assert isinstance(failure.value, UnitFailed) and len(fake.requests) == 2


@pytest.mark.parametrize("reply, why", [
    ((200, b"<!DOCTYPE html><html><head><title>Welcome</title></head></html>", "text/html"),
     r"not a JSON object\): HTTP 200, Content-Type 'text/html', 63 bytes starting b'<!DOCTYPE html>"),
    ((200, b'{"data": {"orderFilledEvents": [{"id": "\xff\xfe0x"}]}}'), "not UTF-8 at byte 40"),
    ((200, b"hello, not json at all"), r"not a JSON object\): HTTP 200, Content-Type 'application/json'"),
    ((200, b"\x00\x1b[2J junk" * 1_000_000), r"10,000,000 bytes starting b'\\x00\\x1b\[2J junk"),
])
async def test_an_answer_that_is_not_the_protocol_fails_fast_naming_the_url(canned, reply, why):  # noqa: F811 - the fixture
    source, fake = await canned([reply], subgraph_api_key="s3cret")
    with pytest.raises(SourceError, match=why) as failure:
        await collect(source, unit())
    assert f"{source.url} is not answering as a GraphQL endpoint" in str(failure.value)
    assert "s3cret" not in str(failure.value) and len(fake.requests) == 1


async def test_a_truncated_json_body_stays_retryable(canned):  # noqa: F811 - the fixture
    accented = json.dumps({"data": {"orderFilledEvents": []}, "note": "é"}, ensure_ascii=False).encode()
    cut_in_a_character = accented[: accented.index("é".encode()) + 1]
    source, fake = await canned([(200, fills_body([event(1)])[:100]), (200, cut_in_a_character),
                                 (200, fills_body([event(1)]))])
    [page] = await collect(source, unit())
    assert len(page.rows) == 1 and len(fake.requests) == 3


# --- a hostile source, end to end ----------------------------------------------------------------------

UNITS = """
import json, sys
from clobjob.config import Settings
from clobjob.store import open_store
with open_store(Settings()) as store:
    rows = store.db.rows("SELECT u.token_ids, p.state, p.last_error "
                         "FROM (SELECT * FROM {db}.backfill_units FINAL) AS u "
                         "LEFT JOIN (SELECT * FROM {db}.backfill_progress FINAL) AS p USING (run_id, shard, unit_id)")
json.dump(rows, sys.stdout)
"""

HOSTILE = {  # field → (value, what the unit's last error names)
    "fee": ("1" * 100, "fee 1111111111"),
    "timestamp": ("99999999999", "timestamp 99999999999"),
    "id": ("0x\ud800", r"id '0x\ud800'"),
    "id ": ("0xab'cd0_0x'; drop table clob_fills; --", "id \"0xab'cd0_0x'; drop table clob_fills; --\""),
    "id  ": ("zzzz0_not hex at all", "id 'zzzz0_not hex at all'"),
    "maker": ("'; drop table markets; --", "maker \"'; drop table markets; --\""),
    "taker": ("<script>alert(1)</script>", "taker '<script>alert(1)</script>'"),
}


def test_a_hostile_source_ends_with_exactly_the_valid_fills_of_the_good_units(tmp_path):
    import subprocess
    import sys

    from clobjob.sim import Dataset, SimConfig, SimServer
    from tests.test_backfill import prepared
    from tests.truth import expected_rows, run_cli, stored_rows

    dataset = Dataset.generate(markets=1500, seed=13)
    truth = expected_rows(dataset)
    by_market: dict[str, list[dict]] = {}
    for fill in dataset.iter_truth():
        by_market.setdefault(fill["conditionId"], []).append(fill)
    small = [fills for fills in by_market.values() if 5 <= len(fills) <= 200]
    targets = small[:: len(small) // (len(HOSTILE) + 1)][: len(HOSTILE) + 1]
    bad, reasons = {}, {}
    for (field, (value, says)), fills in zip(HOSTILE.items(), targets):
        victim = fills[len(fills) // 2]
        bad[victim["id"]] = {{"fee": "fee", "timestamp": "timestamp", "maker": "maker", "taker": "taker"}.get(
            field, "id"): value}
        reasons[victim["tokenId"]] = says
    foreign = targets[-1][0]  # a fill of a token nobody asked for
    asset = "makerAssetId" if foreign["makerAssetId"] != "0" else "takerAssetId"
    bad[foreign["id"]] = {asset: "12345"}

    with SimServer(dataset, SimConfig(seed=5, bad_fill_values=bad)).run_in_thread() as sim:
        env = prepared(tmp_path, dataset, sim, 1500, 13)
        done = run_cli(env, "backfill", "--shards", "2")
    assert done.returncode == 1, done.stderr[-3000:]
    units = json.loads(subprocess.run([sys.executable, "-c", UNITS], env=env, capture_output=True, text=True,
                                      check=True, timeout=120).stdout)
    stored = stored_rows(env)["rows"]
    assert all(stored[i] == truth[i] for i in stored)  # nothing hostile stored: every stored row is the truth
    good_tokens = set()
    for tokens, state, error in units:
        said = [reasons[t] for t in tokens if t in reasons]
        if said:  # a unit holding a bad value failed, naming it
            assert state == "failed" and any(s in error for s in said), (said, error)
        else:
            assert state == "done", error
            good_tokens.update(tokens)
    token = {i: dataset_fill["tokenId"] for fills in by_market.values() for dataset_fill in fills
             for i in [dataset_fill["id"]]}
    expected = {i for i in truth if token[i] in good_tokens} - {foreign["id"]}
    assert {i for i in stored if token[i] in good_tokens} == expected  # exactly the good units' valid fills
    assert foreign["id"] not in stored
    assert len([u for u in units if u[1] == "failed"]) >= 3 and len(good_tokens) > 100  # both kinds, many
