"""`python -m shared.cli vehicles list|show`: the vehicle state store from the command line.

The store is `MemoryVehicleStore` (tests/vehicle_fakes.py) handed out by the CLI's factory seam
(`vehicles_cli.open_store`, which the backends' factory stands behind), so the CLI's own work is
real: the settings it loads and passes, ordering, exit codes, the exact JSON, and human output
that escapes what the store holds (vehicle ids, values and error descriptions come from
outside, and a stored ESC or newline must not reach the operator's terminal raw).
"""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.cli import vehicles_cli
from shared.cli.commands import main
from shared.credentials import ProcessCredential
from shared.settings import Settings

from .support import local_env
from .test_cli_terminal_safety import unsafe_characters
from .vehicle_fakes import VEHICLE, MemoryVehicleStore, error_body, state_body

OEM_MS = 1_764_000_000_000
OTHER = "0b9ab6c1-2b1a-4b85-8f53-3d4c2f1e0a99"
HOSTILE_ID = "evil\x1b[2J\n" + "x" * 8  # stored: an authentic event may carry any vehicleId
HOSTILE_TEXT = "\x1bc\x07FAKE\r\n99  forged-row \u202egnp.exe"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = local_env(tmp_path)
    for name in ("ServiceBusConnection__fullyQualifiedNamespace", "KEY_VAULT_URI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


class Factory:
    """Stands where the backends' factory stands; records the settings it was given."""

    def __init__(self, store: MemoryVehicleStore | None) -> None:
        self.store = store
        self.settings: list[Settings] = []
        self.credentials: list[ProcessCredential] = []

    def __call__(self, settings: Settings, credential: ProcessCredential
                 ) -> MemoryVehicleStore | None:
        self.settings.append(settings)
        self.credentials.append(credential)
        return self.store


@pytest.fixture
def store(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> MemoryVehicleStore:
    memory = MemoryVehicleStore(clock=Clock())
    memory.apply_body(state_body(VEHICLE, oem_ms=OEM_MS, soc=40))
    memory.apply_body(error_body(VEHICLE))
    memory.apply_body(state_body(OTHER, oem_ms=OEM_MS, soc=90))  # updated last
    monkeypatch.setattr(vehicles_cli, "open_store", Factory(memory))
    return memory


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class TestList:
    def test_json_is_the_summaries_most_recently_updated_first(
        self, store: MemoryVehicleStore
    ) -> None:
        code, out, err = cli("vehicles", "list", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert [v["vehicleId"] for v in doc] == [OTHER, VEHICLE]
        assert [(v["signals"], v["openErrors"]) for v in doc] == [(2, 0), (2, 1)]
        expected = [s.to_json() for s in asyncio.run(store.list_vehicles())]
        assert doc == expected
        assert store.closed

    def test_human_table_with_open_errors(self, store: MemoryVehicleStore) -> None:
        code, out, _ = cli("vehicles", "list")
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split() == ["VEHICLE", "ID", "UPDATED", "SIGNALS", "OPEN", "ERRORS"]
        assert lines[1].split()[0] == OTHER and lines[1].split()[-2:] == ["2", "0"]
        assert lines[2].split()[0] == VEHICLE and lines[2].split()[-2:] == ["2", "1"]
        assert "2 vehicle(s), most recently updated first." in lines[3]

    def test_limit(self, store: MemoryVehicleStore) -> None:
        code, out, _ = cli("vehicles", "list", "--limit", "1", "--json")
        assert code == 0 and [v["vehicleId"] for v in json.loads(out)] == [OTHER]
        code, out, _ = cli("vehicles", "list", "--limit", "1")
        assert code == 0 and "the 1 most recently updated (raise --limit for more)" in out
        code, out, _ = cli("vehicles", "list", "--limit", "2")
        assert code == 0 and "2 vehicle(s), most recently updated first." in out
        assert "raise --limit" not in out
        code, _, err = cli("vehicles", "list", "--limit", "0")
        assert code == 2 and "--limit must be at least 1" in err

    @pytest.mark.parametrize("limit", ["1000001", "9223372036854775807", "10" * 20])
    def test_a_limit_beyond_the_bound_is_a_usage_error_on_the_real_store(
        self, env: dict[str, str], limit: str
    ) -> None:
        """SQLite binds 64-bit integers: a huge --limit was an OverflowError ("the vehicle
        state store failed"), now it is refused before any store is opened."""
        code, out, err = cli("vehicles", "list", "--limit", limit, "--json")
        assert code == 2, err
        assert "--limit must be at least 1 and at most 1000000" in json.loads(out)["error"]
        code, out, err = cli("vehicles", "list", "--limit", "1000000", "--json")
        assert (code, out.strip()) == (0, "[]"), err

    def test_an_empty_store(self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(vehicles_cli, "open_store", Factory(MemoryVehicleStore()))
        assert cli("vehicles", "list", "--json")[1].strip() == "[]"
        assert "No vehicle state yet" in cli("vehicles", "list")[1]


class TestShow:
    def test_json_is_exactly_what_the_read_route_answers(self, store: MemoryVehicleStore) -> None:
        code, out, err = cli("vehicles", "show", VEHICLE, "--json")
        assert code == 0, err
        view = asyncio.run(store.get_vehicle(VEHICLE))
        assert view is not None and json.loads(out) == view.to_json()
        assert json.loads(out)["signals"]["tractionbattery-stateofcharge"]["value"] == 40

    def test_human_output_lists_signals_and_open_errors(self, store: MemoryVehicleStore) -> None:
        code, out, _ = cli("vehicles", "show", VEHICLE)
        assert code == 0
        assert f"vehicleId    {VEHICLE}" in out
        signals = out.split("Signals:\n", 1)[1].split("Open errors:", 1)[0].splitlines()
        assert signals[0].split()[:3] == ["SIGNAL", "VALUE", "UNIT"]
        assert {line.split()[0] for line in signals[1:]} == {"charge-ischarging",
                                                             "tractionbattery-stateofcharge"}
        soc = next(line for line in signals if line.startswith("tractionbattery"))
        assert soc.split()[1:4] == ["40", "percent", "2025-11-24T16:00:00+00:00"]
        charging = next(line for line in signals if line.startswith("charge-ischarging"))
        assert charging.split()[1:3] == ["true", "-"]  # JSON's spelling; no unit
        errors = out.split("Open errors:\n", 1)[1].splitlines()
        assert errors[1].split()[:3] == ["COMPATIBILITY", "VEHICLE_NOT_CAPABLE", "1"]

    def test_a_vehicle_never_seen_fails_with_exit_1(self, store: MemoryVehicleStore) -> None:
        code, out, err = cli("vehicles", "show", "never-seen", "--json")
        assert code == 1
        assert "no state for vehicle never-seen" in err
        assert "no state for vehicle never-seen" in json.loads(out)["error"]

    def test_an_id_no_store_can_key_is_a_usage_error(self, store: MemoryVehicleStore) -> None:
        code, _, err = cli("vehicles", "show", "a" * 1025)
        assert code == 2 and "at most 1024 characters" in err
        code, _, err = cli("vehicles", "show", "")
        assert code == 2 and "must not be empty" in err
        code, _, err = cli("vehicles", "show", "car\udcff")  # argv bytes that are not UTF-8
        assert code == 2 and "Unicode" in err
        assert store.reads == []

    def test_any_id_a_store_keys_is_read(self, store: MemoryVehicleStore) -> None:
        # Not only the read route's characters: the CLI opens what `vehicles list` shows.
        code, _, err = cli("vehicles", "show", "fleet 7/a#b?c")
        assert code == 1 and "no state for vehicle fleet 7/a#b?c" in err
        assert store.reads == ["fleet 7/a#b?c"]


class TestTheStoreTheAppUses:
    def test_the_factory_gets_the_apps_settings_local(self, env: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        factory = Factory(MemoryVehicleStore())
        monkeypatch.setattr(vehicles_cli, "open_store", factory)
        assert cli("vehicles", "list")[0] == 0
        (settings,) = factory.settings
        assert settings.queue_backend == "local"
        assert settings.local_state_dir == Path(env["LOCAL_STATE_DIR"])

    def test_the_factory_gets_the_apps_settings_azure(self, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
        for name, value in {
            "KEY_VAULT_URI": "https://kv.vault.azure.net/",
            "SMARTCAR_TOKEN_SECRET_NAME": "smartcar-amt",
            "ServiceBusConnection__fullyQualifiedNamespace": "sb.servicebus.windows.net",
            "SERVICEBUS_QUEUE_NAME": "smartcar-events",
            "AzureWebJobsStorage__accountName": "stsmartcar",
            "LOCAL_STATE_DIR": str(tmp_path),
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("SMARTCAR_MANAGEMENT_TOKEN", raising=False)
        monkeypatch.delenv("AZURE_CLIENT_ID", raising=False)
        factory = Factory(MemoryVehicleStore())
        monkeypatch.setattr(vehicles_cli, "open_store", factory)
        assert cli("vehicles", "list")[0] == 0
        (settings,) = factory.settings
        assert settings.queue_backend == "servicebus"
        (credential,) = factory.credentials
        assert credential.kind == "default"  # the operator's own sign-in, no client id set
        monkeypatch.setenv("AZURE_CLIENT_ID", "0d9f2b4e-4d8e-4c1b-9d55-3f1b7d2a6c11")
        assert cli("vehicles", "list")[0] == 0
        assert factory.credentials[1].client_id == "0d9f2b4e-4d8e-4c1b-9d55-3f1b7d2a6c11"

    def test_store_off_fails_and_says_so(self, env: dict[str, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(vehicles_cli, "open_store", Factory(None))
        for argv in (("vehicles", "list"), ("vehicles", "show", VEHICLE)):
            code, _, err = cli(*argv)
            assert code == 1 and "turned off (VEHICLE_STATE_STORE=off)" in err

    def test_a_failing_store_is_one_line_and_the_store_is_closed(
        self, store: MemoryVehicleStore
    ) -> None:
        store.fail_with = OSError("database disk image is malformed")
        code, out, err = cli("vehicles", "show", VEHICLE, "--json")
        assert code == 1
        assert err.strip() == ("error: the vehicle state store failed: OSError: database disk "
                               "image is malformed")
        assert json.loads(out)["error"].startswith("the vehicle state store failed")
        assert "Traceback" not in err and store.closed

    def test_a_store_that_cannot_be_opened(self, env: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(settings: Settings, credential: ProcessCredential) -> Any:
            raise PermissionError("no access to the table")

        monkeypatch.setattr(vehicles_cli, "open_store", broken)
        code, _, err = cli("vehicles", "list")
        assert code == 1 and "PermissionError: no access to the table" in err


class TestTerminalSafety:
    @pytest.fixture
    def hostile(self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> MemoryVehicleStore:
        memory = MemoryVehicleStore()
        memory.apply_body(state_body(HOSTILE_ID, oem_ms=OEM_MS, soc=HOSTILE_TEXT))
        memory.apply_body(state_body(VEHICLE, oem_ms=OEM_MS, soc=HOSTILE_TEXT))
        memory.apply_body(error_body(VEHICLE, description=HOSTILE_TEXT))
        monkeypatch.setattr(vehicles_cli, "open_store", Factory(memory))
        return memory

    def test_list_escapes_cells_so_no_row_can_be_forged(self, hostile: MemoryVehicleStore) -> None:
        code, out, _ = cli("vehicles", "list")
        assert code == 0
        assert unsafe_characters(out.encode()) == []
        lines = out.splitlines()
        assert len(lines) == 4  # header, two rows, the count: the id's newline is escaped
        assert any("evil\\x1b[2J\\x0axxxxxxxx" in line for line in lines)

    def test_show_escapes_values_and_descriptions(self, hostile: MemoryVehicleStore) -> None:
        code, out, _ = cli("vehicles", "show", VEHICLE)
        assert code == 0
        assert unsafe_characters(out.encode()) == []
        assert "\\x1bc\\x07FAKE\\x0d\\x0a99  forged-row \\u202egnp.exe" in out
        assert "forged-row" not in "".join(line for line in out.splitlines()
                                           if line.startswith("99"))

    def test_json_stays_exact(self, hostile: MemoryVehicleStore) -> None:
        code, out, _ = cli("vehicles", "show", VEHICLE, "--json")
        assert code == 0
        doc = json.loads(out)
        assert doc["signals"]["tractionbattery-stateofcharge"]["value"] == HOSTILE_TEXT
        assert doc["errors"][0]["description"] == HOSTILE_TEXT
        code, out, _ = cli("vehicles", "list", "--json")
        assert code == 0
        assert HOSTILE_ID in [v["vehicleId"] for v in json.loads(out)]


class TestShowText:
    """`vehicles show`'s human output for what the simulator's events do not hold: text,
    objects with non-ASCII text, a signal in error, sub-second times, several open errors.
    The view is built directly and rendered with the CLI's own table."""

    def test_each_kind_of_value_and_status_reads_as_stored(self) -> None:
        from shared.cli.commands import _table
        from shared.vehicle_state import ErrorState, SignalState, VehicleView

        at = datetime(2026, 12, 3, 12, 0, 5, 123456, tzinfo=UTC)
        view = VehicleView(
            vehicle_id="car-1", updated_at=at,
            signals={
                "location-city": SignalState(code="location-city", value="Zürich",
                                             oem_updated_at=at, event_id="e1"),
                "location-point": SignalState(code="location-point",
                                              value={"name": "Köln", "lat": 50.9},
                                              oem_updated_at=at, event_id="e1"),
                "charge-limit": SignalState(code="charge-limit", status="error",
                                            error_type="COMPATIBILITY",
                                            error_code="VEHICLE_NOT_CAPABLE", event_id="e2"),
            },
            errors=[ErrorState(type="COMPATIBILITY", code=f"C{i}", state="OPEN", count=i + 1)
                    for i in range(2)])
        text = vehicles_cli.show_text(view, _table)
        fields = text.split("Signals:\n", 1)[0]
        assert "open errors  2" in fields and "signals      3" in fields
        assert "updatedAt    2026-12-03T12:00:05+00:00" in fields  # to the second
        rows = {line.split()[0]: line for line in text.split("Signals:\n", 1)[1]
                .split("Open errors:", 1)[0].splitlines()[1:]}
        assert rows["location-city"].split()[1] == "Zürich"  # text as it is, unquoted
        assert rows["location-point"].split()[1] == '{"name":"Köln","lat":50.9}'
        assert rows["charge-limit"].split()[-3:] == ["COMPATIBILITY", "VEHICLE_NOT_CAPABLE",
                                                     "e2"]
        assert rows["location-city"].split()[-2:] == ["ok", "e1"]
