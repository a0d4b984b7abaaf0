"""Logging setup, and the one writer of the terminal (``TERMINAL``): every line redacted of the configured
secrets (``Settings.redact``), data shown to a terminal through ``printable``.

Format rule for ``--log-format auto`` (the default): on a terminal, human lines; off a terminal, one JSON
object per line for long-running commands (``worker``, ``backfill``, ``rerun``, ``demo``, ``db serve``,
``sim serve``: what Kubernetes and log collectors read) and human lines for one-shot commands (``status``,
``verify``, ``diagnose``, …), whose errors a person reads. ``json`` and ``human`` force a format.

Every line carries ``run_id`` and ``shard`` (bound with ``logger.bind`` or ``logger.contextualize``).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

from loguru import logger

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_redact: Callable[[str], str] = str


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, newlines, bidirectional overrides) shown as
    ``\\x1b``-style escapes, so data from a source or a file cannot drive the terminal or fake a line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


class Terminal:
    """Owns stderr on a terminal: log lines are written above the progress line, which is then redrawn, so a
    log line never breaks it. Off a terminal there is no progress line and lines pass through."""

    def __init__(self) -> None:
        self._line = ""
        self._lock = threading.Lock()

    @staticmethod
    def width() -> int:
        """Columns available for the progress line."""
        return max(shutil.get_terminal_size((100, 24)).columns - 1, 20)

    def write(self, text: str) -> None:
        """Write log text (whole lines) above the progress line."""
        with self._lock:
            if self._line:
                sys.stderr.write("\r\x1b[K" + text + self._line)
            else:
                sys.stderr.write(text)
            sys.stderr.flush()

    def show(self, line: str) -> None:
        """Draw (or redraw) the progress line in place; only on a terminal."""
        if not sys.stderr.isatty():
            return
        with self._lock:
            self._line = line[:self.width()]
            sys.stderr.write("\r\x1b[K" + self._line)
            sys.stderr.flush()

    def close(self) -> None:
        """Take the progress line off the screen (what follows, a summary, replaces it)."""
        with self._lock:
            if self._line:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
            self._line = ""


TERMINAL = Terminal()


def _json_line(message: Any) -> None:
    record = message.record
    line = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "run_id": record["extra"].get("run_id", ""),
        "shard": record["extra"].get("shard"),
    }
    line.update({k: v for k, v in record["extra"].items() if k not in line and k != "shard_tag"})
    if record["exception"] is not None:
        line["error"] = _redact(f"{record['exception'].type.__name__}: {record['exception'].value}")
    TERMINAL.write(json.dumps(line, default=str) + "\n")


def _human_line(message: Any) -> None:
    TERMINAL.write(_redact(str(message)))  # the message is clean (``_prepare``); this covers a traceback


HUMAN_FORMAT = ("<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
                "<cyan>{extra[run_id]}{extra[shard_tag]}</cyan> {message}")


def use_json(log_format: str, *, long_running: bool) -> bool:
    """Whether logs are JSON lines (module docstring)."""
    return log_format == "json" or (log_format == "auto" and long_running and not sys.stderr.isatty())


def setup_logging(log_format: str = "auto", level: str = "INFO", *, long_running: bool = True,
                  redact: Callable[[str], str] = str) -> None:
    """Route loguru to stderr in the chosen format (module docstring); ``redact`` (``Settings.redact``) is
    applied to every message before it is written."""
    global _redact
    _redact = redact
    logger.remove()
    logger.configure(extra={"run_id": "", "shard": None}, patcher=_prepare)
    if use_json(log_format, long_running=long_running):
        logger.add(_json_line, level=level, format="{message}")
    else:
        logger.add(_human_line, level=level, format=HUMAN_FORMAT, colorize=sys.stderr.isatty())


def _prepare(record: Any) -> None:
    """Redact the message, escape control characters in each of its lines, tag the shard."""
    record["message"] = "\n".join(printable(line) for line in _redact(record["message"]).split("\n"))
    shard = record["extra"].get("shard")
    record["extra"]["shard_tag"] = f"/{shard}" if shard is not None else ""
