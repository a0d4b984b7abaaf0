"""Worker processes killed (``kill -9``) twenty times mid-run, a quarter of them while fills are being inserted, a
quarter while a checkpoint is, a quarter between the two: the run ends exact, and each kill costs a unit at most the
pages it requested in the last flush interval."""

from __future__ import annotations

import pytest

from tests.chaos import scenarios

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def test_kills_end_exact_and_cost_each_unit_at_most_a_flush_interval(db, tmp_path):
    figures = scenarios.run_exact("kill -9 ×N", db, tmp_path)
    kills = figures.kills()
    assert kills >= 20, figures.faults
    for kind in ("fills in flight", "checkpoint in flight", "fills stored, checkpoint not"):
        assert figures.faults[f"kill -9, {kind}"] > 0, figures.faults
    assert figures.restarts >= kills
    # A kill costs each unit it interrupts at most the pages that unit requested in the last flush interval
    # (its rows are stored within one interval of the request; its requests in flight are among them), and
    # what it requested while an insert was held slow: the fills re-fetched, per kill per unit hit, within a
    # unit's fills per flush interval (and hold) as this run measured them.
    assert figures.units_hit > 0 and figures.allowance_fills > 0, figures
    # On a quiet host the ratio is ≤ 1 (bench/chaos_report.py prints it); on a loaded CI host answers wait
    # for a core while the allowance is sampled from the server's counter, and it read up to 2.3: the test
    # bounds that, so a kill that re-fetched a unit's whole progress (tens of intervals) still fails it.
    assert figures.refetch_per_unit_hit <= 3, figures
