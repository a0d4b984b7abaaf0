"""One pydantic-settings ``Settings`` for every command: environment ``CLOBJOB_*``, CLI flags override.

The old TypeScript scripts' variables are accepted as aliases with a one-line notice:
``WORKER_COUNT`` → ``max_in_flight`` (ceiling of the adaptive in-flight window),
``DELAY_MS`` → ``max_rps`` = WORKER_COUNT × 1000 / DELAY_MS (the fixed rate the old preset implied, now a
ceiling the adaptive controller never exceeds), ``BATCH_SIZE`` → ``batch_rows`` (fills per insert).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clobjob.models import EXCHANGE_FIRST_BLOCKS, EXCHANGES

GOLDSKY_ORDERBOOK_URL = (
    "https://api.goldsky.com/api/public/project_cl6mb8i9h0003e201j6li0diw"
    "/subgraphs/orderbook-subgraph/0.0.1/gn"
)
# The exchanges whose OrderFilled logs the RPC source reads by default, as address@first block: CTF and NegRisk v2.
V2_EXCHANGE_CONTRACTS = ",".join(f"{address}@{EXCHANGE_FIRST_BLOCKS[address]}"
                                 for address, version in EXCHANGES.items() if version == 2)
DEFAULT_HOME = Path(".clobjob")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

OLD_ALIASES = ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE")


def redact_url(url: str) -> str:
    """The URL with any password (and query string, which may hold keys) replaced by ``***``."""
    if url.startswith("chdb:"):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class Settings(BaseSettings):
    """Everything configurable. Secrets are ``SecretStr``: they never appear in repr, logs or errors."""

    model_config = SettingsConfigDict(env_prefix="CLOBJOB_", extra="ignore", validate_default=True)

    home: Path = Field(DEFAULT_HOME, description="local state directory (embedded database, live status)")
    clickhouse_url: SecretStr = Field(
        SecretStr(""),
        description="http(s)://user:pass@host:port/db for a server, chdb:///abs/path for embedded; "
        "empty = embedded under HOME/db",
    )
    clickhouse_password: SecretStr | None = Field(None, description="overrides the URL's password")
    clickhouse_database: str = "clobjob"
    clickhouse_cluster: str | None = Field(None, description="ON CLUSTER name: Replicated engines")

    subgraph_url: str = GOLDSKY_ORDERBOOK_URL
    subgraph_api_key: SecretStr | None = None
    rpc_url: SecretStr | None = None
    source: str | None = Field(None, pattern="^(subgraph|rpc|all)$",
                               description="what a backfill or plan fetches: subgraph (v1 fills of the universe's "
                                           "markets), rpc (v2 fills from Polygon logs) or all; default all when "
                                           "an RPC URL is set, else subgraph")
    gamma_url: str = Field("https://gamma-api.polymarket.com", description="Polymarket Gamma API base URL")
    rpc_contracts: str = Field(V2_EXCHANGE_CONTRACTS, description="exchange contracts whose logs the RPC source "
                               "reads: address@first_block, comma-separated (default: CTF and NegRisk Exchange v2)")
    rpc_lag_blocks: int = Field(128, ge=0, description="stay this many blocks behind the head (reorg safety)")
    rpc_initial_span: int = Field(2_000, ge=1, description="blocks per eth_getLogs call to start with (adaptive)")
    rpc_max_span: int = Field(100_000, ge=1, description="never ask eth_getLogs for more blocks than this")
    rpc_batch: int = Field(20, ge=1, description="JSON-RPC calls per HTTP request (at most; 1 = no batches)")

    max_rps: float | None = Field(None, gt=0, description="hard ceiling on requests/s (adaptive below it)")
    initial_rps: float = Field(5.0, gt=0)
    max_in_flight: int = Field(64, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)

    batch_rows: int = Field(20_000, ge=1, description="fills per insert (at most; a timer flushes smaller batches)")
    flush_interval_s: float = Field(2.0, gt=0)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    stall_timeout_s: float = Field(120.0, gt=0)
    unit_attempts: int = Field(5, ge=1)
    store_outage_s: float = Field(180.0, gt=0, description="how long a worker waits for an unreachable ClickHouse "
                                  "(retrying with backoff) before its shard fails")

    log_format: str = Field("auto", pattern="^(auto|json|human)$")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus /metrics on this port")

    @field_validator("clickhouse_database")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"database name {value!r} is not a plain identifier")
        return value

    @field_validator("rpc_contracts")
    @classmethod
    def _contracts(cls, value: str) -> str:
        """Normalised ``address@block`` entries (lower-case addresses), or an error naming the bad entry."""
        entries = []
        for entry in (e.strip() for e in value.split(",")):
            address, _, block = entry.partition("@")
            if not re.fullmatch(r"0x[0-9a-fA-F]{40}", address) or not block.isdigit():
                raise ValueError(f"rpc contract {entry!r} is not address@first_block (0x + 40 hex digits @ a block)")
            entries.append(f"{address.lower()}@{int(block)}")
        return ",".join(entries)

    @model_validator(mode="before")
    @classmethod
    def _old_aliases(cls, data: Any) -> Any:
        """Map the old scripts' WORKER_COUNT / DELAY_MS / BATCH_SIZE (when no CLOBJOB_ value is given)."""
        if not isinstance(data, dict):
            return data
        old = {k: os.environ[k] for k in OLD_ALIASES if os.environ.get(k)}
        if not old:
            return data
        mapped: dict[str, Any] = {}
        try:
            workers = int(old.get("WORKER_COUNT", 0)) or None
            if workers:
                mapped["max_in_flight"] = workers
            if "DELAY_MS" in old:
                mapped["max_rps"] = (workers or 1) * 1000.0 / max(float(old["DELAY_MS"]), 1.0)
            if "BATCH_SIZE" in old:
                mapped["batch_rows"] = int(old["BATCH_SIZE"])
        except ValueError as exc:
            raise ValueError(f"old-style variable has a bad value: {old}") from exc
        env_set = {k.removeprefix("CLOBJOB_").lower() for k in os.environ if k.startswith("CLOBJOB_")}
        applied = {k: v for k, v in mapped.items() if k not in data and k not in env_set}
        if applied:
            from loguru import logger

            logger.warning(
                "old-style {} mapped to {} (see README: configuration)",
                ", ".join(f"{k}={v}" for k, v in old.items()),
                ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in applied.items()),
            )
        return {**applied, **data}

    def rpc_contract_blocks(self) -> dict[str, int]:
        """Exchange contract (lower-case address) → its first block."""
        return {address: int(block) for address, _, block in (e.partition("@") for e in self.rpc_contracts.split(","))}

    def dsn(self) -> str:
        """The ClickHouse DSN to connect with (secret: never log it; use ``redacted_dsn``)."""
        url = self.clickhouse_url.get_secret_value()
        if not url:
            return "chdb://" + str((self.home / "db").resolve())
        if self.clickhouse_password is not None and not url.startswith("chdb:"):
            parts = urlsplit(url)
            user = parts.username or "default"
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            netloc = f"{user}:{self.clickhouse_password.get_secret_value()}@{host}{port}"
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return url

    def redacted_dsn(self) -> str:
        """The DSN safe to print."""
        return redact_url(self.dsn())

    @property
    def embedded(self) -> bool:
        """True when the database is embedded chDB (one process per path)."""
        return self.dsn().startswith("chdb:")

    def as_env(self) -> dict[str, str]:
        """These settings as ``CLOBJOB_*`` variables, for a child process (values include secrets)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif name == "home":
                value = Path(value).resolve()
            env[f"CLOBJOB_{name.upper()}"] = str(value)
        return env

    def with_overrides(self, **overrides: Any) -> "Settings":
        """A copy with CLI flag values applied (``None`` means the flag was not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given}) if given else self
