"""What the chaos scenarios survive, in one table: a longer seeded schedule than CI's (tests/chaos).

Each scenario is a run of `clobjob worker` processes (a Job-like restart loop) against `clobjob db serve` and the
simulator, with its faults injected; after it, the stored fills are compared with the ground truth. Columns:
faults injected, process restarts, fills expected / stored after FINAL / raw rows beyond one per fill before
FINAL, pages re-fetched (the simulator's fill requests beyond the same run without faults); for kills, the units
they interrupted, the pages re-fetched per kill per unit hit, a unit's pages per flush interval (measured in the
same run from its checkpoints' times) and the ratio of the two (the promise: at most 1); and wall time ÷ the same
run without faults.

    PYTHONPATH=$PWD python bench/chaos_report.py [--seed 18] [--kills 40] [--outage-s 30] [--low-s 60]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

from clobjob.sources.subgraph import PAGE_SIZE
from tests.chaos import scenarios
from tests.chaos.harness import Database

SIZE = {"markets": 300, "shards": 2, "latency_base_s": 0.3, "latency_per_row_ms": 0.5}
KILL_SIZE = {**SIZE, "markets": 2000, "shards": 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--outage-s", type=float, default=30.0, help="how long ClickHouse is down (comes back)")
    parser.add_argument("--low-s", type=float, default=60.0, help="how long the limit stays at a tenth")
    args = parser.parse_args()
    schedule = [
        ("kill -9 ×N", functools.partial(scenarios.kills, count=args.kills), KILL_SIZE),
        ("two pods per index", scenarios.two_pods, SIZE),
        ("SIGTERM throttled", scenarios.sigterm_throttled, SIZE),
        ("ClickHouse outage, back", functools.partial(scenarios.outage_back, down_s=args.outage_s), SIZE),
        ("ClickHouse outage, gone", scenarios.outage_away, SIZE),
        ("source storms", functools.partial(scenarios.storms, low_s=args.low_s, paused_s=8.0), KILL_SIZE),
        ("corrupted checkpoint", scenarios.corrupt_checkpoint, KILL_SIZE),
    ]
    root = Path(tempfile.mkdtemp(prefix="clobjob-chaos-"))
    db = Database(root / "chdb")
    baselines: dict[str, scenarios.Figures] = {}
    rows = []
    try:
        for n, (name, scenario, size) in enumerate(schedule):
            key = repr(sorted(size.items()))
            if key not in baselines:
                with scenarios.chaos(f"baseline{len(baselines)}", root / f"base{len(baselines)}", db,
                                     seed=args.seed, **size) as run:
                    scenarios.baseline(run)
                baselines[key] = run.figures
            with scenarios.chaos(f"s{n}", root / f"s{n}", db, seed=args.seed, **size) as run:
                scenario(run)
            rows.append((name, run.figures, baselines[key], size["shards"]))
    finally:
        db.stop()
    print_table(rows)


def print_table(rows: list[tuple[str, scenarios.Figures, scenarios.Figures, int]]) -> None:
    head = ("scenario", "faults injected", "restarts", "expected", "stored", "missing", "extra", "dup raw",
            "pages re-fetched", "units hit", "re-fetched/kill·unit", "pages/interval·unit", "ratio", "wall ÷ clean")
    lines = [head]
    for name, fig, base, _shards in rows:
        out = fig.outcome
        assert out is not None
        faults = ", ".join(f"{n} {what}" for what, n in sorted(fig.faults.items()) if n) or "-"
        refetched = fig.fill_requests - base.fill_requests
        ratio = fig.refetch_per_unit_hit
        per_unit = (f"{fig.refetched_fills / fig.units_hit / PAGE_SIZE:.2f}", f"{fig.allowance_fills / PAGE_SIZE:.2f}",
                    f"{ratio:.2f}") if ratio is not None else ("-", "-", "-")
        lines.append((name, faults, str(fig.restarts), f"{out.expected:,}", f"{out.stored:,}", str(out.missing),
                      str(out.extra), f"{out.duplicated:,}", str(refetched), str(fig.units_hit or "-"), *per_unit,
                      f"{fig.wall_s / base.wall_s:.2f}"))
        for note in fig.notes:
            lines.append(("", f"  {note}", *[""] * (len(head) - 2)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


if __name__ == "__main__":
    main()
