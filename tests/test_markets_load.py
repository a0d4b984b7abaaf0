"""`clobjob markets load` on Gamma-shaped files with good and bad rows."""

from __future__ import annotations

import json

from clobjob.cli import main
from clobjob.store import open_store

GOOD = {
    "id": "12", "conditionId": "0x" + "0" * 56 + "ABCDEF",  # 62 digits: leading zeros lost "question": "Will it rain?", "slug": "rain",
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
        {**GOOD, "conditionId": "0x00000000000000000000000000000000000000000000000000000000000002", "clobTokenIds": "[1, 2"},
        {**GOOD, "conditionId": "0x00000000000000000000000000000000000000000000000000000000000003", "endDate": "yesterday"},
        {**GOOD, "conditionId": "0x00000000000000000000000000000000000000000000000000000000000004", "clobTokenIds": ["7", "8"], "volumeNum": None, "volume": "99.5"},
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
