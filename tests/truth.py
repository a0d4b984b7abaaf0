"""The ground truth of a simulated dataset as stored rows, and what a (subprocess) run really stored."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence

from clobjob.models import EXCHANGES, FILL_COLUMNS
from clobjob.sim import Dataset

COMPARED = [c for c in FILL_COLUMNS if c not in ("block_number", "log_index", "exchange")]


def expected_rows(dataset: Dataset) -> dict[str, tuple]:
    """The ground truth as stored rows (COMPARED columns)."""
    rows = {}
    for fill in dataset.iter_truth():
        buy = fill["makerAssetId"] == "0"
        values = {
            "id": fill["id"], "transaction_hash": fill["transactionHash"], "order_hash": fill["orderHash"],
            "timestamp": int(fill["timestamp"]), "maker": fill["maker"], "taker": fill["taker"],
            "maker_asset_id": fill["makerAssetId"], "taker_asset_id": fill["takerAssetId"],
            "maker_amount_filled": int(fill["makerAmountFilled"]),
            "taker_amount_filled": int(fill["takerAmountFilled"]),
            "fee": int(fill["fee"]), "condition_id": fill["conditionId"], "token_id": fill["tokenId"],
            "side": "BUY" if buy else "SELL", "is_relay_leg": fill["taker"] in EXCHANGES, "exchange_version": 1,
            "source": "subgraph",
        }
        rows[fill["id"]] = tuple(values[c] for c in COMPARED)
    return rows


DUMP = textwrap.dedent("""
    import json, sys
    from clobjob.config import Settings
    from clobjob.store import open_store
    cols = sys.argv[1].split(",")
    with open_store(Settings()) as store:
        rows = store.db.rows("SELECT " + ", ".join(cols) + " FROM {db}.clob_fills FINAL")
        dups = store.db.scalar("SELECT count() - uniqExact(id) FROM {db}.clob_fills FINAL")
        progress = store.db.rows("SELECT state, count() FROM {db}.backfill_progress FINAL GROUP BY state")
    out = [[int(v.timestamp()) if hasattr(v, "timestamp") else v for v in r] for r in rows]
    json.dump({"rows": out, "dups": dups, "progress": dict(progress)}, sys.stdout, default=str)
""")


def stored_rows(env: dict[str, str], columns: Sequence[str] = COMPARED) -> dict:
    """Read the database of a subprocess run (a separate process: chDB allows one path per process): its fills
    (``columns`` of each, by id), duplicate ids after FINAL and unit states."""
    done = subprocess.run([sys.executable, "-c", DUMP, ",".join(columns)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    found = json.loads(done.stdout)
    as_int = {"maker_amount_filled", "taker_amount_filled", "fee"}
    found["rows"] = {
        r[0]: tuple(int(v) if c in as_int else v for c, v in zip(columns, r)) for r in found["rows"]
    }
    return found


def run_cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clobjob", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
