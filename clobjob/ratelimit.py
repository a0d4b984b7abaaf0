"""Adaptive client-side rate control: one controller per process, shared by all its asyncio tasks.

The upstream limit is unknown, shared with other clients and may change, so the controller finds it
from the answers. Every request goes through ``slot()``, which waits for a token of an adaptive token
bucket AND a free slot of an adaptive in-flight window, and then reports one verdict on its ``Permit``.

Rate (CUBIC-like around the last throttle point, after botocore's adaptive mode):

- slow start: until the first throttle the rate doubles every half busy second (its send rate measured over
  the last half doubling, so that a doubling rate is seen as used);
- a throttle (429) sets the *ceiling* to ``min(rate, accepted rate)``, the accepted rate being the
  requests that were not throttled per second over the last ~80 requests (0.5-3 s): upstream buckets
  have a burst, so throttling starts well after the nominal rate passed the limit and overestimates it.
  An overload answer sets the ceiling to the current rate (it says the service is busy, not where the
  limit is; measuring it from accepted answers spiralled the rate down under random faults);
  The rate drops to ``0.9 × ceiling`` (at most halved by one event), and to ``0.6 × ceiling`` at the throttle
  that ends slow start: the accepted rate measured over its last 0.5 s includes the upstream's burst (at
  100 req/s with a 50-request burst the ``0.9`` cut took 7 round trips of throttles to get under the limit);
- fast convergence (CUBIC's, RFC 8312 §4.6): a throttle measured below the current ceiling means other
  clients are taking a larger share, so the ceiling is set ``(1 + 0.9) / 2`` of that measure to leave them
  room. The accepted rate is measured over at most 3 s (it was 10 s): a client among many sends few requests,
  and a longer span lagged its own changes. In virtual time, 4 clients started 0-3 s apart, ten seeds: the
  smallest got 0.20-0.85 of its fair share over 50 s before, 0.60-0.87 with both; a client left alone by 15
  others took 13-17 s to use the freed limit, 4-10 s now;
- one congestion event per round trip: a throttle of a request sent before the last decrease was
  already in flight when we reacted and does not cut again;
- after a decrease the rate climbs back to the ceiling along a concave curve in 3 s (the deficit
  refills the upstream burst, so it is not lost), stays flat near it, then probes above it along a
  convex curve ``0.2·√ceiling·t³``: slow near the last known limit, fast far from it, so a raised limit
  is found in a few seconds. Growth in ``√ceiling`` is sub-linear, so clients sharing one limit
  converge to fair shares (the larger one gets more of the 429s and is cut more often);
- the curve's clock only runs while the bucket is the binding constraint (a caller had to wait for a
  token and the send rate is at least 70% of the rate): a demand-limited or window-limited client
  does not inflate its rate. The rate always stays within ``[min_rps, max_rps]``.

In-flight target (Little's law): ``target_in_flight()`` = rate × smoothed latency × 1.25 + 1 (within the
window's bounds): the requests a client must keep in flight for the token bucket, not the lack of requests,
to be what binds. Callers size their concurrency to it (``clobjob.lanes``: a unit's id range is cut into
ranges paged at once); at 100 req/s and 1.5 s pages it is 189, under the default ceiling of 256.
The latency it uses is the upstream's, not the client's own queueing: a CPU-starved process leaves answers
waiting in its event loop, its measured latency grows with every request it adds, and Little's law would ask
for ever more in flight (up to the ceiling, with no throughput gained, a parsed page held per request). So
each grant also measures how late the loop runs (a callback scheduled at the grant: the wait of ready work),
and while that lag exceeds ``LAG_SHARE`` of the latency the target's latency does not rise (it still falls):
it stays the last latency measured while the client kept up with its answers (a latency-gradient guard in
the spirit of TCP Vegas and Netflix's gradient limit, with the loop's lag telling queueing from a slower
upstream, which a latency baseline alone cannot).

The accepted rate is the sends less their throttles (which answer at once), not the useful answers, which
arrive a latency after their sends: at 1.5 s pages those reflected the ramp's lower rates (11-15 req/s for a
20 req/s limit) and the rate was cut to that. In slow start it is measured over the last 0.5 s only.

In-flight window (Netflix AIMD, the cap on requests actually sent, and never below the target after an
answer: +1 per success alone took many round trips to open at 1.5 s pages): +1 per success while
in-flight ≥ half the window, ×0.9 on an overload or a lost request (timeout, connection error,
cancellation), once per round trip as above; it is a float admitting ``floor(window)`` requests, so small
windows shrink smoothly. A useless answer (error page, garbled body, statement timeout: ``failed``) moves
neither window nor rate: under random faults those answers are not load, and reacting to them collapsed
the window to one request. It starts at 64, so that before the first answer (the latency unknown) the slow
start's rate, not the window, binds: at 1.5 s pages a window of 8 held the first round trip to 5 req/s.

Order: a slot and a token are given by the caller's ``priority`` (pages of work behind the request), highest
first, then in arrival order (a taker sleeping until the next token yields it to a higher priority that
arrived meanwhile). Lanes ask with the pages their range still holds, so the longest chains of sequential
pages go first and a shard's ranges end together (longest-processing-time first): served in arrival order,
230 units at 100 req/s and 1.5 s pages ended over a 4 s tail, short ranges done early and long ones still
paging. A page of priority is worth ``PRIORITY_AGE_S`` of waiting and counts up to ``PRIORITY_CAP`` pages,
so no request is passed over for more than about 20 s: a low-priority unit is deferred, never starved into
the worker's stall timeout.

Processes sharing one limit (the pods of a run behind one address) converge to fair shares on their own, but
slowly and with many throttles when there are many: each is throttled about once per recovery cycle, so the
429 share is about 1 / (3 s × its rate), 21 % for 16 processes at 20 req/s, and over 50 s the smallest of 16 got
0.3-0.7 of its fair share. So a pod is told its fair share (``share``) from the run's heartbeats (``fair_share``:
what the processes bound by the limit are accepted, split equally; one held by its own demand keeps what it
uses; none while under 2 % of the requests of the last heartbeat were throttled: the limit is not contended, a
peer finished or the limit rose), and probes no higher than ``FAIR_HEADROOM`` × that share, or its own ceiling
if that is higher, its curve's clock stopped there: those above their share stop pushing the others out, those
below still climb, and a group below the limit (after the slow start's cut, or a raised limit) probes freely
until it is throttled again. In virtual time over ten seeds, 16 clients told their share every 5 s: the
smallest 0.58-0.85 of it (mean 0.71), 7.1 % 429s, against 0.37-0.67 (0.49) and 20 % untold; 4 clients
0.72-0.94 (0.83), 3.7 %, against 0.59-0.92 (0.76), 5.6 %; a 20 → 40 req/s raise under 4 told clients is used
within 5.5 s (30-34 s when told always, whether contended or not: ~10 % per heartbeat).

A share binds only a client contended itself: one of its last 1 / ``CONTENDED_SHARE`` requests was throttled.
A pod behind an address of its own is under another limit, and the shares its heartbeats are mixed into are
not its own: held to those of ten pods sharing 20 req/s elsewhere, it would stay at the ceiling it had when
they became contended (0.22 of its own limit once that rose from 30 to 100 req/s, four seeds); not held, it
takes 0.96-0.97 of it, and the ten's smallest keeps 0.49-0.77 of its fair share.

Retry-After (seconds or an HTTP-date) pauses all sending until it passes. ``backoff()`` is capped
exponential backoff with full jitter. ``allow_retry()`` keeps retries within a fraction of the traffic
of the last 10 s, plus a small floor so that a cold start can retry.

Why our own bucket and not aiolimiter's ``AsyncLimiter``: its rate is fixed at construction
(mjpieters/aiolimiter#98) and it reads the event loop's clock, while this rate moves at almost every
grant and the tests drive the controller with an injected clock; swapping limiters would lose their
level and waiters, and the growth rule needs to know whether a caller had to wait. A token bucket is a
few lines, so it lives here, serialised by one lock so that waiters are served in order.

A controller belongs to one event loop (it is not thread-safe).

``controlled_request`` is the one retry loop every source sends through: a slot per attempt, one verdict
per answer (a ``Retryable`` names its own), the jittered backoff and the retry budget between attempts
(the budget delays a retry, never drops it), and ``TransientSourceError`` after the last attempt.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from itertools import takewhile
from typing import TypeVar

from loguru import logger

from clobjob.errors import ClobjobError, TransientSourceError

T = TypeVar("T")

BETA = 0.9  # rate after a throttle, as a fraction of the ceiling
FAST_CONVERGENCE = (1.0 + BETA) / 2  # the ceiling's share of a throttle measured below it (see the module doc)
SLOW_START_BETA = 0.6  # the same after the throttle that ends slow start (its accepted rate includes the burst)
MAX_CUT = 0.5  # one congestion event never cuts the rate below this fraction of it
RECOVERY_S = 3.0  # busy seconds to climb back to the ceiling
PROBE_GAIN = 0.2  # probing above the ceiling: rate = ceiling + PROBE_GAIN * sqrt(ceiling) * t**3
DOUBLING_S = 0.5  # slow start doubles the rate every DOUBLING_S busy seconds
MEASURE_REQUESTS = 80.0  # the accepted rate is measured over about this many requests...
MEASURE_MIN_S = 0.5  # ...but over at least this many seconds...
MEASURE_MAX_S = 3.0  # ...and at most this many (a client among many sends few: a longer span lags its own changes)
USE_REQUESTS = 40.0  # the send rate is measured over about this many requests
USE_SHARE = 0.7  # the rate only grows while the send rate is at least this share of it
SLOW_USE_REQUESTS = 2.0  # in slow start the send rate is measured over at least this many requests
BURST_S = 0.1  # capacity of our bucket, in seconds of the current rate (at least one token)
WINDOW_DECREASE = 0.9
LATENCY_GAIN = 0.2  # weight of a new sample in the smoothed latency (and loop lag)
LAG_SHARE = 0.02  # while the loop's lag exceeds this share of the latency, the target's latency does not rise
TARGET_HEADROOM = 1.25  # requests kept in flight, as a multiple of rate × latency
TOKEN_EPSILON = 1e-9  # float slack, so that waking at the computed instant always finds the token
TOKEN_DUE_S = 1e-9  # a token due sooner than this is here: at a huge rate the wait can be below the clock's step
PRIORITY_AGE_S = 1.0  # a page of priority ranks a request as if it had waited this much longer
PRIORITY_CAP = 20.0  # priorities count up to this many pages: nothing is passed over for much more than 20 s
FAIR_HEADROOM = 1.1  # a client told its fair share probes up to this multiple of it (or its ceiling, if higher)
BOUND_SHARE = 0.5  # a process whose accepted rate is below this share of its token rate is held by its demand
CONTENDED_SHARE = 0.02  # processes sharing a limit contend for it while this share of their requests is throttled


@dataclass(frozen=True, slots=True)
class RateState:
    """What the controller is doing, for heartbeats and logs."""

    rate_rps: float  # current token rate
    ceiling_rps: float | None  # estimated upstream limit at the last throttle (None before the first)
    accepted_rps: float  # recent successes per second
    window: int  # in-flight limit
    in_flight: int
    requests: int  # permits granted since start
    successes: int
    throttled: int  # 429 / allowance answers
    errors: int  # overloaded + failed answers
    retries: int  # retries allowed by the budget
    share_429: float  # throttled / answered over the stats window
    latency_s: float | None  # smoothed latency of successes
    paused_for_s: float  # remaining Retry-After pause


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay seconds or HTTP-date); None if unparseable.

    ``now`` is the wall-clock time (``time.time()`` by default) an HTTP-date is measured from.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def fair_share(peers: Iterable[tuple[float, float, int, int]]) -> float | None:
    """The fair share of one limit among processes, from each one's (accepted req/s, token rate, requests,
    throttles) over the last period: one whose accepted rate is below ``BOUND_SHARE`` of its token rate is held
    by its own demand and keeps what it uses; the others split the rest of what all of them are accepted equally
    (max-min fairness). None when fewer than two are bound by the limit, or under ``CONTENDED_SHARE`` of the
    requests were throttled (the limit is not contended: a peer finished, or the limit rose): nothing to share."""
    peers = list(peers)
    bound = [accepted for accepted, rate, *_ in peers if accepted >= BOUND_SHARE * rate > 0]
    requests, throttled = sum(p[2] for p in peers), sum(p[3] for p in peers)
    if len(bound) < 2 or not throttled or throttled < CONTENDED_SHARE * requests:
        return None
    return sum(bound) / len(bound)


class _Recent:
    """Timestamps of the events of the last ``span`` seconds."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._times: deque[float] = deque()

    def add(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float, span: float | None = None) -> int:
        """Events of the last ``span`` seconds (at most ``self.span``)."""
        cutoff = now - self.span
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()
        if span is None or span >= self.span:
            return len(self._times)
        cutoff = now - span
        return sum(1 for _ in takewhile(lambda t: t > cutoff, reversed(self._times)))


class _Queue:
    """Waiters served by rank, highest first, then in arrival order; a cancelled waiter is skipped."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = self._waiting = 0

    def __len__(self) -> int:
        """Waiters still waiting."""
        return self._waiting

    def join(self, rank: float) -> asyncio.Future[None]:
        """A new waiter's future, resolved when it is served."""
        waiter = asyncio.get_running_loop().create_future()
        self._arrivals += 1
        self._waiting += 1
        waiter.add_done_callback(self._left)
        heapq.heappush(self._heap, (-rank, self._arrivals, waiter))
        return waiter

    def _left(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():  # a served waiter was counted out by ``serve``
            self._waiting -= 1

    def serve(self) -> bool:
        """Resolve the first waiter still waiting; False when none is."""
        while self._heap:
            waiter = heapq.heappop(self._heap)[2]
            if not waiter.done():
                waiter.set_result(None)
                self._waiting -= 1
                return True
        return False

    def outranks(self, rank: float) -> bool:
        """Whether a waiter of a higher rank than ``rank`` waits."""
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        return bool(self._heap) and -self._heap[0][0] > rank


class _Turn:
    """A lock whose waiters take their turn by rank (``_Queue``), for the token bucket's one taker; the holder
    yields it to a higher rank that arrived meanwhile (``yield_to_higher``)."""

    def __init__(self) -> None:
        self._held = False
        self._queue = _Queue()

    async def acquire(self, rank: float) -> None:
        if not self._held:
            self._held = True
            return
        await self._wait(rank)

    async def yield_to_higher(self, rank: float) -> None:
        """Hand the turn to a waiter of a higher rank, if one waits, and wait for it back (if this raises, the
        turn is not held)."""
        if self._queue.outranks(rank):
            waiter = self._queue.join(rank)
            self._queue.serve()
            await self._wait(rank, waiter)

    async def _wait(self, rank: float, waiter: asyncio.Future[None] | None = None) -> None:
        waiter = waiter or self._queue.join(rank)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed the turn, then cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        if not self._queue.serve():
            self._held = False


class Permit:
    """One granted request: give exactly one verdict inside the ``slot()`` block.

    A block left without a verdict (an exception, a timeout, a cancellation) counts as ``lost()``.
    """

    __slots__ = ("_controller", "_sent_at", "_seq", "_verdict")

    def __init__(self, controller: AdaptiveRateController, seq: int, sent_at: float) -> None:
        self._controller = controller
        self._seq = seq  # grant order: tells requests sent before a reaction from those sent after
        self._sent_at = sent_at
        self._verdict: str | None = None

    def success(self) -> None:
        """The request was answered usefully."""
        self._settle("success")
        self._controller._on_success(self)

    def throttled(self, retry_after: float | str | None = None) -> None:
        """HTTP 429 / "surpassed your query allowance"; ``retry_after`` in seconds or the header value."""
        self._settle("throttled")
        self._controller._on_throttled(self, retry_after)

    def overloaded(self) -> None:
        """The server is overloaded: 5xx, "service is overloaded", an empty body under load."""
        self._settle("overloaded")
        self._controller._on_overloaded(self)

    def failed(self) -> None:
        """An answer, but a useless one that says nothing about load: an error page, a garbled or empty
        body, a statement timeout. Counted; the window and the rate stay."""
        self._settle("failed")
        self._controller._on_failed(self)

    def lost(self) -> None:
        """No answer at all: a timeout, a connection error, a cancelled request (the window shrinks)."""
        self._settle("lost")
        self._controller._on_lost(self)

    @property
    def settled(self) -> bool:
        """Whether a verdict was given."""
        return self._verdict is not None

    def _settle(self, verdict: str) -> None:
        if self._verdict is not None:
            raise RuntimeError(f"permit already settled as {self._verdict}")
        self._verdict = verdict


class AdaptiveRateController:
    """Adaptive token rate + in-flight window + Retry-After + backoff + retry budget (see module doc)."""

    def __init__(
        self,
        *,
        initial_rps: float = 5.0,
        min_rps: float = 0.2,
        max_rps: float | None = None,
        initial_window: int = 64,
        min_window: int = 1,
        max_window: int = 256,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        retry_ratio: float = 0.5,
        retry_min_per_s: float = 0.5,
        retry_window_s: float = 10.0,
        stats_window_s: float = 60.0,
        max_pause_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_rps <= (max_rps or math.inf):
            raise ValueError("need 0 < min_rps <= max_rps")
        if not 1 <= min_window <= max_window:
            raise ValueError("need 1 <= min_window <= max_window")
        self.min_rps = min_rps
        self.max_rps = max_rps
        self.min_window = min_window
        self.max_window = max_window
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.retry_ratio = retry_ratio
        self.retry_min_per_s = retry_min_per_s
        self.max_pause_s = max_pause_s
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

        now = clock()
        self._started_at = now
        # token bucket
        self._rate = self._clamp(initial_rps)
        self._tokens = 1.0
        self._refilled_at = now
        self._token_turn = _Turn()
        self._token_waited = False  # a taker had to wait for the next token (whoever of them takes it)
        self._paused_until = now
        # rate curve
        self._ceiling: float | None = None  # None: slow start
        self._cut_rate = self._rate
        self._busy = 0.0  # seconds the bucket was the binding constraint since the last decrease
        self._last_grant = now
        self._cut_after = 0  # permits granted up to this one were in flight at the last decrease
        # in-flight window
        self._window = float(max(min_window, min(max_window, initial_window)))  # admits floor(window)
        self._occupied = 0  # slots held: waiting for a token or in flight
        self._in_flight = 0
        self._window_waiters = _Queue()
        self._window_cut_after = 0  # the same for the last window decrease
        # measurements and counters
        self._sends = _Recent(MEASURE_MAX_S)
        self._answers = _Recent(stats_window_s)
        self._recent_throttles = _Recent(stats_window_s)
        self._budget_requests = _Recent(retry_window_s)
        self._budget_retries = _Recent(retry_window_s)
        self._latency: float | None = None
        self._upstream_latency: float | None = None  # the latency Little's law uses (see the module doc)
        self._lag = 0.0  # smoothed lateness of the event loop at grants
        self._requests = self._successes = self._throttled = self._errors = self._retries = 0
        self._fair: float | None = None  # this client's fair share of a limit shared with other processes
        self._throttled_at = -math.inf  # ``_requests`` at the last throttle

    @asynccontextmanager
    async def slot(self, priority: float = 0.0) -> AsyncIterator[Permit]:
        """Wait for a window slot and a token, then yield the request's ``Permit``. Waiters are served by
        ``priority``, highest first, then in arrival order (the longest chain of pages first: see
        ``clobjob.lanes``), a page of priority counting as ``PRIORITY_AGE_S`` of waiting (see the module doc)."""
        rank = min(priority, PRIORITY_CAP) * PRIORITY_AGE_S - self._clock()  # earlier and heavier go first
        await self._enter_window(rank)
        try:
            await self._take_token(rank)
        except BaseException:
            self._leave_window()
            raise
        now = self._clock()
        asyncio.get_running_loop().call_soon(self._measure_lag, now)
        self._requests += 1
        permit = Permit(self, self._requests, now)
        self._in_flight += 1
        self._budget_requests.add(now)
        try:
            yield permit
        finally:
            self._in_flight -= 1
            if permit._verdict is None:
                permit.lost()
            self._leave_window()

    def share(self, fair_rps: float | None) -> None:
        """Tell the controller its fair share of a limit it shares with other processes (``fair_share``), None
        when there is none to keep to: it then probes no higher than ``FAIR_HEADROOM`` × that share (or its own
        ceiling, if higher), see the module doc. A share binds only a client contended itself, one of whose last
        1 / ``CONTENDED_SHARE`` requests was throttled: one that was not is under a limit of its own (a pod behind
        another address), not the contended one."""
        contended = self._requests - self._throttled_at <= 1.0 / CONTENDED_SHARE
        self._fair = fair_rps if contended else None

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry ``attempt`` (1 = first): U(0, min(cap, base·2^(attempt-1)))."""
        exponent = min(max(attempt - 1, 0), 64)
        return self._rng.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * 2.0**exponent))

    def allow_retry(self) -> bool:
        """Whether the retry budget allows one more retry now; an allowed retry is counted."""
        now = self._clock()
        budget = self.retry_min_per_s * self._budget_retries.span
        budget += self.retry_ratio * self._budget_requests.count(now)
        if self._budget_retries.count(now) + 1 > budget:
            return False
        self._budget_retries.add(now)
        self._retries += 1
        return True

    def target_in_flight(self) -> int:
        """Requests worth having in flight (Little's law): the token rate (which settles at the accepted rate)
        × the upstream's smoothed latency (not the client's own queueing: see the module doc), with
        ``TARGET_HEADROOM`` so that the token bucket, not a lack of requests, is what binds (the rate only grows
        then); the window before the first answer. Within [min_window, max_window]."""
        if self._upstream_latency is None:
            return int(self._window)
        wanted = math.ceil(self._rate * self._upstream_latency * TARGET_HEADROOM) + 1
        return max(self.min_window, min(self.max_window, wanted))

    def demand(self) -> int:
        """Requests in flight or waiting for a slot of the window."""
        return self._occupied + len(self._window_waiters)

    def snapshot(self) -> RateState:
        """The current state, for heartbeats and logs."""
        now = self._clock()
        answers = self._answers.count(now)
        return RateState(
            rate_rps=self._rate,
            ceiling_rps=self._ceiling,
            accepted_rps=self._accepted_rate(now),
            window=int(self._window),
            in_flight=self._in_flight,
            requests=self._requests,
            successes=self._successes,
            throttled=self._throttled,
            errors=self._errors,
            retries=self._retries,
            share_429=self._recent_throttles.count(now) / answers if answers else 0.0,
            latency_s=self._latency,
            paused_for_s=max(0.0, self._paused_until - now),
        )

    # token bucket

    async def _take_token(self, rank: float) -> None:
        await self._token_turn.acquire(rank)
        holding = True
        try:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                self._refill(now)
                if self._tokens >= 1.0 - TOKEN_EPSILON or (1.0 - self._tokens) / self._rate < TOKEN_DUE_S:
                    break
                self._token_waited = True
                await self._sleep((1.0 - self._tokens) / self._rate)
                holding = False  # if cancelled while yielding, the turn is not ours
                await self._token_turn.yield_to_higher(rank)
                holding = True
            self._tokens = max(0.0, self._tokens - 1.0)
            self._sends.add(now)
            if self._token_waited and self._send_rate(now) >= USE_SHARE * self._rate:
                self._grow(now, min(now - self._last_grant, 1.0 / self._rate))  # the bucket binds
            self._last_grant, self._token_waited = now, False
        finally:
            if holding:
                self._token_turn.release()

    def _refill(self, now: float) -> None:
        capacity = max(1.0, self._rate * BURST_S)
        self._tokens = min(capacity, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now

    def _set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self._rate = self._clamp(rate)

    def _clamp(self, rate: float) -> float:
        return max(self.min_rps, min(rate, self.max_rps or math.inf))

    # rate curve

    def _grow(self, now: float, busy: float) -> None:
        if self._ceiling is None:  # a grant proves the bucket binds at this rate: at most a doubling per grant
            self._set_rate(self._rate * 2.0 ** min(busy / DOUBLING_S, 1.0), now)
            return
        self._busy += busy
        ceiling = self._ceiling
        if self._busy < RECOVERY_S:
            rate = ceiling - (ceiling - self._cut_rate) * (1.0 - self._busy / RECOVERY_S) ** 3
        else:
            rate = ceiling + PROBE_GAIN * math.sqrt(ceiling) * (self._busy - RECOVERY_S) ** 3
            cap = max(ceiling, FAIR_HEADROOM * self._fair) if self._fair is not None else math.inf
            if rate > cap:
                rate, self._busy = cap, self._busy - busy  # the curve's clock stops at the fair share
        self._set_rate(rate, now)

    def _decrease(self, permit: Permit, now: float, *, measured: bool) -> None:
        """Cut the rate; ``measured`` takes the ceiling from the accepted rate (throttles: the upstream
        bucket's burst hides the limit), otherwise from the current rate (an overload says nothing of it)."""
        if permit._seq <= self._cut_after:  # already in flight when we last reacted
            return
        ceiling = min(self._rate, self._accepted_rate(now)) if measured else self._rate
        if self._ceiling is not None and ceiling < self._ceiling:  # losing share to other clients: leave them room
            ceiling *= FAST_CONVERGENCE
        beta = SLOW_START_BETA if self._ceiling is None else BETA
        cut = self._clamp(max(beta * ceiling, MAX_CUT * self._rate))
        self._ceiling = max(ceiling, cut)
        self._cut_rate = cut
        self._busy = 0.0
        self._cut_after = self._requests
        self._set_rate(cut, now)

    def _accepted_rate(self, now: float) -> float:
        """Requests per second the upstream admitted, over about ``MEASURE_REQUESTS`` requests (in slow start,
        where the rate has been doubling, over the last ``MEASURE_MIN_S``): the sends less their throttles.
        A throttle answers at once while a useful answer comes a latency after its send, so counting answers
        lagged the sends by a latency: at 1.5 s pages under a 20 req/s limit it read 11-15 req/s while the
        rate ramped up, and the rate was cut to that."""
        requests = 0.0 if self._ceiling is None else MEASURE_REQUESTS
        sent = self._measured_rate(self._sends, now, requests)
        return max(0.0, sent - self._measured_rate(self._recent_throttles, now, requests))

    def _send_rate(self, now: float) -> float:
        """The recent send rate the growth rule compares with the rate: over about ``USE_REQUESTS`` requests, but in
        slow start over the last half doubling (at least ``SLOW_USE_REQUESTS``): averaged over a longer span, the
        sends of a doubling rate read below ``USE_SHARE`` of it and the rate would stall."""
        if self._ceiling is not None:
            return self._measured_rate(self._sends, now, USE_REQUESTS)
        span = max(min(max(DOUBLING_S / 2, SLOW_USE_REQUESTS / self._rate), now - self._started_at), 1e-3)
        return self._sends.count(now, span) / span

    def _measured_rate(self, events: _Recent, now: float, requests: float) -> float:
        """Events per second over about ``requests`` requests at the current rate."""
        span = min(max(MEASURE_MIN_S, requests / self._rate), MEASURE_MAX_S)
        span = max(min(span, now - self._started_at), 1e-3)
        return events.count(now, span) / span

    def _measure_lag(self, scheduled_at: float) -> None:
        """Called back right after a grant: how long ready work waits for the event loop."""
        self._lag += LATENCY_GAIN * (self._clock() - scheduled_at - self._lag)

    # in-flight window

    async def _enter_window(self, rank: float) -> None:
        waiter = self._window_waiters.join(rank)
        self._wake_window()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled: give it back
                self._leave_window()
            raise

    def _leave_window(self) -> None:
        self._occupied -= 1
        self._wake_window()

    def _wake_window(self) -> None:
        while self._occupied + 1 <= self._window and self._window_waiters.serve():
            self._occupied += 1

    def _shrink_window(self, permit: Permit) -> None:
        if permit._seq <= self._window_cut_after:
            return
        self._window = max(float(self.min_window), self._window * WINDOW_DECREASE)
        self._window_cut_after = self._requests

    # verdicts

    def _on_success(self, permit: Permit) -> None:
        now = self._clock()
        self._answers.add(now)
        self._successes += 1
        sample = now - permit._sent_at
        previous = sample if self._latency is None else self._latency
        self._latency = previous + LATENCY_GAIN * (sample - previous)
        if self._upstream_latency is None or self._lag <= LAG_SHARE * self._latency:
            self._upstream_latency = self._latency
        else:  # the client is queueing its own answers: the upstream is no slower than when it kept up
            self._upstream_latency = min(self._upstream_latency, self._latency)
        window = self._window
        if self._in_flight * 2 >= window and window < self.max_window:
            window = min(float(self.max_window), window + 1.0)
        window = max(window, float(self.target_in_flight()))  # never fewer slots than rate × latency needs
        if window > self._window:
            self._window = window
            self._wake_window()

    def _on_throttled(self, permit: Permit, retry_after: float | str | None) -> None:
        now = self._clock()
        self._answers.add(now)
        self._recent_throttles.add(now)
        self._throttled += 1
        self._throttled_at = self._requests
        delay = parse_retry_after(retry_after) if isinstance(retry_after, str) else retry_after
        if delay is not None and delay > 0:
            self._paused_until = max(self._paused_until, now + min(delay, self.max_pause_s))
        self._decrease(permit, now, measured=True)

    def _on_overloaded(self, permit: Permit) -> None:
        now = self._clock()
        self._answers.add(now)
        self._errors += 1
        self._decrease(permit, now, measured=False)
        self._shrink_window(permit)

    def _on_failed(self, permit: Permit) -> None:
        now = self._clock()
        self._answers.add(now)
        self._errors += 1

    def _on_lost(self, permit: Permit) -> None:
        self._errors += 1
        self._shrink_window(permit)


# --- the shared rate-controlled request loop -----------------------------------------------------

MIN_ATTEMPT_TIMEOUT_S = 5.0  # a first attempt may take at least this long …
LATENCY_TIMEOUTS = 10.0  # … or this many smoothed latencies


class Retryable(Exception):
    """A retryable answer; ``verdict`` is what the controller is told: ``throttled`` (Retry-After honoured),
    ``overloaded``, ``failed`` (a useless answer) or ``answered`` (a success for the rate: the request was at
    fault, not the load)."""

    def __init__(self, reason: str, verdict: str, retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.verdict, self.retry_after = verdict, retry_after

    def settle(self, permit: Permit) -> None:
        """Give ``permit`` this answer's verdict."""
        if self.verdict == "throttled":
            permit.throttled(self.retry_after)
        elif self.verdict == "overloaded":
            permit.overloaded()
        elif self.verdict == "answered":
            permit.success()
        else:
            permit.failed()


def attempt_timeout(controller: AdaptiveRateController, attempt: int, limit_s: float) -> float:
    """Seconds attempt ``attempt`` may take: a hung answer is cut after a few typical latencies, and each retry
    doubles the allowance up to ``limit_s``, so a legitimately slow request still gets through."""
    latency = controller.snapshot().latency_s or 1.0
    first = max(MIN_ATTEMPT_TIMEOUT_S, LATENCY_TIMEOUTS * latency)
    return min(limit_s, first * 2 ** (attempt - 1))


async def controlled_request(
    controller: AdaptiveRateController,
    send: Callable[[Permit, float], Awaitable[T]],
    *,
    what: str,
    max_attempts: int,
    timeout_s: float,
    on_retry: Callable[[Retryable], None] | None = None,
    priority: float = 0.0,
) -> T:
    """``send(permit, attempt_timeout_s)`` retried through ``controller`` (see the module doc).

    ``send`` raises ``Retryable`` for a retryable answer (its verdict is given here); a ``ClobjobError`` is an
    answer (a success for the rate) and propagates; a ``send`` that returns without a verdict is a success.
    ``on_retry`` sees every retryable answer and may raise to stop retrying; every attempt waits for its slot
    with ``priority``.
    """
    reason = ""
    for attempt in range(1, max_attempts + 1):
        if attempt > 1:
            await asyncio.sleep(controller.backoff(attempt - 1))
            while not controller.allow_retry():  # the budget delays retries, it never drops them
                await asyncio.sleep(controller.backoff(attempt - 1))
        try:
            async with controller.slot(priority) as permit:
                try:
                    result = await send(permit, attempt_timeout(controller, attempt, timeout_s))
                except Retryable as retry:
                    retry.settle(permit)
                    raise
                except ClobjobError:
                    permit.success()  # answered: the request or the source is at fault, not the rate
                    raise
                if not permit.settled:
                    permit.success()
                return result
        except Retryable as retry:
            reason = str(retry)
            if on_retry is not None:
                on_retry(retry)
            logger.debug("{} retry {}/{}: {}", what, attempt, max_attempts, reason)
    raise TransientSourceError(f"{what}: gave up after {max_attempts} attempts: {reason}")
