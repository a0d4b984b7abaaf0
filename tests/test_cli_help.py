"""Help that teaches (every command and option described, defaults shown, no implementation words),
``--version``, and good behaviour in pipes (a closed pipe is no error; errors are human text)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from clobjob import __version__
from clobjob.cli import build_parser
from tests.terminal import REPO

IMPLEMENTATION_WORDS = re.compile(r"marketDatas|orderbooks\)|Indexed Job completions|clobjob/|\.py\b|Thin:")


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser), the top level included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


ALL = list(commands(build_parser()))


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[" ".join(p) or "clobjob" for p, _ in ALL])
def test_every_command_and_option_is_described(path, parser):
    assert parser.description and not IMPLEMENTATION_WORDS.search(parser.description)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help and not IMPLEMENTATION_WORDS.search(choice.help), choice.dest
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"{' '.join(path)} {name} has no help"
        assert not IMPLEMENTATION_WORDS.search(action.help), f"{' '.join(path)} {name}: {action.help}"
    text = parser.format_help()
    for action in parser._actions:  # a meaningful default is shown
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and action.dest != "help":
            assert f"(default: {action.default})" in text.replace("\n", " ").replace("  ", " ") or \
                f"default: {action.default}" in " ".join(text.split()), f"{' '.join(path)} {action.dest}"


def test_settings_diagnose_recommends_have_flags_beside_their_environment_variables():
    for path in (("backfill",), ("worker",), ("rerun",)):
        parser = dict(ALL)[path]
        text = " ".join(parser.format_help().split())
        for flag, env in (("--max-in-flight", "CLOBJOB_MAX_IN_FLIGHT"), ("--batch-rows", "CLOBJOB_BATCH_ROWS"),
                          ("--max-rps", "CLOBJOB_MAX_RPS")):
            assert flag in text and env in text, (path, flag)
    assert "--max-in-flight" in dict(ALL)[("diagnose",)].format_help()


def test_flags_override_the_settings(monkeypatch):
    from clobjob import cli

    args = build_parser().parse_args(["backfill", "--max-in-flight", "3", "--batch-rows", "500", "--max-rps", "7"])
    settings = cli._settings(args)
    assert (settings.max_in_flight, settings.batch_rows, settings.max_rps) == (3, 500, 7.0)
    fetching = [path for path, parser in ALL if "--subgraph-url" in parser.format_help()]
    assert {("diagnose",), ("plan",), ("worker",), ("backfill",), ("rerun",), ("markets", "sync")} <= set(fetching)
    required = {("worker",): ["--run-id", "r"], ("rerun",): ["--run-id", "r"], ("plan",): ["--shards", "1"]}
    for path in fetching:  # every command that fetches takes its source from the flag
        args = build_parser().parse_args([*path, *required.get(path, []), "--subgraph-url", "http://127.0.0.1:9/gql"])
        assert cli._settings(args).subgraph_url == "http://127.0.0.1:9/gql", path
    with pytest.raises(SystemExit) as bad:
        build_parser().parse_args(["backfill", "--max-in-flight", "0"])
    assert bad.value.code == 2


def clobjob(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clobjob", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env, **kwargs)


def test_version_prints_the_package_version():
    shown = clobjob("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"clobjob {__version__}"


@pytest.fixture
def env(tmp_path):
    import os

    return {**os.environ, "CLOBJOB_HOME": str(tmp_path / "home"), "CLOBJOB_CLICKHOUSE_URL": f"chdb://{tmp_path}/db"}


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("verify",), ("--help",)])
def test_a_closed_pipe_is_no_error(env, command):
    process = subprocess.Popen([sys.executable, "-m", "clobjob", *command], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before anything is written: every write fails with EPIPE
    err = process.stderr.read()
    assert process.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_status_piped_into_head(env):
    shown = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m clobjob status | head -1"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout == "no run yet\n" and "Traceback" not in shown.stderr


def test_one_shot_errors_are_human_text_off_a_terminal(env):
    shown = clobjob("status", "--run-id", "nope", env=env)
    assert shown.returncode == 2 and shown.stderr.strip().endswith("no run 'nope' in the database")
    assert not shown.stderr.lstrip().startswith("{")
    forced = clobjob("--log-format", "json", "status", "--run-id", "nope", env=env)
    assert forced.returncode == 2 and forced.stderr.lstrip().startswith("{")
