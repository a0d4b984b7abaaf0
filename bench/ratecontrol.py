"""Adaptive rate control vs the old guide's fixed presets vs an ideal paced client, on the simulator.

The simulator runs in its own process (its per-IP token bucket is shared by every client on loopback);
the clients under test run in this process, except the four independent clients (four OS processes).

1. Limit 20 req/s (burst 10), heavy-tailed universe of ``--markets`` markets, the same data for every
   variant: the ideal reference (told the limit, paces exactly at it, same batched units and code), the
   adaptive fetcher (``SubgraphSource`` + the default ``AdaptiveRateController``), and the old guide's
   presets (WORKER_COUNT/DELAY_MS 16/500, 32/100, 64/50: per market, maker side then taker side, each
   paged by id_gt, DELAY_MS after every request, exponential backoff from 1 s on a 429). The presets are
   stopped after ``--cap`` seconds and their wall time extrapolated from the share of their (exactly
   known) useful requests done.
2. The limit changes 20 → 8 → 30 req/s every 15 s under the adaptive fetcher.
3. Four adaptive clients in four processes (the plan's four shards) share the 20 req/s limit. (With
   ``--quick``: 4 and 16 at 0.5 s pages, each case untold and told its fair share every heartbeat interval
   through a file per process, as pods are through their heartbeats.)
4. Limit 100 req/s (Goldsky's documented per-IP limit) on ``--big-markets`` markets: ideal and adaptive,
   with the client's CPU time, to show the client is not the bottleneck.

    python bench/ratecontrol.py [--quick] [--markets 5000] [--big-markets 20000] [--grid-markets N]
                                [--fast-markets N] [--seed 7]
                                [--cap 40]

Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from loguru import logger

from clobjob.config import Settings
from clobjob.lanes import ShardLanes
from clobjob.models import MarketFills, WorkUnit
from clobjob.parts import make_controller
from clobjob.plan import MissingReport, plan_units
from clobjob.ratelimit import fair_share
from clobjob.sim import Dataset
from clobjob.sim.data import HEAD_TS
from clobjob.sources.markets import market_from_gamma
from clobjob.sources.subgraph import ALLOWANCE_TEXT, FILL_FIELDS, PAGE_SIZE, SubgraphSource, merge_universe

PRESETS = ((16, 500), (32, 100), (64, 50))
OLD_QUERY = ("query($tokens: [String!]!, $after: String!) {{ orderFilledEvents(first: 1000, orderBy: id, "
             "orderDirection: asc, where: {{{side}_in: $tokens, id_gt: $after}}) {{ "
             + " ".join(FILL_FIELDS) + " }} }}")
OLD_BACKOFF_CAP_S = 60.0  # the guide doubles from 1 s; we stop doubling at a minute


# --- the simulator process -----------------------------------------------------------------------


class Sim:
    """``clobjob.sim.serve`` in a child process; ``configure`` and ``stats`` over its admin endpoints."""

    def __init__(self, markets: int, seed: int, rps: float, burst: int, **knobs: Any) -> None:
        extra = "".join(f", {k}={v!r}" for k, v in knobs.items())
        code = (f"from clobjob.sim import serve; serve(port=0, markets={markets}, seed={seed}, profile='clean', "
                f"rate_limit_rps={rps}, burst={burst}{extra})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        parts = urlsplit(self.url)
        self.base = f"{parts.scheme}://{parts.netloc}"

    def configure(self, **knobs: Any) -> None:
        request = urllib.request.Request(self.base + "/__config", json.dumps(knobs).encode(), method="POST")
        urllib.request.urlopen(request).read()

    def stats(self) -> dict[str, int]:
        return json.loads(urllib.request.urlopen(self.base + "/__stats").read())

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the simulator process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# --- the data ------------------------------------------------------------------------------------


@dataclass
class Work:
    """The universe as the clients see it, the adaptive/ideal plan, and what the old method needs."""

    markets: list[tuple[str, tuple[str, ...]]]  # Gamma markets: condition id, token ids
    conditions: dict[str, str]
    units: list[WorkUnit]
    old_requests: int  # useful requests the old method needs: per market and side, fills // 1000 + 1
    fills: int
    whales: int


def prepare(sim: Sim, markets: int, seed: int, shards: int = 1, top_fills: int | None = None) -> Work:
    """Gamma export → ``markets sync`` against the simulator → plan, as ``clobjob`` would do it."""
    ds = Dataset.generate(markets=markets, seed=seed, top_fills=top_fills)
    gamma = [market_from_gamma(obj, line) for line, obj in enumerate(ds.markets, 1)]

    async def universe() -> Any:
        settings = Settings(subgraph_url=sim.url)
        async with SubgraphSource(settings, make_controller(settings)) as source:
            return await source.universe()

    _, orderbooks = merge_universe(gamma, asyncio.run(universe()))
    report = []
    for rank, market in enumerate(sorted(gamma, key=lambda m: -m.volume), 1):
        known = [orderbooks[t][1] for t in market.token_ids if t in orderbooks]
        end = None if market.end_date is None else int(market.end_date.timestamp())
        report.append(MarketFills(market.condition_id, market.token_ids, None, end, market.volume,
                                  sum(known) if known else None, 0, rank))
    sides = [np.bincount(ds.fills.columns[f].codes, minlength=len(ds.assets)) for f in ("makerAssetId", "takerAssetId")]
    old = sum(int(side[1 + 2 * i:3 + 2 * i].sum()) // PAGE_SIZE + 1 for i in range(markets) for side in sides)
    fills = [sum(orderbooks.get(t, ("", 0))[1] for t in m.token_ids) for m in gamma]
    return Work([(m.condition_id, m.token_ids) for m in gamma],
                {t: c for t, (c, _) in orderbooks.items()},
                plan_units(MissingReport(HEAD_TS, tuple(report)), shards, "bench", giant_factor=0.0),
                old, ds.n_fills, sum(n >= 10_000 for n in fills))


# --- clients -------------------------------------------------------------------------------------


class _Ignored:
    """A verdict sink: the ideal client does not adapt."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_args: None


class Paced:
    """The ideal reference's pacer: told the limit, it grants exactly ``rps`` requests per second."""

    def __init__(self, rps: float, max_window: int = 64) -> None:
        self.interval, self.max_window, self._next = 1.0 / rps, max_window, 0.0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[_Ignored]:
        now = time.monotonic()
        at = max(now, self._next)
        self._next = at + self.interval
        await asyncio.sleep(at - now)
        yield _Ignored()

    def backoff(self, _attempt: int) -> float:
        return self.interval

    def allow_retry(self) -> bool:
        return True

    def snapshot(self) -> SimpleNamespace:
        return SimpleNamespace(latency_s=None)


async def fetch(source: SubgraphSource, units: list[WorkUnit], conditions: dict[str, str], concurrency: int,
                until: float | None = None, lanes: ShardLanes | None = None) -> int:
    """Fetch every unit (with ``until``: keep cycling through them until that ``time.monotonic()``), each unit
    paging several of its ranges at once as ``lanes`` allows (as the worker does)."""
    fills, queue = 0, deque(units)

    async def run() -> None:
        nonlocal fills
        while queue and (until is None or time.monotonic() < until):
            unit = queue.popleft()
            if until is not None:
                queue.append(unit)
            unit_lanes = lanes.open(unit.unit_id) if lanes else None
            try:
                async with aclosing(source.pages(unit, "", conditions, unit_lanes)) as pages:
                    async for page in pages:
                        fills += page.size
                        page = None  # noqa: PLW2901 - as the worker: hold no rows while the next page is fetched
                        if until is not None and time.monotonic() >= until:
                            return
            finally:
                if lanes:
                    lanes.close(unit.unit_id)

    await asyncio.gather(*(run() for _ in range(min(concurrency, len(units)))))
    return fills


async def sample(controller: Any, into: list[tuple[float, int, int, int, int]], every: float = 0.1) -> None:
    """Append ``(wall time, requests, successes, throttled, in flight)`` of the controller every ``every`` s."""
    while True:
        state = controller.snapshot()
        into.append((time.time(), state.requests, state.successes, state.throttled, state.in_flight))
        await asyncio.sleep(every)


async def tell_shares(controller: Any, board: Path, every: float) -> None:
    """As a pod's heartbeats do: every ``every`` s publish (accepted req/s, token rate, requests, throttles) over
    the period in ``board`` (a file per process) and tell the controller ``fair_share`` of those published within
    three periods."""
    mine, successes, requests, throttled = board / f"{os.getpid()}.json", 0, 0, 0
    while True:
        await asyncio.sleep(every)
        state = controller.snapshot()
        mine.with_suffix(".tmp").write_text(json.dumps([time.time(), (state.successes - successes) / every,
                                                        state.rate_rps, state.requests - requests,
                                                        state.throttled - throttled]))
        mine.with_suffix(".tmp").replace(mine)  # whole, for the others reading it
        successes, requests, throttled = state.successes, state.requests, state.throttled
        published = [json.loads(path.read_text()) for path in board.glob("*.json")]
        fresh = [tuple(figures) for at, *figures in published if at > time.time() - 3 * every]
        controller.share(fair_share(fresh))


async def run_client(url: str, units: list[WorkUnit], conditions: dict[str, str], *, ideal_rps: float | None = None,
                     until: float | None = None, schedule: Callable[[], Any] | None = None,
                     board: Path | None = None) -> tuple[int, list[tuple[float, int, int, int]]]:
    """One fetcher (adaptive, or paced at ``ideal_rps``; told its fair share through ``board``); returns its fills
    and its timeline."""
    settings = Settings(subgraph_url=url)
    controller = make_controller(settings) if ideal_rps is None else Paced(ideal_rps)
    timeline: list[tuple[float, int, int, int]] = []
    async with SubgraphSource(settings, controller) as source:  # type: ignore[arg-type]
        sampler = asyncio.create_task(sample(controller, timeline)) if ideal_rps is None else None
        changes = asyncio.create_task(schedule()) if schedule else None
        shares = asyncio.create_task(tell_shares(controller, board, settings.heartbeat_interval_s)) if board else None
        lanes = ShardLanes(controller) if ideal_rps is None else None
        fills = await fetch(source, units, conditions, settings.max_in_flight, until, lanes)
        for task in (sampler, changes, shares):
            if task:
                task.cancel()
    if ideal_rps is None:
        state = controller.snapshot()
        timeline.append((time.time(), state.requests, state.successes, state.throttled, state.in_flight))
    return fills, timeline


async def old_preset(url: str, markets: list[tuple[str, tuple[str, ...]]], workers: int, delay_ms: int,
                     cap_s: float) -> int:
    """The old guide's backfill for ``cap_s`` seconds at most; returns the fills fetched."""
    fills, todo = 0, iter(markets)

    async def request(session: aiohttp.ClientSession, payload: bytes) -> list[dict[str, Any]]:
        backoff = 1.0
        while True:
            async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as response:
                body = await response.text()
            await asyncio.sleep(delay_ms / 1000)
            if response.status != 429 and ALLOWANCE_TEXT not in body:
                return json.loads(body)["data"]["orderFilledEvents"]
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, OLD_BACKOFF_CAP_S)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal fills
        for _, tokens in todo:
            for side in ("makerAssetId", "takerAssetId"):
                after = ""
                while True:
                    query = OLD_QUERY.format(side=side)
                    events = await request(session, json.dumps({"query": query, "variables": {
                        "tokens": list(tokens), "after": after}}).encode())
                    fills += len(events)
                    if len(events) < PAGE_SIZE:
                        break
                    after = events[-1]["id"]

    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(workers))), cap_s)
        except TimeoutError:
            pass
    return fills


# --- figures -------------------------------------------------------------------------------------


@dataclass
class Figures:
    name: str
    wall: float
    requests: float
    ok: float
    throttled: float
    fills: int
    elapsed: float  # measured seconds (= wall unless extrapolated)
    note: str = ""

    def row(self, ideal_wall: float, limit: float, markets: int) -> str:
        mark = "~" if self.note else " "
        return (f"{self.name:<22}{mark}{self.wall:>8.1f}{mark}{self.wall / ideal_wall:>7.2f}"
                f"{self.ok / self.wall / limit:>14.2f}{self.throttled / max(self.requests, 1):>11.1%}"
                f"{self.fills / self.elapsed:>11,.0f}{mark}{self.requests / markets:>9.3f}  {self.note}")


HEADER = (f"{'variant':<23}{'wall s':>8} {'×ideal':>7}{'useful/limit':>14}{'429 share':>11}{'fills/s':>11} "
          f"{'req/market':>9}")


def measured(sim: Sim, name: str, body: Callable[[], Any]) -> tuple[Figures, Any]:
    """Run one variant and take its counts from the simulator's stats."""
    time.sleep(1.0)  # the per-IP bucket refills between variants
    before, started, cpu = sim.stats(), time.perf_counter(), time.process_time()
    result = asyncio.run(body())
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = sim.stats()
    delta = {k: after[k] - before[k] for k in after}
    fills = result[0] if isinstance(result, tuple) else result
    figures = Figures(name, elapsed, delta["requests"], delta["ok"], delta["throttled_429"], fills, elapsed)
    return figures, cpu


def limit_rows(work: Work, sim: Sim, limit: float, cap_s: float) -> list[Figures]:
    rows = []
    ideal, _ = measured(sim, f"ideal (paced at {limit:g})",
                        lambda: run_client(sim.url, work.units, work.conditions, ideal_rps=limit))
    rows.append(ideal)
    adaptive, _ = measured(sim, "adaptive", lambda: run_client(sim.url, work.units, work.conditions))
    rows.append(adaptive)
    for workers, delay in PRESETS:
        old, _ = measured(sim, f"old {workers} / {delay} ms",
                          lambda w=workers, d=delay: old_preset(sim.url, work.markets, w, d, cap_s))
        done = old.ok / work.old_requests
        scale = 1 / max(done, 1e-9)
        rows.append(Figures(old.name, old.elapsed * scale, old.requests * scale, old.ok * scale,
                            old.throttled * scale, old.fills, old.elapsed,
                            f"extrapolated: {done:.1%} of its {work.old_requests:,} useful requests in "
                            f"{old.elapsed:.0f} s"))
    return rows


def rate_over(timeline: list[tuple[float, int, int, int]], column: int, t0: float, t1: float) -> float:
    """Events per second of a timeline column between two wall times."""
    def at(t: float) -> float:
        times = [p[0] for p in timeline]
        return float(np.interp(t, times, [p[column] for p in timeline]))
    return (at(t1) - at(t0)) / max(t1 - t0, 1e-9)


def limit_changes(work: Work, sim: Sim, phases: tuple[float, ...], phase_s: float) -> list[str]:
    """The adaptive fetcher while the limit changes every ``phase_s`` seconds."""
    starts: list[float] = []

    async def schedule() -> None:
        for limit in phases:
            sim.configure(rate_limit_rps=limit)
            starts.append(time.time())
            await asyncio.sleep(phase_s)

    time.sleep(1.0)
    until = time.monotonic() + phase_s * len(phases)
    _, timeline = asyncio.run(run_client(sim.url, work.units, work.conditions, until=until, schedule=schedule))
    sim.configure(rate_limit_rps=phases[0])
    lines = [f"{'phase':<12}{'limit':>6}{'follows in':>12}{'useful/limit':>14}{'429 share':>11}   "
             "useful req/s, each second"]
    for i, (limit, start) in enumerate(zip(phases, starts, strict=True)):
        end = start + phase_s
        per_second = [rate_over(timeline, 2, t, t + 1) for t in np.arange(start, end - 0.5, 1.0)]
        follow = next((t - start for t in np.arange(start, end - 2, 0.25)
                       if all(0.8 * limit <= rate_over(timeline, 1, u, u + 1) <= 1.2 * limit
                              for u in np.arange(t, t + 2, 0.25))), None)
        sent = rate_over(timeline, 1, start, end) * phase_s
        thr = rate_over(timeline, 3, start, end) * phase_s
        lines.append(f"{i * phase_s:>4.0f}-{(i + 1) * phase_s:<3.0f} s{limit:>8g}"
                     f"{'-' if follow is None else f'{follow:.1f} s':>12}"
                     f"{rate_over(timeline, 2, start + 5, end) / limit:>14.2f}{thr / max(sent, 1):>11.1%}   "
                     + " ".join(f"{r:.0f}" for r in per_second))
    return lines


def clients(url: str, work: Work, shards: int, seconds: float | None = None,
            told: bool = False) -> list[dict[str, Any]]:
    """One adaptive client process per shard of ``work`` (with ``seconds``: each cycling through its units
    that long, else fetching them once; ``told``: each told its fair share, as pods are from their heartbeats);
    their results (``client_main``)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs, board = [], Path(tmp) / "board"
        board.mkdir()
        for shard in range(shards):
            path = Path(tmp) / f"shard{shard}.json"
            path.write_text(json.dumps({"url": url, "conditions": work.conditions, "seconds": seconds,
                                        "board": str(board) if told else None,
                                        "units": [u.model_dump() for u in work.units if u.shard == shard]}))
            procs.append(subprocess.Popen([sys.executable, __file__, "--client", str(path)], stdout=subprocess.PIPE,
                                          text=True))
        return [json.loads(p.communicate()[0]) for p in procs]


def shared_limit(sim: Sim, markets: int, seed: int, limit: float, seconds: float, n: int,
                 top_fills: int | None = None, latency: float = 0.0, told: bool = False) -> list[str]:
    """``n`` adaptive clients in ``n`` processes, each cycling through one shard of an ``n``-shard plan
    (``told``: each told its fair share every heartbeat interval, as a pod is)."""
    work = prepare(sim, markets, seed, shards=n, top_fills=top_fills)
    time.sleep(1.0)
    results = clients(sim.url, work, n, seconds, told)
    timelines = [r["timeline"] for r in results]
    t0, t1 = max(t[0][0] for t in timelines), min(t[-1][0] for t in timelines)
    skip = min(10.0, (t1 - t0) / 3)  # past the slow starts
    t0 += skip
    rates = [rate_over(t, 2, t0, t1) for t in timelines]
    fair = limit / n
    throttled = sum(r["throttled"] for r in results) / max(1, sum(r["requests"] for r in results))
    return [f"{n} adaptive clients ({n} OS processes, one shard each{', told their fair share' if told else ''}) "
            f"sharing {limit:g} req/s at {latency:g} s pages,"
            f" over {t1 - t0:.0f} s after the first {skip:.0f}: together {sum(rates) / limit:.2f} "
            "of the limit; per client " + ", ".join(f"{r:.1f}" for r in rates)
            + f" req/s (fair share {fair:.3g}: lowest {min(rates) / fair:.2f} of it); 429 share {throttled:.1%}"]


def client_main(path: str) -> None:
    """``--client``: one client process; prints its timeline, wall time and peak RSS as JSON."""
    job = json.loads(Path(path).read_text())
    units = [WorkUnit(**u) for u in job["units"]]
    cpu = time.process_time()
    until = None if job["seconds"] is None else time.monotonic() + job["seconds"]
    started = time.monotonic()
    board = Path(job["board"]) if job["board"] else None
    fills, timeline = asyncio.run(run_client(job["url"], units, job["conditions"], until=until, board=board))
    print(json.dumps({"timeline": timeline, "requests": timeline[-1][1], "throttled": timeline[-1][3],
                      "fills": fills, "wall": time.monotonic() - started,
                      "peak_in_flight": max(t[4] for t in timeline), "cpu_s": time.process_time() - cpu,
                      "rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``): ``ru_maxrss`` would be the bench's own, which Linux carries over to
    a child across fork and exec (the bench held 200-460 MB of generated data when it started its clients)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def page_latency(seconds: float) -> dict[str, float]:
    """Simulator knobs for a full 1,000-row page taking ``seconds`` (a quarter fixed, the rest per row, ±20 %)."""
    if not seconds:
        return {}
    return {"latency_base_s": 0.25 * seconds, "latency_per_row_ms": 0.75 * seconds, "latency_jitter": 0.2}


def minimum_requests(units: list[WorkUnit]) -> int:
    """The clairvoyant minimum: one request per 1,000 fills of each unit, rounded up (a small-market batch
    of the plan is one unit), at least one per unit."""
    return sum(max(1, -(-u.expected_fills // PAGE_SIZE)) for u in units)


SUSTAINED_S = 5.0  # the window of the sustained utilisation
GRID_HEADER = (f"{'limit':>6} {'markets':>7} {'page s':>6} {'wall s':>7} {'ideal s':>7} {'÷ideal':>7} {'util':>6} "
               f"{'util5s':>6} {'429':>6} "
               f"{'req÷min':>8} {'peak in-flight':>15} {'RSS MB':>7} {'CPU s per 1,000 req: client':>6} sim")


def grid_cell(markets: int, seed: int, top_fills: int, limit: float, latency: float) -> str:
    """One shard (one client process, every unit of a 1-shard plan) at ``limit`` req/s and ``latency`` s pages."""
    sim = Sim(markets, seed, limit, max(10, int(limit / 2)), top_fills=top_fills, **page_latency(latency))
    try:
        work = prepare(sim, markets, seed, top_fills=top_fills)
        time.sleep(1.0)
        before, sim_cpu = sim.stats(), sim.cpu_s()
        [result] = clients(sim.url, work, 1)
        after, sim_cpu = sim.stats(), sim.cpu_s() - sim_cpu
    finally:
        sim.close()
    minimum = minimum_requests(work.units)
    ideal = minimum / limit + latency
    requests = after["requests"] - before["requests"]
    useful = after["fill_requests"] - before["fill_requests"]
    throttled = after["throttled_429"] - before["throttled_429"]
    wall, timeline = result["wall"], result["timeline"]
    best = max((rate_over(timeline, 2, t[0], t[0] + SUSTAINED_S) for t in timeline
                if t[0] + SUSTAINED_S <= timeline[-1][0]), default=0.0)
    return (f"{limit:>6g} {markets:>7,} {latency:>6g} {wall:>7.1f} {ideal:>7.1f} {wall / ideal:>7.2f}"
            f" {useful / max(wall - latency, 1e-9) / limit:>6.2f} {best / limit:>6.2f}"
            f" {throttled / max(requests, 1):>6.1%} {useful / minimum:>8.3f} {result['peak_in_flight']:>7}"
            f" (sim {after['in_service_peak']:>3.0f}) {result['rss_mb']:>7.0f}"
            f" {1000 * result['cpu_s'] / max(requests, 1):>6.2f} {1000 * sim_cpu / max(requests, 1):>6.2f}")


def latency_grid(markets: dict[float, int], seed: int, top_fills: int, latencies: tuple[float, ...]) -> list[str]:
    """The grid: for each limit (req/s → markets of its set) and page latency, one ``grid_cell``."""
    lines = [f"one shard, sets of {' / '.join(f'{m:,}' for m in markets.values())} markets (seed {seed}) with one "
             f"{top_fills:,}-fill market, at page latencies {', '.join(f'{x:g}' for x in latencies)} s (a full page; "
             f"smaller pages faster) and {' / '.join(f'{x:g}' for x in markets)} req/s:",
             "ideal = clairvoyant minimum requests ÷ limit + one page latency (minimum = Σ over the plan's units of "
             "ceil(fills/1000), small markets batched as the planner batches them); util = useful pages ÷ (limit × "
             "(wall − one page latency)): the share of the limit used while it could be (the last answers take a "
             "latency whatever the client: the ideal scores 1.00) (util5s: the best 5 s of useful pages/s ÷ limit);",
             "req÷min = useful pages ÷ minimum; peak in-flight = the client's requests in flight at most (sim: answers "
             "in service at most); RSS = the client process's peak; CPU = user + system seconds of the client process "
             "(its fetching, not its start) and of the simulator process per 1,000 requests (machine-independent, "
             "unlike wall time on a shared host)",
             GRID_HEADER]
    for limit, count in markets.items():
        for latency in latencies:
            lines.append(grid_cell(count, seed, top_fills, limit, latency))
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markets", type=int, default=5000)
    parser.add_argument("--big-markets", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cap", type=float, default=40.0, help="seconds each old preset runs before extrapolation")
    parser.add_argument("--grid-markets", type=int, help="markets of the latency grid's set (default 300 with "
                        "--quick, else 3000)")
    parser.add_argument("--fast-markets", type=int, help="markets of the grid's 100 req/s set (default 5 × the 20 "
                        "req/s set: the same seconds of work, so that the slow start weighs the same)")
    parser.add_argument("--top-fills", type=int, default=200_000, help="fills of the grid set's largest market")
    parser.add_argument("--quick", action="store_true", help="only the latency grid (small set) and the shared limit")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.client:
        client_main(args.client)
        return
    started, load = time.perf_counter(), os.getloadavg()[0]
    grid_markets = args.grid_markets or (300 if args.quick else 3000)
    sets = {20.0: grid_markets, 100.0: args.fast_markets or 5 * grid_markets}
    print("\n".join(latency_grid(sets, args.seed, args.top_fills, (0.0, 0.5, 1.5))) + "\n")
    for n in (4, 16):
        for told in (False, True):
            sim = Sim(grid_markets, args.seed, 20.0, 10, top_fills=args.top_fills, **page_latency(0.5))
            try:
                print("\n".join(shared_limit(sim, grid_markets, args.seed, 20.0, 30.0 if args.quick else 60.0, n,
                                              args.top_fills, 0.5, told)), flush=True)
            finally:
                sim.close()
    if args.quick:
        print(f"\nbench took {time.perf_counter() - started:.0f} s; host load average {load:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)")
        return

    limit = 20.0
    sim = Sim(args.markets, args.seed, limit, 10)
    try:
        work = prepare(sim, args.markets, args.seed)
        print(f"simulator: {args.markets:,} markets, {work.fills:,} fills ({work.whales} markets with ≥ 10,000), "
              f"limit {limit:g} req/s burst 10; the plan: {len(work.units)} units, "
              f"{sum(u.expected_requests for u in work.units):,} requests expected\n")
        rows = limit_rows(work, sim, limit, args.cap)
        print(HEADER)
        for row in rows:
            print(row.row(rows[0].wall, limit, args.markets))
        print("(clobjob plans from the orderbooks' tradesQuantity: markets with 0 expected fills are not fetched,"
              " small markets share a query, big ones are cut in ~10-page id ranges; the old scripts query"
              " every market and side)\n")
        print("limit changes under the adaptive fetcher (follows in: until its send rate stays within ±20% of "
              "the new limit for 2 s)")
        print("\n".join(limit_changes(work, sim, (20.0, 8.0, 30.0), 15.0)) + "\n")
        print("\n".join(shared_limit(sim, args.markets, args.seed, limit, 30.0, 4)) + "\n")
    finally:
        sim.close()

    fast = 100.0
    sim = Sim(args.big_markets, args.seed, fast, 50)
    try:
        work = prepare(sim, args.big_markets, args.seed)
        ideal, _ = measured(sim, f"ideal (paced at {fast:g})",
                            lambda: run_client(sim.url, work.units, work.conditions, ideal_rps=fast))
        adaptive, cpu = measured(sim, "adaptive", lambda: run_client(sim.url, work.units, work.conditions))
        print(f"limit {fast:g} req/s burst 50, {args.big_markets:,} markets, {work.fills:,} fills:")
        print(HEADER)
        for row in (ideal, adaptive):
            print(row.row(ideal.wall, fast, args.big_markets))
        print(f"adaptive client CPU: {cpu:.1f} s in {adaptive.wall:.1f} s = {cpu / adaptive.wall:.0%} of one core "
              f"for {adaptive.ok / adaptive.wall:.0f} answers/s ({adaptive.fills / adaptive.wall:,.0f} fills/s) "
              f"parsed; the rest of the {os.cpu_count()} CPUs serve the simulator")
    finally:
        sim.close()
    print(f"\nbench took {time.perf_counter() - started:.0f} s; host load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
