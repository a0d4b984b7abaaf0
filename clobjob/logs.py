"""Logging setup: one JSON object per line off a TTY (Kubernetes), human lines on a TTY.

Every line carries ``run_id`` and ``shard`` (bound with ``logger.bind`` or ``logger.contextualize``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from loguru import logger


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
        line["error"] = f"{record['exception'].type.__name__}: {record['exception'].value}"
    sys.stderr.write(json.dumps(line, default=str) + "\n")


def _human_line(message: Any) -> None:
    sys.stderr.write(str(message))


HUMAN_FORMAT = ("<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
                "<cyan>{extra[run_id]}{extra[shard_tag]}</cyan> {message}")


def setup_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Route loguru to stderr in the chosen format (``auto`` = human on a TTY, JSON otherwise)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    logger.remove()
    logger.configure(extra={"run_id": "", "shard": None}, patcher=_shard_tag)
    if use_json:
        logger.add(_json_line, level=level, format="{message}")
    else:
        logger.add(_human_line, level=level, format=HUMAN_FORMAT, colorize=sys.stderr.isatty())


def _shard_tag(record: Any) -> None:
    shard = record["extra"].get("shard")
    record["extra"]["shard_tag"] = f"/{shard}" if shard is not None else ""
