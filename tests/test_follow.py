"""Staying current: `backfill --follow` picks up the blocks a growing chain adds while it runs, resumes after a
SIGKILL with nothing missing or extra, and stops on SIGTERM (143); `--since/--until` over blocks stores exactly
the fills of the window, from the subgraph and from the chain alike."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timezone

import pytest

from clobjob import launch
from clobjob.cli import main
from clobjob.models import EXCHANGES
from clobjob.sim import Dataset, SimConfig, SimServer, export
from clobjob.sim.data import HEAD_BLOCK, HEAD_TS, block_timestamp
from clobjob.sim.rpc import Chain, RpcConfig, RpcNode
from clobjob.sources.markets import market_from_gamma
from tests.truth import COMPARED, expected_rows, run_cli, stored_rows

pytestmark = pytest.mark.timeout(240)

V2 = [address for address, version in EXCHANGES.items() if version == 2]
LAG = 10
SEED = 21
ROW_COLUMNS = ("id", "transaction_hash", "order_hash", "timestamp", "block_number", "log_index", "exchange", "maker",
               "taker", "maker_asset_id", "taker_asset_id", "maker_amount_filled", "taker_amount_filled", "fee",
               "condition_id", "token_id", "side", "is_relay_leg", "exchange_version", "source")
REACHED = re.compile(r"^round \d+: .*chain read to block ([\d,]+)")


def now_block() -> int:
    return HEAD_BLOCK + (int(time.time()) - HEAD_TS) // 2


@pytest.fixture(scope="module")
def world():
    dataset = Dataset.generate(markets=60, seed=SEED)
    chain = Chain(dataset, start_block=now_block() - 3_000, blocks=2_400, matches_per_block=0.6, seed=5)
    return dataset, chain


def chain_truth(dataset: Dataset, chain: Chain, low: int = 0, high: int | None = None) -> dict[str, tuple]:
    """The chain's fills of blocks [low, high) as stored rows (COMPARED columns)."""
    universe = {t: m["conditionId"] for m in dataset.markets for t in json.loads(m["clobTokenIds"])}
    index = {c: i for i, c in enumerate(ROW_COLUMNS)}
    return {row[0]: tuple(row[index[c]] for c in COMPARED) for row in chain.truth(universe, low, high)}


class Follower:
    """`clobjob backfill --follow` as a process, its stdout read line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "clobjob", "backfill", "--follow", *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, self.errors.append), daemon=True).start()

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line.rstrip("\n"))

    def until_reached(self, block: int, timeout: float = 90) -> str:
        """The first round line saying the chain is read to ``block`` or beyond."""
        def reached(line: str) -> bool:
            found = REACHED.match(line)
            return bool(found) and int(found.group(1).replace(",", "")) >= block
        return self.until(reached, f"a round reading block {block}", timeout)

    def until(self, wanted, what: str, timeout: float = 90) -> str:
        """The first line from now on that is ``wanted``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, f"follow exited {self.process.returncode}: {self.errors[-20:]}"
                continue
            self.seen.append(line)
            if wanted(line):
                return line
        raise AssertionError(f"no line with {what}: {self.seen[-10:]} {self.errors[-10:]}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code


def follow_env(tmp_path, sim: SimServer, chain: Chain, **extra: str) -> dict[str, str]:
    """A fresh embedded database holding the universe, reading the simulator's chain from its first block."""
    env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path / 'db'}", "CLOBJOB_SUBGRAPH_URL": sim.url,
           "CLOBJOB_RPC_URL": sim.rpc_url, "CLOBJOB_RPC_LAG_BLOCKS": str(LAG), "CLOBJOB_LOG_FORMAT": "json",
           "CLOBJOB_RPC_CONTRACTS": ",".join(f"{address}@{chain.start_block}" for address in V2),
           "CLOBJOB_HOME": str(tmp_path / "home"), "CLOBJOB_FLUSH_INTERVAL_S": "0.2",
           "CLOBJOB_HEARTBEAT_INTERVAL_S": "0.5", **extra}
    for name in ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE"):
        env.pop(name, None)
    markets_file, _ = export(tmp_path / "export", markets=60, seed=SEED)
    assert run_cli(env, "markets", "load", str(markets_file)).returncode == 0
    return env


def test_follow_picks_up_the_blocks_added_while_it_runs_exactly(world, tmp_path):
    dataset, chain = world
    node = RpcNode(chain, RpcConfig.for_profile("infura", seed=3, head=chain.start_block + 800))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        env = follow_env(tmp_path, sim, chain)
        follower = Follower(env, "--source", "rpc", "--shards", "2", "--interval", "0.3")
        follower.until_reached(chain.start_block + 800 - LAG)
        node.configure(head=chain.start_block + 1_500)  # the chain grows while the loop runs
        follower.until_reached(chain.start_block + 1_500 - LAG)
        node.configure(head=chain.end_block + LAG)
        line = follower.until_reached(chain.end_block)
        code = follower.stop()
    assert code == 143, follower.errors[-20:]
    assert any("stopped" in seen for seen in follower.seen[-3:]), follower.seen[-3:]
    assert "fills stored" in line and "blocks " in line
    found = stored_rows(env)
    truth = chain_truth(dataset, chain)
    assert found["dups"] == 0 and found["rows"] == truth and truth  # every block's fills once, nothing else


def mid_round(node: RpcNode, follower: Follower, head: int) -> None:
    """Grow the chain to ``head`` and return once the round fetching it is under way (20 eth_getLogs into it)."""
    asked = node.stats()["get_logs"]
    node.configure(head=head)
    while node.stats()["get_logs"] < asked + 20:
        assert follower.process.poll() is None, follower.errors[-20:]
        time.sleep(0.02)


def test_a_follow_loop_killed_or_stopped_mid_round_resumes_with_nothing_missing_or_extra(world, tmp_path):
    dataset, chain = world
    # 10-block ranges, no batches, a slow answer: a round of 600 blocks takes 60 requests
    node = RpcNode(chain, RpcConfig.for_profile("tiny", seed=3, head=chain.start_block + 300, latency_s=0.03))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        env = follow_env(tmp_path, sim, chain)
        follower = Follower(env, "--source", "rpc", "--interval", "0.2")
        follower.until_reached(chain.start_block + 300 - LAG)
        mid_round(node, follower, chain.start_block + 900)
        follower.process.kill()  # SIGKILL: no flush, no checkpoint, no goodbye
        follower.process.wait(timeout=30)

        resumed = Follower(env, "--source", "rpc", "--interval", "0.2")
        mid_round(node, resumed, chain.start_block + 1_500)
        assert resumed.stop() == 143  # SIGTERM inside a run: flushed, checkpointed, the loop ends
        assert "stopped and checkpointed" in resumed.seen[-1], resumed.seen[-3:]

        node.configure(head=chain.end_block + LAG)
        again = Follower(env, "--source", "rpc", "--interval", "0.2")
        again.until_reached(chain.end_block)
        assert again.stop() == 143
    for restarted in (resumed, again):
        assert any(line.startswith("resuming run ") for line in restarted.seen), restarted.seen[:5]
    found = stored_rows(env)
    truth = chain_truth(dataset, chain)
    assert found["dups"] == 0 and found["rows"] == truth


def test_since_until_over_blocks_stores_exactly_the_window_from_both_sources(settings, store):
    """The window [since, until) means one thing for every source: the subgraph's fills with timestamps in it and
    the chain's blocks whose timestamps fall in it (found by searching the blocks' timestamps). A backfill after
    it still reads the chain from the exchanges' first block."""
    dataset = Dataset.generate(markets=80, seed=SEED)
    busiest = Counter(int(fill["timestamp"]) for fill in dataset.iter_truth()).most_common(1)[0][0]
    start = HEAD_BLOCK - (HEAD_TS - busiest) // 2 - 800  # the window holds the busiest second of v1 fills
    chain = Chain(dataset, start_block=start, blocks=2_000, matches_per_block=0.6, seed=6)
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(dataset.markets, start=1)])
    since = block_timestamp(chain.start_block + 400) - 1  # inside block +399's second: block +400 is the first
    until = block_timestamp(chain.start_block + 1_300) + 1  # block +1300 is in, +1301 is not
    window = [datetime.fromtimestamp(t, timezone.utc).isoformat() for t in (since, until)]
    node = RpcNode(chain, RpcConfig.for_profile("alchemy", seed=3, head=chain.end_block + LAG))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        settings = settings.with_overrides(
            subgraph_url=sim.url, rpc_url=sim.rpc_url, rpc_lag_blocks=LAG, flush_interval_s=0.2,
            heartbeat_interval_s=0.5, rpc_contracts=",".join(f"{address}@{chain.start_block}" for address in V2))
        said: list[str] = []
        assert launch.backfill(settings, shards=3, parallelism=None, since=window[0], until=window[1],
                               say=said.append) == 0  # --source all: the RPC URL is set
        timestamp = COMPARED.index("timestamp")
        v1 = {k: r for k, r in expected_rows(dataset).items() if since <= r[timestamp] < until}
        v2 = chain_truth(dataset, chain, chain.start_block + 400, chain.start_block + 1_301)
        assert v1 and v2 and stored(store) == v1 | v2
        assert any(f"blocks {chain.start_block + 400:,} to {chain.start_block + 1_300:,} are in the window" in line
                   for line in said), said
        assert store.chain_reach().through is None  # a window alone does not read the chain from its start

        _, units = launch.plan_run(settings, shards=2, run_id="w", since=window[0], until=window[1], source="rpc",
                                   say=said.append)  # plan --since/--until: the same window
        assert {u.source for u in units} == {"rpc"} and (min(u.block_from for u in units), max(
            u.block_to for u in units)) == (chain.start_block + 400, chain.start_block + 1_301)
        store.delete_run("w")
        assert launch.backfill(settings, shards=2, parallelism=None, source="rpc", say=said.append) == 0
    assert stored(store, "rpc") == chain_truth(dataset, chain)  # the blocks before the window too
    assert store.chain_reach().through == chain.end_block + 1


def stored(store, source: str | None = None) -> dict[str, tuple]:
    where = "" if source is None else f" WHERE source = '{source}'"
    rows = store.db.rows(f"SELECT {', '.join(COMPARED)} FROM {{db}}.clob_fills FINAL{where}")
    return {r[0]: tuple(int(v.timestamp()) if hasattr(v, "timestamp") else v for v in r) for r in rows}


@pytest.mark.parametrize("args, message", [
    (["--interval", "5"], "--interval goes with --follow"),
    (["--follow", "--since", "2026-11-06", "--until", "2026-11-14"], "does not go with --since/--until"),
    (["--since", "2026-11-06"], "--since and --until go together"),
    (["--since", "2026-11-14", "--until", "2026-11-06"], "must be after --since"),
    (["--since", "Nov 6", "--until", "2026-11-14"], "--since 'Nov 6' is not an ISO 8601 date or time"),
])
def test_bad_window_and_follow_flags_exit_2_naming_them(args, message, settings, capsys, monkeypatch):
    monkeypatch.setenv("CLOBJOB_HOME", str(settings.home))
    code = main(["--clickhouse-url", settings.dsn(), "--database", settings.clickhouse_database,
                 "--log-format", "human", "backfill", *args])
    assert code == 2 and message in capsys.readouterr().err


def test_the_simulators_config_endpoint_grows_the_chain(world):
    dataset, chain = world
    node = RpcNode(chain, RpcConfig.for_profile("clean", head=chain.start_block))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        def post(path: str, body: dict) -> tuple[int, dict]:
            url = f"http://{sim.host}:{sim.port}{path}"
            request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        head = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}
        assert post("/rpc", head)[1]["result"] == hex(chain.start_block)
        status, config = post("/__config", {"rpc": {"head": chain.start_block + 50}})
        assert status == 200 and config["rpc"]["head"] == chain.start_block + 50
        assert post("/rpc", head)[1]["result"] == hex(chain.start_block + 50)
        status, error = post("/__config", {"rpc": {"head": -1}})
        assert status == 400 and "head" in error["error"]


def test_gamma_first_brings_the_new_markets_into_the_backfill(settings, store):
    dataset = Dataset.generate(markets=80, seed=SEED)
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(dataset.markets[:40], start=1)])
    with SimServer(dataset, SimConfig.for_profile("clean")).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url, gamma_url=sim.gamma_url, flush_interval_s=0.2,
                                           heartbeat_interval_s=0.5)
        said: list[str] = []
        assert launch.backfill(settings, shards=2, parallelism=None, gamma=True, say=said.append) == 0
    assert any(line.startswith(f"Gamma {sim.gamma_url}: upserted 80 markets") for line in said), said
    assert stored(store) == expected_rows(dataset)  # the 40 markets Gamma added too


def test_follow_with_gamma_fetches_the_markets_gamma_lists_while_it_runs(tmp_path):
    dataset = Dataset.generate(markets=60, seed=SEED)
    with SimServer(dataset, SimConfig(gamma_listed=40)).run_in_thread() as sim:
        env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path / 'db'}", "CLOBJOB_SUBGRAPH_URL": sim.url,
               "CLOBJOB_GAMMA_URL": sim.gamma_url, "CLOBJOB_LOG_FORMAT": "json", "CLOBJOB_HOME": str(tmp_path),
               "CLOBJOB_FLUSH_INTERVAL_S": "0.2", "CLOBJOB_HEARTBEAT_INTERVAL_S": "0.5"}
        env.pop("CLOBJOB_RPC_URL", None)
        follower = Follower(env, "--source", "subgraph", "--gamma", "--interval", "0.3")
        follower.until(lambda line: line.startswith("round ") and "nothing new" in line, "an idle round")
        sim.configure(gamma_listed=None)  # 20 markets are new on Gamma
        line = follower.until(lambda line: line.startswith("round ") and "nothing new" not in line, "a round's run")
        follower.until(lambda line: line.startswith("round ") and "nothing new" in line, "an idle round")
        assert follower.stop() == 143
    traded = sum(1 for m in dataset.markets[40:] if any(map(dataset.trades_quantity, json.loads(m["clobTokenIds"]))))
    assert f"{traded} market(s)" in line, line  # the new ones with fills (the others are zero-fill once counted)
    found = stored_rows(env)
    assert found["dups"] == 0 and found["rows"] == expected_rows(dataset)  # the 40 first, then the 20 Gamma added
