"""Slow, idle and too many clients: the local host closes connections that hold it up.

The local host may be exposed through a tunnel to receive real Smartcar deliveries, so anyone
can connect to it. A client that opens connections and sends request heads or bodies a byte at
a time (slowloris), or opens them and sends nothing, would otherwise hold a file descriptor
each until the process runs out and stops answering. The limits, enforced by the local host's
HTTP server (http.py):

- a new connection's first request head must be complete within `HEADER_TIMEOUT_SECONDS`,
  and so must every later head from its first byte, however the bytes trickle in;
- between requests, a kept-alive connection is closed after `IDLE_TIMEOUT_SECONDS` without
  the first byte of a next request;
- a request body must be complete within `BODY_TIMEOUT_SECONDS`, and once
  `BODY_RATE_GRACE_SECONDS` have passed it must have come at `MIN_BODY_RATE` bytes a second
  or faster (408 otherwise);
- at most `connection_limit()` connections are open; one more closes another (idle ones
  first, then slow heads, then slow bodies, the oldest first).
"""

from __future__ import annotations

HEADER_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 30.0
BODY_TIMEOUT_SECONDS = 30.0
BODY_RATE_GRACE_SECONDS = 5.0
#: Bytes a second: a 196,608-byte body (the default MAX_BODY_BYTES) takes at most 3 minutes at
#: this rate, so it is the total deadline that bounds a large body, not the rate.
MIN_BODY_RATE = 1024
#: Descriptors kept for everything but client connections: listeners, the queue's SQLite
#: files, handled.jsonl, the inspector and its clients, spill and vehicle-state files.
RESERVED_DESCRIPTORS = 64


def connection_limit(configured: int) -> int:
    """`configured`, or fewer when the process may not open that many descriptors (a 256
    limit, macOS's default, leaves room for 192 connections)."""
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - RESERVED_DESCRIPTORS))
