"""The functions as the Python worker calls them: trigger objects built by azure-functions.

The Python worker turns the host's gRPC data into `Datum`s and hands them, with the trigger
metadata, to the converter that the azure-functions library registers for the binding type
(`get_binding_registry().get(type)` then `decode(datum, trigger_metadata=...)`, see
azure_functions_worker/bindings/meta.py). These tests do the same with host-shaped data: the
binding types come from the app's own index, the converters are the library's, and only the
gRPC layer is left out. Then they call the functions in function_app.py and check the outcome.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.functions import _abc, meta

from shared.local.adapters import HandledLog
from shared.publisher import OutboundMessage
from shared.runtime import Runtime, build_runtime, set_runtime
from shared.settings import load_settings

from .support import encode, local_env, signed_headers, state_event
from .vehicle_fakes import VEHICLE, MemoryVehicleStore, error_body, state_body


def index_app() -> dict[str, Any]:
    """Import function_app.py and index it once, as the worker does in its own process.

    A module of its own: `get_functions()` may run only once per app object, and the local
    host indexes the shared one (shared/local/app_functions.py `index_functions`).
    """
    spec = importlib.util.spec_from_file_location("function_app_as_indexed_by_the_worker",
                                                  ROOT / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {fn.get_function_name(): fn for fn in module.app.get_functions()}


ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = index_app()
#: The re-drive every minute, the inbox prune hourly (NCRONTAB with seconds).
TIMER_SCHEDULES = [("redrive_spilled", "0 */1 * * * *"), ("prune_vehicle_inbox", "0 17 * * * *")]


def bindings(name: str) -> list[dict[str, Any]]:
    """The function's bindings as the worker sends them to the host (JSON, one per binding)."""
    return [json.loads(raw) for raw in FUNCTIONS[name].get_raw_bindings()]


def trigger(name: str) -> dict[str, Any]:
    (binding,) = [b for b in bindings(name) if b["type"].endswith("Trigger")]
    return binding


def convert(name: str, datum: meta.Datum, metadata: dict[str, meta.Datum]) -> Any:
    """What the worker does for the trigger argument: the registered converter decodes."""
    registry = func.get_binding_registry()  # type: ignore[no-untyped-call]  # unannotated upstream
    converter = registry.get(trigger(name)["type"])
    assert converter is not None, f"azure-functions has no converter for {trigger(name)['type']}"
    return converter.decode(datum, trigger_metadata=metadata)


class WorkerTraceContext(_abc.TraceContext):
    """The worker's trace context (azure_functions_worker/bindings/tracecontext.py)."""

    def __init__(self, trace_parent: str) -> None:
        self._trace_parent = trace_parent

    @property
    def trace_parent(self) -> str:
        return self._trace_parent

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class WorkerContext(func.Context):
    """The worker's invocation context (azure_functions_worker/bindings/context.py)."""

    def __init__(self, function_name: str) -> None:
        self._invocation_id = str(uuid.uuid4())
        self._function_name = function_name
        self._trace_context = WorkerTraceContext(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        )

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return str(ROOT)

    @property
    def trace_context(self) -> Any:
        return self._trace_context

    @property
    def retry_context(self) -> Any:
        return None

    @property
    def thread_local_storage(self) -> Any:
        return None


async def invoke(name: str, argument: Any, *, context: bool = False) -> Any:
    user_function = FUNCTIONS[name].get_user_function()
    kwargs = {trigger(name)["name"]: argument}
    if context:
        kwargs["context"] = WorkerContext(name)
    result = user_function(**kwargs)
    return await result if asyncio.iscoroutine(result) else result


def http_datum(method: str, path: str, body: bytes, headers: dict[str, str],
               route_params: dict[str, str] | None = None) -> meta.Datum:
    """An `http` datum as Datum.from_typed_data builds it from the host's RpcHttp; the worker
    declares RawHttpBodyBytes, so the body arrives as bytes. The host puts the route
    template's values (`{vehicleId}`) in `params`."""
    url = f"https://app.azurewebsites.net/api/{path}?code=function-key"
    return meta.Datum(type="http", value={
        "method": meta.Datum(method, "string"),
        "url": meta.Datum(url, "string"),
        "headers": {k.lower(): meta.Datum(v, "string") for k, v in headers.items()},
        "body": meta.Datum(body, "bytes"),
        "params": {k: meta.Datum(v, "string") for k, v in (route_params or {}).items()},
        "query": {"code": meta.Datum("function-key", "string")},
    })


def service_bus_metadata(
    *, message_id: str, properties: dict[str, str], delivery_count: int = 1, sequence: int = 7
) -> dict[str, meta.Datum]:
    """Trigger metadata as the Service Bus extension sends it (the library's own tests use
    the same shapes): numbers as ints, times as .NET round-trip strings, properties as JSON."""
    props = json.dumps(properties)
    return {
        "MessageId": meta.Datum(message_id, "string"),
        "DeliveryCount": meta.Datum(delivery_count, "int"),
        "SequenceNumber": meta.Datum(sequence, "int"),
        "EnqueuedTimeUtc": meta.Datum("2026-11-27T04:31:12.1234567Z", "string"),
        "ExpiresAtUtc": meta.Datum("2026-12-11T04:31:12.1234567Z", "string"),
        "LockToken": meta.Datum(str(uuid.uuid4()), "string"),
        "ContentType": meta.Datum("application/json", "string"),
        "ApplicationProperties": meta.Datum(props, "json"),
        "UserProperties": meta.Datum(props, "json"),
        "sys": meta.Datum(json.dumps({"MethodName": "process_event",
                                      "UtcNow": "2026-11-27T04:31:13.0000000Z",
                                      "RandGuid": str(uuid.uuid4())}), "json"),
    }


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = build_runtime(load_settings(local_env(tmp_path)))
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(None)
        rt.queue.close()
        if rt.handled_log is not None:
            rt.handled_log.close()


class TestIndexedMetadata:
    """What the host reads from the worker's index of function_app.py."""

    def test_the_seven_functions_and_their_triggers(self) -> None:
        assert {name: trigger(name)["type"] for name in FUNCTIONS} == {
            "smartcar_webhook": "httpTrigger",
            "smartcar_error_webhook": "httpTrigger",
            "health": "httpTrigger",
            "vehicle_state": "httpTrigger",
            "process_event": "serviceBusTrigger",
            "redrive_spilled": "timerTrigger",
            "prune_vehicle_inbox": "timerTrigger",
        }

    def test_http_routes_methods_and_auth_levels(self) -> None:
        declared = {
            name: (trigger(name)["route"], trigger(name)["methods"], trigger(name)["authLevel"])
            for name in ("smartcar_webhook", "smartcar_error_webhook", "health", "vehicle_state")
        }
        assert declared == {
            "smartcar_webhook": ("webhooks/smartcar", ["POST"], "FUNCTION"),
            "smartcar_error_webhook": ("webhooks/smartcar/errors", ["POST"], "FUNCTION"),
            "health": ("health", ["GET"], "ANONYMOUS"),
            # The Functions host checks the key before the worker sees the request.
            "vehicle_state": ("vehicles/{vehicleId}", ["GET"], "FUNCTION"),
        }

    def test_http_functions_return_through_the_http_output(self) -> None:
        for name in ("smartcar_webhook", "smartcar_error_webhook", "health", "vehicle_state"):
            outputs = [b for b in bindings(name) if b["direction"] == "OUT"]
            assert outputs == [{"type": "http", "direction": "OUT", "name": "$return"}]

    def test_the_queue_trigger_uses_the_queue_setting_and_the_identity_connection(self) -> None:
        binding = trigger("process_event")
        assert binding["queueName"] == "%SERVICEBUS_QUEUE_NAME%"
        assert binding["connection"] == "ServiceBusConnection"
        assert binding["direction"] == "IN" and binding["name"] == "msg"
        # The body's bytes, not a string the host made of them (which replaces bytes that are
        # not UTF-8): the processor then reads exactly what was signed and stored.
        assert binding["dataType"].lower() == "binary"

    @pytest.mark.parametrize(("name", "schedule"), TIMER_SCHEDULES)
    def test_the_timers_run_on_their_schedule_not_on_startup(
        self, name: str, schedule: str
    ) -> None:
        binding = trigger(name)
        assert binding["schedule"] == schedule
        assert binding.get("runOnStartup", False) is False


class TestHttpTrigger:
    def test_a_signed_event_is_accepted_and_stored(self, runtime: Runtime) -> None:
        event = state_event()
        body = encode(event)
        req = convert("smartcar_webhook",
                      http_datum("POST", "webhooks/smartcar", body, signed_headers(body)), {})
        assert isinstance(req, func.HttpRequest)
        response = asyncio.run(invoke("smartcar_webhook", req, context=True))
        assert isinstance(response, func.HttpResponse)
        assert response.status_code == 200, response.get_body()
        assert runtime.queue.stats()["active"] == 1
        (stored,) = runtime.queue.receive(max_messages=1)
        assert stored.body == body and stored.message_id == event["eventId"]

    def test_an_unsigned_event_is_refused_and_nothing_stored(self, runtime: Runtime) -> None:
        body = encode(state_event())
        req = convert("smartcar_error_webhook",
                      http_datum("POST", "webhooks/smartcar/errors", body,
                                 {"Content-Type": "application/json"}), {})
        response = asyncio.run(invoke("smartcar_error_webhook", req, context=True))
        assert response.status_code == 401
        assert runtime.queue.stats()["active"] == 0

    def test_health(self, runtime: Runtime) -> None:
        req = convert("health", http_datum("GET", "health", b"", {}), {})
        response = asyncio.run(invoke("health", req))
        assert response.status_code == 200
        assert json.loads(response.get_body()) == {"status": "ok"}


class TestVehicleStateRoute:
    """`GET /api/vehicles/{vehicleId}` as the worker hands it over: the host has checked the
    key and put the route's value in `params`; the store is where the app's store goes."""

    def get(self, runtime: Runtime, vehicle_id: str) -> func.HttpResponse:
        req = convert("vehicle_state", http_datum("GET", f"vehicles/{vehicle_id}", b"", {},
                                                  {"vehicleId": vehicle_id}), {})
        assert isinstance(req, func.HttpRequest)
        assert req.route_params == {"vehicleId": vehicle_id}
        response = asyncio.run(invoke("vehicle_state", req))
        assert isinstance(response, func.HttpResponse)
        assert response.headers["Content-Type"] == "application/json"
        return response

    def test_200_with_the_vehicle(self, runtime: Runtime) -> None:
        store = MemoryVehicleStore()
        store.apply_body(state_body(oem_ms=1_764_000_000_000, soc=42))
        store.apply_body(error_body())
        runtime.vehicle_state = store
        response = self.get(runtime, VEHICLE)
        assert response.status_code == 200
        body = json.loads(response.get_body())
        assert body["vehicleId"] == VEHICLE
        assert body["signals"]["tractionbattery-stateofcharge"]["value"] == 42
        assert body["errors"][0]["state"] == "OPEN"

    def test_404_400_and_503(self, runtime: Runtime) -> None:
        runtime.vehicle_state = MemoryVehicleStore()
        assert self.get(runtime, VEHICLE).status_code == 404
        assert self.get(runtime, "a" * 129).status_code == 400
        assert self.get(runtime, "a%2Fb").status_code == 400  # how the host leaves an encoded /
        runtime.vehicle_state = None
        off = self.get(runtime, VEHICLE)
        assert off.status_code == 503 and json.loads(off.get_body())["store"] == "off"


class TestServiceBusTrigger:
    def test_a_queued_event_is_processed_with_the_hosts_metadata(self, runtime: Runtime) -> None:
        event = state_event()
        body = encode(event)
        metadata = service_bus_metadata(
            message_id=event["eventId"], delivery_count=2,
            properties={"eventId": event["eventId"], "eventType": event["eventType"]},
        )
        msg = convert("process_event", meta.Datum(body, "bytes"), metadata)
        assert isinstance(msg, func.ServiceBusMessage)
        assert msg.application_properties == {"eventId": event["eventId"],
                                              "eventType": event["eventType"]}
        assert msg.enqueued_time_utc is not None and msg.enqueued_time_utc.tzinfo is not None
        asyncio.run(invoke("process_event", msg))
        assert isinstance(runtime.handled_log, HandledLog)  # local mode's outcome log
        (record,) = runtime.handled_log.read()
        assert record["eventId"] == event["eventId"]
        assert record["outcome"] == "handled"
        assert record["deliveryCount"] == 2
        assert record["messageId"] == event["eventId"]

    def test_a_string_body_is_processed_the_same(self, runtime: Runtime) -> None:
        # The extension sends a UTF-8 body as a string datum when it can.
        event = state_event()
        metadata = service_bus_metadata(message_id=event["eventId"], properties={})
        msg = convert("process_event", meta.Datum(encode(event).decode(), "string"), metadata)
        asyncio.run(invoke("process_event", msg))
        assert isinstance(runtime.handled_log, HandledLog)
        assert [r["eventId"] for r in runtime.handled_log.read()] == [event["eventId"]]


    def test_without_a_delivery_count_in_the_metadata_it_is_the_first_delivery(
        self, runtime: Runtime
    ) -> None:
        # The library's converter leaves delivery_count None when the host sends no
        # DeliveryCount: the attempt is the first (1, as Service Bus counts), never 0.
        event = state_event()
        metadata = service_bus_metadata(message_id=event["eventId"], properties={})
        del metadata["DeliveryCount"]
        msg = convert("process_event", meta.Datum(encode(event), "bytes"), metadata)
        assert msg.delivery_count is None
        seen: list[Any] = []
        runtime.on_processed = lambda message, result: seen.append(message)
        asyncio.run(invoke("process_event", msg))
        assert [m.delivery_count for m in seen] == [1]
        assert isinstance(runtime.handled_log, HandledLog)
        assert [r["deliveryCount"] for r in runtime.handled_log.read()] == [1]

    def test_each_result_goes_to_the_runtimes_on_processed_hook(self, runtime: Runtime) -> None:
        # The local inspector's hook: what the processing did, per message and delivery.
        seen: list[tuple[Any, Any]] = []
        runtime.on_processed = lambda message, result: seen.append((message, result))
        event = state_event()
        metadata = service_bus_metadata(message_id=event["eventId"], delivery_count=3,
                                        properties={})
        asyncio.run(invoke("process_event", convert("process_event",
                                                     meta.Datum(encode(event), "bytes"),
                                                     metadata)))
        ((message, result),) = seen
        assert (message.message_id, message.delivery_count) == (event["eventId"], 3)
        assert result.outcome == "handled" and result.event.event_id == event["eventId"]


def timer_datum(last: str, next_: str, *, past_due: bool) -> meta.Datum:
    """A timer trigger's payload as the host sends it (UTC times)."""
    return meta.Datum(json.dumps({
        "Schedule": {"AdjustForDST": True},
        "ScheduleStatus": {"Last": last, "Next": next_, "LastUpdated": last},
        "IsPastDue": past_due,
    }), "json")


class TestTimerTrigger:
    def test_the_timer_redrives_what_was_spilled(self, runtime: Runtime) -> None:
        event = state_event()
        spilled = OutboundMessage(encode(event), event["eventId"], {"eventId": event["eventId"]})
        assert runtime.spill is not None
        asyncio.run(runtime.spill.put(spilled))
        timer = convert("redrive_spilled", timer_datum(
            "2026-11-27T04:30:00+00:00", "2026-11-27T04:31:00+00:00", past_due=True), {})
        assert isinstance(timer, func.TimerRequest) and timer.past_due
        asyncio.run(invoke("redrive_spilled", timer))
        assert asyncio.run(runtime.spill.names(limit=10)) == []
        (stored,) = runtime.queue.receive(max_messages=1)
        assert stored.message_id == event["eventId"] and stored.body == spilled.body

    def test_the_inbox_prune_timer_deletes_the_expired_records(
        self, runtime: Runtime, tmp_path: Path
    ) -> None:
        from shared.local.vehicle_state import FILE_NAME

        from .test_inbox_prune import record, recorded

        record(tmp_path / FILE_NAME, "old", days_ago=9)
        record(tmp_path / FILE_NAME, "kept", days_ago=6)
        timer = convert("prune_vehicle_inbox", timer_datum(
            "2026-11-27T03:17:00+00:00", "2026-11-27T04:17:00+00:00", past_due=False), {})
        assert isinstance(timer, func.TimerRequest) and not timer.past_due
        asyncio.run(invoke("prune_vehicle_inbox", timer))
        assert recorded(tmp_path / FILE_NAME) == {"kept"}
