"""The one interface every fill source implements (subgraph for v1 fills, Polygon RPC logs for v2).

A source turns a ``WorkUnit`` into a stream of ``Page`` s. Each page carries fills (columns in
``FILL_COLUMNS`` order, identifiers normalised) and the cursor to resume *after* that page; the worker
stores the fills first and the cursor second, so a resumed unit never skips a fill. Cursors are opaque
strings that only the source that made them reads back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clobjob.errors import BadInput
from clobjob.models import WorkUnit


@dataclass(frozen=True)
class Page:
    """One fetched page: its fills as columns (one sequence per ``FILL_COLUMNS`` field, or none for no fills:
    the table, the buffer and the checks are all columnar), the cursor after it, whether the unit is finished,
    and when its request was made (``time.monotonic()``; None when the source does not say)."""

    columns: Sequence[Sequence[Any]]
    cursor: str
    done: bool
    requested_at: float | None = None

    @classmethod
    def of_rows(cls, rows: Sequence[tuple[Any, ...]], cursor: str, done: bool,
                requested_at: float | None = None) -> Page:
        """A page of fill rows (tuples in ``FILL_COLUMNS`` order)."""
        return cls(tuple(map(list, zip(*rows))), cursor, done, requested_at)

    @property
    def size(self) -> int:
        """Its fills."""
        return len(self.columns[0]) if self.columns else 0

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        """Its fills as rows (tuples in ``FILL_COLUMNS`` order)."""
        return list(zip(*self.columns))


class Lanes(Protocol):
    """How many requests one unit may have in flight at once, asked by a source that can page a unit's ranges
    concurrently. ``active`` is kept by the source: the unit's lanes (one request each) right now."""

    active: int

    def may_add(self, pages: float) -> bool:
        """Whether the unit may open one more lane, worth about ``pages`` pages (0: it has nothing worth one)."""
        ...


class FillSource(Protocol):
    """A pluggable source of fills (``clobjob.sources.subgraph``, later ``clobjob.sources.rpc``)."""

    name: str

    def pages(self, unit: WorkUnit, cursor: str, conditions: Mapping[str, str],
              lanes: Lanes | None = None) -> AsyncIterator[Page]:
        """Pages of ``unit`` resuming after ``cursor`` ("" = from the start).

        ``conditions`` maps token id → condition id for the fills' ``condition_id`` column. With ``lanes`` the
        source may page parts of the unit concurrently, as far as ``lanes`` allows; every page's cursor then
        covers the whole unit and claims only what was yielded before it.
        """
        ...

    def check_cursor(self, unit: WorkUnit, cursor: str) -> None:
        """Raise ``SourceError`` naming the value unless ``cursor`` is one this source made for ``unit``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class SourcesByUnit:
    """One ``FillSource`` over several: each unit is paged by the source its ``WorkUnit.source`` names (a run of
    both v1 market units and v2 block units)."""

    name = "all"

    def __init__(self, sources: Mapping[str, FillSource]) -> None:
        self.sources = dict(sources)

    def pages(self, unit: WorkUnit, cursor: str, conditions: Mapping[str, str],
              lanes: Lanes | None = None) -> AsyncIterator[Page]:
        """The pages of ``unit`` from the source it names."""
        source = self.sources.get(unit.source)
        if source is None:
            raise BadInput(f"unit {unit.unit_id} of run {unit.run_id} names source {unit.source!r}; this run reads "
                           f"{', '.join(sorted(self.sources))}")
        return source.pages(unit, cursor, conditions, lanes)

    def check_cursor(self, unit: WorkUnit, cursor: str) -> None:
        """Checked by the source the unit names."""
        source = self.sources.get(unit.source)
        if source is not None:
            source.check_cursor(unit, cursor)

    async def close(self) -> None:
        """Release every source's connections."""
        for source in self.sources.values():
            await source.close()
