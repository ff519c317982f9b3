"""Where the handlers' budget comes from in Azure: host.json's functionTimeout, as deployed.

The Functions host answers a function timeout by restarting the worker process (every
delivery and webhook request in it), so the processor ends a hung attempt itself before then
(tests/test_processor.py::TestHandlerBudget). Locally the host cancels the one function at
FUNCTION_TIMEOUT_SECONDS instead, so no budget is passed there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from azure.functions.servicebus import ServiceBusMessage

from shared import functions
from shared.runtime import set_runtime
from shared.settings import function_timeout_from_host_json


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
