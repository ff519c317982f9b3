"""The processor's decisions, with the Service Bus sender faked at the SDK boundary."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from azure.functions.servicebus import ServiceBusMessage
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from shared import processor
from shared.clockcheck import ClockWatch
from shared.functions import inbound_message
from shared.handlers import HandlerRegistry
from shared.local.adapters import HandledLog
from shared.processor import (
    DeadLetterCopyError,
    HandlerFailedError,
    InboundMessage,
    Outcome,
    ServiceBusDeadLetterer,
    error_summary,
    handler_budget_for,
    outcome_record,
    process_message,
)
from shared.publisher import PROP_RECEIVED_AT, PROP_REPLAY_COUNT
from shared.retry import RetryCopy, backoff_seconds
from shared.settings import load_settings
from shared.telemetry import Telemetry
from shared.vehicle_state import ApplyResult, ErrorState

from .fakes import FakeSender
from .support import encode, fixture_bytes, state_event

SETTINGS = load_settings({"RETRY_BACKOFF_BASE_SECONDS": "2", "RETRY_BACKOFF_MAX_SECONDS": "60"})


class RecordingDeadLetterer:
    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.messages: list[InboundMessage] = []
        self.fail_with = fail_with

    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append((message.message_id, reason, description))
        self.messages.append(message)


class RecordingRetrySender:
    """The retry boundary: records the copies the processor schedules."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.copies: list[RetryCopy] = []
        self.fail_with = fail_with

    async def schedule(self, copy: RetryCopy) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.copies.append(copy)


NOW = 1_800_000_000.0


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
            retry_sender=kw.pop("retry_sender", RecordingRetrySender()),
            clock=kw.pop("clock", lambda: NOW),
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

    def test_the_exponent_stops_at_30_whatever_the_cap(self) -> None:
        uncapped = float("inf")
        assert backoff_seconds(31, base=1, maximum=uncapped) == 2.0**30
        assert backoff_seconds(10_000, base=1, maximum=uncapped) == 2.0**30
        assert backoff_seconds(30, base=1, maximum=uncapped) == 2.0**29

    def test_a_first_or_uncounted_delivery_waits_the_base(self) -> None:
        assert backoff_seconds(0, base=3, maximum=60) == 3
        assert backoff_seconds(1, base=3, maximum=60) == 3


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

    def test_handlers_are_told_which_message_and_delivery_they_handle(self) -> None:
        registry = HandlerRegistry()
        seen: list[tuple[str, int, int]] = []
        registry.on("VEHICLE_STATE")(
            lambda e, ctx: seen.append(
                (ctx.message_id, ctx.delivery_count, ctx.settings.max_delivery_count)
            )
        )
        run(message(encode(state_event()), 3), registry)
        assert seen == [("m1", 3, SETTINGS.max_delivery_count)]

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

    @pytest.mark.parametrize(
        ("signal", "description"),
        [
            ("TractionBattery.StateOfCharge", "data.signals[1] must be an object, got str"),
            ({"body": [78]}, "data.signals[1].body must be an object, got list"),
            ({"meta": {"oemUpdatedAt": "soon"}},
             "data.signals[1].meta.oemUpdatedAt is not an ISO-8601 timestamp"),
        ],
    )
    def test_a_bad_signal_is_dead_lettered_before_a_handler_that_never_reads_signals(
        self, signal: Any, description: str
    ) -> None:
        # Signals are built lazily; the checks that refuse them are not, so a handler that
        # reads only the envelope never runs on an event that would fail when read further.
        document = state_event()
        document["data"]["signals"].insert(1, signal)
        registry = HandlerRegistry()
        ran: list[str] = []
        registry.on("VEHICLE_STATE")(lambda event, ctx: ran.append(event.event_id))
        dl = RecordingDeadLetterer()

        result = run(message(encode(document)), registry, dead_letterer=dl)

        assert (result.outcome, ran) == (Outcome.DEAD_LETTERED, [])
        assert dl.calls == [("m1", "InvalidPayload", description)]

    def test_failing_handler_schedules_the_next_attempt_and_returns(self) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        def boom(event: Any, ctx: Any) -> None:
            raise ConnectionError("crm down")

        event = state_event()
        sender, sleeps = RecordingRetrySender(), Sleeps()
        props: dict[str, str] = {"eventId": event["eventId"], "eventType": "VEHICLE_STATE"}
        for _ in range(3):  # each copy is delivered in turn, as the queue would
            result = run(message(encode(event), 1, **props), registry, retry_sender=sender,
                         sleep=sleeps)
            assert (result.outcome, result.error_type) == (Outcome.RETRIED, "ConnectionError")
            assert result.description == "crm down"
            assert result.event is not None and result.event.event_id == event["eventId"]
            props = sender.copies[-1].application_properties
        assert sleeps.delays == []  # nothing waited inside the invocation
        assert [(c.attempt, c.delay_seconds, c.scheduled_enqueue_time, c.message_id)
                for c in sender.copies] == [
            (n + 1, delay, datetime.fromtimestamp(NOW + delay, UTC),
             f"{event['eventId']}:retry:{n + 1}")
            for n, delay in ((1, 2.0), (2, 4.0), (3, 8.0))
        ]
        last = sender.copies[-1]
        assert last.body == encode(event)
        assert last.application_properties["attempt"] == "4"
        assert last.application_properties["eventType"] == "VEHICLE_STATE"
        assert json.loads(last.application_properties["attemptHistory"]) == [
            {"attempt": n, "failedAt": "2027-01-15T08:00:00.000+00:00", "error": "ConnectionError"}
            for n in (1, 2, 3)
        ]

    def test_the_attempt_comes_from_the_message_not_the_delivery_count(self) -> None:
        # A crash after the copy was sent and before the original was completed: the broker
        # redelivers the original (delivery count 2). It must build the same copy, whose id
        # duplicate detection then drops.
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        sender = RecordingRetrySender()
        event = state_event()
        for delivery in (1, 2, 4):
            run(message(encode(event), delivery), registry, retry_sender=sender)
        assert {(c.message_id, c.attempt, c.delay_seconds) for c in sender.copies} == {
            (f"{event['eventId']}:retry:2", 2, 2.0)}

    @pytest.mark.parametrize("base", ["1", "0.25", "0"])
    def test_a_short_backoff_is_scheduled_as_set(self, base: str) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        settings = load_settings({"RETRY_BACKOFF_BASE_SECONDS": base})
        sender = RecordingRetrySender()
        run(message(encode(state_event()), 1), registry, settings=settings, retry_sender=sender)
        (copy,) = sender.copies
        assert copy.scheduled_enqueue_time == datetime.fromtimestamp(NOW + float(base), UTC)

    def test_the_last_attempt_is_dead_lettered_with_its_history(self) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        sender, dl = RecordingRetrySender(), RecordingDeadLetterer()
        history = json.dumps([{"attempt": n, "failedAt": f"t{n}", "error": "KeyError"}
                              for n in (1, 2, 3, 4)])
        result = run(message(encode(state_event()), 1, attempt="5", attemptHistory=history),
                     registry, retry_sender=sender, dead_letterer=dl)
        assert sender.copies == []
        description = (
            "handler failed in 5 delivery attempts (MAX_DELIVERY_COUNT=5): 1 KeyError at t1, "
            "2 KeyError at t2, 3 KeyError at t3, 4 KeyError at t4, "
            "5 ZeroDivisionError at 2027-01-15T08:00:00.000+00:00"
        )
        assert dl.calls == [("m1", "MaxDeliveryCountExceeded", description)]
        (sent,) = dl.messages
        assert json.loads(sent.application_properties["attemptHistory"])[-1] == {
            "attempt": 5, "failedAt": "2027-01-15T08:00:00.000+00:00",
            "error": "ZeroDivisionError"}
        assert (result.outcome, result.reason, result.error_type, result.description) == (
            Outcome.DEAD_LETTERED, "MaxDeliveryCountExceeded", "ZeroDivisionError", description)
        assert result.event is not None and result.event.event_type == "VEHICLE_STATE"

    @pytest.mark.parametrize(("attempt", "send"), [("1", "schedule the retry of"),
                                                   ("5", "dead-letter")])
    def test_a_retry_or_dead_letter_that_cannot_be_sent_abandons_the_original(
        self, attempt: str, send: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        failing = RecordingRetrySender(fail_with=ConnectionError("bus down"))
        dl = RecordingDeadLetterer(fail_with=ConnectionError("bus down"))
        event = state_event()
        with caplog.at_level(logging.WARNING, logger="shared.processor"), pytest.raises(
                HandlerFailedError, match="ZeroDivisionError"):
            run(message(encode(event), 1, attempt=attempt), registry,
                retry_sender=failing, dead_letterer=dl)
        assert caplog.records[-1].getMessage() == (
            f"cannot {send} event {event['eventId']} after its handler failed: "
            "ConnectionError; the message is abandoned and delivered again")

    def test_the_retry_of_an_event_whose_id_cannot_name_a_message_is_named_by_its_body(
        self
    ) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        sender = RecordingRetrySender()
        body = encode(state_event(eventId="e" * 200))
        result = run(message(body, 1), registry, retry_sender=sender)
        assert result.outcome is Outcome.RETRIED
        assert [c.message_id for c in sender.copies] == [
            f"sha256:{hashlib.sha256(body).hexdigest()}:retry:2"]

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
            "eventType": "X", "deadLetterReason": "InvalidPayload", "deadLetterDescription": "bad",
            "deadLetterDeliveryCount": 1,
        }

    def test_the_copy_carries_the_event_s_delivery_count(self) -> None:
        """A copy is delivered and refused, or not, before it expires: its own delivery count
        says nothing about the event. The event's (a scheduled retry's attempt, plus this
        message's deliveries) travels with it."""
        sender = FakeSender()
        dl = ServiceBusDeadLetterer(sender.send_messages)
        retried = InboundMessage(body=b"x", message_id="e1:retry:4", delivery_count=2,
                                 application_properties={"attempt": "4"})
        asyncio.run(dl.dead_letter(retried, reason="MaxDeliveryCountExceeded", description="d"))
        (copy,) = sender.sent
        assert copy.application_properties["deadLetterDeliveryCount"] == 5

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


class TestWhatOperatorsReadInTheLog:
    """What the processor says about each outcome: enough to act on, never the body above
    DEBUG (it can hold a vehicle's location)."""

    def records(self, caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == "shared.processor"]

    def test_handler_failure_names_event_attempt_error_and_next_step(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        def boom(event: Any, ctx: Any) -> None:
            raise ConnectionError("crm down")

        event = state_event()
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            for attempt in (2, SETTINGS.max_delivery_count):
                run(message(encode(event), 1, attempt=str(attempt)), registry)
            with pytest.raises(HandlerFailedError):
                run(message(encode(event), 1), registry,
                    retry_sender=RecordingRetrySender(fail_with=TimeoutError()))
        prefix = f"handler failed for event {event['eventId']} (VEHICLE_STATE, attempt"
        assert self.records(caplog) == [
            (logging.WARNING, f"{prefix} 2 of 5): ConnectionError; retrying in 4.0s "
                              f"as message {event['eventId']}:retry:3"),
            (logging.WARNING, f"{prefix} 5 of 5): ConnectionError; dead-lettering it "
                              "as MaxDeliveryCountExceeded"),
            (logging.WARNING, f"{prefix} 1 of 5): ConnectionError; retrying in 2.0s "
                              f"as message {event['eventId']}:retry:2"),
            (logging.WARNING, f"cannot schedule the retry of event {event['eventId']} after "
                              "its handler failed: TimeoutError; the message is abandoned and "
                              "delivered again"),
        ]

    @pytest.mark.parametrize("attempt", ["1", "5"])  # retried, dead-lettered
    def test_a_handler_error_text_reaches_debug_only(
        self, attempt: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        # The text of an ordinary handler bug quotes the value it choked on: a location.
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        def store_position(event: Any, ctx: Any) -> None:
            float("48.858370 N")

        event = state_event()
        with caplog.at_level(logging.DEBUG, logger="shared.processor"):
            run(message(encode(event), 1, attempt=attempt), registry)
        above_debug = [m for level, m in self.records(caplog) if level > logging.DEBUG]
        assert above_debug and all("ValueError" in m for m in above_debug)
        assert not any("48.858370" in m for m in above_debug)
        (debug,) = [r for r in caplog.records
                    if r.levelno == logging.DEBUG and "48.858370" in r.getMessage()]
        assert debug.getMessage() == (
            f"handler failed for event {event['eventId']} (attempt {attempt}): ValueError: "
            "could not convert string to float: '48.858370 N'")
        assert debug.exc_info is not None

    def test_handler_failure_error_names_event_and_cause(self) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        event = state_event()
        with pytest.raises(HandlerFailedError) as raised:
            run(message(encode(event), 1), registry,
                retry_sender=RecordingRetrySender(fail_with=ConnectionError()))
        assert str(raised.value) == f"handler failed for event {event['eventId']}: ZeroDivisionError"
        assert isinstance(raised.value.__cause__, ZeroDivisionError)

    def test_unreadable_payload_is_a_warning_with_reason_and_no_body(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.DEBUG, logger="shared.processor"):
            run(message(b'{"eventId": "e1", "secret-location": 1}'), HandlerRegistry())
        assert self.records(caplog) == [(
            logging.WARNING,
            "message m1 is not a readable Smartcar event (eventType is missing); "
            "dead-lettering it as InvalidPayload",
        )]

    def test_an_event_without_handler_is_reported_at_info(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        event = state_event(eventType="NEW_KIND")
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            run(message(encode(event)), HandlerRegistry())
        assert self.records(caplog) == [
            (logging.INFO, f"no handler for event {event['eventId']} of type NEW_KIND")
        ]

    def test_an_event_whose_signals_have_no_handler_says_none_ran(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Handlers for VEHICLE_STATE's signals exist, but not for this event's: it is
        unhandled, and the log does not claim that its type has no handler."""
        registry = HandlerRegistry()
        registry.on_signal("Nowhere.ToBeFound")(lambda event, signal, context: None)
        event = state_event()
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            result = run(message(encode(event)), registry)
        assert result.outcome is Outcome.UNHANDLED
        assert self.records(caplog) == [
            (logging.INFO, f"no handler ran for event {event['eventId']} of type VEHICLE_STATE: "
             "none is registered for the signals it holds or the changes it stored")
        ]

    def test_the_body_is_logged_at_debug_only(self, caplog: pytest.LogCaptureFixture) -> None:
        event = state_event()
        body = encode(event)
        with caplog.at_level(logging.DEBUG, logger="shared.processor"):
            run(message(body), HandlerRegistry())
        debug = [m for level, m in self.records(caplog) if level == logging.DEBUG]
        assert debug == [f"processing event {event['eventId']} body={body!r}"]
        assert all(level == logging.DEBUG or str(body) not in m
                   for level, m in self.records(caplog))


class TestHandledLogRecord:
    def test_one_line_per_event_with_what_a_developer_needs(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: None)
        log = HandledLog(tmp_path / "handled.jsonl")
        before = datetime.now(UTC)
        run(message(fixture_bytes("vehicle_state.json"), 3), registry, handled_log=log)
        run(message(encode(state_event(eventType="NEW_KIND")), 1), registry, handled_log=log)
        after = datetime.now(UTC)
        first, second = log.read()
        log.close()
        handled_at = datetime.fromisoformat(first.pop("handledAt"))
        assert handled_at.tzinfo is not None and before <= handled_at <= after
        assert first == {
            "eventId": "550e8400-e29b-41d4-a716-446655440000",
            "eventType": "VEHICLE_STATE",
            "vehicleId": "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2",
            "deliveryCount": 3,
            "messageId": "m1",
            "outcome": "handled",
        }
        assert (second["eventType"], second["outcome"]) == ("NEW_KIND", "unhandled")


class TestWhatTheProcessSpanSays:
    """The processing span is how one event is found in Application Insights: it names the
    message, the event read from the body (not only what the sender put in the properties),
    why it was dead-lettered, and feeds the delivery-lag histogram."""

    @pytest.fixture
    def captured(self) -> tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]:
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        reader = InMemoryMetricReader()
        telemetry = Telemetry(tracer_provider=tracer_provider,
                              meter_provider=MeterProvider(metric_readers=[reader]))
        return spans, reader, telemetry

    def test_a_handled_event_without_envelope_properties_is_named_from_its_body(
        self, captured: tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]
    ) -> None:
        spans, reader, telemetry = captured
        event = state_event()
        event["meta"]["deliveredAt"] = int((datetime.now(UTC) - timedelta(seconds=5)).timestamp()
                                           * 1000)
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: None)
        # No application properties: a message sent by another producer, or replayed by hand.
        result = run(message(encode(event), 2), registry, telemetry=telemetry)
        assert result.outcome is Outcome.HANDLED
        (span,) = spans.get_finished_spans()
        assert dict(span.attributes or {}) == {
            "messageId": "m1",
            "deliveryCount": 2,
            "eventType": "VEHICLE_STATE",
            "eventId": event["eventId"],
            "vehicleId": event["vehicleId"],
            "outcome": "handled",
        }
        lags = [point for rm in (reader.get_metrics_data() or MetricsData([])).resource_metrics
                for sm in rm.scope_metrics for metric in sm.metrics
                if metric.name == "smartcar.event.delivery_lag"
                for point in metric.data.data_points]
        (lag,) = lags
        assert isinstance(lag, HistogramDataPoint)  # a histogram's point
        assert lag.count == 1 and 5000 <= lag.sum < 120_000

    def test_a_replayed_dead_letter_records_no_delivery_lag(
        self, captured: tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]
    ) -> None:
        """`dlq replay` sends events hours old on purpose: their age is not the pipeline's lag,
        and would set off the end-to-end lag alert after every replay the runbook asks for."""
        _, reader, telemetry = captured
        event = state_event()
        event["meta"]["deliveredAt"] = int((datetime.now(UTC) - timedelta(hours=6)).timestamp()
                                           * 1000)
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: None)
        result = run(message(encode(event), 1, **{PROP_REPLAY_COUNT: "1"}), registry,
                     telemetry=telemetry)
        assert result.outcome is Outcome.HANDLED
        names_recorded = {metric.name for rm in
                          (reader.get_metrics_data() or MetricsData([])).resource_metrics
                          for sm in rm.scope_metrics for metric in sm.metrics}
        assert "smartcar.event.processed" in names_recorded  # the run was observed
        assert "smartcar.event.delivery_lag" not in names_recorded

    def test_an_unreadable_payload_names_the_dead_letter_reason(
        self, captured: tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]
    ) -> None:
        spans, _, telemetry = captured
        dl = RecordingDeadLetterer()
        result = run(message(b'{"eventId": "e1"}'), HandlerRegistry(), dead_letterer=dl,
                     telemetry=telemetry)
        assert (result.outcome, result.description) == (Outcome.DEAD_LETTERED,
                                                        "eventType is missing")
        (span,) = spans.get_finished_spans()
        attributes = dict(span.attributes or {})
        assert attributes["deadLetterReason"] == "InvalidPayload"
        assert attributes["outcome"] == "dead_lettered"
        assert attributes["messageId"] == "m1"

    def test_a_retry_that_cannot_be_sent_is_a_retried_attempt_named_by_its_handler_s_error(
        self, captured: tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]
    ) -> None:
        spans, _, telemetry = captured
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: 1 / 0)
        with pytest.raises(HandlerFailedError):
            run(message(encode(state_event()), 1), registry, telemetry=telemetry,
                retry_sender=RecordingRetrySender(fail_with=ConnectionError("bus down")))
        (span,) = spans.get_finished_spans()
        attributes = dict(span.attributes or {})
        assert (attributes["outcome"], attributes["errorType"]) == ("retried",
                                                                    "ZeroDivisionError")


    @pytest.mark.parametrize("stale", [False, True])  # InvalidPayload, StaleDelivery
    def test_a_dead_letter_that_cannot_be_sent_is_a_retried_attempt_named_by_its_error(
        self, stale: bool,
        captured: tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry],
    ) -> None:
        spans, reader, telemetry = captured
        received_ms = int(NOW * 1000)
        if stale:
            event = state_event()
            event["meta"]["deliveredAt"] = received_ms - 3_600_000
            body = encode(event)
        else:
            body = b'{"eventId": 5}'
        unsent = message(body, 1, **{PROP_RECEIVED_AT: str(received_ms)})
        with pytest.raises(ConnectionError):  # the message is abandoned, delivered again
            run(unsent, HandlerRegistry(), telemetry=telemetry,
                dead_letterer=RecordingDeadLetterer(fail_with=ConnectionError("bus down")))
        (span,) = spans.get_finished_spans()
        attributes = dict(span.attributes or {})
        assert (attributes["outcome"], attributes["errorType"]) == ("retried", "ConnectionError")
        assert span.status.status_code is StatusCode.ERROR
        processed = [(dict(point.attributes or {}), point.value)
                     for rm in (reader.get_metrics_data() or MetricsData([])).resource_metrics
                     for sm in rm.scope_metrics for metric in sm.metrics
                     if metric.name == "smartcar.event.processed"
                     for point in metric.data.data_points
                     if isinstance(point, NumberDataPoint)]
        assert [(a["outcome"], value) for a, value in processed] == [("retried", 1)]

    def test_a_dead_letter_copy_is_no_outcome(
        self, captured: tuple[InMemorySpanExporter, InMemoryMetricReader, Telemetry]
    ) -> None:
        spans, reader, telemetry = captured
        copy = message(encode(state_event()), deadLetterReason="InvalidPayload")
        with pytest.raises(DeadLetterCopyError):
            run(copy, HandlerRegistry(), telemetry=telemetry)
        (span,) = spans.get_finished_spans()
        assert "outcome" not in dict(span.attributes or {})
        assert span.status.status_code is StatusCode.UNSET
        assert not any(metric.name == "smartcar.event.processed"
                       for rm in (reader.get_metrics_data() or MetricsData([])).resource_metrics
                       for sm in rm.scope_metrics for metric in sm.metrics)

class TestDeadLetterCopies:
    def test_refusal_names_the_message(self) -> None:
        copy = message(encode(state_event()), deadLetterReason="InvalidPayload")
        with pytest.raises(DeadLetterCopyError) as raised:
            run(copy, HandlerRegistry())
        assert str(raised.value) == "message m1 is a dead-letter copy; refusing it so it expires"


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


class TestOutcomeRecords:
    """What handled.jsonl gets for each final outcome, in-process (the HTTP suite proves the
    same through the local host)."""

    def test_an_unreadable_payload_is_recorded_with_the_ids_its_body_holds(
        self, tmp_path: Path
    ) -> None:
        log = HandledLog(tmp_path / "handled.jsonl")
        body = b'{"eventId": "e1", "vehicleId": "v1", "data": "oops"}'
        run(message(body, 2), HandlerRegistry(), handled_log=log)
        (record,) = log.read()
        log.close()
        record.pop("handledAt")
        assert record == {
            "eventId": "e1", "eventType": None, "vehicleId": "v1", "deliveryCount": 2,
            "messageId": "m1", "outcome": "dead_lettered", "reason": "InvalidPayload",
            "description": "eventType is missing",
        }

    def test_a_handled_event_has_no_reason(self, tmp_path: Path) -> None:
        log = HandledLog(tmp_path / "handled.jsonl")
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: None)
        run(message(encode(state_event())), registry, handled_log=log)
        (record,) = log.read()
        log.close()
        assert record["outcome"] == "handled"
        assert "reason" not in record and "description" not in record


class TestUnrecordedOutcomeIsReported:
    def handled_registry(self) -> HandlerRegistry:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda e, c: None)
        return registry

    def test_the_log_says_which_message_which_delivery_and_what_next(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            for delivery in (2, SETTINGS.max_delivery_count):
                with pytest.raises(HandlerFailedError) as raised:
                    run(message(encode(state_event()), delivery), self.handled_registry(),
                        sleep=Sleeps(), handled_log=UnwritableLog())
                assert str(raised.value) == "outcome of message m1 not recorded: OSError"
                assert isinstance(raised.value.__cause__, OSError)
        assert [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == "shared.processor"] == [
            (logging.WARNING, "cannot record message m1 in handled.jsonl (delivery 2 of 5): "
                              "[Errno 28] No space left on device; retrying in 4.0s"),
            (logging.WARNING, "cannot record message m1 in handled.jsonl (delivery 5 of 5): "
                              "[Errno 28] No space left on device; it will be dead-lettered"),
        ]

    def test_a_sub_second_backoff_is_still_waited(self) -> None:
        settings = load_settings({"RETRY_BACKOFF_BASE_SECONDS": "0.25"})
        sleeps = Sleeps()
        with pytest.raises(HandlerFailedError):
            run(message(encode(state_event()), 1), self.handled_registry(), settings=settings,
                sleep=sleeps, handled_log=UnwritableLog())
        assert sleeps.delays == [0.25]

    def test_the_span_says_retried_or_dead_lettered_with_the_error_type(self) -> None:
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=MeterProvider())
        for delivery in (1, SETTINGS.max_delivery_count):
            with pytest.raises(HandlerFailedError):
                run(message(encode(state_event()), delivery), self.handled_registry(),
                    sleep=Sleeps(), handled_log=UnwritableLog(), telemetry=telemetry)
        assert [(dict(s.attributes or {})["outcome"], dict(s.attributes or {})["errorType"])
                for s in spans.get_finished_spans()] == [
            ("retried", "OSError"), ("dead_lettered", "OSError"),
        ]


class TestTheAgeOfADelivery:
    """The processor's verdict on a delivery's age at receipt, on the stamps a message carries
    (tests/test_clock_skew.py runs the whole host under a shifted clock)."""

    RECEIVED_MS = 1_764_000_000_000
    AGED = load_settings({"MAX_DELIVERY_AGE_SECONDS": "600"})

    def deliver(self, age_seconds: float, monkeypatch: pytest.MonkeyPatch,
                **props: str) -> tuple[dict[str, Any], Any, RecordingDeadLetterer, ClockWatch]:
        watch = ClockWatch(min_samples=1)
        monkeypatch.setattr(processor, "CLOCK_WATCH", watch)
        event = state_event()
        event["meta"]["deliveredAt"] = self.RECEIVED_MS - int(age_seconds * 1000)
        dead = RecordingDeadLetterer()
        stamped = InboundMessage(
            body=encode(event), message_id="m1", delivery_count=1,
            application_properties={PROP_RECEIVED_AT: str(self.RECEIVED_MS), **props})
        result = run(stamped, HandlerRegistry(), settings=self.AGED, dead_letterer=dead)
        return event, result, dead, watch

    def records(self, caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == "shared.processor" and r.levelno >= logging.WARNING]

    def test_past_the_maximum_it_is_dead_lettered_saying_why(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            event, result, dead, watch = self.deliver(601, monkeypatch)
        delivered = datetime.fromtimestamp((self.RECEIVED_MS - 601_000) / 1000, UTC)
        received = datetime.fromtimestamp(self.RECEIVED_MS / 1000, UTC)
        why = (f"meta.deliveredAt {delivered.isoformat()} was 601 s old when received at "
               f"{received.isoformat()}, over MAX_DELIVERY_AGE_SECONDS (600 s): a replay, or "
               "a delivery held back (or this host's clock is ahead)")
        assert (result.outcome, result.reason, result.description) == (
            Outcome.DEAD_LETTERED, "StaleDelivery", why)
        assert result.event is not None and result.event.event_id == event["eventId"]
        assert dead.calls == [("m1", "StaleDelivery", why)]
        assert self.records(caplog) == [(logging.WARNING, (
            f"event {event['eventId']} (message m1) is a stale delivery ({why}); "
            "dead-lettering it as StaleDelivery"))]
        assert watch.problem() is not None  # counted as stale

    def test_at_the_maximum_it_is_processed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _, result, dead, watch = self.deliver(600, monkeypatch)
        assert result.outcome is Outcome.UNHANDLED and dead.calls == []
        assert watch.problem() is None

    def test_a_replayed_dead_letter_is_not_judged_by_its_age(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, result, dead, _ = self.deliver(601, monkeypatch, **{PROP_REPLAY_COUNT: "1"})
        assert result.outcome is Outcome.UNHANDLED and dead.calls == []

    def test_ahead_of_the_clock_it_is_processed_and_the_clock_is_suspected(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            event, result, dead, watch = self.deliver(-301, monkeypatch)
        assert result.outcome is Outcome.UNHANDLED and dead.calls == []
        assert self.records(caplog) == [(logging.WARNING, (
            f"event {event['eventId']}: meta.deliveredAt is 301 s ahead of this host's clock "
            "at receipt; processing it, but this host's clock is probably behind (check NTP)"))]
        assert watch.ahead_count == 1

    @pytest.mark.parametrize("age", [-300, 0, 300])
    def test_within_the_skew_allowed_nothing_is_said(
        self, age: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="shared.processor"):
            _, result, _, watch = self.deliver(age, monkeypatch)
        assert result.outcome is Outcome.UNHANDLED
        assert self.records(caplog) == [] and watch.ahead_count == 0


def test_an_outcome_record_says_duplicate_only_for_a_duplicate() -> None:
    """As the lock-expiry and host dead-letter records make it, without saying."""
    record = outcome_record(message(b"{}"), "dead_lettered", reason="MaxDeliveryCountExceeded",
                            description="the lock of the last of 5 deliveries expired")
    assert "duplicate" not in record
    assert outcome_record(message(b"{}"), "handled", duplicate=True)["duplicate"] is True


def test_the_open_errors_attribute_names_an_error_without_a_code_by_its_type() -> None:
    opened = ErrorState(type="COMPATIBILITY", code=None, state="OPEN")
    resolved = ErrorState(type="PERMISSION", code="DENIED", state="RESOLVED")
    assert error_summary(ApplyResult(errors_opened=(opened,), errors_resolved=(resolved,))) == (
        "OPEN COMPATIBILITY:;RESOLVED PERMISSION:DENIED")


@given(st.lists(st.tuples(st.sampled_from(["OPEN", "RESOLVED"]), st.text(min_size=1),
                          st.none() | st.text()), min_size=1, max_size=4))
def test_the_open_errors_attribute_reads_back_whatever_a_type_or_code_holds(
        errors: list[tuple[str, str, str | None]]) -> None:
    # open_vehicle_errors.kql's reading of it: split on ';', then on the first ' ', then the
    # type before the first ':' and the code after it, each through url_decode.
    states = tuple(ErrorState(type=t, code=c, state=s) for s, t, c in errors)
    summary = error_summary(ApplyResult(errors_opened=states))
    read = []
    for report in summary.split(";"):
        state, error = report.split(" ")[0], report.split(" ")[1]
        read.append((state, unquote(error.split(":")[0]),
                     unquote(error[error.index(":") + 1:])))
    assert read == [(s, t, c or "") for s, t, c in errors]


class TestHandlerBudget:
    """In Azure the host answers a function timeout by restarting the worker process, with
    every delivery and request in it: the processor ends a hung attempt itself first."""

    @pytest.mark.parametrize("kind", ["async", "blocking"])
    def test_handlers_past_their_budget_are_cancelled_and_the_attempt_retried(
        self, kind: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        registry = HandlerRegistry()
        release = threading.Event()

        async def stuck_async(event: Any, ctx: Any) -> None:
            await asyncio.sleep(3600)

        def stuck_blocking(event: Any, ctx: Any) -> None:
            release.wait(30)  # a thread cannot be cancelled: it is left to end

        stuck: Any = stuck_async if kind == "async" else stuck_blocking
        registry.on("VEHICLE_STATE")(stuck)

        sender = RecordingRetrySender()
        with caplog.at_level(logging.WARNING, logger="shared.processor"):
            try:
                result = run(message(encode(state_event())), registry, retry_sender=sender,
                             handler_budget=0.2)
            finally:
                release.set()
        assert (result.outcome, result.error_type) == (Outcome.RETRIED, "HandlerTimeoutError")
        name = f"{__name__}.TestHandlerBudget.{stuck.__qualname__.split('.', 1)[1]}"
        assert result.description == f"the handlers ran past their 0.2 s budget in {name}"
        assert [c.attempt for c in sender.copies] == [2]
        event_id = result.event.event_id
        assert next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == (
            f"event {event_id}: the handlers ran past their budget (0.2 s, under the function "
            f"timeout) in {name}, which was cancelled; the attempt fails")

    def test_a_store_past_the_budget_is_named_as_such(self) -> None:
        class HungStore:
            async def is_processed(self, vehicle_id: Any, event_id: str) -> bool:
                return False

            async def apply(self, event: Any, *, outbox: Any = None) -> Any:
                await asyncio.sleep(3600)

        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda event, ctx: None)
        result = run(message(encode(state_event())), registry, store=HungStore(),
                     handler_budget=0.2)
        assert (result.outcome, result.description) == (
            Outcome.RETRIED, "the handlers ran past their 0.2 s budget in (none: the store)")

    def test_a_handler_s_own_timeout_is_a_failure_like_any_other(self) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def slow_crm(event: Any, ctx: Any) -> None:
            raise TimeoutError("crm did not answer")

        result = run(message(encode(state_event())), registry, handler_budget=60.0)
        assert (result.outcome, result.error_type, result.description) == (
            Outcome.RETRIED, "TimeoutError", "crm did not answer")

    def test_within_the_budget_nothing_changes(self) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda event, ctx: None)
        assert run(message(encode(state_event())), registry,
                   handler_budget=60.0).outcome is Outcome.HANDLED

    @pytest.mark.parametrize(("timeout", "budget"), [(300.0, 270.0), (600.0, 570.0),
                                                     (10.0, 9.0), (1.0, 0.9)])
    def test_the_budget_leaves_thirty_seconds_or_a_tenth(self, timeout: float,
                                                         budget: float) -> None:
        assert handler_budget_for(timeout) == pytest.approx(budget)
