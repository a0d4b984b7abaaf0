"""The image's install steps (docker/install.sh, which the Dockerfile runs) work from a clean venv, and the image
runs the console script as an unprivileged user."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart import image_entrypoint

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

pytestmark = pytest.mark.timeout(300)


def test_install_script_builds_a_working_core_install_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "docker" / "install.sh"), str(ROOT), str(venv)], env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"clobjob installed in {venv}" in done.stdout
    # the venv's own clobjob, not the source tree: the installed package is the one the image would hold
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import clobjob; print(clobjob.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv))
    worker = subprocess.run([str(venv / "bin" / "clobjob"), "worker", "--help"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout
    assert "--run-id" in worker and "JOB_COMPLETION_INDEX" in worker


def test_the_dockerfile_runs_the_install_script_and_the_console_script_as_user_10001():
    stages = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert len(stages) == 2 and all("slim" in s or s == "${PYTHON_IMAGE}" for s in stages)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^RUN clobjob-install /src /opt/clobjob", DOCKERFILE, re.MULTILINE)
    assert "COPY docker/install.sh" in DOCKERFILE and "COPY --from=build /opt/clobjob /opt/clobjob" in DOCKERFILE
    assert re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)[-1] == "10001:10001"
    assert image_entrypoint() == ["clobjob"]
    assert "[embedded]" not in DOCKERFILE
    for label in ("title", "description", "version"):
        assert f"org.opencontainers.image.{label}=" in DOCKERFILE


def test_dockerignore_sends_only_what_the_build_copies():
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE, re.MULTILINE) + ["README.md"])
    allowed = {line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied == allowed
