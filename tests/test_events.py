"""Specification of shared.events: which Smartcar payloads parse into what, and which are rejected
with which message."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.events import (
    Envelope,
    Event,
    InvalidEventError,
    Meta,
    Signal,
    SignalRef,
    Trigger,
    VehicleError,
    parse_event,
    peek_envelope,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))
    return loaded


def encode(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8")


def state_event(**top_level: Any) -> dict[str, Any]:
    """The VEHICLE_STATE fixture with top-level keys replaced (a value of ... removes the key)."""
    document = fixture("vehicle_state")
    for key, value in top_level.items():
        if value is ...:
            document.pop(key, None)
        else:
            document[key] = value
    return document


def minimal(event_type: str = "VEHICLE_STATE", **data: Any) -> dict[str, Any]:
    return {"eventId": "evt-1", "eventType": event_type, "data": data}


def parse(document: Any) -> Event:
    return parse_event(encode(document))


def utc(iso: str) -> datetime:
    """An ISO timestamp without offset, as aware UTC."""
    return datetime.fromisoformat(iso).replace(tzinfo=UTC)


def signal_with(**fields: Any) -> dict[str, Any]:
    return {
        "code": "tractionbattery-stateofcharge",
        "name": "StateOfCharge",
        "group": "TractionBattery",
        **fields,
    }


class TestFixtures:
    def test_verify_carries_its_challenge_and_no_vehicle(self) -> None:
        event = parse_event((FIXTURES / "verify.json").read_bytes())

        assert event.event_id == "52f6e0bb-1369-45da-a61c-9e67d092d6db"
        assert event.event_type == "VERIFY"
        assert event.challenge == "3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f"
        assert event.vehicle_id is None
        assert event.meta == Meta(
            version="4.0",
            webhook_id="5a8e5e38-1e12-4011-a36d-56f120053f9e",
            webhook_name="Example Webhook",
            delivery_id="5d569643-3a47-4cd1-a3ec-db5fc1f6f03b",
            delivered_at=datetime(2025, 10, 31, 7, 39, 11, 529000, tzinfo=UTC),
        )
        assert (event.triggers, event.signals, event.errors) == ((), (), ())

    def test_vehicle_state_reads_triggers_signals_and_meta(self) -> None:
        event = parse_event((FIXTURES / "vehicle_state.json").read_bytes())

        assert event.event_id == "550e8400-e29b-41d4-a716-446655440000"
        assert event.event_type == "VEHICLE_STATE"
        assert event.vehicle_id == "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"
        assert event.challenge is None
        assert event.meta == Meta(
            version="4.0",
            webhook_id="abde94ff-d57d-43b9-8d09-6020db2d977a",
            webhook_name="Battery Monitoring",
            delivery_id="48b25f8f-9fea-42e1-9085-81043682cbb8",
            delivered_at=utc("2024-11-18T14:32:08"),
            mode="LIVE",
            signal_count=3,
        )
        assert event.triggers == (
            Trigger(
                code="tractionbattery-stateofcharge", name="StateOfCharge", group="TractionBattery"
            ),
        )
        soc, charging, at_home = event.signals
        assert soc == Signal(
            code="tractionbattery-stateofcharge",
            name="StateOfCharge",
            group="TractionBattery",
            value=78,
            unit="percent",
            body={"unit": "percent", "value": 78},
            oem_updated_at=utc("2024-11-18T14:32:08"),
            retrieved_at=utc("2024-11-18T14:32:10"),
        )
        assert (charging.path, charging.value, charging.unit, charging.ok) == (
            "Charge.IsCharging",
            True,
            None,
            True,
        )
        assert at_home == Signal(
            code="location-isathome",
            name="IsAtHome",
            group="Location",
            ok=False,
            status="ERROR",
            error_code="VEHICLE_NOT_CAPABLE",
            error_type="COMPATIBILITY",
        )

    def test_vehicle_state_with_top_level_triggers(self) -> None:
        event = parse_event((FIXTURES / "vehicle_state_top_level_triggers.json").read_bytes())

        assert event.triggers == (
            Trigger(
                type="SIGNAL_UPDATED",
                code="tractionbattery-stateofcharge",
                name="StateOfCharge",
                group="TractionBattery",
            ),
        )
        assert event.vehicle_id == "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"  # from data.vehicle
        (soc,) = event.signals
        assert (soc.value, soc.status, soc.ok) == (75, "SUCCESS", True)
        assert soc.retrieved_at == utc("2024-11-18T14:32:10")
        assert event.meta.signal_count == 1

    def test_vehicle_error_reads_every_documented_field(self) -> None:
        event = parse_event((FIXTURES / "vehicle_error.json").read_bytes())

        assert event.event_type == "VEHICLE_ERROR"
        assert event.vehicle_id == "123e4567-e89b-12d3-a456-426614174000"
        assert event.errors == (
            VehicleError(
                type="COMPATIBILITY",
                code="VEHICLE_NOT_CAPABLE",
                state="ERROR",
                description="The vehicle is incapable of performing your request.",
                suggested_user_message="Your car is unable to perform this request.",
                doc_url="https://smartcar.com/docs/errors/api-errors/compatibility-errors"
                "#vehicle-not-capable",
                resolution_type="CONTACT_SUPPORT",
                signals=(
                    SignalRef(
                        code="location-preciselocation", name="PreciseLocation", group="Location"
                    ),
                    SignalRef(
                        code="tractionbattery-stateofcharge",
                        name="StateOfCharge",
                        group="TractionBattery",
                    ),
                ),
            ),
        )
        assert event.meta.signal_count is None
        assert event.signals == ()


class TestTriggerShapes:
    def test_data_triggers_list_code_name_group(self) -> None:
        event = parse(minimal(triggers=[{"code": "c", "name": "N", "group": "G"}]))

        assert event.triggers == (Trigger(code="c", name="N", group="G"),)
        assert event.triggers[0].path == "G.N"

    def test_top_level_triggers_wrap_the_signal_with_a_type(self) -> None:
        document = minimal()
        document["triggers"] = [
            {"type": "SIGNAL_UPDATED", "signal": {"name": "N", "group": "G", "code": "c"}}
        ]

        assert parse(document).triggers == (
            Trigger(type="SIGNAL_UPDATED", code="c", name="N", group="G"),
        )

    def test_signal_as_plain_string_splits_on_the_first_dot(self) -> None:
        document = minimal()
        document["triggers"] = [
            {"type": "SIGNAL_UPDATED", "signal": "InternalCombustionEngine.FuelLevel"},
            {"type": "SIGNAL_UPDATED", "signal": "Group.Name.WithDot"},
        ]

        first, second = parse(document).triggers
        assert first == Trigger(
            type="SIGNAL_UPDATED", group="InternalCombustionEngine", name="FuelLevel"
        )
        assert first.path == "InternalCombustionEngine.FuelLevel"
        assert (second.group, second.name) == ("Group", "Name.WithDot")

    def test_trigger_that_is_itself_a_string(self) -> None:
        event = parse(minimal(triggers=["Charge.IsCharging", "charge-ischarging"]))

        assert event.triggers == (
            Trigger(group="Charge", name="IsCharging"),
            Trigger(code="charge-ischarging"),
        )

    def test_first_delivery_has_a_code_and_no_signal(self) -> None:
        (trigger,) = parse(minimal(triggers=[{"code": "FIRST_DELIVERY"}])).triggers

        assert trigger == Trigger(code="FIRST_DELIVERY")
        assert trigger.path is None

    def test_triggers_in_both_places_are_combined_once_each(self) -> None:
        same = {"code": "c", "name": "N", "group": "G"}
        document = minimal(triggers=[{"code": "FIRST_DELIVERY"}, same])
        document["triggers"] = [{"type": "SIGNAL_UPDATED", "signal": "A.B"}, same]

        assert parse(document).triggers == (
            Trigger(code="FIRST_DELIVERY"),
            Trigger(code="c", name="N", group="G"),
            Trigger(type="SIGNAL_UPDATED", group="A", name="B"),
        )


class TestSignals:
    def test_fetched_at_and_retrieved_at_both_give_retrieved_at(self) -> None:
        fetched = signal_with(meta={"fetchedAt": 1731940330000})
        retrieved = signal_with(meta={"retrievedAt": 1731940330000})

        first, second = parse(minimal(signals=[fetched, retrieved])).signals

        assert first.retrieved_at == second.retrieved_at == utc("2024-11-18T14:32:10")

    def test_retrieved_at_wins_when_both_are_present(self) -> None:
        both = signal_with(meta={"fetchedAt": 0, "retrievedAt": 1731940330000})

        (signal,) = parse(minimal(signals=[both])).signals

        assert signal.retrieved_at == utc("2024-11-18T14:32:10")

    def test_success_status_with_body_is_ok(self) -> None:
        success = signal_with(body={"value": 75, "unit": "percent"}, status={"value": "SUCCESS"})

        (signal,) = parse(minimal(signals=[success])).signals

        assert (signal.ok, signal.status, signal.value, signal.unit) == (
            True,
            "SUCCESS",
            75,
            "percent",
        )

    def test_error_status_without_body_is_not_ok_and_carries_the_error(self) -> None:
        failed = signal_with(
            status={
                "value": "ERROR",
                "error": {"code": "VEHICLE_NOT_CAPABLE", "type": "COMPATIBILITY"},
            }
        )

        (signal,) = parse(minimal(signals=[failed])).signals

        assert (signal.ok, signal.body, signal.value) == (False, None, None)
        assert (signal.error_code, signal.error_type) == ("VEHICLE_NOT_CAPABLE", "COMPATIBILITY")

    def test_body_without_value_is_kept_whole(self) -> None:
        location = {
            "code": "location-preciselocation",
            "name": "PreciseLocation",
            "group": "Location",
            "body": {"latitude": 52.52, "longitude": 13.4},
        }

        (signal,) = parse(minimal(signals=[location])).signals

        assert signal.value is None
        assert signal.body == {"latitude": 52.52, "longitude": 13.4}

    def test_signal_looked_up_by_path_or_code(self) -> None:
        event = parse_event((FIXTURES / "vehicle_state.json").read_bytes())

        by_path = event.signal("TractionBattery.StateOfCharge")
        assert by_path is not None and by_path.value == 78
        assert event.signal("tractionbattery-stateofcharge") is by_path
        assert event.signal("TRACTIONBATTERY-STATEOFCHARGE") is by_path
        assert event.signal("Location.PreciseLocation") is None

    def test_signal_lookup_prefers_the_latest_of_a_repeated_signal(self) -> None:
        older = signal_with(body={"value": 70}, meta={"oemUpdatedAt": 1000})
        newer = signal_with(body={"value": 75}, meta={"oemUpdatedAt": 2000})

        event = parse(minimal(signals=[older, newer]))

        found = event.signal("TractionBattery.StateOfCharge")
        assert found is not None and found.value == 75

    def test_signals_by_recency_newest_first_undated_last_in_payload_order(self) -> None:
        signals = [
            {"code": "undated-1"},
            {"code": "old", "meta": {"oemUpdatedAt": 1000}},
            {"code": "new", "meta": {"oemUpdatedAt": "1970-01-01T00:00:03Z"}},
            {"code": "undated-2"},
            {"code": "mid", "meta": {"oemUpdatedAt": 2000}},
        ]

        event = parse(minimal(signals=signals))

        assert [s.code for s in event.signals_by_recency()] == [
            "new", "mid", "old", "undated-1", "undated-2",
        ]  # fmt: skip
        assert event.signals[0].code == "undated-1"  # the payload order itself is kept

    def test_text_fields_of_the_wrong_type_read_as_none(self) -> None:
        odd = {"code": 5, "name": ["N"], "group": {"g": 1}, "body": {"value": 1, "unit": 3},
               "status": {"value": 0, "error": {"code": False, "type": 2.5}}}

        (signal,) = parse(minimal(signals=[odd])).signals

        assert (signal.code, signal.name, signal.group, signal.unit) == (None, None, None, None)
        assert (signal.status, signal.error_code, signal.error_type) == (None, None, None)
        assert (signal.value, signal.ok) == (1, True)

    def test_json_null_is_read_as_absent(self) -> None:
        bare = {"code": "c", "body": None, "status": None, "meta": None, "unit": None}

        (signal,) = parse(minimal(signals=[bare], triggers=None, errors=None)).signals

        assert signal == Signal(code="c")


class TestMeta:
    @pytest.mark.parametrize(
        ("delivered_at", "expected"),
        [
            (1731940328000, datetime(2024, 11, 18, 14, 32, 8, tzinfo=UTC)),
            (1731940328000.5, datetime(2024, 11, 18, 14, 32, 8, 500, tzinfo=UTC)),
            ("2024-11-18T14:32:08Z", datetime(2024, 11, 18, 14, 32, 8, tzinfo=UTC)),
            ("2024-11-18T14:32:08.123Z", datetime(2024, 11, 18, 14, 32, 8, 123000, tzinfo=UTC)),
            ("2024-11-18T15:32:08+01:00", datetime(2024, 11, 18, 14, 32, 8, tzinfo=UTC)),
            ("2024-11-18T14:32:08", datetime(2024, 11, 18, 14, 32, 8, tzinfo=UTC)),
        ],
        ids=["epoch-ms", "epoch-ms-float", "iso-z", "iso-z-millis", "iso-offset", "iso-naive"],
    )
    def test_delivered_at_is_aware_utc_from_epoch_ms_or_iso(
        self, delivered_at: Any, expected: datetime
    ) -> None:
        event = parse(state_event(meta={"deliveredAt": delivered_at}))

        assert event.meta.delivered_at == expected
        assert event.meta.delivered_at.utcoffset() == expected.utcoffset()

    def test_test_mode_meta_may_lack_version_and_webhook_id(self) -> None:
        meta = {"deliveryId": "d-1", "deliveredAt": 1731940328000, "mode": "TEST"}

        event = parse(state_event(meta=meta))

        assert event.meta == Meta(
            delivery_id="d-1", delivered_at=utc("2024-11-18T14:32:08"), mode="TEST"
        )

    def test_absent_meta_reads_as_all_none(self) -> None:
        assert parse(state_event(meta=...)).meta == Meta()
        assert parse(state_event(meta=None)).meta == Meta()

    def test_text_fields_of_the_wrong_type_read_as_none(self) -> None:
        meta = {
            "version": 4,
            "webhookId": ["w"],
            "mode": None,
            "signalCount": "3",
            "webhookName": {"x": 1},
            "deliveryId": True,
        }

        assert parse(state_event(meta=meta)).meta == Meta()

    def test_signal_count_true_is_not_a_count(self) -> None:
        assert parse(state_event(meta={"signalCount": True})).meta.signal_count is None


class TestVehicleErrors:
    def test_code_null_state_resolved_and_signals_as_strings(self) -> None:
        error = {
            "type": "SERVER",
            "code": None,
            "state": "RESOLVED",
            "signals": ["TractionBattery.StateOfCharge", "location-preciselocation"],
        }

        (parsed,) = parse(minimal("VEHICLE_ERROR", errors=[error])).errors

        assert parsed == VehicleError(
            type="SERVER",
            state="RESOLVED",
            signals=(
                SignalRef(group="TractionBattery", name="StateOfCharge"),
                SignalRef(code="location-preciselocation"),
            ),
        )
        assert parsed.signals[0].path == "TractionBattery.StateOfCharge"
        assert parsed.signals[1].path is None

    def test_resolution_and_signals_are_optional(self) -> None:
        (parsed,) = parse(minimal("VEHICLE_ERROR", errors=[{"type": "X"}])).errors

        assert (parsed.resolution_type, parsed.signals) == (None, ())


class TestEnvelopeFields:
    def test_top_level_vehicle_id_wins_over_data_vehicle_id(self) -> None:
        document = state_event(vehicleId="top")

        assert parse(document).vehicle_id == "top"

    def test_vehicle_id_falls_back_to_data_vehicle_id(self) -> None:
        assert parse(state_event(vehicleId=...)).vehicle_id == (
            "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"
        )

    def test_unknown_event_type_and_unknown_keys_are_valid(self) -> None:
        document = {
            "eventId": "e",
            "eventType": "FUTURE_THING",
            "brandNew": {"x": [1]},
            "data": {"somethingElse": 1},
        }

        event = parse(document)

        assert (event.event_type, event.data) == ("FUTURE_THING", {"somethingElse": 1})
        assert (event.meta, event.signals, event.vehicle_id) == (Meta(), (), None)

    def test_challenge_outside_verify_is_read_but_not_required(self) -> None:
        assert parse(minimal(challenge="abc")).challenge == "abc"
        assert parse(minimal(challenge=5)).challenge is None

    def test_data_may_be_absent(self) -> None:
        event = parse({"eventId": "e", "eventType": "VEHICLE_STATE"})

        assert (event.data, event.signals) == ({}, ())


class TestInput:
    def test_bytes_and_str_give_the_same_event(self) -> None:
        raw = (FIXTURES / "vehicle_state.json").read_bytes()

        assert parse_event(raw) == parse_event(raw.decode("utf-8"))

    def test_bytearray_and_memoryview_are_bytes_too(self) -> None:
        raw = (FIXTURES / "verify.json").read_bytes()

        assert parse_event(bytearray(raw)) == parse_event(memoryview(raw)) == parse_event(raw)  # type: ignore[arg-type]

    def test_utf8_bom_is_tolerated(self) -> None:
        raw = (FIXTURES / "verify.json").read_bytes()

        assert parse_event(b"\xef\xbb\xbf" + raw) == parse_event(raw)
        assert parse_event("\ufeff" + raw.decode()) == parse_event(raw)

    def test_non_ascii_text_survives(self) -> None:
        document = state_event(meta={"webhookName": "Café ⚡"})

        assert parse_event(json.dumps(document, ensure_ascii=False).encode()).meta.webhook_name == (
            "Café ⚡"
        )

    def test_a_body_that_is_neither_bytes_nor_str_is_a_programming_error(self) -> None:
        with pytest.raises(TypeError, match=r"^body must be bytes or str, got dict$"):
            parse_event({"eventId": "e"})  # type: ignore[arg-type]


INVALID_DOCUMENTS: list[tuple[str, Any, str]] = [
    ("signals a number", minimal(signals=5), "data.signals must be a list, got int"),
    ("vehicle error null", minimal("VEHICLE_ERROR", errors=[None]),
     "data.errors[0] must be an object, got null"),
    ("eventId number of 24 characters", {"eventId": 10**23, "eventType": "X"},
     f"eventId must be a non-empty string, got {10**23}"),
    ("eventId number longer than 24 characters", {"eventId": 10**24, "eventType": "X"},
     "eventId must be a non-empty string, got int"),
    ("top-level array", [], "body must be a JSON object, got list"),
    ("top-level number", 52.52, "body must be a JSON object, got float"),
    ("top-level string", "x", "body must be a JSON object, got str"),
    ("top-level null", None, "body must be a JSON object, got null"),
    ("eventId missing", {"eventType": "VERIFY"}, "eventId is missing"),
    ("eventId null", {"eventId": None, "eventType": "X"},
     "eventId must be a non-empty string, got null"),
    ("eventId number", {"eventId": 7, "eventType": "X"},
     "eventId must be a non-empty string, got 7"),
    ("eventId empty", {"eventId": "", "eventType": "X"},
     "eventId must be a non-empty string, got an empty string"),
    ("eventId blank", {"eventId": "  ", "eventType": "X"},
     "eventId must be a non-empty string, got a blank string"),
    ("eventType missing", {"eventId": "e"}, "eventType is missing"),
    ("eventType number", {"eventId": "e", "eventType": 42},
     "eventType must be a non-empty string, got 42"),
    ("eventType bool", {"eventId": "e", "eventType": False},
     "eventType must be a non-empty string, got false"),
    ("eventType list", {"eventId": "e", "eventType": ["VERIFY"]},
     "eventType must be a non-empty string, got list"),
    ("eventType empty", {"eventId": "e", "eventType": ""},
     "eventType must be a non-empty string, got an empty string"),
    ("data not object", {"eventId": "e", "eventType": "X", "data": []},
     "data must be an object, got list"),
    ("data string", {"eventId": "e", "eventType": "X", "data": "{}"},
     "data must be an object, got str"),
    ("verify without data", {"eventId": "e", "eventType": "VERIFY"},
     "data.challenge is missing"),
    ("verify without challenge", minimal("VERIFY"), "data.challenge is missing"),
    ("verify challenge null", minimal("VERIFY", challenge=None),
     "data.challenge must be a string, got null"),
    ("verify challenge number", minimal("VERIFY", challenge=12),
     "data.challenge must be a string, got 12"),
    ("verify challenge object", minimal("VERIFY", challenge={"a": 1}),
     "data.challenge must be a string, got dict"),
    ("meta not object", {**minimal(), "meta": "LIVE"}, "meta must be an object, got str"),
    ("deliveredAt unparsable", {**minimal(), "meta": {"deliveredAt": "yesterday"}},
     "meta.deliveredAt is not an ISO-8601 timestamp"),
    ("deliveredAt bool", {**minimal(), "meta": {"deliveredAt": True}},
     "meta.deliveredAt must be epoch milliseconds or an ISO-8601 string, got true"),
    ("deliveredAt object", {**minimal(), "meta": {"deliveredAt": {}}},
     "meta.deliveredAt must be epoch milliseconds or an ISO-8601 string, got dict"),
    ("deliveredAt out of range", {**minimal(), "meta": {"deliveredAt": 10**20}},
     "meta.deliveredAt is out of range for a timestamp in epoch milliseconds"),
    ("deliveredAt before year 1 in UTC",
     {**minimal(), "meta": {"deliveredAt": "0001-01-01T00:00:00+01:00"}},
     "meta.deliveredAt is out of range for a UTC timestamp"),
    ("vehicle not object", minimal(vehicle="v-1"), "data.vehicle must be an object, got str"),
    ("data.triggers not list", minimal(triggers={"code": "c"}),
     "data.triggers must be a list, got dict"),
    ("data.triggers element number", minimal(triggers=[{"code": "c"}, 3]),
     "data.triggers[1] must be an object or a string, got int"),
    ("top-level triggers not list", {**minimal(), "triggers": "A.B"},
     "triggers must be a list, got str"),
    ("trigger signal number", {**minimal(), "triggers": [{"signal": 5}]},
     "triggers[0].signal must be an object or a string, got int"),
    ("signals not list", minimal(signals={"code": "c"}), "data.signals must be a list, got dict"),
    ("signal element list", minimal(signals=[{}, {}, []]),
     "data.signals[2] must be an object, got list"),
    ("signal element null", minimal(signals=[None]), "data.signals[0] must be an object, got null"),
    ("signal body not object", minimal(signals=[{"body": 78}]),
     "data.signals[0].body must be an object, got int"),
    ("signal status not object", minimal(signals=[{"status": "ERROR"}]),
     "data.signals[0].status must be an object, got str"),
    ("signal status.error not object", minimal(signals=[{"status": {"error": "X"}}]),
     "data.signals[0].status.error must be an object, got str"),
    ("signal meta not object", minimal(signals=[{"meta": [1]}]),
     "data.signals[0].meta must be an object, got list"),
    ("signal oemUpdatedAt unparsable", minimal(signals=[{"meta": {"oemUpdatedAt": "soon"}}]),
     "data.signals[0].meta.oemUpdatedAt is not an ISO-8601 timestamp"),
    ("signal fetchedAt wrong type", minimal(signals=[{"meta": {"fetchedAt": [1]}}]),
     "data.signals[0].meta.fetchedAt must be epoch milliseconds or an ISO-8601 string, got list"),
    ("signal retrievedAt out of range", minimal(signals=[{"meta": {"retrievedAt": -1e20}}]),
     "data.signals[0].meta.retrievedAt is out of range for a timestamp in epoch milliseconds"),
    ("signal oemUpdatedAt bool", minimal(signals=[{"meta": {"oemUpdatedAt": True}}]),
     "data.signals[0].meta.oemUpdatedAt must be epoch milliseconds or an ISO-8601 string, got true"),
    ("signal oemUpdatedAt integer after year 9999",
     minimal(signals=[{"meta": {"oemUpdatedAt": 253_402_300_800_000}}]),
     "data.signals[0].meta.oemUpdatedAt is out of range for a timestamp in epoch milliseconds"),
    ("signal fetchedAt integer before year 1",
     minimal(signals=[{}, {"meta": {"fetchedAt": -62_135_596_800_001}}]),
     "data.signals[1].meta.fetchedAt is out of range for a timestamp in epoch milliseconds"),
    ("signal retrievedAt bool", minimal(signals=[{"meta": {"retrievedAt": False}}]),
     "data.signals[0].meta.retrievedAt must be epoch milliseconds or an ISO-8601 string, got false"),
    ("signal fetchedAt unparsable", minimal(signals=[{"meta": {"fetchedAt": "later"}}]),
     "data.signals[0].meta.fetchedAt is not an ISO-8601 timestamp"),
    ("signal after a valid one not object", minimal(signals=[signal_with(), "x"]),
     "data.signals[1] must be an object, got str"),
    ("errors not list", minimal("VEHICLE_ERROR", errors={}),
     "data.errors must be a list, got dict"),
    ("error element string", minimal("VEHICLE_ERROR", errors=["VEHICLE_NOT_CAPABLE"]),
     "data.errors[0] must be an object, got str"),
    ("error resolution string", minimal("VEHICLE_ERROR", errors=[{"resolution": "RETRY"}]),
     "data.errors[0].resolution must be an object, got str"),
    ("error signals not list", minimal("VEHICLE_ERROR", errors=[{"signals": "A.B"}]),
     "data.errors[0].signals must be a list, got str"),
    ("error signal number", minimal("VEHICLE_ERROR", errors=[{}, {"signals": ["A.B", 1]}]),
     "data.errors[1].signals[1] must be an object or a string, got int"),
]  # fmt: skip


INVALID_BODIES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "body is not valid JSON: Expecting value at line 1 column 1"),
    ("not json", b"hello", "body is not valid JSON: Expecting value at line 1 column 1"),
    ("truncated", b'{"eventId": "e",\n "eventType"',
     "body is not valid JSON: Expecting ':' delimiter at line 2 column 13"),
    ("trailing data", b"{} {}", "body is not valid JSON: Extra data at line 1 column 4"),
    ("invalid utf-8", b'{"eventId": "\xff"}',
     "body is not valid UTF-8: invalid start byte at byte 13"),
    ("utf-16", '{"eventId": "e"}'.encode("utf-16"),
     "body is not valid UTF-8: invalid start byte at byte 0"),
    ("NaN", b'{"eventId": "e", "eventType": "X", "x": NaN}',
     "body is not valid JSON: NaN is not a JSON number"),
    ("Infinity", b'{"x": -Infinity}', "body is not valid JSON: -Infinity is not a JSON number"),
    ("float overflow", b'{"x": 1e400}',
     "body is not valid JSON: a number is too large for a float"),
    ("float overflow in a signal value",
     b'{"eventId": "e", "eventType": "X", "data": {"signals": [{"body": {"value": -1E+400}}]}}',
     "body is not valid JSON: a number is too large for a float"),
    ("float overflow in an array of arrays", b'{"x": [[1.5, 2e308]]}',
     "body is not valid JSON: a number is too large for a float"),
    ("float overflow from 310 integer digits", b'{"x": ' + b"9" * 310 + b'.5}',
     "body is not valid JSON: a number is too large for a float"),
    ("float overflow at the top level", b"1e400",
     "body is not valid JSON: a number is too large for a float"),
    ("huge integer", b'{"x": ' + b"9" * 5000 + b"}",
     "body is not valid JSON: a number has more than 4300 digits"),
    ("deep arrays", b"[" * 100_000 + b"]" * 100_000, "body is nested too deeply to read"),
    ("deep objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
     "body is nested too deeply to read"),
]  # fmt: skip


class TestInvalidEvents:
    @pytest.mark.parametrize(
        ("document", "message"),
        [pytest.param(document, message, id=name) for name, document, message in INVALID_DOCUMENTS],
    )
    def test_rejected_with_a_message_naming_the_path(self, document: Any, message: str) -> None:
        with pytest.raises(InvalidEventError, match=f"^{re.escape(message)}$"):
            parse(document)

    @pytest.mark.parametrize(
        ("body", "message"),
        [pytest.param(body, message, id=name) for name, body, message in INVALID_BODIES],
    )
    def test_unreadable_bytes_rejected_with_a_message(self, body: bytes, message: str) -> None:
        with pytest.raises(InvalidEventError, match=f"^{re.escape(message)}$"):
            parse_event(body)

    def test_invalid_event_error_is_a_value_error_without_a_chained_cause(self) -> None:
        with pytest.raises(ValueError, match="body is not valid JSON") as caught:
            parse_event(b"{")

        assert isinstance(caught.value, InvalidEventError)
        # The suppressed JSONDecodeError/UnicodeDecodeError would carry the whole body.
        assert caught.value.__cause__ is None and caught.value.__suppress_context__

    def test_messages_never_contain_signal_values_or_strings(self) -> None:
        latitude = 52.520008
        secret = "Home address 12 Main St"
        documents = [
            minimal(signals=[{"body": latitude}]),
            minimal(signals=[latitude]),
            minimal(vehicle=latitude),
            minimal(errors=[secret]),
            {**minimal(), "meta": {"deliveredAt": secret}},
            {"eventId": "e", "eventType": "X", "data": latitude},
            latitude,
        ]
        for document in documents:
            with pytest.raises(InvalidEventError) as caught:
                parse(document)
            assert "52.52" not in str(caught.value)
            assert "Main St" not in str(caught.value)


class TestImmutability:
    def test_every_object_rejects_assignment(self) -> None:
        event = parse_event((FIXTURES / "vehicle_error.json").read_bytes())
        state = parse_event((FIXTURES / "vehicle_state.json").read_bytes())
        targets: list[tuple[object, str]] = [
            (event, "event_id"),
            (event.meta, "mode"),
            (event.errors[0], "code"),
            (event.errors[0].signals[0], "code"),
            (state.triggers[0], "code"),
            (state.signals[0], "value"),
            (peek_envelope(b"{}"), "event_id"),
        ]
        for target, name in targets:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(target, name, "changed")

    def test_objects_have_no_instance_dict_to_smuggle_attributes_into(self) -> None:
        event = parse_event((FIXTURES / "verify.json").read_bytes())

        with pytest.raises((AttributeError, TypeError)):
            event.extra = 1  # type: ignore[attr-defined]

    def test_collections_are_tuples(self) -> None:
        event = parse_event((FIXTURES / "vehicle_state.json").read_bytes())

        assert isinstance(event.triggers, tuple)
        assert isinstance(event.signals, tuple)
        assert isinstance(event.errors, tuple)
        assert isinstance(event.signals_by_recency(), tuple)

    def test_data_and_bodies_are_read_only_all_the_way_down(self) -> None:
        event = parse_event((FIXTURES / "vehicle_state.json").read_bytes())
        body = event.signals[0].body
        assert body is not None

        with pytest.raises(TypeError):
            event.data["signals"] = ()  # type: ignore[index]
        with pytest.raises(TypeError):
            event.data["vehicle"]["id"] = "other"
        with pytest.raises(TypeError):
            body["value"] = 0  # type: ignore[index]
        assert isinstance(event.data["signals"], tuple)

    def test_events_are_hashable_and_equal_by_value(self) -> None:
        raw = (FIXTURES / "vehicle_state.json").read_bytes()

        assert parse_event(raw) == parse_event(raw)
        assert len({parse_event(raw), parse_event(raw)}) == 1

    def test_frozen_values_serialise_back_to_json(self) -> None:
        event = parse_event((FIXTURES / "vehicle_state.json").read_bytes())

        assert json.loads(json.dumps(event.data, default=dict)) == fixture("vehicle_state")["data"]


class TestPeekLegacyVerify:
    """Smartcar's older VERIFY, `{"webhookId", "eventName": "verify", "payload": {"challenge"}}`,
    is read as a VERIFY; an `eventType` means the current format whatever `eventName` says."""

    def test_reads_the_webhook_and_the_challenge_of_the_older_format(self) -> None:
        body = {"version": "2.0", "webhookId": "wh-1", "eventName": "verify",
                "payload": {"challenge": "c-1"}}

        assert peek_envelope(encode(body)) == Envelope(
            event_type="VERIFY", webhook_id="wh-1", challenge="c-1",
            challenge_path="payload.challenge",
        )

    @pytest.mark.parametrize("payload", ["c-1", ["c-1"], 5, None])
    def test_a_payload_that_is_not_an_object_has_no_challenge(self, payload: Any) -> None:
        body = {"webhookId": "wh-1", "eventName": "verify", "payload": payload}

        assert peek_envelope(encode(body)) == Envelope(
            event_type="VERIFY", webhook_id="wh-1", challenge_path="payload.challenge",
        )

    def test_an_event_type_wins_over_the_older_event_name(self) -> None:
        body = {"eventId": "e1", "eventType": "VEHICLE_STATE", "eventName": "verify",
                "payload": {"challenge": "c-1"}}

        assert peek_envelope(encode(body)) == Envelope(event_id="e1", event_type="VEHICLE_STATE")


class TestPeekEnvelope:
    @pytest.mark.parametrize(
        "name", ["verify", "vehicle_state", "vehicle_state_top_level_triggers", "vehicle_error"]
    )
    def test_agrees_with_parse_event_on_every_fixture(self, name: str) -> None:
        raw = (FIXTURES / f"{name}.json").read_bytes()
        event = parse_event(raw)

        assert peek_envelope(raw) == Envelope(
            event_id=event.event_id,
            event_type=event.event_type,
            vehicle_id=event.vehicle_id,
            webhook_id=event.meta.webhook_id,
            delivery_id=event.meta.delivery_id,
            mode=event.meta.mode,
            challenge=event.challenge,
        )

    def test_reads_the_verify_challenge(self) -> None:
        raw = (FIXTURES / "verify.json").read_bytes()

        assert peek_envelope(raw).challenge == "3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f"

    @pytest.mark.parametrize(
        "body",
        [
            b"",
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'"eventId"',
            b"null",
            b"[" * 100_000,
            b'{"x": ' + b"9" * 5000 + b"}",
        ],
        ids=["empty", "text", "bad-utf8", "array", "string", "null", "deep", "huge-int"],
    )
    def test_anything_unreadable_gives_all_none(self, body: bytes) -> None:
        assert peek_envelope(body) == Envelope()

    @pytest.mark.parametrize("container", ["data", "meta"])
    @pytest.mark.parametrize("value", [[1], "text", 7, True])
    def test_a_container_of_the_wrong_type_does_not_hide_the_event_id(
        self, container: str, value: Any
    ) -> None:
        # A signed body of the wrong shape is still stored under its eventId (deduplication).
        body = json.dumps({"eventId": "e1", "eventType": "X", "vehicleId": "v1", container: value})
        envelope = peek_envelope(body.encode())
        assert (envelope.event_id, envelope.event_type, envelope.vehicle_id) == ("e1", "X", "v1")

    @pytest.mark.parametrize("vehicle", [[1], "text", 7])
    def test_a_vehicle_of_the_wrong_type_does_not_hide_the_event_id(self, vehicle: Any) -> None:
        body = json.dumps({"eventId": "e1", "eventType": "X", "data": {"vehicle": vehicle}})
        envelope = peek_envelope(body.encode())
        assert (envelope.event_id, envelope.vehicle_id) == ("e1", None)

    def test_a_top_level_vehicle_id_wins_over_data_vehicle(self) -> None:
        body = {"eventId": "e1", "eventType": "X", "vehicleId": "top",
                "data": {"vehicle": {"id": "nested"}}}
        assert peek_envelope(json.dumps(body).encode()).vehicle_id == "top"
        del body["vehicleId"]
        assert peek_envelope(json.dumps(body).encode()).vehicle_id == "nested"

    def test_fields_that_are_not_strings_are_none(self) -> None:
        body = encode(
            {
                "eventId": 1,
                "eventType": None,
                "vehicleId": [],
                "data": "x",
                "meta": {"webhookId": 2, "deliveryId": {}, "mode": False},
            }
        )

        assert peek_envelope(body) == Envelope()

    def test_reads_ids_of_a_body_parse_event_will_reject(self) -> None:
        # The receiver stores it and de-duplicates on eventId; the processor dead-letters it.
        body = (
            b'{"eventId": "e-1", "eventType": "VEHICLE_STATE", "data": {"signals": 7},'
            b' "meta": {"mode": "TEST", "deliveredAt": NaN}}'
        )

        assert peek_envelope(body) == Envelope(
            event_id="e-1", event_type="VEHICLE_STATE", mode="TEST"
        )
        with pytest.raises(InvalidEventError):
            parse_event(body)

    def test_vehicle_id_falls_back_to_data_vehicle_id_and_bom_is_tolerated(self) -> None:
        body = b"\xef\xbb\xbf" + encode(state_event(vehicleId=...))

        assert peek_envelope(body).vehicle_id == "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"

    def test_never_raises_even_for_the_wrong_argument_type(self) -> None:
        assert peek_envelope(None) == Envelope()  # type: ignore[arg-type]


# Property tests: whatever arrives, parse_event raises InvalidEventError or nothing, and
# peek_envelope raises nothing.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)

# Paths into realistic events where an arbitrary value exercises a specific reader.
MUTATION_PATHS: list[tuple[str, tuple[Any, ...]]] = [
    ("vehicle_state", ("eventId",)),
    ("vehicle_state", ("eventType",)),
    ("vehicle_state", ("vehicleId",)),
    ("vehicle_state", ("data",)),
    ("vehicle_state", ("data", "vehicle")),
    ("vehicle_state", ("data", "triggers")),
    ("vehicle_state", ("data", "triggers", 0)),
    ("vehicle_state", ("data", "signals")),
    ("vehicle_state", ("data", "signals", 0)),
    ("vehicle_state", ("data", "signals", 0, "body")),
    ("vehicle_state", ("data", "signals", 0, "meta")),
    ("vehicle_state", ("data", "signals", 0, "meta", "oemUpdatedAt")),
    ("vehicle_state", ("data", "signals", 0, "meta", "fetchedAt")),
    ("vehicle_state", ("data", "signals", 2, "status")),
    ("vehicle_state", ("data", "signals", 2, "status", "error")),
    ("vehicle_state", ("meta",)),
    ("vehicle_state", ("meta", "deliveredAt")),
    ("vehicle_state", ("meta", "signalCount")),
    ("vehicle_state_top_level_triggers", ("triggers",)),
    ("vehicle_state_top_level_triggers", ("triggers", 0)),
    ("vehicle_state_top_level_triggers", ("triggers", 0, "signal")),
    ("vehicle_error", ("data", "errors")),
    ("vehicle_error", ("data", "errors", 0)),
    ("vehicle_error", ("data", "errors", 0, "resolution")),
    ("vehicle_error", ("data", "errors", 0, "signals")),
    ("vehicle_error", ("data", "errors", 0, "signals", 0)),
    ("verify", ("data", "challenge")),
]
_FIXTURE_CACHE = {name: fixture(name) for name in {name for name, _ in MUTATION_PATHS}}


def mutated(name: str, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(_FIXTURE_CACHE[name])
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def only_invalid_event_error(call: Callable[[], Any]) -> None:
    try:
        call()
    except InvalidEventError:
        pass


# differing_executors: `make mutate` runs these methods many times in one process.
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)


class TestProperties:
    @PROPERTY_SETTINGS
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, body: bytes) -> None:
        only_invalid_event_error(lambda: parse_event(body))
        assert isinstance(peek_envelope(body), Envelope)

    @PROPERTY_SETTINGS
    @given(json_values)
    def test_arbitrary_json_values(self, value: Any) -> None:
        body = json.dumps(value).encode()
        only_invalid_event_error(lambda: parse_event(body))
        only_invalid_event_error(lambda: parse_event(body.decode()))
        assert isinstance(peek_envelope(body), Envelope)

    @PROPERTY_SETTINGS
    @given(st.sampled_from(MUTATION_PATHS), json_values)
    def test_arbitrary_values_at_every_known_path(
        self, where: tuple[str, tuple[Any, ...]], value: Any
    ) -> None:
        body = json.dumps(mutated(*where, value)).encode()
        only_invalid_event_error(lambda: parse_event(body))
        envelope = peek_envelope(body)
        try:
            event = parse_event(body)
        except InvalidEventError:
            return
        # Whatever parses agrees with the cheap peek on what they both read.
        assert (envelope.event_id, envelope.event_type) == (event.event_id, event.event_type)
        assert envelope.vehicle_id == event.vehicle_id


class TestSignalLookup:
    """`Event.signal` finds a signal by `Group.Name` or code; signals that lack them are never
    found by a name they do not have."""

    def test_a_name_no_signal_has_is_not_found_even_among_nameless_signals(self) -> None:
        event = parse(minimal(signals=[{"body": {"value": 1}}]))
        assert event.signals[0].path is None and event.signals[0].code is None
        for name in ("XXXX", "xxxx", "None.None"):
            assert event.signal(name) is None

    def test_an_empty_name_finds_nothing_even_among_nameless_signals(self) -> None:
        event = parse(minimal(signals=[{"body": {"value": 1}}, {"code": "", "name": ""}]))

        assert event.signal("") is None

    def test_a_path_needs_both_group_and_name(self) -> None:
        event = parse(minimal(signals=[{"group": "Location"}, {"name": "IsAtHome"}]))
        assert [s.path for s in event.signals] == [None, None]
        assert event.signal("Location.None") is None
        assert event.signal("None.IsAtHome") is None


class TestFrozenArrays:
    def test_arrays_nested_in_arrays_are_tuples_all_the_way_down(self) -> None:
        event = parse(minimal(matrix=[[1, [2, 3]], []], signals=[]))
        assert event.data["matrix"] == ((1, (2, 3)), ())
        assert type(event.data["matrix"][0][1]) is tuple


class TestTimestampsAreUtcWhateverTheMachine:
    def test_an_offset_is_converted_to_utc_not_to_the_local_zone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TZ", "Asia/Tokyo")
        time.tzset()
        try:
            event = parse({**minimal(), "meta": {"deliveredAt": "2026-01-01T01:00:00+01:00"}})
        finally:
            monkeypatch.undo()
            time.tzset()
        delivered = event.meta.delivered_at
        assert delivered is not None
        assert delivered.utcoffset() == timedelta(0)
        assert (delivered.hour, delivered.minute) == (0, 0)


class TestNumbers:
    """Only a number literal that overflows is refused, wherever it is; the same text in a
    string is just text."""

    def test_an_overflowing_literal_inside_a_string_is_text(self) -> None:
        document = minimal(signals=[signal_with(body={"value": "1e400", "unit": "9" * 400})])
        document["meta"] = {"webhookName": "e999 1E+400 -1e400"}

        event = parse(document)

        assert event.signals[0].value == "1e400"
        assert event.meta.webhook_name == "e999 1E+400 -1e400"

    def test_literals_that_only_look_large_are_numbers(self) -> None:
        body = (b'{"eventId": "e", "eventType": "X", "data": {"tiny": 1e-400, "max": 1.7e308, '
                b'"long": ' + b"1" * 400 + b', "exp": 5E+10}}')

        event = parse_event(body)

        assert event.data["tiny"] == 0.0
        assert event.data["max"] == 1.7e308
        assert event.data["long"] == int("1" * 400)
        assert event.data["exp"] == 5e10


class TestTimestampRange:
    """Integer epoch milliseconds are accepted from year 1 to year 9999 (datetime's range)."""

    @pytest.mark.parametrize(
        ("milliseconds", "expected"),
        [
            (-62_135_596_800_000, datetime(1, 1, 1, tzinfo=UTC)),
            (253_402_300_799_999, datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
            (1_731_940_328_000, utc("2024-11-18T14:32:08")),
        ],
    )
    def test_the_first_and_last_millisecond_datetime_can_hold(
        self, milliseconds: int, expected: datetime
    ) -> None:
        meta = {"oemUpdatedAt": milliseconds, "fetchedAt": milliseconds}

        (signal,) = parse(minimal(signals=[signal_with(meta=meta)])).signals

        assert signal.oem_updated_at == signal.retrieved_at == expected

    def test_fractional_milliseconds_and_iso_strings_are_read_too(self) -> None:
        meta = {"oemUpdatedAt": 1_731_940_328_000.5, "retrievedAt": "2024-11-18T15:32:10+01:00"}

        (signal,) = parse(minimal(signals=[signal_with(meta=meta)])).signals

        assert signal.oem_updated_at == utc("2024-11-18T14:32:08.000500")
        assert signal.retrieved_at == utc("2024-11-18T14:32:10")


class TestSignalsAt:
    """`Event.signals_at(paths)`: what a handler registry asks for, the signals named by
    `Group.Name` or code newest first, exactly as filtering `signals_by_recency()` would give
    them."""

    SIGNALS: tuple[dict[str, Any], ...] = (
        signal_with(meta={"oemUpdatedAt": 1_700_000_001_000}),
        signal_with(group="Location", name="PreciseLocation", code="location-preciselocation",
                    meta={"oemUpdatedAt": 1_700_000_005_000}),
        signal_with(meta={"oemUpdatedAt": 1_700_000_009_000}, body={"value": 80}),
        signal_with(group="", name="StateOfCharge"),  # no Group.Name: never matched
        signal_with(meta={}),  # undated: after the dated ones
        signal_with(group="Odometer", name="TraveledDistance"),
        # Dots inside a name or a group: the path is still Group.Name.
        signal_with(group="Climate", name="Cabin.Temperature"),
        signal_with(group="Charge.Port", name="IsOpen"),
        signal_with(group="Odometer", name=["TraveledDistance"]),  # not a name: never matched
        signal_with(group="Odometer", name=7),
    )

    @pytest.mark.parametrize("read_signals_first", [False, True])
    @pytest.mark.parametrize("paths", [
        {"TractionBattery.StateOfCharge"},
        {"TractionBattery.StateOfCharge", "Location.PreciseLocation"},
        {"Odometer.TraveledDistance", "Nothing.Here"},
        {"tractionbattery-stateofcharge", ".StateOfCharge", "StateOfCharge"},
        {"location-preciselocation", "Odometer.TraveledDistance"},
        {"tractionbattery.stateofcharge", "TRACTIONBATTERY-STATEOFCHARGE"},  # case counts
        {"Climate.Cabin.Temperature", "Charge.Port.IsOpen"},
        {"Climate.Cabin", "Cabin.Temperature", "Port.IsOpen", "Charge.Port"},
        set(),
    ])
    def test_is_signals_by_recency_filtered_by_path_or_code(
        self, paths: set[str], read_signals_first: bool
    ) -> None:
        event = parse(minimal(signals=list(self.SIGNALS)))
        if read_signals_first:
            assert len(event.signals) == len(self.SIGNALS)
        # Asked before `expected` reads every signal, so the raw path is the one asked.
        found = event.signals_at(paths)
        expected = tuple(s for s in event.signals_by_recency()
                         if s.path in paths or s.code in paths)

        assert found == expected

    def test_newest_first_then_the_undated_in_payload_order(self) -> None:
        event = parse(minimal(signals=list(self.SIGNALS)))

        found = event.signals_at({"TractionBattery.StateOfCharge"})

        assert [s.value for s in found] == [80, None, None]
        assert [s.oem_updated_at is None for s in found] == [False, False, True]

    def test_an_event_without_signals_has_none_at_any_path(self) -> None:
        assert parse(minimal()).signals_at({"TractionBattery.StateOfCharge"}) == ()


class TestLazyViews:
    """`Event.signals` and `Event.data` are built on first access from what `parse_event`
    checked; an event behaves the same whether or not they have been read."""

    RAW = (FIXTURES / "vehicle_state.json").read_bytes()

    def test_views_are_built_once_and_kept(self) -> None:
        event = parse_event(self.RAW)

        assert event.signals is event.signals
        assert event.data is event.data
        assert event.signals[0].body == event.data["signals"][0]["body"]

    def test_signal_bodies_and_values_are_frozen_all_the_way_down(self) -> None:
        body = {"value": {"points": [[52.5, 13.4], {"alt": [1]}]}, "unit": "deg"}

        (signal,) = parse(minimal(signals=[signal_with(body=body)])).signals

        assert signal.body == {"value": {"points": ((52.5, 13.4), {"alt": (1,)})}, "unit": "deg"}
        assert type(signal.body) is MappingProxyType and type(signal.value) is MappingProxyType
        points = signal.value["points"]
        assert type(points) is tuple and type(points[0]) is tuple
        assert type(points[1]) is MappingProxyType and type(points[1]["alt"]) is tuple
        with pytest.raises(TypeError):
            signal.value["points"] = ()  # type: ignore[index]  # read-only: the point of the test

    def test_reading_the_views_changes_neither_equality_nor_hash(self) -> None:
        read, unread = parse_event(self.RAW), parse_event(self.RAW)
        assert read.signals and read.data

        assert read == unread and hash(read) == hash(unread)
        assert unread == read

    def test_events_that_differ_only_in_a_signal_value_are_unequal(self) -> None:
        document = fixture("vehicle_state")
        first = parse(document)
        document["data"]["signals"][0]["body"]["value"] = 79
        second = parse(document)

        assert first != second
        assert first.signals != second.signals

    def test_events_that_differ_only_in_an_unknown_data_key_are_unequal(self) -> None:
        document = fixture("vehicle_state")
        first = parse(document)
        document["data"]["extra"] = 1

        assert first != parse(document)

    def test_reading_the_views_leaves_the_decoded_payload_as_it_was(self) -> None:
        event = parse_event(self.RAW)
        frozen = event.data

        assert json.loads(json.dumps(frozen, default=dict)) == fixture("vehicle_state")["data"]
        assert event == parse_event(self.RAW)  # equality compares the decoded payload

    def test_an_absent_or_null_data_is_an_empty_mapping_and_no_signals(self) -> None:
        for document in ({"eventId": "e", "eventType": "X"},
                         {"eventId": "e", "eventType": "X", "data": None}):
            event = parse(document)
            assert (event.data, event.signals) == ({}, ())
            assert isinstance(event.data, MappingProxyType)

    def test_repr_shows_every_attribute_as_a_dataclass_repr_would(self) -> None:
        event = parse_event(self.RAW)

        text = repr(event)

        assert text.startswith(
            "Event(event_id='550e8400-e29b-41d4-a716-446655440000', "
            "event_type='VEHICLE_STATE', vehicle_id='9af13248-3b73-4c9d-9a4b-d937ce6bc8e2', "
            f"meta={event.meta!r}, triggers={event.triggers!r}, signals=(Signal(code="
        )
        assert text.endswith(
            f"errors=(), challenge=None, data={event.data!r})"
        )
        assert f"signals={event.signals!r}, " in text

    def test_the_lazy_attributes_cannot_be_assigned_either(self) -> None:
        event = parse_event(self.RAW)

        for name in ("signals", "data", "_raw_data", "_signals", "_data"):
            with pytest.raises(dataclasses.FrozenInstanceError, match=f"^cannot assign to field '{name}'$"):
                setattr(event, name, ())
            with pytest.raises(dataclasses.FrozenInstanceError, match=f"^cannot delete field '{name}'$"):
                delattr(event, name)
        assert (event.signals, event.data) == (parse_event(self.RAW).signals, parse_event(self.RAW).data)

    def test_threads_reading_at_once_see_equal_values(self) -> None:
        events = [parse_event(self.RAW) for _ in range(20)]
        start = threading.Barrier(4)
        seen: list[tuple[Any, Any]] = []
        lock = threading.Lock()

        def read() -> None:
            start.wait(timeout=60)
            for event in events:
                found = (event.signals, event.data)
                with lock:
                    seen.append(found)

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert len(seen) == 80
        expected = (events[0].signals, events[0].data)
        assert all(found == expected for found in seen)


class TestFrozenCopy:
    def test_mixed_nesting_is_frozen_at_every_level(self) -> None:
        event = parse(minimal(mixed=[[{"a": [1, [2, {"b": []}]]}], {"c": [[{}]]}], signals=[]))

        outer = event.data["mixed"]
        assert outer == (({"a": (1, (2, {"b": ()}))},), {"c": (({},),)})
        inner = outer[0][0]["a"][1]
        assert type(outer) is tuple and type(outer[0]) is tuple and type(inner) is tuple
        assert type(outer[0][0]) is MappingProxyType and type(inner[1]) is MappingProxyType
        assert type(inner[1]["b"]) is tuple
        assert type(outer[1]["c"][0][0]) is MappingProxyType

    def test_nesting_the_decoder_accepted_is_frozen_even_from_a_deep_call_stack(self) -> None:
        # About as deep as the decoder reads within the recursion limit: a recursive freeze
        # started from a deep stack (a handler several frames down) would overflow it.
        depth = sys.getrecursionlimit() // 4  # an object and an array per step
        nested = '{"a": [' * depth + "1" + "]}" * depth
        body = '{"eventId": "e", "eventType": "X", "data": ' + nested + "}"
        event = parse_event(body)

        def read_from_depth(frames: int) -> Any:
            return read_from_depth(frames - 1) if frames else event.data

        value: Any = read_from_depth(sys.getrecursionlimit() - depth - 100)
        for _ in range(depth):
            assert type(value) is MappingProxyType
            value = value["a"]
            assert type(value) is tuple
            value = value[0]
        assert value == 1
