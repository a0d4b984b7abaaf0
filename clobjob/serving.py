"""What the project's local HTTP servers (the simulator, the served embedded database) share: one aiohttp
app on ``host:port`` (port 0 = a free port), run from async code, from a background thread, or until
SIGINT/SIGTERM from the command line."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

from aiohttp import web


class LocalServer:
    """An aiohttp application served on ``host:port``; subclasses build the app and say what ``url`` is."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where clients reach the server."""
        return f"http://{self.host}:{self.port}"

    def build_app(self) -> web.Application:
        """The routes of the server."""
        raise NotImplementedError

    async def start(self) -> None:
        """Bind and serve."""
        self._runner = web.AppRunner(self.build_app(), handler_cancellation=True, shutdown_timeout=5.0,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    @contextmanager
    def run_in_thread(self) -> Iterator[Self]:
        """Serve from a background thread with its own event loop (for sync code and subprocess tests)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"clobjob-{type(self).__name__}", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result()
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def serve_until_signalled(self, banner: str) -> None:
        """Serve until SIGINT/SIGTERM: ``banner`` on stderr, then the URL alone on stdout (for scripts)."""

        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            async with self:
                print(f"{banner}; Ctrl+C to stop", file=sys.stderr, flush=True)
                print(self.url, flush=True)
                await stop.wait()

        asyncio.run(serve())
