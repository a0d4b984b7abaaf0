"""The simulator's knobs (rate limits, fault rates, service time), throttling as a per-client token bucket,
the seeded choice of a fault per request and the seeded service time of each answer.

Faults are drawn from one ``random.Random(seed)`` per server, a fixed number of draws per admitted request,
so the same sequence of requests meets the same sequence of faults. Service times come from a second
generator of the same seed, so turning latency on does not change which faults are met.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

THROTTLE_BODY = "Sorry, you've surpassed your query allowance. Please try again - limits reset every 10 seconds."


class Profile(str, Enum):
    CLEAN = "clean"
    THROTTLED = "throttled"
    HOSTILE = "hostile"
    REALISTIC = "realistic"


class Fault(str, Enum):
    """What happens to one admitted request (besides the store timeout, which depends on the query)."""

    NONE = "none"
    HTTP_5XX = "http_5xx"
    GRAPHQL_TIMEOUT = "graphql_timeout"
    OVERLOADED = "overloaded"
    EMPTY_BODY = "empty_body"
    TRUNCATED = "truncated"
    SLOW = "slow"
    HANG = "hang"


class SimConfig(BaseModel):
    """Rate limit and fault knobs; every probability is per admitted GraphQL request."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 7
    rate_limit_rps: float | None = Field(None, gt=0, description="token-bucket rate per client IP; None = no limit")
    burst: int = Field(10, ge=1)
    retry_after: bool = Field(False, description="send Retry-After with 429 (Goldsky documents none)")
    p_5xx: float = Field(0.0, ge=0, le=1)
    p_graphql_timeout: float = Field(0.0, ge=0, le=1)
    p_overloaded: float = Field(0.0, ge=0, le=1)
    p_store_timeout_in: float = Field(0.0, ge=0, le=1, description="for heavy _in queries only")
    store_timeout_rows: int = Field(20_000, ge=0, description="_in queries matching more fills are heavy")
    p_empty_body: float = Field(0.0, ge=0, le=1)
    p_truncated: float = Field(0.0, ge=0, le=1)
    p_slow: float = Field(0.0, ge=0, le=1)
    slow_s: float = Field(2.0, ge=0)
    p_hang: float = Field(0.0, ge=0, le=1)
    hang_s: float = Field(3600.0, ge=0, description="a hung response completes (504) after this long")
    max_skip: int | None = Field(5000, ge=0, description="graph-node GRAPH_GRAPHQL_MAX_SKIP; None = unlimited")
    indexing_error: bool = False
    head_block: int | None = Field(None, ge=0, description="indexed up to this block: later fills do not exist yet "
                                   "(None = the dataset's head); raise it to make open markets grow")
    latency_base_s: float = Field(0.0, ge=0, description="service time of every admitted answer (429s excepted)")
    latency_per_row_ms: float = Field(0.0, ge=0, description="added service time per row answered")
    latency_jitter: float = Field(0.0, ge=0, le=1, description="service time varies uniformly by ± this share")
    gamma_rate_limit_rps: float | None = Field(None, gt=0, description="Gamma API token-bucket rate per client IP")
    gamma_burst: int = Field(10, ge=1)
    gamma_bad_rows: list[int] = Field([], description="Gamma markets (positions in the dataset) served malformed")
    gamma_keyset: bool = Field(True, description="serve Gamma's /markets/keyset (False: 404, offset paging only)")
    gamma_listed: int | None = Field(None, ge=0, description="Gamma lists only the dataset's first N markets "
                                     "(None = all); raise it to make new markets appear")
    bad_fill_values: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="fill id → {field: value}: that fill is served with these values")

    @model_validator(mode="after")
    def _probabilities_sum(self) -> SimConfig:
        if sum(self.fault_weights().values()) > 1:
            raise ValueError("the fault probabilities (except p_store_timeout_in) add up to more than 1")
        return self

    def fault_weights(self) -> dict[Fault, float]:
        """Probability of each request-level fault."""
        return {
            Fault.HTTP_5XX: self.p_5xx,
            Fault.GRAPHQL_TIMEOUT: self.p_graphql_timeout,
            Fault.OVERLOADED: self.p_overloaded,
            Fault.EMPTY_BODY: self.p_empty_body,
            Fault.TRUNCATED: self.p_truncated,
            Fault.SLOW: self.p_slow,
            Fault.HANG: self.p_hang,
        }

    @classmethod
    def for_profile(cls, profile: Profile | str, seed: int = 7, **knobs: Any) -> SimConfig:
        """clean: no limit, no faults, instant answers; throttled: 20 req/s burst 10; hostile: a limit and every
        fault; realistic: throttled with graph-node's service time (0.25 s + 0.6 ms per row, ±20 %, so a full
        1,000-row page takes about 0.85 s) and a Gamma limit of 10 req/s."""
        presets: dict[Profile, dict[str, Any]] = {
            Profile.CLEAN: {},
            Profile.THROTTLED: {"rate_limit_rps": 20.0, "burst": 10},
            Profile.HOSTILE: {
                "rate_limit_rps": 30.0, "burst": 15, "p_5xx": 0.03, "p_graphql_timeout": 0.02,
                "p_overloaded": 0.02, "p_store_timeout_in": 0.3, "p_empty_body": 0.02, "p_truncated": 0.02,
                "p_slow": 0.03, "p_hang": 0.01,
            },
            Profile.REALISTIC: {
                "rate_limit_rps": 20.0, "burst": 10, "latency_base_s": 0.25, "latency_per_row_ms": 0.6,
                "latency_jitter": 0.2, "gamma_rate_limit_rps": 10.0, "gamma_burst": 10,
            },
        }
        return cls(seed=seed, **{**presets[Profile(profile)], **knobs})


@dataclass
class Draw:
    """The seeded decisions for one admitted request."""

    fault: Fault
    status: int  # for HTTP_5XX: 502, 503 or 504
    cut: float  # for TRUNCATED: the fraction of the body sent
    store_timeout: bool  # fail with a store timeout if the query is heavy


class FaultPlan:
    """Sequence-deterministic fault decisions: exactly four draws per admitted request."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def draw(self, cfg: SimConfig) -> Draw:
        u, v, w, x = (self._rng.random() for _ in range(4))
        fault, edge = Fault.NONE, 0.0
        for candidate, p in cfg.fault_weights().items():
            edge += p
            if u < edge:
                fault = candidate
                break
        return Draw(fault, (502, 503, 504)[int(v * 3)], 0.1 + 0.8 * w, x < cfg.p_store_timeout_in)


class ServiceTime:
    """Seeded service time per answer: (base + per row × rows) × U(1 − jitter, 1 + jitter)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"service-time/{seed}")

    def seconds(self, cfg: SimConfig, rows: int) -> float:
        mean = cfg.latency_base_s + cfg.latency_per_row_ms / 1000 * rows
        if not mean:
            return 0.0
        return mean * (1 + cfg.latency_jitter * (2 * self._rng.random() - 1))


class TokenBucket:
    """Per-client token buckets (rate tokens/s, capacity burst); full at a client's first request."""

    def __init__(self, rate: float | None, burst: int) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self.reset(rate, burst)

    def reset(self, rate: float | None, burst: int) -> None:
        """Change the limit; existing buckets keep their tokens (at most the new burst)."""
        self.rate, self.burst = rate, burst
        self._buckets = {k: (min(tokens, burst), at) for k, (tokens, at) in self._buckets.items()}

    def take(self, client: str, now: float) -> float | None:
        """Take a token: None if admitted, else the seconds until the next token."""
        if self.rate is None:
            return None
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            return None
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate


def retry_after_header(wait_s: float) -> str:
    """A Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(wait_s)))


def with_bad_values(body: str, bad: Mapping[str, Mapping[str, Any]]) -> str:
    """A fills answer with the fields of the fills named in ``bad`` replaced (a hostile source's values)."""
    doc = json.loads(body)
    for event in (doc.get("data") or {}).get("orderFilledEvents") or ():
        event.update(bad.get(event.get("id"), {}))
    return json.dumps(doc, separators=(",", ":"))
