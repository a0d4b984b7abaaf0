"""Data sources: the Goldsky subgraph (v1 fills), Polygon RPC logs (v2 fills) and the market universe.

Every fill source implements ``clobjob.sources.base.FillSource``; ``open_source`` picks one by name.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from clobjob.errors import BadInput
from clobjob.sources import subgraph

if TYPE_CHECKING:
    from clobjob.config import Settings
    from clobjob.ratelimit import AdaptiveRateController
    from clobjob.sources.base import FillSource

SOURCES = ("subgraph", "rpc", "all")
DATA_UNTIL: dict[str, datetime] = {"subgraph": subgraph.DATA_UNTIL}
"""The newest fill each source can hold (a source absent here holds fills up to now)."""


def open_source(name: str, settings: Settings, controller: AdaptiveRateController) -> FillSource:
    """The fill source called ``name`` (a run records which one planned it)."""
    if name == "subgraph":
        return subgraph.SubgraphSource(settings, controller)
    if name == "rpc":
        from clobjob.sources.rpc import RpcSource

        return RpcSource(settings, controller)
    if name == "all":  # v1 fills from the subgraph and v2 fills from the chain, by unit
        from clobjob.sources.base import SourcesByUnit

        return SourcesByUnit({n: open_source(n, settings, controller) for n in ("subgraph", "rpc")})
    raise BadInput(f"unknown source {name!r} (known: {', '.join(SOURCES)})")
