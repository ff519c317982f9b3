"""Events stored while workers are free go straight to them: locked in the send's own
transaction (`LocalQueue.send_and_lock`) and handed over by the queue publisher, with no
receive. Nothing about delivery changes: the order is the queue's, the lock is a lock like any
other (it expires and the message comes back), and a busy queue or a hand-off that fails loses
nothing."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local import host as host_module
from shared.local.adapters import LocalQueuePublisher
from shared.local.queue import LocalQueue
from shared.local.queue_rows import QueuedMessage
from shared.publisher import OutboundMessage, PublishError
from shared.runtime import Runtime

from .support import RunningHost, encode, local_env, signed_headers, state_event, wait_until

WEBHOOK = "/api/webhooks/smartcar"


def _record_receives(runtime: Runtime, received: list[str]) -> None:
    """Wrap the queue's receive so the test sees every message a receive returned."""
    queue = runtime.queue
    original = queue.complete_and_receive

    def complete_and_receive(*args: Any, **kwargs: Any) -> Any:
        completed, messages = original(*args, **kwargs)
        received.extend(m.message_id for m in messages)
        return completed, messages

    queue.complete_and_receive = complete_and_receive


def _post(running: RunningHost, event_id: str) -> None:
    body = encode(state_event(eventId=event_id))
    assert running.post(WEBHOOK, body, signed_headers(body)).status == 200


def test_an_event_stored_while_workers_are_free_is_processed_without_a_receive(
    tmp_path: Path,
) -> None:
    received: list[str] = []
    with RunningHost(local_env(tmp_path),
                     customize=lambda rt: _record_receives(rt, received)) as running:
        for event_id in ("evt-1", "evt-2", "evt-3"):
            _post(running, event_id)
        wait_until(lambda: len(running.handled()) == 3)
        records = running.handled()
        assert sorted(r["eventId"] for r in records) == ["evt-1", "evt-2", "evt-3"]
        assert {r["deliveryCount"] for r in records} == {1}
        assert received == []  # every one was handed over at its send
        wait_until(lambda: running.runtime.queue.stats()["active"] == 0)
        publisher = running.runtime.redrive_publisher
        assert isinstance(publisher, LocalQueuePublisher) and publisher.consumer is running.host
    assert publisher.consumer is None  # a stopped host takes nothing more


def test_with_every_worker_busy_events_wait_and_go_in_queue_order(tmp_path: Path) -> None:
    registry = HandlerRegistry()
    order: list[str] = []
    release = threading.Event()

    @registry.on("VEHICLE_STATE")
    async def first_one_waits(event: Event, context: HandlerContext) -> None:
        if event.event_id == "evt-1":
            await asyncio.to_thread(release.wait, 30)
        order.append(event.event_id)

    received: list[str] = []
    with RunningHost(local_env(tmp_path), registry=registry, workers=1,
                     customize=lambda rt: _record_receives(rt, received)) as running:
        _post(running, "evt-1")  # handed to the only worker, which waits
        wait_until(lambda: running.host is not None and running.host.free_workers() == 0)
        for event_id in ("evt-2", "evt-3", "evt-4"):
            _post(running, event_id)  # no free worker: stored for a receive
        release.set()
        wait_until(lambda: len(running.handled()) == 4)
    assert order == ["evt-1", "evt-2", "evt-3", "evt-4"]
    assert received == ["evt-2", "evt-3", "evt-4"]


def test_a_hand_off_that_fails_loses_nothing(tmp_path: Path) -> None:
    failures: list[list[str]] = []
    with RunningHost(local_env(tmp_path), lock_duration=1.0) as running:
        assert running.host is not None
        deliver = running.host.deliver

        def fail_once(messages: list[QueuedMessage]) -> None:
            if not failures:
                failures.append([m.message_id for m in messages])
                raise RuntimeError("injected")
            deliver(messages)

        running.host.deliver = fail_once  # type: ignore[method-assign]
        _post(running, "evt-lost-hand")  # still 200: it is stored
        assert failures == [["evt-lost-hand"]]
        # Locked for nobody: back when the lock expires, as after a crash.
        (record,) = wait_until(running.handled, timeout=30)
        assert (record["eventId"], record["deliveryCount"]) == ("evt-lost-hand", 2)


class _Consumer:
    def __init__(self, free: int) -> None:
        self.free = free
        self.lock_duration = 45.0
        self.delivered: list[QueuedMessage] = []
        self.finished: list[str] = []
        self.woken = 0

    def free_workers(self) -> int:
        return self.free

    def deliver(self, messages: list[QueuedMessage]) -> None:
        self.delivered.extend(messages)

    def completions(self) -> list[str]:
        taken, self.finished = self.finished, []
        return taken

    def not_completed(self, lock_tokens: list[str]) -> None:
        self.finished[:0] = lock_tokens

    def wake(self) -> None:
        self.woken += 1


def _consumed(queue: LocalQueue, *, free: int) -> tuple[LocalQueuePublisher, _Consumer]:
    """A queue publisher with a consumer that has `free` workers."""
    publisher = LocalQueuePublisher(queue)
    consumer = _Consumer(free)
    publisher.consumer = consumer
    return publisher, consumer


def _message(event_id: str) -> OutboundMessage:
    return OutboundMessage(body=b"{}", message_id=event_id,
                           application_properties={"eventType": "VEHICLE_STATE"})


@pytest.mark.parametrize("free", [0, 1, 3])
def test_the_publisher_hands_over_at_most_the_free_workers(tmp_path: Path, free: int) -> None:
    with LocalQueue(tmp_path / "q.db") as queue:
        publisher, consumer = _consumed(queue, free=free)

        async def publish_two() -> list[bool]:
            return list(await asyncio.gather(publisher.publish(_message("evt-1")),
                                             publisher.publish(_message("evt-2"))))

        assert asyncio.run(publish_two()) == [True, True]
        handed = [m.message_id for m in consumer.delivered]
        assert handed == ["evt-1", "evt-2"][:free]
        assert consumer.woken == (1 if free < 2 else 0)  # woken for what it was not handed
        for message in consumer.delivered:
            assert message.locked_until is not None
            assert (message.locked_until - message.enqueued_time).total_seconds() == 45.0
        assert [m.message_id for m in queue.receive(max_messages=5)] == ["evt-1", "evt-2"][free:]


def test_a_send_that_waited_in_a_thread_hands_nothing_over(tmp_path: Path) -> None:
    with LocalQueue(tmp_path / "q.db") as queue:
        publisher, consumer = _consumed(queue, free=4)

        async def publish_while_busy() -> bool:
            # Another thread is in a queue call: the send goes to a worker thread and waits.
            queue._lock.acquire()
            task = asyncio.ensure_future(publisher.publish(_message("evt-1")))
            await asyncio.sleep(0.2)
            assert not task.done()
            queue._lock.release()
            return await task

        assert asyncio.run(publish_while_busy()) is True
        assert consumer.delivered == []  # `deliver` belongs on the event loop
        assert consumer.woken == 1  # back on the loop: receive what was stored
        assert [m.message_id for m in queue.receive()] == ["evt-1"]


def test_what_the_consumer_finished_is_completed_by_the_next_send(tmp_path: Path) -> None:
    with LocalQueue(tmp_path / "q.db") as queue:
        publisher, consumer = _consumed(queue, free=1)
        asyncio.run(publisher.publish(_message("evt-1")))
        (first,) = consumer.delivered
        consumer.finished = [first.lock_token or ""]
        asyncio.run(publisher.publish(_message("evt-2")))
        assert consumer.finished == []
        assert queue.stats()["active"] == 1  # evt-1 completed, evt-2 handed over
        assert queue.peek_dead_letters() == []


def test_a_send_that_fails_gives_the_finished_locks_back(tmp_path: Path) -> None:
    with LocalQueue(tmp_path / "q.db") as queue:
        publisher, consumer = _consumed(queue, free=1)
        asyncio.run(publisher.publish(_message("evt-1")))
        token = consumer.delivered[0].lock_token or ""
        consumer.finished = [token]
        queue.close()  # every call now fails
        with pytest.raises(PublishError):
            asyncio.run(publisher.publish(_message("evt-2")))
        assert consumer.finished == [token]  # kept, for the next send or the fetcher


def test_the_host_completes_with_its_next_send_without_a_commit_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send arriving within the completion delay carries the completion; the delay is made
    # long here so that the second send surely comes within it.
    monkeypatch.setattr(host_module, "COMPLETION_DELAY_SECONDS", 60.0)
    calls: list[list[str]] = []

    def record_completions(runtime: Runtime) -> None:
        queue = runtime.queue
        original = queue.complete_and_receive

        def complete_and_receive(lock_tokens: Any, **kwargs: Any) -> Any:
            calls.append(list(lock_tokens))
            return original(lock_tokens, **kwargs)

        queue.complete_and_receive = complete_and_receive

    # The fetcher polls once a minute here: only a send can complete evt-1 in time.
    with RunningHost(local_env(tmp_path), customize=record_completions,
                     poll_interval=60.0) as running:
        _post(running, "evt-1")
        wait_until(lambda: len(running.handled()) == 1)
        # Ready to complete once the vehicle state store committed its writes.
        host = running.host
        assert host is not None
        wait_until(lambda: host.completions_waiting() == 1)
        assert running.runtime.queue.stats()["active"] == 1  # processed, not yet completed
        _post(running, "evt-2")
        wait_until(lambda: len(running.handled()) == 2)
        with LocalQueue(tmp_path / "queue.sqlite3") as other:
            assert other.stats()["active"] == 1  # evt-2's send completed evt-1: evt-2 is left
    assert all(tokens == [] for tokens in calls)  # never by a fetcher transaction


def test_with_no_send_the_fetcher_completes_within_the_completion_delay(tmp_path: Path) -> None:
    # The fetcher polls once a minute: only the completion timer can wake it.
    with RunningHost(local_env(tmp_path), poll_interval=60.0) as running:
        _post(running, "evt-1")
        wait_until(lambda: len(running.handled()) == 1)
        wait_until(lambda: running.runtime.queue.stats()["active"] == 0, timeout=5)
