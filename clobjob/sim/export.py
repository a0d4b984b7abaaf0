"""Write a dataset's market universe and its every fill as JSON lines (the ground truth for tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clobjob.sim.data import DatasetOptions


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(partial, path)


def export(out_dir: str | Path, **options: Any) -> tuple[Path, Path]:
    """Write ``markets.jsonl`` (Gamma shape) and ``truth.jsonl`` (every fill) of the dataset ``options``
    (``DatasetOptions`` fields) describe; byte-identical per options."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = DatasetOptions(**options).generate()
    paths = out / "markets.jsonl", out / "truth.jsonl"
    _write_jsonl(paths[0], ds.markets)
    _write_jsonl(paths[1], ds.iter_truth())
    return paths
