"""The embedded database over ClickHouse's HTTP interface, so several processes can share one chDB path.

chDB opens a database path in one process only. ``clobjob db serve`` is that process: it owns the path and
answers the subset of the HTTP interface (https://clickhouse.com/docs/interfaces/http) that clickhouse-connect
speaks — ``query`` in the URL, the form or the body; ``database``; ``param_*`` bound parameters; settings as
URL parameters; compressed request bodies; ``INSERT … FORMAT X`` with the data in the body; errors as
``Code: N. DB::Exception: …`` with ``X-ClickHouse-Exception-Code``. With it, ``CLOBJOB_CLICKHOUSE_URL`` is a
plain ``http://`` URL, so workers run as separate processes exactly as pods talk to a ClickHouse server.

Statements run one at a time on one engine thread (chDB connections are not thread-safe); the event loop
keeps accepting meanwhile. It binds to loopback by default and has no authentication: it is a local tool.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import re
import tempfile
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from clobjob.serving import LocalServer
from clobjob.store.database import SERVED_AT

# URL parameters of the HTTP interface that are not ClickHouse settings.
TRANSPORT_PARAMS = frozenset({
    "query", "database", "query_id", "session_id", "session_timeout", "session_check", "default_format",
    "client_protocol_version", "enable_http_compression", "wait_end_of_query", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "user", "password", "quota_key", "compress", "decompress",
    "buffer_size", "http_response_buffer_size", "cancel_http_readonly_queries_on_client_close",
})
_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_INSERT_HEAD = re.compile(rb"\A\s*INSERT\s.*?\bFORMAT\s+\w+[ \t]*\r?\n?", re.IGNORECASE | re.DOTALL)
_SETTING_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_CODE = re.compile(r"Code: (\d+)\.")


class EngineError(Exception):
    """A statement the engine refused; ``code`` is ClickHouse's error code (0 when unknown)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = _CODE.search(message)
        self.code = int(found.group(1)) if found else 0


def decompress(body: bytes, encoding: str) -> bytes:
    """A request body in the given ``Content-Encoding``, decoded. clickhouse-connect compresses each insert
    block on its own, so an lz4 or zstd body is a sequence of frames: every one of them is decoded."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)  # every member
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        frame = lz4.frame.LZ4FrameDecompressor
    elif encoding == "zstd":
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            from backports import zstd  # what clickhouse-connect installs before 3.14

        frame = zstd.ZstdDecompressor
    else:
        raise EngineError(f"Code: 36. DB::Exception: Unknown Content-Encoding {encoding!r}. (BAD_ARGUMENTS)")
    decoded, rest = bytearray(), body
    while rest:
        decoder = frame()
        decoded += decoder.decompress(rest)
        rest = decoder.unused_data
    return bytes(decoded)


def split_statement(query: bytes, body: bytes) -> tuple[str, bytes | memoryview]:
    """(statement, insert data) of a request, by the HTTP interface's rule: the query is the ``query``
    parameter followed by the body; an ``INSERT … FORMAT X`` statement's data starts after its first line.
    The data is a view of the body, not a copy (insert bodies are megabytes)."""
    if query and body and _INSERT_HEAD.match(query + b"\n"):  # the statement in the URL, the data in the body
        return query.strip().decode(), body
    text = query + b"\n" + body if query and body else query or body
    head = _INSERT_HEAD.match(text)
    if head is None:
        return text.decode(), b""
    return head.group(0).rstrip().decode(), memoryview(text)[head.end():]


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class EmbeddedEngine:
    """One chDB connection on one thread: statements with their database, bound parameters and settings."""

    def __init__(self, path: str) -> None:
        import chdb

        os.makedirs(path, exist_ok=True)
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clobjob-engine")
        self._conn = self._thread.submit(chdb.connect, path).result()
        self._database = ""
        self._settings: dict[str, str] = {}
        self.timezone = self._run_now("SELECT timezone()", "", b"", {}, {}, "TabSeparated")[0].decode().strip()

    async def run(self, statement: str, database: str, data: bytes | memoryview, params: dict[str, str],
                  settings: dict[str, str], fmt: str) -> tuple[bytes, dict[str, str]]:
        """Run one statement on the engine thread; returns (result bytes in ``fmt``, summary)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._run_now, statement, database, data, params, settings, fmt)

    def _run_now(self, sql: str, database: str, data: bytes | memoryview, params: dict[str, str],
                 settings: dict[str, str], fmt: str) -> tuple[bytes, dict[str, str]]:
        for name in settings:
            if not _SETTING_NAME.match(name):
                raise EngineError(f"Code: 115. DB::Exception: Unknown setting {name!r}. (UNKNOWN_SETTING)")
        try:
            if database and database != self._database:
                self._conn.query(f"USE `{database.replace('`', '')}`", "TabSeparated")
                self._database = database
            self._apply(settings)
            if data:
                return self._insert(sql, data, params)
            result = self._conn.query(sql, fmt, params=params)
            return result.bytes(), {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read())}
        except EngineError:
            raise
        except Exception as exc:  # chDB raises its own error type with ClickHouse's message
            raise EngineError(str(exc)) from None

    def _apply(self, settings: dict[str, str]) -> None:
        """Make the session's settings exactly ``settings`` (clients send the same few with every request)."""
        for name in self._settings.keys() - settings.keys():
            self._conn.query(f"SET {name} = DEFAULT", "TabSeparated")
            del self._settings[name]
        for name, value in settings.items():
            if self._settings.get(name) != value:
                self._conn.query(f"SET {name} = {_quote(value)}", "TabSeparated")
                self._settings[name] = value

    def _insert(self, sql: str, data: bytes | memoryview, params: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """``INSERT … FORMAT X`` with its data: chDB reads the data from a file (``FROM INFILE``)."""
        with tempfile.NamedTemporaryFile(prefix="clobjob-insert-", dir=self.path) as block:
            block.write(data)
            block.flush()
            statement = _FORMAT.sub(lambda m: f"FROM INFILE {_quote(block.name)} FORMAT {m.group(1)}", sql, count=1)
            result = self._conn.query(statement, "TabSeparated", params=params)
            return b"", {"written_rows": str(result.rows_written()), "written_bytes": str(len(data))}

    def close(self) -> None:
        """Close the connection and release the database path."""
        self._thread.submit(self._conn.close).result()
        self._thread.shutdown()


class EngineServer(LocalServer):
    """``EmbeddedEngine`` behind ClickHouse's HTTP interface on ``host:port``; ``url`` is the DSN to give clobjob.

    With ``password`` every query must carry it (HTTP basic auth, ``X-ClickHouse-Key`` or the ``password``
    parameter, as ClickHouse takes it), any user name.
    """

    def __init__(self, path: str, host: str = "127.0.0.1", port: int = 0, *, password: str | None = None) -> None:
        super().__init__(host, port)
        self.engine = EmbeddedEngine(path)
        self.password = password

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/ping", self._ping)
        app.router.add_route("*", "/", self._query)
        return app

    async def start(self) -> None:
        """Serve, recording the pid and URL in the database directory (a command refused the held database names
        the URL to use instead)."""
        await super().start()
        served = Path(self.engine.path) / SERVED_AT
        served.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "url": self.url}))
        served.with_suffix(".tmp").replace(served)

    async def stop(self) -> None:
        """Stop serving and release the database path."""
        (Path(self.engine.path) / SERVED_AT).unlink(missing_ok=True)
        await super().stop()
        self.engine.close()

    def _authenticate(self, request: web.Request, fields: dict[str, str]) -> None:
        if self.password is None:
            return
        user, given = fields.get("user", "default"), fields.get("password", request.headers.get("X-ClickHouse-Key"))
        if request.headers.get("Authorization", "").startswith("Basic "):
            user, _, given = base64.b64decode(request.headers["Authorization"][6:]).decode().partition(":")
        if given != self.password:
            raise EngineError(f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, or "
                              "there is no user with such name. (AUTHENTICATION_FAILED)")

    async def _ping(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _query(self, request: web.Request) -> web.Response:
        fields: dict[str, str] = dict(request.query)
        body = b""
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            fields.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        elif request.can_read_body:
            body = await request.read()
        query_id = fields.get("query_id") or str(uuid.uuid4())
        try:
            self._authenticate(request, fields)
            body = decompress(body, request.headers.get("Content-Encoding", ""))
            statement, data = split_statement(fields.get("query", "").encode(), body)
            if not statement.strip():
                return web.Response(text="Ok.\n")
            named = _FORMAT.search(statement)
            fmt = named.group(1) if named else fields.get("default_format", "TabSeparated")
            params = {k.removeprefix("param_"): v for k, v in fields.items() if k.startswith("param_")}
            settings = {k: v for k, v in fields.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")}
            result, summary = await self.engine.run(statement, fields.get("database", ""), data, params,
                                                    settings, fmt)
        except EngineError as exc:
            return web.Response(status=500, text=f"{exc}\n", headers={
                "X-ClickHouse-Exception-Code": str(exc.code), "X-ClickHouse-Query-Id": query_id})
        return web.Response(body=result, headers={
            "Content-Type": "application/octet-stream", "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Timezone": self.engine.timezone, "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps(summary)})


def serve(path: str, host: str = "127.0.0.1", port: int = 8123) -> None:
    """Serve the embedded database at ``path`` until SIGINT/SIGTERM, printing its URL on stdout."""
    EngineServer(path, host, port).serve_until_signalled(
        f"clobjob db serve: {path} over ClickHouse's HTTP interface")
