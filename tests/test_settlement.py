"""Settlement on the local host: a message whose function returned is completed, whatever
happens next. Completions ride on the fetcher's next transaction (one commit with its
receive), so a stop that comes first must complete them itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.queue import LocalQueue

from .support import RunningHost, encode, local_env, signed_headers, state_event, wait_until

WEBHOOK = "/api/webhooks/smartcar"


def test_a_message_whose_function_returned_just_before_stop_is_completed(
    tmp_path: Path,
) -> None:
    registry = HandlerRegistry()
    stops: list[asyncio.Task[None]] = []
    box: dict[str, Any] = {}

    @registry.on("VEHICLE_STATE")
    async def stop_right_after_returning(event: Event, context: HandlerContext) -> None:
        # The stop starts on the loop's next turn: after this function returned, before the
        # fetcher runs again.
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: stops.append(loop.create_task(box["host"].stop())))

    body = encode(state_event(eventId="evt-stop"))
    with RunningHost(local_env(tmp_path), registry=registry) as running:
        box["host"] = running.host
        assert running.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: stops and stops[0].done(), timeout=30)
        assert stops[0].exception() is None
        assert [r["outcome"] for r in running.handled()] == ["handled"]
    with LocalQueue(tmp_path / "queue.sqlite3") as queue:
        # Completed: nothing left to redeliver (an uncompleted one would be locked, active).
        assert queue.stats()["active"] == 0
