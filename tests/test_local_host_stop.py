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
import sqlite3
import threading
import time
from pathlib import Path

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

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

    def test_even_before_its_task_took_its_first_step(self, tmp_path: Path) -> None:
        # The fetcher (or a send's consumer) hands a locked message to a new task, and the
        # stop comes in the same turn of the loop: a task cancelled before its first step
        # never runs its own cancellation handler. Its lock used to stay, the delivery
        # counted, and on its last delivery the lock-expiry sweep dead-lettered it unhandled.
        ran: list[str] = []
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def handle(event: Event, context: HandlerContext) -> None:
            ran.append(event.event_id)

        with RunningHost(local_env(tmp_path, MAX_DELIVERY_COUNT="1"),
                         registry=registry) as running:
            host, queue = running.host, running.runtime.queue
            assert host is not None

            async def deliver_then_stop() -> None:
                queue.send(encode(state_event(eventId="evt-handed-over")),
                           message_id="evt-handed-over")
                taken = queue.receive(max_messages=1, lock_duration=60.0)
                assert [m.delivery_count for m in taken] == [1]
                host.deliver(taken)  # its task is created, not yet run
                await host.stop()

            asyncio.run_coroutine_threadsafe(deliver_then_stop(), running.loop).result(30)
        assert ran == []
        with LocalQueue(tmp_path / QUEUE_FILE, max_delivery_count=1) as queue:
            assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}
            again = queue.receive(max_messages=1)
            assert [(m.message_id, m.delivery_count) for m in again] == [
                ("evt-handed-over", 1)], "the lock stayed, or the delivery counted"


class TestAStopWhileAReceiveWaitsForAnotherProcess:
    def test_takes_nothing_the_receive_could_lock_after_the_stop(self, tmp_path: Path) -> None:
        # The fetcher's receive waits in a thread while another process (the CLI's `dlq
        # replay`, an sqlite3 shell) holds the queue's write lock, storing a message. The
        # incident: a stop then cancelled only the wait for that thread; the receive went on
        # once the lock was free and locked the message (counting a delivery) for a host that
        # had stopped, so it stayed hidden for the lock duration and, on its last delivery,
        # was dead-lettered unhandled.
        ran: list[str] = []
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def handle(event: Event, context: HandlerContext) -> None:
            ran.append(event.event_id)

        env = local_env(tmp_path, MAX_DELIVERY_COUNT="1")
        running = RunningHost(env, registry=registry).__enter__()
        assert running.host is not None
        host = running.host
        other = sqlite3.connect(tmp_path / QUEUE_FILE, isolation_level=None)
        stopper = threading.Thread(target=running.__exit__, args=(None, None, None))
        try:
            other.execute("BEGIN IMMEDIATE")
            now = time.time()
            other.execute(  # what a replay stores, not committed yet
                "INSERT INTO messages (message_id, body, properties, enqueued_time, "
                "scheduled_time, visible_at, state) VALUES (?, ?, '{}', ?, NULL, ?, 'active')",
                ("evt-other", encode(state_event(eventId="evt-other")), now, now))
            # The fetcher's next receive finds the queue busy and waits in a thread.
            wait_until(lambda: running.runtime.queue._lock.locked(), timeout=15)
            stopper.start()  # as on SIGTERM
            wait_until(lambda: host._stopping, timeout=15)
        finally:
            other.execute("COMMIT")  # the receive gets the lock now
            other.close()
            stopper.join(30)
        assert not stopper.is_alive(), "the host did not stop"
        assert ran == []
        with LocalQueue(tmp_path / QUEUE_FILE, max_delivery_count=1) as queue:
            received = queue.receive()
            assert [(m.message_id, m.delivery_count) for m in received] == [("evt-other", 1)], (
                "the message stored during the stop is not available, uncounted, afterwards: "
                f"{queue.stats()}")
