"""``clobjob verify``: is the data ready for P&L? Every criterion as pass / fail / n/a with examples, and the
figures the HTML report shows (coverage by month, the worst gaps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from clobjob.logs import printable
from clobjob.models import FILL_COLUMNS, MarketFills, MarketStatus, RunState, coverage_summary
from clobjob.monitor.status import ON_CHAIN, SCHEMA_VERSION, pct, render_v2, shard_statuses, utcnow, v2_progress
from clobjob.sources import DATA_UNTIL
from clobjob.store import Store


def _date(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


def coverage_by_month(markets: Sequence[MarketFills]) -> list[dict[str, Any]]:
    """Covered vs not covered markets per market end month (``YYYY-MM``; undated markets last)."""
    buckets: dict[str, list[int]] = {}
    for m in markets:
        month = _date(m.end_ts).strftime("%Y-%m") if m.end_ts is not None else "no end date"
        buckets.setdefault(month, [0, 0])[0 if m.status.covered else 1] += 1
    order = sorted(buckets, key=lambda month: (month == "no end date", month))
    return [{"month": k, "covered": buckets[k][0], "not_covered": buckets[k][1]} for k in order]


def worst_gaps(markets: Sequence[MarketFills], n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` markets with the most expected fills not stored."""
    gaps = sorted((m for m in markets if m.gap), key=lambda m: (-m.gap, m.condition_id))[:n]
    return [{"condition_id": m.condition_id, "question": m.question,
             "end_date": _date(m.end_ts).isoformat() if m.end_ts is not None else None,
             "expected": m.expected_fills, "stored": m.v1_fills, "missing": m.gap} for m in gaps]


def report_sections(store: Store, *, gaps: int = 20) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Coverage by month and the worst gaps, as ``render_report_html`` takes them."""
    markets = store.market_fill_counts()
    return coverage_by_month(markets), worst_gaps(markets, gaps)


def _criterion(name: str, status: str, detail: str, examples: Sequence[MarketFills] = ()) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail,
            "examples": [f"{m.condition_id} {m.question}".strip() for m in examples[:10]]}


def _coverage_criterion(summary: Mapping[str, Any], min_coverage: float) -> dict[str, Any]:
    if summary["coverage"] is None:
        return _criterion("coverage", "fail", "no markets in the universe (load them: clobjob markets load)")
    ok = summary["coverage"] >= min_coverage
    return _criterion("coverage", "pass" if ok else "fail",
                      f"{pct(summary['coverage'])} of {summary['universe']:,} markets covered "
                      f"({'≥' if ok else '<'} {pct(min_coverage)}); {summary['missing']:,} missing, "
                      f"{summary['incomplete']:,} incomplete, {summary['unknown']:,} unknown, "
                      f"{summary['waiting_v2']:,} waiting for v2")


def _waiting(bad: Sequence[MarketFills], v2: Mapping[str, Any]) -> str:
    """Why some of the markets not covered are: their v2 part waits for the chain (how far it is read)."""
    waiting = sum(1 for m in bad if m.status is MarketStatus.WAITING_V2)
    return (f" ({waiting:,} waiting for v2: {render_v2(v2)}; run clobjob backfill --source rpc)"
            if waiting else "")


def _recent_criterion(markets: Sequence[MarketFills], now: datetime, days: int, v2: Mapping[str, Any]
                      ) -> dict[str, Any]:
    since, until = int((now - timedelta(days=days)).timestamp()), int(now.timestamp())
    bad = [m for m in markets if not m.status.covered and m.end_ts is not None and since <= m.end_ts <= until]
    return _criterion("recent_markets_complete", "fail" if bad else "pass",
                      f"{len(bad):,} market(s) that ended in the last {days} days are not covered" + _waiting(bad, v2),
                      bad)


def _top_criterion(markets: Sequence[MarketFills], top_n: int, v2: Mapping[str, Any]) -> dict[str, Any]:
    top = sorted((m for m in markets if m.volume_rank <= top_n), key=lambda m: m.volume_rank)
    bad = [m for m in top if not m.status.covered]
    return _criterion("top_markets_complete", "fail" if bad else "pass",
                      f"{len(bad):,} of the top {len(top):,} markets by volume are not covered" + _waiting(bad, v2),
                      bad)


def _fills_24h_criterion(store: Store, markets: Sequence[MarketFills], now: datetime,
                         on_chain: bool) -> dict[str, Any]:
    """Applicable when the latest run's source (with no run: the subgraph, which the expected counts come
    from) holds fills of the last 24 h (``sources.DATA_UNTIL``) — or the chain is read (``on_chain``) — and some
    market (with expected fills, off the chain) was open then (started by now, ended within 24 h or, undated,
    not closed). On the chain it also needs the blocks read up to a day ago."""
    name, day_ago = "fills_last_24h", now - timedelta(days=1)
    latest = next(iter(store.runs()), None)
    source = latest.source if latest else "subgraph"
    chain = on_chain or source in ON_CHAIN  # v2 fills: the chain must have been read up to a day ago
    until = DATA_UNTIL.get(source)
    if not chain and until is not None and until < day_ago:
        return _criterion(name, "n/a", f"the {source} source has no fills after {until.isoformat()}")
    now_ts, day_ago_ts = int(now.timestamp()), int(day_ago.timestamp())
    open_markets = [m for m in markets if (m.expected_fills or chain)
                    and (m.start_ts is None or m.start_ts <= now_ts)
                    and (m.end_ts >= day_ago_ts if m.end_ts is not None else not m.closed)]
    count = store.recent_fills(now)["fills_24h"]
    detail = f"{count:,} fill(s) in the last 24 h; {len(open_markets):,} market(s) open then"
    if not count and not open_markets:
        return _criterion(name, "n/a", "no market with expected fills was open in the last 24 h")
    if chain:
        v2 = v2_progress(store, now)
        reached = v2["reached_at"]
        detail += f"; {render_v2(v2)}, newest v2 fill there {v2['newest_fill_at'] or 'none'}"
        if reached is None or datetime.fromisoformat(reached) < day_ago:
            progress = store.shard_progress(latest.run_id).values() if latest is not None else ()
            errors = sorted({row[-1] for row in progress if row[-1]})
            return _criterion(name, "fail", detail + "; " + ("; ".join(errors[:3]) if errors else
                              "the chain is not read up to the last day: run clobjob backfill --source rpc"))
    return _criterion(name, "pass" if count else "fail", detail)


CROSS_CHECKED = ("timestamp", "maker", "taker", "maker_asset_id", "taker_asset_id", "maker_amount_filled",
                 "taker_amount_filled", "fee")
"""What a v1 log and a subgraph fill of the same id are compared on (``Store.fills_between``'s values)."""
_CROSS_AT = tuple(FILL_COLUMNS.index(c) for c in CROSS_CHECKED)


def cross_check(on_chain: Sequence[tuple], stored: Mapping[str, tuple], *, blocks: tuple[int, int],
                times: tuple[int, int], examples: int = 5) -> dict[str, Any]:
    """The v1 exchanges' fills read from the chain over ``blocks`` (rows in ``FILL_COLUMNS`` order, from the RPC
    source) against the subgraph fills stored with a timestamp within ``times`` (the first and last block's):
    counts, the ids on one side only and the fills whose values differ, with examples. Only fills of tokens the
    universe knows are compared (the backfill fetches no other); the others are counted."""
    chain = {row[0]: tuple(row[i] for i in _CROSS_AT) for row in on_chain if row[FILL_COLUMNS.index("condition_id")]}
    common = chain.keys() & stored.keys()
    differing = sorted(i for i in common if chain[i] != stored[i])
    missing, extra = sorted(chain.keys() - stored.keys()), sorted(stored.keys() - chain.keys())

    def shown(ids: Sequence[str]) -> dict[str, Any]:
        return {"count": len(ids), "examples": list(ids[:examples])}

    return {"blocks": {"from": blocks[0], "to": blocks[1]},
            "time": {"from": _date(times[0]).isoformat(), "to": _date(times[1]).isoformat()},
            "on_chain": len(chain), "outside_universe": len(on_chain) - len(chain), "stored": len(stored),
            "matching": len(common) - len(differing), "missing_from_store": shown(missing),
            "missing_on_chain": shown(extra),
            "differing": {"count": len(differing), "examples": [
                f"{i}: " + ", ".join(f"{name} stored {a} on chain {b}" for name, a, b in
                                     zip(CROSS_CHECKED, stored[i], chain[i]) if a != b)
                for i in differing[:examples]]},
            "agree": not (missing or extra or differing)}


def _cross_check_criterion(checked: Mapping[str, Any]) -> dict[str, Any]:
    blocks, time = checked["blocks"], checked["time"]
    missing, extra, differing = (checked[k] for k in ("missing_from_store", "missing_on_chain", "differing"))
    detail = (f"blocks {blocks['from']:,}–{blocks['to']:,} ({time['from'][:19]} – {time['to'][:19]} UTC): "
              f"{checked['on_chain']:,} v1 fills on chain (and {checked['outside_universe']:,} of tokens outside the "
              f"universe), {checked['stored']:,} stored from the subgraph; {missing['count']:,} missing from the "
              f"store, {extra['count']:,} not on chain, {differing['count']:,} differ")
    found = [*(f"missing from the store: {i}" for i in missing["examples"]),
             *(f"not on chain: {i}" for i in extra["examples"]), *(f"differs: {d}" for d in differing["examples"])]
    return {"name": "v1_cross_check", "status": "pass" if checked["agree"] else "fail", "detail": detail,
            "examples": found[:10]}


def _runs_criterion(store: Store, now: datetime, stalled_after_s: float) -> dict[str, Any]:
    """A run is in progress when one of its shards is running (unfinished units and a live heartbeat)."""
    running = []
    for run_id in store.runs_beating_since(now - timedelta(seconds=stalled_after_s)):
        run = store.run(run_id)
        if run and any(s.state == RunState.RUNNING for s in
                       shard_statuses(store, run, store.heartbeats(run_id), now, stalled_after_s)):
            running.append(run_id)
    return _criterion("no_run_in_progress", "fail" if running else "pass",
                      f"run(s) in progress: {', '.join(running)}" if running else "no run in progress")


def verify(store: Store, *, min_coverage: float = 0.95, now: datetime | None = None, top_n: int = 100,
           recent_days: int = 30, heartbeat_interval_s: float = 5, stalled_after: float = 3,
           on_chain: bool = False, checked: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Readiness for P&L: every criterion as pass / fail / n/a with details; ``ready`` when none fails.

    Criteria: ``coverage`` ≥ min_coverage; ``recent_markets_complete`` (no market that ended in the last
    ``recent_days`` days is not covered); ``top_markets_complete`` (the ``top_n`` markets by volume rank); a market
    with a v2 part is covered only once the v2 block ranges reach the safe head (``models.MarketStatus``), and
    these criteria say how many wait for it and how far the chain is read;
    ``fills_last_24h`` (with ``on_chain`` — an RPC endpoint is configured — or a latest run that reads the
    chain: fills of the last day stored and the chain read to within a day; otherwise n/a when the source or the
    universe cannot have such fills); ``no_run_in_progress``; with ``checked`` (``cross_check``'s result, under
    ``cross_check``) also ``v1_cross_check``: the chain's v1 fills of a block range and the stored subgraph fills
    agree.
    """
    now = utcnow(now)
    markets = store.market_fill_counts(now=now.timestamp())
    summary, v2 = coverage_summary(markets), v2_progress(store, now)
    criteria = [
        _coverage_criterion(summary, min_coverage),
        _recent_criterion(markets, now, recent_days, v2),
        _top_criterion(markets, top_n, v2),
        _fills_24h_criterion(store, markets, now, on_chain),
        _runs_criterion(store, now, heartbeat_interval_s * stalled_after),
        *([_cross_check_criterion(checked)] if checked is not None else []),
    ]
    return {"schema_version": SCHEMA_VERSION, "generated_at": now.isoformat(),
            "ready": all(c["status"] != "fail" for c in criteria), "min_coverage": min_coverage,
            "markets": summary, "criteria": criteria, "cross_check": checked}


def render_verify(result: Mapping[str, Any]) -> str:
    """Every criterion with its status and detail, failed ones with example markets."""
    lines = ["READY for P&L" if result["ready"] else "NOT READY for P&L"]
    for c in result["criteria"]:
        lines.append(f"  [{c['status'].upper():>4}] {c['name']}: {c['detail']}")
        if c["status"] == "fail":
            lines.extend(f"           {printable(example)}" for example in c["examples"])
    return "\n".join(lines)

