"""The deployed package under the real `azure-functions-runtime`, driven over gRPC as the host does.

One session per run (tests/conftest.py `runtime`): the package that a publish ships, built by
`.funcignore` with only requirements.txt installed, loaded by the runtime in a worker process
that our minimal host (tests/functions_host) started. Service Bus and Key Vault are the fakes
of tests/fakes.py, installed in that process; everything between the gRPC messages and those
fakes is the runtime's and the app's own code. See docs/testing.md ("The real Functions runtime").
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import Distribution
from pathlib import Path
from typing import Any

import pathspec
import pytest
from packaging.requirements import Requirement

from shared.publisher import OutboundMessage
from shared.spill import FileSpillStore

from .conftest import FAILING_EVENT_TYPE
from .functions_host import package, rpc
from .functions_host.host import FUNCTION_KEY, HostStartError
from .functions_host.session import (
    NAMESPACE,
    QUEUE,
    SETTINGS,
    TOKEN,
    RuntimeSession,
    Sent,
    start_session,
)
from .support import WEBHOOK, encode, signed_headers, state_event

# The first test also waits for the session's installs and start; only the test is bounded.
pytestmark = pytest.mark.timeout(120, func_only=True)
KEY = {"x-functions-key": FUNCTION_KEY}


def post(runtime: RuntimeSession, body: bytes, headers: dict[str, str] | None = None,
         route: str = WEBHOOK) -> tuple[int, dict[str, object]]:
    response = runtime.host.http("POST", route, body, {**KEY, **(headers or {})})
    return response.status, response.json()


def git_candidates(root: Path) -> list[str]:
    """The checkout's tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, text=True, check=True)
    return [p for p in listed.stdout.splitlines() if (root / p).is_file()]


class TestTheWorkerRunsTheDeployedPackage:
    def test_the_runtime_is_the_packages_own_at_the_version_requirements_txt_allows(
        self, runtime: RuntimeSession
    ) -> None:
        site_packages = runtime.host.app_dir / package.SITE_PACKAGES
        (dist_info,) = site_packages.glob("azure_functions_runtime-*.dist-info")
        installed = Distribution.at(dist_info).version
        metadata = runtime.host.init_response.worker_metadata
        assert (metadata.runtime_name, metadata.runtime_version) == ("python", "3.13")
        assert metadata.worker_version == installed
        (line,) = [r for r in package.app_requirements() if r.startswith("azure-functions-runtime")]
        assert Requirement(line).specifier.contains(installed)

    def test_every_function_is_loaded_from_the_package_directory(
        self, runtime: RuntimeSession
    ) -> None:
        app_dir = str(runtime.host.app_dir)
        for fn in runtime.host.functions.values():
            assert fn.metadata.directory == app_dir
            assert fn.metadata.script_file == "function_app.py"
            assert fn.metadata.properties["worker_indexed"] == "True"

    def test_the_package_holds_what_funcignore_ships_and_nothing_local(
        self, runtime: RuntimeSession
    ) -> None:
        shipped = {p.relative_to(runtime.host.app_dir).as_posix()
                   for p in runtime.host.app_dir.rglob("*")
                   if p.is_file() and ".python_packages" not in p.parts}
        assert {"function_app.py", "host.json", "requirements.txt",
                "shared/receiver.py", "shared/processor.py"} <= shipped
        for prefix in ("shared/local/", "shared/cli/", "tests/", "benchmarks/", "infra/"):
            assert not any(p.startswith(prefix) for p in shipped), prefix
        assert not (runtime.host.app_dir / "shared" / "local").exists()

    def test_funcignore_is_read_as_git_reads_it(self, tmp_path: Path) -> None:
        """pathspec's reading of .funcignore and git's own matcher keep the same files, for
        the file as it is and with its directory patterns written with and without a trailing
        slash."""
        candidates = git_candidates(package.ROOT)
        kept: dict[str, list[str]] = {}
        for variant in ("as it is", "trailing slashes", "no trailing slashes"):
            lines = (package.ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
            if variant != "as it is":
                slash = "/" if variant == "trailing slashes" else ""
                lines = [line.rstrip("/") + slash if (package.ROOT / line).is_dir() else line
                         for line in lines]
            (tmp_path / ".funcignore").write_text("\n".join(lines) + "\n", encoding="utf-8")
            ignored = subprocess.run(
                ["git", "-c", f"core.excludesFile={tmp_path / '.funcignore'}", "check-ignore",
                 "--no-index", "--stdin"], cwd=package.ROOT, input="\n".join(candidates),
                capture_output=True, text=True, check=False)
            assert ignored.returncode in (0, 1), ignored.stderr
            by_git = sorted(set(candidates) - set(ignored.stdout.split()))
            spec = pathspec.GitIgnoreSpec.from_lines(lines)
            by_pathspec = sorted(p for p in candidates if not spec.match_file(p))
            assert by_pathspec == by_git, variant
            assert "function_app.py" in by_git and "shared/local/host.py" not in by_git
            kept[variant] = by_git
        assert kept["as it is"] == kept["trailing slashes"] == kept["no trailing slashes"]
        # The package builder's walk (which never enters an excluded directory) agrees too.
        assert sorted(set(package.package_files()) & set(candidates)) == kept["as it is"]

    def test_the_worker_imports_the_package_and_nothing_else_of_ours(
        self, runtime: RuntimeSession
    ) -> None:
        app_dir = str(runtime.host.app_dir)
        found = runtime.worker_imports()["found"]
        for module in ("function_app", "shared", "azure.functions", "azure_functions_runtime"):
            assert found[module] and found[module].startswith(app_dir), (module, found[module])
        # Not deployed, or development-only: not importable where the app runs.
        for module in ("shared.local", "shared.cli", "tests", "pytest", "hypothesis", "uvloop",
                       "grpc_tools", "smartcar", "selenium", "mutmut"):
            assert found[module] is None, (module, found[module])
        checkout = str(package.ROOT)
        assert [p for p in runtime.worker_imports()["sysPath"]
                if p == checkout or p.startswith(f"{checkout}/.venv")] == []


class TestIndexing:
    """The metadata the runtime indexes from function_app.py, as the host receives it."""

    def test_the_seven_functions_and_their_triggers(self, runtime: RuntimeSession) -> None:
        assert {name: fn.trigger["type"] for name, fn in runtime.host.functions.items()} == {
            "smartcar_webhook": "httpTrigger",
            "smartcar_error_webhook": "httpTrigger",
            "health": "httpTrigger",
            "vehicle_state": "httpTrigger",
            "process_event": "serviceBusTrigger",
            "redrive_spilled": "timerTrigger",
            "prune_vehicle_inbox": "timerTrigger",
        }

    def test_http_routes_methods_auth_levels_and_return_binding(
        self, runtime: RuntimeSession
    ) -> None:
        functions = runtime.host.functions
        declared = {name: (functions[name].trigger["route"], functions[name].trigger["methods"],
                           functions[name].trigger["authLevel"])
                    for name in ("smartcar_webhook", "smartcar_error_webhook", "health",
                                 "vehicle_state")}
        assert declared == {
            "smartcar_webhook": ("webhooks/smartcar", ["POST"], "FUNCTION"),
            "smartcar_error_webhook": ("webhooks/smartcar/errors", ["POST"], "FUNCTION"),
            "health": ("health", ["GET"], "ANONYMOUS"),
            "vehicle_state": ("vehicles/{vehicleId}", ["GET"], "FUNCTION"),
        }
        for name in declared:
            bindings = functions[name].metadata.bindings
            assert bindings["$return"].type == "http"
            assert bindings["$return"].direction == runtime.host.pb.BindingInfo.out

    def test_the_queue_trigger_reads_the_queue_the_receiver_sends_to(
        self, runtime: RuntimeSession
    ) -> None:
        trigger = runtime.host.functions["process_event"].trigger
        assert (trigger["queueName"], trigger["connection"]) == (
            "%SERVICEBUS_QUEUE_NAME%", "ServiceBusConnection")
        listener = runtime.host.listeners["process_event"]
        event = state_event()
        body = encode(event)
        assert post(runtime, body, signed_headers(body, TOKEN))[0] == 200
        (sent,) = runtime.sent_with_id(event["eventId"])
        # The receiver's queue and namespace are the trigger's: its queue setting resolved, and
        # its connection's identity-based namespace setting.
        assert sent.queue == listener["queueName"] == QUEUE
        assert sent.namespace == runtime.host.settings[
            f"{listener['connection']}__fullyQualifiedNamespace"] == NAMESPACE

    @pytest.mark.parametrize(("name", "schedule"), [
        ("redrive_spilled", "0 */1 * * * *"), ("prune_vehicle_inbox", "0 17 * * * *")])
    def test_the_timers_run_on_their_schedule_not_on_startup(
        self, runtime: RuntimeSession, name: str, schedule: str
    ) -> None:
        trigger = runtime.host.functions[name].trigger
        assert trigger["schedule"] == schedule
        assert trigger.get("runOnStartup", False) is False

    def test_an_unset_queue_setting_stops_the_host_as_in_azure(
        self, tmp_path: Path, functions_cache: Path, runtime_protos: rpc.Protos
    ) -> None:
        with pytest.raises(HostStartError, match="app setting 'SERVICEBUS_QUEUE_NAME' is not set"):
            start_session(tmp_path, functions_cache, protos=runtime_protos,
                          settings={"SERVICEBUS_QUEUE_NAME": ""})


class TestHttpTrigger:
    def test_an_accepted_event_is_sent_to_service_bus_as_received(
        self, runtime: RuntimeSession
    ) -> None:
        event = state_event()
        body = encode(event)
        status, reply = post(runtime, body, signed_headers(body, TOKEN))
        assert (status, reply) == (200, {"status": "accepted", "eventId": event["eventId"]})
        (sent,) = runtime.sent_with_id(event["eventId"])
        assert sent.body == body
        assert sent.content_type == "application/json"
        assert sent.application_properties["eventType"] == "VEHICLE_STATE"
        assert sent.application_properties["vehicleId"] == event["data"]["vehicle"]["id"]

    def test_the_invocations_trace_context_travels_with_the_message(
        self, runtime: RuntimeSession
    ) -> None:
        trace_id = uuid.uuid4().hex
        event = state_event()
        body = encode(event)
        response = runtime.host.http("POST", WEBHOOK, body, {**KEY, **signed_headers(body, TOKEN)},
                                     trace_parent=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
        assert response.status == 200
        (sent,) = runtime.sent_with_id(event["eventId"])
        # The processor continues the receiver's trace from these properties.
        assert sent.application_properties["traceparent"].split("-")[1] == trace_id
        assert sent.application_properties["Diagnostic-Id"] == sent.application_properties[
            "traceparent"]

    def test_function_routes_need_the_key_and_health_does_not(
        self, runtime: RuntimeSession
    ) -> None:
        body = encode(state_event())
        assert runtime.host.http("POST", WEBHOOK, body, signed_headers(body, TOKEN)).status == 401
        assert runtime.host.http("GET", "/api/health").status == 200

    def test_the_vehicle_route_takes_its_id_from_the_route_and_needs_the_key(
        self, runtime: RuntimeSession
    ) -> None:
        # The session runs with the store off (no storage account): a well-formed id reaches
        # the store step and gets its 503; a malformed one is refused before it, as locally.
        assert runtime.host.http("GET", "/api/vehicles/car-1").status == 401
        off = runtime.host.http("GET", "/api/vehicles/car-1", headers=KEY)
        assert (off.status, off.json().get("store")) == (503, "off")
        bad = runtime.host.http("GET", "/api/vehicles/car%231", headers=KEY)
        assert bad.status == 400
        assert "car#1" not in bad.body.decode()

    def test_the_token_comes_from_key_vault_so_another_one_is_refused(
        self, runtime: RuntimeSession
    ) -> None:
        body = encode(state_event())
        assert post(runtime, body, signed_headers(body, "local-dev-management-token"))[0] == 401

    def test_no_payload_or_signature_reaches_the_logs_above_debug(
        self, runtime: RuntimeSession
    ) -> None:
        """The worker forwards INFO and above to the host (Application Insights in Azure):
        none of it may hold a location or a signature, whichever function logged."""
        event = state_event()
        where = {"latitude": 37.774912345, "longitude": -122.419445678}
        event["data"]["signals"].append({
            "code": "location-preciselocation", "name": "PreciseLocation", "group": "Location",
            "body": where, "meta": {"oemUpdatedAt": 1731940328000}})
        body = encode(event)
        signature = signed_headers(body, TOKEN)["SC-Signature"]
        assert post(runtime, body, signed_headers(body, TOKEN))[0] == 200
        assert post(runtime, body, {"SC-Signature": signature[::-1]})[0] == 401
        assert runtime.host.deliver(body, message_id=event["eventId"]).succeeded
        failing = encode({**event, "eventType": FAILING_EVENT_TYPE})
        assert runtime.host.deliver(failing, message_id=str(uuid.uuid4())).succeeded
        (_retry,) = runtime.sent_with_id(f"{event['eventId']}:retry:2")  # its failure was logged
        messages = [log.message for log in runtime.host.logs]
        assert any(event["eventId"] in m for m in messages), "the app's records reach the host"
        secrets = ("37.774912345", "122.419445678", signature, signature[::-1], TOKEN + '"')
        assert [m for m in messages if any(secret in m for secret in secrets)] == []


def copies_of(runtime: RuntimeSession, event_id: str) -> list[Sent]:
    """What the processor sent to Service Bus about one event: a dead-letter copy, or a
    retry's scheduled copy (`scheduled_enqueue_time_utc` set)."""
    return [s for s in runtime.sent() if s.message_id.startswith(event_id)]


#: The session's MAX_DELIVERY_COUNT, and the backoff after each failed attempt that its
#: RETRY_BACKOFF_BASE_SECONDS (0.01) and RETRY_BACKOFF_MAX_SECONDS (0.05) give: doubling, capped.
MAX_DELIVERY_COUNT = int(SETTINGS["MAX_DELIVERY_COUNT"])
BACKOFF = {1: 0.01, 2: 0.02, 3: 0.04, 4: 0.05}


def history(sent: Sent) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(sent.application_properties["attemptHistory"])
    return entries


def scheduled_at(sent: Sent) -> datetime:
    assert sent.scheduled_enqueue_time_utc is not None, sent.message_id
    return datetime.fromisoformat(sent.scheduled_enqueue_time_utc)


def failed_at(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["failedAt"])


def assert_retry_copy(copy: Sent, event_id: str, *, attempt: int, body: bytes) -> None:
    """`copy` is the scheduled copy that is attempt `attempt` of the event: the same body on
    the same queue, its id derived from the eventId and the attempt, due later, not a
    dead-letter copy."""
    assert copy.message_id == f"{event_id}:retry:{attempt}"
    assert (copy.body, copy.queue, copy.namespace) == (body, QUEUE, NAMESPACE)
    assert copy.content_type == "application/json"
    assert copy.application_properties["attempt"] == str(attempt)
    assert len(history(copy)) == attempt - 1
    assert scheduled_at(copy).utcoffset() == timedelta(0)
    assert copy.time_to_live_seconds is None
    assert "deadLetterReason" not in copy.application_properties


class TestServiceBusTrigger:
    def test_a_handled_event_completes_and_sends_nothing(self, runtime: RuntimeSession) -> None:
        event = state_event()
        result = runtime.host.deliver(encode(event), message_id=event["eventId"],
                                      properties={"eventType": "VEHICLE_STATE"})
        assert result.succeeded, result.error  # the host completes the message
        assert copies_of(runtime, event["eventId"]) == []

    def test_a_handler_failure_schedules_one_copy_and_the_original_completes(
        self, runtime: RuntimeSession
    ) -> None:
        """The retry is the queue's: the invocation succeeds (the host completes the original)
        and the next attempt is one copy sent through Service Bus, scheduled for after the
        backoff. What was sent is checked, not how long anything waited."""
        event = state_event(eventType=FAILING_EVENT_TYPE)
        body = encode(event)
        before = datetime.now(UTC)
        result = runtime.host.deliver(body, message_id=event["eventId"],
                                      properties={"eventType": FAILING_EVENT_TYPE})
        after = datetime.now(UTC)
        assert result.succeeded, result.error  # completed, not abandoned
        (copy,) = copies_of(runtime, event["eventId"])
        assert_retry_copy(copy, event["eventId"], attempt=2, body=body)
        assert copy.application_properties["eventType"] == FAILING_EVENT_TYPE  # carried over
        (failed,) = history(copy)
        assert failed["attempt"] == 1 and failed["error"] == "HandlerFailure"
        due = scheduled_at(copy)
        assert before + timedelta(seconds=BACKOFF[1]) <= due
        assert due <= after + timedelta(seconds=BACKOFF[1])

    def test_each_failed_copy_schedules_the_next_and_the_last_is_dead_lettered_with_history(
        self, runtime: RuntimeSession
    ) -> None:
        """Each copy is delivered again as the broker would once it is due (a new message:
        delivery count 1); the handler still fails, so attempt n schedules attempt n + 1 with
        a longer backoff, until attempt MAX_DELIVERY_COUNT (5 here) is dead-lettered."""
        event = state_event(eventType=FAILING_EVENT_TYPE)
        body = encode(event)
        message_id: str = event["eventId"]
        properties: dict[str, Any] = {}
        for attempt in range(1, MAX_DELIVERY_COUNT):
            result = runtime.host.deliver(body, message_id=message_id, properties=properties)
            assert result.succeeded, (attempt, result.error)
            (copy,) = [c for c in copies_of(runtime, event["eventId"])
                       if c.message_id == f"{event['eventId']}:retry:{attempt + 1}"]
            assert_retry_copy(copy, event["eventId"], attempt=attempt + 1, body=body)
            entries = history(copy)
            assert [e["attempt"] for e in entries] == list(range(1, attempt + 1))
            # Due the backoff of this attempt after it failed (failedAt is in milliseconds).
            delay = (scheduled_at(copy) - failed_at(entries[-1])).total_seconds()
            assert delay == pytest.approx(BACKOFF[attempt], abs=0.0011), attempt
            message_id, properties = copy.message_id, copy.application_properties
        result = runtime.host.deliver(body, message_id=message_id, properties=properties)
        assert result.succeeded, result.error  # the last copy is completed too ...
        copies = copies_of(runtime, event["eventId"])
        assert [c.message_id for c in copies] == [
            *(f"{event['eventId']}:retry:{n}" for n in range(2, MAX_DELIVERY_COUNT + 1)),
            f"{event['eventId']}:retry:{MAX_DELIVERY_COUNT}:dead-letter"]
        # ... and its dead-letter copy (expiring into the dead-letter queue) carries the reason
        # and every failed attempt.
        dead = copies[-1]
        assert dead.body == body and dead.queue == QUEUE
        assert dead.scheduled_enqueue_time_utc is None
        assert dead.time_to_live_seconds == 1.0
        assert dead.application_properties["deadLetterReason"] == "MaxDeliveryCountExceeded"
        entries = history(dead)
        assert [e["attempt"] for e in entries] == list(range(1, MAX_DELIVERY_COUNT + 1))
        assert {e["error"] for e in entries} == {"HandlerFailure"}
        description = dead.application_properties["deadLetterDescription"]
        assert f"{MAX_DELIVERY_COUNT} delivery attempts" in description
        assert all(e["failedAt"] in description for e in entries)

    def test_a_redelivered_original_schedules_a_copy_with_the_same_id(
        self, runtime: RuntimeSession
    ) -> None:
        """A crash between the copy's send and the original's completion: Service Bus delivers
        the original again. Its copy has the same messageId, so the queue's duplicate
        detection drops it and the event is retried once, not twice."""
        event = state_event(eventType=FAILING_EVENT_TYPE)
        body = encode(event)
        for delivery_count in (1, 2):
            result = runtime.host.deliver(body, message_id=event["eventId"],
                                          delivery_count=delivery_count)
            assert result.succeeded, result.error
        first, second = copies_of(runtime, event["eventId"])
        assert first.message_id == second.message_id == f"{event['eventId']}:retry:2"
        for copy in (first, second):
            assert_retry_copy(copy, event["eventId"], attempt=2, body=body)

    def test_the_attempt_is_the_messages_own_not_the_brokers_delivery_count(
        self, runtime: RuntimeSession
    ) -> None:
        """An original delivered for the fifth time (its earlier invocations crashed before
        settling) has had one handler failure recorded: it is retried, not dead-lettered."""
        event = state_event(eventType=FAILING_EVENT_TYPE)
        body = encode(event)
        result = runtime.host.deliver(body, message_id=event["eventId"],
                                      delivery_count=MAX_DELIVERY_COUNT)
        assert result.succeeded, result.error
        (copy,) = copies_of(runtime, event["eventId"])
        assert_retry_copy(copy, event["eventId"], attempt=2, body=body)

    def test_a_poison_message_is_dead_lettered_through_service_bus(
        self, runtime: RuntimeSession
    ) -> None:
        message_id = f"poison-{uuid.uuid4()}"
        body = b'{"eventId": "' + message_id.encode() + b'", "data": '
        result = runtime.host.deliver(body, message_id=message_id,
                                      properties={"eventId": message_id})
        assert result.succeeded, result.error  # the original is completed ...
        (copy,) = runtime.sent_with_id(f"{message_id}:dead-letter")
        # ... and a copy that expires into the dead-letter queue carries the reason.
        assert copy.body == body and copy.queue == QUEUE
        assert copy.application_properties["deadLetterReason"] == "InvalidPayload"
        assert copy.application_properties["deadLetterDescription"]
        assert copy.time_to_live_seconds == 1.0

    def test_a_dead_letter_copy_delivered_before_it_expires_is_refused(
        self, runtime: RuntimeSession
    ) -> None:
        message_id = f"copy-{uuid.uuid4()}:dead-letter"
        result = runtime.host.deliver(encode(state_event()), message_id=message_id,
                                      properties={"deadLetterReason": "InvalidPayload"})
        assert not result.succeeded and "dead-letter copy" in result.error
        assert runtime.sent_with_id(message_id) == []


class TestTimerTrigger:
    def test_the_timer_sends_what_was_spilled_back_to_the_queue(
        self, runtime: RuntimeSession
    ) -> None:
        event = state_event()
        spilled = OutboundMessage(encode(event), event["eventId"], {"eventId": event["eventId"]})
        store = FileSpillStore(runtime.state_dir / "spill")
        asyncio.run(store.put(spilled))
        result = runtime.host.fire_timer("redrive_spilled", past_due=True)
        assert result.succeeded, result.error
        (sent,) = runtime.sent_with_id(event["eventId"])
        assert (sent.body, sent.queue) == (spilled.body, QUEUE)
        assert sent.application_properties == {"eventId": event["eventId"]}
        assert asyncio.run(store.names(limit=10)) == []
        assert json.loads(result.response.return_value.json or "null") is None

    def test_the_inbox_prune_timer_runs_and_with_the_store_off_has_nothing_to_do(
        self, runtime: RuntimeSession
    ) -> None:
        result = runtime.host.fire_timer("prune_vehicle_inbox", past_due=True)
        assert result.succeeded, result.error
        assert json.loads(result.response.return_value.json or "null") is None


class TestTheHostBesideOtherTests:
    def test_processes_forked_while_the_host_runs_start_cleanly(
        self, runtime: RuntimeSession
    ) -> None:
        """Other tests fork from this process (`preexec_fn`) while the host's gRPC server and
        channel are alive. With gRPC's fork handlers on, about one such child in ten died of
        SIGSEGV before its exec (tests/functions_host/__init__.py turns them off)."""
        assert runtime.host.http("GET", "/api/health").status == 200  # gRPC is busy and alive
        true = shutil.which("true")
        assert true is not None
        codes = [subprocess.Popen([true], preexec_fn=lambda: None).wait() for _ in range(60)]
        assert codes == [0] * 60
