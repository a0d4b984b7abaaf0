"""GammaSource against the simulator's Gamma API: keyset and offset paging, bad rows, 429s, idempotence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clobjob.config import Settings
from clobjob.errors import SourceError
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sim import Dataset, SimConfig, SimServer
from clobjob.sources.gamma import GammaBadRow, GammaSource, fetch_universe
from clobjob.sources.markets import market_from_gamma

BAD = 250  # dataset position of the malformed market: page 3, item 51 of 100-market pages


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return Dataset.generate(markets=730, seed=13)  # 8 pages


@pytest.fixture(scope="module")
def sim(ds: Dataset) -> Iterator[SimServer]:
    with SimServer(ds, SimConfig(gamma_bad_rows=[BAD])).run_in_thread() as server:
        yield server


def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, request_timeout_s=10)


def controller() -> AdaptiveRateController:
    return AdaptiveRateController(initial_rps=50, backoff_base_s=0.05, backoff_cap_s=0.5)


def expected(ds: Dataset) -> list:
    return [market_from_gamma(m, i) for i, m in enumerate(ds.markets, start=1) if i - 1 != BAD]


def assert_the_bad_row(bad: list) -> None:
    assert len(bad) == 1
    [row] = bad
    assert isinstance(row, GammaBadRow) and row.line == BAD + 1 and row.field == "clobTokenIds"
    assert (row.page, row.item) == (3, 51) and str(row).startswith("page 3 item 51 (market #251): ")


async def test_keyset_paging_returns_every_good_market_and_locates_the_bad_one(
        ds: Dataset, sim: SimServer, tmp_path: Path) -> None:
    before = sim.stats()["gamma_requests"]
    markets, bad = await fetch_universe(settings(tmp_path), controller(), sim.gamma_url)
    assert markets == expected(ds)
    assert_the_bad_row(bad)
    assert sim.stats()["gamma_requests"] - before == 8


async def test_two_fetches_are_equal(sim: SimServer, tmp_path: Path) -> None:
    first = await fetch_universe(settings(tmp_path), controller(), sim.gamma_url)
    again = await fetch_universe(settings(tmp_path), controller(), sim.gamma_url)
    assert first[0] == again[0] and [str(b) for b in first[1]] == [str(b) for b in again[1]]


async def test_offset_paging_where_keyset_is_missing(ds: Dataset, tmp_path: Path) -> None:
    cfg = SimConfig(gamma_bad_rows=[BAD], gamma_keyset=False)
    with SimServer(ds, cfg).run_in_thread() as server:
        markets, bad = await fetch_universe(settings(tmp_path).with_overrides(gamma_url=server.gamma_url),
                                            controller())
        stats = server.stats()
    assert markets == expected(ds)
    assert_the_bad_row(bad)
    assert stats["gamma_requests"] == 1 + 8 + 1  # the 404, eight pages, the empty page that ends the listing


async def test_throttled_pages_are_retried(ds: Dataset, tmp_path: Path) -> None:
    cfg = SimConfig(gamma_bad_rows=[BAD], gamma_rate_limit_rps=8, gamma_burst=2)
    with SimServer(ds, cfg).run_in_thread() as server:
        rate = controller()
        markets, bad = await fetch_universe(settings(tmp_path), rate, server.gamma_url)
        stats = server.stats()
    assert markets == expected(ds)
    assert_the_bad_row(bad)
    assert stats["gamma_throttled_429"] > 0 and rate.snapshot().throttled == stats["gamma_throttled_429"]


async def test_offset_paging_stops_at_gammas_cap_with_an_explanation(tmp_path: Path) -> None:
    big = Dataset.generate(markets=10_150, seed=3)
    with SimServer(big, SimConfig(gamma_keyset=False)).run_in_thread() as server:
        source = GammaSource(settings(tmp_path), controller(), server.gamma_url)
        with pytest.raises(SourceError, match="stops at 10,000 markets"):
            async with source:
                await source.markets()
