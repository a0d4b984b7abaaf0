"""Exceptions every room may raise, each with the process exit code it maps to and what a retry can do."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # runtime failure: retry the index
EXIT_BAD_INPUT = 2  # configuration or input error: do not retry
EXIT_SIGTERM = 143  # stopped by SIGTERM after checkpointing


class ClobjobError(Exception):
    """Base error; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class BadInput(ClobjobError):
    """Bad configuration or input (a file, an id, a flag): the message names the offending value."""

    exit_code = EXIT_BAD_INPUT


class SourceError(ClobjobError):
    """A data source answered in a way no retry can fix (permanent query error, schema drift)."""

    exit_code = EXIT_BAD_INPUT


class TransientSourceError(ClobjobError):
    """A data source failed in a way a retry may fix (throttled, 5xx, timeout, garbled body)."""

    exit_code = EXIT_FAILED


class StoreUnreachable(ClobjobError):
    """ClickHouse could not be reached for longer than the outage budget: the shard fails (its units keep their
    checkpoints and resume when the index runs again)."""

    exit_code = EXIT_FAILED


class UnitFailed(ClobjobError):
    """A unit fails at once, without retrying it: no retry can help it (the source cannot serve it, a bad
    value, a cursor that does not advance, rows a failed flush lost), but the shard's other units go on."""

    exit_code = EXIT_FAILED


class BadFill(UnitFailed):
    """A fill row outside the storage contract (``models.check_fills``): the message names the field, the
    value (escaped, truncated) and its place; the page is not stored and the unit's checkpoint stays before it."""


def describe(exc: BaseException) -> str:
    """A one-line reason for a unit's last error."""
    if isinstance(exc, TimeoutError):  # asyncio.wait_for's timeout (asyncio.TimeoutError is TimeoutError)
        return "stalled: no page within the stall timeout"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]
