"""End-to-end backfill benchmark: the real `clobjob backfill` against the simulator behind a 20 req/s limit.

Side by side in one run, on the same heavy-tailed dataset (with one 200,000-fill market):
  A. an uninterrupted backfill with 8 shards;
  B. the same backfill killed with SIGKILL mid-run, then resumed;
  C. A again under tracemalloc, for the Python heap (skip with --no-heap);
  D. A with the database served by `clobjob db serve` from its own process, so every shard is a `clobjob worker`
     process talking HTTP to it: the shape of a pod against a ClickHouse server.
Prints wall time, fills/s, utilisation of the limit (useful pages/s ÷ limit), 429 share, pages fetched twice
after the kill (B's pages − A's), makespan of the slowest shard ÷ mean shard, and memory. Asserts nothing.

Memory, four figures:
  * peak RSS of A's process (sampled from /proc every 0.2 s, so while the giant market is being fetched);
  * the embedded engine's share: RSS of a process that only imports chDB and opens the database (~350 MB of
    library and start-up state), and what is above it. "Above it" is NOT ours alone: chDB's RSS grows by a
    further ~100-200 MB while it inserts and merges (malloc retention, not counted by its own MemoryTracking;
    a pure insert loop with no clobjob code shows it);
  * the Python heap peak (tracemalloc in run C): what a Kubernetes worker, which talks to a ClickHouse server and
    has no engine in-process, holds in Python objects. Shown as the traced peak and as the peak above the heap
    right after the backfill's imports (module code, incl. chDB's pyarrow): the rest is data in flight (pages,
    row buffers, insert blocks). Tracing slows the process by ~10-30%, so C runs at a little lower throughput
    than A (its wall time is printed);
  * run D's peak RSS per worker process (sampled like A): the memory a worker pod needs, the figure the
    < 300 MB target is about. The served engine's process and the executor are printed beside it.

    python bench/backfill_e2e.py [--markets 3000] [--top-fills 200000] [--limit 20] [--shards 8] [--no-heap]
    python bench/backfill_e2e.py --grid [--quick] [--grid-shards 1] [--limits 20 100] [--latencies 0 0.5 1.5]

--grid runs the latency grid instead: for each limit and full-page latency, a fresh simulator and served
database, `clobjob backfill` with its workers as processes, and the figures against the clairvoyant ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from clobjob.sim import export


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sim:
    """`clobjob sim serve` in its own process, so the backfill under test does not share its CPU time."""

    def __init__(self, markets: int, seed: int, top_fills: int, limit: float, page_s: float = 0.0) -> None:
        latency = ["--latency-base-s", str(0.25 * page_s), "--latency-per-row-ms", str(0.75 * page_s),
                   "--latency-jitter", "0.2"] if page_s else []  # a full page takes page_s (±20 %)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clobjob", "sim", "serve", "--port", "0", "--markets", str(markets),
             "--seed", str(seed), "--top-fills", str(top_fills), "--profile", "throttled",
             "--rate-limit", str(limit), "--burst", str(max(10, int(limit / 2))), *latency],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.process.stdout.readline().strip()
        self.base = self.url.split("/subgraphs")[0]

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.base + "/__stats", timeout=10) as answer:
            return json.load(answer)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def clobjob(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clobjob", *args], env=env, capture_output=True, text=True,
                          check=True)


def engine_baseline_mb(env: dict[str, str]) -> float:
    """RSS of a process that only opens the embedded database: the chDB engine's own share of the peak."""
    code = ("from clobjob.config import Settings; from clobjob.store import open_store\n"
            "with open_store(Settings()) as s:\n    s.count_fills()\n"
            "    print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip()) / 1024


# `clobjob backfill` under tracemalloc. It imports what the backfill will import first and notes the heap then
# (module code and start-up state), and at exit the traced peak: both in bytes to $CLOBJOB_BENCH_HEAP.
TRACED_BACKFILL = (
    "import atexit, os, runpy, sys, tracemalloc\n"
    "tracemalloc.start()\n"
    "import aiohttp, chdb, clickhouse_connect, clobjob.cli, clobjob.executors.local, clobjob.monitor\n"
    "import clobjob.sources.subgraph, clobjob.store, clobjob.worker\n"
    "modules = tracemalloc.get_traced_memory()[0]\n"
    "def report():\n"
    "    with open(os.environ['CLOBJOB_BENCH_HEAP'], 'w') as out:\n"
    "        out.write(f'{modules} {tracemalloc.get_traced_memory()[1]}')\n"
    "atexit.register(report)\n"
    "sys.argv = ['clobjob', *sys.argv[1:]]\n"
    "runpy.run_module('clobjob', run_name='__main__', alter_sys=True)\n")


def shard_makespans(env: dict[str, str]) -> list[float]:
    """Seconds from the run's creation to each shard's last checkpoint."""
    code = ("import json; from clobjob.config import Settings; from clobjob.store import open_store\n"
            "with open_store(Settings()) as s:\n"
            "    rows = s.db.rows('SELECT p.shard, dateDiff(\\'millisecond\\', r.created_at, max(p.updated_at)) '\n"
            "        'FROM {db}.backfill_progress AS p FINAL JOIN {db}.backfill_runs AS r FINAL USING run_id '\n"
            "        'GROUP BY p.shard, r.created_at ORDER BY p.shard')\n"
            "print(json.dumps([ms / 1000 for _, ms in rows]))")
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)


def backfill(env: dict[str, str], shards: int, kill_after_s: float | None = None,
             traced: bool = False, workers: dict[int, float] | None = None,
             worker_cpu: dict[int, float] | None = None) -> tuple[float, float]:
    """Run `clobjob backfill` (optionally SIGKILLed after some seconds, optionally under tracemalloc);
    returns (wall s, peak RSS MB of the backfill process). ``workers`` collects the peak RSS of each child
    process (the `clobjob worker` processes when the database is a server), ``worker_cpu`` their CPU seconds
    (as last sampled, every 0.2 s)."""
    started = time.monotonic()
    command = ["-c", TRACED_BACKFILL] if traced else ["-m", "clobjob"]
    process = subprocess.Popen([sys.executable, *command, "backfill", "--shards", str(shards)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, rss_mb(process.pid))
            for child in children(process.pid) if workers is not None else ():
                workers[child] = max(workers.get(child, 0.0), rss_mb(child))
                if worker_cpu is not None:
                    worker_cpu[child] = max(worker_cpu.get(child, 0.0), cpu_s(child))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        process.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    sampler.join()
    return time.monotonic() - started, peak


class ServedDatabase:
    """`clobjob db serve` in its own process: the embedded engine behind ClickHouse's HTTP interface, so the
    backfill's workers run as separate processes, as pods against a ClickHouse server. Samples its RSS."""

    def __init__(self, path: Path) -> None:
        env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{path}"}
        self.process = subprocess.Popen([sys.executable, "-m", "clobjob", "db", "serve", "--port", "0"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.process.stdout.readline().strip()
        self.peak = 0.0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self.process.poll() is None:
            self.peak = max(self.peak, rss_mb(self.process.pid))
            time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._sampler.join()


def prepare(root: Path, sim: Sim, database_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": database_url or f"chdb://{root / 'db'}",
           "CLOBJOB_SUBGRAPH_URL": sim.url,
           "CLOBJOB_HOME": str(root / "home"), "CLOBJOB_LOG_FORMAT": "json"}
    clobjob(env, "markets", "sync", "--add-subgraph-markets")  # the universe from the subgraph itself
    return env


def prepare_from_export(root: Path, sim: Sim) -> dict[str, str]:
    """A fresh database with only the dataset's Gamma export loaded: no sync, the backfill counts its work."""
    env = {**os.environ, "CLOBJOB_CLICKHOUSE_URL": f"chdb://{root / 'db'}", "CLOBJOB_SUBGRAPH_URL": sim.url,
           "CLOBJOB_HOME": str(root / "home"), "CLOBJOB_LOG_FORMAT": "json"}
    markets, _ = export(root / "export", markets=ARGS.markets, seed=ARGS.seed, top_fills=ARGS.top_fills)
    clobjob(env, "markets", "load", str(markets))
    return env


def latest_run(env: dict[str, str]) -> tuple[int, float]:
    """The latest run's clairvoyant minimum of requests — Σ over its units of ceil(expected fills / 1000), at
    least 1 (small markets batched into one unit as the planner batches them, a giant market's id ranges
    apart) — and the wall-clock time of its last checkpoint."""
    code = ("from clobjob.config import Settings; from clobjob.store import open_store\n"
            "with open_store(Settings()) as s:\n"
            "    run = s.db.scalar('SELECT run_id FROM {db}.backfill_runs FINAL ORDER BY created_at DESC LIMIT 1')\n"
            "    last = s.db.scalar('SELECT toUnixTimestamp64Milli(max(updated_at)) FROM {db}.backfill_progress '\n"
            "                       'FINAL WHERE run_id = {r:String}', {'r': run})\n"
            "    print(sum(max(1, -(-u.expected_fills // 1000)) for u in s.units(run)), last / 1000)")
    minimum, last = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.split()
    return int(minimum), float(last)


SUSTAINED_S = 5.0  # the window of the sustained utilisation


def watch(sim: Sim, into: list[tuple[float, int]], stop: threading.Event) -> None:
    """Sample (wall-clock time, fill requests) of the simulator every 0.05 s until ``stop``."""
    while not stop.is_set():
        into.append((time.time(), sim.stats()["fill_requests"]))
        time.sleep(0.05)


def sustained(samples: list[tuple[float, int]], limit: float) -> float:
    """The best ``SUSTAINED_S`` window's fill requests per second ÷ ``limit`` (past the slow start)."""
    best = 0.0
    for i, (t0, n0) in enumerate(samples):
        later = next(((t, n) for t, n in samples[i:] if t >= t0 + SUSTAINED_S), None)
        if later is None:
            break
        best = max(best, (later[1] - n0) / (later[0] - t0) / limit)
    return best


GRID_HEADER = (f"{'limit':>6} {'page s':>6} {'shards':>6} {'wall s':>7} {'ideal s':>7} {'÷ideal':>7} {'util':>6} "
               f"{'util5s':>6} {'429':>6} {'req÷min':>8} {'peak in-flight':>14} {'worker RSS MB':>14} "
               f"CPU s per 1,000 req: worker sim db")


def grid_cell(root: Path, markets: int, limit: float, page_s: float, shards: int) -> str:
    """`clobjob backfill` with its workers as processes on `clobjob db serve`, at ``limit`` and ``page_s``."""
    sim = Sim(markets, ARGS.seed, ARGS.top_fills, limit, page_s)
    served = ServedDatabase(root / "db")
    try:
        env = prepare(root, sim, served.url)
        before, sim_cpu, db_cpu = sim.stats(), cpu_s(sim.process.pid), cpu_s(served.process.pid)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(sim, samples, stop))
        watcher.start()
        workers: dict[int, float] = {}
        worker_cpu: dict[int, float] = {}
        try:
            backfill(env, shards, workers=workers, worker_cpu=worker_cpu)
        finally:
            stop.set()
            watcher.join()
        after, sim_cpu, db_cpu = sim.stats(), cpu_s(sim.process.pid) - sim_cpu, cpu_s(served.process.pid) - db_cpu
        minimum, last = latest_run(env)
        start = next(t for t, n in samples if n > before["fill_requests"])
        wall = last - start  # from the first fill request to the last checkpoint
    finally:
        served.close()
        sim.close()
    requests = after["requests"] - before["requests"]
    useful = after["fill_requests"] - before["fill_requests"]
    throttled = after["throttled_429"] - before["throttled_429"]
    ideal = minimum / limit + page_s
    return (f"{limit:>6g} {page_s:>6g} {shards:>6} {wall:>7.1f} {ideal:>7.1f} {wall / ideal:>7.2f} "
            f"{useful / max(wall - page_s, 1e-9) / limit:>6.2f} {sustained(samples, limit):>6.2f} "
            f"{throttled / max(requests, 1):>6.1%} "
            f"{useful / minimum:>8.3f} "
            f"{after['in_service_peak']:>14.0f} {max(workers.values(), default=0):>14.0f}"
            f" {1000 * sum(worker_cpu.values()) / max(requests, 1):>6.2f} {1000 * sim_cpu / max(requests, 1):>6.2f}"
            f" {1000 * db_cpu / max(requests, 1):>6.2f}")


def grid() -> None:
    """The latency grid: page latencies × limits, one fresh simulator and database per cell."""
    markets = {limit: ARGS.markets * max(1, round(limit / ARGS.limit)) if ARGS.scale_markets else ARGS.markets
               for limit in ARGS.limits}
    print(f"datasets: {' / '.join(f'{m:,}' for m in markets.values())} markets at "
          f"{' / '.join(f'{x:g}' for x in markets)} req/s (seed {ARGS.seed}: the same seconds of work at each limit, "
          f"so that the slow start weighs the same), largest market {ARGS.top_fills:,} fills; "
          f"{ARGS.grid_shards} shard(s); host load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print("wall = first fill request → last checkpoint; ideal = minimum requests ÷ limit + one page latency (minimum = "
          "Σ over the plan's units of ceil(fills/1000)); util = useful pages ÷ (limit × (wall − one page latency)), "
          "the share of the limit used while it could be (the ideal scores 1.00); util5s = the best 5 s of useful "
          "pages/s ÷ limit (past the slow start); req÷min = useful pages ÷ "
          "minimum; peak in-flight = the simulator's answers in service at most; CPU = user + system seconds of the "
          "worker processes (whole processes, start-up included), of the simulator and of `db serve` (the backfill's "
          "span) per 1,000 requests")
    print(GRID_HEADER, flush=True)
    for limit in ARGS.limits:
        for page_s in ARGS.latencies:
            root = Path(tempfile.mkdtemp(prefix="clobjob-grid-"))
            try:
                print(grid_cell(root, markets[limit], limit, page_s, ARGS.grid_shards), flush=True)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    print(f"host load average at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="clobjob-e2e-"))
    sim = Sim(ARGS.markets, ARGS.seed, ARGS.top_fills, ARGS.limit)
    try:
        env = prepare(root / "a", sim)
        before = sim.stats()
        wall, peak = backfill(env, ARGS.shards)
        after = sim.stats()
        spans = shard_makespans(env)
        baseline = engine_baseline_mb(env)
        pages = after["fill_requests"] - before["fill_requests"]
        fills = after["fills_served"] - before["fills_served"]
        requests = after["requests"] - before["requests"]
        throttled = after["throttled_429"] - before["throttled_429"]

        minimum_a, _ = latest_run(env)
        env_e = prepare_from_export(root / "e", sim)
        before_e = sim.stats()
        wall_e, _ = backfill(env_e, ARGS.shards)
        minimum_e, _ = latest_run(env_e)
        requests_e = sim.stats()["requests"] - before_e["requests"]

        env_b = prepare(root / "b", sim)
        before_b = sim.stats()
        killed_at, _ = backfill(env_b, ARGS.shards, kill_after_s=wall * 0.4)
        resumed, _ = backfill(env_b, ARGS.shards)
        pages_b = sim.stats()["fill_requests"] - before_b["fill_requests"]

        served = ServedDatabase(root / "d" / "db")
        try:
            env_d = prepare(root / "d", sim, served.url)
            workers: dict[int, float] = {}
            wall_d, executor_d = backfill(env_d, ARGS.shards, workers=workers)
        finally:
            served.close()

        heap = None
        if ARGS.heap:
            env_c = prepare(root / "c", sim)
            env_c["CLOBJOB_BENCH_HEAP"] = str(root / "heap")
            wall_c, _ = backfill(env_c, ARGS.shards, traced=True)
            module_heap, heap = (int(b) / 2**20 for b in (root / "heap").read_text().split())
    finally:
        sim.close()
        shutil.rmtree(root, ignore_errors=True)

    print(f"dataset: {ARGS.markets:,} markets (seed {ARGS.seed}), largest market {ARGS.top_fills:,} fills; "
          f"limit {ARGS.limit:g} req/s burst 10; {ARGS.shards} shards")
    print(f"{'wall time':<34}{wall:>10.1f} s")
    print(f"{'fills stored':<34}{fills:>10,}")
    print(f"{'fills/s':<34}{fills / wall:>10,.0f}")
    print(f"{'useful pages/s ÷ limit':<34}{pages / wall / ARGS.limit:>10.2f}")
    print(f"{'429 share of requests':<34}{throttled / max(requests, 1):>10.2%}")
    print(f"{'requests (pages) total':<34}{requests:>10,} ({pages:,} useful)")
    print(f"{'slowest shard ÷ mean shard':<34}{max(spans) / (sum(spans) / len(spans)):>10.2f}"
          f"   (per shard s: {', '.join(f'{s:.0f}' for s in spans)})")
    print(f"{'peak RSS of the backfill process':<34}{peak:>10.0f} MB   (embedded engine alone: {baseline:.0f} MB; "
          f"above it: {peak - baseline:.0f} MB)")
    if heap is not None:
        print(f"{'Python heap peak (tracemalloc)':<34}{heap:>10.0f} MB   (modules alone: {module_heap:.0f} MB; "
              f"data in flight: {heap - module_heap:.0f} MB; traced run {wall_c:.0f} s)")
    print(f"E. from a Gamma export alone (no sync: the backfill counts the expected fills itself), wall "
          f"{wall_e:.1f} s = {wall_e / (minimum_e / ARGS.limit):.2f} × an ideal client paced at the limit "
          f"({minimum_e:,} requests ÷ {ARGS.limit:g} req/s; {requests_e:,} requests sent, counts included); the "
          f"synced run A: {wall / (minimum_a / ARGS.limit):.2f} ×")
    print(f"D. workers as processes: the database served by `clobjob db serve` (as pods against a server), "
          f"wall {wall_d:.1f} s")
    print(f"{'peak RSS of a worker process':<34}{max(workers.values()):>10.0f} MB   (largest of {len(workers)}; "
          f"smallest {min(workers.values()):.0f} MB)")
    print(f"{'peak RSS of the executor process':<34}{executor_d:>10.0f} MB")
    print(f"{'peak RSS of the served engine':<34}{served.peak:>10.0f} MB")
    print(f"{'kill -9 at':<34}{killed_at:>10.1f} s, resumed run {resumed:.1f} s")
    print(f"{'pages fetched twice after the kill':<34}{pages_b - pages:>10,} (of {pages:,})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--top-fills", type=int, default=200_000)
    parser.add_argument("--limit", type=float, default=20.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--no-heap", dest="heap", action="store_false",
                        help="skip run C (the Python heap under tracemalloc)")
    parser.add_argument("--grid", action="store_true", help="only the latency grid (page latencies × limits)")
    parser.add_argument("--quick", action="store_true", help="the grid on a small set (300 markets)")
    parser.add_argument("--grid-shards", type=int, default=1, help="shards of the grid's runs (default 1)")
    parser.add_argument("--limits", type=float, nargs="+", default=[20.0, 100.0])
    parser.add_argument("--same-markets", dest="scale_markets", action="store_false",
                        help="the grid's every limit on --markets (default: --markets × limit ÷ --limit)")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.5, 1.5], help="full-page seconds")
    ARGS = parser.parse_args()
    if ARGS.quick:
        ARGS.grid, ARGS.markets = True, 300
    if ARGS.grid:
        grid()
    else:
        main()
