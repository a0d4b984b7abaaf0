"""The optional Prometheus endpoint, scraped over a real socket."""

from __future__ import annotations

import aiohttp
import pytest

from clobjob.metrics import CONTENT_TYPE, MetricsServer, exposition


async def test_metrics_endpoint_serves_prometheus_text():
    values = {"fills_total": 1200, "requests_total": 40, "throttled_total": 2, "rate_limit_rps": 12.5,
              "in_flight": 3, "heartbeat_age_seconds": 1.25}
    server = MetricsServer(0, host="127.0.0.1", collect=lambda: values, labels={"run_id": "r1", "shard": 0})
    server.add(lambda: {"fills_total": 7}, {"run_id": "r1", "shard": 1})
    async with server, aiohttp.ClientSession() as http:
        assert server.port > 0
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            body = await response.text()
        values["fills_total"] = 1300  # collected at scrape time
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            assert 'clobjob_fills_total{run_id="r1",shard="0"} 1300' in await response.text()
    lines = body.splitlines()
    assert lines[:4] == [
        "# HELP clobjob_fills_total Fills fetched and stored",
        "# TYPE clobjob_fills_total counter",
        'clobjob_fills_total{run_id="r1",shard="0"} 1200',
        'clobjob_fills_total{run_id="r1",shard="1"} 7',
    ]
    assert "# TYPE clobjob_rate_limit_rps gauge" in lines
    assert 'clobjob_rate_limit_rps{run_id="r1",shard="0"} 12.5' in lines
    assert 'clobjob_heartbeat_age_seconds{run_id="r1",shard="0"} 1.25' in lines
    assert sum(line.startswith("# TYPE") for line in lines) == len(values)


async def test_server_stops_on_exit():
    async with MetricsServer(0, host="127.0.0.1", collect=dict) as server:
        port = server.port
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/metrics")


def test_label_values_are_escaped_and_special_numbers_spelled():
    text = exposition([({"run_id": 'a"b\\c\nd'}, {"rps": float("nan"), "in_flight": float("inf")})])
    assert 'clobjob_rps{run_id="a\\"b\\\\c\\nd"} NaN' in text
    assert text.endswith("clobjob_in_flight{run_id=\"a\\\"b\\\\c\\nd\"} +Inf\n")


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="bad metric name"):
        exposition([({}, {"bad-name": 1})])
    with pytest.raises(ValueError, match="bad label"):
        MetricsServer(0, collect=dict, labels={"bad-label": "x"})
