"""The ``clobjob`` command line: parses flags, calls one function of ``clobjob.launch`` (or the monitor), renders."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from clobjob import __version__, launch, monitor, plan, sim
from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, BadInput, ClobjobError
from clobjob.executors.base import shard_from_env
from clobjob.logs import printable, setup_logging
from clobjob.models import RunState
from clobjob.store import open_store
from clobjob.store.serve import serve as serve_database


def _settings(args: argparse.Namespace) -> Settings:
    """The settings from the environment, overridden by the flags the command was given."""
    settings = Settings.load(
        clickhouse_url=args.clickhouse_url,
        clickhouse_database=args.database,
        log_format=args.log_format,
    )
    return settings.with_overrides(**{name: getattr(args, name, None) for name in SOURCE_SETTINGS})


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
    settings = settings.with_overrides(gamma_url=args.gamma_url)
    lines, bad = launch.sync_markets(settings, gamma=args.gamma, subgraph_markets=args.add_subgraph_markets)
    for problem in bad:
        print(f"skipped {problem}", file=sys.stderr)
    print("\n".join(lines))
    return 0


# --- monitor -------------------------------------------------------------------------------------


WATCH_EXIT = {RunState.DONE: EXIT_OK, RunState.FAILED: EXIT_FAILED, RunState.STOPPED: EXIT_SIGTERM}


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ended(status: dict[str, Any]) -> bool:
    """The run has ended (done, failed for good, stopped), and its Kubernetes Job, if it has one, is finished
    (until then a failed index may be retried)."""
    job = status.get("job")
    return status["ended"] and not (job and "error" not in job and not job["finished"])


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if not args.watch:
        status = launch.status(settings, args.run_id, on=args.on, wait_s=args.wait, say=_to_stderr)
        print(json.dumps(status, indent=2) if args.json else monitor.render_status(status))
        return 0
    try:
        while True:
            try:
                status = launch.status(settings, args.run_id, on=args.on)
            except monitor.NoLiveStatus as waiting:
                status, shown = None, f"waiting: {waiting}"
            else:
                shown = json.dumps(status) if args.json else monitor.render_status(status)
            if args.json and status is None:
                _to_stderr(shown)
            else:
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # clear and redraw in place, like watch -n
                header = "" if args.json else f"every {args.watch:g}s, Ctrl+C to stop · {time.strftime('%H:%M:%S')}\n"
                print(header + shown, flush=True)
            if status is not None and _ended(status):
                return WATCH_EXIT[RunState(status["state"])]
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130


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


def _block_span(text: str) -> tuple[int, int]:
    """``FROM:TO``: two block numbers, FROM ≤ TO."""
    low, sep, high = text.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()) or int(low) > int(high):
        raise argparse.ArgumentTypeError(f"{text!r} is not FROM:TO, two block numbers with FROM <= TO "
                                         "(e.g. 65000000:65001000)")
    return int(low), int(high)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    checked = launch.cross_check(settings, *args.cross_check) if args.cross_check else None
    with open_store(settings) as store:
        result = monitor.verify(store, min_coverage=args.min_coverage,
                                heartbeat_interval_s=settings.heartbeat_interval_s,
                                on_chain=settings.rpc_url is not None, checked=checked)
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


def _short_id(condition_id: str) -> str:
    """A condition id cut to its first and last digits, to fit a table."""
    return condition_id if len(condition_id) <= 20 else f"{condition_id[:12]}…{condition_id[-6:]}"


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
    lines += _render_agreement(shown["subgraph"])
    if mismatches["fewer"] or mismatches["more"]:
        lines.append(f"counts: {mismatches['fewer']:,} market(s) fetched to the end hold fewer fills than the source's "
                     f"count, {mismatches['more']:,} more; e.g. " + "; ".join(mismatches["examples"][:2]))
    lines += ["", _table(["status", "markets"], list(shown["by_status"].items()))]
    for title, matrix in (("by end date", shown["by_age"]), ("by volume rank", shown["by_volume"])):
        lines += ["", _table([title, *statuses], [[b, *counts.values()] for b, counts in matrix.items()])]
    lines += ["", f"to fetch: {fetch['markets']:,} markets ({fetch['missing']:,} missing, {fetch['incomplete']:,} "
              f"incomplete, {fetch['unknown_expected']:,} with unknown expected fills)",
              f"          {fetch['expected_fills']:,} expected fills in ≈ {fetch['requests']:,} requests",
              f"at {rec['rate_rps']:.1f} req/s ({rec['rate_origin']}): ≈ {monitor.render_duration(rec['duration_s'])}",
              f"recommended: --shards {rec['shards']}, --max-in-flight {rec['in_flight']} per worker pod "
              f"(one local backfill: --max-in-flight {rec['in_flight'] * rec['shards']})"]
    live = shown["live"]
    if live is None:
        lines.append("live check: skipped")
    else:
        lines += ["", _table(["sample", "expected", "first page", "latency s", "error"],
                             [[_short_id(s["condition_id"]),
                               "?" if s["expected_fills"] is None else s["expected_fills"],
                               f"{s['fills']}{'+' if s['more'] else ''}", f"{s['latency_s']:.2f}",
                               monitor.short_error(s["error"], 44) if s["error"] else ""]
                              for s in live["samples"]]),
                  f"probe: {live['requests']:,} requests, {live['throttled']:,} throttled, {live['errors']:,} "
                  f"errors; sustainable ≈ {live['rate_rps']:.1f} req/s"]
    return "\n".join(lines)


def _render_agreement(found: dict[str, Any] | None) -> list[str]:
    """Diagnose's lines on how the universe and the subgraph agree on tokens (none when all agree)."""
    if found is None:
        return []
    if "error" in found:
        return [f"subgraph check: could not be made ({found['error']})"]
    lines = []
    if found["markets_unknown_to_subgraph"]:
        lines.append(f"subgraph: {found['markets_unknown_to_subgraph']:,} market(s) it does not know (0 fills from it; "
                     f"markets created after the v2 cutover are only on the chain), e.g. "
                     + ", ".join(found["unknown_examples"][:2]))
    if found["tokens_of_another_market"]:
        lines.append(f"subgraph: {found['tokens_of_another_market']:,} token(s) it files under another market, e.g. "
                     + "; ".join(f"{e['token_id']} in {e['condition_id']} here, {e['subgraph_condition_id']} there"
                                 for e in found["another_market_examples"][:2]))
    if found["unclaimed_subgraph_tokens"]:
        lines.append(f"subgraph: {found['unclaimed_subgraph_tokens']:,} token(s) with {found['unclaimed_fills']:,} "
                     "fills that no market of the universe claims (not fetched; `clobjob markets sync --gamma` "
                     "brings their markets), e.g. "
                     + "; ".join(f"{e['token_id']} ({e['fills']:,} fills)" for e in found["unclaimed_examples"][:2]))
    return lines


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
    if args.interval is not None and not args.follow:
        raise BadInput("--interval goes with --follow")
    follow_s = (args.interval or FOLLOW_INTERVAL_S) if args.follow else None
    return launch.backfill(settings, shards=args.shards, parallelism=args.parallelism,
                           markets_file=args.markets, source=args.source, since=args.since, until=args.until,
                           gamma=args.gamma, follow_s=follow_s, if_idle=args.if_idle)


def _shard_list(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of shard numbers") from None


def cmd_rerun(args: argparse.Namespace, settings: Settings) -> int:
    run_id = args.run_id or launch.status(settings, None, on="local")["run_id"]
    if run_id is None:
        raise BadInput("no run to rerun: the database has no run yet")
    return launch.rerun_run(settings, run_id=run_id, failed_only=args.failed,
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


FOLLOW_INTERVAL_S = 60.0
EXECUTORS = ("auto", "local", "kubernetes")
SOURCES = ("subgraph", "rpc", "all")
DESCRIPTION = ("Backfill Polymarket CLOB order fills into ClickHouse: completely, at the highest rate the source "
               "allows, resumable after any stop, on one machine or sharded across a Kubernetes Indexed Job.")
EPILOG = ("getting started: clobjob markets sync (or markets load FILE) → clobjob diagnose → clobjob backfill → "
          "clobjob status --watch 10 (second terminal) → clobjob verify → clobjob rerun --failed. "
          "Every flag that overrides a setting also reads from its CLOBJOB_* environment variable.")
FAULT_FLAGS = ("p_5xx", "p_graphql_timeout", "p_overloaded", "p_store_timeout_in", "p_empty_body", "p_truncated",
               "p_slow", "p_hang")
FAULTS = {"p_5xx": "an HTTP 5xx answer", "p_graphql_timeout": "a GraphQL statement timeout",
          "p_overloaded": "an 'overloaded' GraphQL error", "p_store_timeout_in": "a store timeout in the answer",
          "p_empty_body": "an empty body", "p_truncated": "a truncated body", "p_slow": "a slow answer",
          "p_hang": "an answer that never comes"}
LATENCY_FLAGS = ("latency_base_s", "latency_per_row_ms", "latency_jitter")
SOURCE_SETTINGS = ("subgraph_url", "max_rps", "max_in_flight", "batch_rows")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except the uninformative ones (none, off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _default(setting: str) -> Any:
    return Settings.model_fields[setting].default


def _add_source_flags(parser: argparse.ArgumentParser, *, stores: bool = True) -> None:
    """The flags of the settings a fetching command uses (each overrides its environment variable)."""
    parser.add_argument("--subgraph-url", metavar="URL",
                        help="the orderbook subgraph's GraphQL endpoint (env CLOBJOB_SUBGRAPH_URL)")
    parser.add_argument("--max-rps", type=float, metavar="RPS",
                        help="hard ceiling on requests per second; the adaptive rate stays below it "
                             "(env CLOBJOB_MAX_RPS; default: no ceiling)")
    parser.add_argument("--max-in-flight", type=_positive_int, metavar="N",
                        help="most requests in flight at once, per process: diagnose recommends it "
                             f"(env CLOBJOB_MAX_IN_FLIGHT; default {_default('max_in_flight')})")
    if stores:
        parser.add_argument("--batch-rows", type=_positive_int, metavar="N",
                            help="most fills per insert into ClickHouse "
                                 f"(env CLOBJOB_BATCH_ROWS; default {_default('batch_rows')})")


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``DatasetOptions`` (one definition for ``sim serve`` and ``sim export``)."""
    for name, info in sim.DatasetOptions.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=info.default, metavar="N",
                            help=f"{info.description} (the same in sim serve and sim export)")


def _dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in sim.DatasetOptions.model_fields}


# --- parser --------------------------------------------------------------------------------------


def _command(groups: Any, name: str, help_text: str, func: Any, *, long_running: bool = False,
             ) -> argparse.ArgumentParser:
    parser = groups.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                               formatter_class=HelpFormatter)
    parser.set_defaults(func=func, long_running=long_running)
    return parser


def _group(groups: Any, name: str, help_text: str, dest: str) -> Any:
    parser = groups.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                               formatter_class=HelpFormatter)
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command has ``--help``)."""
    parser = argparse.ArgumentParser(prog="clobjob", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"clobjob {__version__}")
    parser.add_argument("--clickhouse-url", metavar="URL",
                        help="the database: http(s)://user@host:8123 or chdb:///absolute/path for the embedded one "
                             "(env CLOBJOB_CLICKHOUSE_URL; default: the embedded database in $CLOBJOB_HOME/db)")
    parser.add_argument("--database", metavar="NAME",
                        help="the ClickHouse database to use (env CLOBJOB_CLICKHOUSE_DATABASE; default clobjob)")
    parser.add_argument("--log-format", choices=["auto", "json", "human"],
                        help="log lines on stderr: auto = human on a terminal; off a terminal, JSON for long-running "
                             "commands (worker, backfill, rerun, demo, db serve, sim serve) and human for the others "
                             "(env CLOBJOB_LOG_FORMAT; default auto)")
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = _group(groups, "db", "the database: its schema, and sharing the embedded one", "db_command")
    _command(db, "migrate", "create or upgrade the schema (safe to repeat)", cmd_db_migrate)
    db_serve = _command(db, "serve", "serve the embedded database over ClickHouse's HTTP interface until Ctrl+C "
                        "(prints its URL), so that several processes can use it at once", cmd_db_serve,
                        long_running=True)
    db_serve.add_argument("--host", default="127.0.0.1",
                          help="address to listen on; anything but loopback opens the database, which has no "
                               "password, to that network")
    db_serve.add_argument("--port", type=int, default=8123, help="port to listen on (0: a free port)")

    markets = _group(groups, "markets", "the market universe: which markets exist and how many fills each has",
                     "markets_command")
    load = _command(markets, "load", "load markets from a Polymarket Gamma export", cmd_markets_load)
    load.add_argument("file", metavar="FILE",
                      help="a Gamma /markets export: a JSON array of market objects, or one object per line")
    load.add_argument("--strict", action="store_true", help="any bad row fails the load (exit 2), nothing loaded")
    sync = _command(markets, "sync", "update the universe and count every market's expected fills (backfill, "
                    "plan and diagnose count them too)", cmd_markets_sync)
    sync.add_argument("--gamma", action="store_true",
                      help="first upsert every market of Polymarket's Gamma API (the source of truth of the universe)")
    sync.add_argument("--gamma-url", metavar="URL",
                      help="Polymarket's Gamma API (env CLOBJOB_GAMMA_URL; default https://gamma-api.polymarket.com)")
    sync.add_argument("--add-subgraph-markets", action="store_true",
                      help="also add the markets the subgraph knows that the universe lacks")
    _add_source_flags(sync, stores=False)

    status = _command(groups, "status", "a run's state, coverage, progress and shards (default: the latest run); "
                      "works in a second terminal while a run holds the embedded database", cmd_status)
    status.add_argument("--run-id", metavar="RUN", help="the run to show (default: the latest)")
    status.add_argument("--json", action="store_true", help="print the JSON status (stable, versioned schema)")
    status.add_argument("--watch", type=float, metavar="SECONDS",
                        help="redraw every SECONDS until the run has ended; exit 0 done, 1 failed, 143 stopped, "
                             "130 on Ctrl+C")
    status.add_argument("--wait", type=float, default=monitor.LIVE_WAIT_S, metavar="SECONDS",
                        help="while another process holds the embedded database, wait this long for the live status "
                             "it publishes")
    status.add_argument("--on", choices=EXECUTORS, default="auto",
                        help="show the run's Kubernetes Job too: auto (when in a pod or a kube config exists), "
                             "kubernetes, or local (never)")
    verify = _command(groups, "verify", "is the data ready for P&L? every criterion; exit 0 only when ready",
                      cmd_verify)
    verify.add_argument("--json", action="store_true", help="print every criterion as JSON")
    verify.add_argument("--min-coverage", type=_ratio, default=0.95, metavar="RATIO",
                        help="share of markets that must be covered (complete or zero-fill)")
    verify.add_argument("--report", metavar="FILE", help="also write a self-contained HTML report to FILE")
    verify.add_argument("--cross-check", type=_block_span, metavar="FROM:TO",
                        help="also read the v1 exchanges' fills of blocks FROM to TO from the chain (CLOBJOB_RPC_URL) "
                             "and compare them with the stored subgraph fills of that time: counts, ids missing on "
                             "either side, values that differ")

    diagnose = _command(groups, "diagnose", "what is missing, how old, how much work, and the shards and "
                        "in-flight window to run it with", cmd_diagnose)
    diagnose.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    diagnose.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    diagnose.add_argument("--out", metavar="FILE", help="write the missing and incomplete condition ids to FILE "
                          "(a JSON array, for --markets)")
    diagnose.add_argument("--rate", type=_positive, metavar="RPS",
                          help="plan with this request rate instead of probing")
    diagnose.add_argument("--offline", action="store_true", help="skip the sample fetches and the rate probe")
    diagnose.add_argument("--sample", type=int, default=5, metavar="N", help="missing markets to fetch for real")
    diagnose.add_argument("--probe-seconds", type=_positive, default=10.0, metavar="S",
                          help="how long to probe the sustainable request rate")
    _add_source_flags(diagnose, stores=False)

    plan = _command(groups, "plan", "write a run's work units, balanced over N shards (to run them as pods: "
                    "clobjob worker)", cmd_plan)
    plan.add_argument("--shards", type=_positive_int, required=True, metavar="N",
                      help="number of shards: one worker pod each (the Job's completions)")
    plan.add_argument("--run-id", metavar="RUN", help="run id (default: run-YYYYmmdd-HHMMSS, UTC)")
    plan.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    plan.add_argument("--since", metavar="ISO", help="plan a time window over every market, from this time")
    plan.add_argument("--until", metavar="ISO", help="… up to this time (exclusive); goes with --since")
    plan.add_argument("--force", action="store_true", help="replace a run that already has progress")
    plan.add_argument("--source", choices=SOURCES,
                      help="as for backfill (default: env CLOBJOB_SOURCE, else all when CLOBJOB_RPC_URL is set)")
    _add_source_flags(plan, stores=False)

    worker = _command(groups, "worker", "work one shard of a planned run (what each pod of the Job runs)",
                      cmd_worker, long_running=True)
    worker.add_argument("--run-id", required=True, metavar="RUN", help="the planned run")
    worker.add_argument("--shard", type=int, metavar="I", help="shard index (default: $JOB_COMPLETION_INDEX)")
    _add_source_flags(worker)

    backfill = _command(groups, "backfill", "fetch what is missing here, with a progress line: resumes the latest "
                        "unfinished run, or plans one; Ctrl+C stops after checkpointing", cmd_backfill,
                        long_running=True)
    backfill.add_argument("--shards", type=_positive_int, default=4, metavar="N", help="shards of a new run")
    backfill.add_argument("--parallelism", type=_positive_int, metavar="P",
                          help="shards running at once (default: all)")
    backfill.add_argument("--markets", metavar="FILE", help="only these condition ids (JSON array or one per line)")
    backfill.add_argument("--source", choices=SOURCES,
                          help="subgraph: v1 fills of the universe's markets; rpc: v2 fills from Polygon logs "
                               "(CLOBJOB_RPC_URL); all: both (default: env CLOBJOB_SOURCE, else all when "
                               "CLOBJOB_RPC_URL is set, else subgraph)")
    backfill.add_argument("--since", metavar="ISO",
                          help="instead of what is missing, the time window from this date or time (UTC unless a "
                               "zone is given): every market's fills in it and the chain's blocks whose timestamps "
                               "fall in it")
    backfill.add_argument("--until", metavar="ISO", help="… up to this time (exclusive); goes with --since")
    backfill.add_argument("--gamma", action="store_true",
                          help="first upsert every market of Polymarket's Gamma API (CLOBJOB_GAMMA_URL); with "
                               "--follow, every round")
    backfill.add_argument("--follow", action="store_true",
                          help="once complete, keep fetching what is new (blocks up to the safe head, missing "
                               "markets): a round every --interval, one line each, until Ctrl+C or SIGTERM (143)")
    backfill.add_argument("--interval", type=_positive, metavar="S",
                          help=f"seconds between the starts of two --follow rounds (default {FOLLOW_INTERVAL_S:g})")
    backfill.add_argument("--if-idle", action="store_true",
                          help="start only when no other run is in progress (live heartbeats), else exit 0 at once: "
                               "for scheduled rounds, e.g. the chart's CronJob")
    _add_source_flags(backfill)

    rerun = _command(groups, "rerun", "a new run of a run's failed or unfinished units, each resuming from its "
                     "checkpoint", cmd_rerun, long_running=True)
    rerun.add_argument("--run-id", metavar="RUN", help="the run whose units to rerun (default: the latest run)")
    rerun.add_argument("--failed", action="store_true", help="only units that failed (default: every unfinished unit)")
    rerun.add_argument("--shards", type=_shard_list, metavar="I,J", help="only units of these shards of the run")
    rerun.add_argument("--new-shards", type=_positive_int, metavar="N",
                       help="shards of the new run (default: as many as held the selected units)")
    rerun.add_argument("--parallelism", type=_positive_int, metavar="P", help="shards running at once (default: all)")
    rerun.add_argument("--on", choices=EXECUTORS, default="auto",
                       help="where to run it: local, or kubernetes (a new Indexed Job copied from the run's Job); "
                            "auto = kubernetes inside a pod, else local")
    _add_source_flags(rerun)

    demo = _command(groups, "demo", "backfill a simulated subgraph into the embedded database, end to end "
                    "(database clobjob_demo unless --database)", cmd_demo, long_running=True)
    demo.add_argument("--markets", type=_positive_int, default=2000, metavar="N", help="simulated markets")
    demo.add_argument("--seed", type=int, default=7, help="seed of the simulated data and faults")
    demo.add_argument("--profile", choices=["clean", "throttled", "hostile"], default="throttled",
                      help="how the simulated subgraph behaves: clean, throttled (a rate limit), hostile (faults)")
    demo.add_argument("--shards", type=_positive_int, default=4, metavar="N", help="shards of the backfill")
    demo.add_argument("--fresh", action="store_true", help="drop the demo database first")

    sim_group = _group(groups, "sim", "the local simulator of the orderbook subgraph and of Gamma", "sim_command")
    serve = _command(sim_group, "serve", "serve a simulated subgraph and Gamma /markets until Ctrl+C (prints the "
                     "subgraph URL; Gamma is at its root)", cmd_sim_serve, long_running=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8787, help="port to listen on (0: a free port)")
    _add_dataset_flags(serve)
    serve.add_argument("--profile", choices=["clean", "throttled", "hostile", "realistic"], default="clean",
                       help="limits, faults and service time; the flags below override it")
    serve.add_argument("--rpc-profile", choices=["clean", "infura", "alchemy", "tiny"],
                       help="also serve Polygon JSON-RPC at /rpc with v2 fills, as this provider limits eth_getLogs "
                            "(default: no RPC)")
    serve.add_argument("--rate-limit", type=float, metavar="RPS",
                       help="token bucket rate per client IP (default: the profile's)")
    serve.add_argument("--burst", type=int, metavar="N", help="token bucket size (default: the profile's)")
    serve.add_argument("--retry-after", action="store_true", help="send Retry-After with 429s")
    for name in FAULT_FLAGS:
        serve.add_argument("--" + name.replace("_", "-"), type=float, metavar="P",
                           help=f"probability of {FAULTS[name]} (default: the profile's)")
    serve.add_argument("--latency-base-s", type=float, metavar="S",
                       help="service time of every answer, seconds (default 0; realistic 0.25)")
    serve.add_argument("--latency-per-row-ms", type=float, metavar="MS",
                       help="added service time per row answered, ms (default 0; realistic 0.6)")
    serve.add_argument("--latency-jitter", type=float, metavar="SHARE",
                       help="service time varies uniformly by ± this share, seeded (default 0; realistic 0.2)")
    serve.add_argument("--gamma-rate-limit", type=float, metavar="RPS",
                       help="Gamma /markets token bucket rate per client IP (default none; realistic 10)")
    serve.add_argument("--gamma-burst", type=int, metavar="N", help="Gamma token bucket size (default 10)")
    export = _command(sim_group, "export", "write markets.jsonl (Gamma shape) and truth.jsonl of the dataset "
                      "`sim serve` serves with the same dataset flags", cmd_sim_export)
    export.add_argument("--out", required=True, metavar="DIR", help="directory to write the two files to")
    _add_dataset_flags(export)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clobjob`` console script. Errors go to stderr; a closed pipe (``| head``) ends it
    quietly with exit 0."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format or "auto", long_running=args.long_running)
    try:
        settings = _settings(args)
        setup_logging(settings.log_format, long_running=args.long_running, redact=settings.redact)
        code = args.func(args, settings)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except ClobjobError as exc:
        logger.error("{}", exc)
        return exc.exit_code
    except ValueError as exc:  # a model's validation of an input
        logger.error("bad configuration or input: {}", exc)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
