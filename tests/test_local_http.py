"""The local host's HTTP/1.1 server (shared/local/http.py), over real loopback sockets.

Well-formed traffic is sent by the standard library's `http.client`, which we did not write;
what a client must not send (smuggling, folding, oversized heads) by raw sockets. The host's
own suites (test_http_contract, test_hardening, test_slow_clients) cover it end to end too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.local import http as http_module
from shared.local.connections import BODY_RATE_GRACE_SECONDS, MIN_BODY_RATE
from shared.local.http import (
    MAX_HEAD_BYTES,
    HttpServer,
    Request,
    Response,
)

LIMIT = 1000


class Server:
    """An HttpServer on its own loop in a thread: echo at POST /echo, a slow route, a failing
    route and a hanging one."""

    def __init__(self, *, header_timeout: float = 5.0, idle_timeout: float = 5.0,
                 body_timeout: float = 5.0, max_connections: int = 1000,
                 body_limit: int = LIMIT) -> None:
        self.loop = asyncio.new_event_loop()
        self.seen: list[Request] = []
        self.release = threading.Event()

        async def echo(request: Request) -> Response:
            self.seen.append(request)
            headers = {"Content-Type": "application/octet-stream",
                       "X-Truncated": str(request.truncated),
                       "X-Query": repr(sorted(request.query.items()))}
            return Response(200, request.body, headers)

        async def fail(request: Request) -> Response:
            raise RuntimeError("boom")

        async def hang(request: Request) -> Response:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def slow(request: Request) -> Response:
            await asyncio.sleep(0.3)
            return Response(200, b"slow")

        async def stubborn(request: Request) -> Response:
            while not self.release.is_set():  # ignores cancellation until released
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)
            return Response(200, b"released")

        self.server = HttpServer(
            {("POST", "/echo"): echo, ("GET", "/echo"): echo, ("GET", "/fail"): fail,
             ("GET", "/hang"): hang, ("GET", "/slow"): slow, ("GET", "/stubborn"): stubborn},
            body_limit=body_limit, header_timeout=header_timeout, idle_timeout=idle_timeout,
            body_timeout=body_timeout, max_connections=max_connections,
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self.server.start("127.0.0.1", 0))

    def call[T](self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.server.stop(grace))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def raw(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


#: How long these tests' servers read on after a refusal: the default's 2 s would be waited out
#: by every test that reads a refused connection to its end.
TEST_LINGER_SECONDS = 0.25


@pytest.fixture(autouse=True)
def short_linger(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("default_linger") is None:
        monkeypatch.setattr(http_module, "LINGER_SECONDS", TEST_LINGER_SECONDS)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.stop()
        s.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def at_a_limit(server: Server, sent: bytes, rest: bytes, refusal: bytes | None) -> bytes:
    """Send `sent`, a message still open at (or past) a limit. With `refusal` (a status), the
    answer must be that refusal at once; without, no answer may come until `rest` completes
    the message: then its answer."""
    sock = server.raw()
    sock.sendall(sent)
    if refusal is not None:
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 " + refusal + b" ")
        return answer
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(65536)  # an early answer here would be a refusal at the limit
    sock.settimeout(10)
    sock.sendall(rest)
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock)


def debug_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the server logged at DEBUG, in order."""
    return [r.getMessage() for r in caplog.records
            if r.name == http_module.__name__ and r.levelno == logging.DEBUG]


def response_of(raw: bytes) -> http.client.HTTPResponse:
    class FakeSocket:
        def makefile(self, *args: object, **kwargs: object) -> object:
            import io
            return io.BytesIO(raw)

    resp = http.client.HTTPResponse(FakeSocket())  # type: ignore[arg-type]
    resp.begin()
    return resp


class TestWellFormedTraffic:
    def test_a_body_by_content_length_reaches_the_route_whole(self, server: Server) -> None:
        conn = server.client()
        conn.request("POST", "/echo?a=1&b=&a=2", body=b"x" * 700)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"x" * 700)
        assert resp.getheader("X-Truncated") == "False"
        assert resp.getheader("X-Query") == repr([("a", "2"), ("b", "")])
        assert resp.getheader("Date")

    def test_a_kept_alive_connection_answers_request_after_request(self, server: Server) -> None:
        conn = server.client()
        for i in range(5):
            conn.request("POST", "/echo", body=str(i).encode())
            assert conn.getresponse().read() == str(i).encode()
        assert len(server.server.connections) == 1

    def test_a_chunked_body_is_decoded(self, server: Server) -> None:
        conn = server.client()
        conn.request("POST", "/echo", body=iter([b"abc", b"", b"defgh"]),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        assert conn.getresponse().read() == b"abcdefgh"

    def test_chunk_extensions_and_trailers_are_read(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n"
                     b"X-Trailer: 1\r\n\r\n")
        resp = response_of(read_all(sock))
        assert (resp.status, resp.read()) == (200, b"abcde")
        assert "X-Trailer" not in server.seen[0].headers  # trailers are not header fields

    def test_a_bare_line_feed_is_refused(self, server: Server) -> None:
        """llhttp in its strict mode, as h11 would not: one line-end rule for every hop."""
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\nHost: x\nContent-Length: 1\n\nA")
        assert read_all(sock).startswith(b"HTTP/1.1 400")
        assert server.seen == []

    def test_pipelined_requests_are_answered_in_order(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\none"
                     b"GET /slow HTTP/1.1\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthree")
        data = read_all(sock)
        assert data.index(b"one") < data.index(b"slow") < data.index(b"three")
        assert data.count(b"HTTP/1.1 200 OK") == 3

    def test_expect_100_continue_is_answered_before_the_body(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"body")
        assert b"\r\n\r\nbody" in sock.recv(1000)

    @pytest.mark.parametrize("expect", [b"X100-continueX", b"100-continue-later"])
    def test_only_100_continue_itself_is_answered_early(
        self, server: Server, expect: bytes
    ) -> None:
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n"
                     b"Expect: %s\r\n\r\n" % expect)
        time.sleep(0.2)  # a 100 Continue would be sent now, before the body
        sock.sendall(b"body")
        data = read_all(sock)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nbody")

    def test_http_1_0_closes_unless_kept_alive(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200 OK")  # and then closed
        sock = server.raw()
        sock.sendall(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        assert read_all(sock).count(b"HTTP/1.1 200 OK") == 2

    def test_connection_close_is_honoured(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = read_all(sock)
        assert b"Connection: close\r\n" in data

    def test_head_gets_the_head_only(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"HEAD /echo HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = read_all(sock)
        assert data.startswith(b"HTTP/1.1 405") and data.endswith(b"\r\n\r\n")


class TestAnswersWithoutARoute:
    def test_unknown_path_is_404(self, server: Server) -> None:
        conn = server.client()
        conn.request("GET", "/nothing")
        assert conn.getresponse().status == 404

    def test_another_method_is_405_with_allow(self, server: Server) -> None:
        conn = server.client()
        conn.request("DELETE", "/echo")
        resp = conn.getresponse()
        assert resp.status == 405
        assert resp.getheader("Allow") == "GET, POST"

    def test_a_route_that_raises_is_500_and_the_connection_goes_on(self, server: Server) -> None:
        conn = server.client()
        conn.request("GET", "/fail")
        resp = conn.getresponse()
        assert resp.status == 500
        resp.read()
        conn.request("GET", "/echo")
        assert conn.getresponse().status == 200


class TestRefused:
    @pytest.mark.parametrize("head, status", [
        (b"GARBAGE", 400),
        (b"GET /echo HTTP/2.0", 400),
        (b"GET echo HTTP/1.1", 400),
        (b"GET /e\x01cho HTTP/1.1", 400),
        (b"GET /echo HTTP/1.1\r\nX: 1\r\n folded", 400),
        (b"GET /echo HTTP/1.1\r\nBad Name: 1", 400),
        (b"GET /echo HTTP/1.1\r\nX: a\x00b", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", 400),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 400),
        (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: +3", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: -1", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: \xef\xbc\x93", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 3, 3", 400),
        # What llhttp leaves to its user: the non-breaking space and NEL that str.strip()
        # would remove, an upgrade, an absolute target.
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\xa0", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 3\x85", 400),
        (b"GET /echo HTTP/1.1\r\nConnection: close\xa0", 400),
        (b"GET /echo HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade", 400),
        (b"CONNECT 127.0.0.1:1 HTTP/1.1", 400),
        (b"GET http://127.0.0.1/echo HTTP/1.1", 400),
        (b"GET /echo HTTP/1.1\r\nX: a\rb", 400),
    ])
    def test_a_malformed_or_ambiguous_head(self, server: Server, head: bytes, status: int,
                                           ) -> None:
        sock = server.raw()
        sock.sendall(head + b"\r\n\r\n" + b"abc")
        assert read_all(sock).startswith(b"HTTP/1.1 %d " % status)
        assert server.seen == []

    # differing_executors: `make mutate` runs this method many times in one process.
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(
        line=st.tuples(st.sampled_from(["GET", "POST", "PUT", "get", "", "P\x00ST"]),
                       st.sampled_from(["/echo", "/nothing", "echo", "/e cho", "*", ""]),
                       st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9",
                                        "HTTP/1.10", "http/1.1", ""])),
        fields=st.lists(st.sampled_from([
            "Content-Length: 3", "Content-Length: 3, 4", "Content-Length: -1",
            "Content-Length: 99999999999999999999", "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip", "Transfer-Encoding: chunked, gzip", " folded",
            "Expect: 100-continue", "Expect: nonsense", "Connection: close", "X: \x7f\x00",
            "Bad Name: 1", ":", "Host: a", "Content-Length:"]), max_size=4),
        body=st.binary(max_size=12),
    )
    def test_no_head_is_answered_with_a_5xx(
        self, server: Server, line: tuple[str, str, str], fields: list[str], body: bytes
    ) -> None:
        """contract.md: no input gets a 5xx other than the 503 of an unavailable queue."""
        head = " ".join(line) + "\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n"
        sock = server.raw()
        sock.sendall(head.encode("latin-1") + body)
        sock.shutdown(socket.SHUT_WR)
        statuses = [int(s.split()[1]) for s in read_all(sock).split(b"\r\n")
                    if s.startswith(b"HTTP/1.1 ") and len(s.split()) > 1]
        assert all(status < 500 for status in statuses), (head, statuses)

    def test_smuggling_attempt_is_refused_and_the_connection_closed(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n0\r\n\r\nGET /fail HTTP/1.1\r\n\r\n")
        data = read_all(sock)
        assert data.startswith(b"HTTP/1.1 400") and data.count(b"HTTP/1.1") == 1
        assert server.seen == []

    def test_an_oversized_head_is_431(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"GET /echo HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES)
        assert read_all(sock).startswith(b"HTTP/1.1 431")

    @pytest.mark.parametrize(("size", "status"), [(MAX_HEAD_BYTES, b"200"),
                                                   (MAX_HEAD_BYTES + 1, b"431")])
    def test_a_complete_head_is_measured_exactly(
        self, server: Server, size: int, status: bytes
    ) -> None:
        # Sent whole: the head completes within the slice that crosses the limit.
        start = b"GET /echo HTTP/1.1\r\nX: "
        sock = server.raw()
        sock.sendall(start + b"a" * (size - len(start) - 4) + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 " + status)

    @pytest.mark.parametrize(("blank", "refused"), [(b"\r\n", False), (b"\n\r\n", True)])
    def test_a_head_in_progress_is_counted_to_the_byte(
        self, server: Server, blank: bytes, refused: bool
    ) -> None:
        """The bytes read while a head is in progress count whole, and exactly the limit is
        still within it. The blank line that llhttp skips before a request is read in the
        slice where the request begins: with 2 of its bytes, 32,768 bytes are counted while
        the head itself, one byte short of complete, is 32,766, and the head completes; with
        3, the 32,769th is refused at once."""
        start = b"GET /echo HTTP/1.1\r\nX: "
        head = start + b"a" * (MAX_HEAD_BYTES - 1 - len(start) - 4) + b"\r\n\r\n"
        sent = blank + head[:-1]
        assert len(sent) == MAX_HEAD_BYTES + refused and len(head) == MAX_HEAD_BYTES - 1
        answer = at_a_limit(server, sent, head[-1:], b"431" if refused else None)
        assert answer.startswith(b"HTTP/1.1 431" if refused else b"HTTP/1.1 200")

    def test_a_bad_chunk_size_is_400(self, server: Server) -> None:
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")


class TestBodyLimit:
    @pytest.mark.parametrize("chunked", [False, True])
    def test_a_long_body_is_cut_one_byte_past_the_limit_and_answered_early(
        self, server: Server, chunked: bool
    ) -> None:
        sock = server.raw()
        total = 64 * 1024 * 1024
        if chunked:
            sock.sendall(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % total)
        sock.settimeout(0.01)
        answer = b""
        sent = 0
        while sent < total and not answer:
            piece = b"y" * 65536
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                pass
        assert sent < total, "the answer came only after the whole body"
        sock.settimeout(10)
        answer += read_all(sock)  # closed after the answer: no reset before it is read
        resp = response_of(answer)
        assert resp.getheader("X-Truncated") == "True"
        assert resp.read() == b"y" * (LIMIT + 1)
        assert resp.getheader("Connection") == "close"

    @pytest.mark.parametrize("framing", ["extensions", "trailers"])
    def test_10_mb_of_chunk_extensions_or_trailers_is_413_long_before_its_end(
        self, server: Server, framing: str
    ) -> None:
        """Every byte of a request counts: not only its data (one byte per chunk here)."""
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        if framing == "extensions":
            piece = b"".join(b"1;ext=%s\r\nx\r\n" % (b"v" * 1000) for _ in range(64))
        else:
            sock.sendall(b"1\r\nx\r\n0\r\n")
            piece = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(64))
        total = 10 * 1024 * 1024
        sock.settimeout(0.01)
        answer = b""
        sent = 0
        while sent < total and not answer:
            try:
                sock.sendall(piece)
            except OSError:  # closed after the answer
                break
            sent += len(piece)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                pass
        assert sent < total / 4, "the answer came only after most of the framing"
        sock.settimeout(10)
        try:
            answer += read_all(sock)
        except ConnectionResetError:
            pass
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert json.loads(response_of(answer).read()) == {"error": (
            "chunk-size lines, extensions and trailers larger than "
            f"{http_module.MAX_FRAMING_BYTES} bytes")}
        assert server.seen == []

    @pytest.mark.parametrize("over", [0, 1])
    def test_framing_is_counted_to_the_byte(self, server: Server, over: int) -> None:
        """Counted from the slice the head ends in (it arrives whole in the first), every
        byte that is not body data: 65,536 of them with the body still open are within the
        limit, and the terminating chunk completes the request; the 65,537th is refused at
        once."""
        head = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = [b"1;ext=%s\r\nx\r\n" % (b"v" * 1000) for _ in range(64)]
        framing = len(head) + sum(len(chunk) - 1 for chunk in chunks)
        pad = http_module.MAX_FRAMING_BYTES - framing + over
        assert 0 < pad < 1000  # the last chunk's extension makes the count exact
        chunks[-1] = b"1;ext=%s\r\nx\r\n" % (b"v" * (1000 + pad))
        sent = head + b"".join(chunks)
        assert len(sent) - len(chunks) == http_module.MAX_FRAMING_BYTES + over
        answer = at_a_limit(server, sent, b"0\r\n\r\n", b"413" if over else None)
        if not over:
            resp = response_of(answer)
            assert (resp.status, resp.read()) == (200, b"x" * len(chunks))

    @pytest.mark.default_linger
    def test_the_answer_survives_a_client_that_keeps_sending(self, server: Server) -> None:
        """Closing with the rest of the body still arriving would send a reset, and a reset
        discards the answer waiting in the client's buffer: the server reads on a while."""
        sock = server.raw()
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
        for _ in range(32):
            sock.sendall(b"w" * 65536)  # long after the answer was sent
        time.sleep(0.2)
        resp = response_of(read_all(sock))
        assert (resp.status, resp.getheader("X-Truncated")) == (200, "True")

    def test_a_body_at_the_limit_is_whole(self, server: Server) -> None:
        conn = server.client()
        conn.request("POST", "/echo", body=b"z" * LIMIT)
        resp = conn.getresponse()
        assert resp.getheader("X-Truncated") == "False" and resp.read() == b"z" * LIMIT


class TestTimeouts:
    def test_a_body_trickling_below_the_minimum_rate_is_408_before_its_total_deadline(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each byte does not buy more time: a body must keep MIN_BODY_RATE once its grace
        is over, whatever its total deadline (60 s here)."""
        monkeypatch.setattr(http_module, "BODY_RATE_GRACE_SECONDS", 0.3)
        s = Server(body_timeout=60)
        try:
            prompt = s.raw()
            prompt.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 900\r\n"
                           b"Connection: close\r\n\r\n")
            time.sleep(0.2)
            prompt.sendall(b"p" * 900)
            assert read_all(prompt).startswith(b"HTTP/1.1 200")
            slow = s.raw()
            slow.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 900\r\n\r\n")
            started = time.monotonic()
            slow.settimeout(0.1)
            received = b""
            while not received and time.monotonic() - started < 10:
                slow.sendall(b"s")  # 10 bytes a second, each one on time
                try:
                    received = slow.recv(1000)
                except TimeoutError:
                    pass
            assert received.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 5
        finally:
            s.stop()
            s.close()

    def test_slow_head_idle_connection_and_stalled_body(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger=http_module.__name__)
        s = Server(header_timeout=0.3, idle_timeout=0.3, body_timeout=0.3)
        try:
            slow = s.raw()
            slow.sendall(b"GET /echo HTTP/1.1\r\n")
            assert read_all(slow) == b""  # closed without an answer
            assert debug_lines(caplog) == [
                "closing a connection idle, or without a complete request head, too long"]
            idle = s.raw()
            idle.sendall(b"GET /echo HTTP/1.1\r\n\r\n")
            assert read_all(idle).startswith(b"HTTP/1.1 200")  # then closed when idle
            stalled = s.raw()
            stalled.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            status, headers, body = answer_of(stalled)
            assert (status, headers["connection"]) == (408, "close")
            assert json.loads(body) == {"error": (
                "request body not received in time (at most 0.3 s, and at least "
                f"{MIN_BODY_RATE} bytes a second after the first "
                f"{BODY_RATE_GRACE_SECONDS:g} s)")}
        finally:
            s.stop()
            s.close()


class TestPipelinedDeadlines:
    def test_a_head_begun_behind_an_answered_request_gets_the_head_deadline(self) -> None:
        """The next request's head, begun in the same packet as the one answered, is timed
        from the answer: it does not complete, so the connection is closed."""
        s = Server(header_timeout=0.3, idle_timeout=30)
        try:
            sock = s.raw()
            sock.sendall(b"GET /echo HTTP/1.1\r\n\r\nGET /echo HTTP/1.1\r\nX: 1\r\n")
            data = read_all(sock)
            assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1
        finally:
            s.stop()
            s.close()

    def test_a_body_begun_behind_an_answered_request_gets_the_body_deadline(self) -> None:
        s = Server(body_timeout=0.3, idle_timeout=30)
        try:
            sock = s.raw()
            sock.sendall(b"GET /echo HTTP/1.1\r\n\r\n"
                         b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            data = read_all(sock)
            assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 2
            assert b"HTTP/1.1 408 " in data
        finally:
            s.stop()
            s.close()


class TestConnectionCap:
    def test_a_new_connection_closes_the_oldest_idle_one_never_one_being_answered(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger=http_module.__name__)
        s = Server(max_connections=2)
        try:
            idle = s.raw()
            idle.sendall(b"GET /echo HTTP/1.1\r\n\r\n")
            assert idle.recv(1000).startswith(b"HTTP/1.1 200")  # then kept alive, idle
            busy = s.raw()
            busy.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
            time.sleep(0.1)
            newcomer = s.client()
            newcomer.request("GET", "/echo")
            assert newcomer.getresponse().status == 200
            assert read_all(idle) == b""  # closed to make room
            assert b"slow" in busy.recv(1000)  # answered all the same
            assert debug_lines(caplog) == [
                "closing a idle connection: the connection limit is reached"]
            assert len(s.server.connections) == 2
        finally:
            s.stop()
            s.close()


    def test_a_newcomer_is_never_its_own_victim_when_every_other_connection_is_a_slow_body(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A new connection starts idle; were it counted before room is made, it would be the
        only idle one, and so the one closed, and nobody could get in past slow bodies."""
        caplog.set_level(logging.DEBUG, logger=http_module.__name__)
        s = Server(max_connections=2)
        try:
            slow = [s.raw(), s.raw()]
            for sock in slow:
                sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nab")
            time.sleep(0.1)  # both heads read: they are bodies in progress
            newcomer = s.client()
            newcomer.request("GET", "/echo")
            assert newcomer.getresponse().status == 200
            assert read_all(slow[0]) == b""  # the oldest slow body made room
            assert debug_lines(caplog) == [
                "closing a body connection: the connection limit is reached"]
        finally:
            s.stop()
            s.close()


class TestUnreadAnswers:
    def test_a_client_that_never_reads_its_answers_is_dropped_after_the_idle_timeout(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Its answers pile up, reading from it pauses, and it cannot hold its connection
        (which is never evicted while it is being answered) for ever."""
        caplog.set_level(logging.DEBUG, logger=http_module.__name__)
        s = Server(idle_timeout=0.5)
        try:
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            request = b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"e" * 1000
            sock.settimeout(2)
            sent = 0
            with contextlib.suppress(TimeoutError, ConnectionResetError, BrokenPipeError):
                while sent < 200_000:
                    sock.sendall(request * 10)
                    sent += 10
            assert sent < 200_000, "the server never stopped reading"
            sock.settimeout(10)
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk.count(b"HTTP/1.1 200")
            assert received < sent  # dropped with requests unanswered
            deadline = time.monotonic() + 5
            while s.server.connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(s.server.connections) == 0
            assert "dropping a connection whose answers were not read for 0.5 s" in (
                debug_lines(caplog))
        finally:
            s.stop()
            s.close()


class TestLoopsWithoutReadinessCallbacks:
    def test_a_loop_without_add_reader_serves_through_its_own_server(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Windows' proactor loop has no add_reader: the server hands its sockets to
        loop.create_server instead, and answers the same."""
        def unsupported(*args: object) -> None:
            raise NotImplementedError

        monkeypatch.setattr(asyncio.BaseEventLoop, "add_reader", unsupported, raising=False)
        monkeypatch.setattr(asyncio.SelectorEventLoop, "add_reader", unsupported)
        s = Server()
        try:
            assert s.server._servers
            conn = s.client()
            conn.request("POST", "/echo", body=b"proactor")
            assert conn.getresponse().read() == b"proactor"
        finally:
            s.stop()
            s.close()


def seconds_to_stop(s: Server, grace: float) -> float:
    started = time.monotonic()
    s.stop(grace=grace)
    return time.monotonic() - started


class TestStop:
    def test_idle_connections_close_and_a_request_in_progress_finishes(self) -> None:
        s = Server()
        try:
            idle = s.raw()
            busy = s.raw()
            busy.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
            time.sleep(0.1)
            # Not the grace: the idle connection was closed at once, the slow answer ended.
            assert seconds_to_stop(s, grace=5) < 3
            assert read_all(idle) == b""
            data = read_all(busy)
            assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data
        finally:
            s.close()

    def test_a_refused_connection_still_lingering_is_closed_at_once(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Its answer is written and nothing more is parsed: it is idle, whatever it was
        in the middle of when it was refused."""
        monkeypatch.setattr(http_module, "LINGER_SECONDS", 30.0)
        s = Server()
        try:
            refused = s.raw()
            refused.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n")
            assert refused.recv(1000).startswith(b"HTTP/1.1 400")
            assert seconds_to_stop(s, grace=5) < 3
            assert read_all(refused) == b""
        finally:
            s.close()

    def test_a_hanging_route_is_cancelled_after_the_grace(self) -> None:
        s = Server()
        try:
            hung = s.raw()
            hung.sendall(b"GET /hang HTTP/1.1\r\n\r\n")
            time.sleep(0.1)
            assert seconds_to_stop(s, grace=0.3) < 3
            assert not s.server.tasks
            try:
                assert read_all(hung) == b""
            except ConnectionResetError:
                pass  # aborted: a reset is what an abort sends
        finally:
            s.close()

    def test_stop_returns_when_a_route_ignores_its_cancellation(self) -> None:
        """Stopping waits a second at most for the routes cancelled after the grace."""
        s = Server()
        try:
            sock = s.raw()
            sock.sendall(b"GET /stubborn HTTP/1.1\r\n\r\n")
            time.sleep(0.1)
            assert seconds_to_stop(s, grace=0.2) < 5
        finally:
            s.release.set()
            time.sleep(0.2)  # the route sees it and returns: no task left pending at close
            s.close()


def answer_of(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The one answer a connection gets before it is closed: status, headers, body."""
    raw = read_all(sock)
    resp = response_of(raw)
    body = resp.read()
    assert raw.count(b"\r\n\r\n") == 1 and raw.endswith(b"\r\n\r\n" + body), raw
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


class TestWhatARefusalSays:
    """A refused request gets a JSON body that says why, `Connection: close`, and the close;
    the reason is logged at DEBUG (a stranger's bad request is no warning)."""

    @pytest.mark.parametrize("head, reason", [
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked",
         "only the chunked transfer coding is supported"),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunkedX",
         "only the chunked transfer coding is supported"),
        (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked",
         "Transfer-Encoding in an HTTP/1.0 request"),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\xa0",
         "invalid character in the Transfer-Encoding field"),
        (b"GET http://127.0.0.1/echo HTTP/1.1", "the request target must be a path"),
        (b"GET /echo HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade",
         "protocol upgrades and CONNECT are not supported"),
        (b"GET /echo HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES,
         f"request head larger than {MAX_HEAD_BYTES} bytes"),
        # Still in progress when it passes the limit (counted slice by slice).
        (b"GET /echo HTTP/1.1\r\nX: " + b"a" * (2 * MAX_HEAD_BYTES),
         f"request head larger than {MAX_HEAD_BYTES} bytes"),
        (b"GET /echo HTTP/2.0", "HTTP/2.0 is not supported (HTTP/1.1 or HTTP/1.0)"),
    ])
    def test_the_answer_is_json_with_the_reason_and_the_connection_closes(
        self, server: Server, caplog: pytest.LogCaptureFixture, head: bytes, reason: str
    ) -> None:
        caplog.set_level(logging.DEBUG, logger=http_module.__name__)
        sock = server.raw()
        sock.sendall(head + b"\r\n\r\n")
        status, headers, body = answer_of(sock)
        assert status in (400, 431)
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert json.loads(body) == {"error": reason}
        assert debug_lines(caplog) == [f"refusing a request: {reason}"]
        assert server.seen == []


class TestJsonAnswers:
    def test_json_response_is_compact_json_with_its_content_type_and_extra_headers(
        self,
    ) -> None:
        answer = http_module.json_response(405, {"error": "no", "more": [1, 2]}, Allow="GET")
        assert answer.status == 405
        assert answer.body == b'{"error":"no","more":[1,2]}'
        assert answer.headers == {"Content-Type": "application/json", "Allow": "GET"}


class TestPipelinedRefusal:
    def test_a_refusal_behind_a_request_being_answered_waits_its_turn(
        self, server: Server
    ) -> None:
        """The answer to the request before it comes first, then the 400, then the close."""
        sock = server.raw()
        sock.sendall(b"GET /slow HTTP/1.1\r\n\r\nGARBAGE\r\n\r\n")
        data = read_all(sock)
        assert data.count(b"HTTP/1.1 ") == 2
        first, second = data.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"200 ") and first.endswith(b"slow")
        assert second.startswith(b"400 ") and b"Connection: close\r\n" in second
        assert json.loads(second.split(b"\r\n\r\n", 1)[1])["error"].startswith(
            "malformed request: ")


class TestTimerReuse:
    def test_a_kept_alive_connection_closes_idle_after_a_late_first_request(self) -> None:
        """One timer handle serves a connection's deadlines: when it fires before a deadline
        that moved later (here the first head's, before the idle one), it waits on."""
        s = Server(header_timeout=0.3, idle_timeout=0.4)
        try:
            sock = s.raw()
            time.sleep(0.15)  # the idle deadline will be 0.25 s past the first one
            sock.sendall(b"GET /echo HTTP/1.1\r\n\r\n")
            sock.settimeout(5)
            data = read_all(sock)
            assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1
        finally:
            s.stop()
            s.close()


class TestReadingResumes:
    #: Enough for the answers to outgrow the socket buffers and the transport's high-water mark.
    REQUESTS = 20_000

    def test_a_client_that_reads_its_answers_late_gets_every_one(self) -> None:
        """Reading pauses while its answers are not read, and resumes once they are."""
        s = Server(idle_timeout=30)
        try:
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            request = b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"e" * 1000
            sender = threading.Thread(target=lambda: sock.sendall(request * self.REQUESTS))
            sender.start()
            time.sleep(1)  # the server's answers pile up: it stops reading
            assert sender.is_alive(), "the server read everything without its answers read"
            answered, tail = 0, b""
            while answered < self.REQUESTS:
                chunk = tail + sock.recv(1 << 20)
                answered += chunk.count(b"HTTP/1.1 200")
                tail = chunk[-11:]  # an answer's start split between two reads: found next
            sender.join(10)
            assert not sender.is_alive()
        finally:
            s.stop()
            s.close()


class TestHalfClosedClients:
    def test_a_client_that_shuts_its_side_after_the_request_still_gets_the_answer(
        self, server: Server
    ) -> None:
        """The end of the client's data is not the end of the exchange: the answer being
        made is written, then the connection closes."""
        sock = server.raw()
        sock.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"slow")
        assert b"Connection: close\r\n" in data


class TestBodyAccounting:
    def test_a_body_one_byte_over_the_limit_is_cut(self, server: Server) -> None:
        conn = server.client()
        conn.request("POST", "/echo", body=b"z" * (LIMIT + 1))
        resp = conn.getresponse()
        assert resp.getheader("X-Truncated") == "True" and resp.read() == b"z" * (LIMIT + 1)

    def test_a_large_body_in_small_chunks_is_data_not_framing(self) -> None:
        """Only size lines, extensions and trailers count against MAX_FRAMING_BYTES: here
        150 KB of data in 1,000 chunks, with about 6 KB of framing."""
        s = Server(body_limit=200_000)
        try:
            sock = s.raw()
            chunks = b"".join(b"96\r\n" + b"c" * 150 + b"\r\n" for _ in range(1000))
            sock.sendall(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
            resp = response_of(read_all(sock))
            assert resp.status == 200 and resp.getheader("X-Truncated") == "False"
            assert resp.read() == b"c" * 150_000
        finally:
            s.stop()
            s.close()

    def test_a_body_arriving_above_the_minimum_rate_outlives_its_grace(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The rate deadline moves on as data comes: 100 bytes every 40 ms (2,500 bytes a
        second) for 0.36 s is never late, though the grace is 0.2 s."""
        monkeypatch.setattr(http_module, "BODY_RATE_GRACE_SECONDS", 0.2)
        s = Server(body_timeout=60)
        try:
            sock = s.raw()
            sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 900\r\n"
                         b"Connection: close\r\n\r\n")
            for _ in range(9):
                time.sleep(0.04)
                sock.sendall(b"r" * 100)
            resp = response_of(read_all(sock))
            assert resp.status == 200 and resp.read() == b"r" * 900
        finally:
            s.stop()
            s.close()
