"""What reaches a terminal or a log: one JSON object per line off a TTY (Kubernetes), human lines on a TTY;
every line redacted of the configured secrets; data shown to a terminal through ``printable``.

Every line carries ``run_id`` and ``shard`` (bound with ``logger.bind`` or ``logger.contextualize``).
"""

from __future__ import annotations

import json
import re
import sys
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
    sys.stderr.write(json.dumps(line, default=str) + "\n")


def _human_line(message: Any) -> None:
    sys.stderr.write(_redact(str(message)))  # the message is clean (``_prepare``); this covers a traceback


HUMAN_FORMAT = ("<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
                "<cyan>{extra[run_id]}{extra[shard_tag]}</cyan> {message}")


def setup_logging(log_format: str = "auto", level: str = "INFO", redact: Callable[[str], str] = str) -> None:
    """Route loguru to stderr in the chosen format (``auto`` = human on a TTY, JSON otherwise); ``redact``
    (``Settings.redact``) is applied to every message before it is written."""
    global _redact
    _redact = redact
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    logger.remove()
    logger.configure(extra={"run_id": "", "shard": None}, patcher=_prepare)
    if use_json:
        logger.add(_json_line, level=level, format="{message}")
    else:
        logger.add(_human_line, level=level, format=HUMAN_FORMAT, colorize=sys.stderr.isatty())


def _prepare(record: Any) -> None:
    """Redact the message, escape control characters in each of its lines, tag the shard."""
    record["message"] = "\n".join(printable(line) for line in _redact(record["message"]).split("\n"))
    shard = record["extra"].get("shard")
    record["extra"]["shard_tag"] = f"/{shard}" if shard is not None else ""
