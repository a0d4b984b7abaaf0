"""A run's progress in its unit of work — fills stored out of the fills expected — with the measured rates
and the ETA of the remaining expected fills, for the progress line of ``backfill``/``rerun`` and the live
status ``clobjob status`` shows in a second terminal.

``progress`` JSON (the ``progress`` key of a live status, and of each JSON progress log line): ``fills,
expected_fills, done_share`` (fills ÷ expected, at most 1), ``remaining_fills`` (expected fills not yet stored,
over shards not done), ``requests, throttled, errors`` (totals of this process's requests; ``errors`` null when
unknown), ``share_429, share_errors`` (of the requests since the previous sample), ``fills_per_s, rps``
(over the last samples), ``eta_s`` (remaining ÷ fills_per_s; null when nothing is being stored),
``retries`` (request and index retries so far), ``last_error`` (an error of a unit not done: that of the
highest shard with one), ``retrying`` (shards waiting to be retried).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clobjob.models import RunState


@dataclass(frozen=True)
class Requests:
    """Request totals of the processes doing a run (``errors`` None when not known)."""

    requests: int = 0
    throttled: int = 0
    errors: int | None = None
    retries: int = 0


class ProgressMeter:
    """Turns successive run statuses into ``progress`` (module docstring); rates over the last ``window``
    samples."""

    def __init__(self, window: int = 12, clock: Callable[[], float] = time.monotonic) -> None:
        self._samples: deque[tuple[float, int, Requests]] = deque(maxlen=window)
        self._clock = clock

    def update(self, status: Mapping[str, Any], requests: Requests, retrying: Sequence[int] = ()) -> dict[str, Any]:
        """The progress of ``status`` (a ``run_status``) with these request totals, as JSON-able dict."""
        agg, now = status["aggregate"], self._clock()
        fills, expected = agg["fills"], agg["expected_fills"]
        remaining = sum(max(s["expected_fills"] - s["fills"], 0) for s in status["shards"]
                        if s["state"] != RunState.DONE)
        previous = self._samples[-1][2] if self._samples else Requests()
        self._samples.append((now, fills, requests))
        first_at, first_fills, first = self._samples[0]
        elapsed = now - first_at
        fills_per_s = (fills - first_fills) / elapsed if elapsed > 0 else 0.0
        rps = (requests.requests - first.requests) / elapsed if elapsed > 0 else 0.0
        new_requests = requests.requests - previous.requests
        errors = None if requests.errors is None else requests.errors - (previous.errors or 0)
        errors_at = [s["last_error"] for s in status["shards"] if s["state"] != RunState.DONE and s["last_error"]]
        return {
            "fills": fills, "expected_fills": expected,
            "done_share": min(fills / expected, 1.0) if expected else (1.0 if status["state"] == "done" else 0.0),
            "remaining_fills": remaining, "requests": requests.requests, "throttled": requests.throttled,
            "errors": requests.errors,
            "share_429": (requests.throttled - previous.throttled) / new_requests if new_requests > 0 else 0.0,
            "share_errors": None if errors is None else (errors / new_requests if new_requests > 0 else 0.0),
            "fills_per_s": round(max(fills_per_s, 0.0), 1), "rps": round(max(rps, 0.0), 2),
            "eta_s": 0.0 if remaining == 0 else round(remaining / fills_per_s, 1) if fills_per_s > 0 else None,
            "retries": requests.retries, "last_error": errors_at[-1] if errors_at else "",
            "retrying": list(retrying),
        }
