"""Waiting out a ClickHouse server that cannot be reached (a connection error, not a refused statement): the same
budget and backoff for opening the store and for every later store call."""

from __future__ import annotations

import random
import time

from loguru import logger

from clobjob.errors import StoreUnreachable

RETRY_BASE_S, RETRY_CAP_S = 0.25, 5.0  # full-jitter backoff, doubling to the cap


def reason_of(exc: BaseException) -> str:
    """The driver's error in one line (it names the host and port, never the password)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class Outage:
    """One spell of an unreachable server, from its first failed try: ``delay`` after each failure is the wait
    before the next try (full jitter, doubling to a cap, never past the budget), and once ``budget_s`` is spent
    it raises ``StoreUnreachable`` naming ``dsn`` (give the redacted one) and the last error. ``doing`` says what
    waits, for the log line of the first failure."""

    def __init__(self, budget_s: float, dsn: str, doing: str = "retrying") -> None:
        self.budget_s, self.dsn, self.doing = budget_s, dsn, doing
        self._since = time.monotonic()
        self._attempts = 0

    def delay(self, exc: BaseException) -> float:
        """Seconds to wait after the failure ``exc``; ``StoreUnreachable`` when the budget is spent."""
        self._attempts += 1
        waited, reason = time.monotonic() - self._since, reason_of(exc)
        if waited >= self.budget_s:
            raise StoreUnreachable(f"ClickHouse at {self.dsn} unreachable for {waited:.0f} s "
                                   f"(CLOBJOB_STORE_OUTAGE_S={self.budget_s:g}): {reason}")
        if self._attempts == 1:
            logger.warning("ClickHouse at {} unreachable, {} for up to {:g} s: {}", self.dsn, self.doing,
                           self.budget_s, reason)
        backoff = random.uniform(0.0, min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** min(self._attempts - 1, 30)))
        return min(backoff, max(self.budget_s - waited, 0.0))
