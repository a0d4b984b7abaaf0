"""Shard balance of ``clobjob plan`` and the speed of ``diagnose``'s missing-work query.

1. Balance: the simulator's heavy-tailed universe (``clobjob.sim.Dataset``), every market missing, planned
   over 4/8/16 shards: largest shard's expected requests ÷ mean (target ≤ 1.10), next to the old scripts'
   naive split (equal market counts per worker, one query per market side, no batching).
2. Speed: ``missing_work`` + the diagnose summary (and the same with every id as a custom list, and
   ``verify``: one fill-count query serves both) over 200,000 markets with 10,000,000 stored fills in
   embedded ClickHouse (target ≤ 10 s). The data is generated inside ClickHouse (INSERT … SELECT FROM
   numbers()): heavy-tailed fills per token, some markets missing, some incomplete, some zero-fill, and
   some loaded after the orderbooks sync (expected unknown).

    python bench/plan_balance.py [--sim-markets 20000] [--markets 200000] [--fills 10000000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable

import numpy as np

from clobjob import monitor, plan
from clobjob.config import Settings
from clobjob.models import MarketFills
from clobjob.plan import MissingReport
from clobjob.sim.data import HEAD_TS, Dataset
from clobjob.sources.markets import market_from_gamma
from clobjob.store import Store, open_store

SHARDS = (4, 8, 16)


def sim_report(markets: int, seed: int) -> MissingReport:
    """Every market of the simulated universe as missing (expected = its tradesQuantity, None if unknown)."""
    ds = Dataset.generate(markets=markets, seed=seed)
    per_asset = np.bincount(ds.token_codes(np.arange(ds.n_fills)), minlength=len(ds.assets))  # tradesQuantity
    known = ds.token_to_condition
    parsed = [market_from_gamma(obj, line) for line, obj in enumerate(ds.markets, 1)]
    by_volume = sorted(range(len(parsed)), key=lambda i: (-parsed[i].volume, parsed[i].condition_id))
    rank = {i: r for r, i in enumerate(by_volume, 1)}
    work = []
    for i, market in enumerate(parsed):
        expected = (sum(int(per_asset[1 + 2 * i + o]) for o in (0, 1))
                    if market.token_ids[0] in known else None)
        if expected == 0:
            continue  # zero-fill: nothing to fetch
        work.append(MarketFills(market.condition_id, market.token_ids,
                                None if market.start_date is None else int(market.start_date.timestamp()),
                                None if market.end_date is None else int(market.end_date.timestamp()),
                                market.volume, expected, 0, rank[i]))
    print(f"simulated universe: {markets:,} markets, {ds.n_fills:,} fills; {len(work):,} to fetch "
          f"({sum(m.expected_fills is None for m in work):,} unknown to the subgraph)")
    return MissingReport(HEAD_TS, tuple(work))


def naive_loads(report: MissingReport, shards: int) -> list[int]:
    """The old scripts: equal market counts per worker, one paged query per market and side."""
    requests = [2 * max(1, math.ceil((m.expected_fills or 0) / plan.PAGE_SIZE)) for m in report.work]
    size = math.ceil(len(requests) / shards)
    return [sum(requests[s * size:(s + 1) * size]) for s in range(shards)]


def balance(report: MissingReport) -> None:
    fills = sorted((m.expected_fills or 0 for m in report.work), reverse=True)
    print(f"expected fills {sum(fills):,}; largest market {fills[0]:,} "
          f"({fills[0] / sum(fills):.1%}); top 1% of markets hold "
          f"{sum(fills[:max(1, len(fills) // 100)]) / sum(fills):.0%}")
    print(f"{'shards':>6}  {'units':>6}  {'requests':>9}  {'plan max/mean':>13}  {'naive requests':>14}  "
          f"{'naive max/mean':>14}  plan time")
    for shards in SHARDS:
        started = time.perf_counter()
        units = plan.plan_units(report, shards, "bench")
        took = time.perf_counter() - started
        loads = [s.expected_requests for s in plan.shard_loads(units, shards)]
        naive = naive_loads(report, shards)
        print(f"{shards:>6}  {len(units):>6,}  {sum(loads):>9,}  {plan.imbalance(loads):>13.3f}  "
              f"{sum(naive):>14,}  {plan.imbalance(naive):>14.3f}  {took:.2f} s")


MARKETS = (
    # markets: two tokens each, end dates over ~3 years, start 60 days before, heavy-tailed volume; every 7th
    # (no orderbook row) only after the orderbooks sync (``late``): its expected fills are unknown
    """INSERT INTO {db}.markets (condition_id, token_ids, question, slug, start_date, end_date, closed, volume,
                                 neg_risk, source)
       SELECT concat('0x', leftPad(lower(hex(number)), 64, '0')),
              [toString(1000000 + 2 * number), toString(1000001 + 2 * number)], '', '',
              toDateTime({head:UInt32} - modulo(number, 1100) * 86400 - 60 * 86400, 'UTC'),
              toDateTime({head:UInt32} - modulo(number, 1100) * 86400, 'UTC'), true,
              1e6 / pow(1 + modulo(cityHash64(number, 'v'), 100000), 0.8), false, 'bench'
       FROM numbers({markets:UInt64}) WHERE (modulo(number, 7) = 3) = {late:Bool}"""
)
GENERATE = [
    (MARKETS, {"late": False}),
    # stored fills: token drawn heavy-tailed over the tokens of the first 70% of markets
    ("""INSERT INTO {db}.clob_fills (id, timestamp, maker, taker, maker_asset_id, taker_asset_id,
                                    maker_amount_filled, taker_amount_filled, fee, condition_id, token_id,
                                    side, is_relay_leg, exchange_version, source, exchange)
       SELECT concat(tx, '_', oh), toDateTime({head:UInt32} - modulo(number, 90000000), 'UTC'),
              '0xaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', '0xbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb',
              '0', tok, 1000000, 2000000, 0, '', tok, 'BUY', false, 1, 'bench', ''
       FROM (SELECT number,
                    concat('0x', lower(hex(cityHash64(number, 1))), lower(hex(cityHash64(number, 2))),
                           lower(hex(cityHash64(number, 3))), lower(hex(cityHash64(number, 4)))) AS tx,
                    concat('0x', lower(hex(cityHash64(number, 5))), lower(hex(cityHash64(number, 6))),
                           lower(hex(cityHash64(number, 7))), lower(hex(cityHash64(number, 8)))) AS oh,
                    toString(1000000 + toUInt64(floor(pow(cityHash64(number, 9) / 18446744073709551615.0, 3)
                                                       * 1.4 * {markets:UInt64}))) AS tok
             FROM numbers({fills:UInt64}))""", {}),
    # expected fills: what is stored (+ 10% more for every 10th token: incomplete) ...
    ("""INSERT INTO {db}.orderbooks (token_id, condition_id, trades_quantity)
       SELECT token_id, '', count() + if(modulo(cityHash64(token_id), 10) = 0, intDiv(count(), 10) + 1, 0)
       FROM {db}.clob_fills GROUP BY token_id""", {}),
    # ... and for tokens without stored fills: missing (every 5th market zero-fill, every 7th unknown: no row)
    ("""INSERT INTO {db}.orderbooks (token_id, condition_id, trades_quantity)
       SELECT toString(1000000 + number), '',
              if(modulo(cityHash64(intDiv(number, 2), 'z'), 5) = 0, 0, 1 + modulo(cityHash64(number, 'q'), 50))
       FROM numbers(2 * {markets:UInt64})
       WHERE toString(1000000 + number) NOT IN (SELECT token_id FROM {db}.orderbooks)
         AND modulo(intDiv(number, 2), 7) != 3""", {}),
    (MARKETS, {"late": True}),
]


def speed(markets: int, fills: int) -> None:
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as home:
        settings = Settings(home=home, clickhouse_url=f"chdb://{home}/db", clickhouse_database="bench")
        with open_store(settings) as store:
            started = time.perf_counter()
            for statement, params in GENERATE:
                store.db.command(statement, {"markets": markets, "fills": fills, "head": HEAD_TS, **params})
            print(f"generated {markets:,} markets and {store.count_fills():,} stored fills "
                  f"in {time.perf_counter() - started:.0f} s")
            settle(store)
            for attempt in range(1, 4):
                started = time.perf_counter()
                report = plan.missing_work(store, now=HEAD_TS)
                summary = report.to_dict()
                took = time.perf_counter() - started
                print(f"missing_work + summary, run {attempt}: {took:.2f} s (target ≤ 10 s)")
            print(f"  {summary['by_status']}; {summary['to_fetch']['requests']:,} requests to fetch")
            timed("missing_work with every condition id as a --markets list",
                  lambda: plan.missing_work(store, [m.condition_id for m in report.markets], now=HEAD_TS))
            timed("verify (same query, monitor side)", lambda: monitor.verify(store))


def timed(what: str, run: Callable[[], object]) -> None:
    started = time.perf_counter()
    run()
    print(f"{what}: {time.perf_counter() - started:.2f} s (target ≤ 10 s)")


def settle(store: Store, limit_s: float = 300.0) -> None:
    """Wait (up to ``limit_s``) for the background merges the bulk insert started: time a settled table."""
    started = time.perf_counter()
    while store.db.scalar("SELECT count() FROM system.merges WHERE database = 'bench'") and \
            time.perf_counter() - started < limit_s:
        time.sleep(1)
    parts = store.db.scalar("SELECT count() FROM system.parts WHERE database = 'bench' "
                            "AND table = 'clob_fills' AND active")
    print(f"background merges settled after {time.perf_counter() - started:.0f} s: clob_fills has {parts} parts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-markets", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--markets", type=int, default=200_000)
    parser.add_argument("--fills", type=int, default=10_000_000)
    args = parser.parse_args()
    balance(sim_report(args.sim_markets, args.seed))
    print()
    speed(args.markets, args.fills)


if __name__ == "__main__":
    main()
