"""The streaming JSON reader (``models.json_rows``) on the inputs that were slow: a 6,000-market Gamma export as
an array and as JSONL, 30,000 condition ids as ``diagnose --out`` writes them, and 100 MB of junk arrays.

Each case runs in a fresh process and prints its wall time, its outcome and the process's peak RSS, so memory
shows whether the reader holds the file or one element. Run: ``python bench/json_reader.py``.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def write_inputs(folder: Path) -> None:
    from clobjob.sim import Dataset

    markets = Dataset.generate(markets=6000, seed=7).markets
    files = {"gamma.json": json.dumps(markets, indent=2), "gamma.jsonl": "\n".join(map(json.dumps, markets)),
             "ids.json": json.dumps([f"0x{random.Random(n).getrandbits(256):064x}" for n in range(30_000)], indent=1)}
    for name, text in files.items():
        (folder / name).write_text(text)
    rng = random.Random(1)
    with open(folder / "junk-bytes.json", "w") as out:  # an array that is not JSON after its first bytes
        out.write("[")
        for _ in range(100):
            out.write("".join(rng.choices(string.printable, k=MB)))
    element = json.dumps({"junk": "x" * 40}) + ",\n"
    with open(folder / "junk-objects.json", "w") as out:  # valid JSON, but no market in it
        out.write("[" + element * (100 * MB // len(element)) + "{}]")
    element = '"0x1234",\n'
    with open(folder / "junk-ids.json", "w") as out:  # valid JSON, but no condition id in it
        out.write("[" + element * (100 * MB // len(element)) + '"0x1"]')


CASE = """
import resource, sys, time
from clobjob.errors import BadInput
kind, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
try:
    if kind == "markets":
        from clobjob.sources.markets import read_gamma_file
        markets, bad = read_gamma_file(path)
        outcome = f"{len(markets):,} markets, {len(bad):,} bad rows"
    else:
        from clobjob.plan import read_condition_ids
        outcome = f"{len(read_condition_ids(path)):,} ids"
except BadInput as exc:
    outcome = "exit 2: " + str(exc)[:110]
elapsed = time.perf_counter() - start
print(f"{elapsed:.2f}|{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}|{outcome}")
"""


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="clobjob-bench-json-") as folder:
        # written by a child, so that this process (whose peak RSS every case inherits at exec) stays small
        subprocess.run([sys.executable, __file__, "--write", folder], check=True)
        files = {p.name: p for p in Path(folder).iterdir()}
        cases = [("markets", "gamma.json"), ("markets", "gamma.jsonl"), ("ids", "ids.json"),
                 ("markets", "junk-bytes.json"), ("markets", "junk-objects.json"), ("ids", "junk-ids.json")]
        print(f"{'input':<18} {'size MB':>8} {'reader':<8} {'seconds':>8} {'peak RSS MB':>12}  outcome")
        for kind, name in cases:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CASE, kind, str(files[name])], capture_output=True,
                                  text=True, timeout=600, env=os.environ)
            seconds, rss, outcome = (done.stdout.strip() or f"{time.perf_counter() - started:.2f}|?|"
                                     + done.stderr[-200:]).split("|", 2)
            print(f"{name:<18} {files[name].stat().st_size / MB:>8.1f} {kind:<8} {seconds:>8} {rss:>12}  {outcome}")
        done = subprocess.run([sys.executable, "-c", "import resource, clobjob.plan, clobjob.sources.markets; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"],
                              capture_output=True, text=True, check=True)
        print(f"(the same process reading nothing: {done.stdout.strip()} MB)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_inputs(Path(sys.argv[2]))
    else:
        main()
