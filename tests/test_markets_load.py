"""`clobjob markets load` on Gamma-shaped files with good and bad rows."""

from __future__ import annotations

import json

from clobjob.cli import main
from clobjob.store import open_store

GOOD = {
    "id": "12", "conditionId": "0x" + "0" * 56 + "ABCDEF",  # 62 digits: an export that lost leading zeros
    "question": "Will it rain?", "slug": "rain",
    "clobTokenIds": json.dumps(["123456789012345678901234567890", "42"]), "endDate": "2024-03-01T12:00:00Z",
    "closed": True, "volumeNum": 1234.5, "negRisk": False,
}


def write_jsonl(path, objects):
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n")


def args(settings):
    return ["--clickhouse-url", settings.clickhouse_url.get_secret_value(), "--database",
            settings.clickhouse_database]


def test_load_normalises_ids_reports_bad_rows_and_is_idempotent(settings, tmp_path, capsys):
    rows = [
        GOOD,
        {**GOOD, "conditionId": "0xnothex"},
        {**GOOD, "conditionId": "0x" + "0" * 60 + "02", "clobTokenIds": "[1, 2"},
        {**GOOD, "conditionId": "0x" + "0" * 60 + "03", "endDate": "yesterday"},
        {**GOOD, "conditionId": "0x" + "0" * 60 + "04", "clobTokenIds": ["7", "8"], "volumeNum": None,
         "volume": "99.5"},
    ]
    path = tmp_path / "markets.jsonl"
    write_jsonl(path, rows)
    assert main([*args(settings), "markets", "load", str(path)]) == 0
    out = capsys.readouterr()
    assert "loaded 2 markets" in out.out and "skipped 3 bad row(s)" in out.out
    assert "line 2: field conditionId" in out.err and "'0xnothex'" in out.err
    assert "line 3: field clobTokenIds" in out.err
    assert "line 4: field endDate" in out.err and "'yesterday'" in out.err
    assert main([*args(settings), "markets", "load", str(path)]) == 0
    with open_store(settings) as store:
        markets = {m.condition_id: m for m in store.markets()}
        assert store.count_markets() == 2
    first = markets["0x" + "0" * 58 + "abcdef"]
    assert first.token_ids == ("123456789012345678901234567890", "42") and first.closed
    assert markets["0x" + "0" * 62 + "04"].volume == 99.5


def test_json_array_with_line_numbers_and_strict_mode(settings, tmp_path, capsys):
    path = tmp_path / "markets.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps({**GOOD, "clobTokenIds": "[]"}) + "\n]")
    assert main([*args(settings), "markets", "load", "--strict", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 3: field clobTokenIds" in err and "nothing loaded" in err
    with open_store(settings) as store:
        assert store.count_markets() == 0
    assert main([*args(settings), "markets", "load", str(path)]) == 0


def test_unreadable_file_is_a_bad_input(settings, tmp_path):
    assert main([*args(settings), "markets", "load", str(tmp_path / "missing.json")]) == 2


# --- every field validated with its line; good rows loaded beside bad ones ------------------------

import math  # noqa: E402
from decimal import Decimal  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import settings as hyp_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clobjob.models import json_rows  # noqa: E402
from clobjob.sources.markets import BadRow, market_from_gamma  # noqa: E402


def cond(n: int) -> str:
    return f"0x{n:064x}"


BAD_FIELDS = [
    ("question", "lone \ud800 surrogate", "lone surrogate"),
    ("endDate", "1900-01-01T00:00:00Z", "outside the dates ClickHouse stores"),
    ("endDate", "0001-01-01T00:00:00Z", "outside the dates ClickHouse stores"),
    ("endDate", "0001-01-01T00:00:00+01:00", "not an ISO 8601 date"),
    ("endDate", "2107-01-01T00:00:00Z", "outside the dates ClickHouse stores"),
    ("endDate", "9999-12-31T23:59:59Z", "outside the dates ClickHouse stores"),
    ("conditionId", "0x" + "ab" * 30, "has 60 hex digits"),
    ("conditionId", "1", "has 1 hex digits"),
    ("conditionId", "0x1234", "has 4 hex digits"),
    ("clobTokenIds", json.dumps(["101"]), "has 1 token id(s)"),
    ("clobTokenIds", json.dumps(["1", "2", "3"]), "has 3 token id(s)"),
    ("clobTokenIds", json.dumps(["101", "101"]), "twice"),
    ("clobTokenIds", json.dumps(["0x65", "101"]), "lists token 101 twice"),
    ("clobTokenIds", json.dumps(["0", "101"]), "USDC collateral"),
    ("volumeNum", "NaN", "not a finite number"),
    ("volumeNum", "Infinity", "not a finite number"),
    ("volumeNum", "1e309", "not a finite number"),
    ("volumeNum", -5, "not a finite number ≥ 0"),
    ("volumeNum", True, "not a number"),
    ("closed", "false", "not a JSON boolean"),
    ("negRisk", 1, "not a JSON boolean"),
    ("slug", 12, "not a string"),
]


@pytest.mark.parametrize(("field", "value", "reason"), BAD_FIELDS)
def test_a_bad_field_is_named_with_its_line_and_the_good_rows_load(settings, tmp_path, capsys, field, value,
                                                                   reason):
    path = tmp_path / "markets.jsonl"
    rows = [{**GOOD, "conditionId": cond(1)}, {**GOOD, "conditionId": cond(2), field: value},
            {**GOOD, "conditionId": cond(3), "clobTokenIds": '["5", "6"]'}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main([*args(settings), "markets", "load", str(path)]) == 0
    out = capsys.readouterr()
    assert f"line 2: field {field}: " in out.err and reason in out.err and "Traceback" not in out.err
    assert "loaded 2 markets" in out.out and "skipped 1 bad row(s)" in out.out
    with open_store(settings) as store:
        assert {m.condition_id for m in store.markets()} == {cond(1), cond(3)}
    assert main([*args(settings), "markets", "load", "--strict", str(path)]) == 2


def test_the_same_rows_as_a_json_array(settings, tmp_path, capsys):
    path = tmp_path / "markets.json"
    rows = [{**GOOD, "conditionId": cond(1), "endDate": "9999-01-01T00:00:00Z"}, {**GOOD, "conditionId": cond(2)},
            {**GOOD, "conditionId": cond(3), "question": "\ud800"}]
    path.write_text(json.dumps(rows, indent=2))
    assert main([*args(settings), "markets", "load", str(path)]) == 0
    out = capsys.readouterr()
    assert "line 2: field endDate" in out.err and "line 24: field question" in out.err and "loaded 1 markets" in out.out


def test_booleans_and_dates_are_taken_exactly():
    market = market_from_gamma({**GOOD, "closed": False, "negRisk": True, "endDate": "2106-02-07T06:28:15Z",
                                "startDate": "1970-01-01T00:00:00Z", "volumeNum": None, "volume": "12.5"}, 1)
    assert market.closed is False and market.neg_risk is True and market.volume == 12.5
    assert market.end_date.year == 2106 and market.start_date.year == 1970
    assert market_from_gamma({**GOOD, "closed": None}, 1).closed is False


@pytest.mark.parametrize(("content", "reason"), [
    ("", "nothing"),
    ("  \n\n\t\n", "nothing"),
    (json.dumps({"data": [GOOD]}), "field conditionId: missing"),
    (json.dumps(GOOD, indent=2), "invalid JSON"),
    ("[]", "nothing"),
    ('[[1, 2], "x"]', "expected a JSON object"),
])
def test_a_file_with_no_market_is_exit_2(settings, tmp_path, capsys, content, reason):
    path = tmp_path / "markets.json"
    path.write_text(content)
    for strict in ([], ["--strict"]):
        assert main([*args(settings), "markets", "load", *strict, str(path)]) == 2
        err = capsys.readouterr().err
        assert "no market in" in err and reason in err


def test_a_broken_array_names_its_line_and_loads_nothing(settings, tmp_path, capsys):
    path = tmp_path / "markets.json"
    path.write_text("[\n" + json.dumps({**GOOD, "conditionId": cond(1)}) + ",\n" + '{"conditionId" "x"}\n]')
    assert main([*args(settings), "markets", "load", str(path)]) == 2
    assert "line 3: invalid JSON" in capsys.readouterr().err


def test_junk_stops_at_the_first_thousand_bad_rows(tmp_path):
    from clobjob.errors import BadInput
    from clobjob.sources.markets import read_gamma_file

    path = tmp_path / "junk.json"
    path.write_text("[" + ",".join(['{"junk": 1}'] * 50_000) + "]")
    with pytest.raises(BadInput, match="the first 1,000 rows are all bad"):
        read_gamma_file(path)


# --- property tests: the row validator and the streaming reader ----------------------------------

token = st.integers(1, 2**256 - 1)
row_values = st.fixed_dictionaries({
    "conditionId": st.one_of(st.integers(0, 2**256 - 1).map(lambda n: f"0x{n:064x}"), st.text(max_size=70)),
    "clobTokenIds": st.one_of(st.lists(token.map(str), min_size=0, max_size=3).map(json.dumps),
                              st.lists(st.one_of(token, st.text(max_size=5)), max_size=3), st.none()),
    "question": st.one_of(st.text(max_size=20), st.none(), st.integers()),
    "endDate": st.one_of(st.datetimes(timezones=st.just(__import__("datetime").timezone.utc)).map(
        lambda d: d.isoformat()), st.text(max_size=12), st.none()),
    "volumeNum": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.decimals(), st.text(max_size=8),
                           st.none(), st.booleans()),
    "closed": st.one_of(st.booleans(), st.none(), st.text(max_size=5), st.integers()),
})


@hyp_settings(max_examples=400, deadline=None)
@given(row_values)
def test_property_a_row_is_a_valid_market_or_a_bad_row_with_its_field(obj):
    from clobjob.models import STORABLE_TIMES

    try:
        market = market_from_gamma(obj, 7)
    except BadRow as problem:
        assert problem.line == 7 and problem.field in obj
        assert str(problem).startswith(f"line 7: field {problem.field}: ")
        return
    assert len(market.condition_id) == 66 and len(market.token_ids) == 2 and len(set(market.token_ids)) == 2
    assert all(t == str(int(t)) and 0 < int(t) < 2**256 for t in market.token_ids)
    assert math.isfinite(market.volume) and market.volume >= 0 and isinstance(market.closed, bool)
    market.question.encode("utf-8")
    assert market.end_date is None or STORABLE_TIMES[0] <= market.end_date <= STORABLE_TIMES[1]


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) |
                          st.floats(allow_nan=False, allow_infinity=False),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=8)


@hyp_settings(max_examples=150, deadline=None)
@given(st.lists(json_value, max_size=12), st.lists(st.dictionaries(st.text(max_size=4), json_value, max_size=3),
                                                   max_size=8), st.sampled_from([None, 1, 2]))
def test_property_the_streaming_reader_yields_every_element_with_its_line(tmp_path_factory, values, objects, indent):
    """Arrays (compact or indented) and JSONL (objects, blank lines between): every value, exactly (fractions as
    Decimal), each with the line it starts on."""
    folder = tmp_path_factory.mktemp("reader")
    parts = [json.dumps(v, indent=indent) for v in values]
    array = folder / "values.json"
    array.write_text("[\n" + ",\n".join(parts) + "\n]")
    lines, line = [], 2
    for part in parts:
        lines.append(line)
        line += part.count("\n") + 1
    jsonl = folder / "values.jsonl"
    jsonl.write_text("\n\n".join(json.dumps(o) for o in objects))
    for path, written, starts in ((array, values, lines), (jsonl, objects, [1 + 2 * i for i in range(len(objects))])):
        rows = list(json_rows(path))
        assert [value for _, value in rows] == [json.loads(json.dumps(v), parse_float=Decimal) for v in written]
        assert [line for line, _ in rows] == starts
