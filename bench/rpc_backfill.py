"""The RPC source against each simulated provider profile: logs/s, requests per 1,000 logs, the final adaptive
range, and wall ÷ an ideal client that knows the provider's limits.

Per profile (infura, alchemy, tiny) the simulated node runs in its own process (``--serve`` mode of this
script) with a per-client limit of ``--rate`` calls/s (burst ``--burst``) and a latency of ``--latency`` s per
request plus 2 µs per log; this process pages ``--units`` block-range units of the chain's ``--blocks`` blocks
concurrently through one ``RpcSource`` (default settings: starts at 2,000 blocks per call and discovers the
limits) and checks the rows against the ground truth.

The ideal client knows the limits and the data: per unit, the fewest ``eth_getLogs`` calls that respect the
provider's block-range and result caps (a greedy partition over the exact log counts), plus one
``eth_getBlockByNumber`` per block with fills when logs carry no timestamp, sent at exactly the provider's rate
with no 429 and no wasted call, all of them concurrently: ideal wall = (calls − burst) / rate + one latency.

    python bench/rpc_backfill.py [--blocks 8000] [--units 2] [--rate 500] [--profiles infura,alchemy,tiny]

Prints the figures; asserts nothing but the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from itertools import pairwise
from typing import Any
from urllib.parse import urlsplit

from loguru import logger
from pydantic import SecretStr

from clobjob.config import Settings
from clobjob.models import WorkUnit
from clobjob.sim import Dataset, SimServer
from clobjob.sim.rpc import RPC_PATH, Chain, RpcConfig, RpcNode
from clobjob.sources.rpc import RpcSource
from clobjob.worker import make_controller

MARKETS, SEED, LAG = 500, 7, 32


def world(blocks: int) -> tuple[Dataset, Chain]:
    ds = Dataset.generate(markets=MARKETS, seed=SEED)
    return ds, Chain(ds, blocks=blocks, matches_per_block=2.0, seed=SEED)


def config(args: argparse.Namespace, profile: str, chain: Chain) -> RpcConfig:
    return RpcConfig.for_profile(profile, head=chain.end_block + LAG, rate_limit_rps=args.rate, burst=args.burst,
                                 latency_s=args.latency, latency_per_log_s=2e-6)


def serve(args: argparse.Namespace) -> None:
    ds, chain = world(args.blocks)
    node = RpcNode(chain, config(args, args.serve, chain))
    SimServer(ds, rpc=node).serve_until_signalled(f"rpc bench node ({args.serve})")


def units(chain: Chain, count: int) -> list[WorkUnit]:
    edges = [chain.start_block + (chain.end_block - chain.start_block) * i // count for i in range(count + 1)]
    return [WorkUnit(run_id="bench", unit_id=i, shard=0, block_from=a, block_to=b)
            for i, (a, b) in enumerate(pairwise(edges))]


def ideal_calls(chain: Chain, cfg: RpcConfig, work: list[WorkUnit]) -> int:
    """The fewest calls a client knowing the limits makes for these units."""
    range_limit = cfg.range_limit or 10**9
    calls = 0
    for unit in work:
        low, end = unit.block_from, unit.block_to
        assert low is not None and end is not None
        while low < end:
            def fits(high: int, low: int = low) -> bool:
                span = high - low + 1
                return span <= range_limit and (cfg.result_limit is None or span <= cfg.free_range
                                                or chain.fill_count(low, high) <= cfg.result_limit)
            good, bad = low, end  # fits(good) holds (one block always fits here), bad is past the unit
            while bad - good > 1:
                middle = (good + bad) // 2
                good, bad = (middle, bad) if fits(middle) else (good, middle)
            calls += 1
            low = good + 1
    if not cfg.inline_timestamps:
        calls += len(set(chain.fill_blocks))
    return calls


async def run(args: argparse.Namespace, profile: str) -> dict[str, Any]:
    ds, chain = world(args.blocks)
    cfg = config(args, profile, chain)
    server = subprocess.Popen([sys.executable, __file__, "--serve", profile, "--blocks", str(args.blocks),
                               "--rate", str(args.rate), "--burst", str(args.burst), "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        parts = urlsplit(server.stdout.readline().strip())  # type: ignore[union-attr]
        url = f"{parts.scheme}://{parts.netloc}{RPC_PATH}"
        settings = Settings(rpc_url=SecretStr(url), rpc_lag_blocks=LAG)
        work = units(chain, args.units)
        async with RpcSource(settings, make_controller(settings)) as src:
            started = time.perf_counter()

            async def fetch(unit: WorkUnit) -> list[tuple[Any, ...]]:
                rows = []
                async for page in src.pages(unit, "", ds.token_to_condition):
                    rows.extend(page.rows)
                return rows

            found = [row for rows in await asyncio.gather(*(fetch(u) for u in work)) for row in rows]
            wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()
    truth = chain.truth(ds.token_to_condition)
    assert sorted(found) == sorted(truth), "rows differ from the ground truth"
    state = src.controller.snapshot()
    ideal = max(ideal_calls(chain, cfg, work) - args.burst, 0) / args.rate + args.latency
    return {"profile": profile, "logs": len(found), "wall_s": wall, "logs_per_s": len(found) / wall,
            "requests": state.requests, "throttled": state.throttled, "rate": state.rate_rps,
            "span": src.span_hint, "range_cap": src.range_cap, "result_cap": src.result_cap, "batch": src.batch,
            "ideal_s": ideal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8_000)
    parser.add_argument("--units", type=int, default=2)
    parser.add_argument("--rate", type=float, default=500.0, help="provider limit, calls/s per client")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.03, help="seconds per request")
    parser.add_argument("--profiles", default="infura,alchemy,tiny")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    logger.remove()
    print(f"{args.blocks} blocks, {args.units} units, limit {args.rate:g} calls/s (burst {args.burst}), "
          f"latency {args.latency * 1000:g} ms/request")
    print(f"{'profile':8} {'logs':>7} {'wall s':>7} {'logs/s':>8} {'req/1k logs':>11} {'429s':>5} "
          f"{'req/s':>6} {'final span':>10} {'range cap':>9} {'batch':>5} {'ideal s':>7} {'wall/ideal':>10}")
    for profile in args.profiles.split(","):
        r = asyncio.run(run(args, profile))
        print(f"{r['profile']:8} {r['logs']:>7} {r['wall_s']:>7.2f} {r['logs_per_s']:>8.0f} "
              f"{1000 * r['requests'] / r['logs']:>11.1f} {r['throttled']:>5} {r['requests'] / r['wall_s']:>6.0f} "
              f"{r['span']:>10} {r['range_cap'] or '-':>9} {r['batch']:>5} {r['ideal_s']:>7.2f} "
              f"{r['wall_s'] / r['ideal_s']:>10.2f}")


if __name__ == "__main__":
    main()
