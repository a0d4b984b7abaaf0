"""Executors: run every shard of a run locally (``local``) or as a Kubernetes Indexed Job (later)."""
