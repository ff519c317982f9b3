"""`GET /api/vehicles/{vehicleId}`: the read route of the vehicle state store.

The decision (shared/vehicle_read.py) is tested on its own; then over real HTTP on loopback
against the local host, which must not hand vehicle data to a tunnel: without this run's key
(`?code=` or `x-functions-key`) it answers 401, while the webhook routes stay keyless. The
store is `MemoryVehicleStore` (tests/vehicle_fakes.py), put where the app's store goes: the
runtime's `vehicle_state`. The Azure side (the function through the azure-functions
converters) is in tests/test_worker_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.local.app_functions import has_key
from shared.local.routes import route_template
from shared.runtime import Runtime
from shared.vehicle_read import (
    MAX_VEHICLE_ID_LENGTH,
    ReadReply,
    read_vehicle,
    stored_vehicle_id_problem,
    vehicle_id_problem,
)
from shared.vehicle_state import valid_vehicle_id

from .inspector_host import HostProcess
from .support import (
    RunningHost,
    compare_digest_calls,
    http_request,
    local_env,
    signed_headers,
    wait_until,
)
from .vehicle_events import error, error_event, signal, state_event
from .vehicle_fakes import VEHICLE, MemoryVehicleStore, error_body, state_body

ROOT = Path(__file__).resolve().parents[1]

OEM_MS = 1_764_000_000_000
#: Ids the route refuses with 400, and why: too long, and each kind of character outside the set.
MALFORMED = {
    "too long": "a" * (MAX_VEHICLE_ID_LENGTH + 1),
    "slash": "abc/def",
    "hash": "abc#def",
    "question mark": "abc?def",
    "backslash": "abc\\def",
    "percent": "abc%2Fdef",
    "space": "abc def",
    "control character": "abc\x1bdef",
    "non-ASCII letter": "véhicule",
    "empty": "",
}


def stored(*bodies: bytes) -> MemoryVehicleStore:
    store = MemoryVehicleStore()
    for body in bodies:
        store.apply_body(body)
    return store


def failing_store() -> MemoryVehicleStore:
    """A store whose reads fail, as an unreachable or damaged backend's do."""
    store = stored(state_body(oem_ms=OEM_MS))
    store.fail_with = OSError("disk I/O error")
    return store


def read(vehicle_id: str, store: MemoryVehicleStore | None) -> tuple[int, dict[str, Any]]:
    reply = asyncio.run(read_vehicle(vehicle_id, store))
    assert dict(reply.headers) == {"Content-Type": "application/json",
                                   "Cache-Control": "no-store"}
    body: dict[str, Any] = json.loads(reply.body_bytes())
    assert body == reply.body
    return reply.status, body


class TestTheDecision:
    def test_a_vehicle_seen_is_its_view_as_json(self) -> None:
        store = stored(state_body(oem_ms=OEM_MS, soc=55), error_body())
        status, body = read(VEHICLE, store)
        assert status == 200
        view = asyncio.run(store.get_vehicle(VEHICLE))
        assert view is not None and body == view.to_json()
        soc = body["signals"]["tractionbattery-stateofcharge"]
        assert soc["value"] == 55 and soc["unit"] == "percent"
        assert soc["oemUpdatedAt"].startswith("2025-11-24T")
        assert [(e["type"], e["code"], e["state"]) for e in body["errors"]] == [
            ("COMPATIBILITY", "VEHICLE_NOT_CAPABLE", "OPEN")]

    def test_the_documented_body_and_listing_are_what_they_answer(self, tmp_path: Path) -> None:
        """docs/vehicle-state.md shows a vehicle's body and its `vehicles list --json` entry:
        the same events, applied by the local store, give exactly those."""
        from shared.local.vehicle_state import SqliteVehicleStateStore

        section = (ROOT / "docs" / "vehicle-state.md").read_text(encoding="utf-8").split(
            "## Reading it", 1)[1].split("\n## ", 1)[0]
        documented = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section,
                                                                re.S)]
        at = 1_764_577_800_000  # 2025-12-01T08:30:00Z

        async def scenario() -> Any:
            store = SqliteVehicleStateStore(tmp_path / "state.sqlite3")
            try:
                await store.apply(error_event("e-1", error(
                    description="The vehicle does not support this signal."),
                    vehicle=VEHICLE, delivered=at - 600_000))
                await store.apply(state_event(
                    "e-2", signal(value=18, oem=at, retrieved=at + 2000),
                    signal("odometer-traveleddistance", 51234.5, unit="km", oem=at - 60_000,
                           retrieved=at + 2000),
                    signal("location-preciselocation", group="Location", name="PreciseLocation",
                           error=("PERMISSION", "DENIED"), oem=None),
                    vehicle=VEHICLE, delivered=at + 3000))
                reply = await read_vehicle(VEHICLE, store)
                return reply, [s.to_json() for s in await store.list_vehicles()]
            finally:
                await store.close()

        reply, listing = asyncio.run(scenario())
        body = json.loads(reply.body_bytes())
        assert (reply.status, body) == (200, documented[0])
        assert list(body["signals"]) == sorted(documented[0]["signals"])  # in code order
        assert listing == documented[1]

    def test_a_vehicle_never_seen_is_404(self) -> None:
        status, body = read("0b9ab6c1-2b1a-4b85-8f53-3d4c2f1e0a99", stored(state_body(oem_ms=OEM_MS)))
        assert status == 404
        assert body == {
            "error": "no state for this vehicle: no VEHICLE_STATE or VEHICLE_ERROR of it has "
                     "been processed (or the store was emptied since)",
            "vehicleId": "0b9ab6c1-2b1a-4b85-8f53-3d4c2f1e0a99",
        }

    @pytest.mark.parametrize("why", sorted(MALFORMED))
    def test_a_malformed_vehicle_id_is_400_and_never_reaches_the_store(self, why: str) -> None:
        store = stored(state_body(oem_ms=OEM_MS))
        status, body = read(MALFORMED[why], store)
        assert status == 400
        assert "letters, digits, '-', '_', '.' or ':'" in body["error"]
        assert store.reads == []
        if MALFORMED[why]:  # what came is described, never repeated
            assert MALFORMED[why] not in body["error"]

    def test_the_400_says_what_came(self) -> None:
        assert vehicle_id_problem("a" * 129) is not None
        assert "got 129 characters" in (vehicle_id_problem("a" * 129) or "")
        assert "got an empty vehicleId" in (vehicle_id_problem("") or "")
        assert "got a character outside that set" in (vehicle_id_problem("a/b") or "")
        # At the length limit, a wrong character is what is wrong, not the length.
        assert "got a character outside that set" in (
            vehicle_id_problem("a" * (MAX_VEHICLE_ID_LENGTH - 1) + "/") or "")
        assert vehicle_id_problem("a" * 128) is None

    def test_the_operators_tools_take_any_id_a_store_keys(self) -> None:
        # `vehicles show` and the inspector: 1 to MAX_ID_CHARS characters of Unicode text.
        for usable in ("a/b#c?d\\e f", "\x1b[2J", "a" * 1024, "x"):
            assert stored_vehicle_id_problem(usable) is None, usable
        assert stored_vehicle_id_problem("") == "vehicleId must not be empty"
        assert "at most 1024 characters" in (stored_vehicle_id_problem("a" * 1025) or "")
        assert "got 1025" in (stored_vehicle_id_problem("a" * 1025) or "")
        assert stored_vehicle_id_problem("car\udcff") == (
            "vehicleId must be Unicode text (it holds a lone surrogate): no store keys it")

    def test_the_length_limit_is_the_interfaces(self) -> None:
        assert valid_vehicle_id("a" * MAX_VEHICLE_ID_LENGTH)
        assert not valid_vehicle_id("a" * (MAX_VEHICLE_ID_LENGTH + 1))

    def test_every_id_the_interface_admits_is_asked_for(self) -> None:
        for vehicle_id in (VEHICLE, "a" * 128, "A-z_0.9:x", "1"):
            store = stored()
            status, _ = read(vehicle_id, store)
            assert status == 404 and store.reads == [vehicle_id]

    def test_store_off_is_503_and_says_so_without_naming_a_setting(self) -> None:
        status, body = read(VEHICLE, None)
        assert status == 503
        assert body == {"error": "the vehicle state store is turned off for this app",
                        "store": "off"}
        assert "VEHICLE_STATE_STORE" not in json.dumps(body)

    def test_a_failing_store_is_503_unavailable_and_logged(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        store = failing_store()
        with caplog.at_level(logging.ERROR, logger="shared.vehicle_read"):
            status, body = read(VEHICLE, store)
        assert status == 503
        assert body == {"error": "the vehicle state store is unavailable; the app's logs say why",
                        "store": "unavailable"}
        (record,) = caplog.records
        assert record.levelno == logging.ERROR
        assert record.getMessage() == (
            "vehicle state store unavailable for a read: OSError: disk I/O error")
        assert not record.exc_info  # the traceback only when debugging

    def test_a_failing_store_logs_its_traceback_at_debug(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        store = failing_store()
        with caplog.at_level(logging.DEBUG, logger="shared.vehicle_read"):
            assert read(VEHICLE, store)[0] == 503
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.exc_info and record.exc_info[1] is store.fail_with

    def test_the_body_is_compact_utf8_json(self) -> None:
        # Vehicle data holds any text (a city in a location's address, an error description):
        # sent as UTF-8, not as \u escapes, with no spaces.
        reply = ReadReply(200, {"value": "Zürich", "codes": [1, 2]})
        assert reply.body_bytes() == '{"value":"Zürich","codes":[1,2]}'.encode()

    def test_the_malformed_check_comes_before_the_store_state(self) -> None:
        assert read("a/b", None)[0] == 400


class TestRouteTemplates:
    def test_a_parameter_is_one_whole_segment_percent_decoded(self) -> None:
        template = route_template("/api/vehicles/{vehicleId}")
        assert template is not None
        assert template.match("/api/vehicles/abc") == {"vehicleId": "abc"}
        assert template.match("/api/vehicles/a%2Fb") == {"vehicleId": "a/b"}
        assert template.match("/api/vehicles/a%23b") == {"vehicleId": "a#b"}
        assert template.match("/api/vehicles/") is None
        assert template.match("/api/vehicles/a/b") is None
        assert template.match("/api/vehicles") is None
        assert template.match("/api/vehicle/abc") is None
        assert template.match("/api/Vehicles/abc") is None

    def test_a_path_without_parameters_is_not_a_template(self) -> None:
        assert route_template("/api/webhooks/smartcar") is None

    @pytest.mark.parametrize("path", ["/api/vehicles/{id:int}", "/api/vehicles/{*rest}",
                                      "/api/vehicles/{id?}", "/api/v-{id}", "/api/{a}/{a}"])
    def test_what_the_local_host_cannot_serve_fails_at_start(self, path: str) -> None:
        with pytest.raises(ValueError, match="route"):
            route_template(path)

    def test_several_parameters(self) -> None:
        template = route_template("/api/{a}/x/{b}")
        assert template is not None
        assert template.match("/api/1/x/2") == {"a": "1", "b": "2"}
        assert template.match("/api/1/y/2") is None


class TestKeyComparison:
    def test_either_place_opens_and_nothing_else_does(self) -> None:
        assert has_key("k1", {"code": "k1"}, {})
        assert has_key("k1", {}, {"x-functions-key": "k1"})
        assert has_key("k1", {"code": "wrong"}, {"x-functions-key": "k1"})
        assert not has_key("k1", {}, {})
        assert not has_key("k1", {"code": "k1x"}, {"x-functions-key": "k"})
        assert not has_key("k1", {"code": ""}, {})
        assert not has_key("k1", {"code": "\udcff"}, {})

    def test_compared_in_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        seen = compare_digest_calls(monkeypatch, "shared.local.app_functions")
        assert has_key("k1", {"code": "k1"}, {"x-functions-key": "other"})
        # Both given values are compared, whichever matched.
        assert seen == [(b"k1", b"k1"), (b"other", b"k1")]


# -- over real HTTP, the local host ----------------------------------------------------------


class HostWithStore(RunningHost):
    """The running host and the store it was given, which the tests read back."""

    store: MemoryVehicleStore


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostWithStore]:
    store = stored(state_body(oem_ms=OEM_MS, soc=61), error_body())

    def install(runtime: Runtime) -> None:
        runtime.vehicle_state = store

    with HostWithStore(local_env(tmp_path), customize=install) as running:
        running.store = store
        yield running


def key_of(running: RunningHost) -> str:
    assert running.host is not None
    return running.host.function_key


class TestLocalHostOverHttp:
    def test_without_the_key_401_and_the_store_is_not_read(self, host: Any) -> None:
        for path, headers in ((f"/api/vehicles/{VEHICLE}", {}),
                              (f"/api/vehicles/{VEHICLE}?code=wrong", {}),
                              (f"/api/vehicles/{VEHICLE}", {"x-functions-key": "wrong"}),
                              (f"/api/vehicles/{VEHICLE}?code=", {})):
            response = http_request(host.port, "GET", path, headers=headers)
            assert response.status == 401, path
            assert "x-functions-key" in response.json()["error"]
            assert VEHICLE not in response.body.decode()
        # Even a malformed or unknown id answers 401 first: nothing is told without the key.
        assert http_request(host.port, "GET", "/api/vehicles/a%2Fb").status == 401
        assert http_request(host.port, "GET", "/api/vehicles/unknown").status == 401
        assert host.store.reads == []

    def test_with_the_key_as_code_200_and_the_vehicle(self, host: Any) -> None:
        response = http_request(host.port, "GET", f"/api/vehicles/{VEHICLE}?code={key_of(host)}")
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["vehicleId"] == VEHICLE
        assert body["signals"]["tractionbattery-stateofcharge"]["value"] == 61
        assert [e["code"] for e in body["errors"]] == ["VEHICLE_NOT_CAPABLE"]
        assert host.store.reads == [VEHICLE]

    def test_with_the_key_as_a_header_in_any_case(self, host: Any) -> None:
        for name in ("x-functions-key", "X-Functions-Key"):
            response = http_request(host.port, "GET", f"/api/vehicles/{VEHICLE}",
                                    headers={name: key_of(host)})
            assert response.status == 200, name

    def test_a_vehicle_never_seen_is_404(self, host: Any) -> None:
        response = http_request(host.port, "GET",
                                f"/api/vehicles/00000000-0000-4000-8000-000000000000"
                                f"?code={key_of(host)}")
        assert response.status == 404
        assert response.headers["content-type"] == "application/json"
        assert response.json()["vehicleId"] == "00000000-0000-4000-8000-000000000000"

    @pytest.mark.parametrize("raw", ["a%2Fb", "a%23b", "a%3Fb", "a%5Cb", "a%20b", "a%1Bb",
                                     "v%C3%A9hicule", "a" * 129])
    def test_a_malformed_vehicle_id_is_400(self, host: Any, raw: str) -> None:
        response = http_request(host.port, "GET", f"/api/vehicles/{raw}?code={key_of(host)}")
        assert response.status == 400, raw
        assert response.headers["content-type"] == "application/json"
        assert "letters, digits" in response.json()["error"]
        assert host.store.reads == []

    def test_the_store_off_is_503(self, tmp_path: Path) -> None:
        with RunningHost(local_env(tmp_path, VEHICLE_STATE_STORE="off")) as running:
            response = http_request(running.port, "GET",
                                    f"/api/vehicles/{VEHICLE}?code={key_of(running)}")
        assert response.status == 503
        assert response.json()["store"] == "off"

    def test_other_methods_are_405(self, host: Any) -> None:
        response = http_request(host.port, "POST", f"/api/vehicles/{VEHICLE}?code={key_of(host)}",
                                b"{}")
        assert response.status == 405
        assert response.headers["allow"] == "GET"

    def test_the_webhook_routes_and_health_stay_keyless(self, host: Any) -> None:
        body = state_body(oem_ms=OEM_MS + 1000)
        for path in ("/api/webhooks/smartcar", "/api/webhooks/smartcar/errors"):
            response = host.post(path, body, signed_headers(body))
            assert response.status == 200, path
        assert host.get("/api/health").status == 200
        wait_until(lambda: len(host.handled()) == 1)


class TestTheKeyInTheBanner:
    """The real `python -m shared.local`: the key it prints is the one it takes, per run."""

    KEY_LINE = re.compile(r"vehicle state: +http://127\.0\.0\.1:(\d+)/api/vehicles/<vehicleId>"
                          r"\?code=([A-Za-z0-9_-]{32})$", re.M)

    def test_the_printed_key_opens_the_route_and_changes_every_run(self, tmp_path: Path) -> None:
        keys = []
        for run in ("first", "second"):
            with HostProcess(tmp_path / run) as process:
                match = self.KEY_LINE.search(process.output())
                assert match is not None, process.output()
                assert int(match.group(1)) == process.port
                key = match.group(2)
                path = f"/api/vehicles/{VEHICLE}"
                assert http_request(process.port, "GET", path).status == 401
                # The local store is this host's; whatever its state, the key is accepted.
                assert http_request(process.port, "GET", f"{path}?code={key}").status != 401
                assert http_request(process.port, "GET", path,
                                    headers={"x-functions-key": key}).status != 401
                keys.append(key)
        assert keys[0] != keys[1]
        assert "x-functions-key" in process.output()


    # A key is 32 characters of base64url: any of them may be `-` or `_`, the last included.
    @pytest.mark.parametrize("key", ["k" * 32, "k" * 31 + "-", "-" * 32, "_" * 31 + "k"])
    def test_readme_transcripts_show_the_key_as_a_placeholder(self, key: str) -> None:
        from shared.local.command import banner
        from shared.settings import load_settings

        from .transcripts import normalise

        text = banner(load_settings(local_env(Path("/tmp/unused"))), "http://127.0.0.1:7071",
                      function_key=key)
        lines = [normalise(line) for line in text.splitlines()]
        assert "vehicle state: http://127.0.0.1:<port>/api/vehicles/<vehicleId>?code=<key>" in lines


def test_the_cli_entry_point_lists_the_vehicles_command() -> None:
    result = subprocess.run([sys.executable, "-m", "shared.cli", "vehicles", "--help"],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0
    assert "list" in result.stdout and "show" in result.stdout
