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
