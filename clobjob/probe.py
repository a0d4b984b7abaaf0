"""The live step of ``clobjob diagnose``: fetch the first page of a few missing markets for real, then
probe the request rate the source sustains through the same adaptive controller the workers use."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from clobjob.errors import ClobjobError
from clobjob.models import MarketFills, WorkUnit
from clobjob.plan import MissingReport
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sources.base import FillSource


@dataclass(frozen=True)
class SampleFetch:
    """The first page of one missing market, fetched for real."""

    condition_id: str
    expected_fills: int | None
    fills: int  # fills on the first page
    more: bool  # the market has further pages
    latency_s: float
    error: str = ""


@dataclass(frozen=True)
class LiveCheck:
    """What the live step found; ``limited`` says the probe hit the source's limit (else the rate is a floor)."""

    samples: tuple[SampleFetch, ...]
    rate_rps: float
    limited: bool
    latency_s: float | None
    requests: int
    throttled: int
    errors: int


def pick_sample(report: MissingReport, size: int) -> list[MarketFills]:
    """A deterministic sample of the work: the most recent, the oldest and the largest markets first."""
    work = sorted(report.work, key=lambda m: m.condition_id)
    picks = [
        max(work, key=lambda m: (m.end_ts or 0, m.condition_id), default=None),
        min(work, key=lambda m: (m.end_ts or 0, m.condition_id), default=None),
        min(work, key=lambda m: m.volume_rank, default=None),
        *work,
    ]
    return list(dict.fromkeys(p for p in picks if p is not None))[:size]


async def _first_page(source: FillSource, market: MarketFills, timeout_s: float) -> SampleFetch:
    unit = WorkUnit(run_id="diagnose", unit_id=0, shard=0, condition_ids=(market.condition_id,),
                    token_ids=market.token_ids)
    started = time.monotonic()
    pages = source.pages(unit, "", {t: market.condition_id for t in market.token_ids})
    try:
        async with asyncio.timeout(timeout_s):
            page = await anext(pages)
    except (ClobjobError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, ClobjobError) else f"no page in {timeout_s:g} s"
        return SampleFetch(market.condition_id, market.expected_fills, 0, False, time.monotonic() - started, error)
    finally:
        await pages.aclose()
    return SampleFetch(market.condition_id, market.expected_fills, page.size, not page.done,
                       time.monotonic() - started)


async def live_check(report: MissingReport, source: FillSource, controller: AdaptiveRateController, *,
                     sample: int = 5, probe_s: float = 10.0, timeout_s: float = 90.0,
                     concurrency: int = 64) -> LiveCheck | None:
    """Sample fetches of the report's work (each given ``timeout_s``), then ``probe_s`` seconds of first-page
    requests by ``concurrency`` callers at the highest rate ``controller`` finds; None when nothing is missing."""
    markets = pick_sample(report, max(sample, 1))
    if not markets:
        return None
    samples = tuple(await asyncio.gather(*(_first_page(source, m, timeout_s) for m in markets[:sample])))

    async def hammer(offset: int) -> None:
        while True:
            await _first_page(source, markets[offset % len(markets)], timeout_s)
            offset += 1

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(hammer(i) for i in range(concurrency))), probe_s)
    state = controller.snapshot()
    limited = state.ceiling_rps is not None
    return LiveCheck(samples, state.ceiling_rps if limited else state.accepted_rps, limited, state.latency_s,
                     state.requests, state.throttled, state.errors)
