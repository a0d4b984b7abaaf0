"""The simulator's HTTP server: GraphQL POST at any path, Goldsky-like throttling and faults, Gamma's market
listing, a service time per answer, stats.

``POST /<any path>``: a GraphQL request; ``POST /rpc``: Polygon JSON-RPC when the server has an ``RpcNode``
(``clobjob.sim.rpc``). ``GET /markets`` and ``GET /markets/keyset``: Gamma's listing of the
dataset's markets (``clobjob.sim.gamma``), under its own token bucket. ``GET /__stats``: counts of requests
and outcomes, and the service time served (JSON). ``POST /__config``: change knobs at run time (JSON object of
SimConfig fields; its ``rpc`` object changes the RpcNode's ``RpcConfig`` — ``{"rpc": {"head": N}}`` grows the
chain to block N). Rate limits, faults and service time never apply to the two ``/__`` endpoints.

Every admitted answer waits its service time (``ServiceTime``) in an asyncio sleep, so answers in service
overlap: a slow answer never delays another. 429s answer at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from clobjob.serving import LocalServer
from clobjob.sim.data import HEAD_BLOCK, Dataset, DatasetOptions
from clobjob.sim.engine import GraphEngine
from clobjob.sim.faults import (
    THROTTLE_BODY,
    Fault,
    FaultPlan,
    ServiceTime,
    SimConfig,
    TokenBucket,
    retry_after_header,
    with_bad_values,
)
from clobjob.sim.gamma import KEYSET_PATH, MARKETS_PATH, GammaApi
from clobjob.sim.rpc import RPC_PATH, Chain, RpcConfig, RpcNode

DEFAULT_PATH = "/subgraphs/orderbook-subgraph/gn"
STAT_KEYS = ("requests", "ok", "query_errors", "throttled_429", "http_5xx", "graphql_timeout", "overloaded",
             "store_timeout", "empty_body", "truncated", "slow", "hang", "fill_requests", "fills_served",
             "gamma_requests", "gamma_ok", "gamma_errors", "gamma_throttled_429", "gamma_markets_served",
             "timed_answers", "service_s", "in_service", "in_service_peak")
_REASONS = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}
_ERRORS = {
    Fault.GRAPHQL_TIMEOUT: "Query timed out",
    Fault.OVERLOADED: "service is overloaded and can not run the query right now. Please try again in a few minutes",
}
_STORE_TIMEOUT = "Store error: database query timed out"
GAMMA_THROTTLE_BODY = "Too Many Requests"  # Gamma's own 429 text is not documented


def _html_error(status: int) -> web.Response:
    """The HTML error page a reverse proxy in front of graph-node sends."""
    title = f"{status} {_REASONS[status]}"
    page = (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
            "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
    return web.Response(status=status, text=page, content_type="text/html")


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload, separators=(",", ":")),
                        content_type="application/json")


class SimServer(LocalServer):
    """A simulated Goldsky orderbook-subgraph endpoint on ``host:port`` (port 0 = a free port).

    Use ``async with SimServer(ds, cfg) as sim`` in async code or ``with SimServer(ds, cfg).run_in_thread()
    as sim`` from sync code; ``sim.url``, ``sim.stats()`` and ``sim.configure(...)`` work in both.
    """

    def __init__(self, ds: Dataset, cfg: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 path: str = DEFAULT_PATH, rpc: RpcNode | None = None) -> None:
        super().__init__(host, port)
        self.rpc = rpc
        self.cfg = cfg or SimConfig()
        self.path = path
        self._engine = GraphEngine(ds)
        self._engine.head_block = self.cfg.head_block or HEAD_BLOCK
        self._gamma = GammaApi(ds.markets)
        self._limiter = TokenBucket(self.cfg.rate_limit_rps, self.cfg.burst)
        self._gamma_limiter = TokenBucket(self.cfg.gamma_rate_limit_rps, self.cfg.gamma_burst)
        self._faults = FaultPlan(self.cfg.seed)
        self._service = ServiceTime(self.cfg.seed)
        self._stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
        self._closing: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The GraphQL endpoint (any path on the server works)."""
        return f"http://{self.host}:{self.port}{self.path}"

    @property
    def gamma_url(self) -> str:
        """The base URL of the simulated Gamma API (``/markets``, ``/markets/keyset``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def rpc_url(self) -> str:
        """The JSON-RPC endpoint (with an ``RpcNode``)."""
        return f"http://{self.host}:{self.port}{RPC_PATH}"

    def stats(self) -> dict[str, float]:
        """Counts of requests and of each outcome; ``service_s`` (total) and ``service_s_mean`` of the service
        time served, ``in_service`` / ``in_service_peak``: answers waiting their service time now / at most."""
        timed = self._stats["timed_answers"]
        return {**self._stats, "service_s_mean": self._stats["service_s"] / timed if timed else 0.0}

    def configure(self, **knobs: Any) -> SimConfig:
        """Change rate limit / fault knobs at run time (validated like SimConfig)."""
        cfg = SimConfig.model_validate({**self.cfg.model_dump(), **knobs})
        if cfg.seed != self.cfg.seed:
            self._faults = FaultPlan(cfg.seed)
            self._service = ServiceTime(cfg.seed)
        self._limiter.reset(cfg.rate_limit_rps, cfg.burst)
        self._gamma_limiter.reset(cfg.gamma_rate_limit_rps, cfg.gamma_burst)
        self._engine.head_block = cfg.head_block or HEAD_BLOCK
        self.cfg = cfg
        return cfg

    def build_app(self) -> web.Application:
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/__stats", self._get_stats)
        app.router.add_post("/__config", self._post_config)
        app.router.add_get(MARKETS_PATH, self._gamma_markets)
        app.router.add_get(KEYSET_PATH, self._gamma_markets)
        if self.rpc is not None:
            self.rpc.mount(app)
        app.router.add_post("/{tail:.*}", self._graphql)
        return app

    async def stop(self) -> None:
        """Wake slow/hung handlers and shut down."""
        if self._closing is not None:
            self._closing.set()
        await super().stop()

    def _count(self, key: str, n: float = 1) -> None:
        self._stats[key] += n

    async def _serve_time(self, rows: int) -> None:
        """Wait the service time of an answer of ``rows`` rows (concurrently with every other answer)."""
        seconds = self._service.seconds(self.cfg, rows)
        if seconds <= 0:
            return
        self._count("timed_answers")
        self._count("service_s", seconds)
        self._count("in_service")
        self._stats["in_service_peak"] = max(self._stats["in_service_peak"], self._stats["in_service"])
        try:
            await self._sleep(seconds)
        finally:
            self._count("in_service", -1)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at shutdown."""
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    async def _get_stats(self, _request: web.Request) -> web.Response:
        return _json(self.stats())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            knobs = await request.json()
            if not isinstance(knobs, dict):
                raise ValueError("expected a JSON object of SimConfig fields")
            rpc = knobs.pop("rpc", None)
            if rpc is not None:
                if self.rpc is None or not isinstance(rpc, dict):
                    raise ValueError("rpc: expected a JSON object of RpcConfig fields, on a server that serves /rpc")
                rpc = self.rpc.configure(**rpc).model_dump()
            return _json(self.configure(**knobs).model_dump() | ({"rpc": rpc} if rpc is not None else {}))
        except (ValueError, ValidationError) as exc:
            return _json({"error": str(exc)}, 400)

    def _throttled(self, limiter: TokenBucket, request: web.Request, body: str) -> web.Response | None:
        """The 429 for a request over its limit, or None when admitted."""
        wait = limiter.take(request.remote or "", time.monotonic())
        if wait is None:
            return None
        headers = {"Retry-After": retry_after_header(wait)} if self.cfg.retry_after else None
        return web.Response(status=429, text=body, headers=headers)

    async def _gamma_markets(self, request: web.Request) -> web.Response:
        self._count("gamma_requests")
        if (throttled := self._throttled(self._gamma_limiter, request, GAMMA_THROTTLE_BODY)) is not None:
            self._count("gamma_throttled_429")
            return throttled
        if request.path == KEYSET_PATH and not self.cfg.gamma_keyset:
            self._count("gamma_errors")
            raise web.HTTPNotFound()
        listing = self._gamma.answer(request.path, request.query, self.cfg.gamma_bad_rows, self.cfg.gamma_listed)
        await self._serve_time(listing.rows)
        self._count("gamma_ok" if listing.status == 200 else "gamma_errors")
        self._count("gamma_markets_served", listing.rows)
        return web.Response(status=listing.status, text=listing.body, content_type="application/json")

    async def _graphql(self, request: web.Request) -> web.Response:
        self._count("requests")
        raw = await request.read()
        if (throttled := self._throttled(self._limiter, request, THROTTLE_BODY)) is not None:
            self._count("throttled_429")
            return throttled
        response, rows = await self._graphql_answer(raw)
        await self._serve_time(rows)
        return response

    async def _graphql_answer(self, raw: bytes) -> tuple[web.Response, int]:
        """The response to an admitted GraphQL request and the rows it holds (for its service time)."""
        draw = self._faults.draw(self.cfg)
        if draw.fault is Fault.HTTP_5XX:
            self._count("http_5xx")
            return _html_error(draw.status), 0
        if draw.fault is Fault.HANG:
            self._count("hang")
            await self._sleep(self.cfg.hang_s)
            return _html_error(504), 0
        if draw.fault in _ERRORS:
            self._count(draw.fault.value)
            return _json({"errors": [{"message": _ERRORS[draw.fault]}]}), 0
        if draw.fault is Fault.SLOW:
            self._count("slow")
            await self._sleep(self.cfg.slow_s)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._count("query_errors")
            return _json({"errors": [{"message": f"Invalid JSON in request body: {exc}"}]}, 400), 0
        answer = self._engine.execute(body, max_skip=self.cfg.max_skip, indexing_error=self.cfg.indexing_error)
        if draw.store_timeout and answer.in_rows > self.cfg.store_timeout_rows:
            self._count("store_timeout")
            return _json({"errors": [{"message": _STORE_TIMEOUT}]}), 0
        text = answer.body
        if self.cfg.bad_fill_values and answer.fill_query and not answer.error:
            text = with_bad_values(text, self.cfg.bad_fill_values)
        if draw.fault is Fault.EMPTY_BODY:
            self._count("empty_body")
            return web.Response(body=b"", content_type="application/json"), answer.rows
        if draw.fault is Fault.TRUNCATED:
            self._count("truncated")
            return web.Response(text=text[: max(1, int(len(text) * draw.cut))],
                                content_type="application/json"), answer.rows
        self._count("query_errors" if answer.error else "ok")
        if answer.fill_query and not answer.error:
            self._count("fill_requests")
            self._count("fills_served", answer.fills)
        return web.Response(status=answer.status, text=text, content_type="application/json"), answer.rows


def serve(host: str = "127.0.0.1", port: int = 8787, profile: str = "clean", rpc_profile: str | None = None,
          **knobs: Any) -> None:
    """Generate a dataset and serve it until SIGINT/SIGTERM, printing the URL on stdout.

    ``knobs`` are ``DatasetOptions`` fields (the dataset; its seed also seeds faults and service times) and
    SimConfig fields overriding the profile; None values are ignored (unset CLI flags). ``rpc_profile`` also
    serves the v2 chain's JSON-RPC at ``/rpc`` with that provider profile.
    """
    given = {k: v for k, v in knobs.items() if v is not None}
    options = DatasetOptions(**{k: given.pop(k) for k in DatasetOptions.model_fields if k in given})
    ds = options.generate()
    cfg = SimConfig.for_profile(profile, seed=options.seed, **given)
    rpc = RpcNode(Chain(ds, seed=options.seed), RpcConfig.for_profile(rpc_profile, seed=options.seed)) \
        if rpc_profile else None
    SimServer(ds, cfg, host=host, port=port, rpc=rpc).serve_until_signalled(
        f"clobjob sim: {len(ds.markets)} markets, {ds.n_fills} fills, seed {cfg.seed}, profile {profile}")
