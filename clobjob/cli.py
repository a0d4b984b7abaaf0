"""The ``clobjob`` command line. Thin: parses flags, builds Settings, calls the rooms below, renders."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from loguru import logger

from clobjob.config import Settings
from clobjob.errors import EXIT_BAD_INPUT, BadInput, ClobjobError
from clobjob.logs import setup_logging

Command = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    return Settings().with_overrides(
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


def cmd_markets_sync(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from clobjob.sources.subgraph import SubgraphSource, Universe, merge_universe
    from clobjob.store import open_store
    from clobjob.worker import make_controller

    settings = settings.with_overrides(subgraph_url=args.subgraph_url, max_rps=args.max_rps)

    async def fetch() -> Universe:
        async with SubgraphSource(settings, make_controller(settings)) as source:
            return await source.universe()

    universe = asyncio.run(fetch())
    with open_store(settings) as store:
        added, orderbooks = merge_universe(store.markets(), universe)
        store.upsert_markets(added)
        store.upsert_orderbooks(orderbooks)
    print(f"subgraph knows {len(universe.tokens_by_condition)} markets: added {len(added)} new; "
          f"orderbooks for {len(orderbooks)} tokens ({sum(n for _, n in orderbooks.values())} expected fills)")
    return 0


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

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clobjob`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format or "auto")
    try:
        settings = _settings(args)
        setup_logging(settings.log_format)
        return args.func(args, settings)
    except ClobjobError as exc:
        logger.error("{}", exc)
        return exc.exit_code
    except ValueError as exc:  # pydantic validation of settings or inputs
        logger.error("bad configuration or input: {}", exc)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
