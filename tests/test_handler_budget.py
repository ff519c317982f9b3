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
import time
import traceback
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from azure.functions.servicebus import ServiceBusMessage

from shared import functions
from shared.handlers import HandlerRegistry
from shared.processor import HandlerFailedError
from shared.runtime import set_runtime
from shared.settings import function_timeout_from_host_json, load_settings


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


@pytest.mark.parametrize(("in_azure", "budget"), [(True, 270.0), (False, None)])
def test_the_queue_function_passes_the_budget_in_azure_only(
    monkeypatch: pytest.MonkeyPatch, in_azure: bool, budget: float | None
) -> None:
    passed: dict[str, Any] = {}

    async def process_message(message: Any, **kwargs: Any) -> Any:
        passed.update(kwargs)
        return SimpleNamespace(outcome=None)

    monkeypatch.setattr(functions, "process_message", process_message)
    set_runtime(SimpleNamespace(  # type: ignore[arg-type]  # the fields the function reads
        settings=SimpleNamespace(in_azure=in_azure), registry=None, dead_letterer=None,
        retry_sender=None, handled_log=None, vehicle_state=None, clock=None,
        on_processed=None))
    msg = ServiceBusMessage(body=b"{}", message_id="m1", delivery_count=1, sequence_number=1,
                            application_properties={}, user_properties={})
    asyncio.run(functions.handle_queue_message(msg))
    assert passed["handler_budget"] == budget


def test_a_failed_invocation_reports_no_handler_error_text_to_the_host() -> None:
    # A handler failed and its retry could not be sent: the invocation fails, and the worker
    # hands the host its traceback, causes included. The handler's text (a location here)
    # must not be in it; its type is.
    registry = HandlerRegistry()

    @registry.on("VEHICLE_STATE")
    def choke(event: Any, context: Any) -> None:
        raise ValueError("could not read '48.858370 N, 2.294481 E'")

    class Unreachable:
        async def schedule(self, copy: Any) -> None:
            raise ConnectionError("Service Bus is unreachable")

        async def dead_letter(self, message: Any, **kwargs: Any) -> None:
            raise ConnectionError("Service Bus is unreachable")

    settings = load_settings({"SMARTCAR_MANAGEMENT_TOKEN": "t",
                              "VEHICLE_STATE_STORE": "off"})
    set_runtime(SimpleNamespace(  # type: ignore[arg-type]  # the fields the function reads
        settings=settings, registry=registry, dead_letterer=Unreachable(),
        retry_sender=Unreachable(), handled_log=None, vehicle_state=None, clock=time.time,
        on_processed=None))
    body = json.dumps({"eventId": "e-1", "eventType": "VEHICLE_STATE", "vehicleId": "v-1",
                       "data": {"signals": []}, "meta": {"version": "4.0"}}).encode()
    msg = ServiceBusMessage(body=body, message_id="e-1", delivery_count=1, sequence_number=1,
                            application_properties={}, user_properties={})
    with pytest.raises(HandlerFailedError) as raised:
        asyncio.run(functions.handle_queue_message(msg))
    reported = "".join(traceback.format_exception(raised.value))
    assert "ValueError" in reported and "e-1" in reported
    assert "48.858370" not in reported
