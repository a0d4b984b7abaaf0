"""Settings: env prefix, old-script aliases, secrets never shown."""

from __future__ import annotations

from loguru import logger

from clobjob.config import Settings, redact_url


def test_env_prefix_and_cli_override(monkeypatch):
    monkeypatch.setenv("CLOBJOB_SUBGRAPH_URL", "http://127.0.0.1:1/gn")
    monkeypatch.setenv("CLOBJOB_MAX_RPS", "12")
    settings = Settings()
    assert settings.subgraph_url == "http://127.0.0.1:1/gn" and settings.max_rps == 12
    assert settings.with_overrides(max_rps=3.0, batch_rows=None).max_rps == 3.0


def test_old_script_variables_are_mapped_with_a_notice(monkeypatch):
    lines = []
    sink = logger.add(lines.append, format="{message}")
    monkeypatch.setenv("WORKER_COUNT", "32")
    monkeypatch.setenv("DELAY_MS", "100")
    monkeypatch.setenv("BATCH_SIZE", "5000")
    try:
        settings = Settings()
    finally:
        logger.remove(sink)
    assert settings.max_in_flight == 32 and settings.max_rps == 320 and settings.batch_rows == 5000
    assert any("WORKER_COUNT=32" in line and "max_rps=320" in line for line in lines)
    monkeypatch.setenv("CLOBJOB_MAX_RPS", "7")
    assert Settings().max_rps == 7  # an explicit CLOBJOB_ value wins over the old alias


def test_secrets_never_appear_in_repr_or_redacted_dsn(monkeypatch):
    monkeypatch.setenv("CLOBJOB_CLICKHOUSE_URL", "https://bob:hunter2@ch.example:8443/db")
    monkeypatch.setenv("CLOBJOB_SUBGRAPH_API_KEY", "sk-live-123")
    monkeypatch.setenv("CLOBJOB_RPC_URL", "https://polygon.example/v3/key-456")
    settings = Settings()
    shown = repr(settings) + str(settings) + settings.redacted_dsn() + str(settings.model_dump())
    for secret in ("hunter2", "sk-live-123", "key-456"):
        assert secret not in shown
    assert settings.redacted_dsn() == "https://bob:***@ch.example:8443/db"
    assert "hunter2" in settings.dsn()
    assert redact_url("http://u:p@h/x?apikey=1") == "http://u:***@h/x?***"


def test_password_setting_overrides_url_password(monkeypatch):
    monkeypatch.setenv("CLOBJOB_CLICKHOUSE_URL", "http://bob@ch:8123/db")
    monkeypatch.setenv("CLOBJOB_CLICKHOUSE_PASSWORD", "s3cret")
    settings = Settings()
    assert settings.dsn() == "http://bob:s3cret@ch:8123/db"
    assert "s3cret" not in settings.redacted_dsn()


def test_connection_errors_do_not_leak_the_password(tmp_path, capsys):
    from clobjob.cli import main

    code = main(["--clickhouse-url", "http://bob:hunter2@127.0.0.1:9/db", "db", "migrate"])
    captured = capsys.readouterr()
    assert code == 1
    assert "hunter2" not in captured.out + captured.err


# --- validation at load: exit 2 with the variable named ---------------------------------------------

import pytest  # noqa: E402
from hypothesis import assume, given  # noqa: E402
from hypothesis import settings as hyp_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clobjob.errors import BadInput  # noqa: E402

BAD_SETTINGS = [
    ("CLOBJOB_CLICKHOUSE_URL", "ftp://ch.example/db", "scheme must be http or https"),
    ("CLOBJOB_CLICKHOUSE_URL", "file:///etc/passwd", "scheme must be http or https"),
    ("CLOBJOB_CLICKHOUSE_URL", "notaurl", "scheme must be http or https"),
    ("CLOBJOB_CLICKHOUSE_URL", "http://ch.example:99999/db", "port is a number 1..65535"),
    ("CLOBJOB_CLICKHOUSE_URL", "http://ch.example:abc/db", "port is a number 1..65535"),
    ("CLOBJOB_CLICKHOUSE_URL", "http://:8123/db", "no host"),
    ("CLOBJOB_CLICKHOUSE_URL", "chdb:relative/path", "chdb:///absolute/path"),
    ("CLOBJOB_SUBGRAPH_URL", "ftp://goldsky.example/gn", "scheme must be http or https"),
    ("CLOBJOB_SUBGRAPH_URL", "http://goldsky.example:0/gn", "port 0"),
    ("CLOBJOB_GAMMA_URL", "gamma-api.polymarket.com", "scheme must be http or https"),
    ("CLOBJOB_RPC_URL", "file:///etc/passwd", "scheme must be http or https"),
    ("CLOBJOB_CLICKHOUSE_DATABASE", "db`; drop", "plain identifier"),
    ("CLOBJOB_CLICKHOUSE_CLUSTER", "c1` ON CLUSTER `x", "identifier"),
    ("CLOBJOB_MAX_RPS", "inf", "finite"),
    ("CLOBJOB_MAX_RPS", "nan", "finite"),
    ("CLOBJOB_FLUSH_INTERVAL_S", "nan", "finite"),
    ("CLOBJOB_MAX_IN_FLIGHT", "0", "greater than or equal to 1"),
    ("DELAY_MS", "-100", "DELAY_MS='-100' (old-style variable) must be a positive number"),
    ("DELAY_MS", "nan", "DELAY_MS='nan'"),
    ("WORKER_COUNT", "0", "WORKER_COUNT='0' (old-style variable) must be a positive integer"),
    ("BATCH_SIZE", "lots", "BATCH_SIZE='lots'"),
]


@pytest.mark.parametrize(("name", "value", "reason"), BAD_SETTINGS)
def test_bad_settings_exit_2_naming_the_variable(monkeypatch, capsys, tmp_path, name, value, reason):
    from clobjob.cli import main

    for old in ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE"):
        monkeypatch.delenv(old, raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(BadInput) as caught:
        Settings.load()
    message = str(caught.value)
    assert name in message and reason in message and "\n" not in message and "pydantic" not in message
    if name in ("CLOBJOB_CLICKHOUSE_URL", "CLOBJOB_RPC_URL"):
        assert value not in message and "(secret, not shown)" in message
    else:
        assert repr(value) in message
    monkeypatch.setenv("CLOBJOB_HOME", str(tmp_path))
    assert main(["db", "migrate"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and "validation error" not in err


def test_flags_are_validated_like_the_environment(capsys):
    from clobjob.cli import main

    assert main(["--clickhouse-url", "http://h:99999/db", "db", "migrate"]) == 2
    assert "CLOBJOB_CLICKHOUSE_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: exit 2 with the flag named
        main(["diagnose", "--offline", "--rate", "nan"])
    assert exited.value.code == 2 and "--rate: 'nan' is not a positive finite number" in capsys.readouterr().err
    with pytest.raises(BadInput, match="CLOBJOB_MAX_RPS=nan: Input should be a finite number"):
        Settings().with_overrides(max_rps=float("nan"))


def test_a_cluster_name_with_hyphens_is_an_identifier():
    assert Settings(clickhouse_cluster="prod-cluster_2").clickhouse_cluster == "prod-cluster_2"
    assert Settings(clickhouse_cluster="").clickhouse_cluster is None


# --- secrets: percent-encoded, redacted by structure ---------------------------------------------

HARD_PASSWORDS = ["ab/PWslash#S3cret?x@y%z", "pässwörd✓ ü/%41", "p@ss:w0rd"]


@pytest.mark.parametrize("password", HARD_PASSWORDS)
def test_passwords_are_percent_encoded_and_never_shown(password):
    from urllib.parse import quote

    from clickhouse_connect.driver import _parse_connection_params

    encoded = quote(password, safe="")
    in_url = Settings(clickhouse_url=f"http://admin:{encoded}@127.0.0.1:1/mydb")
    by_variable = Settings(clickhouse_url="http://admin@127.0.0.1:1/mydb", clickhouse_password=password)
    for settings in (in_url, by_variable):
        assert settings.dsn() == f"http://admin:{encoded}@127.0.0.1:1/mydb"
        assert settings.redacted_dsn() == "http://admin:***@127.0.0.1:1/mydb"
        # what the driver makes of the DSN: the password exactly
        assert _parse_connection_params(None, None, "", None, None, None, False, settings.dsn(), {})[2] == password
        quoted = f"error: {settings.dsn()} said {password!s} / {encoded}"
        assert password not in settings.redact(quoted) and encoded not in settings.redact(quoted)


def test_a_password_that_is_not_percent_encoded_is_refused_unshown():
    for url in ("http://admin:ab/PWslashS3cret@x@127.0.0.1:1/mydb", "http://u:1/x@h:8123/db",
                "http://u:pa#ss@h:1/db", "http://u:pa?ss@h:1/db"):
        with pytest.raises(BadInput, match="CLOBJOB_CLICKHOUSE_URL") as caught:
            Settings(home=".").with_overrides(clickhouse_url=url)
        assert "percent-encoded" in str(caught.value)
        assert "PWslash" not in str(caught.value) and "ss@" not in str(caught.value) and "1/x" not in str(caught.value)


def test_redact_url_rebuilds_from_parts():
    assert redact_url("https://bob:a@b@ch.example:8443/db?x=1#frag") == "https://bob:***@ch.example:8443/db?***"
    assert redact_url("http://ch.example/db") == "http://ch.example/db"
    assert redact_url("https://polygon.example/v3/key-456", keep_path=False) == "https://polygon.example/***"
    assert redact_url("chdb:///var/db") == "chdb:///var/db"


@hyp_settings(max_examples=200, deadline=None)
@given(user=st.text(min_size=1, max_size=12), password=st.text(min_size=1, max_size=24),
       host=st.from_regex(r"\A[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5})?\Z"), port=st.integers(1, 65535),
       database=st.from_regex(r"\A[a-z_][a-z0-9_]{0,8}\Z"))
def test_property_dsn_round_trips_and_redaction_hides_the_password(user, password, host, port, database):
    from urllib.parse import quote

    from clickhouse_connect.driver import _parse_connection_params

    settings = Settings(clickhouse_url=f"https://{quote(user, safe='')}@{host}:{port}/{database}",
                        clickhouse_password=password)
    parsed = _parse_connection_params(None, None, "", None, None, None, False, settings.dsn(), {})
    assert parsed[:5] == (host, user, password, port, database)
    redacted = settings.redacted_dsn()
    assert redacted == f"https://{quote(user, safe='')}:***@{host}:{port}/{database}"
    expected = f"failed at {redacted} with *** (***)"
    assume(password not in expected and quote(password, safe="") not in expected)  # else it is redacted there too
    message = settings.redact(f"failed at {settings.dsn()} with {password} ({quote(password, safe='')})")
    assert message == expected


def test_an_api_key_echoed_by_the_subgraph_is_redacted_in_logs_and_the_error(monkeypatch, capsys, tmp_path):
    """A server that quotes the Authorization header in its error text (as some gateways do)."""
    from aiohttp import web

    from clobjob.cli import main
    from clobjob.serving import LocalServer

    key = "sk-live-Zq8/x+Y=secret"

    class Echo(LocalServer):
        def build_app(self) -> web.Application:
            async def answer(request: web.Request) -> web.Response:
                logger.warning("gateway saw {}", request.headers["Authorization"])  # a log line quoting it too
                echoed = f"invalid API key {request.headers['Authorization']}"
                return web.json_response({"errors": [{"message": echoed}]}, status=401)

            app = web.Application()
            app.router.add_post("/gn", answer)
            return app

    monkeypatch.setenv("CLOBJOB_SUBGRAPH_API_KEY", key)
    monkeypatch.setenv("CLOBJOB_HOME", str(tmp_path))
    with Echo("127.0.0.1", 0).run_in_thread() as server:
        code = main(["--log-format", "human", "markets", "sync", "--add-subgraph-markets", "--subgraph-url",
                     server.url + "/gn"])
    err = capsys.readouterr().err
    assert code == 2 and "invalid API key Bearer ***" in err and "gateway saw Bearer ***" in err
    assert key not in err and "Zq8" not in err
