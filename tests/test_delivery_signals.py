"""What each authenticated delivery tells us about Smartcar's view of the receiver.

Smartcar keeps an `eventId` across its retries and gives each attempt a new `deliveryId`, so a
repeated eventId with a new deliveryId is a retry: Smartcar did not get our 2xx in time. The
time from `meta.deliveredAt` to our answer, and the payload's shape, are recorded too. The
unit tests pin the pure parts; the HTTP tests post real signed deliveries to the local host
and read the metrics, spans and log lines with the OpenTelemetry SDK's in-memory readers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from shared import telemetry_names as names
from shared.delivery_signals import (
    DeliverySignals,
    RedeliveryMemory,
    _delivered_at_ms,
    set_default_signals,
)
from shared.publisher import RememberingPublisher, ServiceBusPublisher
from shared.receiver import receive
from shared.shapes import SIGNAL_GROUPS, ShapeTracker, fingerprint
from shared.telemetry import set_telemetry
from shared.tokens import StaticTokenProvider

from .fakes import FakeServiceBusClient
from .otel_capture import Captured
from .support import (
    TOKEN,
    WEBHOOK,
    RunningHost,
    encode,
    fixture_json,
    local_env,
    now_ms,
    signed_headers,
    state_event,
)

# ---------------------------------------------------------------------------------------------
# 1. Shapes: names and types, never values.
# ---------------------------------------------------------------------------------------------
STATE = fixture_json("vehicle_state.json")


def shape_of(event: dict[str, Any]) -> Any:
    shape = fingerprint(encode(event))
    assert shape is not None
    return shape


class TestShapes:
    def test_the_documented_payloads_are_known(self) -> None:
        for name in ("vehicle_state.json", "vehicle_state_top_level_triggers.json",
                     "vehicle_error.json"):
            shape = shape_of(fixture_json(name))
            assert shape.known, (name, shape.unknown_parts())

    def test_values_do_not_change_the_shape_but_names_and_types_do(self) -> None:
        other_values = copy.deepcopy(STATE)
        other_values["eventId"] = str(uuid.uuid4())
        other_values["data"]["signals"][0]["body"]["value"] = 12
        other_values["meta"]["deliveredAt"] = now_ms()
        assert shape_of(other_values).id == shape_of(STATE).id
        iso = copy.deepcopy(STATE)
        iso["meta"]["deliveredAt"] = "2024-11-18T14:32:08Z"
        assert shape_of(iso).id != shape_of(STATE).id
        assert shape_of(iso).known and shape_of(iso).delivered_at_type == "string"

    def test_the_id_of_a_shape_is_the_same_from_release_to_release(self) -> None:
        # payload_shapes.kql tells since when a shapeId is seen, across instances and deploys:
        # a change to how the id is computed would make every known shape look new.
        assert shape_of(STATE).id == "69756b4c9afa"
        empty = fingerprint(b"{}")  # no eventType, version or keys
        assert empty is not None and empty.id == "b1f1c15ab445"

    def test_the_event_type_changes_the_id(self) -> None:
        state = shape_of(STATE)
        other_type = copy.deepcopy(STATE)
        other_type["eventType"] = "VEHICLE_ERROR"
        assert shape_of(other_type).id != state.id

    def test_where_triggers_sit_is_part_of_the_shape(self) -> None:
        nested = shape_of(STATE)
        top = shape_of(fixture_json("vehicle_state_top_level_triggers.json"))
        assert (nested.triggers_at, top.triggers_at) == ("data.triggers", "triggers")
        assert nested.id != top.id

    @pytest.mark.parametrize(
        ("change", "part"),
        [
            (lambda e: e["meta"].update(version="5.0"), "meta.version '5.0'"),
            (lambda e: e.update(schemaVersion=2), "top-level keys ['schemaVersion']"),
            (lambda e: e["meta"].update(attempt=2), "meta keys ['attempt']"),
            (lambda e: e.update(signals=e["data"].pop("signals")), "signals at signals"),
            (lambda e: e["meta"].update(deliveredAt=None), "meta.deliveredAt is null"),
            (lambda e: e["meta"].pop("deliveredAt"), "meta.deliveredAt is absent"),
            (lambda e: e["data"]["signals"][0].update(code="batterypack-health"),
             "signal codes ['batterypack-health']"),
            (lambda e: e.update(eventType="VEHICLE_COMMAND"), "eventType 'VEHICLE_COMMAND'"),
            (lambda e: e.update(triggers=e["data"]["triggers"]), "triggers at both"),
            (lambda e: e["meta"].update(deliveredAt=True), "meta.deliveredAt is boolean"),
            (lambda e: e["meta"].update(deliveredAt=[1]), "meta.deliveredAt is array"),
            (lambda e: e["meta"].update(deliveredAt={}), "meta.deliveredAt is object"),
        ],
    )
    def test_each_part_the_project_does_not_read_makes_the_shape_unknown(
        self, change: Any, part: str
    ) -> None:
        event = copy.deepcopy(STATE)
        change(event)
        shape = shape_of(event)
        assert shape.unknown_parts() == [part]
        assert not shape.known

    @pytest.mark.parametrize(("version", "seen"), [
        ("x" * 16, "x" * 16),
        ("x" * 17, "<string>"),  # longer than a version: not written into the log line
        ("4.0\n", "<string>"),  # not printable
        (4, "<number>"),
        (None, "<null>"),
    ])
    def test_a_version_is_written_as_it_is_only_when_short_and_printable(
        self, version: Any, seen: str
    ) -> None:
        event = copy.deepcopy(STATE)
        event["meta"]["version"] = version
        assert shape_of(event).version == seen

    def test_signal_codes_at_the_top_level_are_classified_too(self) -> None:
        event = copy.deepcopy(STATE)
        del event["data"]["signals"]
        event["signals"] = [{"code": "batterypack-health", "body": {"value": 1}}]
        assert shape_of(event).new_signal_codes == ("batterypack-health",)

    @pytest.mark.parametrize(("code", "part"), [
        ({"name": "tractionbattery-stateofcharge"}, "<object>"),
        (["tractionbattery", "stateofcharge"], "<array>"),
        (7, "<number>"),
    ])
    def test_a_code_that_is_not_text_is_a_new_part(self, code: Any, part: str) -> None:
        # Smartcar changing the code's format is what the new-shape alert is for: the shape
        # names the code's type (an object or a list used to raise: unhashable).
        event = copy.deepcopy(STATE)
        event["data"]["signals"].append({"code": code, "body": {"value": 1}})
        shape = fingerprint(json.dumps(event).encode())
        assert shape is not None and shape.new_signal_codes == (part,)
        assert not shape.known

    def test_a_signal_without_a_code_adds_no_part(self) -> None:
        event = copy.deepcopy(STATE)
        event["data"]["signals"].append({"group": "Odometer", "name": "TraveledDistance"})
        assert shape_of(event).known

    def test_a_body_with_a_byte_order_mark_has_its_shape(self) -> None:
        # The parser and the receiver read past a UTF-8 BOM; the inspector's shape does too.
        body = json.dumps(STATE).encode()
        assert fingerprint(b"\xef\xbb\xbf" + body) == fingerprint(body)
        assert fingerprint(b"\xef\xbb\xbf" + body) is not None

    def test_a_lone_surrogate_in_the_event_type_still_gives_a_shape(self) -> None:
        shape = fingerprint(b'{"eventType": "\\ud800", "meta": {}}')
        assert shape is not None and shape.event_type == "\ud800" and len(shape.id) == 12

    def test_a_test_mode_delivery_without_version_is_known(self) -> None:
        event = copy.deepcopy(STATE)
        del event["meta"]["version"], event["meta"]["webhookId"]
        assert shape_of(event).known and shape_of(event).version is None

    def test_signal_codes_of_every_documented_group_are_known(self) -> None:
        event = copy.deepcopy(STATE)
        template = event["data"]["signals"][0]
        event["data"]["signals"] = [dict(template, code=f"{g}-anything") for g in SIGNAL_GROUPS]
        assert shape_of(event).new_signal_codes == ()

    def test_keys_are_escaped_and_bounded(self) -> None:
        event = copy.deepcopy(STATE)
        event["x\x1b[31m\n"] = 1
        for i in range(200):
            event["meta"][f"k{i:03}"] = i
        shape = shape_of(event)
        assert "x\\u001b[31m\\n" in shape.top_level_keys
        assert len(shape.meta_keys) == 64
        assert all("\x1b" not in k and "\n" not in k for k in shape.top_level_keys)

    def test_the_description_names_every_part_as_the_log_line_spells_it(self) -> None:
        event = copy.deepcopy(STATE)
        event["meta"] = {"version": "4.0", "deliveredAt": "2024-11-18T14:32:08Z"}
        event["data"]["signals"] = [{"code": "batterypack-health", "body": {"value": 1}}]
        assert shape_of(event).describe() == {
            "eventType": "VEHICLE_STATE",
            "metaVersion": "4.0",
            "topLevelKeys": sorted(event),
            "metaKeys": ["deliveredAt", "version"],
            "triggersAt": "data.triggers",
            "signalsAt": "data.signals",
            "deliveredAtType": "string",
            "newSignalCodes": ["batterypack-health"],
        }

    @pytest.mark.parametrize(("literal", "kind"), [
        (b"NaN", "number"),  # json reads it, orjson refuses it
        (b"1e999", "number"),  # overflows to infinity: json reads it, orjson refuses it
        (b'"\\ud800"', "string"),  # a lone surrogate escape
    ])
    def test_a_body_only_the_standard_library_reads_still_has_a_shape(
        self, literal: bytes, kind: str
    ) -> None:
        body = b'{"eventType": "VEHICLE_STATE", "meta": {"deliveredAt": ' + literal + b"}}"
        shape = fingerprint(body)
        assert shape is not None and shape.delivered_at_type == kind

    @pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'"text"', b"\xff\xfe", b""])
    def test_not_an_object_has_no_shape(self, body: bytes) -> None:
        assert fingerprint(body) is None

    def test_the_tracker_reports_a_shape_once_and_forgets_the_oldest(self) -> None:
        tracker = ShapeTracker(limit=2)
        a, b, c = (shape_of(dict(copy.deepcopy(STATE), **{k: 1})) for k in "abc")
        assert tracker.first_sighting(a) and not tracker.first_sighting(a)
        assert tracker.first_sighting(b)
        assert not tracker.first_sighting(a)  # seen again: now the most recent
        assert tracker.first_sighting(c)  # b is forgotten, not a
        assert not tracker.first_sighting(a)
        assert tracker.first_sighting(b)


# ---------------------------------------------------------------------------------------------
# 2. The redelivery memory.
# ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestRedeliveryMemory:
    def test_a_new_delivery_id_for_a_known_event_is_a_redelivery(self) -> None:
        memory = RedeliveryMemory()
        assert not memory.is_redelivery("evt", "d1")
        assert memory.is_redelivery("evt", "d2")
        assert memory.is_redelivery("evt", "d3")
        assert not memory.is_redelivery("other", "d1")

    def test_the_same_delivery_again_is_not_smartcar_retrying(self) -> None:
        memory = RedeliveryMemory()
        assert not memory.is_redelivery("evt", "d1")
        assert not memory.is_redelivery("evt", "d1")

    def test_without_delivery_ids_nothing_is_counted(self) -> None:
        memory = RedeliveryMemory()
        assert not memory.is_redelivery("evt", None)
        assert not memory.is_redelivery("evt", "d1")
        assert not memory.is_redelivery("evt", None)

    def test_an_event_is_forgotten_after_the_window(self) -> None:
        clock = Clock()
        memory = RedeliveryMemory(window=60, clock=clock)
        memory.is_redelivery("evt", "d1")
        clock.now += 59
        assert memory.is_redelivery("evt", "d2")
        clock.now += 60  # 60 s after d2, the last sighting
        assert not memory.is_redelivery("evt", "d3")

    def test_what_is_out_of_the_window_is_let_go_not_kept_until_the_limit(self) -> None:
        # The memory costs what the window holds: an eventId past it is dropped at the next
        # sighting of any event, not only once REDELIVERY_MEMORY newer ones pushed it out.
        clock = Clock()
        memory = RedeliveryMemory(window=60, limit=10, clock=clock)
        memory.is_redelivery("a", "1")
        clock.now += 30
        memory.is_redelivery("b", "1")
        assert memory.remembered == 2
        clock.now += 31  # "a" is 61 s old, "b" 31 s
        memory.is_redelivery("c", "1")
        assert memory.remembered == 2
        clock.now += 60
        memory.is_redelivery("d", "1")
        assert memory.remembered == 1

    def test_the_memory_is_bounded_oldest_out_first(self) -> None:
        memory = RedeliveryMemory(limit=2)
        memory.is_redelivery("a", "1")
        memory.is_redelivery("b", "1")
        memory.is_redelivery("c", "1")
        assert not memory.is_redelivery("a", "2")  # forgotten
        assert memory.is_redelivery("c", "2")


# ---------------------------------------------------------------------------------------------
# 3. Over HTTP, on the local host: metrics, span attributes, one log line per new shape.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_signals() -> Iterator[DeliverySignals]:
    signals = DeliverySignals()
    set_default_signals(signals)
    yield signals
    set_default_signals(None)


@pytest.fixture
def host(otel: Captured, fresh_signals: DeliverySignals,
         tmp_path: Path) -> Iterator[RunningHost]:
    set_telemetry(otel.telemetry)
    try:
        with RunningHost(local_env(tmp_path)) as running:
            yield running
    finally:
        set_telemetry(None)


def post(host: RunningHost, event: dict[str, Any]) -> dict[str, Any]:
    body = encode(event)
    response = host.post(WEBHOOK, body, signed_headers(body))
    assert response.status == 200, response.body
    answer: dict[str, Any] = response.json()
    return answer


def retry_of(event: dict[str, Any]) -> dict[str, Any]:
    again = copy.deepcopy(event)
    again["meta"]["deliveryId"] = str(uuid.uuid4())
    again["meta"]["deliveredAt"] = now_ms()
    return again


def total(otel: Captured, metric: str) -> float:
    return otel.total(metric)


class TestOverHttp:
    def test_a_retry_with_a_new_delivery_id_is_counted_once_per_attempt(
        self, host: RunningHost, otel: Captured
    ) -> None:
        event = state_event()
        assert post(host, event)["status"] == "accepted"
        assert total(otel, names.WEBHOOK_REDELIVERED) == 0
        retry = retry_of(event)
        assert post(host, retry)["status"] == "duplicate"
        assert post(host, retry)["status"] == "duplicate"  # the same attempt again: not a retry
        assert post(host, retry_of(event))["status"] == "duplicate"
        assert total(otel, names.WEBHOOK_REDELIVERED) == 2
        (attrs, _), = otel.points()[names.WEBHOOK_REDELIVERED]
        assert attrs == {names.ATTR_EVENT_TYPE: "VEHICLE_STATE"}
        flagged = [s for s in otel.finished(names.SPAN_RECEIVE)
                   if (s.attributes or {}).get(names.ATTR_REDELIVERY)]
        assert len(flagged) == 2

    def test_delivered_at_to_answer_is_measured_from_smartcars_stamp(
        self, host: RunningHost, otel: Captured
    ) -> None:
        event = state_event()
        event["meta"]["deliveredAt"] = now_ms() - 3000
        post(host, event)
        iso = state_event()
        iso["meta"]["deliveredAt"] = (datetime.now(UTC) - timedelta(seconds=20)).isoformat()
        post(host, iso)
        ahead = state_event()
        ahead["meta"]["deliveredAt"] = now_ms() + 60_000  # Smartcar's clock ahead of ours
        post(host, ahead)
        # The span's attribute is a number of milliseconds.
        spans = {(s.attributes or {}).get(names.ATTR_EVENT_ID):
                 cast(float, (s.attributes or {}).get(names.ATTR_DELIVERY_TO_ANSWER_MS))
                 for s in otel.finished(names.SPAN_RECEIVE)}
        assert 3000 <= spans[event["eventId"]] < 13000
        assert 20_000 <= spans[iso["eventId"]] < 30_000
        assert spans[ahead["eventId"]] == 0
        (_, point), = otel.points()[names.WEBHOOK_DELIVERY_TO_ANSWER]
        assert point.count == 3 and point.min == 0
        assert point.max == pytest.approx(spans[iso["eventId"]], abs=0.1)
        assert point.sum - point.max == pytest.approx(spans[event["eventId"]], abs=0.1)

    def test_a_shape_is_reported_once_and_an_unknown_one_as_a_warning(
        self, host: RunningHost, otel: Captured,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.INFO, logger="shared.delivery_signals")
        post(host, state_event())
        post(host, state_event())
        drifted = state_event()
        drifted["meta"]["version"] = "5.0"
        post(host, drifted)
        post(host, state_event())
        points = otel.points()[names.PAYLOAD_SHAPE_FIRST_SEEN]
        assert sorted((a[names.ATTR_SHAPE_KNOWN], a[names.ATTR_META_VERSION], p.value)
                      for a, p in points) == [("false", "5.0", 1), ("true", "4.0", 1)]
        lines = [r for r in caplog.records if "first seen" in r.getMessage()]
        assert [r.levelno for r in lines] == [logging.INFO, logging.WARNING]
        known_id = fingerprint(encode(state_event())).id  # type: ignore[union-attr]
        assert lines[0].getMessage().startswith(f"payload shape {known_id} first seen by this "
                                                "instance (known): {")
        assert "unknown to the project: meta.version '5.0'" in lines[1].getMessage()
        for record in lines:  # names and types only: no value of the body
            assert drifted["vehicleId"] not in record.getMessage()
            assert drifted["eventId"] not in record.getMessage()
        marks = [(s.attributes or {}).get(names.ATTR_SHAPE_KNOWN)
                 for s in otel.finished(names.SPAN_RECEIVE)]
        assert marks == [True, True, False, True]

    def test_application_insights_spells_the_span_s_booleans_and_the_metric_s_as_documented(
        self, host: RunningHost, otel: Captured,
    ) -> None:
        # docs/operations.md: a span's true-or-false attributes arrive in customDimensions as
        # True/False, the metric's shapeKnown as true/false. What Azure Monitor's exporter makes
        # of them decides what a query must compare with.
        from azure.monitor.opentelemetry.exporter.export.metrics._exporter import (
            _convert_point_to_envelope,
        )
        from azure.monitor.opentelemetry.exporter.export.trace._exporter import (
            _convert_span_to_envelope,
        )

        post(host, state_event())
        (span,) = otel.finished(names.SPAN_RECEIVE)
        span_data: Any = _convert_span_to_envelope(span).data
        dimensions = span_data.base_data.properties
        assert (dimensions[names.ATTR_AUTHENTICATED], dimensions[names.ATTR_SHAPE_KNOWN]) == (
            "True", "True")
        ((_, point),) = otel.points()[names.PAYLOAD_SHAPE_FIRST_SEEN]
        point_data: Any = _convert_point_to_envelope(point, names.PAYLOAD_SHAPE_FIRST_SEEN).data
        assert point_data.base_data.properties[names.ATTR_SHAPE_KNOWN] == "true"

    def test_verify_and_rejected_posts_are_not_observed(
        self, host: RunningHost, otel: Captured
    ) -> None:
        verify = encode({"eventType": "VERIFY", "eventId": "v", "data": {"challenge": "abc"},
                         "meta": {"deliveryId": "d", "deliveredAt": now_ms()}})
        assert host.post(WEBHOOK, verify, {}).status == 200
        # Signed, a VERIFY is authenticated, and still not a data delivery: the same challenge
        # signed twice with two deliveryIds counts no redelivery, no latency, no shape.
        for delivery_id in ("d1", "d2"):
            signed = encode({"eventType": "VERIFY", "eventId": "sv", "data": {"challenge": "abc"},
                             "meta": {"deliveryId": delivery_id, "deliveredAt": now_ms()}})
            answer = host.post(WEBHOOK, signed, signed_headers(signed))
            assert answer.status == 200 and "challenge" in answer.json()
        forged = encode(state_event())
        assert host.post(WEBHOOK, forged, {"SC-Signature": "0" * 64}).status == 401
        points = otel.points()
        for metric in (names.PAYLOAD_SHAPE_FIRST_SEEN, names.WEBHOOK_DELIVERY_TO_ANSWER,
                       names.WEBHOOK_REDELIVERED):
            assert metric not in points


class TestBookkeepingNeverFailsADelivery:
    def test_a_recorder_that_raises_is_logged_and_swallowed(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        class Broken:
            def record_redelivery(self, event_type: str | None) -> None:
                raise RuntimeError("exporter down")

            record_delivery_to_answer = record_new_shape = record_redelivery

        class Authenticated:
            authenticated = True
            event_type = "VEHICLE_STATE"

        caplog.set_level(logging.WARNING, logger="shared.delivery_signals")
        DeliverySignals().observe(state_event(), Authenticated(), answered_at=0.0,
                                  recorder=Broken())  # type: ignore[arg-type]
        assert [r.getMessage() for r in caplog.records] == [
            "recording the delivery signals failed"]


class TestOnServiceBus:
    """With Service Bus (faked at its sender), a retry reaching another instance is sent,
    dropped by the queue's duplicate detection and answered `accepted`: that instance has not
    seen the eventId, so it does not count it. The count is a lower bound, as documented."""

    @staticmethod
    def instance(client: FakeServiceBusClient) -> tuple[RememberingPublisher, DeliverySignals]:
        inner = ServiceBusPublisher(lambda: client, "smartcar-events", send_timeout=1.0)
        return RememberingPublisher(inner, window=3600), DeliverySignals()

    @staticmethod
    def post(instance: tuple[RememberingPublisher, DeliverySignals], event: dict[str, Any],
             otel: Captured) -> str:
        publisher, signals = instance
        body = encode(event)
        reply = asyncio.run(receive(body, signed_headers(body), tokens=StaticTokenProvider(TOKEN),
                                    publisher=publisher, max_body_bytes=196608,
                                    telemetry=otel.telemetry, signals=signals))
        return str(reply.body["status"])

    def test_a_retry_is_counted_by_the_instance_that_saw_the_first_attempt_only(
        self, otel: Captured
    ) -> None:
        client = FakeServiceBusClient()
        a, b = self.instance(client), self.instance(client)
        event = state_event()
        assert self.post(a, event, otel) == "accepted"
        assert self.post(a, retry_of(event), otel) == "duplicate"
        assert total(otel, names.WEBHOOK_REDELIVERED) == 1
        assert self.post(b, retry_of(event), otel) == "accepted"  # Service Bus drops it
        assert total(otel, names.WEBHOOK_REDELIVERED) == 1
        assert [m.message_id for s in client.senders for m in s.sent] == [event["eventId"]] * 2


class TestDeliveredAt:
    @pytest.mark.parametrize(
        ("value", "ms"),
        [(1704067200000, 1704067200000.0), (1704067200000.5, 1704067200000.5),
         ("2024-01-01T00:00:00Z", 1704067200000.0),
         ("2024-01-01T01:00:00+01:00", 1704067200000.0),
         ("2024-01-01T00:00:00", 1704067200000.0),  # no offset: UTC, as Smartcar means it
         ("yesterday", None), (True, None), (None, None), ({"ms": 1}, None)],
    )
    def test_epoch_milliseconds_or_iso_8601_in_utc_whatever_the_local_zone(
        self, value: Any, ms: float | None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TZ", "America/New_York")
        time.tzset()
        try:
            assert _delivered_at_ms({"deliveredAt": value}) == ms
        finally:
            monkeypatch.undo()
            time.tzset()

    def test_no_meta_object_means_no_time(self) -> None:
        assert _delivered_at_ms(None) is None and _delivered_at_ms([1]) is None
