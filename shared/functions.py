"""Adapters between Azure Functions objects and the pure logic in this package.

`function_app.py` declares the functions and calls these; they translate `func.HttpRequest`
and `func.ServiceBusMessage` into bytes and mappings and back, and nothing else.
"""

from __future__ import annotations

import functools
import json
import logging

import azure.functions as func

from .clockcheck import CLOCK_WATCH
from .processor import (
    HandlerFailedError,
    InboundMessage,
    handler_budget_for,
    process_message,
)
from .receiver import receive
from .runtime import get_runtime
from .settings import SettingsError, function_timeout_from_host_json
from .vehicle_read import read_vehicle

logger = logging.getLogger(__name__)


def _json(status: int, body: object) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        mimetype="application/json",
    )


def invocation_trace_parent(context: func.Context | None) -> dict[str, str] | None:
    """The Functions host's W3C trace context for this invocation, when it gives one."""
    trace_context = getattr(context, "trace_context", None)
    traceparent = getattr(trace_context, "trace_parent", None)
    if not traceparent:
        return None
    parent = {"traceparent": str(traceparent)}
    tracestate = getattr(trace_context, "trace_state", None)
    if tracestate:
        parent["tracestate"] = str(tracestate)
    return parent


async def handle_webhook(
    req: func.HttpRequest, context: func.Context | None = None
) -> func.HttpResponse:
    try:
        runtime = get_runtime()
    except SettingsError as exc:
        logger.error("%s", exc)
        return _json(503, {"error": "receiver is misconfigured, see its logs"})
    reply = await receive(
        req.get_body(),
        req.headers,
        tokens=runtime.tokens,
        publisher=runtime.publisher,
        max_body_bytes=runtime.settings.max_body_bytes,
        trace_parent=invocation_trace_parent(context),
        clock=runtime.clock,
    )
    if reply.authenticated:
        logger.info(
            "webhook %s (%d, eventId=%s, eventType=%s)",
            reply.outcome, reply.status, reply.event_id, reply.event_type,
        )
    else:  # the ids are a stranger's text: never echo them into the logs
        logger.info("webhook %s (%d, unauthenticated)", reply.outcome, reply.status)
    return func.HttpResponse(
        reply.body_bytes(), status_code=reply.status, headers=dict(reply.headers)
    )


async def handle_health(req: func.HttpRequest) -> func.HttpResponse:
    try:
        runtime = get_runtime()
    except SettingsError as exc:
        logger.error("health check: %s", exc)
        return _json(503, {"status": "misconfigured"})
    if runtime.health_problem is not None:
        problem = await runtime.health_problem()
        if problem is not None:
            logger.error("health check: %s", problem)
            return _json(503, {"status": "unavailable"})
    # Working, but something needs the operator: said only then, never a setting's value.
    problems = [p for p in (CLOCK_WATCH.problem(),) if p]
    if runtime.health_warnings is not None:
        problems += runtime.health_warnings()
    if problems:
        for problem in problems:
            logger.warning("health check: %s", problem)
        return _json(200, {"status": "degraded", "problems": problems})
    return _json(200, {"status": "ok"})


async def handle_vehicle(req: func.HttpRequest) -> func.HttpResponse:
    """`GET /api/vehicles/{vehicleId}`: the key was checked by the host (shared/vehicle_read.py)."""
    try:
        runtime = get_runtime()
    except SettingsError as exc:
        logger.error("vehicle read: %s", exc)
        return _json(503, {"error": "receiver is misconfigured, see its logs"})
    reply = await read_vehicle(req.route_params.get("vehicleId", ""), runtime.vehicle_state)
    return func.HttpResponse(
        reply.body_bytes(), status_code=reply.status, headers=dict(reply.headers)
    )


def inbound_message(msg: func.ServiceBusMessage) -> InboundMessage:
    props = dict(msg.application_properties or {})
    return InboundMessage(
        body=msg.get_body(),
        message_id=msg.message_id or "",
        delivery_count=int(msg.delivery_count or 1),
        sequence_number=msg.sequence_number,
        application_properties=props,
        enqueued_time=msg.enqueued_time_utc,
    )


@functools.cache
def azure_handler_budget() -> float | None:
    """In Azure, the handlers' budget under host.json's functionTimeout (read once); None
    when it is unbounded (`-1`) or unreadable. The host does not cancel one invocation at
    its timeout: it restarts the worker process, with every delivery and request in it, so
    the processor must end a hung attempt itself before then."""
    try:
        timeout = function_timeout_from_host_json()
    except ValueError as exc:
        logger.warning("handlers run without a budget of their own: %s", exc)
        return None
    return handler_budget_for(timeout)


async def handle_queue_message(msg: func.ServiceBusMessage) -> None:
    runtime = get_runtime()
    message = inbound_message(msg)
    try:
        result = await process_message(
            message,
            settings=runtime.settings,
            registry=runtime.registry,
            dead_letterer=runtime.dead_letterer,
            retry_sender=runtime.retry_sender,
            handled_log=runtime.handled_log,
            store=runtime.vehicle_state,
            clock=runtime.clock,
            # Locally the host cancels the whole function at FUNCTION_TIMEOUT_SECONDS instead.
            handler_budget=azure_handler_budget() if runtime.settings.in_azure else None,
        )
    except HandlerFailedError as exc:
        # The worker reports a failed invocation to the host's logs with its whole traceback,
        # causes included: the handler's own error, whose text may quote a payload value (a
        # location), stays out. The message names the event and the error's type; the process
        # span and the DEBUG log have the rest.
        raise HandlerFailedError(str(exc)) from None
    if runtime.on_processed is not None:
        runtime.on_processed(message, result)
