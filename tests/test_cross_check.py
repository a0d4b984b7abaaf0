"""The subgraph cross-checked against the chain: the v1 exchanges' OrderFilled logs of a block range, read by the RPC
source from the simulated node (the same fills the simulated subgraph serves), against the stored subgraph fills of
that span — agreeing after a backfill, and naming every id missing on either side or differing once they do not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clobjob import cli, launch
from clobjob.models import FILL_COLUMNS, as_utc
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sim.data import block_of
from clobjob.sim.rpc import Chain, RpcConfig, RpcNode
from clobjob.sources.markets import market_from_gamma

pytestmark = pytest.mark.timeout(120)

LEFT_OUT = 15  # markets of the dataset not in the universe: their fills on chain are counted, not compared


def quiet(_line: str) -> None:
    pass


def test_v1_logs_cross_check_the_stored_subgraph_fills(settings, store, monkeypatch, capsys):
    dataset = Dataset.generate(markets=150, seed=12)
    universe = dataset.markets[LEFT_OUT:]
    store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(universe, start=1)])
    blocks = np.sort(block_of(dataset.fills.columns["timestamp"].values))
    low, high = int(blocks[len(blocks) * 4 // 10]), int(blocks[len(blocks) * 6 // 10])  # a fifth of every fill
    known = {t for m in universe for t in json.loads(m["clobTokenIds"])}
    truth = [f for f in dataset.iter_truth() if low <= int(block_of(np.array([int(f["timestamp"])]))[0]) <= high]
    compared = [f for f in truth if f["tokenId"] in known]
    node = RpcNode(Chain(dataset, blocks=200, seed=3), RpcConfig.for_profile("infura", seed=3))
    with SimServer(dataset, SimConfig.for_profile("clean"), rpc=node).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url, rpc_url=sim.rpc_url, flush_interval_s=0.2,
                                           heartbeat_interval_s=0.5)
        assert launch.backfill(settings, shards=2, parallelism=None, source="subgraph", say=quiet) == 0
        agreed = launch.cross_check(settings, low, high)
        assert agreed["agree"] is True and agreed["on_chain"] == agreed["stored"] == agreed["matching"] == len(
            compared) > 100
        assert agreed["outside_universe"] == len(truth) - len(compared) > 0

        by_id = {f["id"]: f for f in compared}
        gone = sorted(by_id)[:3]
        store.db.command("DELETE FROM {db}.clob_fills WHERE id IN {ids:Array(String)}", {"ids": gone})
        changed = sorted(by_id)[3]
        row = store.db.rows(f"SELECT {', '.join(FILL_COLUMNS)} FROM {{db}}.clob_fills FINAL WHERE id = {{i:String}}",
                            {"i": changed})[0]
        values = {**dict(zip(FILL_COLUMNS, row)), "timestamp": int(as_utc(row[FILL_COLUMNS.index("timestamp")])
                                                                   .timestamp())}
        fee = int(values["fee"])
        stray = "0x" + "ab" * 32 + "_0x" + "cd" * 32  # a fill the chain does not have, in the span
        store.insert_fill_rows([
            tuple({**values, "fee": fee + 1}[c] for c in FILL_COLUMNS),
            tuple({**values, "id": stray, "transaction_hash": stray[:66], "order_hash": stray[67:]}[c]
                  for c in FILL_COLUMNS)])
        checked = launch.cross_check(settings, low, high)
        assert checked["agree"] is False and checked["on_chain"] == len(compared)
        assert checked["missing_from_store"] == {"count": 3, "examples": gone}
        assert checked["missing_on_chain"] == {"count": 1, "examples": [stray]}
        assert checked["differing"] == {"count": 1, "examples": [f"{changed}: fee stored {fee + 1} on chain {fee}"]}

        monkeypatch.setenv("CLOBJOB_RPC_URL", sim.rpc_url)
        base = ["--clickhouse-url", settings.dsn(), "--database", settings.clickhouse_database, "verify"]
        assert cli.main([*base, "--cross-check", f"{low}:{high}"]) == 1
        shown = capsys.readouterr().out
        assert "[FAIL] v1_cross_check" in shown and "3 missing from the store, 1 not on chain, 1 differ" in shown
        assert f"missing from the store: {gone[0]}" in shown and f"not on chain: {stray}" in shown
        assert cli.main([*base, "--json", "--cross-check", f"{low}:{high}"]) == 1
        assert json.loads(capsys.readouterr().out)["cross_check"]["missing_from_store"]["count"] == 3
        for bad in (f"{high}:{low}", "12:ab", "100"):
            with pytest.raises(SystemExit) as refused:
                cli.main([*base, "--cross-check", bad])
            assert refused.value.code == 2 and "FROM:TO" in capsys.readouterr().err
        assert cli.main([*base, "--cross-check", f"{low}:{node.head + 1}"]) == 2
        assert "past the chain's safe head" in capsys.readouterr().err
