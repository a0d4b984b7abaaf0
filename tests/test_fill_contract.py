"""The storage contract of a fill row (``models.check_fills``) and the subgraph's fill parser, by property:
valid rows pass and are stored exactly; any one hostile value fails with ``BadFill`` naming its field, its
value and its place, and nothing else is ever raised."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clobjob.errors import BadFill, SourceError
from clobjob.models import FILL_COLUMNS, FILL_TIME_MIN, check_fill_columns, check_fills
from clobjob.sources.subgraph import fill_rows
from tests.scripted import fill_row

U256 = 2**256
NOT_AFTER = 1_767_225_600  # 2026-01-01: a fixed bound keeps generation deterministic
hashes = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
tokens = st.integers(1, U256 - 1).map(str)
amounts = st.integers(0, U256 - 1)


@st.composite
def valid_rows(draw) -> tuple:
    tx, order, token, buy = draw(hashes), draw(hashes), draw(tokens), draw(st.booleans())
    values = {
        "id": f"{tx}_{order}", "transaction_hash": tx, "order_hash": order,
        "timestamp": draw(st.integers(FILL_TIME_MIN, NOT_AFTER)),
        "block_number": draw(st.none() | st.integers(0, 2**64 - 1)),
        "log_index": draw(st.none() | st.integers(0, 2**32 - 1)), "exchange": draw(st.just("") | addresses),
        "maker": draw(addresses), "taker": draw(addresses),
        "maker_asset_id": "0" if buy else token, "taker_asset_id": token if buy else "0",
        "maker_amount_filled": draw(amounts), "taker_amount_filled": draw(amounts), "fee": draw(amounts),
        "condition_id": draw(st.just("") | hashes), "token_id": token, "side": "BUY" if buy else "SELL",
        "is_relay_leg": draw(st.booleans()), "exchange_version": draw(st.sampled_from([1, 2])),
        "source": draw(st.sampled_from(["subgraph", "rpc"])),
    }
    return tuple(values[c] for c in FILL_COLUMNS)


surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, codec=None), min_size=1)
hostile = st.one_of(
    st.text(), surrogates, st.integers(), st.integers(U256, 10**100), st.integers(-10**80, -1), st.none(),
    st.booleans(), st.floats(), st.binary(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(), st.none()),
    st.sampled_from(["0xab'cd0_0x'; drop table clob_fills; --", "zzzz0_not hex at all", "'; drop table markets; --",
                     "<script>alert(1)</script>", "0x" + "A" * 64, "0" * 80, "01", "", " 1", "１", 99999999999]),
)


@given(st.lists(valid_rows(), min_size=1, max_size=40))
def test_valid_rows_pass(rows):
    check_fills(rows)


@given(st.lists(valid_rows(), min_size=1, max_size=20), st.data())
def test_a_page_s_columns_are_checked_as_its_rows_are(rows, data):
    """The worker checks a page as columns: the same verdict and message as its rows get, and columns of unequal
    lengths (a fill missing a field) fail."""
    field = data.draw(st.sampled_from(FILL_COLUMNS))
    index = data.draw(st.integers(0, len(rows) - 1))
    rows[index] = tuple(data.draw(hostile) if name == field else old for name, old in zip(FILL_COLUMNS, rows[index]))
    columns = [list(column) for column in zip(*rows)]

    def verdict(check, fills):
        try:
            check(fills, "page 1: ")
        except BadFill as bad:
            return str(bad)
        return None

    assert verdict(check_fill_columns, columns) == verdict(check_fills, rows)
    del columns[FILL_COLUMNS.index(field)][index]
    with pytest.raises(BadFill, match="^page 1: expected 20 columns of one length"):
        check_fill_columns(columns, "page 1: ")


@given(st.lists(valid_rows(), min_size=1, max_size=20), st.data())
def test_one_hostile_value_fails_naming_its_field_value_and_place_or_is_in_contract(rows, data):
    index = data.draw(st.integers(0, len(rows) - 1))
    field = data.draw(st.sampled_from(FILL_COLUMNS))
    value = data.draw(hostile)
    rows[index] = tuple(value if name == field else old for name, old in zip(FILL_COLUMNS, rows[index]))
    try:
        check_fills(rows, "page 7: ")
    except BadFill as bad:
        text = str(bad)
        assert text.startswith(f"page 7: fill {index} ")
        assert text.isascii() and "\n" not in text and len(text) < 600  # escaped, truncated
    else:  # in contract: then it is what the contract says
        row = dict(zip(FILL_COLUMNS, rows[index]))
        assert row["id"] == f"{row['transaction_hash']}_{row['order_hash']}"
        assert all(type(row[c]) is int and 0 <= row[c] < U256 for c in ("maker_amount_filled", "fee"))


@pytest.mark.parametrize("field, value, says", [
    ("fee", 10**100, "fee 1000000000"),
    ("maker_amount_filled", -1, "maker_amount_filled -1 is not within UInt256"),
    ("timestamp", 99999999999, "timestamp 99999999999 is not a Unix time from 2020-01-01"),
    ("timestamp", 1_000_000_000, "timestamp 1000000000"),
    ("id", "0x\ud800", r"id '0x\ud800' is not 0x + 64"),
    ("id", "0xab'cd0_0x'; drop table clob_fills; --", "id \"0xab'cd0_0x'; drop table clob_fills; --\" is not"),
    ("id", "zzzz0_not hex at all", "id 'zzzz0_not hex at all' is not"),
    ("maker", "'; drop table markets; --", "maker \"'; drop table markets; --\" is not a 20-byte"),
    ("taker", "<script>alert(1)</script>", "taker '<script>alert(1)</script>' is not a 20-byte"),
    ("taker", "0x" + "AB" * 20, "taker '0xABAB"),
    ("taker_asset_id", "0101", "taker_asset_id '0101' is not a canonical uint256"),
    ("token_id", str(U256), f"token_id '{U256}' is not a canonical uint256"),
    ("side", "SELL", "side 'SELL' disagrees with the assets"),
    ("token_id", "5", "token_id '5' is not the fill's outcome token"),
    ("order_hash", "0x" + "0" * 64, "id '0x"),
    ("transaction_hash", "0x12", "transaction_hash '0x12' is not a 32-byte"),
    ("condition_id", "0xabc", "condition_id '0xabc' is not empty or a 32-byte"),
    ("source", "Sub graph", "source 'Sub graph' is not a source name"),
    ("is_relay_leg", 1, "is_relay_leg 1 is not a bool"),
])
def test_each_bad_value_of_the_issue_is_named(field, value, says):
    rows = [fill_row(3, i, "1234", "0x" + "cd" * 32) for i in range(5)]
    rows[2] = tuple(value if name == field else old for name, old in zip(FILL_COLUMNS, rows[2]))
    with pytest.raises(BadFill) as bad:
        check_fills(rows, "unit 3 page 2 (after cursor '10'): ")
    assert str(bad.value).startswith("unit 3 page 2 (after cursor '10'): fill 2 (")
    assert says in str(bad.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(valid_rows(), min_size=1, max_size=10, unique_by=lambda row: row[0]))
def test_what_the_contract_accepts_clickhouse_stores_exactly(store, rows):
    check_fills(rows)
    store.insert_fill_rows(rows)
    compared = [c for c in FILL_COLUMNS if c not in ("timestamp",)]
    found = {r[0]: r for r in store.db.rows(
        f"SELECT {', '.join(compared)}, toUnixTimestamp(timestamp) FROM {{db}}.clob_fills FINAL "
        "WHERE id IN {ids:Array(String)}", {"ids": [row[0] for row in rows]})}
    for row in rows:
        values = dict(zip(FILL_COLUMNS, row))
        assert found[row[0]] == (*(values[c] for c in compared), values["timestamp"])


events_fields = ("id", "transactionHash", "timestamp", "orderHash", "maker", "taker", "makerAssetId",
                 "takerAssetId", "makerAmountFilled", "takerAmountFilled", "fee")


@st.composite
def events(draw) -> dict:
    """A subgraph OrderFilledEvent, each field valid, hostile, or missing."""
    tx, order, token, buy = draw(hashes), draw(hashes), draw(tokens), draw(st.booleans())
    valid = {"id": f"{tx}_{order}", "transactionHash": tx, "orderHash": order,
             "timestamp": str(draw(st.integers(FILL_TIME_MIN, NOT_AFTER))),
             "maker": draw(addresses), "taker": draw(addresses), "makerAssetId": "0" if buy else token,
             "takerAssetId": token if buy else "0", "makerAmountFilled": str(draw(amounts)),
             "takerAmountFilled": str(draw(amounts)), "fee": str(draw(amounts))}
    for name in draw(st.sets(st.sampled_from(events_fields), max_size=3)):
        choice = draw(st.sampled_from(["hostile", "missing", "digits"]))
        if choice == "missing":
            del valid[name]
        else:
            valid[name] = draw(hostile) if choice == "hostile" else draw(st.integers(0, 10**100).map(str))
    return valid


@given(st.lists(events() | hostile, max_size=8))
def test_the_parser_and_the_contract_raise_nothing_but_their_errors(page):
    try:
        rows = fill_rows(page, {})
    except SourceError as drift:
        assert "orderFilledEvents[" in str(drift)
        return
    try:
        check_fills(rows)
    except BadFill:
        return
    assert len(rows) == len(page)
