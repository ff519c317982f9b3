"""The local host's HTTP/1.1 server: what its function routes need, and no more.

Why not aiohttp's server (the inspector still uses it): per request, on a 2-vCPU machine, its
server side costs 120 to 160 µs of CPU where a plain asyncio protocol costs about 65 (measured
with the benchmark's load generator against a handler that does nothing). That difference was
a tenth of the local host's whole budget per event (docs/performance.md).

What it implements (RFC 9110 and 9112):

- request line and header fields; a head larger than `MAX_HEAD_BYTES` is refused (431); a bare
  LF ends a line as well as CRLF; obsolete line folding, a malformed field or request line is
  refused (400), and so is a version other than HTTP/1.0 and HTTP/1.1 (the contract allows no
  5xx but the 503 of an unavailable queue, so not 505);
- a body by `Content-Length` or by the chunked transfer coding. Both at once, a list of
  differing lengths, or another transfer coding is refused (400, not 501): the ambiguity request
  smuggling relies on never reaches a route;
- at most `body_limit` bytes of a body are read. A longer one is cut there and handed over as
  it is, so the function answers 413 itself (counted and logged by the receiver); the rest is
  read and discarded for a short while (`LINGER_SECONDS`, so the client reads the answer
  instead of a connection reset), then the connection is closed;
- `Expect: 100-continue` is answered before the body is read;
- persistent connections (HTTP/1.1 unless `Connection: close`; HTTP/1.0 with
  `Connection: keep-alive`), pipelined requests answered one at a time, in order;
- the slow-client limits of connections.py: the first head within `header_timeout` of the
  connection, each later head within `idle_timeout`, and no body byte for `idle_timeout`
  gets 408; each closes the connection;
- 404 for a path with no route, 405 (with `Allow`) for a route and another method, 500 when a
  route raises; routes with parameters (`/api/vehicles/{vehicleId}`) as routes.py matches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDict, CIMultiDictProxy

from .routes import RouteTemplate, route_template

logger = logging.getLogger(__name__)

#: Request line and header fields together (aiohttp's limit for one line is 8190 bytes).
MAX_HEAD_BYTES = 32 * 1024
#: A chunk-size line (size, extensions) and the trailer section.
MAX_CHUNK_LINE_BYTES = 4096
MAX_TRAILER_BYTES = 8192
#: After a body was cut at the limit, how long its rest is read and thrown away before closing.
LINGER_SECONDS = 2.0
#: Out of file descriptors, accepting resumes after this long (asyncio's own loop waits 1 s).
ACCEPT_RETRY_SECONDS = 1.0
#: Reading pauses while this much is buffered (pipelined requests waiting for their turn).
_MAX_BUFFERED = 256 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    #: The request target as sent (path and query, percent-encoded).
    target: str
    #: The decoded path, which routes match.
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes
    #: True when the body was longer than the limit and cut there.
    truncated: bool
    #: The parameters of the route template that matched (routes.py), else empty.
    route_params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] | None = None


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(status: int, body: object, **headers: str) -> Response:
    return Response(status, json.dumps(body, separators=(",", ":")).encode(),
                    {"Content-Type": "application/json", **headers})


_date_cache: tuple[int, bytes] = (0, b"")


def _date_header() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


#: Status line of every status `http.HTTPStatus` names (an enum lookup per answer costs ~1 µs).
_STATUS_LINES: dict[int, bytes] = {
    int(status): b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode()) for status in HTTPStatus
}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return b"HTTP/1.1 %d Unknown\r\n" % status if line is None else line


def encode_response(response: Response, *, close: bool, head: bool = False) -> bytes:
    """The response's bytes; for a HEAD request its head only (with the body's length)."""
    lines = [_status_line(response.status)]
    for name, value in (response.headers or {}).items():
        if name.lower() in ("content-length", "connection", "transfer-encoding", "date"):
            continue
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    lines.append(b"Content-Length: %d\r\nDate: %s\r\n" % (len(response.body), _date_header()))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(response.body)
    return b"".join(lines)


@dataclass(frozen=True, slots=True)
class _Head:
    method: str
    target: str
    version: tuple[int, int]
    headers: CIMultiDict[str]
    keep_alive: bool
    chunked: bool
    length: int


def _elements(headers: CIMultiDict[str], name: str) -> list[str]:
    """The comma-separated elements of every `name` field, stripped; [] when there is none."""
    values = headers.getall(name, ())
    return [e.strip() for e in ",".join(values).split(",")] if values else []


def parse_head(raw: bytes) -> _Head:
    """The request line and fields of one head (without its blank line); BadRequest if bad."""
    lines = raw.split(b"\n")
    first = lines[0].removesuffix(b"\r")
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        raise BadRequest(400, "malformed request line")
    method, target, major, minor = match.groups()
    version = (int(major), int(minor))
    if version not in ((1, 0), (1, 1)):
        raise BadRequest(400, "HTTP version not supported")
    if not target.startswith(b"/"):
        raise BadRequest(400, "the request target must be a path")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise BadRequest(400, "malformed header field")
        value = value.strip(b" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise BadRequest(400, "invalid character in a header field value")
        headers.add(name.decode("ascii"), value.decode("latin-1"))
    connection = {t.lower() for t in _elements(headers, "Connection")}
    keep_alive = "close" not in connection and (version == (1, 1) or "keep-alive" in connection)
    encodings = _elements(headers, "Transfer-Encoding")
    lengths = _elements(headers, "Content-Length")
    chunked = False
    length = 0
    if encodings:
        if lengths:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if version == (1, 0):
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        if [e.lower() for e in encodings] != ["chunked"]:
            raise BadRequest(400, "only the chunked transfer coding is supported")
        chunked = True
    elif lengths:
        values = set(lengths)
        if len(values) != 1:
            raise BadRequest(400, "differing Content-Length values")
        (declared,) = values
        if not declared.isdigit() or not declared.isascii() or len(declared) > 18:
            raise BadRequest(400, "invalid Content-Length")
        length = int(declared)
    return _Head(method.decode("ascii"), target.decode("latin-1"), version, headers,
                 keep_alive, chunked, length)


class _Connection(asyncio.Protocol):
    """One client connection: heads and bodies parsed as bytes arrive, one request at a time."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] = self._close
        self._head: _Head | None = None
        self._body = bytearray()
        self._chunk_left = -1  # chunked: bytes left in the current chunk (-1: a size line next)
        self._in_trailer = False
        self._handling: asyncio.Task[None] | None = None
        self._lingering = False
        self._closing = False
        self._paused = False
        self._eof = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        self._arm(self._server.header_timeout, self._close_silently)

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._closing:
            return  # the rest of a body that was cut: read and thrown away
        self._buffer += data
        if self._handling is None:
            self._advance()
        elif len(self._buffer) > _MAX_BUFFERED and not self._paused:
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self._handling is None:
            self._close()  # nothing more will come: no request to wait for, nothing to linger on
        return True  # keep the write side open for the answer being made

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.closed(self)
        self._transport = None
        # A request being answered runs to its end (as with aiohttp's default): a webhook
        # whose client went away may still be stored, and is then simply a duplicate later.

    # -- parsing ----------------------------------------------------------------------------
    def _advance(self) -> None:
        """Parse what is buffered as far as it goes; start a request when one is complete."""
        try:
            if self._head is None:
                found = _HEAD_END.search(self._buffer)
                if found is None:
                    if len(self._buffer) > MAX_HEAD_BYTES:
                        raise BadRequest(431, "request head too large")
                    return
                if found.start() > MAX_HEAD_BYTES:
                    raise BadRequest(431, "request head too large")
                head = parse_head(bytes(self._buffer[: found.start()]))
                del self._buffer[: found.end()]
                self._head = head
                if ((head.chunked or head.length) and not self._buffer
                        and head.version == (1, 1)
                        and head.headers.get("Expect", "").lower() == "100-continue"):
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self._read_body(self._head):
                self._start(self._head)
            elif self._head.chunked or self._head.length:
                self._arm(self._server.idle_timeout, self._body_stalled)
        except BadRequest as exc:
            self._refuse(exc)

    def _read_body(self, head: _Head) -> bool:
        """Move body bytes from the buffer; True when the body is complete (or cut)."""
        limit = self._server.body_limit
        if not head.chunked:
            want = min(head.length, limit + 1) - len(self._body)
            take = min(want, len(self._buffer))
            self._body += self._buffer[:take]
            del self._buffer[:take]
            return len(self._body) >= min(head.length, limit + 1)
        while True:
            if len(self._body) > limit:
                return True
            if self._in_trailer:
                line = self._take_line(MAX_TRAILER_BYTES, "chunked trailer too large")
                if line is None:
                    return False
                if not line:
                    return True
                continue
            if self._chunk_left < 0:
                line = self._take_line(MAX_CHUNK_LINE_BYTES, "chunk size line too long")
                if line is None:
                    return False
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF"
                                                     for c in size):
                    raise BadRequest(400, "malformed chunk size")
                self._chunk_left = int(size, 16)
                if self._chunk_left == 0:
                    self._in_trailer = True
                continue
            if self._chunk_left > 0:
                take = min(self._chunk_left, len(self._buffer), limit + 1 - len(self._body))
                if take == 0:
                    return len(self._body) > limit
                self._body += self._buffer[:take]
                del self._buffer[:take]
                self._chunk_left -= take
                continue
            # The CRLF after a chunk's data.
            if len(self._buffer) < 2 and self._buffer[:1] != b"\n":
                return False
            if self._buffer[:2] == b"\r\n":
                del self._buffer[:2]
            elif self._buffer[:1] == b"\n":
                del self._buffer[:1]
            else:
                raise BadRequest(400, "chunk data not followed by a line end")
            self._chunk_left = -1

    def _take_line(self, limit: int, too_long: str) -> bytes | None:
        """The next line of the buffer without its line end; None until it is complete."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > limit:
                raise BadRequest(400, too_long)
            return None
        line = bytes(self._buffer[:end]).removesuffix(b"\r")
        del self._buffer[: end + 1]
        return line

    # -- answering --------------------------------------------------------------------------
    def _start(self, head: _Head) -> None:
        self._cancel_timer()
        body = bytes(self._body)
        truncated = len(body) > self._server.body_limit
        self._body = bytearray()
        self._head = None
        self._chunk_left = -1
        self._in_trailer = False
        path, _, query = head.target.partition("?")
        request = Request(
            method=head.method, target=head.target, path=unquote(path),
            query=dict(parse_qsl(query, keep_blank_values=True)),
            headers=CIMultiDictProxy(head.headers), body=body, truncated=truncated,
        )
        close = not head.keep_alive or truncated or self._server.stopping
        self._handling = self._server.track(self._answer(request, close=close))

    async def _answer(self, request: Request, *, close: bool) -> None:
        try:
            response = await self._server.dispatch(request)
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = json_response(500, {"error": "internal error"})
        self._handling = None
        if self._transport is None:
            return
        close = close or self._eof or self._server.stopping
        self._write(encode_response(response, close=close, head=request.method == "HEAD"))
        if request.truncated:
            self._linger()
        elif close:
            self._close()
        else:
            if self._paused:
                self._paused = False
                self._transport.resume_reading()
            self._arm(self._server.idle_timeout, self._close_silently)
            if self._buffer:
                self._advance()

    def _refuse(self, exc: BadRequest) -> None:
        logger.debug("refusing a request: %s", exc)
        self._write(encode_response(json_response(exc.status, {"error": str(exc)}), close=True))
        self._linger()

    def _body_stalled(self) -> None:
        seconds = self._server.idle_timeout
        self._write(encode_response(
            json_response(408, {"error": f"no request body bytes for {seconds:.0f} s"}),
            close=True))
        self._close()

    # -- connection -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _linger(self) -> None:
        """Read and discard for a while before closing: closing with unread bytes would send a
        reset, which can destroy the answer before the client reads it."""
        self._lingering = True
        self._buffer.clear()
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        if self._eof:
            self._close()
        else:
            self._arm(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()

    def _close_silently(self) -> None:
        logger.debug("closing a connection idle, or without a complete request head, too long")
        self._close()

    def close_if_idle(self) -> None:
        """At stop: close now unless a request is being answered (or half-read)."""
        if self._handling is None and self._head is None and not self._buffer:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `seconds` unless re-armed or cancelled first. One timer handle
        serves a connection's successive deadlines: a later deadline only moves a number, and
        the handle, when it fires early, waits on for the rest."""
        deadline = self._loop.time() + seconds
        self._deadline, self._on_deadline = deadline, callback
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._tick)
            return
        callback, self._deadline = self._on_deadline, None
        callback()

    def _cancel_timer(self) -> None:
        self._deadline = None  # a pending handle finds no deadline and does nothing


class HttpServer:
    """Routes (method, path) to handlers. `await start(host, port)`, `await stop(grace)`."""

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        *,
        body_limit: int,
        header_timeout: float,
        idle_timeout: float,
    ) -> None:
        # Paths without parameters are one dict lookup (the webhook routes); templates such
        # as `/api/vehicles/{vehicleId}` are tried after them, in declaration order.
        self._routes: dict[tuple[str, str], Handler] = {}
        self._methods: dict[str, list[str]] = {}
        self._templates: dict[str, tuple[RouteTemplate, dict[str, Handler]]] = {}
        for (method, path), handler in routes.items():
            template = route_template(path)
            if template is None:
                self._routes[method, path] = handler
                self._methods.setdefault(path, []).append(method)
            else:
                self._templates.setdefault(path, (template, {}))[1][method] = handler
        self.body_limit = body_limit
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._all_closed = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []

    async def start(self, host: str, port: int, *, backlog: int = 128) -> int:
        """Listen on every address `host` resolves to; the port (the one chosen when `port`
        is 0). OSError when it cannot listen."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        seen: set[tuple[int, object]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            self._close_listeners()
            raise
        for sock in self._listeners:
            try:
                loop.add_reader(sock.fileno(), self._accept, sock, backlog)
            except NotImplementedError:
                # A loop without readiness callbacks (Windows' proactor) accepts for us; it
                # has no descriptor limit to wait out.
                self._servers.append(await loop.create_server(
                    lambda: _Connection(self), sock=sock, backlog=backlog))
        return int(self._listeners[0].getsockname()[1])

    def _accept(self, sock: socket.socket, backlog: int) -> None:
        """Accept what is waiting. Out of descriptors, stop accepting for a moment: the clients
        wait in the listen backlog until a slow or idle connection is closed, instead of being
        accepted and dropped (what libuv's event loop would do on its own)."""
        loop = asyncio.get_running_loop()
        for _ in range(backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                logger.warning("cannot accept a connection (%s); retrying in %g s",
                               exc.strerror, ACCEPT_RETRY_SECONDS)
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_RETRY_SECONDS, self._resume_accepting, sock, backlog)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.track(self._connect(conn))

    def track(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task `stop` waits for, then cancels after its grace."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Connection(self), conn)
        except OSError as exc:
            logger.debug("dropping a connection that could not be set up: %s", exc)
            conn.close()

    def _resume_accepting(self, sock: socket.socket, backlog: int) -> None:
        if not self.stopping and sock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, backlog)

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in self._listeners:
            if sock.fileno() >= 0:
                with contextlib.suppress(NotImplementedError):
                    loop.remove_reader(sock.fileno())
                sock.close()
        self._listeners.clear()

    async def dispatch(self, request: Request) -> Response:
        handler = self._routes.get((request.method, request.path))
        if handler is not None:
            return await handler(request)
        allowed = self._methods.get(request.path)
        if allowed is None and self._templates:
            raw_path = request.target.partition("?")[0]
            for template, handlers in self._templates.values():
                params = template.match(raw_path)
                if params is None:
                    continue
                handler = handlers.get(request.method)
                if handler is not None:
                    return await handler(replace(request, route_params=params))
                allowed = list(handlers)
                break
        if allowed is None:
            return json_response(404, {"error": "not found"})
        return json_response(405, {"error": "method not allowed"},
                             Allow=", ".join(sorted(allowed)))

    def closed(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._all_closed.set()

    async def stop(self, grace: float) -> None:
        """Stop listening, close idle connections, give requests being answered `grace`
        seconds, then drop what is left."""
        self.stopping = True
        self._all_closed.clear()
        self._close_listeners()
        for connection in list(self.connections):
            connection.close_if_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for connection in list(self.connections):
            connection.abort()
        for task in list(self.tasks):  # answers still running after the grace
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
