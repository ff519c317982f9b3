"""Slow and idle clients: the local host closes connections that hold it up without a request.

The local host may be exposed through a tunnel to receive real Smartcar deliveries, so anyone
can connect to it. A client that opens connections and sends request heads a byte at a time
(slowloris), or opens them and sends nothing, would otherwise hold a file descriptor each until
the process runs out and stops answering. Three limits, all closing the connection:

- the first request head must be complete (its blank line received) within
  `HEADER_TIMEOUT_SECONDS` of the connection opening, however the bytes trickle in;
- between requests, a kept-alive connection is closed after `IDLE_TIMEOUT_SECONDS` without a
  complete next request (aiohttp's keep-alive timeout);
- while a request body is read, `IDLE_TIMEOUT_SECONDS` without a byte ends it (`read_bounded`
  in host.py answers 408 and closes).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 30.0
# A request head ends with an empty line; HTTP/1.1 recipients may accept a bare LF as a line end.
_HEAD_END = re.compile(rb"\n\r?\n")


class HeadDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection, closed unless a whole request head arrives in time.

    Everything else is passed through unchanged: aiohttp parses and answers as usual.
    """

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if _HEAD_END.search(seen):
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-2:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            logger.debug("closing a connection that sent no complete request head in %.0f s",
                         self._timeout)
            self._transport.close()


async def serve_with_head_deadline(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    *,
    header_timeout: float,
    backlog: int = 128,
) -> asyncio.Server:
    """Listen on host:port with each connection's protocol wrapped in `HeadDeadline`."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: HeadDeadline(protocol_factory(), header_timeout),
        host, port, reuse_address=True, backlog=backlog,
    )
