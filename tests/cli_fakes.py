"""Fakes for the sync Service Bus SDK surface the operations CLI uses (the boundary only).

`FakeNamespace` holds one queue and its dead-letter sub-queue; the fake receiver implements
peek (with its cursor), peek-lock receive, complete and abandon the way Service Bus does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from azure.servicebus import ServiceBusSubQueue


@dataclass
class FakeReceivedMessage:
    sequence_number: int
    message_id: str
    payload: bytes
    # AMQP hands application property keys back as bytes.
    application_properties: dict[Any, Any] = field(default_factory=dict)
    delivery_count: int = 1
    enqueued_time_utc: datetime = field(default_factory=lambda: datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    dead_letter_reason: str | None = None
    dead_letter_error_description: str | None = None
    content_type: str | None = "application/json"
    correlation_id: str | None = None
    subject: str | None = None
    locked: bool = False

    @property
    def body(self) -> Iterator[bytes]:
        # The SDK returns a generator of sections for a data body.
        return iter([self.payload])


@dataclass
class FakeNamespace:
    queue: list[Any] = field(default_factory=list)  # ServiceBusMessage objects sent
    dlq: list[FakeReceivedMessage] = field(default_factory=list)
    send_fails_with: Exception | None = None
    complete_fails_with: Exception | None = None
    completed: list[int] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)
    receivers: list[dict[str, Any]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    # Plays the app's part after a send, e.g. dead-lettering the replayed message again.
    on_send: Callable[[Any], None] | None = None
    # Sequence numbers a peek *by that number* lands past (the dead-letter sub-queue need not
    # browse in sequence-number order); a scan that pages forward still meets them.
    peek_lands_past: set[int] = field(default_factory=set)

    def seqs(self) -> list[int]:
        return [m.sequence_number for m in self.dlq]


class FakeDeadLetterReceiver:
    def __init__(self, ns: FakeNamespace) -> None:
        self.ns = ns
        self._cursor = 0
        self.closed = False

    def __enter__(self) -> FakeDeadLetterReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def peek_messages(self, max_message_count: int = 1, *, sequence_number: int = 0) -> list[FakeReceivedMessage]:
        # Like the SDK: 0 (the default) continues after the last message this receiver peeked.
        start = sequence_number if sequence_number else self._cursor + 1
        page = [m for m in sorted(self.ns.dlq, key=lambda m: m.sequence_number) if m.sequence_number >= start]
        if sequence_number in self.ns.peek_lands_past:
            page = [m for m in page if m.sequence_number != sequence_number]
        page = page[:max_message_count]
        if page:
            self._cursor = page[-1].sequence_number
        return page

    def receive_messages(self, max_message_count: int = 1, max_wait_time: float | None = None) -> list[FakeReceivedMessage]:
        batch = [m for m in self.ns.dlq if not m.locked][:max_message_count]
        for m in batch:
            m.locked = True
            m.delivery_count += 1
        return batch

    def complete_message(self, message: FakeReceivedMessage) -> None:
        assert message.locked, "completing a message that is not locked"
        if self.ns.complete_fails_with is not None:
            raise self.ns.complete_fails_with
        self.ns.dlq.remove(message)
        self.ns.completed.append(message.sequence_number)
        self.ns.events.append(f"complete {message.sequence_number}")

    def abandon_message(self, message: FakeReceivedMessage) -> None:
        assert message.locked, "abandoning a message that is not locked"
        message.locked = False
        self.ns.abandoned.append(message.sequence_number)


class FakeSyncSender:
    def __init__(self, ns: FakeNamespace) -> None:
        self.ns = ns

    def __enter__(self) -> FakeSyncSender:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send_messages(self, message: Any) -> None:
        if self.ns.send_fails_with is not None:
            raise self.ns.send_fails_with
        self.ns.queue.append(message)
        self.ns.events.append(f"send {message.message_id}")
        if self.ns.on_send is not None:
            self.ns.on_send(message)


class FakeSyncServiceBusClient:
    def __init__(self, ns: FakeNamespace) -> None:
        self.ns = ns
        self.closed = False

    def get_queue_receiver(self, queue_name: str, *, sub_queue: Any = None, max_wait_time: float | None = None) -> FakeDeadLetterReceiver:
        self.ns.receivers.append({"queue_name": queue_name, "sub_queue": sub_queue})
        assert sub_queue == ServiceBusSubQueue.DEAD_LETTER, "the CLI only receives from the DLQ"
        return FakeDeadLetterReceiver(self.ns)

    def get_queue_sender(self, queue_name: str) -> FakeSyncSender:
        return FakeSyncSender(self.ns)

    def close(self) -> None:
        self.closed = True


class FakeAdminClient:
    def __init__(self, *, active: int = 0, dead: int = 0, scheduled: int = 0, fail_with: Exception | None = None) -> None:
        self.counts = SimpleNamespace(
            active_message_count=active, dead_letter_message_count=dead,
            scheduled_message_count=scheduled, total_message_count=active + dead + scheduled,
        )
        self.fail_with = fail_with
        self.asked: list[str] = []
        self.closed = False

    def get_queue_runtime_properties(self, queue_name: str) -> Any:
        self.asked.append(queue_name)
        if self.fail_with is not None:
            raise self.fail_with
        return self.counts

    def close(self) -> None:
        self.closed = True
