"""The local host's queue calls: a message whose function returned is completed, whatever
happens next, and the event loop that makes those calls never waits for another process.

Completions ride on the fetcher's next transaction (one commit with its receive), so a stop
that comes first must complete them itself. Queue calls run on the event loop unless the queue
is busy (batching.py); then they wait in a worker thread while the loop goes on answering."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.queue import LocalQueue

from .support import (
    Response,
    RunningHost,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

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


def test_the_host_answers_while_another_process_holds_the_queue_write_lock(
    tmp_path: Path,
) -> None:
    with RunningHost(local_env(tmp_path)) as running:
        # As `dlq purge` or an sqlite3 shell in another process would.
        other = sqlite3.connect(tmp_path / "queue.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        answers: list[Response] = []
        body = encode(state_event(eventId="evt-held"))
        try:
            poster = threading.Thread(
                target=lambda: answers.append(running.post(WEBHOOK, body, signed_headers(body))))
            poster.start()
            # The webhook's send waits for the lock in a worker thread (holding the queue)...
            wait_until(lambda: running.runtime.queue._lock.locked(), timeout=30)
            # ...while the loop answers what needs no queue (an unsigned POST): nothing on the
            # loop waits for the other process. A loop blocked in the send would answer only
            # after the busy timeout, when the first webhook has had its answer too.
            assert running.post(WEBHOOK, body).status == 401
            assert answers == []  # not acknowledged: not stored yet
        finally:
            other.execute("COMMIT")
            other.close()
        poster.join(30)
        assert [a.status for a in answers] == [200]
        wait_until(lambda: [r["eventId"] for r in running.handled()] == ["evt-held"], timeout=30)
