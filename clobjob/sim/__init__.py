"""A faithful local simulator of the Goldsky-hosted Polymarket orderbook subgraph.

``Dataset.generate`` builds a deterministic market universe and its fills; ``SimServer`` serves it over
HTTP as graph-node would, with Goldsky's throttling and configurable faults (``SimConfig``/``Profile``);
``export`` writes the ground truth; ``serve`` runs a server until stopped (``clobjob sim serve``).
"""

from clobjob.sim.data import Dataset
from clobjob.sim.export import export
from clobjob.sim.faults import Profile, SimConfig
from clobjob.sim.server import SimServer, serve

__all__ = ["Dataset", "Profile", "SimConfig", "SimServer", "export", "serve"]
