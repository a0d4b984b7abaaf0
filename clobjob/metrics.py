"""Optional Prometheus endpoint: ``GET /metrics`` in the text exposition format 0.0.4.

Each registered source is a label set (``run_id``, ``shard``) and a ``collect()`` returning
``{name: value}``; names are exported as ``clobjob_<name>``, a name ending in ``_total`` as a counter,
anything else as a gauge. One process may register one source per shard it runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType

from aiohttp import web

Collect = Callable[[], Mapping[str, float]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "clobjob_"
HELP = {
    "fills_total": "Fills fetched and stored",
    "requests_total": "Requests sent to the data source",
    "throttled_total": "Requests the data source throttled (HTTP 429 or equivalent)",
    "rate_limit_rps": "Current request rate allowed by the adaptive controller (requests/s)",
    "rps": "Measured request rate (requests/s)",
    "in_flight": "Requests in flight",
    "heartbeat_age_seconds": "Seconds since the shard's last stored heartbeat",
}
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def exposition(samples: Iterable[tuple[Mapping[str, str], Mapping[str, float]]]) -> str:
    """The text format for (labels, values) pairs: one HELP/TYPE header per metric, its samples below it."""
    families: dict[str, list[str]] = {}
    for labels, values in samples:
        for name, value in values.items():
            if not _NAME.match(name):
                raise ValueError(f"bad metric name {name!r}")
            families.setdefault(name, []).append(f"{PREFIX}{name}{_labels(labels)} {_number(value)}")
    lines = []
    for name, rows in families.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {PREFIX}{name} {HELP.get(name, name.replace('_', ' '))}",
                  f"# TYPE {PREFIX}{name} {kind}", *rows]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """An aiohttp server for ``/metrics`` while the ``async with`` block runs (port 0 = any free port)."""

    def __init__(self, port: int, host: str = "0.0.0.0", collect: Collect | None = None,
                 labels: Mapping[str, str | int] | None = None) -> None:
        self.host, self.port = host, port
        self._sources: list[tuple[dict[str, str], Collect]] = []
        self._runner: web.AppRunner | None = None
        if collect is not None:
            self.add(collect, labels or {})

    def add(self, collect: Collect, labels: Mapping[str, str | int]) -> None:
        """Register one more source (e.g. another shard of this process) under its own labels; a source
        with the same labels (a retried shard) replaces the earlier one."""
        bad = [k for k in labels if not _LABEL.match(k)]
        if bad:
            raise ValueError(f"bad label name(s) {bad}")
        named = {k: str(v) for k, v in labels.items()}
        self._sources = [(known, source) for known, source in self._sources if known != named]
        self._sources.append((named, collect))

    async def _metrics(self, request: web.Request) -> web.Response:
        body = exposition((labels, collect()) for labels, collect in self._sources)
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def __aenter__(self) -> "MetricsServer":
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
