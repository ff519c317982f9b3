"""Slow and idle clients: the local host closes connections that hold it up without a request.

The local host may be exposed through a tunnel to receive real Smartcar deliveries, so anyone
can connect to it. A client that opens connections and sends request heads a byte at a time
(slowloris), or opens them and sends nothing, would otherwise hold a file descriptor each until
the process runs out and stops answering. Three limits, all closing the connection, enforced
by the local host's HTTP server (http.py):

- the first request head must be complete (its blank line received) within
  `HEADER_TIMEOUT_SECONDS` of the connection opening, however the bytes trickle in;
- between requests, a kept-alive connection is closed after `IDLE_TIMEOUT_SECONDS` without a
  complete next request;
- while a request body is read, `IDLE_TIMEOUT_SECONDS` without a byte ends it with 408.
"""

from __future__ import annotations

HEADER_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 30.0
