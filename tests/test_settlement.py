"""The local host's queue calls: a message whose function returned is completed, whatever
happens next, and the event loop that makes those calls never waits for another process.

Completions ride on the fetcher's next transaction (one commit with its receive), so a stop
that comes first must complete them itself, and a fetcher with nothing to receive for (every
worker busy, every handler thread stuck) must complete them in a transaction of their own. Queue calls run on the event loop unless the queue
is busy (batching.py); then they wait in a worker thread while the loop goes on answering."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.handlers.pool import BlockingPool
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


async def until_set(event: threading.Event) -> None:
    """A handler waits for the test (30 s at most: a failed test leaves no handler behind)."""
    await asyncio.to_thread(event.wait, 30)


def active_messages(running: RunningHost) -> int:
    active: int = running.runtime.queue.stats()["active"]
    return active


def assert_completed_leaving(running: RunningHost, active: int, failure: str) -> None:
    """Within 10 s only `active` messages are left in the queue, or fail saying `failure`."""
    try:
        wait_until(lambda: active_messages(running) == active, timeout=10, interval=0.1)
    except AssertionError:
        raise AssertionError(failure) from None


def test_a_message_whose_function_returned_is_completed_while_every_worker_is_busy(
    tmp_path: Path,
) -> None:
    # The incident: with both workers busy on long deliveries, a finished message was not
    # completed until one of them returned; its lock, no longer renewed, expired meanwhile and
    # it was handled a second time (dead-lettered had it been its last delivery).
    registry = HandlerRegistry()
    started: list[str] = []
    fast_returns = threading.Event()
    busy_return = threading.Event()

    @registry.on("VEHICLE_STATE")
    async def handle(event: Event, context: HandlerContext) -> None:
        started.append(event.event_id)
        await until_set(fast_returns if event.event_id == "evt-fast" else busy_return)

    with RunningHost(local_env(tmp_path), registry=registry, workers=2) as running:
        try:
            for event_id in ("evt-busy-1", "evt-fast", "evt-busy-2"):
                body = encode(state_event(eventId=event_id))
                assert running.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: sorted(started) == ["evt-busy-1", "evt-fast"], timeout=15)
            # evt-fast returns; evt-busy-2, waiting in the queue, takes its worker at once
            # (before the vehicle state store commits what evt-fast wrote).
            fast_returns.set()
            wait_until(lambda: "evt-busy-2" in started, timeout=15)
            assert_completed_leaving(running, 2, "evt-fast's function returned but its message "
                                     "was not completed while every worker was busy")
        finally:
            busy_return.set()
        wait_until(lambda: len(running.handled()) == 3, timeout=15)
        assert sorted((r["eventId"], r["outcome"]) for r in running.handled()) == [
            ("evt-busy-1", "handled"), ("evt-busy-2", "handled"), ("evt-fast", "handled")]


def test_a_message_whose_function_returned_is_completed_while_every_handler_thread_is_stuck(
    tmp_path: Path,
) -> None:
    # The incident: once every handler thread allowed was stuck in a call its caller had given
    # up on, the host stopped taking messages (as it should) but also stopped completing them,
    # so an event that finished then was delivered again once its lock expired.
    registry = HandlerRegistry(blocking_threads=1)
    registry.pool = BlockingPool(1, limit=1)  # the bound, reached with one stuck thread
    unblock = threading.Event()

    @registry.on("VEHICLE_STATE")
    async def gives_up_on_a_hung_call(event: Event, context: HandlerContext) -> None:
        # Its blocking call hangs in the one thread allowed, and is given up on, as the host
        # gives up on a plain handler at the function timeout: the thread is stuck.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(registry.pool.run(unblock.wait, 30), 0.05)
        assert registry.pool.exhausted

    with RunningHost(local_env(tmp_path), registry=registry) as running:
        try:
            body = encode(state_event(eventId="evt-ok"))
            assert running.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: running.handled(), timeout=15)
            assert registry.pool.exhausted
            assert_completed_leaving(running, 0, "evt-ok's function returned but its message "
                                     "was not completed while every handler thread was stuck")
        finally:
            unblock.set()
        assert [(r["eventId"], r["outcome"]) for r in running.handled()] == [
            ("evt-ok", "handled")]


def test_a_last_delivery_whose_lock_expired_before_it_failed_is_recorded_once(
    tmp_path: Path,
) -> None:
    # The fault: a handler blocks the event loop (a synchronous call in an async handler)
    # for longer than the lock, so the lock is not renewed and expires; the delivery, its
    # message's last, then fails at the function timeout. The queue's lock-expiry sweep
    # dead-letters the message and records it in handled.jsonl; the host's abandon finds
    # the lock gone. The incident: the host recorded the dead letter a second time.
    registry = HandlerRegistry()

    @registry.on("VEHICLE_STATE")
    async def blocks_the_loop_then_hangs(event: Event, context: HandlerContext) -> None:
        time.sleep(1.0)  # noqa: ASYNC251 - the fault: no lock renewal meanwhile
        await asyncio.sleep(30)

    env = local_env(tmp_path, MAX_DELIVERY_COUNT="1", FUNCTION_TIMEOUT_SECONDS="0.5")
    with RunningHost(env, registry=registry, lock_duration=0.5) as running:
        host = running.host
        assert host is not None
        body = encode(state_event(eventId="evt-expired"))
        assert running.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: running.handled(), timeout=15)
        # The delivery is over (settled or given up), and any expired lock swept.
        wait_until(lambda: host.free_workers() == host.workers, timeout=15)
        assert running.runtime.queue.stats() == {"active": 0, "deadLettered": 1, "scheduled": 0}
        records = [(r["eventId"], r["outcome"], r.get("reason")) for r in running.handled()]
    assert records == [("evt-expired", "dead_lettered", "MaxDeliveryCountExceeded")]
