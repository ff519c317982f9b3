"""The inspector's vehicle state: the Vehicles API behind its tab, and per delivery what
processing it did to the store (`ProcessResult.vehicle_state`, through the runtime's
`on_processed`).

The recorder's joining is tested with the processor's real spans; the API and the hook's wiring
with a real host process (`tests.vehicle_host`: the local host with a `MemoryVehicleStore` where
the app's store goes). The page itself is driven in Chromium in tests/test_inspector_browser.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from shared import telemetry_names as names
from shared.handlers import HandlerRegistry
from shared.local.inspector import Recorder
from shared.processor import InboundMessage, ProcessResult, process_message
from shared.settings import load_settings
from shared.telemetry import Telemetry

from .inspector_host import HostProcess
from .support import http_request, local_env
from .vehicle_fakes import VEHICLE, MemoryVehicleStore, error_body, state_body

OEM_MS = 1_764_000_000_000
#: `python -m tests.vehicle_host` as HostProcess runs a host (it appends `-m shared.local`).
VEHICLE_HOST = [sys.executable, "-c", "import runpy, sys; sys.argv = ['tests.vehicle_host']; "
                "runpy.run_module('tests.vehicle_host', run_name='__main__', alter_sys=True)"]


class NoDeadLetters:
    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        raise AssertionError(f"dead-lettered: {reason}: {description}")


class NoRetries:
    async def schedule(self, copy: Any) -> None:
        raise AssertionError(f"retry scheduled: {copy}")


def processed(body: bytes, tmp_path: Path, telemetry: Telemetry, *,
              delivery_count: int = 1) -> tuple[InboundMessage, ProcessResult]:
    """The processor's own run, spans included, of `body` as a queued message that carries the
    trace context of the request that stored it (one trace per event)."""
    event_id = json.loads(body)["eventId"]
    trace_id = uuid.uuid5(uuid.NAMESPACE_URL, event_id).hex
    message = InboundMessage(
        body=body, message_id=event_id, delivery_count=delivery_count,
        application_properties={names.PROP_TRACEPARENT: f"00-{trace_id}-b7ad6b7169203331-01"})
    result = asyncio.run(process_message(
        message, settings=load_settings(local_env(tmp_path)), registry=HandlerRegistry(),
        dead_letterer=NoDeadLetters(), retry_sender=NoRetries(), telemetry=telemetry))
    return message, result


class TestTheRecorderKeepsWhatEachProcessingDid:
    @pytest.fixture
    def wired(self) -> tuple[Recorder, Telemetry]:
        provider = TracerProvider()
        recorder = Recorder()
        assert recorder.attach(provider)
        return recorder, Telemetry(tracer_provider=provider)

    def test_the_result_joins_the_attempt_its_span_recorded(
        self, tmp_path: Path, wired: tuple[Recorder, Telemetry]
    ) -> None:
        recorder, telemetry = wired
        store = MemoryVehicleStore()
        store.apply_body(state_body(oem_ms=OEM_MS + 5000))
        older = state_body(oem_ms=OEM_MS)
        message, result = processed(older, tmp_path, telemetry)
        state = asyncio.run(store.apply(result.event))  # type: ignore[arg-type]
        recorder.processed(message, dataclasses.replace(result, vehicle_state=state))
        detail = recorder.detail(1)
        assert detail is not None
        assert detail["vehicleState"] == state.to_json()
        assert detail["vehicleState"]["changed"] == []
        assert detail["vehicleState"]["stale"] == ["tractionbattery-stateofcharge",
                                                   "charge-ischarging"]
        (attempt,) = detail["processingAttempts"]
        assert attempt["vehicleState"] == state.to_json()

    def test_each_delivery_of_a_message_keeps_its_own_and_the_detail_shows_the_first(
        self, tmp_path: Path, wired: tuple[Recorder, Telemetry]
    ) -> None:
        recorder, telemetry = wired
        store = MemoryVehicleStore()
        body = state_body(oem_ms=OEM_MS)
        for count in (1, 2):
            message, result = processed(body, tmp_path, telemetry, delivery_count=count)
            state = asyncio.run(store.apply(result.event))  # type: ignore[arg-type]
            recorder.processed(message, dataclasses.replace(result, vehicle_state=state))
        detail = recorder.detail(1)
        assert detail is not None
        first, second = detail["processingAttempts"]
        assert first["vehicleState"]["changed"] == ["tractionbattery-stateofcharge",
                                                    "charge-ischarging"]
        assert second["vehicleState"]["changed"] == []  # applied again: nothing changes
        # What the event did is what its first application did; the retry's "stale" readings
        # are its own, stored by that first one: named as a re-application, not shown instead.
        assert detail["vehicleState"] == first["vehicleState"]
        assert detail["vehicleStateAppliedBy"] == 1
        assert detail["vehicleStateReappliedBy"] == [2]

    def test_a_result_without_state_or_without_its_attempt_changes_nothing(
        self, tmp_path: Path, wired: tuple[Recorder, Telemetry]
    ) -> None:
        recorder, telemetry = wired
        message, result = processed(state_body(oem_ms=OEM_MS), tmp_path, telemetry)
        before = recorder.snapshot(0)[0]
        recorder.processed(message, result)  # the store is off: no state
        assert result.event is not None
        applied = dataclasses.replace(
            result, vehicle_state=asyncio.run(MemoryVehicleStore().apply(result.event)))
        recorder.processed(dataclasses.replace(message, delivery_count=7), applied)
        recorder.processed(dataclasses.replace(message, message_id="never-processed"), applied)
        assert recorder.snapshot(0)[0] == before
        detail = recorder.detail(1)
        assert detail is not None and detail["vehicleState"] is None

    def test_a_delivery_dropped_from_the_ring_is_forgotten_by_message_id(
        self, tmp_path: Path
    ) -> None:
        provider = TracerProvider()
        recorder = Recorder(capacity=1)
        recorder.attach(provider)
        telemetry = Telemetry(tracer_provider=provider)
        first = processed(state_body(oem_ms=OEM_MS), tmp_path, telemetry)
        processed(state_body(oem_ms=OEM_MS), tmp_path, telemetry)  # pushes the first out
        assert recorder.ids() == [2]
        assert first[0].message_id not in recorder._by_message
        state = asyncio.run(MemoryVehicleStore().apply(first[1].event))  # type: ignore[arg-type]
        recorder.processed(first[0], dataclasses.replace(first[1], vehicle_state=state))
        detail = recorder.detail(2)
        assert detail is not None and detail["vehicleState"] is None


# -- a real host process ---------------------------------------------------------------------


def processed_delivery(host: HostProcess, event_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        summary = next((d for d in host.deliveries() if d["eventId"] == event_id
                        and d["processing"]), None)
        if summary is None:
            return None
        detail: dict[str, Any] = json.loads(host.inspector(f"api/deliveries/{summary['id']}").body)
        return detail if detail["vehicleState"] is not None else None

    found: dict[str, Any] = host.wait_for(done)
    return found


class TestOverTheInspectorsPort:
    def test_the_vehicles_api_and_what_each_delivery_did(self, tmp_path: Path) -> None:
        with HostProcess(tmp_path, python=VEHICLE_HOST) as host:
            newer = state_body(oem_ms=OEM_MS + 60_000, soc=80)
            older = state_body(oem_ms=OEM_MS, soc=50)
            other = "0b9ab6c1-2b1a-4b85-8f53-3d4c2f1e0a99"
            assert host.post(newer).status == 200
            first = processed_delivery(host, json.loads(newer)["eventId"])
            assert host.post(older).status == 200
            second = processed_delivery(host, json.loads(older)["eventId"])
            assert host.post(error_body(), path="/api/webhooks/smartcar/errors").status == 200
            assert host.post(state_body(other, oem_ms=OEM_MS)).status == 200

            assert first["vehicleState"]["changed"] == ["tractionbattery-stateofcharge",
                                                        "charge-ischarging"]
            assert first["vehicleState"]["stale"] == []
            assert second["vehicleState"]["changed"] == []
            assert second["vehicleState"]["stale"] == ["tractionbattery-stateofcharge",
                                                       "charge-ischarging"]
            assert second["vehicleState"]["skipped"] == [
                {"code": "location-isathome", "reason": "no oemUpdatedAt"}]

            def listed() -> list[dict[str, Any]] | None:
                doc = json.loads(host.inspector("api/vehicles").body)
                vehicles: list[dict[str, Any]] = doc["vehicles"]
                return vehicles if len(vehicles) == 2 and vehicles[1]["openErrors"] else None

            vehicles = host.wait_for(listed)
            assert [v["vehicleId"] for v in vehicles] == [other, VEHICLE]
            view = json.loads(host.inspector(f"api/vehicles/{VEHICLE}").body)
            assert view["signals"]["tractionbattery-stateofcharge"]["value"] == 80
            assert [e["code"] for e in view["errors"]] == ["VEHICLE_NOT_CAPABLE"]

            unknown = host.inspector(f"api/vehicles/{uuid.uuid4()}")
            assert unknown.status == 404
            assert host.inspector(f"api/vehicles/{'a' * 1025}").status == 400
            # The token is still the door: without it, 403, no vehicle data.
            refused = http_request(host.inspector_port, "GET", "/not-the-token/api/vehicles")
            assert refused.status == 403 and VEHICLE.encode() not in refused.body

    def test_a_vehicle_listed_under_any_id_opens(self, tmp_path: Path) -> None:
        # Only Smartcar's id characters pass the read route; the inspector, like `vehicles
        # show`, opens whatever vehicle it lists, however its id is spelled.
        odd = "fleet 7/a#b?c%d\\é"
        with HostProcess(tmp_path, python=VEHICLE_HOST) as host:
            assert host.post(state_body(odd, oem_ms=OEM_MS, soc=61)).status == 200

            def listed() -> list[dict[str, Any]] | None:
                vehicles: list[dict[str, Any]] = json.loads(
                    host.inspector("api/vehicles").body)["vehicles"]
                return vehicles or None

            assert [v["vehicleId"] for v in host.wait_for(listed)] == [odd]
            # As the page asks for it (encodeURIComponent).
            opened = host.inspector(f"api/vehicles/{urllib.parse.quote(odd, safe='')}")
            assert opened.status == 200
            view = json.loads(opened.body)
            assert view["vehicleId"] == odd
            assert view["signals"]["tractionbattery-stateofcharge"]["value"] == 61
            # As the page asks for it now: in the query string, where `.` and `..` stay ids
            # (a browser resolves them, even as %2E, when they are path segments).
            for dots in (".", ".."):
                assert host.post(state_body(dots, oem_ms=OEM_MS, soc=62)).status == 200
                shown = host.wait_for(lambda d=dots: (lambda a: a if a.status == 200 else None)(
                    host.inspector(f"api/vehicle?id={urllib.parse.quote(d, safe='')}")))
                assert json.loads(shown.body)["vehicleId"] == dots
            by_query = host.inspector(f"api/vehicle?id={urllib.parse.quote(odd, safe='')}")
            assert json.loads(by_query.body)["vehicleId"] == odd
            assert host.inspector("api/vehicle").status == 400

    def test_with_the_store_off_the_api_says_so(self, tmp_path: Path) -> None:
        with HostProcess(tmp_path, extra_env={"VEHICLE_STATE_STORE": "off"}) as host:
            response = host.inspector("api/vehicles")
            assert response.status == 503
            assert b"turned off" in response.body
            assert host.inspector(f"api/vehicles/{VEHICLE}").status == 503
