"""Data sources: the Goldsky subgraph (v1 fills), Polygon RPC logs (v2 fills) and the market universe."""
