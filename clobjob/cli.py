"""The ``clobjob`` command line: parses flags, calls one function of ``clobjob.launch`` (or the monitor), renders."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from clobjob import launch, monitor, plan, sim
from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, BadInput, ClobjobError
from clobjob.executors.base import shard_from_env
from clobjob.logs import printable, setup_logging
from clobjob.models import RunState
from clobjob.store import open_store
from clobjob.store.serve import serve as serve_database


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(
        clickhouse_url=args.clickhouse_url,
        clickhouse_database=args.database,
        log_format=args.log_format,
    )


def _with_source_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    return settings.with_overrides(subgraph_url=args.subgraph_url, max_rps=args.max_rps)


# --- db ------------------------------------------------------------------------------------------


def cmd_db_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with open_store(settings, migrate=False) as store:
        applied = store.migrate()
    print(f"schema up to date ({settings.redacted_dsn()} / {settings.clickhouse_database}); "
          f"applied now: {applied or 'none'}")
    return 0


def cmd_db_serve(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.embedded:
        raise BadInput(f"db serve shares the embedded database; {settings.redacted_dsn()} is already a server")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("db serve has no authentication: on {} the database is open to that network", args.host)
    serve_database(settings.dsn().removeprefix("chdb://"), args.host, args.port)
    return 0


# --- markets -------------------------------------------------------------------------------------


def cmd_markets_load(args: argparse.Namespace, settings: Settings) -> int:
    loaded, bad = launch.load_markets(settings, args.file, strict=args.strict)
    for problem in bad:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"loaded {loaded} markets from {args.file}; skipped {len(bad)} bad row(s)")
    return 0


def cmd_markets_sync(args: argparse.Namespace, settings: Settings) -> int:
    settings = _with_source_flags(args, settings).with_overrides(gamma_url=args.gamma_url)
    lines, bad = launch.sync_markets(settings, gamma=args.gamma, subgraph_markets=args.add_subgraph_markets)
    for problem in bad:
        print(f"skipped {problem}", file=sys.stderr)
    print("\n".join(lines))
    return 0


# --- monitor -------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    def show() -> str | None:
        status = launch.status(settings, args.run_id, on=args.on)
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
        while (state := show()) not in (RunState.DONE, RunState.FAILED):
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130
    return 0 if state == RunState.DONE else 1


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
    with open_store(settings) as store:
        result = monitor.verify(store, min_coverage=args.min_coverage,
                                heartbeat_interval_s=settings.heartbeat_interval_s,
                                on_chain=settings.rpc_url is not None)
        if args.report:
            Path(args.report).write_text(monitor.render_report_html(result, *monitor.report_sections(store)))
    print(json.dumps(result, indent=2) if args.json else monitor.render_verify(result))
    if args.report:
        print(f"report written to {args.report}", file=sys.stderr)
    return 0 if result["ready"] else 1


# --- diagnose and plan ---------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[f"{v:,}" if isinstance(v, int) else printable(str(v)) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def _render_diagnosis(shown: dict[str, Any]) -> str:
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
    if shown["expected_counts"]:
        lines.append(shown["expected_counts"])
    conflicts, mismatches = shown["conflicts"], shown["count_mismatches"]
    if conflicts["tokens_in_two_markets"]:
        shown_conflicts = "; ".join(f"{c['token_id']} in {', '.join(c['condition_ids'])}"
                                    for c in conflicts["examples"][:2])
        lines.append(f"conflicts: {conflicts['tokens_in_two_markets']:,} token(s) claimed by two markets "
                     f"(counted once, for the lower condition id), e.g. {shown_conflicts}")
    if mismatches["fewer"] or mismatches["more"]:
        lines.append(f"counts: {mismatches['fewer']:,} market(s) fetched to the end hold fewer fills than the source's "
                     f"count, {mismatches['more']:,} more; e.g. " + "; ".join(mismatches["examples"][:2]))
    lines += ["", _table(["status", "markets"], list(shown["by_status"].items()))]
    for title, matrix in (("by end date", shown["by_age"]), ("by volume rank", shown["by_volume"])):
        lines += ["", _table([title, *statuses], [[b, *counts.values()] for b, counts in matrix.items()])]
    lines += ["", f"to fetch: {fetch['markets']:,} markets ({fetch['missing']:,} missing, {fetch['incomplete']:,} "
              f"incomplete, {fetch['unknown_expected']:,} with unknown expected fills); "
              f"{fetch['expected_fills']:,} expected fills in ≈ {fetch['requests']:,} requests",
              f"at {rec['rate_rps']:g} req/s ({rec['rate_origin']}): ≈ {monitor.render_duration(rec['duration_s'])}; "
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
    shown = launch.diagnose(settings, markets_file=args.markets, offline=args.offline, sample=args.sample,
                            probe_s=args.probe_seconds, rate=args.rate, out=args.out)
    print(json.dumps(shown, indent=2, sort_keys=True) if args.json else _render_diagnosis(shown))
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    run, units = launch.plan_run(settings, shards=args.shards, run_id=args.run_id, markets_file=args.markets,
                                 since=args.since, until=args.until, force=args.force, source=args.source)
    loads = plan.shard_loads(units, run.shards)
    print(f"run {run.run_id}: {len(units):,} units over {run.shards} shard(s); largest shard / mean requests "
          f"{plan.imbalance([s.expected_requests for s in loads]):.2f}")
    print(_table(["shard", "units", "markets", "expected fills", "requests"],
                 [[s.shard, s.units, s.markets, s.expected_fills, s.expected_requests] for s in loads]))
    return 0


# --- worker, backfill, rerun ---------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    return launch.work_shard(settings, args.run_id, shard_from_env(args.shard))


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    return launch.backfill(_with_source_flags(args, settings), shards=args.shards, parallelism=args.parallelism,
                           markets_file=args.markets, source=args.source)


def _shard_list(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of shard numbers") from None


def cmd_rerun(args: argparse.Namespace, settings: Settings) -> int:
    return launch.rerun_run(_with_source_flags(args, settings), run_id=args.run_id, failed_only=args.failed,
                            shards=args.shards, new_shards=args.new_shards, parallelism=args.parallelism, on=args.on)


# --- simulator and demo --------------------------------------------------------------------------


def cmd_sim_serve(args: argparse.Namespace, settings: Settings) -> int:
    sim.serve(args.host, args.port, args.profile, rpc_profile=args.rpc_profile, **_dataset_options(args),
              rate_limit_rps=args.rate_limit, burst=args.burst, retry_after=args.retry_after or None,
              gamma_rate_limit_rps=args.gamma_rate_limit, gamma_burst=args.gamma_burst,
              **{name: getattr(args, name) for name in FAULT_FLAGS + LATENCY_FLAGS})
    return 0


def cmd_sim_export(args: argparse.Namespace, settings: Settings) -> int:
    markets, truth = sim.export(args.out, **_dataset_options(args))
    print(f"wrote {markets} and {truth}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.database is None:
        settings = settings.with_overrides(clickhouse_database="clobjob_demo")
    return launch.demo(settings, markets=args.markets, seed=args.seed, profile=args.profile, shards=args.shards,
                       fresh=args.fresh)


EXECUTORS = ("auto", "local", "kubernetes")
DESCRIPTION = ("Backfill Polymarket CLOB order fills into ClickHouse: completely, at the highest rate the source "
               "allows, resumable after any stop, on one machine or sharded across a Kubernetes Indexed Job.")
FAULT_FLAGS = ("p_5xx", "p_graphql_timeout", "p_overloaded", "p_store_timeout_in", "p_empty_body", "p_truncated",
               "p_slow", "p_hang")
LATENCY_FLAGS = ("latency_base_s", "latency_per_row_ms", "latency_jitter")


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``DatasetOptions`` (one definition for ``sim serve`` and ``sim export``)."""
    for name, info in sim.DatasetOptions.model_fields.items():
        shown = "none" if info.default is None else info.default
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=info.default, metavar="N",
                            help=f"{info.description} (default {shown})")


def _dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in sim.DatasetOptions.model_fields}


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command has ``--help``)."""
    parser = argparse.ArgumentParser(prog="clobjob", description=DESCRIPTION)
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
    sync = markets.add_parser("sync", help="update the universe and count every market's expected fills "
                              "(backfill, plan and diagnose count them too)")
    sync.add_argument("--gamma", action="store_true",
                      help="first upsert every market of Polymarket's Gamma API (the source of truth of the universe)")
    sync.add_argument("--gamma-url", help="override CLOBJOB_GAMMA_URL (default https://gamma-api.polymarket.com)")
    sync.add_argument("--add-subgraph-markets", action="store_true",
                      help="also add the markets the subgraph knows that the universe lacks")
    sync.add_argument("--subgraph-url", help="override CLOBJOB_SUBGRAPH_URL")
    sync.add_argument("--max-rps", type=float, help="hard ceiling on requests/s (adaptive below it)")
    sync.set_defaults(func=cmd_markets_sync)

    status = groups.add_parser("status", help="status of a run: shards, coverage, rate, ETA (default: latest run)")
    status.add_argument("--run-id", help="the run to show (default: the latest)")
    status.add_argument("--json", action="store_true", help="the stable JSON schema (clobjob/monitor.py)")
    status.add_argument("--watch", type=float, metavar="SECONDS",
                        help="redraw every SECONDS; exit 0 when the run is done, 1 when it failed, 130 on Ctrl+C")
    status.add_argument("--on", choices=EXECUTORS, default="auto",
                        help="show the run's Kubernetes Job beside ClickHouse: auto (default: when in a pod or a kube "
                             "config exists), kubernetes, or local (never)")
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
    plan.add_argument("--source", choices=["subgraph", "rpc", "all"],
                      help="as for backfill (default: CLOBJOB_SOURCE, else all when CLOBJOB_RPC_URL is set)")
    plan.set_defaults(func=cmd_plan)

    worker = groups.add_parser("worker", help="work one shard of a run (a pod of the Indexed Job)")
    worker.add_argument("--run-id", required=True, help="the planned run")
    worker.add_argument("--shard", type=int, help="shard index (default: $JOB_COMPLETION_INDEX)")
    worker.set_defaults(func=cmd_worker)

    backfill = groups.add_parser("backfill", help="plan what is missing and fetch it locally (resumes a run)")
    backfill.add_argument("--shards", type=int, default=4, help="shards of a new run (default 4)")
    backfill.add_argument("--parallelism", type=int, help="shards running at once (default: all)")
    backfill.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    backfill.add_argument("--source", choices=["subgraph", "rpc", "all"],
                          help="subgraph: v1 fills of the universe's markets; rpc: v2 fills from Polygon logs "
                               "(CLOBJOB_RPC_URL); all: both (default: CLOBJOB_SOURCE, else all when "
                               "CLOBJOB_RPC_URL is set, else subgraph)")
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
    rerun.add_argument("--on", choices=EXECUTORS, default="auto",
                       help="where to run it: local, or kubernetes (a new Indexed Job copied from the run's Job); "
                            "auto (default) = kubernetes inside a pod, else local")
    rerun.set_defaults(func=cmd_rerun)

    demo = groups.add_parser("demo", help="backfill a simulated subgraph into the embedded database, end to end")
    demo.add_argument("--markets", type=int, default=2000, help="simulated markets (default 2000)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--profile", choices=["clean", "throttled", "hostile"], default="throttled")
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--fresh", action="store_true", help="drop the demo database first")
    demo.set_defaults(func=cmd_demo)

    sim = groups.add_parser("sim", help="the local simulator of the Goldsky orderbook subgraph and of Gamma")
    sim = sim.add_subparsers(dest="sim_command", required=True)
    serve = sim.add_parser("serve", help="serve a simulated subgraph and Gamma /markets until Ctrl+C "
                                            "(prints the subgraph URL; Gamma is at its root)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8787)
    _add_dataset_flags(serve)
    serve.add_argument("--profile", choices=["clean", "throttled", "hostile", "realistic"], default="clean",
                       help="limits, faults and service time (default clean); flags below override it")
    serve.add_argument("--rpc-profile", choices=["clean", "infura", "alchemy", "tiny"],
                       help="also serve Polygon JSON-RPC at /rpc with v2 fills, as this provider limits eth_getLogs "
                            "(default: no RPC)")
    serve.add_argument("--rate-limit", type=float, metavar="RPS", help="token bucket rate per client IP")
    serve.add_argument("--burst", type=int, help="token bucket size")
    serve.add_argument("--retry-after", action="store_true", help="send Retry-After with 429s")
    for name in FAULT_FLAGS:
        serve.add_argument("--" + name.replace("_", "-"), type=float, metavar="P", help=f"probability of {name[2:]}")
    serve.add_argument("--latency-base-s", type=float, metavar="S",
                       help="service time of every answer, seconds (default 0; realistic 0.25)")
    serve.add_argument("--latency-per-row-ms", type=float, metavar="MS",
                       help="added service time per row answered, ms (default 0; realistic 0.6)")
    serve.add_argument("--latency-jitter", type=float, metavar="SHARE",
                       help="service time varies uniformly by ± this share, seeded (default 0; realistic 0.2)")
    serve.add_argument("--gamma-rate-limit", type=float, metavar="RPS",
                       help="Gamma /markets token bucket rate per client IP (default none; realistic 10)")
    serve.add_argument("--gamma-burst", type=int, help="Gamma token bucket size (default 10)")
    serve.set_defaults(func=cmd_sim_serve)
    export = sim.add_parser("export", help="write markets.jsonl (Gamma shape) and truth.jsonl of the dataset "
                                           "`sim serve` serves with the same flags")
    export.add_argument("--out", required=True, metavar="DIR")
    _add_dataset_flags(export)
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
