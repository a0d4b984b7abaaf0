"""One pydantic-settings ``Settings`` for every command: environment ``CLOBJOB_*``, CLI flags override.

The old TypeScript scripts' variables are accepted as aliases with a one-line notice:
``WORKER_COUNT`` → ``max_in_flight`` (ceiling of the adaptive in-flight window),
``DELAY_MS`` → ``max_rps`` = WORKER_COUNT × 1000 / DELAY_MS (the fixed rate the old preset implied, now a
ceiling the adaptive controller never exceeds), ``BATCH_SIZE`` → ``batch_rows`` (fills per insert).

Every value is validated when the settings load (``Settings.load``: ``BadInput``, exit 2, naming the variable):
URLs are http(s) with a host and a port in 1..65535 (or ``chdb:///abs/path`` for the database), names are
identifiers, numbers finite. Secrets are ``SecretStr``; URLs are printed rebuilt from their parts with the
password replaced (``redact_url``), and ``Settings.redact`` removes every configured secret from a message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clobjob.errors import BadInput
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
_CLUSTER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")  # cluster names of ClickHouse configs may hold hyphens
_HTTP = ("http", "https")
_KEY_LIKE = 16  # an RPC URL's path segments this long or longer are taken as keys (where providers put them)

OLD_ALIASES = ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE")


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """The URL rebuilt from its parts with the password (and the query string, which may hold keys; with
    ``keep_path=False`` also the path) replaced by ``***``. A ``chdb:`` path is returned as it is."""
    if url.startswith("chdb:"):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{':***' if colon else ''}{at}{hostport}"
    path = parts.path if keep_path or parts.path in ("", "/") else "/***"
    return urlunsplit((parts.scheme, netloc, path, "***" if parts.query else "", ""))


def _check_http_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is http(s) with a host and a valid port. The message never quotes the
    URL (a password that is not percent-encoded can land in any part of it): the caller names the setting."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({'bad port' if 'Port' in str(exc) else 'bad host'}: a port is a number "
                         "1..65535; a '/', '#', '?' or '@' in a password must be percent-encoded)") from None
    if parts.scheme not in _HTTP:
        raise ValueError(f"the scheme must be http or https, not {repr(parts.scheme) if parts.scheme else 'none'}")
    if not parts.hostname:
        raise ValueError("no host in the URL")
    if port == 0:
        raise ValueError("port 0: a port is a number 1..65535")
    if "@" in parts.path + parts.query + parts.fragment:
        raise ValueError("a '/', '#', '?' or '@' in a password must be percent-encoded (%2F %23 %3F %40)")


class Settings(BaseSettings):
    """Everything configurable. Secrets are ``SecretStr``: they never appear in repr, logs or errors."""

    model_config = SettingsConfigDict(env_prefix="CLOBJOB_", extra="ignore", validate_default=True,
                                      allow_inf_nan=False)

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
    max_in_flight: int = Field(256, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)

    batch_rows: int = Field(50_000, ge=1, description="fills per insert (at most; a timer flushes smaller batches)")
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
            raise ValueError("not a plain identifier (letters, digits and _, not starting with a digit)")
        return value

    @field_validator("clickhouse_cluster")
    @classmethod
    def _cluster(cls, value: str | None) -> str | None:
        if value and not _CLUSTER.match(value):
            raise ValueError("not an identifier (letters, digits, _ and -, not starting with a digit)")
        return value or None

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url.startswith("chdb:"):
            if not url.startswith("chdb:///"):
                raise ValueError("an embedded database is chdb:///absolute/path")
        elif url:
            _check_http_url(url)
            path = urlsplit(url).path.strip("/")
            if path and not _IDENTIFIER.match(unquote(path)):
                raise ValueError("the URL's path is a database name (a plain identifier) or nothing")
        return value

    @field_validator("subgraph_url", "gamma_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        _check_http_url(value)
        return value

    @field_validator("rpc_url")
    @classmethod
    def _rpc_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_http_url(value.get_secret_value())
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
        workers = _old_number("WORKER_COUNT", old, int) or 1
        if "WORKER_COUNT" in old:
            mapped["max_in_flight"] = workers
        if "DELAY_MS" in old:
            mapped["max_rps"] = workers * 1000.0 / _old_number("DELAY_MS", old, float)
        if "BATCH_SIZE" in old:
            mapped["batch_rows"] = _old_number("BATCH_SIZE", old, int)
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

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Settings from the environment with CLI flag values applied; ``BadInput`` (exit 2) names each bad one."""
        with _settings_errors():
            settings = cls()
        return settings.with_overrides(**overrides)

    def rpc_contract_blocks(self) -> dict[str, int]:
        """Exchange contract (lower-case address) → its first block."""
        return {address: int(block) for address, _, block in (e.partition("@") for e in self.rpc_contracts.split(","))}

    def dsn(self) -> str:
        """The ClickHouse DSN to connect with, user and password percent-encoded (secret: never log it; use
        ``redacted_dsn``). ``CLOBJOB_CLICKHOUSE_PASSWORD`` (any characters, not encoded) replaces the URL's."""
        url = self.clickhouse_url.get_secret_value()
        if not url:
            return "chdb://" + str((self.home / "db").resolve())
        if url.startswith("chdb:"):
            return url
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        user, colon, password = (unquote(part) for part in userinfo.partition(":"))
        if self.clickhouse_password is not None:
            user, colon, password = user or "default", ":", self.clickhouse_password.get_secret_value()
        credentials = f"{quote(user, safe='')}{':' + quote(password, safe='') if colon else ''}@" if at or colon else ""
        return urlunsplit((parts.scheme, credentials + hostport, parts.path, parts.query, ""))

    def redacted_dsn(self) -> str:
        """The DSN safe to print."""
        return redact_url(self.dsn())

    @cached_property
    def _secrets(self) -> list[tuple[str, str]]:
        """(secret text, what to show instead), longest first, in every form a message may quote it."""
        found: dict[str, str] = {}
        url = self.clickhouse_url.get_secret_value()
        if url and not url.startswith("chdb:"):
            found[url], found[self.dsn()] = redact_url(url), self.redacted_dsn()
            password = urlsplit(url).password
            found.update(dict.fromkeys([password or "", unquote(password or "")], "***"))
        for secret in (self.clickhouse_password, self.subgraph_api_key):
            if secret is not None:
                found.update(dict.fromkeys([secret.get_secret_value(), quote(secret.get_secret_value(), safe="")],
                                           "***"))
        if self.rpc_url is not None:
            rpc = self.rpc_url.get_secret_value()
            found[rpc] = redact_url(rpc, keep_path=False)
            parts = urlsplit(rpc)
            found.update(dict.fromkeys([part for part in parts.path.split("/") if len(part) >= _KEY_LIKE], "***"))
            if parts.query:
                found[parts.query] = "***"
        return sorted(((k, v) for k, v in found.items() if k), key=lambda kv: -len(kv[0]))

    def redact(self, text: str) -> str:
        """``text`` with every configured secret replaced (URLs by their redacted form, passwords and keys by
        ``***``): for messages that may quote one, such as a server's error echoing ``Bearer <api key>``."""
        for secret, shown in self._secrets:
            text = text.replace(secret, shown)
        return text

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

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with CLI flag values applied (``None`` means the flag was not given); ``BadInput`` names a bad one."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        with _settings_errors():
            return self.model_validate({**self.model_dump(), **given})


def _old_number(name: str, old: dict[str, str], kind: type) -> Any:
    """An old-style variable's value as a positive finite ``kind``; ``ValueError`` names the variable."""
    raw = old.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        noun = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"{name}={raw!r} (old-style variable) must be {noun}")
    return value


_SECRET_FIELDS = frozenset(name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation))


def describe_settings_error(exc: ValidationError) -> str:
    """A pydantic error of ``Settings`` as one line naming each bad variable and (unless secret) its value."""
    problems = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        reason = error["msg"].removeprefix("Value error, ")
        if not field:  # a model-level check (the old-style variables) names its variable itself
            problems.append(reason)
        elif field in _SECRET_FIELDS:
            problems.append(f"CLOBJOB_{field.upper()} (secret, not shown): {reason}")
        else:
            problems.append(f"CLOBJOB_{field.upper()}={error['input']!r}: {reason}")
    return "bad setting: " + "; ".join(problems)


@contextmanager
def _settings_errors() -> Iterator[None]:
    try:
        yield
    except ValidationError as exc:
        raise BadInput(describe_settings_error(exc)) from None
