"""Where the handlers' budget comes from in Azure: host.json's functionTimeout, as deployed.

The Functions host answers a function timeout by restarting the worker process (every
delivery and webhook request in it), so the processor ends a hung attempt itself before then
(tests/test_processor.py::TestHandlerBudget). Locally the host cancels the one function at
FUNCTION_TIMEOUT_SECONDS instead, so no budget is passed there. And what a failed invocation of
the queue function reports to the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from azure.functions.servicebus import ServiceBusMessage

from shared import functions
from shared.handlers import HandlerRegistry
from shared.processor import (
    HandlerFailedError,
    Outcome,
    ProcessResult,
    ServiceBusDeadLetterer,
)
from shared.publisher import ServiceBusPublisher
from shared.retry import ServiceBusRetrySender
from shared.runtime import Runtime, build_runtime, set_runtime
from shared.settings import function_timeout_from_host_json, load_settings

from .fakes import FakeServiceBusClient
from .support import encode, local_env, state_event


@pytest.fixture(autouse=True)
def fresh_budget() -> Iterator[None]:
    functions.azure_handler_budget.cache_clear()
    yield
    functions.azure_handler_budget.cache_clear()
    set_runtime(None)


def test_the_budget_is_the_deployed_host_json_s_timeout_less_thirty_seconds() -> None:
    assert function_timeout_from_host_json() == 300.0  # host.json: "00:05:00"
    assert functions.azure_handler_budget() == 270.0


def test_an_unbounded_or_unreadable_timeout_leaves_the_handlers_unbounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unbounded() -> float:
        raise ValueError('functionTimeout in host.json must be positive, got "-1"')

    monkeypatch.setattr(functions, "function_timeout_from_host_json", unbounded)
    with caplog.at_level(logging.WARNING, logger="shared.functions"):
        assert functions.azure_handler_budget() is None
    assert [r.getMessage() for r in caplog.records] == [
        'handlers run without a budget of their own: functionTimeout in host.json must be '
        'positive, got "-1"']


class HoursPassLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a handler can move forward (`pass_time`): hours of a hung
    call, with no test waiting them out. The budget (`asyncio.timeout`) reads this clock."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset

    def pass_time(self, seconds: float) -> None:
        self.offset += seconds


def queue_message(body: bytes) -> ServiceBusMessage:
    """What the worker hands the queue function (the azure-functions library's own type)."""
    return ServiceBusMessage(body=body, message_id="m1", delivery_count=1, sequence_number=1,
                             application_properties={}, user_properties={})


def azure_runtime(registry: HandlerRegistry, service_bus: FakeServiceBusClient) -> Runtime:
    """The runtime Azure's settings build, its Service Bus sends going to `service_bus`."""
    settings = load_settings({
        "WEBSITE_SITE_NAME": "app", "KEY_VAULT_URI": "https://kv.vault.azure.net/",
        "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
        "AzureWebJobsStorage__accountName": "st1", "VEHICLE_STATE_STORE": "off"})
    assert settings.in_azure
    send = ServiceBusPublisher(lambda: service_bus, "smartcar-events", send_timeout=1.0).send_raw
    return build_runtime(settings, registry=registry, retry_sender=ServiceBusRetrySender(send),
                         dead_letterer=ServiceBusDeadLetterer(send))


@pytest.mark.parametrize("in_azure", [True, False])
def test_the_queue_function_bounds_the_handlers_by_host_json_in_azure_only(
    tmp_path: Path, in_azure: bool
) -> None:
    # In Azure the handlers get host.json's 300 s less 30 (the worker would be restarted at
    # 300): alive at 269 s, cancelled by 271 s, and the attempt retried. Locally the host
    # bounds the whole function instead, so the handlers have no budget of their own.
    registry = HandlerRegistry()
    alive_at: list[float] = []

    @registry.on("VEHICLE_STATE")
    async def hangs(event: Any, context: Any) -> None:
        loop = cast(HoursPassLoop, asyncio.get_running_loop())
        for seconds in (269.0, 2.0, 36_000.0):
            loop.pass_time(seconds)
            await asyncio.sleep(0.01)  # the budget's deadline, if past, fires first
            alive_at.append(loop.offset)

    service_bus = FakeServiceBusClient()  # the boundary: the retry copy is sent to it
    if in_azure:
        runtime = azure_runtime(registry, service_bus)
    else:
        runtime = build_runtime(load_settings(local_env(tmp_path)), registry=registry)
    processed: list[ProcessResult] = []
    runtime.on_processed = lambda message, result: processed.append(result)
    set_runtime(runtime)
    try:
        asyncio.run(functions.handle_queue_message(queue_message(encode(state_event()))),
                    loop_factory=HoursPassLoop)
    finally:
        if runtime.queue is not None:
            runtime.queue.close()
        if runtime.handled_log is not None:
            runtime.handled_log.close()
    (result,) = processed
    if in_azure:
        assert alive_at == [269.0]
        assert (result.outcome, result.error_type) == (Outcome.RETRIED, "HandlerTimeoutError")
        assert result.description is not None
        assert result.description.startswith("the handlers ran past their 270 s budget in ")
        assert result.event is not None
        (copy,) = service_bus.senders[0].sent  # the next attempt, scheduled
        assert copy.message_id == f"{result.event.event_id}:retry:2"
    else:
        assert alive_at == [269.0, 271.0, 36_271.0]
        assert result.outcome == Outcome.HANDLED


def test_a_failed_invocation_reports_no_handler_error_text_to_the_host() -> None:
    # A handler failed and its retry could not be sent: the invocation fails, and the worker
    # hands the host its traceback, causes included. The handler's text (a location here)
    # must not be in it; its type is.
    registry = HandlerRegistry()

    @registry.on("VEHICLE_STATE")
    def choke(event: Any, context: Any) -> None:
        raise ValueError("could not read '48.858370 N, 2.294481 E'")

    # Service Bus (faked at its client) refuses the retry copy.
    service_bus = FakeServiceBusClient(
        fail_next_sender=ConnectionError("Service Bus is unreachable"))
    set_runtime(azure_runtime(registry, service_bus))
    body = json.dumps({"eventId": "e-1", "eventType": "VEHICLE_STATE", "vehicleId": "v-1",
                       "data": {"signals": []}, "meta": {"version": "4.0"}}).encode()
    msg = queue_message(body)
    with pytest.raises(HandlerFailedError) as raised:
        asyncio.run(functions.handle_queue_message(msg))
    assert [sender.sent for sender in service_bus.senders] == [[]]  # the retry was refused
    reported = "".join(traceback.format_exception(raised.value))
    assert "ValueError" in reported and "e-1" in reported
    assert "48.858370" not in reported
