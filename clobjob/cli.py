"""The ``clobjob`` command line. Thin: parses flags, builds Settings, calls the rooms below, renders."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, BadInput, ClobjobError
from clobjob.logs import printable, setup_logging

def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(
        clickhouse_url=args.clickhouse_url,
        clickhouse_database=args.database,
        log_format=args.log_format,
    )


# --- db ------------------------------------------------------------------------------------------


def cmd_db_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob.store import open_store

    with open_store(settings, migrate=False) as store:
        applied = store.migrate()
    print(f"schema up to date ({settings.redacted_dsn()} / {settings.clickhouse_database}); "
          f"applied now: {applied or 'none'}")
    return 0


def cmd_db_serve(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob.store.serve import serve

    if not settings.embedded:
        raise BadInput(f"db serve shares the embedded database; {settings.redacted_dsn()} is already a server")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("db serve has no authentication: on {} the database is open to that network", args.host)
    serve(settings.dsn().removeprefix("chdb://"), args.host, args.port)
    return 0


# --- markets -------------------------------------------------------------------------------------


def cmd_markets_load(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob.sources.markets import read_gamma_file
    from clobjob.store import open_store

    markets, bad = read_gamma_file(args.file)
    for problem in bad:
        print(f"skipped {problem}", file=sys.stderr)
    if bad and args.strict:
        raise BadInput(f"{len(bad)} bad row(s) in {args.file}; nothing loaded (--strict)")
    with open_store(settings) as store:
        store.upsert_markets(markets)
    print(f"loaded {len(markets)} markets from {args.file}; skipped {len(bad)} bad row(s)")
    return 0


def sync_markets(settings: Settings) -> str:
    """Add the subgraph's markets and expected fills per token to the store; returns a summary line."""
    import asyncio

    from clobjob.sources.subgraph import SubgraphSource, Universe, merge_universe
    from clobjob.store import open_store
    from clobjob.worker import make_controller

    async def fetch() -> Universe:
        async with SubgraphSource(settings, make_controller(settings)) as source:
            return await source.universe()

    universe = asyncio.run(fetch())
    with open_store(settings) as store:
        added, orderbooks = merge_universe(store.markets(), universe)
        store.upsert_markets(added)
        store.upsert_orderbooks(orderbooks)
    return (f"subgraph knows {len(universe.tokens_by_condition)} markets: added {len(added)} new; "
            f"orderbooks for {len(orderbooks)} tokens ({sum(n for _, n in orderbooks.values())} expected fills)")


def cmd_markets_sync(args: argparse.Namespace, settings: Settings) -> int:
    print(sync_markets(settings.with_overrides(subgraph_url=args.subgraph_url, max_rps=args.max_rps)))
    return 0


# --- monitor -------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import json
    import time

    from clobjob import monitor

    def show() -> str | None:
        status = monitor.current_status(settings, args.run_id)
        if args.json:
            print(json.dumps(status, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # clear and redraw in place, like watch -n
            header = f"every {args.watch:g}s, Ctrl+C to stop · {time.strftime('%H:%M:%S')}\n" if args.watch else ""
            print(header + monitor.render_status(status), flush=True)
        return status["state"]

    if not args.watch:
        show()
        return 0
    try:
        while (state := show()) not in ("done", "failed"):
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130
    return 0 if state == "done" else 1


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a ratio in (0, 1]")
    return value


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    import json
    from pathlib import Path

    from clobjob import monitor
    from clobjob.store import open_store

    with open_store(settings) as store:
        result = monitor.verify(store, min_coverage=args.min_coverage,
                                heartbeat_interval_s=settings.heartbeat_interval_s)
        if args.report:
            Path(args.report).write_text(monitor.render_report_html(result, *monitor.report_sections(store)))
    print(json.dumps(result, indent=2) if args.json else monitor.render_verify(result))
    if args.report:
        print(f"report written to {args.report}", file=sys.stderr)
    return 0 if result["ready"] else 1


# --- diagnose and plan ---------------------------------------------------------------------------


def _market_list(path: str | None, store: Any = None) -> list[str] | None:
    """The ids of a ``--markets`` file; with ``store``, every one must be in the universe (plan, backfill)."""
    from clobjob.plan import check_listed, read_condition_ids

    if not path:
        return None
    ids = read_condition_ids(path)
    return ids if store is None else check_listed(store, ids)


def _rate(args: argparse.Namespace, settings: Settings, live: Any) -> tuple[float, str]:
    """The request rate to plan with and where it comes from."""
    if args.rate is not None:
        return args.rate, "--rate"
    if live is not None and live.rate_rps > 0:
        return live.rate_rps, "probe (limit found)" if live.limited else "probe (lower bound: not throttled)"
    if settings.max_rps is not None:
        return settings.max_rps, "assumed: CLOBJOB_MAX_RPS"
    return settings.initial_rps, "assumed: CLOBJOB_INITIAL_RPS"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[f"{v:,}" if isinstance(v, int) else printable(str(v)) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def _render_diagnosis(shown: dict[str, Any]) -> str:
    from clobjob.monitor import render_duration

    statuses = list(shown["by_status"])
    fetch, rec = shown["to_fetch"], shown["recommendation"]
    coverage = "-" if shown["coverage"] is None else f"{shown['coverage']:.1%}"
    lines = [f"markets: {shown['markets']:,} (as of {shown['as_of']}); coverage {coverage} (complete or zero-fill)"]
    if shown["not_found"]:
        lines.append(f"not in the universe: {len(shown['not_found'])} listed id(s), e.g. {shown['not_found'][0]}")
    recent = sum(shown["by_age"]["<30d"][s] for s in ("missing", "incomplete"))
    top = sum(shown["by_volume"]["top100"][s] for s in ("missing", "incomplete"))
    if recent or top:
        lines.append(f"attention: {recent:,} recent (< 30 days) and {top:,} top-100 markets are missing or incomplete")
    lines += ["", _table(["status", "markets"], list(shown["by_status"].items()))]
    for title, matrix in (("by end date", shown["by_age"]), ("by volume rank", shown["by_volume"])):
        lines += ["", _table([title, *statuses], [[b, *counts.values()] for b, counts in matrix.items()])]
    lines += ["", f"to fetch: {fetch['markets']:,} markets ({fetch['missing']:,} missing, {fetch['incomplete']:,} "
              f"incomplete, {fetch['unknown_expected']:,} with unknown expected fills); "
              f"{fetch['expected_fills']:,} expected fills in ≈ {fetch['requests']:,} requests",
              f"at {rec['rate_rps']:g} req/s ({rec['rate_origin']}): ≈ {render_duration(rec['duration_s'])}; "
              f"recommended: --shards {rec['shards']}, in-flight {rec['in_flight']} per shard"]
    live = shown["live"]
    if live is None:
        lines.append("live check: skipped")
    else:
        lines += ["", _table(["sample", "expected", "first page", "latency s", "error"],
                             [[s["condition_id"], "?" if s["expected_fills"] is None else s["expected_fills"],
                               f"{s['fills']}{'+' if s['more'] else ''}", f"{s['latency_s']:.2f}", s["error"]]
                              for s in live["samples"]]),
                  f"probe: {live['requests']:,} requests, {live['throttled']:,} throttled, {live['errors']:,} "
                  f"errors; sustainable ≈ {live['rate_rps']:.1f} req/s"]
    return "\n".join(lines)


def cmd_diagnose(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import dataclasses
    import json

    from clobjob import plan
    from clobjob.store import open_store

    ids = _market_list(args.markets)
    with open_store(settings) as store:
        report = plan.missing_work(store, ids)
    live = None
    if not args.offline:
        from clobjob.probe import live_check

        probe_s = 0.0 if args.rate is not None else args.probe_seconds  # --rate given: no need to probe
        live = asyncio.run(live_check(report, settings, sample=args.sample, probe_s=probe_s))
    rate, origin = _rate(args, settings, live)
    shown = report.to_dict()
    latency = live.latency_s if live is not None and live.latency_s else 0.5
    shown["recommendation"] = {**dataclasses.asdict(plan.recommend(shown["to_fetch"]["requests"], rate,
                                                                    latency_s=latency)), "rate_origin": origin}
    shown["live"] = dataclasses.asdict(live) if live is not None else None
    if args.out:
        with open(args.out, "w") as out:
            json.dump([m.condition_id for m in report.work], out, indent=1)
    print(json.dumps(shown, indent=2, sort_keys=True) if args.json else _render_diagnosis(shown))
    return 0


def _utc(flag: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"{flag} {value!r} is not an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob import plan
    from clobjob.store import open_store

    if (args.since is None) != (args.until is None):
        raise BadInput("--since and --until go together")
    if args.since is not None and args.markets:
        raise BadInput("--since/--until plan every market in the window: drop --markets")
    run_id = args.run_id or plan.default_run_id()
    params: dict[str, Any] = {"shards": args.shards, "markets_file": args.markets, "since": args.since,
                              "until": args.until, "page_size": plan.PAGE_SIZE,
                              "batch_requests": plan.BATCH_REQUESTS, "max_batch_tokens": plan.MAX_BATCH_TOKENS,
                              "giant_factor": plan.GIANT_FACTOR}
    with open_store(settings) as store:
        if args.since is not None:
            units = plan.plan_window(_utc("--since", args.since), _utc("--until", args.until), args.shards, run_id)
        else:
            report = plan.missing_work(store, _market_list(args.markets, store))
            units = plan.plan_units(report, args.shards, run_id)
            params.update(as_of=report.as_of, markets=len(report.work), not_found=len(report.not_found))
        plan.write_plan(store, run_id, args.shards, units, params, force=args.force)
    loads = plan.shard_loads(units, args.shards)
    print(f"run {run_id}: {len(units):,} units over {args.shards} shard(s); largest shard / mean requests "
          f"{plan.imbalance([s.expected_requests for s in loads]):.2f}")
    print(_table(["shard", "units", "markets", "expected fills", "requests"],
                 [[s.shard, s.units, s.markets, s.expected_fills, s.expected_requests] for s in loads]))
    return 0


# --- worker and backfill -------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from clobjob.worker import run_worker, shard_from_env

    return asyncio.run(run_worker(settings, args.run_id, shard_from_env(args.shard)))


def _progress_line(status: dict[str, Any], width: int = 24) -> str:
    """One line: bar, units, fills, rate, 429 share, ETA."""
    from clobjob.monitor import render_duration

    agg = status["aggregate"]
    total = max(agg["units_total"], 1)
    finished = agg["units_done"] + agg["units_failed"]
    filled = int(width * finished / total)
    failed = f" ({agg['units_failed']} failed)" if agg["units_failed"] else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] units {finished:,}/{agg['units_total']:,}{failed} · "
            f"{agg['fills']:,} fills stored · {agg['rps']:.1f} req/s · 429s {agg['share_429']:.1%} · "
            f"ETA {render_duration(agg['eta_s'])}")


async def _publish_progress(settings: Settings, store: Any, run_id: str, interval_s: float) -> None:
    """Every few seconds: the live status file (for `clobjob status` in another terminal) and a progress line."""
    import asyncio

    from clobjob import monitor

    tty = sys.stderr.isatty()
    path = monitor.live_path(settings)
    while True:
        await asyncio.sleep(interval_s)
        status = await asyncio.to_thread(monitor.run_status, store, run_id, coverage=False,
                                         heartbeat_interval_s=settings.heartbeat_interval_s)
        if settings.embedded:
            await asyncio.to_thread(monitor.publish_live, status, path)
        if tty:
            sys.stderr.write("\r\x1b[K" + _progress_line(status))
            sys.stderr.flush()
        else:
            logger.bind(run_id=run_id).info("progress: {}", _progress_line(status))


async def _run_backfill(settings: Settings, store: Any, run_id: str, parallelism: int) -> int:
    import asyncio

    from clobjob.executors.local import run_local
    from clobjob.worker import install_stop_handlers

    run = store.run(run_id)
    stop = asyncio.Event()
    install_stop_handlers(stop)
    progress = asyncio.create_task(_publish_progress(settings, store, run_id, settings.heartbeat_interval_s))
    try:
        outcome = await run_local(settings, store, run_id, range(run["shards"]), parallelism=parallelism,
                                  stop=stop, source_name=run["source"])
    finally:
        progress.cancel()
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    if outcome.failed:
        print(f"failed shards: {','.join(map(str, outcome.failed))} — see `clobjob status --run-id {run_id}`; "
              f"rerun them with `clobjob backfill` (resumes) or `clobjob rerun --run-id {run_id} --failed`")
    return outcome.exit_code


def backfill(settings: Settings, *, shards: int, parallelism: int | None, markets_file: str | None = None) -> int:
    """Resume the latest unfinished backfill run, or plan one of what is missing, and run it locally."""
    import asyncio

    from clobjob import monitor, plan
    from clobjob.store import open_store

    with open_store(settings) as store:
        if not store.count_markets():
            raise BadInput("the market universe is empty: run `clobjob markets load FILE` or `clobjob markets sync`")
        run = plan.resumable_run(store)
        if run is not None:
            run_id = run["run_id"]
            print(f"resuming run {run_id}: {store.unfinished_units(run_id):,} unit(s) left")
        else:
            run_id = plan.default_run_id()
            units = plan.plan_backfill(store, shards, run_id, _market_list(markets_file, store))
            if not units:
                print("everything is complete: nothing to fetch")
                return 0
            print(f"planned run {run_id}: {len(units):,} units, {sum(u.expected_fills for u in units):,} expected "
                  f"fills in ≈ {sum(u.expected_requests for u in units):,} requests over {shards} shard(s)")
        code = asyncio.run(_run_backfill(settings, store, run_id, parallelism or store.run(run_id)["shards"]))
        status = monitor.run_status(store, run_id, heartbeat_interval_s=settings.heartbeat_interval_s)
    print(monitor.render_status(status))
    return code


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.with_overrides(subgraph_url=args.subgraph_url, max_rps=args.max_rps)
    return backfill(settings, shards=args.shards, parallelism=args.parallelism, markets_file=args.markets)


def _shard_list(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of shard numbers") from None


def cmd_rerun(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from clobjob import monitor, rerun
    from clobjob.store import open_store

    settings = settings.with_overrides(subgraph_url=args.subgraph_url, max_rps=args.max_rps)
    with open_store(settings) as store:
        if monitor.run_status(store, args.run_id, coverage=False,
                              heartbeat_interval_s=settings.heartbeat_interval_s)["state"] == "running":
            raise BadInput(f"run {args.run_id} is still running: wait for it (or stop it) before rerunning it")
        run_id = rerun.rerun_id(store, args.run_id)
        units = rerun.plan_rerun(store, args.run_id, run_id, failed_only=args.failed, shards=args.shards,
                                 new_shards=args.new_shards)
        if not units:
            where = f" in shard(s) {','.join(map(str, args.shards))}" if args.shards else ""
            print(f"run {args.run_id}: nothing to rerun (no {'failed' if args.failed else 'unfinished'} unit{where})")
            return 0
        shards = store.run(run_id)["shards"]
        print(f"rerun {run_id} of {args.run_id}: {len(units):,} unit(s) over {shards} shard(s), each resuming from "
              "its stored cursor")
        code = asyncio.run(_run_backfill(settings, store, run_id, args.parallelism or shards))
        status = monitor.run_status(store, run_id, heartbeat_interval_s=settings.heartbeat_interval_s)
    print(monitor.render_status(status))
    return code


# --- simulator and demo --------------------------------------------------------------------------


def cmd_sim_serve(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob.sim import serve

    serve(args.host, args.port, args.markets, args.seed, top_fills=args.top_fills, profile=args.profile,
          rate_limit_rps=args.rate_limit, burst=args.burst, retry_after=args.retry_after or None,
          **{name: getattr(args, name) for name in FAULT_FLAGS})
    return 0


def cmd_sim_export(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob.sim import export

    markets, truth = export(args.out, markets=args.markets, seed=args.seed)
    print(f"wrote {markets} and {truth}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from clobjob import monitor
    from clobjob.sim import Dataset, SimConfig, SimServer
    from clobjob.sources.markets import market_from_gamma
    from clobjob.store import open_store

    if args.database is None:
        settings = settings.with_overrides(clickhouse_database="clobjob_demo")
    dataset = Dataset.generate(markets=args.markets, seed=args.seed)
    print(f"demo: simulated subgraph with {len(dataset.markets):,} markets and {dataset.n_fills:,} fills "
          f"(profile {args.profile}, seed {args.seed}); database {settings.redacted_dsn()} / "
          f"{settings.clickhouse_database}")
    with SimServer(dataset, SimConfig.for_profile(args.profile, seed=args.seed)).run_in_thread() as sim:
        settings = settings.with_overrides(subgraph_url=sim.url)
        with open_store(settings) as store:
            if args.fresh:
                store.drop_database()
                store.migrate()
            store.upsert_markets([market_from_gamma(m, i) for i, m in enumerate(dataset.markets, start=1)])
        print(f"loaded {len(dataset.markets):,} markets (Gamma shape); " + sync_markets(settings))
        code = backfill(settings, shards=args.shards, parallelism=None)
        fill_requests = sim.stats()["fill_requests"]
    with open_store(settings) as store:
        stored = store.count_fills()
        print(monitor.render_verify(monitor.verify(store, heartbeat_interval_s=settings.heartbeat_interval_s)))
    print(f"ground truth {dataset.n_fills:,} fills; stored {stored:,} distinct fills "
          f"({'exact' if stored == dataset.n_fills else 'DIFFERENT'}); {fill_requests:,} fill requests this time")
    print(f"look around: python3 -m clobjob --database {settings.clickhouse_database} status | diagnose --offline "
          "| verify --report report.html")
    return code


FAULT_FLAGS = ("p_5xx", "p_graphql_timeout", "p_overloaded", "p_store_timeout_in", "p_empty_body", "p_truncated",
               "p_slow", "p_hang")


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command has ``--help``)."""
    parser = argparse.ArgumentParser(prog="clobjob", description=__doc__)
    parser.add_argument("--clickhouse-url", help="override CLOBJOB_CLICKHOUSE_URL (http(s)://… or chdb:///path)")
    parser.add_argument("--database", help="override CLOBJOB_CLICKHOUSE_DATABASE")
    parser.add_argument("--log-format", choices=["auto", "json", "human"], help="override CLOBJOB_LOG_FORMAT")
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = groups.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("migrate", help="create or upgrade the schema (idempotent)").set_defaults(func=cmd_db_migrate)
    db_serve = db.add_parser("serve", help="serve the embedded database over ClickHouse's HTTP interface "
                             "(prints its URL), so separate processes can share it")
    db_serve.add_argument("--host", default="127.0.0.1")
    db_serve.add_argument("--port", type=int, default=8123, help="0 = a free port")
    db_serve.set_defaults(func=cmd_db_serve)

    markets = groups.add_parser("markets", help="the market universe").add_subparsers(
        dest="markets_command", required=True
    )
    load = markets.add_parser("load", help="load markets from a Gamma export (JSON array or JSONL)")
    load.add_argument("file")
    load.add_argument("--strict", action="store_true", help="any bad row fails the load (exit 2), nothing loaded")
    load.set_defaults(func=cmd_markets_load)
    sync = markets.add_parser("sync", help="add the subgraph's markets (marketDatas) and expected fills (orderbooks)")
    sync.add_argument("--subgraph-url", help="override CLOBJOB_SUBGRAPH_URL")
    sync.add_argument("--max-rps", type=float, help="hard ceiling on requests/s (adaptive below it)")
    sync.set_defaults(func=cmd_markets_sync)

    status = groups.add_parser("status", help="status of a run: shards, coverage, rate, ETA (default: latest run)")
    status.add_argument("--run-id", help="the run to show (default: the latest)")
    status.add_argument("--json", action="store_true", help="the stable JSON schema (clobjob/monitor.py)")
    status.add_argument("--watch", type=float, metavar="SECONDS",
                        help="redraw every SECONDS; exit 0 when the run is done, 1 when it failed, 130 on Ctrl+C")
    status.set_defaults(func=cmd_status)
    verify = groups.add_parser("verify", help="readiness for P&L; exit 0 only when ready")
    verify.add_argument("--json", action="store_true", help="every criterion as JSON")
    verify.add_argument("--min-coverage", type=_ratio, default=0.95, help="coverage threshold (default 0.95)")
    verify.add_argument("--report", metavar="FILE", help="also write a self-contained HTML report")
    verify.set_defaults(func=cmd_verify)

    diagnose = groups.add_parser("diagnose", help="what is missing, how old, how much work, how many shards")
    diagnose.add_argument("--json", action="store_true", help="print stable JSON instead of tables")
    diagnose.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    diagnose.add_argument("--out", metavar="FILE", help="write the missing and incomplete condition ids (JSON array)")
    diagnose.add_argument("--rate", type=_positive, metavar="RPS",
                          help="plan with this request rate (else the probe's)")
    diagnose.add_argument("--offline", action="store_true", help="skip the live sample fetches and rate probe")
    diagnose.add_argument("--sample", type=int, default=5, help="missing markets to fetch for real (default 5)")
    diagnose.add_argument("--probe-seconds", type=_positive, default=10.0, help="length of the rate probe (default 10)")
    diagnose.set_defaults(func=cmd_diagnose)

    plan = groups.add_parser("plan", help="write a run's work units balanced over N shards")
    plan.add_argument("--shards", type=int, required=True, help="number of shards (Indexed Job completions)")
    plan.add_argument("--run-id", help="run id (default run-YYYYmmdd-HHMMSS, UTC)")
    plan.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    plan.add_argument("--since", metavar="ISO", help="plan a time window over every market from this time")
    plan.add_argument("--until", metavar="ISO", help="… up to this time (exclusive)")
    plan.add_argument("--force", action="store_true", help="replace a run that already has progress")
    plan.set_defaults(func=cmd_plan)

    worker = groups.add_parser("worker", help="work one shard of a run (a pod of the Indexed Job)")
    worker.add_argument("--run-id", required=True, help="the planned run")
    worker.add_argument("--shard", type=int, help="shard index (default: $JOB_COMPLETION_INDEX)")
    worker.set_defaults(func=cmd_worker)

    backfill = groups.add_parser("backfill", help="plan what is missing and fetch it locally (resumes a run)")
    backfill.add_argument("--shards", type=int, default=4, help="shards of a new run (default 4)")
    backfill.add_argument("--parallelism", type=int, help="shards running at once (default: all)")
    backfill.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    backfill.add_argument("--subgraph-url", help="override CLOBJOB_SUBGRAPH_URL")
    backfill.add_argument("--max-rps", type=float, help="hard ceiling on requests/s (adaptive below it)")
    backfill.set_defaults(func=cmd_backfill)

    rerun = groups.add_parser("rerun", help="a new run of a run's failed or unfinished units, launched locally")
    rerun.add_argument("--run-id", required=True, help="the run whose units to rerun")
    rerun.add_argument("--failed", action="store_true", help="only units that failed (default: every unfinished unit)")
    rerun.add_argument("--shards", type=_shard_list, metavar="I,J", help="only units of these shards of the run")
    rerun.add_argument("--new-shards", type=int, metavar="N",
                       help="shards of the new run (default: as many as held the selected units)")
    rerun.add_argument("--parallelism", type=int, help="shards running at once (default: all)")
    rerun.add_argument("--subgraph-url", help="override CLOBJOB_SUBGRAPH_URL")
    rerun.add_argument("--max-rps", type=float, help="hard ceiling on requests/s (adaptive below it)")
    rerun.set_defaults(func=cmd_rerun)

    demo = groups.add_parser("demo", help="backfill a simulated subgraph into the embedded database, end to end")
    demo.add_argument("--markets", type=int, default=2000, help="simulated markets (default 2000)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--profile", choices=["clean", "throttled", "hostile"], default="throttled")
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--fresh", action="store_true", help="drop the demo database first")
    demo.set_defaults(func=cmd_demo)

    sim = groups.add_parser("sim", help="the local simulator of the Goldsky orderbook subgraph").add_subparsers(
        dest="sim_command", required=True)
    serve = sim.add_parser("serve", help="serve a simulated subgraph until Ctrl+C (prints its URL)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8787)
    serve.add_argument("--markets", type=int, default=2000)
    serve.add_argument("--seed", type=int, default=7)
    serve.add_argument("--top-fills", type=int, metavar="N", help="make the largest market exactly N fills")
    serve.add_argument("--profile", choices=["clean", "throttled", "hostile"], default="clean")
    serve.add_argument("--rate-limit", type=float, metavar="RPS", help="token bucket rate per client IP")
    serve.add_argument("--burst", type=int, help="token bucket size")
    serve.add_argument("--retry-after", action="store_true", help="send Retry-After with 429s")
    for name in FAULT_FLAGS:
        serve.add_argument("--" + name.replace("_", "-"), type=float, metavar="P", help=f"probability of {name[2:]}")
    serve.set_defaults(func=cmd_sim_serve)
    export = sim.add_parser("export", help="write markets.jsonl (Gamma shape) and truth.jsonl for a seed")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--markets", type=int, default=2000)
    export.add_argument("--seed", type=int, default=7)
    export.set_defaults(func=cmd_sim_export)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clobjob`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format or "auto")
    try:
        settings = _settings(args)
        setup_logging(settings.log_format, redact=settings.redact)
        return args.func(args, settings)
    except ClobjobError as exc:
        logger.error("{}", exc)
        return exc.exit_code
    except ValueError as exc:  # a model's validation of an input
        logger.error("bad configuration or input: {}", exc)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
