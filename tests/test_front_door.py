"""The local host's front door under attack, with real processes and sockets: more slow bodies
than it has descriptors, and a client that pipelines requests and never reads the answers.

The host runs as users run it (`python -m shared.local`), in its own process with a limit of
256 file descriptors (`ulimit -n 256`, macOS's default), and a body deadline long enough that
only the connection cap can be what keeps it answering.
"""

from __future__ import annotations

import socket
import time
from contextlib import AbstractContextManager
from pathlib import Path

from shared.local.connections import RESERVED_DESCRIPTORS, connection_limit

from .host_process import healthy, limited_host

SLOW_BODIES = 1000
#: How long the never-reading client pipelines (the issue's figure).
PIPELINE_SECONDS = 30.0
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
SLOW_HEAD = (b"POST /api/webhooks/smartcar HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"a\":")
HEALTH = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
#: The cheapest request to answer (404, no function runs), each answer 7 times its size.
NOT_FOUND = b"GET /x HTTP/1.1\r\n\r\n"


def front_door_host(tmp_path: Path) -> AbstractContextManager[tuple[int, int]]:
    """(port, pid) of the host with 256 descriptors, its request limits far off."""
    return limited_host(tmp_path, header_timeout=60, idle_timeout=60, body_timeout=120)


def health_status(port: int, timeout: float) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        line = sock.makefile("rb").readline()
    return int(line.split()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class TestConnectionCap:
    def test_the_cap_leaves_room_for_the_hosts_own_files(self) -> None:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert connection_limit(10) == 10
        assert connection_limit(10**9) == soft - RESERVED_DESCRIPTORS

    def test_health_answers_within_a_second_with_1000_slow_bodies_open(
        self, tmp_path: Path
    ) -> None:
        with front_door_host(tmp_path) as (port, _):
            slow: list[socket.socket] = []
            try:
                for _ in range(SLOW_BODIES):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    sock.sendall(SLOW_HEAD)
                    slow.append(sock)
                time.sleep(0.5)  # the host has read them all and holds what it can
                for sock in slow:  # each trickles on, as a slow body does
                    try:
                        sock.send(b"1")
                    except OSError:
                        pass  # closed by the host to make room
                # The thousand bytes above arrive at once, which no set of slow bodies does:
                # let the host take that burst in, then time health with them all open.
                time.sleep(0.5)
                started = time.monotonic()
                assert health_status(port, timeout=5) == 200
                assert time.monotonic() - started < 1.0
                # The host kept at most its cap: the others were closed (or, having trickled
                # below the minimum rate for long enough, answered 408), none served.
                closed = 0
                for sock in slow:
                    sock.settimeout(0.01)
                    try:
                        data = sock.recv(100)
                    except TimeoutError:
                        continue
                    except OSError:
                        closed += 1
                        continue
                    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
                    closed += 1
                assert closed >= SLOW_BODIES - 256
                # Nor did the storm run the host out of descriptors: it never stopped
                # accepting to wait for one (the clients waited in the listen backlog instead,
                # and each was taken as an older connection let go of its descriptor).
                log = (tmp_path / "host.log").read_text()
                assert "cannot accept a connection" not in log, log[-2000:]
            finally:
                for sock in slow:
                    sock.close()


class TestWriteBackPressure:
    def test_a_client_that_pipelines_and_never_reads_holds_bounded_memory(
        self, tmp_path: Path
    ) -> None:
        with front_door_host(tmp_path) as (port, pid):
            before = rss_bytes(pid)
            peak = before
            sent = 0
            stalled = 0.0
            burst = NOT_FOUND * 500
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(0.2)
                deadline = time.monotonic() + PIPELINE_SECONDS
                while time.monotonic() < deadline:
                    try:
                        sent += sock.send(burst)
                    except TimeoutError:
                        stalled += 0.2  # the host stopped reading: its answers are unread
                    peak = max(peak, rss_bytes(pid))
                assert healthy(port)  # other clients are still served meanwhile
        assert peak - before < RSS_GROWTH_LIMIT, (before, peak, sent)
        # It was back-pressure, not a slow client, that bounded the memory: sending stalled
        # for most of the time.
        assert stalled > PIPELINE_SECONDS / 2, (stalled, sent)
