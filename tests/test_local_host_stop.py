"""Stopping the local host (Ctrl-C, SIGTERM: `LocalHost.stop`) hands every message it had
taken back to the queue, uncounted: "messages in progress are abandoned and redelivered on the
next start", as the banner says.

Incident: a host stopped while a handler ran on a message's last allowed delivery
dead-lettered it as MaxDeliveryCountExceeded, with no line in handled.jsonl, although its
handler had neither returned nor failed. Each test runs a real host on loopback with real
SQLite files, stops it, and reads the queue file afterwards.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.queue import QUEUE_FILE, LocalQueue

from .support import (
    WEBHOOK,
    RunningHost,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)


class TestADeliveryInterruptedByStop:
    def test_on_its_last_delivery_is_redelivered_on_the_next_start_not_dead_lettered(
        self, tmp_path: Path
    ) -> None:
        env = local_env(tmp_path, MAX_DELIVERY_COUNT="1")
        started: list[str] = []
        never_returns = HandlerRegistry()

        @never_returns.on("VEHICLE_STATE")
        async def runs_until_stopped(event: Event, context: HandlerContext) -> None:
            started.append(event.event_id)
            await asyncio.sleep(3600)

        body = encode(state_event(eventId="evt-interrupted"))
        with RunningHost(env, registry=never_returns) as running:
            assert running.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: started, timeout=15)
        # Stopped (as on SIGTERM) while the handler ran on the only delivery allowed.
        with LocalQueue(tmp_path / QUEUE_FILE) as queue:
            assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}, (
                "the interrupted delivery was not handed back to the queue")

        returns = HandlerRegistry()

        @returns.on("VEHICLE_STATE")
        async def handle(event: Event, context: HandlerContext) -> None:
            started.append(event.event_id)

        with RunningHost(env, registry=returns) as running:
            wait_until(lambda: running.handled(), timeout=15)
            assert [(r["eventId"], r["outcome"], r["deliveryCount"])
                    for r in running.handled()] == [("evt-interrupted", "handled", 1)]
        assert started == ["evt-interrupted", "evt-interrupted"]
