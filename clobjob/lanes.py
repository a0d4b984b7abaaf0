"""How many requests each unit of a shard may have in flight: enough, all units together, to fill the rate
controller's Little's-law target (rate × latency), and no more, the largest remaining ranges widened first.

A source that can page parts of a unit concurrently (``sources.subgraph``) asks before each request whether
the unit may open one more lane, offering the pages the new lane would take; the answer is yes while the
shard's lanes and the process's requests are both below ``AdaptiveRateController.target_in_flight()`` and the
offer is at least ``LARGEST_SHARE`` of the largest offer of the shard's running units. Many small units need no
lanes beyond one each; one giant unit gets the whole target. Each lane's request waits for the controller with
its range's remaining pages as priority, so that the longest ranges are paged first and all end together.

A lane holds its parsed page until the worker takes it. When the worker takes pages more slowly than they come
(its CPU or the store binds), every lane would end up holding one — 230 pages, about 230 MB, in a 231-unit
shard. So no lane sends its next request while the shard's lanes hold ``MAX_HELD_PAGES``: fetching slows to the
pace the pages are stored at, and the rows wait in the writer's buffer, not in the lanes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from clobjob.ratelimit import AdaptiveRateController

LARGEST_SHARE = 0.5  # an offer below this share of the shard's largest is refused: the largest split first
MAX_HELD_PAGES = 32  # parsed pages the shard's lanes may hold waiting to be handed over (~1 MB each)


@dataclass
class UnitLanes:
    """One unit's lanes (``sources.base.Lanes``); ``active`` is kept by the source."""

    shard: ShardLanes = field(repr=False)
    active: int = 1
    offer: float = 0.0

    def may_add(self, pages: float) -> bool:
        """Whether the unit may open one more lane worth about ``pages`` pages."""
        self.offer = pages
        return self.shard.grant(pages)

    async def room(self) -> None:
        """Return once the shard's lanes hold fewer than ``MAX_HELD_PAGES`` parsed pages."""
        await self.shard.room()

    def held(self, change: int) -> None:
        """A parsed page of this unit starts (+1) or stops (-1) waiting to be handed over."""
        self.shard.held(change)


class ShardLanes:
    """The lanes of one shard's running units, granted against the controller's in-flight target."""

    def __init__(self, controller: AdaptiveRateController) -> None:
        self.controller = controller
        self._units: dict[int, UnitLanes] = {}
        self._held = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def room(self) -> None:
        """Return once the lanes hold fewer than ``MAX_HELD_PAGES`` parsed pages; lanes that had to wait go on one
        per page handed over (all at once, their answers would land together and hold that many pages again)."""
        if self._held < MAX_HELD_PAGES and not self._waiting:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # let through, then cancelled: let the next one through
                self._let_one_through()
            raise

    def held(self, change: int) -> None:
        """Parsed pages held by the lanes change by ``change``."""
        self._held += change
        if change < 0 and self._held < MAX_HELD_PAGES:
            self._let_one_through()

    def _let_one_through(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def open(self, unit_id: int) -> UnitLanes:
        """The lanes of a unit that starts."""
        return self._units.setdefault(unit_id, UnitLanes(self))

    def close(self, unit_id: int) -> None:
        """Forget a unit that ended."""
        self._units.pop(unit_id, None)

    def active(self) -> int:
        """Lanes of the shard's running units."""
        return sum(u.active for u in self._units.values())

    def grant(self, pages: float) -> bool:
        """Whether a lane worth ``pages`` pages may open now."""
        if pages <= 0:
            return False
        target = self.controller.target_in_flight()
        if self.active() >= target or self.controller.demand() >= target:
            return False
        return pages >= LARGEST_SHARE * max(u.offer for u in self._units.values())
