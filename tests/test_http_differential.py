"""The local host's front door against two HTTP parsers we did not write: llhttp (Node's, via
httptools, strict) and h11. Each raw request of the corpus (tests/http_corpus.py: hand-written
smuggling vectors and seeded mutations) goes to the real local host over loopback and to both
parsers.

The host may refuse more than the parsers do. It fails this test when it hands a route a
request that both parsers reject, or frames a connection's bytes differently from llhttp: a
request with another method or body, or more requests than llhttp reads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httptools
import pytest

from shared.local.http import Request, Response

from . import http_corpus
from .support import RunningHost, local_env


@dataclass(frozen=True)
class Message:
    method: str
    path: str
    body: bytes


class _LlhttpCollector:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body = b""

    def on_message_begin(self) -> None:
        self._url, self._body = b"", b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0].decode("latin-1")
        self.messages.append(Message(self.parser.get_method().decode(), path, self._body))


def llhttp_messages(raw: bytes) -> list[Message]:
    """The requests llhttp completes before it stops (an error, an upgrade, or the end)."""
    collector = _LlhttpCollector()
    try:
        collector.parser.feed_data(raw)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    return collector.messages


def h11_messages(raw: bytes) -> list[Message]:
    """The requests h11, as a server, completes before it stops; it is answered 200 each time
    so that it reads the next pipelined one."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    conn.receive_data(b"")
    messages: list[Message] = []
    request: h11.Request | None = None
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return messages
        if isinstance(event, h11.Request):
            request, body = event, b""
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            path = bytes(request.target).split(b"?", 1)[0].decode("latin-1")
            messages.append(Message(bytes(request.method).decode(), path, body))
            if conn.our_state is h11.SEND_RESPONSE:
                try:
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    conn.send(h11.EndOfMessage())
                except h11.LocalProtocolError:  # an upgrade or CONNECT: no more HTTP here
                    return messages
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return messages
            conn.start_next_cycle()
        else:  # NEED_DATA after the end, PAUSED, ConnectionClosed
            return messages


class Seen:
    """Every request the host's HTTP server hands on (to a route, or to its 404/405)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Message] = []

    def wrap(self, dispatch: Callable[[Request], Awaitable[Response]],
             ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        async def recording(request: Request) -> Response:
            with self.lock:
                self.messages.append(Message(request.method, request.target.split("?", 1)[0],
                                             request.body))
            return await dispatch(request)

        return recording

    def take(self) -> list[Message]:
        with self.lock:
            taken, self.messages = self.messages, []
        return taken


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningHost, Seen]]:
    state = tmp_path_factory.mktemp("differential")
    with RunningHost(local_env(Path(state)), workers=1) as running:
        seen = Seen()
        assert running.host is not None and running.host._http is not None
        server = running.host._http
        # mypy compares a Callable assigned to a method with the unbound `def dispatch(self, ...)`.
        server.dispatch = seen.wrap(server.dispatch)  # type: ignore[method-assign, assignment]  # patched
        yield running, seen


def send(port: int, raw: bytes) -> bytes:
    """Send `raw`, close the sending side, read until the host closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def disagreement(raw: bytes, served: list[Message]) -> str | None:
    """Why the host's handling of `raw` is wrong, or None."""
    by_llhttp = llhttp_messages(raw)
    by_h11 = h11_messages(raw)
    for index, message in enumerate(served):
        if index >= len(by_llhttp) and index >= len(by_h11):
            return f"request {index + 1} served, but both llhttp and h11 reject it"
        if index >= len(by_llhttp):
            return f"request {index + 1} served, but llhttp reads only {len(by_llhttp)}"
        if message != by_llhttp[index]:
            return f"request {index + 1} framed as {message}, llhttp reads {by_llhttp[index]}"
    return None


def test_the_corpus_is_large_and_repeatable() -> None:
    corpus = http_corpus.corpus()
    assert len(corpus) >= 3000
    assert corpus == http_corpus.corpus()  # seeded: the same bytes every run
    assert len(set(corpus)) > 2500  # mutations, not one request many times


def test_the_references_read_pipelined_requests_and_tell_smuggling_apart() -> None:
    """The oracles themselves: two requests in a row, and a TE.TE smuggling attempt."""
    two = http_corpus.CL + http_corpus.GET_HEALTH
    assert [m.method for m in llhttp_messages(two)] == ["POST", "GET"]
    assert [m.method for m in h11_messages(two)] == ["POST", "GET"]
    assert llhttp_messages(two)[0].body == http_corpus.BODY
    assert h11_messages(two)[0].body == http_corpus.BODY
    smuggling = http_corpus.post([b"Transfer-Encoding: chunked\xa0"],
                                 b"0\r\n\r\nGET /api/health HTTP/1.1\r\n\r\n")
    assert llhttp_messages(smuggling) == [] and h11_messages(smuggling) == []
    assert disagreement(smuggling, [http_corpus_message()]) is not None


def http_corpus_message() -> Message:
    return Message("POST", http_corpus.WEBHOOK.decode(), b"")


def test_the_host_frames_every_request_as_llhttp_does(host: tuple[RunningHost, Seen]) -> None:
    running, seen = host
    failures: list[str] = []
    served_any = 0
    for raw in http_corpus.corpus():
        send(running.port, raw)
        served = seen.take()
        served_any += bool(served)
        why = disagreement(raw, served)
        if why is not None:
            failures.append(f"{why}: {raw[:200]!r}")
    assert not failures, f"{len(failures)} disagreements, e.g.\n" + "\n".join(failures[:20])
    # The corpus is not all refusals: well-formed and mutated requests alike reach routes.
    assert served_any > 500
