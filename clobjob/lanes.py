"""How many requests each unit of a shard may have in flight: enough, all units together, to fill the rate
controller's Little's-law target (rate × latency), and no more, the largest remaining ranges widened first.

A source that can page parts of a unit concurrently (``sources.subgraph``) asks before each request whether
the unit may open one more lane, offering the pages the new lane would take; the answer is yes while the
shard's lanes and the process's requests are both below ``AdaptiveRateController.target_in_flight()`` and the
offer is at least ``LARGEST_SHARE`` of the largest offer of the shard's running units. Many small units need no
lanes beyond one each; one giant unit gets the whole target. Each lane's request waits for the controller with
its range's remaining pages as priority, so that the longest ranges are paged first and all end together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clobjob.ratelimit import AdaptiveRateController

LARGEST_SHARE = 0.5  # an offer below this share of the shard's largest is refused: the largest split first


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


class ShardLanes:
    """The lanes of one shard's running units, granted against the controller's in-flight target."""

    def __init__(self, controller: AdaptiveRateController) -> None:
        self.controller = controller
        self._units: dict[int, UnitLanes] = {}

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
