"""Traces and metrics through OpenTelemetry: set up once per process, recorded from one place.

Where the telemetry goes (`configure`, called once per process; later calls do nothing):
- `APPLICATIONINSIGHTS_CONNECTION_STRING` set (Azure): `configure_azure_monitor()` from
  `azure-monitor-opentelemetry` exports this worker's spans and custom metrics. Its log export
  is disabled: with host.json `"telemetryMode": "OpenTelemetry"` the Functions host already
  exports the worker's log lines (forwarded to it over gRPC) and its own invocation requests,
  so exporting logs here too would store every line twice. The exporter authenticates with
  the managed identity named in `APPLICATIONINSIGHTS_AUTHENTICATION_STRING` (local auth is
  disabled on the Application Insights resource).
- If the Functions worker already installed an SDK tracer provider (the app setting
  `PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true` makes it call the distro itself), nothing
  is configured again, so nothing is exported twice.
- Local host without a connection string: one console line per span (logger
  `shared.telemetry`, INFO), no exporter.
- Otherwise (tests, `func start` without Application Insights): the OpenTelemetry API's
  no-op providers.

What is recorded: `Telemetry.observe_receive` and `Telemetry.observe_process` wrap the
receiver and the processor; every name is a constant in `shared/telemetry_names.py`. No body,
token or signature is ever an attribute: attributes are envelope identifiers, outcomes and
exception class names. Tests pass a `Telemetry` built on their own (in-memory) providers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from . import telemetry_names as names
from .publisher import OutboundMessage
from .settings import APPLICATIONINSIGHTS_CONNECTION_STRING, SettingsError
from .vehicle_state import ApplyResult

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# Histogram buckets in milliseconds: Smartcar wants an answer within 200 ms and alerts at 5 s;
# delivery lag runs from milliseconds to the ~3 minutes of Smartcar's own retries and beyond.
_DURATION_BUCKETS_MS: Sequence[float] = (
    1, 2, 5, 10, 25, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 15000, 30000, 60000,
)
_LAG_BUCKETS_MS: Sequence[float] = (
    100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000, 1800000,
    3600000,
)
_MAX_EVENT_TYPE_LENGTH = 64



class ReplyLike(Protocol):
    """What the receive observation reads of a `shared.receiver.Reply`."""

    @property
    def status(self) -> int: ...
    @property
    def outcome(self) -> str: ...
    @property
    def event_id(self) -> str | None: ...
    @property
    def event_type(self) -> str | None: ...
    @property
    def authenticated(self) -> bool: ...


R = TypeVar("R", bound=ReplyLike)


class ShapeLike(Protocol):
    """What the shape metric reads of a `shared.shapes.Shape`."""

    @property
    def id(self) -> str: ...
    @property
    def known(self) -> bool: ...
    @property
    def event_type(self) -> str | None: ...
    @property
    def version(self) -> str | None: ...


# Outcomes after which the request is known to be signed by Smartcar (or a VERIFY that was
# answered, whose eventType can only be VERIFY): only then is its eventType trusted as a
# metric dimension. Its eventId is recorded only when the signature matched
# (`authenticated`): an unsigned VERIFY's is whatever a stranger wrote.
_AUTHENTICATED_OUTCOMES = frozenset({"accepted", "duplicate", "verify_answered"})


@lru_cache(maxsize=256)
def metric_event_type(event_type: str | None) -> str:
    """A bounded, printable eventType for a metric dimension (cached: a handful of types
    arrive over and over; the cache is bounded whatever a sender makes up)."""
    if not event_type or len(event_type) > _MAX_EVENT_TYPE_LENGTH:
        return names.UNKNOWN_EVENT_TYPE
    if not all(c.isalnum() or c in "_-." for c in event_type):
        return names.UNKNOWN_EVENT_TYPE
    return event_type


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _string_properties(properties: Mapping[Any, Any]) -> dict[str, str]:
    """Application properties as str -> str (Service Bus may hand over bytes)."""
    out: dict[str, str] = {}
    for key, value in properties.items():
        if type(key) is str and type(value) is str:  # the common case, without two calls
            out[key] = value
            continue
        k, v = _text(key), _text(value)
        if k is not None and v is not None:
            out[k] = v
    return out


def trace_context_properties() -> dict[str, str]:
    """The current span's W3C trace context as message application properties."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if names.PROP_TRACEPARENT in carrier:
        carrier[names.PROP_DIAGNOSTIC_ID] = carrier[names.PROP_TRACEPARENT]
    return carrier


def context_from_properties(properties: Mapping[Any, Any]) -> otel_context.Context | None:
    """The trace context a message carries (`traceparent`, else `Diagnostic-Id`), or None."""
    return _context_from_strings(_string_properties(properties))


def _context_from_strings(props: Mapping[str, str]) -> otel_context.Context | None:
    carrier: dict[str, str] = {}
    parent = props.get(names.PROP_TRACEPARENT) or props.get(names.PROP_DIAGNOSTIC_ID)
    if not parent:
        return None
    carrier[names.PROP_TRACEPARENT] = parent
    if names.PROP_TRACESTATE in props:
        carrier[names.PROP_TRACESTATE] = props[names.PROP_TRACESTATE]
    ctx = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


@dataclass(slots=True)
class ProcessObservation:
    """Filled in by the processor while its span is open."""

    outcome: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    vehicle_id: str | None = None
    #: The event's `meta.deliveredAt`, for the delivery lag (None: no lag is recorded).
    delivered_at: datetime | None = None
    dead_letter_reason: str | None = None
    error_type: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Telemetry:
    """Tracer and instruments; the global (proxy) providers unless others are passed."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._tracer = trace.get_tracer(names.SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(names.SCOPE, meter_provider=meter_provider)
        self._clock = clock
        self.received = meter.create_counter(
            names.WEBHOOK_RECEIVED, unit="{webhook}", description="Webhook POSTs answered"
        )
        self.receive_duration = meter.create_histogram(
            names.WEBHOOK_RECEIVE_DURATION,
            unit="ms",
            description="Time to decide and answer one webhook POST",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_MS,
        )
        self.processed = meter.create_counter(
            names.EVENT_PROCESSED, unit="{event}", description="Processing attempts by outcome"
        )
        self.process_duration = meter.create_histogram(
            names.EVENT_PROCESS_DURATION,
            unit="ms",
            description="Time to process one delivery of a queued event",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_MS,
        )
        self.delivery_lag = meter.create_histogram(
            names.EVENT_DELIVERY_LAG,
            unit="ms",
            description="Processing time minus the event's meta.deliveredAt",
            explicit_bucket_boundaries_advisory=_LAG_BUCKETS_MS,
        )
        self.spilled = meter.create_counter(
            names.WEBHOOK_SPILLED, unit="{webhook}", description="Webhooks spilled to blob"
        )
        self.redriven = meter.create_counter(
            names.SPILL_REDRIVEN, unit="{webhook}", description="Spilled webhooks re-driven"
        )
        self.state_applied = meter.create_counter(
            names.VEHICLE_STATE_APPLIED, unit="{signal}", description="Signal readings stored"
        )
        self.state_stale = meter.create_counter(
            names.VEHICLE_STATE_STALE, unit="{signal}",
            description="Signal readings left alone: the store held a newer or the same one",
        )
        self.state_skipped = meter.create_counter(
            names.VEHICLE_STATE_SKIPPED, unit="{signal}",
            description="Signals recorded with a caveat or skipped, by reason",
        )
        self.state_conflicts = meter.create_counter(
            names.VEHICLE_STATE_CONFLICTS, unit="{write}",
            description="Conditional store writes that lost a race and were retried",
        )
        self.inbox_duplicates = meter.create_counter(
            names.VEHICLE_STATE_DUPLICATES, unit="{event}",
            description="Deliveries of an eventId whose handlers had completed",
        )
        self.redelivered = meter.create_counter(
            names.WEBHOOK_REDELIVERED, unit="{webhook}",
            description="Deliveries repeating an eventId with a new deliveryId (Smartcar retries)",
        )
        self.delivery_to_answer = meter.create_histogram(
            names.WEBHOOK_DELIVERY_TO_ANSWER,
            unit="ms",
            description="Our answer's time minus meta.deliveredAt (Smartcar's clock)",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_MS,
        )
        self.shape_first_seen = meter.create_counter(
            names.PAYLOAD_SHAPE_FIRST_SEEN, unit="{shape}",
            description="Payload shapes seen for the first time by this instance",
        )

    # -- receive ----------------------------------------------------------------------------
    async def observe_receive(
        self,
        decide: Callable[[], Awaitable[R]],
        *,
        parent: Mapping[str, str] | None = None,
    ) -> R:
        """Run `decide` (returning a ReplyLike) inside the receive span; count its outcome.

        The span is current while `decide` runs, so `trace_context_properties()` called from
        it (when the message is built) carries this span to the processor. `parent` is the
        invocation's W3C trace context (`traceparent`, `tracestate`) from the Functions host,
        so the host's request, this span and the processing span make one trace.
        """
        start = time.perf_counter()
        with self._tracer.start_as_current_span(
            names.SPAN_RECEIVE, context=context_from_properties(parent or {}),
            kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False,
        ) as span:
            reply = await decide()
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            outcome = str(reply.outcome)
            trusted = outcome in _AUTHENTICATED_OUTCOMES
            event_type = metric_event_type(reply.event_type) if trusted else (
                names.UNKNOWN_EVENT_TYPE
            )
            attributes: dict[str, AttributeValue] = {
                names.ATTR_OUTCOME: outcome,
                names.ATTR_EVENT_TYPE: event_type,
                names.ATTR_HTTP_STATUS: int(reply.status),
            }
            span.set_attributes(attributes)
            span.set_attribute(names.ATTR_AUTHENTICATED, bool(reply.authenticated))
            if reply.authenticated and reply.event_id:
                span.set_attribute(names.ATTR_EVENT_ID, str(reply.event_id))
            if int(reply.status) >= 500:
                span.set_status(Status(StatusCode.ERROR, outcome))
            self.received.add(1, attributes)
            self.receive_duration.record(elapsed_ms, attributes)
        return reply

    # -- process ----------------------------------------------------------------------------
    @contextmanager
    def observe_process(
        self,
        application_properties: Mapping[Any, Any],
        *,
        message_id: str,
        delivery_count: int,
    ) -> Iterator[ProcessObservation]:
        """The processing span, child of the receive span the message carries.

        The caller sets `outcome` (None: not an event, e.g. a dead-letter copy: no metrics)
        and what it learnt about the event; metrics are recorded when the block exits.
        """
        props = _string_properties(application_properties)
        obs = ProcessObservation(
            event_type=props.get(names.ATTR_EVENT_TYPE),
            event_id=props.get(names.ATTR_EVENT_ID),
            vehicle_id=props.get(names.ATTR_VEHICLE_ID),
        )
        parent = _context_from_strings(props)
        start = time.perf_counter()
        with self._tracer.start_as_current_span(
            names.SPAN_PROCESS, context=parent, kind=SpanKind.CONSUMER,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            span.set_attribute(names.ATTR_MESSAGE_ID, message_id)
            span.set_attribute(names.ATTR_DELIVERY_COUNT, delivery_count)
            try:
                yield obs
            finally:
                elapsed_ms = (time.perf_counter() - start) * 1000.0
                self._finish_process(span, obs, elapsed_ms)

    def _finish_process(self, span: trace.Span, obs: ProcessObservation, ms: float) -> None:
        event_type = metric_event_type(obs.event_type)
        if span.is_recording():  # not for a span that is dropped anyway (sampled out, no SDK)
            for key, value in (
                (names.ATTR_EVENT_TYPE, event_type),
                (names.ATTR_EVENT_ID, obs.event_id),
                (names.ATTR_VEHICLE_ID, obs.vehicle_id),
                (names.ATTR_OUTCOME, obs.outcome),
                (names.ATTR_DEAD_LETTER_REASON, obs.dead_letter_reason),
                (names.ATTR_ERROR_TYPE, obs.error_type),
                *obs.extra.items(),
            ):
                if value is not None:
                    span.set_attribute(key, value)
            if obs.outcome in (names.PROCESS_RETRIED, names.PROCESS_DEAD_LETTERED):
                span.set_status(Status(StatusCode.ERROR, obs.error_type or obs.outcome))
        if obs.outcome is None:
            return
        attributes: dict[str, AttributeValue] = {
            names.ATTR_EVENT_TYPE: event_type,
            names.ATTR_OUTCOME: obs.outcome,
        }
        self.processed.add(1, attributes)
        self.process_duration.record(ms, attributes)
        if obs.delivered_at is not None and obs.outcome in (
            names.PROCESS_HANDLED, names.PROCESS_UNHANDLED,
        ):
            lag_ms = (self._clock() - obs.delivered_at).total_seconds() * 1000.0
            self.delivery_lag.record(max(lag_ms, 0.0), {names.ATTR_EVENT_TYPE: event_type})

    # -- delivery signals (shared/delivery_signals.py) --------------------------------------
    def record_redelivery(self, event_type: str | None) -> None:
        self.redelivered.add(1, {names.ATTR_EVENT_TYPE: metric_event_type(event_type)})

    def record_delivery_to_answer(self, ms: float, event_type: str | None) -> None:
        self.delivery_to_answer.record(ms, {names.ATTR_EVENT_TYPE: metric_event_type(event_type)})

    def record_new_shape(self, shape: ShapeLike) -> None:
        self.shape_first_seen.add(1, {
            names.ATTR_SHAPE_ID: shape.id,
            names.ATTR_SHAPE_KNOWN: "true" if shape.known else "false",
            names.ATTR_EVENT_TYPE: metric_event_type(shape.event_type),
            names.ATTR_META_VERSION: shape.version or "absent",
        })

    # -- spill-over (recorded by the reliability work) -------------------------------------
    def record_spilled(self, count: int = 1) -> None:
        self.spilled.add(count)

    def record_redriven(self, count: int = 1) -> None:
        self.redriven.add(count)

    # -- vehicle state store ----------------------------------------------------------------
    def record_vehicle_state(self, result: ApplyResult) -> None:
        stored = len(result.changes) + len(result.refreshed)
        if stored:
            self.state_applied.add(stored)
        if result.stale:
            self.state_stale.add(len(result.stale))
        for skipped in result.skipped:
            self.state_skipped.add(1, {names.ATTR_REASON: skipped.reason})
        if result.conflicts_retried:
            self.state_conflicts.add(result.conflicts_retried)

    def record_inbox_duplicate(self) -> None:
        self.inbox_duplicates.add(1)


def with_trace_context(message: OutboundMessage) -> OutboundMessage:
    """`message` with the current span's trace context added to its application properties."""
    carrier = trace_context_properties()
    if not carrier:  # no valid current span (no SDK, or not sampled): nothing to carry
        return message
    props = dict(message.application_properties)
    props.update(carrier)
    return replace(message, application_properties=props)


# ---------------------------------------------------------------------------------------------
# Process-wide instance and configuration
# ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_telemetry: Telemetry | None = None
_mode: str | None = None

MODE_AZURE_MONITOR = "azure-monitor"
MODE_PRECONFIGURED = "preconfigured"
MODE_CONSOLE = "console"
MODE_OFF = "off"


def get_telemetry() -> Telemetry:
    """The process's Telemetry, on the global providers (which `configure` sets)."""
    global _telemetry
    if _telemetry is None:
        with _lock:
            if _telemetry is None:
                _telemetry = Telemetry()
    return _telemetry


def set_telemetry(telemetry: Telemetry | None) -> None:
    """Install a Telemetry (tests); None goes back to the global providers."""
    global _telemetry
    with _lock:
        _telemetry = telemetry


def _sdk_provider_installed() -> bool:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    return isinstance(trace.get_tracer_provider(), SdkTracerProvider)


#: The OpenTelemetry SDK's switch for the log exporter, read by the Azure Monitor distro.
OTEL_LOGS_EXPORTER = "OTEL_LOGS_EXPORTER"


def configure(*, connection_string: str | None, console: bool = False) -> str:
    """Set up export once per process; returns the mode chosen (MODE_*)."""
    global _mode
    with _lock:
        if _mode is not None:
            return _mode
        if _sdk_provider_installed():
            _mode = MODE_PRECONFIGURED
        elif connection_string:
            from azure.monitor.opentelemetry import configure_azure_monitor

            # Logs: exported by the Functions host (telemetryMode OpenTelemetry), not here, or
            # each line is ingested (and billed) twice. The distro (1.8.x) ignores the
            # `disable_logging` argument: it overwrites it from OTEL_LOGS_EXPORTER, so that is
            # the switch it honours.
            os.environ[OTEL_LOGS_EXPORTER] = "none"
            try:
                configure_azure_monitor(connection_string=connection_string,
                                        disable_logging=True)
            except ValueError as exc:  # settings.py checks the format: a rule it does not know
                raise SettingsError(
                    f"Invalid configuration: {APPLICATIONINSIGHTS_CONNECTION_STRING} was "
                    f"refused by Azure Monitor ({exc})") from exc
            _mode = MODE_AZURE_MONITOR
        elif console:
            _install_console()
            _mode = MODE_CONSOLE
        else:
            _mode = MODE_OFF
        logger.debug("telemetry mode: %s", _mode)
        return _mode


def configured_mode() -> str | None:
    return _mode


def _install_console() -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class ConsoleLineExporter(SpanExporter):
        """One log line per span: name, duration, trace id, attributes."""

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                start, end = span.start_time or 0, span.end_time or 0
                attrs = " ".join(f"{k}={v!s}" for k, v in (span.attributes or {}).items())
                ctx = span.get_span_context()
                trace_id = format(ctx.trace_id, "032x") if ctx is not None else "-"
                logger.info(
                    "span %s %.1fms trace=%s %s", span.name, (end - start) / 1e6, trace_id, attrs
                )
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": names.SCOPE}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleLineExporter()))
    trace.set_tracer_provider(provider)
