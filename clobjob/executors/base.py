"""The executor interface: how a run's shards are run, and the rules of a Kubernetes Indexed Job, stated once.

A run's shards are the completion indexes 0..shards-1 of one Indexed Job. Each index runs
``clobjob worker --run-id R`` with ``JOB_COMPLETION_INDEX`` set to the index, and ends with an exit code:

- 0: the shard is complete;
- 1, or killed by a signal (reported as 128 + signal: 137 for SIGKILL or an OOM kill): the index is retried,
  with a doubling delay, up to ``backoff_limit_per_index`` times (``backoffLimitPerIndex``), while the other
  indexes go on;
- 2: bad configuration or input, which no retry can fix: the whole run fails (``podFailurePolicy: FailJob``);
- 143: stopped after checkpointing (SIGTERM); the run resumes from its checkpoints when launched again.

A rerun (``clobjob rerun``) is a new run of an earlier run's units, launched like any other run. Two
implementations: ``executors.local`` (tasks or processes on this machine) and ``executors.kubernetes``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Protocol

from clobjob.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, BadInput
from clobjob.models import Run


def pod_exit_code(returncode: int) -> int:
    """A process's return code as a pod reports it: killed by signal N (a negative code) → 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def retryable(exit_code: int) -> bool:
    """Whether an index that ended with ``exit_code`` is retried (unless the whole run is stopping): every
    failure or kill, not a success or bad input."""
    return exit_code not in (EXIT_OK, EXIT_BAD_INPUT)


@dataclass
class IndexOutcome:
    """How one completion index ended: its last exit code (None: not ended) and how many times it ran."""

    shard: int
    exit_code: int | None = None
    runs: int = 0


@dataclass
class JobOutcome:
    """The run's result as an Indexed Job reports it."""

    indexes: dict[int, IndexOutcome] = field(default_factory=dict)

    @property
    def completed(self) -> list[int]:
        """Indexes that completed."""
        return sorted(s for s, o in self.indexes.items() if o.exit_code == EXIT_OK)

    @property
    def failed(self) -> list[int]:
        """Indexes that failed (not completed, not stopped, not still running)."""
        return sorted(s for s, o in self.indexes.items() if o.exit_code not in (EXIT_OK, EXIT_SIGTERM, None))

    @property
    def exit_code(self) -> int:
        """0 all indexes complete; 2 the job failed on bad input; 143 stopped; 1 some index failed."""
        codes = {o.exit_code for o in self.indexes.values()}
        if EXIT_BAD_INPUT in codes:
            return EXIT_BAD_INPUT
        if EXIT_SIGTERM in codes or None in codes:
            return EXIT_SIGTERM
        return EXIT_FAILED if self.failed else EXIT_OK


class Executor(Protocol):
    """Runs the shards of a run (a rerun is a run too) and reports how each index ended."""

    async def launch(self, run: Run, *, parallelism: int, stop: asyncio.Event) -> JobOutcome:
        """Run (local: to the end) or start (Kubernetes: the Job) every shard of ``run``, at most
        ``parallelism`` at once; ``stop`` ends every index after its checkpoint."""
        ...


def shard_from_env(shard: int | None) -> int:
    """The shard to work: ``--shard`` if given, else ``JOB_COMPLETION_INDEX`` (set by the Indexed Job)."""
    if shard is not None:
        return shard
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None:
        raise BadInput("no shard: pass --shard or set JOB_COMPLETION_INDEX")
    try:
        return int(raw)
    except ValueError:
        raise BadInput(f"JOB_COMPLETION_INDEX={raw!r} is not an integer") from None
