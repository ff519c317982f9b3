"""The local host's HTTP/1.1 server: llhttp (Node's parser, through `httptools`) under an
asyncio protocol, bounded so that no client can exhaust the host.

Why one module past ~800 lines: the request-head rules are not a parser of their own but
checks on the connection's state as llhttp calls back into it (`_check_head` and `_count`
read the message in progress; a body's framing count re-arms its timer), and `HttpServer` is
that connection's only user, evicting connections by their phase. Split along parsing and
serving, each half would reach into the other's private state; the pieces that stand alone
(connections.py, routes.py) already live apart.

Why not aiohttp's server (the inspector still uses it): per request, on a 2-vCPU machine, its
server side costs 120 to 160 µs of CPU where a plain asyncio protocol costs about 65 (measured
with the benchmark's load generator against a handler that does nothing). That difference was
a tenth of the local host's whole budget per event (docs/performance.md).

The host may sit behind a public tunnel, so every byte comes from a stranger. What parses it is
a maintained parser (llhttp, in its strict mode: the one uvicorn also runs), fed in slices of at
most `FEED_BYTES`; this module keeps only the rules llhttp leaves to its user (the user's view:
docs/how-it-works.md, "The local host's front door"):

- the request target is a path; the version is HTTP/1.0 or HTTP/1.1; an upgrade or CONNECT
  is refused. The framing fields (`Transfer-Encoding`, `Content-Length`, `Connection`) hold
  visible ASCII only: `chunked\\xa0` is neither chunked nor anything else. The only transfer
  coding is `chunked`, alone, in HTTP/1.1. Each of these is answered 400 (the contract allows
  no 5xx but the 503 of an unavailable queue), the connection then closed;
- limits on what one request may make the host read or hold: its head (`MAX_HEAD_BYTES`,
  431), its body's data (`body_limit`: the body is cut one byte past it and handed over as it
  is, so the function answers 413 itself, counted and logged by the receiver), and its body's
  framing, chunk-size lines with their extensions and the trailer section
  (`MAX_FRAMING_BYTES`, 413 here). A refused or cut request's connection reads on and
  discards for `LINGER_SECONDS` (so the client reads the answer rather than a reset), then
  closes;
- deadlines (connections.py): a new connection's first head within `header_timeout`; a
  kept-alive connection's next request begun within `idle_timeout`; each head complete within
  `header_timeout` of its first byte; each body within `body_timeout` in total, and at no less
  than `MIN_BODY_RATE` bytes a second once `BODY_RATE_GRACE_SECONDS` have passed. A late head
  closes the connection; a late body is answered 408. All of them are one timer handle per
  connection (`_arm`);
- back-pressure: requests are answered one at a time, in order (pipelining); bytes that arrive
  meanwhile wait unparsed, and reading pauses while more than `MAX_UNPARSED_BYTES` wait or
  while the connection's unsent answers are over the transport's high-water mark
  (`WRITE_HIGH_WATER`), so a client that never reads holds a bounded amount of memory;
- at most `max_connections` connections (connections.py derives it from the descriptor
  limit): one more closes the one that matters least, kept-alive idle connections first, then
  those still without a complete head, then those sending a body, each the oldest first (a
  newcomer is the youngest); never one being answered. Accepting waits while
  `ACCEPT_HEADROOM` sockets beyond the limit are still closing, and resumes as each closes;
- `Expect: 100-continue` is answered before the body is read; persistent connections as
  llhttp decides them (HTTP/1.1 unless `Connection: close`, HTTP/1.0 with keep-alive);
- 404 for a path with no route, 405 (with `Allow`) for a route and another method, 500 when a
  route raises; routes with parameters (`/api/vehicles/{vehicleId}`) as routes.py matches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .connections import (
    BODY_RATE_GRACE_SECONDS,
    BODY_TIMEOUT_SECONDS,
    HEADER_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    MIN_BODY_RATE,
)
from .routes import RouteTemplate, route_template

logger = logging.getLogger(__name__)

#: Request line and header fields together (aiohttp's limit for one line is 8190 bytes).
MAX_HEAD_BYTES = 32 * 1024
#: A chunked body's bytes that are not data: size lines, extensions, line ends, trailers.
MAX_FRAMING_BYTES = 64 * 1024
#: Bytes handed to llhttp at once. Limits are checked between slices, so a count may include
#: up to one slice of the request before it (never more).
FEED_BYTES = 8 * 1024
#: Received bytes waiting for their turn (pipelined requests) before reading pauses.
MAX_UNPARSED_BYTES = 256 * 1024
#: Unsent answers before reading pauses (until the client has read them down to a quarter).
WRITE_HIGH_WATER = 256 * 1024
#: After a request was refused or its body cut, how long the rest is read and thrown away.
LINGER_SECONDS = 2.0
#: Out of file descriptors, accepting resumes after this long (asyncio's own loop waits 1 s).
ACCEPT_RETRY_SECONDS = 1.0
#: Accepted sockets held beyond `max_connections`: new connections whose arrival closed an
#: older one that has not let go of its descriptor yet. Accepting waits while this many are
#: outstanding (the clients wait in the listen backlog) and goes on as each closes, so a storm
#: of connections never runs the process out of descriptors. Far below the descriptors
#: connections.py keeps for the host's own files.
ACCEPT_HEADROOM = 16

#: The fields that decide where a request ends and whether another follows.
_FRAMING_FIELDS = frozenset({b"transfer-encoding", b"content-length", b"connection"})
_VISIBLE_ASCII = frozenset(range(0x21, 0x7F)) | {0x20, 0x09}

Phase = Literal["idle", "head", "body", "busy"]
#: The order in which connections are closed to make room for a new one.
_EVICTION_ORDER: tuple[Phase, ...] = ("idle", "head", "body")


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
    """A request refused before any route sees it: `status` and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _BodyCut(Exception):
    """Raised in llhttp's body callback to stop it at the limit (the parser is done)."""


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


def _elements(values: list[bytes]) -> list[bytes]:
    """The comma-separated elements of a field's values, lower-cased and stripped."""
    return [e.strip(b" \t").lower() for e in b",".join(values).split(b",")]


@dataclass(frozen=True, slots=True)
class _Pending:
    """A complete request waiting for its turn, or (`refusal`) the answer to a refused one."""

    request: Request | None
    keep_alive: bool = False
    refusal: bytes = b""


class _Connection(asyncio.Protocol):
    """One client connection: llhttp is fed what arrives, requests are answered in turn."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._unparsed = bytearray()
        self._pending: deque[_Pending] = deque()
        self._handling: asyncio.Task[None] | None = None
        # A new connection awaits its first head: it goes with the slow heads, the youngest.
        self.phase: Phase = "head"
        # The message being parsed.
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._in_head = False
        self._in_body = False
        self._has_body = False
        self._expect_continue = False
        self._counted = 0  # head: its bytes; body: its framing bytes (see FEED_BYTES)
        self._head_bytes = 0  # the head's target and fields, as parsed
        self._data_in_slice = 0
        self._body_started = 0.0
        # Timer: one handle, one deadline, one callback.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] = self._close
        self._dead = False  # the parser stopped (an error, a cut body): nothing more is parsed
        self._lingering = False
        self._closing = False
        self._paused_for: set[str] = set()
        self._stalled: asyncio.TimerHandle | None = None  # answers unread (pause_writing)
        self._eof = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._server.opened(self)
        self._arm(self._server.header_timeout, self._close_silently)

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._closing:
            return  # the rest of a refused or cut request: read and thrown away
        self._unparsed += data
        self._feed()
        if len(self._unparsed) > MAX_UNPARSED_BYTES:
            self._pause("unparsed")

    def eof_received(self) -> bool:
        self._eof = True
        if self._handling is None and not self._pending:
            self._close()  # nothing more will come: no request to wait for, nothing to linger on
        return True  # keep the write side open for the answer being made

    def pause_writing(self) -> None:
        """The client does not read its answers: stop reading and answering, and give it
        `idle_timeout` to read them. Meanwhile it is the first to close to make room."""
        self._pause("writing")
        self._stalled = self._loop.call_later(self._server.idle_timeout, self._write_stalled)
        if self._handling is None:
            self._server.move(self, "idle")

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        self._resume("writing")
        if self._busy:
            self._server.move(self, "busy")
        if self._handling is None and self._pending:
            self._next()

    def _write_stalled(self) -> None:
        logger.debug("dropping a connection whose answers were not read for %g s",
                     self._server.idle_timeout)
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._stalled is not None:
            self._stalled.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.closed(self)
        self._transport = None
        # A request being answered runs to its end (as with aiohttp's default): a webhook
        # whose client went away may still be stored, and is then simply a duplicate later.

    # -- llhttp's callbacks (httptools.HttpRequestParser) -----------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._counted = 0
        self._head_bytes = 0
        self._url = b""
        self._fields = []
        self._body = bytearray()
        if not self._busy:  # else timed once the requests before it are answered
            self._server.move(self, "head")
            self._arm(self._server.header_timeout, self._close_silently)

    def on_url(self, url: bytes) -> None:
        if not self._url:  # the request line's other parts: "METHOD " and " HTTP/1.1\r\n"
            self._head_size(len(self._parser.get_method()) + 12)
        self._url += url
        self._head_size(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._fields.append((name, value))
            self._head_size(len(name) + len(value) + 4)  # with ": " and the line end
        # After the head, a trailer field: counted as framing, otherwise ignored.

    def _head_size(self, more: int) -> None:
        """The head's target and fields as llhttp hands them over: a head that completes
        within the slice that crossed the limit is refused too (the slice count below only
        sees a head still in progress)."""
        self._head_bytes += more
        if self._head_bytes > MAX_HEAD_BYTES:
            raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._head_size(2)  # the empty line that ends the head
        self._in_head = False
        self._check_head()
        if self._has_body:
            self._in_body = True
            self._counted = 0
            self._body_started = self._loop.time()
            if not self._busy:
                self._server.move(self, "body")
                self._arm_body()

    def on_body(self, body: bytes) -> None:
        self._data_in_slice += len(body)
        room = self._server.body_limit + 1 - len(self._body)
        if len(body) >= room:
            self._body += body[:room]
            self._complete(truncated=True)
            raise _BodyCut
        self._body += body

    def on_message_complete(self) -> None:
        self._complete(truncated=False)

    # -- parsing ----------------------------------------------------------------------------
    def _feed(self) -> None:
        """Hand llhttp what is waiting, a slice at a time, until a request is complete."""
        while (self._unparsed and not self._dead and self._handling is None
               and not self._pending):
            piece = bytes(self._unparsed[:FEED_BYTES])
            del self._unparsed[:FEED_BYTES]
            self._data_in_slice = 0
            try:
                self._parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._refuse(BadRequest(400, "protocol upgrades and CONNECT are not supported"))
                return
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                if isinstance(cause, _BodyCut):
                    self._dead = True
                elif isinstance(cause, BadRequest):
                    self._refuse(cause)
                    return
                else:
                    self._refuse(BadRequest(400, f"malformed request: {exc}"))
                    return
            if self._dead:
                break
            try:
                self._count(len(piece) - self._data_in_slice)
            except BadRequest as exc:
                self._refuse(exc)
                return
        if self._handling is None and self._pending:
            self._next()
        elif (not self._busy and self._in_body and self._expect_continue and not self._body
              and not self._unparsed):
            self._expect_continue = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    @property
    def _busy(self) -> bool:
        """A request is being answered or waits for its turn."""
        return self._handling is not None or bool(self._pending)

    def _count(self, framing: int) -> None:
        """Count a slice's bytes that were not body data against the message in progress."""
        if self._in_head:
            self._counted += framing
            if self._counted > MAX_HEAD_BYTES:
                raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
        elif self._in_body:
            self._counted += framing
            if self._counted > MAX_FRAMING_BYTES:
                raise BadRequest(413, "chunk-size lines, extensions and trailers larger than "
                                      f"{MAX_FRAMING_BYTES} bytes")
            if not self._busy:
                self._arm_body()

    def _check_head(self) -> None:
        """What llhttp leaves to its user (the module's docstring); BadRequest if broken."""
        version = self._parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest(400, f"HTTP/{version} is not supported (HTTP/1.1 or HTTP/1.0)")
        if self._parser.should_upgrade():
            raise BadRequest(400, "protocol upgrades and CONNECT are not supported")
        if not self._url.startswith(b"/"):
            raise BadRequest(400, "the request target must be a path")
        encodings: list[bytes] = []
        length = b""
        expect = b""
        for name, value in self._fields:
            lowered = name.lower()
            if lowered in _FRAMING_FIELDS:
                if not _VISIBLE_ASCII.issuperset(value):
                    raise BadRequest(400, f"invalid character in the {name.decode()} field")
                if lowered == b"transfer-encoding":
                    encodings.append(value)
                elif lowered == b"content-length":
                    length = value
            elif lowered == b"expect":
                expect = value
        chunked = False
        if encodings:
            if _elements(encodings) != [b"chunked"]:
                raise BadRequest(400, "only the chunked transfer coding is supported")
            if version == "1.0":
                raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            chunked = True
        self._has_body = chunked or length.strip(b" \t").lstrip(b"0") != b""
        self._expect_continue = (version == "1.1" and self._has_body
                                 and expect.strip(b" \t").lower() == b"100-continue")

    def _complete(self, *, truncated: bool) -> None:
        """A request is complete (or cut at the limit): queue it for its turn."""
        self._in_head = self._in_body = False
        self._expect_continue = False
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self._fields)
        request = Request(
            method=self._parser.get_method().decode("ascii"), target=target,
            path=unquote(path), query=dict(parse_qsl(query, keep_blank_values=True)),
            headers=CIMultiDictProxy(headers), body=bytes(self._body), truncated=truncated,
        )
        keep_alive = self._parser.should_keep_alive() and not truncated
        self._body = bytearray()
        self._fields = []
        self._pending.append(_Pending(request, keep_alive))
        self._server.move(self, "busy")
        self._cancel_timer()

    # -- answering --------------------------------------------------------------------------
    def _next(self) -> None:
        """Answer the next complete request, unless the client is not reading its answers."""
        if "writing" in self._paused_for or not self._pending:
            return
        pending = self._pending.popleft()
        if pending.request is None:
            self._write(pending.refusal)
            self._linger()
            return
        close = not pending.keep_alive or self._server.stopping
        self._handling = self._server.track(self._answer(pending.request, close=close))

    async def _answer(self, request: Request, *, close: bool) -> None:
        try:
            response = await self._server.dispatch(request)
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = json_response(500, {"error": "internal error"})
        self._handling = None
        if self._transport is None:
            return
        close = (close or self._server.stopping
                 or (self._eof and not self._pending and not self._unparsed))
        self._write(encode_response(response, close=close, head=request.method == "HEAD"))
        if request.truncated:
            self._linger()
        elif close:
            self._close()
        elif self._pending:
            self._next()
        else:
            self._await_next()

    def _await_next(self) -> None:
        """After an answer: time the next request from where its bytes got, and parse on."""
        if self._in_head:
            self._server.move(self, "head")
            self._arm(self._server.header_timeout, self._close_silently)
        elif self._in_body:
            self._body_started = self._loop.time()
            self._server.move(self, "body")
            self._arm_body()
        else:
            self._server.move(self, "idle")
            self._arm(self._server.idle_timeout, self._close_silently)
        self._feed()
        if len(self._unparsed) <= MAX_UNPARSED_BYTES:
            self._resume("unparsed")
        if self._eof and not self._busy and not self._lingering:
            self._close()  # what the client sent before it finished is answered

    def _refuse(self, exc: BadRequest) -> None:
        """Answer what came before in turn; then this refusal, and close. Called by `_feed`,
        which parses only while no request is being answered."""
        logger.debug("refusing a request: %s", exc)
        self._dead = True
        self._in_head = self._in_body = False
        self._unparsed.clear()
        answer = encode_response(json_response(exc.status, {"error": str(exc)}), close=True)
        if not self._pending:
            self._write(answer)
            self._linger()
            return
        # Requests that came before it in the same slice are still answered first.
        self._pending.append(_Pending(None, refusal=answer))
        self._next()

    def _body_late(self) -> None:
        limit = self._server.body_timeout
        self._write(encode_response(json_response(408, {
            "error": f"request body not received in time (at most {limit:g} s, and at least "
                     f"{MIN_BODY_RATE} bytes a second after the first "
                     f"{BODY_RATE_GRACE_SECONDS:g} s)"}), close=True))
        self._close()

    def _arm_body(self) -> None:
        """The body's deadline: its total limit, or sooner while it trickles below the rate."""
        total = self._body_started + self._server.body_timeout
        grace = min(BODY_RATE_GRACE_SECONDS, self._server.body_timeout)
        by_rate = self._body_started + grace + len(self._body) / MIN_BODY_RATE
        self._arm(min(total, by_rate) - self._loop.time(), self._body_late)

    # -- connection -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _pause(self, why: str) -> None:
        if not self._paused_for and self._transport is not None:
            self._transport.pause_reading()
        self._paused_for.add(why)

    def _resume(self, why: str) -> None:
        if why in self._paused_for:
            self._paused_for.discard(why)
            if not self._paused_for and self._transport is not None:
                self._transport.resume_reading()

    def _linger(self) -> None:
        """Read and discard for a while before closing: closing with unread bytes would send a
        reset, which can destroy the answer before the client reads it."""
        self._lingering = True
        self._unparsed.clear()
        self._resume("unparsed")
        self._server.move(self, "idle")  # its answer is written: the first to make room
        if self._eof:
            self._close()
        else:
            self._arm(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._closing = True
        # Closing waits for unsent answers; a client that never reads them gets a reset.
        self._arm(self._server.idle_timeout, self.abort)
        if self._transport is not None:
            self._transport.close()

    def _close_silently(self) -> None:
        logger.debug("closing a connection idle, or without a complete request head, too long")
        self._close()

    def evict(self) -> None:
        """Closed to make room for a new connection."""
        logger.debug("closing a %s connection: the connection limit is reached", self.phase)
        self._close()

    def close_if_idle(self) -> None:
        """At stop: close now unless a request is being answered (or half-read)."""
        if not self._busy and not self._in_head and not self._in_body:
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
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
        max_connections: int = 1000,
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
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.loop: asyncio.AbstractEventLoop  # set by start
        self.connections: set[_Connection] = set()
        # Connections by phase, each in the order it entered that phase (the oldest first).
        self._phases: dict[Phase, dict[_Connection, None]] = {
            "idle": {}, "head": {}, "body": {}, "busy": {}}
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._all_closed = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        #: Accepted client sockets not yet closed (connections, and those being set up).
        self._sockets = 0
        #: Listeners not being read until a socket closes (`ACCEPT_HEADROOM`).
        self._waiting_for_room: dict[socket.socket, int] = {}

    async def start(self, host: str, port: int, *, backlog: int = 128) -> int:
        """Listen on every address `host` resolves to; the port (the one chosen when `port`
        is 0). OSError when it cannot listen."""
        loop = self.loop = asyncio.get_running_loop()
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
        for _ in range(backlog):
            if self._sockets >= self.max_connections + ACCEPT_HEADROOM:
                self.loop.remove_reader(sock.fileno())
                self._waiting_for_room[sock] = backlog
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                logger.warning("cannot accept a connection (%s); retrying in %g s",
                               exc.strerror, ACCEPT_RETRY_SECONDS)
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(ACCEPT_RETRY_SECONDS, self._resume_accepting, sock,
                                     backlog)
                return
            self._sockets += 1
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.track(self._connect(conn))

    def track(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task `stop` waits for, then cancels after its grace."""
        task = self.loop.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: _Connection(self), conn)
        except OSError as exc:
            logger.debug("dropping a connection that could not be set up: %s", exc)
            conn.close()
            self._released()

    def _released(self) -> None:
        """An accepted socket is closed: accept again if that was waiting for room."""
        self._sockets -= 1
        if self._waiting_for_room and self._sockets < self.max_connections + ACCEPT_HEADROOM:
            waiting, self._waiting_for_room = self._waiting_for_room, {}
            for sock, backlog in waiting.items():
                self._resume_accepting(sock, backlog)

    def _resume_accepting(self, sock: socket.socket, backlog: int) -> None:
        if not self.stopping and sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self._accept, sock, backlog)

    def _close_listeners(self) -> None:
        self._waiting_for_room.clear()
        for server in self._servers:
            server.close()
        self._servers.clear()
        for sock in self._listeners:
            if sock.fileno() >= 0:
                with contextlib.suppress(NotImplementedError):
                    self.loop.remove_reader(sock.fileno())
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

    # -- the connection limit ---------------------------------------------------------------
    def opened(self, connection: _Connection) -> None:
        # Room is made among the connections already open: the new one is never its own
        # victim (it starts idle, and would otherwise be the only idle one to close).
        if len(self.connections) >= self.max_connections:
            for phase in _EVICTION_ORDER:
                if self._phases[phase]:
                    victim = next(iter(self._phases[phase]))
                    self._phases[phase].pop(victim)
                    victim.evict()
                    break
        self.connections.add(connection)
        self._phases[connection.phase][connection] = None

    def move(self, connection: _Connection, phase: Phase) -> None:
        if connection.phase != phase and connection in self.connections:
            self._phases[connection.phase].pop(connection, None)
            self._phases[phase][connection] = None
        connection.phase = phase

    def closed(self, connection: _Connection) -> None:
        self._released()
        self.connections.discard(connection)
        self._phases[connection.phase].pop(connection, None)
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
