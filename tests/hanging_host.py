"""`python -m tests.hanging_host [host options]`: the local host with handlers that misbehave
on demand, for the fault tests that need a real process.

An event whose `eventId` starts with `hang-blocking-` blocks its handler's thread forever
(`threading.Event().wait()`); one starting with `hang-async-` awaits forever on the event loop.
Both only while `TEST_HANG` is set, so a restarted host without it processes them normally.
Each call appends `{"eventId", "handler", "at"}` to `$TEST_CALLS` (when set) before hanging;
so does every call for an event whose `eventId` starts with `record-` (it then returns).
An event starting with `slow-` is recorded, then its handler sleeps `TEST_SLOW_SECONDS`
(default 1) and returns.
`TEST_POOL_THREADS` (when set) makes the pool for plain handlers that small, with twice as many
threads in all for replacing stuck ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

from shared.events import Event
from shared.handlers import HandlerContext, registry
from shared.handlers.pool import BlockingPool
from shared.local.command import main


def _record(event: Event, handler: str) -> None:
    path = os.environ.get("TEST_CALLS")
    if path:
        line = json.dumps({"eventId": event.event_id, "handler": handler, "at": time.time()})
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


@registry.on("VEHICLE_STATE")
async def record(event: Event, context: HandlerContext) -> None:
    if event.event_id.startswith("record-"):
        _record(event, "record")


@registry.on("VEHICLE_STATE")
async def slow(event: Event, context: HandlerContext) -> None:
    if event.event_id.startswith("slow-"):
        _record(event, "slow")
        await asyncio.sleep(float(os.environ.get("TEST_SLOW_SECONDS", "1")))


@registry.on("VEHICLE_STATE")
def hang_blocking(event: Event, context: HandlerContext) -> None:
    if event.event_id.startswith("hang-blocking-"):
        _record(event, "hang_blocking")
        if os.environ.get("TEST_HANG"):
            threading.Event().wait()


@registry.on("VEHICLE_STATE")
async def hang_async(event: Event, context: HandlerContext) -> None:
    if event.event_id.startswith("hang-async-"):
        _record(event, "hang_async")
        if os.environ.get("TEST_HANG"):
            await asyncio.Event().wait()


if __name__ == "__main__":
    if os.environ.get("TEST_POOL_THREADS"):
        registry.pool = BlockingPool(int(os.environ["TEST_POOL_THREADS"]))
    sys.exit(main())
