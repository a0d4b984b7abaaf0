"""The pieces of a chaos run, as pods against servers: the served database (with traps that catch an insert in
flight, and a stop/start on the same port), the Indexed Job (worker processes per index, restarted when killed or
failed), and the comparison with the ground truth after ``FINAL``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aiohttp import web

from clobjob.sim import Dataset, export
from clobjob.store.serve import EngineServer
from tests.truth import expected_rows, run_cli, stored_rows

_INSERT_INTO = re.compile(r"^\s*INSERT\s+INTO\s+(?:`?\w+`?\.)?`?(\w+)`?", re.IGNORECASE)
_PEER: ContextVar[int] = ContextVar("peer", default=0)  # the client port of the request being served
RESTARTED = {1, -signal.SIGKILL, 137}  # what the Job restarts: a failure or a kill (exit 2 and 143 are final)

# Beats and stalls short enough that a CI run sees many; an outage budget of 60 s; the default flush interval, 2 s:
# longer than a page's request (0.8 s), so that a page's rows can be stored within one interval of its request.
FAST = {"CLOBJOB_FLUSH_INTERVAL_S": "2", "CLOBJOB_HEARTBEAT_INTERVAL_S": "0.5", "CLOBJOB_STALL_TIMEOUT_S": "3",
        "CLOBJOB_REQUEST_TIMEOUT_S": "2", "CLOBJOB_STORE_OUTAGE_S": "60", "CLOBJOB_LOG_FORMAT": "json"}


@dataclass
class Trap:
    """An armed trap: ``caught`` is set when an insert into ``table`` is in flight (held ``hold_s`` before it
    runs, or after it ran and before it is answered); ``peer`` is the client's port."""

    table: str
    after: bool
    hold_s: float
    caught: threading.Event = field(default_factory=threading.Event)
    peer: int = 0


class TrappedEngineServer(EngineServer):
    """``clobjob db serve`` counting the inserts into each table, with traps that hold one in flight."""

    def __init__(self, path: str, port: int = 0, inserts: Counter[str] | None = None) -> None:
        super().__init__(path, port=port)
        self.inserts: Counter[str] = Counter() if inserts is None else inserts
        self._traps: dict[str, Trap] = {}
        self._engine_run, self.engine.run = self.engine.run, self._run  # type: ignore[method-assign]

    def arm(self, table: str, *, after: bool = False, hold_s: float = 0.5) -> Trap:
        """Hold the next insert into ``table`` in flight for ``hold_s`` (before it runs, or ``after``)."""
        trap = self._traps[table] = Trap(table, after, hold_s)
        return trap

    async def _query(self, request: web.Request) -> web.Response:
        _PEER.set(request.transport.get_extra_info("peername")[1] if request.transport else 0)
        return await super()._query(request)

    async def _run(self, statement: str, *args: Any) -> tuple[bytes, dict[str, str]]:
        found = _INSERT_INTO.match(statement)
        table = found.group(1) if found else ""
        if table:
            self.inserts[table] += 1
        trap = self._traps.pop(table, None) if table else None
        if trap is None:
            return await self._engine_run(statement, *args)
        trap.peer = _PEER.get()
        if not trap.after:
            trap.caught.set()
            await asyncio.sleep(trap.hold_s)
        answer = await self._engine_run(statement, *args)
        if trap.after:
            trap.caught.set()
            await asyncio.sleep(trap.hold_s)
        return answer


class Database:
    """The served database of a chaos run, which the test can stop and start again on the same path and port."""

    def __init__(self, path: Path) -> None:
        self.path, self.port = path, 0
        self.inserts: Counter[str] = Counter()  # inserts by table, over every start
        self.server: TrappedEngineServer | None = None
        self._serving: AbstractContextManager | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve the path (again), on the port it had."""
        self.server = TrappedEngineServer(str(self.path), port=self.port, inserts=self.inserts)
        self._serving = self.server.run_in_thread()
        self._serving.__enter__()
        self.port = self.server.port

    def stop(self) -> None:
        """The server goes away: connections refused until ``start``."""
        if self._serving is not None:
            self._serving.__exit__(None, None, None)
            self._serving = None

    @contextmanager
    def down_for(self, seconds: float) -> Iterator[None]:
        """Stopped for ``seconds``, then started again."""
        self.stop()
        try:
            time.sleep(seconds)
            yield
        finally:
            self.start()


def client_pid(port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` owns the loopback TCP connection whose local port is ``port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            inode = fields[9]
            break
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class Job:
    """The Indexed Job on one machine: ``copies`` ``clobjob worker`` processes per index (more than one: two pods
    on one index), each restarted when it is killed or exits 1, as the Job controller does."""

    def __init__(self, env: dict[str, str], run_id: str, indices: int, logs: Path, *, copies: int = 1,
                 max_restarts: int = 200) -> None:
        self.env, self.run_id, self.logs, self.max_restarts = env, run_id, logs, max_restarts
        logs.mkdir(parents=True, exist_ok=True)
        self.slots = [(index, copy) for index in range(indices) for copy in range(copies)]
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}
        self.exits: dict[tuple[int, int], int] = {}
        self.restarts = 0
        self.spawned: Counter[tuple[int, int]] = Counter()
        self.log_from: dict[tuple[int, int], int] = {}  # where the log of each slot's current process begins
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    def __enter__(self) -> Self:
        for slot in self.slots:
            self._spawn(slot)
        self._supervisor.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._supervisor.join()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _spawn(self, slot: tuple[int, int]) -> None:
        index, copy = slot
        log = open(self.logs / f"worker-{index}-{copy}.log", "a")  # noqa: SIM115 - the child owns it
        self.spawned[slot] += 1  # each pod a name of its own, as Kubernetes gives
        self.log_from[slot] = log.tell()
        env = {**self.env, "JOB_COMPLETION_INDEX": str(index),
               "POD_NAME": f"chaos-{index}-{copy}-{self.spawned[slot]}"}
        self.procs[slot] = subprocess.Popen([sys.executable, "-m", "clobjob", "worker", "--run-id", self.run_id],
                                            env=env, stdout=subprocess.DEVNULL, stderr=log)
        log.close()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                for slot, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or slot in self.exits:
                        continue
                    if code in RESTARTED and self.restarts < self.max_restarts:
                        self.restarts += 1
                        self._spawn(slot)
                    else:
                        self.exits[slot] = code
            time.sleep(0.05)

    def live(self) -> list[int]:
        """The pids of the worker processes running now."""
        with self._lock:
            return [p.pid for s, p in self.procs.items() if s not in self.exits and p.poll() is None]

    def signal(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to one of the Job's workers (False when it already ended)."""
        with self._lock:
            if pid not in [p.pid for p in self.procs.values() if p.poll() is None]:
                return False
            os.kill(pid, sig)
            return True

    def fetching(self, pid: int) -> int | None:
        """The index a worker process of the Job works once it has loaded its units and started them (None
        before, or when it is no longer one of the Job's)."""
        with self._lock:
            slot = next((slot for slot, p in self.procs.items() if p.pid == pid), None)
        if slot is None:
            return None
        with open(self.logs / f"worker-{slot[0]}-{slot[1]}.log", "rb") as log:
            log.seek(self.log_from[slot])
            return slot[0] if b"shard starts" in log.read() else None

    def done(self) -> bool:
        with self._lock:
            return len(self.exits) == len(self.slots)

    def wait(self, timeout_s: float) -> dict[tuple[int, int], int]:
        """Every slot's final exit code (AssertionError when the Job has not finished within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not self.done():
            assert time.monotonic() < deadline, f"the job did not finish within {timeout_s} s: {self.exits}"
            time.sleep(0.1)
        return dict(self.exits)

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.glob("worker-*.log")))


def prepare(workdir: Path, dataset: Dataset, seed: int, db: Database, sim_url: str, database: str,
            shards: int, run_id: str, **extra: str) -> dict[str, str]:
    """The environment of a chaos run's processes; markets loaded and synced, the run planned."""
    env = {**os.environ, **FAST, "CLOBJOB_CLICKHOUSE_URL": db.url, "CLOBJOB_CLICKHOUSE_DATABASE": database,
           "CLOBJOB_SUBGRAPH_URL": sim_url, "CLOBJOB_HOME": str(workdir / "home"), **extra}
    for name in ("WORKER_COUNT", "DELAY_MS", "BATCH_SIZE", "CLOBJOB_RPC_URL", "CLOBJOB_SOURCE"):
        env.pop(name, None)
    markets_file, _ = export(workdir / "export", markets=len(dataset.markets), seed=seed)
    for args in (("markets", "load", str(markets_file)), ("markets", "sync"),
                 ("plan", "--shards", str(shards), "--run-id", run_id)):
        done = run_cli(env, *args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    return env


@dataclass
class Outcome:
    """What a chaos run ended with, against the ground truth."""

    expected: int
    stored: int
    missing: int
    extra: int
    differing: int
    raw_rows: int
    status_state: str
    status_fills: int
    status_units: tuple[int, int, int]  # done, failed, total

    @property
    def duplicated(self) -> int:
        """Raw rows beyond one per fill before FINAL (harmless: FINAL and queries by id see one)."""
        return self.raw_rows - self.stored


def outcome(env: dict[str, str], dataset: Dataset, run_id: str) -> Outcome:
    """The stored fills after FINAL against the ground truth, the raw row count, and ``clobjob status``."""
    truth, found = expected_rows(dataset), stored_rows(env)
    rows = found["rows"]
    shown = run_cli(env, "status", "--run-id", run_id, "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    status = json.loads(shown.stdout)
    agg = status["aggregate"]
    return Outcome(expected=len(truth), stored=len(rows), missing=len(truth.keys() - rows.keys()),
                   extra=len(rows.keys() - truth.keys()),
                   differing=sum(1 for k in truth.keys() & rows.keys() if truth[k] != rows[k]),
                   raw_rows=raw_count(env), status_state=status["state"], status_fills=agg["fills"],
                   status_units=(agg["units_done"], agg["units_failed"], agg["units_total"]))


RAW = ("from clobjob.config import Settings\nfrom clobjob.store import open_store\n"
       "with open_store(Settings()) as s: print(s.db.scalar('SELECT count() FROM {db}.clob_fills'))")


def raw_count(env: dict[str, str]) -> int:
    """Rows of clob_fills before FINAL (duplicates of a re-fetched page included)."""
    done = subprocess.run([sys.executable, "-c", RAW], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    return int(done.stdout.strip())


def insert_raw_progress(client: Any, database: str, **values: Any) -> None:
    """Write one ``backfill_progress`` row as RowBinary, which ClickHouse stores unchecked, as a hand edit or
    another tool could: a state Enum8 code outside the enum (``state=7``), a negative count (``fills=-5``)."""

    def string(text: str) -> bytes:
        data = text.encode()
        out, n = bytearray(), len(data)
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out) + data

    row = {"shard": 0, "cursor": "", "fills": 0, "pages": 0, "attempts": 0, "last_error": "", "pod": "vandal",
           "updated_at": int(time.time() * 1000), "version": time.time_ns(), **values}
    layout = (("run_id", string), ("shard", "<I"), ("unit_id", "<I"), ("state", "<b"), ("cursor", string),
              ("fills", "<q"), ("pages", "<q"), ("attempts", "<i"), ("last_error", string), ("pod", string),
              ("updated_at", "<q"), ("version", "<Q"))
    body = b"".join(kind(row[name]) if callable(kind) else struct.pack(kind, row[name]) for name, kind in layout)
    client.raw_insert(f"`{database}`.backfill_progress", column_names=[name for name, _ in layout],
                      insert_block=body, fmt="RowBinary")
