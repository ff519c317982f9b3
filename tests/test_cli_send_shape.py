"""`send` shapes the event it signs, and the CLI says which queue it reads and what to do when
the host cannot be reached. Against the real local host over loopback and the real queue."""

from __future__ import annotations

import io
import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.cli import commands as cli
from shared.cli.simulate import Shape, build_event, parse_signal_setting, parse_timestamp_ms
from shared.events import parse_event
from shared.handlers import HandlerRegistry
from shared.local.command import banner
from shared.settings import load_settings

from .support import WEBHOOK, RunningHost, local_env, wait_until


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = local_env(tmp_path)
    monkeypatch.delenv("ServiceBusConnection__fullyQualifiedNamespace", raising=False)
    monkeypatch.delenv("KEY_VAULT_URI", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


class Seen:
    """Every VEHICLE_STATE the real processor hands to a handler."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.registry = HandlerRegistry()

        @self.registry.on("VEHICLE_STATE")
        def handle(event: Any, context: Any) -> None:
            self.events.append(event)


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def host(env: dict[str, str], seen: Seen) -> Any:
    with RunningHost(env, registry=seen.registry) as running:
        yield running


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def url(port: int, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port}{WEBHOOK}"


def signals_of(body: bytes) -> dict[str, dict[str, Any]]:
    event = json.loads(body)
    return {f"{s['group']}.{s['name']}": s for s in event["data"]["signals"]}


class TestShapingTheEvent:
    def test_ids_signals_and_oem_time_reach_the_handler(self, host: RunningHost,
                                                        seen: Seen) -> None:
        code, out, err = run(
            "send", "--url", url(host.port), "--event-id", "evt-shaped-1",
            "--vehicle-id", "car-42", "--set", "TractionBattery.StateOfCharge=12",
            "--set", "Charge.IsCharging=false", "--set", "Location.IsAtHome=true",
            "--set", "Charge.State=Charging", "--oem-updated-at", "2026-01-31T08:00:00Z", "--json")
        assert code == 0, err
        assert json.loads(out)["response"] == {"status": "accepted", "eventId": "evt-shaped-1"}
        wait_until(lambda: len(seen.events) == 1)
        event = seen.events[0]
        assert (event.event_id, event.vehicle_id) == ("evt-shaped-1", "car-42")
        values = {s.path: s.value for s in event.signals}
        assert values["TractionBattery.StateOfCharge"] == 12
        assert values["Charge.IsCharging"] is False
        assert values["Location.IsAtHome"] is True  # was an error signal in the template
        assert values["Charge.State"] == "Charging"  # not JSON: kept as the string given
        when = datetime(2026, 1, 31, 8, 0, tzinfo=UTC)
        assert {s.oem_updated_at for s in event.signals} == {when}

    def test_the_same_event_id_twice_is_a_duplicate(self, host: RunningHost) -> None:
        first = run("send", "--url", url(host.port), "--event-id", "evt-twice", "--json")
        second = run("send", "--url", url(host.port), "--event-id", "evt-twice", "--json")
        assert json.loads(first[1])["response"]["status"] == "accepted"
        assert json.loads(second[1])["response"] == {"status": "duplicate",
                                                     "eventId": "evt-twice"}

    def test_an_existing_signal_keeps_its_unit_and_a_new_one_is_added(self) -> None:
        shape = Shape(signals=(("TractionBattery", "StateOfCharge", 12),
                               ("Odometer", "TraveledDistance", {"value": 5, "unit": "km"})))
        signals = signals_of(build_event("state", shape=shape, now_ms=1_800_000_000_000))
        assert signals["TractionBattery.StateOfCharge"]["body"] == {"unit": "percent",
                                                                    "value": 12}
        added = signals["Odometer.TraveledDistance"]
        assert added["code"] == "odometer-traveleddistance"
        assert added["body"] == {"value": 5, "unit": "km"}
        assert added["meta"]["oemUpdatedAt"] == 1_800_000_000_000 - 2000
        event = json.loads(build_event("state", shape=shape))
        assert event["meta"]["signalCount"] == 4
        assert parse_event(build_event("state", shape=shape)).vehicle_id == event["vehicleId"]

    def test_vehicle_id_shapes_an_error_event_too(self) -> None:
        event = json.loads(build_event("error", shape=Shape(vehicle_id="car-7")))
        assert event["vehicleId"] == "car-7"
        assert event["data"]["vehicle"]["id"] == "car-7"

    def test_without_shaping_the_template_is_unchanged(self) -> None:
        event = json.loads(build_event("state", now_ms=1_800_000_000_000))
        assert event["vehicleId"] == "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"
        assert len(event["data"]["signals"]) == 3
        assert event["meta"]["signalCount"] == 3
        assert "status" in signals_of(json.dumps(event).encode())["Location.IsAtHome"]

    @pytest.mark.parametrize(("given", "expected"), [
        ("1769846400000", 1769846400000),
        ("2026-01-31T08:00:00Z", 1769846400000),
        ("2026-01-31T09:00:00+01:00", 1769846400000),
    ])
    def test_oem_updated_at_reads_epoch_ms_and_iso(self, given: str, expected: int) -> None:
        assert parse_timestamp_ms(given) == expected

    @pytest.mark.parametrize(("given", "says"), [
        ("yesterday", "epoch milliseconds or an ISO-8601 time"),
        ("2026-01-31T08:00:00", "has no UTC offset"),
    ])
    def test_a_bad_oem_time_is_a_usage_error(self, env: dict[str, str], given: str,
                                             says: str) -> None:
        code, _, err = run("send", "--url", url(1), "--oem-updated-at", given)
        assert code == 2
        assert says in err

    @pytest.mark.parametrize("given", ["StateOfCharge=12", "TractionBattery.StateOfCharge",
                                       ".Name=1", "Group.=1", "A.B.C=1"])
    def test_a_bad_set_is_a_usage_error(self, env: dict[str, str], given: str) -> None:
        with pytest.raises(ValueError, match=r"Group\.Name=value"):
            parse_signal_setting(given)
        code, _, err = run("send", "--url", url(1), "--set", given)
        assert code == 2
        assert "--set expects Group.Name=value" in err

    @pytest.mark.parametrize("given", ["NaN", "Infinity", "-Infinity", "1e999",
                                       '{"value": NaN}', "[1, Infinity]"])
    def test_a_value_that_is_not_json_is_refused_not_signed(self, env: dict[str, str],
                                                            given: str) -> None:
        """Python's json reads NaN and Infinity; the body signed with them was not JSON, so
        the receiver accepted it and the processor dead-lettered it InvalidPayload."""
        code, out, err = run("send", "--url", url(1), "--set",
                             f"TractionBattery.StateOfCharge={given}", "--json")
        assert code == 2, err
        assert "are not JSON" in json.loads(out)["error"]

    def test_nan_in_quotes_is_text(self) -> None:
        assert parse_signal_setting('Vehicle.Nickname="NaN"') == ("Vehicle", "Nickname", "NaN")

    @pytest.mark.parametrize("given", ["²", "-²", "--5"])
    def test_digits_int_refuses_are_a_usage_error_naming_the_option(
        self, env: dict[str, str], given: str
    ) -> None:
        code, _, err = run("send", "--url", url(1), f"--oem-updated-at={given}")
        assert code == 2 and "--oem-updated-at expects epoch milliseconds" in err

    def test_a_value_with_an_equals_sign_is_kept_whole(self) -> None:
        assert parse_signal_setting("Vehicle.Nickname=a=b") == ("Vehicle", "Nickname", "a=b")

    @pytest.mark.parametrize(("argv", "says"), [
        (["--type", "verify", "--vehicle-id", "car"], "a VERIFY event has no vehicle"),
        (["--type", "error", "--set", "A.B=1"], "shape the signals of --type state"),
        (["--type", "error", "--oem-updated-at", "0"], "shape the signals of --type state"),
        # 0 is a time (the epoch), refused for VERIFY like 1, not ignored as falsy.
        (["--type", "verify", "--oem-updated-at", "0"], "a VERIFY event has no vehicle"),
        (["--type", "verify", "--oem-updated-at", "1"], "a VERIFY event has no vehicle"),
        (["--file", "x.json", "--event-id", "e"], "--file sends its bytes as they are"),
        (["--event-id", " "], "--event-id must not be empty"),
        (["--vehicle-id", ""], "--vehicle-id must not be empty"),
    ])
    def test_options_that_cannot_apply_are_refused(self, env: dict[str, str], argv: list[str],
                                                   says: str) -> None:
        code, out, err = run("send", "--url", url(1), *argv)
        assert (code, out) == (2, "")
        assert says in err


class TestUnreachable:
    def test_connection_refused_says_check_make_run_and_the_port(self, env: dict[str, str]) -> None:
        with socket.socket() as sock:  # a port that nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        code, _, err = run("send", "--url", url(port))
        assert code == 1
        assert f"connection refused (nothing listens on 127.0.0.1:{port})" in err
        assert f"Is `make run` running, and on port {port}?" in err

    def test_refused_by_a_remote_host_does_not_mention_make_run(self) -> None:
        from shared.cli.simulate import unreachable

        text = unreachable("http://10.0.0.9:8080/api/webhooks/smartcar?code=k",
                           ConnectionRefusedError())
        assert "nothing listens on 10.0.0.9:8080" in text
        assert "make run" not in text
        assert "code=REDACTED" in text

    def test_https_to_the_local_host_says_it_speaks_http(self, host: RunningHost) -> None:
        code, _, err = run("send", "--url", url(host.port, "https"))
        assert code == 1
        assert "The local host speaks plain HTTP: use " + url(host.port) in err
        assert host.runtime.queue.stats()["active"] == 0


class TestWhichQueue:
    def test_stats_names_the_local_queue_file(self, env: dict[str, str], tmp_path: Path,
                                              host: RunningHost) -> None:
        code, out, _ = run("stats")
        assert code == 0
        assert out == (f"the local queue {tmp_path / 'queue.sqlite3'}: active 0, "
                       "dead-lettered 0, scheduled 0\n")
        assert json.loads(run("stats", "--json")[1]) == {"active": 0, "deadLettered": 0,
                                                         "scheduled": 0}

    def test_an_empty_dlq_names_its_queue(self, env: dict[str, str], tmp_path: Path,
                                          host: RunningHost) -> None:
        code, out, _ = run("dlq", "list")
        assert code == 0
        assert out == f"The dead-letter queue of the local queue {tmp_path / 'queue.sqlite3'} is empty.\n"


class TestBanner:
    def test_the_host_verifies_and_only_the_cli_signs(self, tmp_path: Path) -> None:
        env = {k: v for k, v in local_env(tmp_path).items() if k != "SMARTCAR_MANAGEMENT_TOKEN"}
        dev = banner(load_settings(env), "http://127.0.0.1:7071")
        assert ("Verifies signatures with the development token 'local-dev-management-token' "
                "(SMARTCAR_MANAGEMENT_TOKEN is unset)") in dev
        assert "Signing token" not in dev
        own = banner(load_settings({**local_env(tmp_path), "SMARTCAR_MANAGEMENT_TOKEN": "t" * 32}),
                     "http://127.0.0.1:7071")
        assert "Verifies signatures with the token in SMARTCAR_MANAGEMENT_TOKEN." in own

    def test_on_every_interface_the_urls_are_not_called_this_machine_only(
            self, tmp_path: Path) -> None:
        settings = load_settings(local_env(tmp_path))
        loopback = banner(settings, "http://127.0.0.1:7071")
        assert "Local URLs (this machine only: Smartcar cannot reach them):" in loopback
        everywhere = banner(settings, "http://0.0.0.0:7071")
        assert "this machine only" not in everywhere
        assert ("URLs (listening on every interface: reachable from your network, not by "
                "Smartcar, which needs public HTTPS):") in everywhere
        one = banner(settings, "http://192.168.1.5:7071")
        assert "URLs (listening on 192.168.1.5: not reachable by Smartcar" in one
