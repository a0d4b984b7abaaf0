"""`clobjob db serve`: the embedded database over ClickHouse's HTTP interface, so that workers run as separate
processes exactly as pods talk to a ClickHouse server — and the local executor's subprocess path is tested."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clickhouse_connect.driver.compression import get_compressor
from clickhouse_connect.driver.exceptions import DatabaseError

from clobjob.models import FILL_COLUMNS
from clobjob.sim import Dataset, SimConfig, SimServer, export
from clobjob.store import open_store
from clobjob.store.serve import EngineError, EngineServer, decompress, split_statement
from tests.scripted import fill_row
from tests.truth import expected_rows, run_cli, stored_rows

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("encoding", ["lz4", "zstd", "gzip"])
def test_every_frame_of_a_compressed_body_is_decoded(encoding):
    blocks = [os.urandom(3000) for _ in range(3)]
    compressor = get_compressor(encoding)  # what clickhouse-connect does to an insert: lz4/zstd, a frame a block
    body = b"".join(compressor.compress_block(block) for block in blocks) + (compressor.flush() or b"")
    assert decompress(body, encoding) == b"".join(blocks)


def test_plain_and_unknown_encodings():
    assert decompress(b"plain", "") == decompress(b"plain", "identity") == b"plain"
    with pytest.raises(EngineError, match="'snappy'") as bad:
        decompress(b"x", "snappy")
    assert bad.value.code == 36


def test_statement_and_insert_data_follow_the_http_interface_rule():
    data = b"\x01\x02\nrest"
    assert split_statement(b"", b"INSERT INTO t (a) FORMAT Native\n" + data) == ("INSERT INTO t (a) FORMAT Native",
                                                                                  data)
    assert split_statement(b"INSERT INTO t FORMAT Native", data) == ("INSERT INTO t FORMAT Native", data)
    assert split_statement(b"SELECT 1", b"+ 2") == ("SELECT 1\n+ 2", b"")
    assert split_statement(b"SELECT 1", b"") == ("SELECT 1", b"")
    assert split_statement(b"", b"SELECT 'FORMAT' AS x FORMAT JSON") == ("SELECT 'FORMAT' AS x FORMAT JSON", b"")


@pytest.fixture
def served(chdb_dir, settings):
    """The session's chDB path served from a thread of this process; settings that reach it over HTTP."""
    with EngineServer(str(chdb_dir)).run_in_thread() as server:
        yield server, settings.with_overrides(clickhouse_url=server.url)


def test_store_over_the_served_engine_is_exact_across_many_compressed_blocks(served):
    server, settings = served
    rows = [fill_row(1, i, token=str(10**70 + i % 7), condition="0x" + "ab" * 32) for i in range(20_000)]
    amount = FILL_COLUMNS.index("maker_amount_filled")
    with open_store(settings) as store:
        store.insert_fill_rows(rows)  # one insert of several ~2 MB Native blocks, each its own lz4 frame
        assert store.count_fills() == len(rows)
        stored = dict(store.db.rows("SELECT id, maker_amount_filled FROM {db}.clob_fills"))
    assert stored == {row[0]: row[amount] for row in rows}  # every amount exact (UInt256 over the wire)


def test_engine_errors_reach_the_client_with_their_code(served):
    server, settings = served
    with open_store(settings) as store:
        with pytest.raises(DatabaseError, match="UNKNOWN_TABLE") as refused:
            store.db.rows("SELECT * FROM {db}.no_such_table")
        assert refused.value.code == 60
        assert store.db.scalar("SELECT {x:String}", {"x": "still\tserving"}) == "still\tserving"


def test_db_serve_refuses_a_server_url():
    done = subprocess.run([sys.executable, "-m", "clobjob", "db", "serve"], capture_output=True, text=True,
                          env={**os.environ, "CLOBJOB_CLICKHOUSE_URL": "http://127.0.0.1:1"}, timeout=60)
    assert done.returncode == 2 and "already a server" in done.stderr


def worker_pids(parent: int) -> list[int]:
    """The `clobjob worker` processes the executor started."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.slow
def test_workers_as_processes_on_a_served_database_survive_a_killed_worker(served, tmp_path):
    """The Indexed Job on one machine: one `clobjob worker` process per index over HTTP; a worker killed
    with SIGKILL mid-run (an OOM kill, a lost node) is retried for its index alone; the data is exact."""
    server, settings = served
    dataset = Dataset.generate(markets=1000, seed=21)
    with SimServer(dataset, SimConfig.for_profile("throttled", seed=21, rate_limit_rps=25.0)).run_in_thread() as sim:
        env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": server.url,
               "CLOBJOB_CLICKHOUSE_DATABASE": settings.clickhouse_database, "CLOBJOB_SUBGRAPH_URL": sim.url,
               "CLOBJOB_HOME": str(tmp_path / "home"), "CLOBJOB_LOG_FORMAT": "json",
               "CLOBJOB_FLUSH_INTERVAL_S": "1"}
        markets_file, _ = export(tmp_path / "export", markets=1000, seed=21)
        assert run_cli(env, "markets", "load", str(markets_file)).returncode == 0
        assert run_cli(env, "markets", "sync").returncode == 0
        backfill = subprocess.Popen([sys.executable, "-m", "clobjob", "backfill", "--shards", "3"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(workers := worker_pids(backfill.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 3, "the executor did not start one worker process per index"
        time.sleep(random.Random(21).uniform(1.5, 3.0))
        os.kill(workers[0], signal.SIGKILL)
        out, err = backfill.communicate(timeout=180)
        assert backfill.returncode == 0, err[-3000:]
        assert "failed (attempt 1 of 3, exit 137); retrying" in err  # the killed index ran again
    found = stored_rows(env)
    assert found["dups"] == 0 and found["rows"] == expected_rows(dataset)


@pytest.mark.parametrize("password", ["ab/PW#S3?cret@x%41y", "pässwörd✓ /#?@%"])
def test_a_password_with_reserved_and_unicode_characters_reaches_db_serve(chdb_dir, settings, monkeypatch, capsys,
                                                                          password):
    """The server checks the password: the commands succeed only if it arrived intact; a wrong one fails with
    the redacted DSN and no password in any output."""
    from urllib.parse import quote

    from clobjob.cli import main

    with EngineServer(str(chdb_dir), password=password).run_in_thread() as server:
        host = server.url.removeprefix("http://")
        database = ["--database", settings.clickhouse_database]
        url = f"http://admin:{quote(password, safe='')}@{host}"
        assert main([*database, "--clickhouse-url", url, "db", "migrate"]) == 0
        monkeypatch.setenv("CLOBJOB_CLICKHOUSE_PASSWORD", password)  # as given by a Kubernetes Secret: not encoded
        assert main([*database, "--clickhouse-url", f"http://admin@{host}", "db", "migrate"]) == 0
        capsys.readouterr()
        wrong = password[::-1]
        monkeypatch.setenv("CLOBJOB_CLICKHOUSE_PASSWORD", wrong)
        assert main([*database, "--clickhouse-url", f"http://admin@{host}", "db", "migrate"]) == 1
    shown = capsys.readouterr()
    assert f"cannot connect to ClickHouse at http://admin:***@{host}" in shown.err
    for secret in (wrong, quote(wrong, safe=""), password, quote(password, safe="")):
        assert secret not in shown.out + shown.err


def test_a_worker_on_a_server_does_not_load_pandas(served):
    """clickhouse-connect would import pandas (67 MB per pod) at the first insert, only to ask whether the data is a
    DataFrame; a process that talks to a server inserts lists and never needs it."""
    _, settings = served
    code = ("import sys\n"
            "from clobjob.config import Settings\n"
            "from clobjob.store import open_store\n"
            "from tests.scripted import fill_row\n"
            f"with open_store(Settings(clickhouse_url={settings.dsn()!r}, "
            f"clickhouse_database={settings.clickhouse_database!r})) as store:\n"
            "    assert store.insert_fill_rows([fill_row(7, 1, '12345', '')]) == 1\n"
            "    assert store.count_fills() >= 1\n"
            "print('pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
