"""Slow and idle clients cannot take the local host down (it may sit behind a public tunnel).

The host runs as users run it, `python -m shared.local` in its own process, here with a file
descriptor limit of 256 (`ulimit -n 256`) and, so the suite need not wait 10 and 30 seconds,
shorter limits than the defaults (whose values are checked separately). Clients are raw TCP
sockets on loopback, so they can misbehave in ways no HTTP client would.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.local import connections
from shared.local.command import serve
from shared.local.host import LocalHost

from .host_process import limited_host
from .support import http_request

HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
BODY_TIMEOUT = 3.0
# Generous: the machine is shared and loaded; the limits above are what is being tested.
PATIENCE = 90.0
HEAD_START = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
# Slowloris sends one byte of a header value at a time: the server's limit on the size of a
# request head never ends such a connection (32 KB take hours).
SLOW_HEADER = b"X-Slow: "


@contextmanager
def small_host(tmp_path: Path) -> Iterator[int]:
    """The port of the host with 256 descriptors and the short limits above."""
    with limited_host(tmp_path, header_timeout=HEADER_TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                      body_timeout=BODY_TIMEOUT) as (port, _):
        yield port


def closed_by_server(sock: socket.socket, *, trickle: bytes | None = None) -> bytes:
    """Everything the server sent before closing; fails if it has not closed within PATIENCE.
    With `trickle`, those bytes are sent every half second meanwhile."""
    received = b""
    deadline = time.monotonic() + PATIENCE
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except OSError:  # reset by the server: closed
                return received
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open for {PATIENCE} s")


class TestLimits:
    def test_the_defaults_are_10_seconds_for_a_request_head_and_30_idle(self) -> None:
        assert connections.HEADER_TIMEOUT_SECONDS == 10.0
        assert connections.IDLE_TIMEOUT_SECONDS == 30.0
        for function in (LocalHost.__init__, serve):
            parameters = inspect.signature(function).parameters
            assert parameters["header_timeout"].default == 10.0
            assert parameters["idle_timeout"].default == 30.0


class TestSlowAndIdleConnections:
    def test_a_connection_trickling_its_request_head_is_closed(self, tmp_path: Path) -> None:
        # Slowloris: a byte of a header value every half second, the head never finished.
        with small_host(tmp_path) as port, socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(HEAD_START + SLOW_HEADER)
            assert closed_by_server(sock, trickle=b"a") == b""

    def test_a_connection_that_sends_nothing_is_closed(self, tmp_path: Path) -> None:
        with small_host(tmp_path) as port, socket.create_connection(("127.0.0.1", port)) as sock:
            assert closed_by_server(sock) == b""

    def test_an_idle_kept_alive_connection_is_closed_after_its_answer(
        self, tmp_path: Path
    ) -> None:
        with small_host(tmp_path) as port, socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(HEAD_START + b"\r\n")  # HTTP/1.1: kept alive by default
            received = closed_by_server(sock)
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert received.endswith(b'{"status":"ok"}')

    def test_a_request_body_that_stalls_is_answered_408_and_closed(self, tmp_path: Path) -> None:
        with small_host(tmp_path) as port, socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /api/webhooks/smartcar HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")
            received = closed_by_server(sock)
        assert received.startswith(b"HTTP/1.1 408 ")
        assert b"request body not received in time (at most 3 s" in received

    def test_a_prompt_client_is_served_as_usual(self, tmp_path: Path) -> None:
        with small_host(tmp_path) as port:
            for _ in range(3):
                assert http_request(port, "GET", "/api/health").json() == {"status": "ok"}


class TestDescriptorExhaustion:
    def test_300_slow_header_connections_with_256_descriptors_do_not_stop_health(
        self, tmp_path: Path
    ) -> None:
        # The attack: more trickling connections than the host has file descriptors. Without
        # the head deadline they are held until the process cannot accept anyone; with it,
        # each is closed and /api/health is answered once they have been timed out.
        with small_host(tmp_path) as port:
            outcomes, health = asyncio.run(slowloris_then_health(port, connections_=300))
        assert health == 200
        # Every slow connection that got in was closed by the server, none was answered.
        assert outcomes.get("answered", 0) == 0, outcomes
        assert outcomes.get("still open", 0) == 0, outcomes
        assert outcomes.get("closed", 0) >= 200, outcomes


async def slowloris_then_health(port: int, *, connections_: int) -> tuple[dict[str, int], int]:
    stop = asyncio.Event()

    async def slow() -> str:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), PATIENCE)
        except (OSError, TimeoutError):
            return "not connected"
        try:
            writer.write(HEAD_START + SLOW_HEADER)
            while not stop.is_set():
                writer.write(b"a")
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1), 0.5)
                except TimeoutError:
                    continue
                return "answered" if data else "closed"
            return "still open"
        except OSError:
            return "closed"
        finally:
            writer.close()

    async def health() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        return int(status_line.split()[1])

    tasks = [asyncio.create_task(slow()) for _ in range(connections_)]
    await asyncio.sleep(1.0)  # the slow connections are in first, holding the descriptors
    try:
        status = await asyncio.wait_for(health(), PATIENCE)
    finally:
        # Health is answered as soon as a descriptor frees, while connections accepted later
        # are still within their own head deadline: give each the time to be closed.
        await asyncio.wait(tasks, timeout=PATIENCE)
        stop.set()
    results = await asyncio.gather(*tasks)
    counts: dict[str, int] = {}
    for result in results:
        counts[result] = counts.get(result, 0) + 1
    return counts, status
