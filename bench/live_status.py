"""What the live status costs a running backfill: ``run_status`` without the whole-table sections (every
heartbeat interval) and with them (coverage over markets ⨝ order books ⨝ stored fills, and recent activity),
on an embedded database holding a universe and its fills. The backfill measures coverage every
``launch.COVERAGE_EVERY`` intervals; this prints both figures so that choice can be checked. Asserts nothing.

    python bench/live_status.py [--markets 20000] [--fills 2000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_insert import fill_rows  # noqa: E402

from clobjob import launch, monitor  # noqa: E402
from clobjob.config import Settings  # noqa: E402
from clobjob.models import Market, Run, WorkUnit  # noqa: E402
from clobjob.store import open_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=20_000)
    parser.add_argument("--fills", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = tempfile.mkdtemp(prefix="clobjob-live-")
    try:
        settings = Settings(home=Path(path) / "home", clickhouse_url=f"chdb://{path}/db")
        rng = random.Random(3)
        with open_store(settings) as store:
            rows = fill_rows(args.fills)
            tokens = sorted({row[15] for row in rows})
            markets = [Market(condition_id=f"0x{i:064x}", token_ids=(tokens[i],) if i < len(tokens) else
                              (str(rng.getrandbits(200)),)) for i in range(args.markets)]
            store.upsert_markets(markets)
            counts: dict[str, int] = {}
            for row in rows:
                counts[row[15]] = counts.get(row[15], 0) + 1
            store.upsert_orderbooks({m.token_ids[0]: (m.condition_id, counts.get(m.token_ids[0], 0))
                                     for m in markets})
            for start in range(0, len(rows), 200_000):
                store.insert_fill_rows(rows[start:start + 200_000])
            store.create_run(Run(run_id="bench", shards=8, source="subgraph"),
                             [WorkUnit(run_id="bench", unit_id=i, shard=i % 8, expected_fills=10)
                              for i in range(2000)])
            for coverage in (False, True):
                times = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    monitor.run_status(store, "bench", coverage=coverage)
                    times.append(time.perf_counter() - started)
                what = "with coverage and recent" if coverage else "shards only (every interval)"
                print(f"run_status {what}: median {statistics.median(times):.3f}s over {args.repeat} "
                      f"({args.markets:,} markets, {args.fills:,} fills, 2,000 units)")
        print(f"coverage is measured every {launch.COVERAGE_EVERY} intervals")
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
