"""The parts one clobjob process fetches with, built in one place: its rate controller (one per process:
every request of the process goes through it), its source with the source's HTTP session, its store writer
(one insert stream and one bounded buffer, flushed on a timer), its optional Prometheus endpoint, and its
stop signal. A worker pod, the local executor's in-process shards and diagnose's live probe all get their
parts here, so they behave the same."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from loguru import logger

from clobjob.config import Settings
from clobjob.metrics import MetricsServer
from clobjob.ratelimit import AdaptiveRateController
from clobjob.sources import open_source
from clobjob.sources.base import FillSource
from clobjob.store import Store
from clobjob.store.writer import StoreWriter

GC_YOUNG_OBJECTS = 50_000
"""Container objects allocated, net, before the collector looks at the young ones (Python's default is 700).

A page is a thousand row tuples that live on in the buffer: at the default, a 100 req/s worker ran 5,557
young and 18 full collections in 13.5 s of CPU, 1.8 s of it collecting. Fifty pages between collections
cost it 0.2 s; reference cycles (tasks, exceptions) are still collected, a little later."""


def make_controller(settings: Settings) -> AdaptiveRateController:
    """The process's one rate controller, from the settings."""
    return AdaptiveRateController(initial_rps=settings.initial_rps, max_rps=settings.max_rps,
                                  max_window=settings.max_in_flight)


@dataclass
class Parts:
    """What a fetching process works with (``writer`` is None when it stores nothing, as diagnose's probe)."""

    settings: Settings
    controller: AdaptiveRateController
    source: FillSource
    writer: StoreWriter | None
    metrics: MetricsServer | None


@asynccontextmanager
async def process_parts(settings: Settings, source_name: str, store: Store | None = None) -> AsyncIterator[Parts]:
    """Build the process's parts; on exit flush what is buffered, then close the writer and the source. From then on
    the process's garbage collector waits for ``GC_YOUNG_OBJECTS``."""
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    controller = make_controller(settings)
    source = open_source(source_name, settings, controller)
    writer = StoreWriter.for_settings(store, settings) if store is not None else None
    flushing = asyncio.create_task(writer.flush_every(settings.flush_interval_s)) if writer else None
    try:
        async with metrics_server(settings) as metrics:
            yield Parts(settings, controller, source, writer, metrics)
    finally:
        if flushing is not None:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
        if writer is not None:
            try:
                await writer.flush()
            finally:
                writer.close()
        await source.close()


@asynccontextmanager
async def metrics_server(settings: Settings) -> AsyncIterator[MetricsServer | None]:
    """The optional Prometheus endpoint (``CLOBJOB_METRICS_PORT``), or None when it is off."""
    if settings.metrics_port is None:
        yield None
        return
    async with MetricsServer(settings.metrics_port) as server:
        logger.info("Prometheus metrics on :{}/metrics", server.port)
        yield server


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM or a first Ctrl+C sets ``stop`` (flush, checkpoint, state ``stopped``, exit 143); a second Ctrl+C
    exits at once (130; the checkpoints already written stay valid)."""
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            if name == "SIGINT":
                os._exit(130)
            return
        again = " (Ctrl+C again to exit at once)" if name == "SIGINT" else ""
        logger.warning("{}: stopping — flushing and checkpointing{}", name, again)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_signal, "SIGINT")


class StopBetweenRuns:
    """For a loop of runs (``backfill --follow``): SIGTERM or a first Ctrl+C outside a run sets ``requested``; a
    second Ctrl+C exits at once (130). Inside a run its own handlers (``install_stop_handlers``) stop it; its event
    loop puts the default handlers back when it closes, so ``arm`` again after every run."""

    def __init__(self) -> None:
        self.requested = False

    def arm(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            os._exit(130)
        if not self.requested:
            logger.warning("{}: stopping after the current step (Ctrl+C again to exit at once)",
                           signal.Signals(signum).name)
        self.requested = True

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` unless a stop is requested first; True when one was."""
        until = time.monotonic() + seconds
        while not self.requested and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
        return self.requested
