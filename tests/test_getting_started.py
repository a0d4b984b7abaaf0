"""The README's "Getting started" commands, run as written against the simulator."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.terminal import REPO

pytestmark = pytest.mark.timeout(180)

README = REPO / "README.md"


def guide_text() -> str:
    """The README's "Getting started" section."""
    text = README.read_text()
    start = text.index("## Getting started")
    return text[start:text.index("\n## ", start + 1)]


def guide_commands() -> list[list[str]]:
    """Every ``clobjob …`` line of the guide's shell blocks, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", guide_text(), flags=re.S)
    return [shlex.split(line.strip()) for block in blocks for line in block.splitlines()
            if line.strip().startswith("clobjob ")]


def test_the_guide_follows_the_old_guides_order():
    steps = [" ".join(command[1:3]) for command in guide_commands()]
    assert steps == ["sim serve", "markets sync", "diagnose", "backfill --shards", "status --watch", "verify",
                     "rerun --failed"]


def test_getting_started_runs_as_written(tmp_path):
    env = {**os.environ, "CLOBJOB_HOME": str(tmp_path / "home"), "CLOBJOB_HEARTBEAT_INTERVAL_S": "1"}
    for name in ("CLOBJOB_CLICKHOUSE_URL", "CLOBJOB_SUBGRAPH_URL", "CLOBJOB_GAMMA_URL", "CLOBJOB_LOG_FORMAT",
                 "WORKER_COUNT",
                 "DELAY_MS", "BATCH_SIZE"):
        env.pop(name, None)
    (serve, *steps) = guide_commands()
    sim = subprocess.Popen([sys.executable, "-m", *serve, "--port", "0"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = re.search(r"http://\S+", sim.stdout.readline()).group(0)
        env["CLOBJOB_SUBGRAPH_URL"] = url  # the guide's `export CLOBJOB_SUBGRAPH_URL=… CLOBJOB_GAMMA_URL=…`
        env["CLOBJOB_GAMMA_URL"] = re.match(r"http://[^/]+", url).group(0)  # with this port
        outputs = {}
        for command in steps:
            done = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
            outputs[command[1]] = done.stdout
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    assert "Gamma" in outputs["markets"] and "expected fills: counted" in outputs["markets"]
    assert "recommended: --shards" in outputs["diagnose"] and "found by probing" in outputs["diagnose"]
    assert "DONE" in outputs["backfill"] and "DONE" in outputs["status"]
    assert outputs["verify"].startswith("READY for P&L")
    assert "nothing to rerun" in outputs["rerun"]
