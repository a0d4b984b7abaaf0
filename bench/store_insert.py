"""Insert throughput of clob_fills into embedded ClickHouse (chDB), side by side per batch size.

Prints rows/s for 1,000,000 fills inserted through the same code path the worker uses (FillBuffer →
Store.insert_fills, columnar, UInt256 amounts) at several batch sizes, and the process's peak RSS.
Target: ≥ 200,000 rows/s — twice the fastest documented source rate (100 req/s × 1,000 fills).
Then, side by side at the worker's batches (``CLOBJOB_BATCH_ROWS``, 20,000) and at one-page batches, the CPU
seconds per 1,000 fills with the columns' types asked of ClickHouse at every insert and asked once.

    python bench/store_insert.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import tempfile
import time

from clobjob.config import Settings
from clobjob.store import FillBuffer, open_store


def fill_rows(n: int, seed: int = 1) -> list[tuple]:
    """n realistic fill rows (random 32-byte hashes, decimal token ids, amounts up to 2^70)."""
    rng = random.Random(seed)
    tokens = [str(rng.getrandbits(256)) for _ in range(2000)]
    conditions = [f"0x{rng.getrandbits(256):064x}" for _ in range(1000)]
    rows = []
    for i in range(n):
        tx, order = f"0x{rng.getrandbits(256):064x}", f"0x{rng.getrandbits(256):064x}"
        t = rng.randrange(2000)
        buy = i & 1 == 0
        rows.append((f"{tx}_{order}", tx, order, 1_650_000_000 + rng.randrange(120_000_000), None, None, "",
                     f"0x{rng.getrandbits(160):040x}", f"0x{rng.getrandbits(160):040x}",
                     "0" if buy else tokens[t], tokens[t] if buy else "0", rng.getrandbits(70),
                     rng.getrandbits(40), rng.getrandbits(20), conditions[t // 2], tokens[t],
                     "BUY" if buy else "SELL", i % 5 == 0, 1, "subgraph"))
    return rows


def measure(rows: list[tuple], batch: int, database: str, path: str) -> tuple[float, float]:
    """(rows/s including column building, rows/s of the insert calls alone)."""
    settings = Settings(clickhouse_url=f"chdb://{path}", clickhouse_database=database)
    with open_store(settings) as store:
        insert_s, started = 0.0, time.perf_counter()
        for start in range(0, len(rows), batch):
            buffer = FillBuffer()
            buffer.extend(rows[start:start + batch])
            columns = buffer.take()
            t = time.perf_counter()
            store.insert_fills(columns)
            insert_s += time.perf_counter() - t
        total_s = time.perf_counter() - started
        assert store.count_fills() == len(rows)
    return len(rows) / total_s, len(rows) / insert_s


def cpu_per_1000(rows: list[tuple], batch: int, database: str, path: str, ask_types_each_insert: bool) -> float:
    """CPU seconds (this process: buffering, serializing, the engine's work) per 1,000 fills inserted."""
    settings = Settings(clickhouse_url=f"chdb://{path}", clickhouse_database=database)
    with open_store(settings) as store:
        started = time.process_time()
        for start in range(0, len(rows), batch):
            if ask_types_each_insert:
                store.db._insert_types.clear()  # as every insert did before the types were kept
            buffer = FillBuffer()
            buffer.extend(rows[start:start + batch])
            store.insert_fills(buffer.take())
        spent = time.process_time() - started
    return 1000 * spent / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    rows = fill_rows(args.rows)
    path = tempfile.mkdtemp(prefix="clobjob-bench-")
    print(f"{args.rows:,} fills into embedded ClickHouse at {path}")
    print(f"{'batch':>8} {'rows/s (buffer+insert)':>24} {'rows/s (insert only)':>22}")
    for batch in (10_000, 50_000, 100_000, 250_000):
        total, insert_only = measure(rows, batch, f"bench_{batch}", path)
        print(f"{batch:>8,} {total:>24,.0f} {insert_only:>22,.0f}")
    print(f"\nCPU s per 1,000 fills ({min(args.rows, 200_000):,} fills): {'batch':>8} {'types asked each insert':>24} "
          f"{'types asked once':>17}")
    sample = rows[:200_000]
    for batch in (1_000, 20_000):
        each, once = (cpu_per_1000(sample, batch, f"cpu_{batch}_{int(ask)}", path, ask) for ask in (True, False))
        print(f"{'':>37}{batch:>8,} {each:>24.3f} {once:>17.3f}")
    shutil.rmtree(path, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:,.0f} MB (includes the {args.rows:,} generated rows held in memory)")


if __name__ == "__main__":
    main()
