"""Fuzz the fill path from an answer's bytes to rows the store accepts, for a bounded time, and time its parse cost.

Each case is an HTTP body: a simulator page of fills with hostile mutations (a field replaced by a hostile
value, removed, or of the wrong type; the body truncated, bytes flipped, or junk). It goes through what the
worker runs on every page — ``_answer`` (protocol), ``fill_rows`` (shape), ``models.check_fills`` (storage
contract: the checks the worker runs on a page's columns, ``check_fill_columns``) — and must end in one of
the designed outcomes: retryable answer, ``SourceError`` (drift or not the protocol), ``BadFill`` (a value
out of contract), or rows. Rows that pass are checked again, row by row, by an independent slow reference of
the contract (regular expressions, plain ints); any other exception, or a disagreement with the reference,
is a failure. Hypothesis generates the cases.

Then the cost per 1,000-fill page of each step a page goes through before it is buffered — ``json.loads``,
``fill_rows``, ``check_fills``, ``FillBuffer.extend`` — best of 200 runs.

    python bench/fuzz_fills.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clobjob.errors import BadFill, SourceError
from clobjob.models import FILL_COLUMNS, FILL_TIME_AHEAD_S, FILL_TIME_MIN, check_fills
from clobjob.sim import Dataset
from clobjob.sim.engine import GraphEngine
from clobjob.sources.subgraph import _answer, _entities, _Retry, fill_rows, fills_query
from clobjob.store import FillBuffer

HEADERS = {"Content-Type": "application/json"}
HASH, ADDRESS = re.compile(r"0x[0-9a-f]{64}"), re.compile(r"0x[0-9a-f]{40}")
DECIMAL = re.compile(r"0|[1-9][0-9]*")
HOSTILE = ["1" * 100, "99999999999", "0x\ud800", "0xab'cd0_0x'; drop table clob_fills; --", "zzzz0_not hex at all",
           "'; drop table markets; --", "<script>alert(1)</script>", "-1", "0x" + "F" * 64, "", " 7", "١٢", "1e3",
           None, 7, 2**300, -5, 1.5, True, [], {}, "0" * 79, str(2**256), "\x1b[2J", "0"]


def reference_ok(row: tuple) -> bool:
    """The storage contract of one row, written plainly (the oracle for the fast column checks)."""
    v = dict(zip(FILL_COLUMNS, row))

    def text(name, pattern, optional=False):
        return type(v[name]) is str and ((optional and v[name] == "") or pattern.fullmatch(v[name]) is not None)

    def uint(name, bits):
        return type(v[name]) is int and 0 <= v[name] < 2**bits

    def decimal(name):
        return text(name, DECIMAL) and int(v[name]) < 2**256

    buy = v["maker_asset_id"] == "0"
    return (text("transaction_hash", HASH) and text("order_hash", HASH)
            and v["id"] == f"{v['transaction_hash']}_{v['order_hash']}"
            and type(v["timestamp"]) is int and FILL_TIME_MIN <= v["timestamp"] < time.time() + FILL_TIME_AHEAD_S
            and (v["block_number"] is None or uint("block_number", 64))
            and (v["log_index"] is None or uint("log_index", 32))
            and text("exchange", ADDRESS, True) and text("maker", ADDRESS) and text("taker", ADDRESS)
            and decimal("maker_asset_id") and decimal("taker_asset_id") and decimal("token_id")
            and all(uint(c, 256) for c in ("maker_amount_filled", "taker_amount_filled", "fee"))
            and text("condition_id", HASH, True) and v["side"] == ("BUY" if buy else "SELL")
            and (v["taker_asset_id"] == "0") != buy
            and v["token_id"] == (v["taker_asset_id"] if buy else v["maker_asset_id"])
            and type(v["is_relay_leg"]) is bool
            and type(v["exchange_version"]) is int and v["exchange_version"] in (1, 2)
            and type(v["source"]) is str and re.fullmatch(r"[a-z0-9_]{1,32}", v["source"]) is not None)


def page_events(n: int = 1000) -> tuple[bytes, list[dict]]:
    ds = Dataset.generate(markets=300, seed=3)
    body = GraphEngine(ds).execute({"query": fills_query(False, False, False), "variables": {"after": ""}}).body
    return body.encode(), json.loads(body)["data"]["orderFilledEvents"][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    body, events = page_events()
    fields = list(events[0])
    outcomes = {"rows": 0, "retry": 0, "source_error": 0, "bad_fill": 0}
    failures: list[str] = []

    mutation = st.tuples(st.integers(0, 49), st.sampled_from(fields),
                         st.sampled_from(HOSTILE) | st.text(max_size=8) | st.integers() | st.just("<missing>"))
    row_mutation = st.tuples(st.integers(0, 49), st.sampled_from(FILL_COLUMNS),
                             st.sampled_from(HOSTILE) | st.text(max_size=8) | st.integers())
    bodies = st.one_of(
        st.lists(mutation, max_size=4).map(lambda ms: ("mutated", ms)),
        st.lists(row_mutation, max_size=3).map(lambda ms: ("rows", ms)),
        st.tuples(st.just("cut"), st.integers(0, 40_000)),
        st.tuples(st.just("flip"), st.integers(0, 40_000), st.integers(0, 255)),
        st.tuples(st.just("junk"), st.binary(max_size=200)),
    )

    def build(case) -> bytes:
        kind = case[0]
        page = [dict(e) for e in events[:50]]
        if kind == "mutated":
            for index, field, value in case[1]:
                if value == "<missing>":
                    page[index].pop(field, None)
                else:
                    page[index][field] = value
            return json.dumps({"data": {"orderFilledEvents": page}}).encode()
        raw = json.dumps({"data": {"orderFilledEvents": page}}).encode()
        if kind == "cut":
            return raw[: case[1] % (len(raw) + 1)]
        if kind == "flip":
            at = case[1] % len(raw)
            return raw[:at] + bytes([case[2]]) + raw[at + 1:]
        return case[1]

    valid_rows = fill_rows(events[:50], {})

    def rows_case(mutations) -> None:
        """Rows mutated after parsing: the fast check and the reference must agree both ways."""
        rows = list(valid_rows)
        for index, name, value in mutations:
            rows[index] = tuple(value if c == name else old for c, old in zip(FILL_COLUMNS, rows[index]))
        expected = all(map(reference_ok, rows))
        try:
            check_fills(rows)
            accepted = True
        except BadFill:
            accepted = False
        outcomes["rows" if accepted else "bad_fill"] += 1
        if accepted != expected:
            failures.append(f"check_fills {'accepted' if accepted else 'refused'} what the reference "
                            f"{'refuses' if accepted else 'accepts'}: {mutations!r}")

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def one(case) -> None:
        if case[0] == "rows":
            try:
                rows_case(case[1])
            except Exception as exc:  # noqa: BLE001 - the finding this bench looks for
                failures.append(f"{type(exc).__name__}: {exc} for row mutations {case[1]!r}")
            return
        raw = build(case)
        try:
            rows = fill_rows(_entities(_answer(200, HEADERS, raw, "http://127.0.0.1/gn"), "orderFilledEvents"), {})
            check_fills(rows)
        except _Retry:
            outcomes["retry"] += 1
        except SourceError:
            outcomes["source_error"] += 1
        except BadFill:
            outcomes["bad_fill"] += 1
        except Exception as exc:  # noqa: BLE001 - the finding this bench looks for
            failures.append(f"{type(exc).__name__}: {exc} for {raw[:120]!r}")
        else:
            outcomes["rows"] += 1
            bad = [row for row in rows if not reference_ok(row)]
            if bad:
                failures.append(f"accepted a row the reference refuses: {bad[0]!r}")

    started = time.monotonic()
    stop_at = started + args.seconds
    while time.monotonic() < stop_at:
        one()
    elapsed = time.monotonic() - started
    cases = sum(outcomes.values()) + len(failures)
    print(f"fuzz: {cases:,} cases in {elapsed:.0f} s ({cases / elapsed:,.0f}/s), failures {len(failures)}; "
          + ", ".join(f"{k} {v:,}" for k, v in outcomes.items()))
    for failure in failures[:10]:
        print("  FAILURE", failure)

    def best(fn, runs: int = 200) -> float:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    conditions = Dataset.generate(markets=300, seed=3).token_to_condition
    rows = fill_rows(events, conditions)
    parse, fills, check = best(lambda: json.loads(body)), best(lambda: fill_rows(events, conditions)), best(
        lambda: check_fills(rows))
    buffered = best(lambda: FillBuffer().extend(rows))
    print(f"cost per 1,000-fill page (best of 200): json.loads {parse:.2f} ms, fill_rows {fills:.2f} ms, "
          f"check_fills {check:.2f} ms, FillBuffer.extend {buffered:.2f} ms; "
          f"total {parse + fills + check + buffered:.2f} ms")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
