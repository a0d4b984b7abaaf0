"""Chaos at scale, as pods against servers: worker processes doubled, stopped, paused and starved, the database
going away, a checkpoint corrupted — each run ends with every fill stored exactly once after FINAL and ``clobjob
status`` agreeing (the scenarios: tests/chaos/scenarios.py; kills: test_chaos_kills.py, a file of its own so that
it runs beside these; the longer schedule: bench/chaos_report.py)."""

from __future__ import annotations

import pytest

from tests.chaos import scenarios

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


@pytest.mark.parametrize("name", [name for name in scenarios.SCENARIOS if name != "kill -9 ×N"])
def test_scenario_ends_exact_with_status_agreeing(name, db, tmp_path):
    figures = scenarios.run_exact(name, db, tmp_path)
    if name == "source storms":
        assert {"429 answers", "hung answers", "SIGSTOP 5 s (stall timeout 3 s)"} <= {
            fault for fault, n in figures.faults.items() if n}, figures.faults
