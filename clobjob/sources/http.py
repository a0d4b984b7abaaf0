"""The HTTP session every source sends through: one aiohttp session per source, its connections sized to the
process's rate-controller window, each attempt cut at the timeout ``ratelimit.controlled_request`` gives it.

``send`` returns the raw answer (status, headers, body); a timeout or a connection error raises ``Retryable``
(``failed``: no answer, retried). Each source parses the answer itself, and ``request`` wraps one send in the
rate-controlled retries for sources that need nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar

import aiohttp

from clobjob.ratelimit import AdaptiveRateController, Retryable, controlled_request

T = TypeVar("T")
Answer = tuple[int, Mapping[str, str], bytes]
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class HttpSession:
    """A source's connections: lazily opened, sized to ``controller``'s window, closed with ``close``."""

    def __init__(self, controller: AdaptiveRateController, request_timeout_s: float,
                 headers: Mapping[str, str] | None = None) -> None:
        self.controller = controller
        self.request_timeout_s = request_timeout_s
        self._headers = dict(headers or JSON_HEADERS)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.controller.max_window, limit_per_host=0,
                                             enable_cleanup_closed=True)
            timeout = aiohttp.ClientTimeout(total=self.request_timeout_s,
                                            connect=min(self.request_timeout_s, 10.0),
                                            sock_read=self.request_timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._headers)
        return self._session

    async def send(self, method: str, url: str, timeout_s: float, **kwargs: Any) -> Answer:
        """One attempt: the answer's status, headers and body; ``Retryable`` when none came in ``timeout_s``."""
        try:
            async with self._client().request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                              **kwargs) as response:
                return response.status, response.headers, await response.read()
        except asyncio.TimeoutError:
            raise Retryable(f"timed out after {timeout_s:.3g}s", "failed") from None
        except aiohttp.ClientError as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}", "failed") from None

    async def request(self, what: str, method: str, url: str, parse: Callable[[int, Mapping[str, str], bytes], T],
                      *, max_attempts: int, **kwargs: Any) -> T:
        """``parse(status, headers, body)`` of the answer, retried through the controller (``parse`` raises
        ``Retryable`` for an answer worth retrying)."""

        async def attempt(_permit: Any, timeout_s: float) -> T:
            return parse(*await self.send(method, url, timeout_s, **kwargs))

        return await controlled_request(self.controller, attempt, what=what, max_attempts=max_attempts,
                                        timeout_s=self.request_timeout_s)

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class OverHttp:
    """What a source sending through one ``HttpSession`` (``self._http``) shares: closing it, ``async with``."""

    _http: HttpSession

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._http.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
