"""The users' extension point: business logic per event type and per signal.

Register a function for an `eventType`, or for a signal carried by VEHICLE_STATE events, named
by its path ("Group.Name", e.g. "TractionBattery.StateOfCharge") or its code
("tractionbattery-stateofcharge"). `on_signal` and `on_change` match a name exactly, case
included, as Smartcar spells it ("tractionbattery.stateofcharge" names no signal):

    from shared.handlers import registry

    @registry.on("VEHICLE_ERROR")
    async def page_support(event, context):
        ...

    @registry.on_signal("Location.PreciseLocation")
    def store_position(event, signal, context):
        ...

    @registry.on_change("TractionBattery.StateOfCharge")
    async def charge_moved(event, change, context):
        ...  # change.previous (None if never seen) and change.current: SignalState

`on_change` handlers run for what the vehicle state store accepted (docs/vehicle-state.md):
at least once for every change it stored, never for a duplicate delivery or a reading older
than the one it holds; a change stored by a delivery that crashed before its handlers
completed is handed to them again on the redelivery.

Handlers may be plain or `async` functions. Plain ones run in a thread of the registry's own
pool (`blocking_threads`, default 32), so a blocking call (an HTTP client, a database driver)
never stalls the event loop that also answers Smartcar's webhooks, and a hung one cannot take
the threads the receiver needs; `async` ones run on the loop and must not block. A delivery is
bounded by the function timeout (host.json `functionTimeout`; `FUNCTION_TIMEOUT_SECONDS`
locally): a handler still running then is cancelled and the delivery fails (in Azure 30 s
before it, so that the host does not restart the worker: docs/how-it-works.md). Raise to have the
event retried with backoff
(it is dead-lettered after `MAX_DELIVERY_COUNT` deliveries); return normally when done.
Deliveries are at-least-once and unordered, so make handlers idempotent (key on
`event.event_id`) and order signals by `signal.oem_updated_at`, not by arrival.
Import your module from `shared/handlers/__init__.py` (bottom) so it registers at start-up.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from ..events import Event, Signal
from ..settings import Settings
from ..vehicle_state import ApplyResult, ChangeFilter, SignalChange
from .pool import BlockingPool

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Signal handlers run for the signals of this event type only.
VEHICLE_STATE = "VEHICLE_STATE"


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a handler may need besides the event."""

    settings: Settings
    message_id: str
    #: How many times this event has been given to handlers, this time included: 1 on the
    #: first try, and it grows across the retries the queue schedules (shared/retry.py).
    delivery_count: int
    #: What the vehicle state store did with this event (None when the store is off).
    vehicle_state: ApplyResult | None = None

    def with_vehicle_state(self, state: ApplyResult) -> HandlerContext:
        """This context with `vehicle_state` set: `dataclasses.replace`'s result, made
        directly (`replace` reads the class's fields anew each time, and this runs once per
        delivery). A new field goes here too: a test in tests/test_vehicle_state_processing.py
        checks every one."""
        return HandlerContext(self.settings, self.message_id, self.delivery_count, state)


#: The handler a delivery is running (`module.qualname`), None once dispatch is done. Left
#: set when the handler is cancelled, so the host can name it in the timeout warning.
RUNNING_HANDLER: ContextVar[str | None] = ContextVar("RUNNING_HANDLER", default=None)

#: Seconds the last `dispatch` in this context spent running handlers, measured around the
#: handler calls alone (whether they returned, raised or were cancelled): parsing, settlement
#: and a retry's backoff are never in it. The local inspector shows it per attempt.
HANDLER_SECONDS: ContextVar[float | None] = ContextVar("HANDLER_SECONDS", default=None)

#: What a handler raised in the last `dispatch` in this context, None when none did. A failed
#: handler's retry is scheduled and the function returns (shared/retry.py), so the host
#: learns the failure here, not from the function: the local inspector shows it per attempt.
HANDLER_ERROR: ContextVar[BaseException | None] = ContextVar("HANDLER_ERROR", default=None)

#: Threads per registry for plain handlers: the Functions host's maxConcurrentCalls (host.json).
BLOCKING_THREADS = 32

EventHandler = Callable[[Event, HandlerContext], Awaitable[None] | None]
SignalHandler = Callable[[Event, Signal, HandlerContext], Awaitable[None] | None]
ChangeHandler = Callable[[Event, SignalChange, HandlerContext], Awaitable[None] | None]


def handler_name(handler: Callable[..., Any]) -> str:
    """`module.qualname` for RUNNING_HANDLER and the logs. A handler need not be a function:
    a `functools.partial` is named after the function it wraps, a callable object after its
    class, and a module that cannot be told is "?"."""
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(qualname, str):
        qualname = type(target).__qualname__
    module = getattr(target, "__module__", None)
    if not isinstance(module, str):
        module = "?"
    return f"{module}.{qualname}"


class HandlerRegistry:
    """Maps event types and signal paths to handlers."""

    def __init__(self, *, blocking_threads: int = BLOCKING_THREADS) -> None:
        self._by_type: dict[str, list[EventHandler]] = defaultdict(list)
        self._by_signal: dict[str, list[SignalHandler]] = defaultdict(list)
        self._by_change: dict[str, list[ChangeHandler]] = defaultdict(list)
        self._change_filter = ChangeFilter(frozenset())
        self.pool = BlockingPool(blocking_threads)

    def on(self, event_type: str) -> Callable[[F], F]:
        """Decorator: call the handler for every event of `event_type`."""

        def register(handler: F) -> F:
            self._by_type[event_type].append(handler)
            return handler

        return register

    def on_signal(self, path: str) -> Callable[[F], F]:
        """Decorator: call the handler for each successful signal `path` ("Group.Name", or
        the signal's code, matched exactly as `on_change` matches them) of a VEHICLE_STATE
        event, in `event.signals_by_recency()` order (newest `oem_updated_at` first)."""

        def register(handler: F) -> F:
            self._by_signal[path].append(handler)
            return handler

        return register

    def on_change(self, path: str) -> Callable[[F], F]:
        """Decorator: call the handler with each change the vehicle state store accepted for
        the signal `path` ("Group.Name", or the signal's code), as (event, change, context)."""

        def register(handler: F) -> F:
            self._by_change[path].append(handler)
            self._change_filter = ChangeFilter(frozenset(self._by_change))
            return handler

        return register

    def has_handlers_for(self, event_type: str) -> bool:
        """Whether any handler is registered that an event of `event_type` can run: one for
        the type, or, for VEHICLE_STATE, one for a signal or for a stored change."""
        return bool(self._by_type.get(event_type)) or (
            event_type == VEHICLE_STATE and bool(self._by_signal or self._by_change))

    @property
    def change_filter(self) -> ChangeFilter:
        """The signals an `on_change` handler is registered for (by code or `Group.Name`
        path): the store keeps only their changes pending for the handlers (the outbox)."""
        return self._change_filter

    async def dispatch(self, event: Event, context: HandlerContext,
                       changes: tuple[SignalChange, ...] = ()) -> bool:
        """Run every matching handler; True when at least one ran. Handler errors propagate.

        `changes` are the store's accepted changes for this event (ApplyResult.pending)."""
        started = time.perf_counter()
        HANDLER_ERROR.set(None)
        try:
            ran = False
            for handler in self._by_type.get(event.event_type, ()):
                await self._call(handler, event, context)
                ran = True
            if event.event_type == VEHICLE_STATE and self._by_signal:
                # Only the signals that have handlers (newest first): a delivery holds ~20.
                for signal in event.signals_at(self._by_signal.keys()):
                    if not signal.ok:
                        continue
                    path, code = signal.path, signal.code
                    # By path and by code, as on_change; once when they are the same name.
                    for key in (path, code) if path != code else (path,):
                        if key is None:
                            continue
                        for signal_handler in self._by_signal.get(key, ()):
                            await self._call(signal_handler, event, signal, context)
                            ran = True
            # `changes` holds only what the store kept for the on_change handlers (the outbox
            # is this registry's change_filter): none when there are none.
            for change in changes:
                path, code = change.path, change.code
                # By path and by code; once when they are the same name.
                for key in (path, code) if path is not None and path != code else (code,):
                    for change_handler in self._by_change.get(key, ()):
                        await self._call(change_handler, event, change, context)
                        ran = True
            RUNNING_HANDLER.set(None)
            return ran
        except Exception as exc:
            HANDLER_ERROR.set(exc)
            raise
        finally:
            HANDLER_SECONDS.set(time.perf_counter() - started)

    async def _call(self, handler: Callable[..., Awaitable[None] | None], *args: Any) -> None:
        """Await a coroutine handler; run a plain one in the pool (it may block)."""
        RUNNING_HANDLER.set(handler_name(handler))
        try:
            if inspect.iscoroutinefunction(handler):
                await handler(*args)
                return
            result = await self.pool.run(handler, *args)
            if inspect.isawaitable(result):
                await result
        except SystemExit as exc:
            # sys.exit() in a library (argparse's error): raised out of a task, it would stop
            # the event loop, and with it the host or the worker. Only this delivery fails.
            raise RuntimeError(f"handler raised {exc!r}") from exc


#: The registry the app uses. Your handlers register here.
registry = HandlerRegistry()

# Example handlers register themselves on import.
from . import low_battery as low_battery  # noqa: E402
