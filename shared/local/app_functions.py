"""The app's functions as the local host sees them, and what it hands them.

`index_functions` reads `function_app.py`'s HTTP, Service Bus queue and timer functions once, as
the Functions host indexes an app; the rest is what the Python worker would give those
functions (the concrete `ServiceBusMessage`, the `context` of a function that declares one, a
`%NAME%` binding expression's app setting) and which routes need this run's key. `LocalHost`
(shared/local/host.py) serves them.
"""

from __future__ import annotations

import hmac
import inspect
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import azure.functions as func
from azure.functions.servicebus import ServiceBusMessage
from multidict import CIMultiDictProxy

from ..settings import HOST_JSON
from .queue_rows import QueuedMessage

#: Routes the local host serves without a key whatever their auth level: Smartcar's deliveries
#: come keyless through a tunnel, as with `func start` (contract.md).
KEYLESS_ROUTE_PREFIX = "webhooks/"


@dataclass(frozen=True, slots=True)
class HttpFunction:
    name: str
    route: str
    methods: tuple[str, ...]
    auth_level: str
    handler: Callable[..., Any]
    #: Declares a `context` parameter, which the worker fills (decided once, at indexing).
    wants_context: bool = False


def needs_local_key(fn: HttpFunction) -> bool:
    """True for the routes the local host serves only with its per-run key."""
    return fn.auth_level.lower() != "anonymous" and not fn.route.startswith(KEYLESS_ROUTE_PREFIX)


def has_key(key: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """True when `?code=` or `x-functions-key` is `key`; both compared in constant time."""
    expected = key.encode("utf-8")
    matched = False
    for given in (query.get("code"), headers.get("x-functions-key")):
        if given is not None:
            matched |= hmac.compare_digest(given.encode("utf-8", "replace"), expected)
    return matched


@dataclass(frozen=True, slots=True)
class QueueFunction:
    name: str
    queue_name: str
    connection: str
    handler: Callable[..., Any]


@dataclass(frozen=True, slots=True)
class TimerFunction:
    name: str
    schedule: str
    handler: Callable[..., Any]


_INDEX: dict[int, tuple[list[HttpFunction], list[QueueFunction], list[TimerFunction]]] = {}


def index_functions(
    app: func.FunctionApp,
) -> tuple[list[HttpFunction], list[QueueFunction], list[TimerFunction]]:
    """The HTTP, Service Bus queue and timer functions that `app` declares.

    `FunctionApp.get_functions()` may run only once per app (it registers the names), so
    the index is kept, as the Functions host indexes an app once.
    """
    if id(app) not in _INDEX:
        _INDEX[id(app)] = _index(app)
    return _INDEX[id(app)]


def _index(
    app: func.FunctionApp,
) -> tuple[list[HttpFunction], list[QueueFunction], list[TimerFunction]]:
    http: list[HttpFunction] = []
    queues: list[QueueFunction] = []
    timers: list[TimerFunction] = []
    for fn in app.get_functions():
        trigger: Any = fn.get_trigger()
        name = fn.get_function_name() or ""
        kind = trigger.get_binding_name() if trigger is not None else None
        if kind == "httpTrigger":
            methods = tuple(str(getattr(m, "value", m)) for m in (trigger.methods or ["GET"]))
            auth = str(getattr(trigger.auth_level, "value", trigger.auth_level))
            handler = fn.get_user_function()
            http.append(HttpFunction(name, trigger.route or name, methods, auth, handler,
                                     _wants_context(handler)))
        elif kind == "serviceBusTrigger":
            queues.append(QueueFunction(name, trigger.queue_name, trigger.connection,
                                        fn.get_user_function()))
        elif kind == "timerTrigger":
            timers.append(TimerFunction(name, trigger.schedule, fn.get_user_function()))
        else:
            raise RuntimeError(f"the local host cannot run {kind} function {name}")
    return http, queues, timers


def max_concurrent_calls_from_host_json(path: Path = HOST_JSON) -> int:
    """host.json's `extensions.serviceBus.maxConcurrentCalls`: the local host's default number
    of queue workers. ValueError says what was found."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["extensions"]["serviceBus"][
            "maxConcurrentCalls"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot read extensions.serviceBus.maxConcurrentCalls from {path}: {exc!r}"
        ) from None
    if type(value) is not int or value < 1:
        raise ValueError(
            f"extensions.serviceBus.maxConcurrentCalls in {path} must be a positive integer, "
            f"got {value!r}"
        )
    return value


def resolve_app_setting(value: str, environ: dict[str, str] | None = None) -> str:
    """Functions' `%NAME%` binding expressions read an app setting."""
    env = os.environ if environ is None else environ
    if value.startswith("%") and value.endswith("%") and len(value) > 2:
        return env.get(value[1:-1], "")
    return value


async def _call(handler: Callable[..., Any], arg: Any, **context: Any) -> Any:
    result = handler(arg, **context)
    if inspect.isawaitable(result):
        result = await result
    return result


def _wants_context(handler: Callable[..., Any]) -> bool:
    """The worker passes `context` to functions that declare it; so does this host."""
    return "context" in inspect.signature(handler).parameters


@dataclass(frozen=True, slots=True)
class LocalTraceContext:
    trace_parent: str
    trace_state: str
    attributes: dict[str, str]


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What the Python worker's `func.Context` offers, for functions that take `context`.

    The trace context is the request's own `traceparent` header when it has one (the
    Functions host would put its request span there), so a caller's trace continues.
    """

    invocation_id: str
    function_name: str
    function_directory: str
    trace_context: LocalTraceContext
    retry_context: None = None
    thread_local_storage: None = None


#: Where the worker's `context.function_directory` points: the app's root.
FUNCTION_DIRECTORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def invocation_context(name: str, headers: CIMultiDictProxy[str]) -> LocalContext:
    """What the worker passes as `context`: a fresh invocation id, and the request's W3C trace
    context (`headers`: the request's, read case-insensitively)."""
    return LocalContext(
        invocation_id=str(uuid.uuid4()),
        function_name=name,
        function_directory=FUNCTION_DIRECTORY,
        trace_context=LocalTraceContext(
            trace_parent=headers.get("traceparent", ""),
            trace_state=headers.get("tracestate", ""),
            attributes={},
        ),
    )



def to_function_message(qm: QueuedMessage) -> func.ServiceBusMessage:
    """The same concrete message type the Python worker hands to a queue trigger."""
    props: dict[str, Any] = dict(qm.application_properties)
    return ServiceBusMessage(
        body=qm.body,
        message_id=qm.message_id,
        delivery_count=qm.delivery_count,
        sequence_number=qm.sequence_number,
        enqueued_time_utc=qm.enqueued_time,
        scheduled_enqueue_time_utc=qm.scheduled_enqueue_time,
        lock_token=qm.lock_token,
        locked_until=qm.locked_until,
        application_properties=props,
        user_properties=props,
        content_type="application/json",
    )
