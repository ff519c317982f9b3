"""The processor's decisions, with the Service Bus sender faked at the SDK boundary."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.functions.servicebus import ServiceBusMessage

from shared.functions import inbound_message
from shared.handlers import HandlerRegistry
from shared.local.adapters import HandledLog
from shared.processor import (
    DeadLetterCopyError,
    HandlerFailedError,
    InboundMessage,
    Outcome,
    ServiceBusDeadLetterer,
    backoff_seconds,
    process_message,
)
from shared.settings import load_settings

from .fakes import FakeSender
from .support import encode, fixture_bytes, state_event

SETTINGS = load_settings({"RETRY_BACKOFF_BASE_SECONDS": "2", "RETRY_BACKOFF_MAX_SECONDS": "60"})


class RecordingDeadLetterer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        self.calls.append((message.message_id, reason, description))


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def run(message: InboundMessage, registry: HandlerRegistry, **kw: Any) -> Any:
    return asyncio.run(
        process_message(
            message,
            settings=kw.pop("settings", SETTINGS),
            registry=registry,
            dead_letterer=kw.pop("dead_letterer", RecordingDeadLetterer()),
            **kw,
        )
    )


def message(body: bytes, delivery_count: int = 1, **props: str) -> InboundMessage:
    return InboundMessage(body=body, message_id="m1", delivery_count=delivery_count,
                          sequence_number=7, application_properties=props)


class TestBackoff:
    def test_doubles_per_delivery_and_is_capped(self) -> None:
        delays = [backoff_seconds(n, base=2, maximum=60) for n in range(1, 8)]
        assert delays == [2, 4, 8, 16, 32, 60, 60]

    def test_huge_delivery_counts_do_not_overflow(self) -> None:
        assert backoff_seconds(10_000, base=2, maximum=60) == 60


class TestOutcomes:
    def test_handled_event_is_logged(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()
        seen: list[str] = []
        registry.on("VEHICLE_STATE")(lambda event, ctx: seen.append(event.event_id))
        log = HandledLog(tmp_path / "handled.jsonl")
        result = run(message(fixture_bytes("vehicle_state.json"), 2), registry, handled_log=log)
        assert result.outcome is Outcome.HANDLED
        assert seen == ["550e8400-e29b-41d4-a716-446655440000"]
        (record,) = log.read()
        assert record["eventId"] == "550e8400-e29b-41d4-a716-446655440000"
        assert record["deliveryCount"] == 2
        assert record["vehicleId"] == "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"
        assert record["outcome"] == "handled"

    def test_async_handlers_are_awaited(self) -> None:
        registry = HandlerRegistry()
        seen: list[str] = []

        @registry.on("VEHICLE_ERROR")
        async def on_error(event: Any, ctx: Any) -> None:
            await asyncio.sleep(0)
            seen.append(event.errors[0].code)

        assert run(message(fixture_bytes("vehicle_error.json")), registry).outcome is Outcome.HANDLED
        assert seen == ["VEHICLE_NOT_CAPABLE"]

    def test_signal_handlers_receive_only_their_signal(self) -> None:
        registry = HandlerRegistry()
        seen: list[Any] = []
        registry.on_signal("TractionBattery.StateOfCharge")(
            lambda event, signal, ctx: seen.append((signal.path, signal.value))
        )
        registry.on_signal("Location.IsAtHome")(lambda e, s, c: seen.append("failed signal"))
        run(message(fixture_bytes("vehicle_state.json")), registry)
        assert seen == [("TractionBattery.StateOfCharge", 78)]

    def test_unknown_event_type_is_unhandled_not_an_error(self) -> None:
        result = run(message(encode(state_event(eventType="NEW_KIND"))), HandlerRegistry())
        assert result.outcome is Outcome.UNHANDLED

    def test_invalid_payload_is_dead_lettered_with_a_description(self) -> None:
        dl = RecordingDeadLetterer()
        result = run(message(b'{"eventId": "e1"}'), HandlerRegistry(), dead_letterer=dl)
        assert result.outcome is Outcome.DEAD_LETTERED
        assert dl.calls == [("m1", "InvalidPayload", "eventType is missing")]

    def test_failing_handler_waits_with_backoff_then_raises(self) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        def boom(event: Any, ctx: Any) -> None:
            raise ConnectionError("crm down")

        sleeps = Sleeps()
        for delivery in (1, 2, 3):
            with pytest.raises(HandlerFailedError, match="ConnectionError"):
                run(message(encode(state_event()), delivery), registry, sleep=sleeps)
        assert sleeps.delays == [2, 4, 8]

    def test_last_delivery_does_not_wait(self) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        sleeps = Sleeps()
        with pytest.raises(HandlerFailedError):
            run(message(encode(state_event()), SETTINGS.max_delivery_count), registry, sleep=sleeps)
        assert sleeps.delays == []

    def test_dead_letter_copy_is_refused_without_processing(self) -> None:
        registry = HandlerRegistry()
        seen: list[str] = []
        registry.on("VEHICLE_STATE")(lambda e, c: seen.append(e.event_id))
        copy = message(encode(state_event()), deadLetterReason="InvalidPayload")
        with pytest.raises(DeadLetterCopyError):
            run(copy, registry)
        assert seen == []


class TestServiceBusDeadLetterer:
    def test_sends_a_short_lived_copy_with_reason_and_description(self) -> None:
        sender = FakeSender()
        dl = ServiceBusDeadLetterer(sender.send_messages)
        body = b"not json"
        original = InboundMessage(body=body, message_id="sha256:ab", delivery_count=1,
                                  application_properties={"eventType": "X"})
        asyncio.run(dl.dead_letter(original, reason="InvalidPayload", description="bad"))
        (copy,) = sender.sent
        assert b"".join(copy.body) == body
        assert copy.message_id == "sha256:ab:dead-letter"
        assert copy.time_to_live == timedelta(seconds=1)
        assert dict(copy.application_properties) == {
            "eventType": "X", "deadLetterReason": "InvalidPayload", "deadLetterDescription": "bad"
        }

    def test_copy_id_stays_within_128_characters_for_long_event_ids(self) -> None:
        sender = FakeSender()
        dl = ServiceBusDeadLetterer(sender.send_messages)
        long_id = InboundMessage(body=b"x", message_id="e" * 128, delivery_count=1)
        asyncio.run(dl.dead_letter(long_id, reason="InvalidPayload", description="bad"))
        (copy,) = sender.sent
        assert len(copy.message_id) <= 128
        assert copy.message_id.startswith("sha256:") and copy.message_id.endswith(":dead-letter")

    def test_send_failure_propagates_so_the_original_is_retried(self) -> None:
        sender = FakeSender(fail_with=ConnectionError("down"))
        dl = ServiceBusDeadLetterer(sender.send_messages)
        with pytest.raises(ConnectionError):
            asyncio.run(dl.dead_letter(message(b"x"), reason="InvalidPayload", description="d"))


class TestFunctionAdapter:
    def test_service_bus_message_becomes_an_inbound_message(self) -> None:
        msg = ServiceBusMessage(
            body=b'{"a":1}', message_id="e1", delivery_count=3, sequence_number=42,
            application_properties={"eventType": "VEHICLE_STATE"}, user_properties={},
        )
        inbound = inbound_message(msg)
        assert inbound == InboundMessage(
            body=b'{"a":1}', message_id="e1", delivery_count=3, sequence_number=42,
            application_properties={"eventType": "VEHICLE_STATE"}, enqueued_time=None,
        )


class UnwritableLog:
    """A handled log on a full disk: every append fails as `HandledLog`'s does."""

    def append(self, record: Any) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        return None


class TestUnrecordedOutcome:
    def test_an_outcome_that_cannot_be_recorded_fails_the_delivery_after_the_backoff(
        self,
    ) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: None)
        sleeps = Sleeps()
        for delivery in (1, 2, SETTINGS.max_delivery_count):
            with pytest.raises(HandlerFailedError, match="not recorded: OSError"):
                run(message(encode(state_event()), delivery), registry, sleep=sleeps,
                    handled_log=UnwritableLog())
        assert sleeps.delays == [2, 4]  # never at once; the last delivery does not wait
