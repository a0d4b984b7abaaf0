"""How fast the subgraph simulator serves pages: full pages (1000 rows) per second and fills per second.

Runs ``clobjob.sim.serve`` in a separate process (clean profile: no limit, no faults) and drives it over
HTTP with a few concurrent pagers per query shape, the shapes the fetchers send:

    python bench/sim_throughput.py [--markets 2000] [--seed 7] [--seconds 3] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from clobjob.sim import Dataset
from clobjob.sim.columns import IntColumn

FIELDS = ("id transactionHash timestamp orderHash maker taker makerAssetId takerAssetId makerAmountFilled "
          "takerAmountFilled fee")
TOKENS = (
    "query($tokens:[String!]!, $after:String!){ orderFilledEvents(first:1000, orderBy:id, orderDirection:asc, "
    "where:{or:[{makerAssetId_in:$tokens, id_gt:$after},{takerAssetId_in:$tokens, id_gt:$after}]}) { "
    + FIELDS + " } }"
)
TOKENS_WINDOW = (
    "query($tokens:[String!]!, $after:String!, $from:BigInt!, $to:BigInt!){ orderFilledEvents(first:1000, "
    "orderBy:id, where:{or:[{makerAssetId_in:$tokens, id_gt:$after, timestamp_gte:$from, timestamp_lt:$to},"
    "{takerAssetId_in:$tokens, id_gt:$after, timestamp_gte:$from, timestamp_lt:$to}]}) { " + FIELDS + " } }"
)
WINDOW = (
    "query($after:String!, $from:BigInt!, $to:BigInt!){ orderFilledEvents(first:1000, orderBy:id, "
    "where:{timestamp_gte:$from, timestamp_lt:$to, id_gt:$after}) { " + FIELDS + " } }"
)
MARKET_DATAS = "query($after:String!){ marketDatas(first:1000, where:{id_gt:$after}) { id condition } }"
ORDERBOOKS = "query($after:String!){ orderbooks(first:1000, where:{id_gt:$after}) { id tradesQuantity } }"


@dataclass
class Shape:
    name: str
    query: str
    variables: dict[str, Any]
    field: str


def shapes(ds: Dataset) -> list[Shape]:
    """The query shapes: the busiest market, the 50 busiest tokens, the later half of the history."""
    by_fills = sorted(ds.token_to_condition, key=ds.trades_quantity, reverse=True)
    whale = [t for t, c in ds.token_to_condition.items() if c == ds.token_to_condition[by_fills[0]]]
    busy = by_fills[:50]
    timestamps = ds.fills.columns["timestamp"]
    assert isinstance(timestamps, IntColumn)
    stamps = np.sort(timestamps.values)
    recent = {"from": str(stamps[len(stamps) // 2]), "to": str(stamps[-1] + 1)}
    return [
        Shape("tokens or, id_gt (busiest market)", TOKENS, {"tokens": whale}, "orderFilledEvents"),
        Shape("tokens or, id_gt (50 busiest tokens)", TOKENS, {"tokens": busy}, "orderFilledEvents"),
        Shape("tokens or + time window", TOKENS_WINDOW, {"tokens": busy, **recent}, "orderFilledEvents"),
        Shape("time window, all markets", WINDOW, recent, "orderFilledEvents"),
        Shape("marketDatas paging", MARKET_DATAS, {}, "marketDatas"),
        Shape("orderbooks paging", ORDERBOOKS, {}, "orderbooks"),
    ]


async def pager(session: aiohttp.ClientSession, url: str, shape: Shape, until: float,
                record: Callable[[int], None]) -> None:
    """Page through the shape with an id cursor, from the start again when done, until ``until``."""
    after = ""
    while time.monotonic() < until:
        body = {"query": shape.query, "variables": {**shape.variables, "after": after}}
        async with session.post(url, json=body) as response:
            rows = (await response.json())["data"][shape.field]
        record(len(rows))
        after = rows[-1]["id"] if len(rows) == 1000 else ""


async def measure(url: str, shape: Shape, seconds: float, concurrency: int) -> tuple[float, float, float]:
    """(full pages/s, rows/s, requests/s) with ``concurrency`` concurrent pagers."""
    counts = {"requests": 0, "full": 0, "rows": 0}

    def record(n: int) -> None:
        counts["requests"] += 1
        counts["full"] += n == 1000
        counts["rows"] += n

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.monotonic()
        await asyncio.gather(*(pager(session, url, shape, start + seconds, record) for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    return counts["full"] / elapsed, counts["rows"] / elapsed, counts["requests"] / elapsed


def start_server(markets: int, seed: int) -> tuple[subprocess.Popen[str], str]:
    """``clobjob.sim.serve`` in its own process (so the client does not share its CPU time); its URL."""
    code = f"from clobjob.sim import serve; serve(port=0, markets={markets}, seed={seed}, profile='clean')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markets", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    started = time.monotonic()
    ds = Dataset.generate(markets=args.markets, seed=args.seed)
    print(f"dataset: {args.markets} markets, {ds.n_fills} fills, generated in {time.monotonic() - started:.2f} s")
    proc, url = start_server(args.markets, args.seed)
    try:
        print(f"server: {url} (clean profile), {args.concurrency} concurrent pagers, {args.seconds:g} s per shape")
        print(f"{'shape':40} {'full pages/s':>12} {'rows/s':>10} {'requests/s':>11}")
        for shape in shapes(ds):
            pages, rows, requests = asyncio.run(measure(url, shape, args.seconds, args.concurrency))
            print(f"{shape.name:40} {pages:12.1f} {rows:10.0f} {requests:11.1f}")
        with urllib.request.urlopen(url.split("/subgraphs/")[0] + "/__stats") as response:
            print("server stats:", json.load(response))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
