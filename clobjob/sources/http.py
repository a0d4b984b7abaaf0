"""One rate-controlled HTTP request with retries, the way every source sends them.

A request waits for a permit of the process's ``AdaptiveRateController``; each attempt is cut after
max(5 s, 10 smoothed latencies), doubled at each retry up to ``request_timeout_s``; the answer's parser
returns the result or raises ``Retry`` (with the verdict the controller is told), and any other exception
it raises means "answered" (the request, not the rate, is at fault). A timeout or a connection error is a
``lost`` permit. Retries wait the controller's jittered backoff and its retry budget (which delays them, never
drops them); after ``max_attempts`` tries ``TransientSourceError`` carries the last reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp
from loguru import logger

from clobjob.errors import TransientSourceError
from clobjob.ratelimit import AdaptiveRateController

MAX_ATTEMPTS = 8
MIN_ATTEMPT_TIMEOUT_S = 5.0  # a first attempt may take at least this long …
LATENCY_TIMEOUTS = 10.0  # … or this many smoothed latencies

T = TypeVar("T")
Parser = Callable[[int, Mapping[str, str], bytes], T]


class Retry(Exception):
    """A retryable answer; ``verdict`` is what the controller is told: throttled, overloaded or failed."""

    def __init__(self, reason: str, verdict: str = "failed", retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.verdict, self.retry_after = verdict, retry_after


class RateControlledHttp:
    """An aiohttp session whose every request goes through one shared rate controller."""

    def __init__(self, name: str, controller: AdaptiveRateController, request_timeout_s: float,
                 headers: Mapping[str, str] | None = None, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.name = name
        self.controller = controller
        self.max_attempts = max_attempts
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=min(request_timeout_s, 10.0),
                                              sock_read=request_timeout_s)
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.controller.max_window, limit_per_host=0,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  headers=self._headers)
        return self._session

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def attempt_timeout(self, attempt: int) -> float:
        """Seconds attempt ``attempt`` (1 = first) may take."""
        latency = self.controller.snapshot().latency_s or 1.0
        first = max(MIN_ATTEMPT_TIMEOUT_S, LATENCY_TIMEOUTS * latency)
        return min(self._timeout.total or first, first * 2 ** (attempt - 1))

    async def request(self, method: str, url: str, parse: Parser[T], **kwargs: Any) -> T:
        """``parse(status, headers, body)`` of the answer to ``method url`` (aiohttp ``kwargs``), retried."""
        reason = ""
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.controller.backoff(attempt - 1))
                while not self.controller.allow_retry():
                    await asyncio.sleep(self.controller.backoff(attempt - 1))
            try:
                return await self._attempt(method, url, parse, self.attempt_timeout(attempt), kwargs)
            except Retry as retry:
                reason = str(retry)
                logger.debug("{} retry {}/{}: {}", self.name, attempt, self.max_attempts, reason)
        raise TransientSourceError(f"{self.name}: gave up after {self.max_attempts} attempts: {reason}")

    async def _attempt(self, method: str, url: str, parse: Parser[T], timeout_s: float,
                       kwargs: dict[str, Any]) -> T:
        async with self.controller.slot() as permit:
            try:
                async with self._client().request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                                  **kwargs) as response:
                    body = await response.read()
                    status, headers = response.status, response.headers
            except TimeoutError:  # no answer: the permit is lost (the window shrinks)
                raise Retry(f"timed out after {timeout_s:.3g}s") from None
            except aiohttp.ClientError as exc:
                raise Retry(f"{type(exc).__name__}: {exc}") from None
            try:
                result = parse(status, headers, body)
            except Retry as retry:
                if retry.verdict == "throttled":
                    permit.throttled(retry.retry_after)
                elif retry.verdict == "overloaded":
                    permit.overloaded()
                else:
                    permit.failed()
                raise
            except Exception:
                permit.success()
                raise
            permit.success()
            return result
