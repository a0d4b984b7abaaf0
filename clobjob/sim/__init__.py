"""A faithful local simulator of the Goldsky-hosted Polymarket orderbook subgraph and of Gamma's market listing.

``DatasetOptions.generate`` (``Dataset.generate``) builds a deterministic market universe and its fills;
``SimServer`` serves it over HTTP as graph-node would, with Goldsky's throttling, configurable faults and
service times (``SimConfig``/``Profile``), and its markets as Gamma's ``/markets`` lists them; ``export`` writes
the ground truth; ``serve`` runs a server until stopped (``clobjob sim serve``).
"""

from clobjob.sim.data import Dataset, DatasetOptions
from clobjob.sim.export import export
from clobjob.sim.faults import Profile, SimConfig
from clobjob.sim.server import SimServer, serve

__all__ = ["Dataset", "DatasetOptions", "Profile", "SimConfig", "SimServer", "export", "serve"]
