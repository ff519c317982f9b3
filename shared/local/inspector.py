"""What the inspector page shows: recent deliveries, in memory only.

The local host reports each HTTP request and its answer (`Recorder.http_request`); the
receiver's and the processor's own OpenTelemetry spans (`shared/telemetry.py`) say what was
decided (`outcome`, `eventType`, dead-letter reason, ...). A receive span is matched to its
request through a context variable set while the function runs; a processing span to its
delivery through the trace id that the message carries from the receive span. What applying
the event did to the vehicle state store (`ProcessResult.vehicle_state`) comes through the
runtime's `on_processed` hook, after the processing span ended, and joins that span's attempt
by message id and delivery count.

Bodies hold vehicle locations: they are kept in a bounded ring in memory (the last
`RING_SIZE` deliveries) and never written anywhere by this module.
"""

from __future__ import annotations

import contextvars
import heapq
import json
import logging
import re
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from .. import telemetry_names as names
from ..events import InvalidEventError, parse_event, peek_envelope
from ..processor import InboundMessage, ProcessResult
from ..receiver import VERIFY_ANSWERED
from ..shapes import fingerprint
from ..vehicle_state import ApplyResult
from ..vehicle_state.rules import MAX_VALUE_DEPTH, nests_deeper

logger = logging.getLogger(__name__)

RING_SIZE = 500
#: Bodies, answers and headers kept at most, whatever the number of deliveries.
RING_BYTES = 32 * 1024 * 1024
#: A failed handler's message as the page shows it, at most this many characters.
ERROR_MESSAGE_SHOWN = 500
SIGNATURE_HEADER = "sc-signature"
#: How much of a signature the page shows: enough to compare with the sender's logs.
SIGNATURE_SHOWN = 8
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-functions-key",
                             "x-api-key"})
_HEX = re.compile(r"[0-9a-fA-F]*")

_current: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "inspector_delivery", default=None
)


def redact_header(name: str, value: str) -> str:
    """`SC-Signature` cut to its first 8 hex digits; credentials hidden entirely."""
    lowered = name.lower()
    if lowered == SIGNATURE_HEADER:
        shown = value[:SIGNATURE_SHOWN]
        if not _HEX.fullmatch(shown):
            return "[redacted: not a hex signature]"
        return f"{shown}… (redacted, {len(value)} characters)"
    if lowered in _SECRET_HEADERS:
        return "[redacted]"
    return value


@dataclass(slots=True)
class Attempt:
    """One processing of the message (one delivery from the queue), from its span."""

    at: datetime
    message_id: str | None
    delivery_count: int | None
    outcome: str | None
    dead_letter_reason: str | None
    error_type: str | None
    duration_ms: float
    #: What this processing did to the vehicle state store: the signals it changed, stored
    #: again unchanged, left alone as stale or skipped, the errors it opened and resolved
    #: (None: not applied). Kept as it came (immutable) and turned into JSON only when the
    #: page asks.
    vehicle_state: ApplyResult | None = None
    # From the host after the attempt (`Recorder.attempt_finished`): the handlers' own run
    # time, apart from parsing, settlement and any backoff, and what a failed one raised.
    handler_ms: float | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "messageId": self.message_id,
            "deliveryCount": self.delivery_count,
            "outcome": self.outcome or "interrupted",
            "deadLetterReason": self.dead_letter_reason,
            "errorType": self.error_type,
            "errorMessage": self.error_message,
            "handlerMs": None if self.handler_ms is None else round(self.handler_ms, 1),
            "durationMs": round(self.duration_ms, 1),
            "vehicleState": None if self.vehicle_state is None else self.vehicle_state.to_json(),
        }


@dataclass(slots=True)
class Delivery:
    """One webhook request as the host saw it, and what became of it."""

    id: int
    received_at: datetime
    route: str | None
    method: str | None
    headers: list[tuple[str, str]]
    body: bytes | None
    status: int | None = None
    response: bytes | None = None
    latency_ms: float | None = None
    outcome: str | None = None
    trace_id: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    version: int = 0
    #: The payload shape's fingerprint and whether the project knows it, from the receive
    #: span (set only for authenticated deliveries: shared/delivery_signals.py).
    shape_id: str | None = None
    shape_known: bool | None = None
    #: Whether the receiver verified its signature (the receive span's `authenticated`).
    authenticated: bool = False

    def trusted(self) -> bool:
        """Accepted by the receiver with a valid signature, or seen being processed: not
        something any stranger can add. A VERIFY is answered unsigned too, so an answered one
        counts only if it came with `SC-Signature` (the receiver refuses one whose signature
        does not match)."""
        if self.attempts:
            return True
        if self.status is None or not 200 <= self.status < 300:
            return False
        return self.outcome != VERIFY_ANSWERED or self.signature is not None

    @property
    def signature(self) -> str | None:
        """The `SC-Signature` it came with, whole (only ever sent back to this host)."""
        for name, value in self.headers:
            if name.lower() == SIGNATURE_HEADER:
                return value
        return None

    @property
    def replayable(self) -> bool:
        """Signed, and the receiver verified the signature: its bytes and signature, sent
        again, verify. (A 413 or a 503 for want of a token is answered before any check.)"""
        return (self.body is not None and self.route is not None and self.signature is not None
                and self.authenticated)

    def why(self) -> str | None:
        """The error the sender was answered with, for a rejected request."""
        if self.status is None or self.status < 300 or not self.response:
            return None
        try:
            answer = json.loads(self.response)
        except ValueError:
            return None
        error = answer.get("error") if isinstance(answer, dict) else None
        return str(error) if error is not None else None

    def summary(self) -> dict[str, Any]:
        envelope = peek_envelope(self.body) if self.body is not None else None
        last = self.attempts[-1] if self.attempts else None
        return {
            "id": self.id,
            "version": self.version,
            "receivedAt": self.received_at.isoformat(),
            "route": self.route,
            "status": self.status,
            "outcome": self.outcome,
            "why": self.why(),
            "eventType": envelope.event_type if envelope else None,
            "eventId": envelope.event_id if envelope else None,
            "vehicleId": envelope.vehicle_id if envelope else None,
            "latencyMs": None if self.latency_ms is None else round(self.latency_ms, 1),
            "processing": None if last is None else last.to_json(),
            "attempts": len(self.attempts),
            "replayable": self.replayable,
            "shape": None if self.shape_id is None else {
                "id": self.shape_id, "known": bool(self.shape_known)},
        }

    def detail(self) -> dict[str, Any]:
        doc = self.summary()
        doc["traceId"] = self.trace_id
        doc["headers"] = [[k, redact_header(k, v)] for k, v in self.headers]
        doc["response"] = None if self.response is None else self.response.decode(
            "utf-8", "replace"
        )
        doc["processingAttempts"] = [a.to_json() for a in self.attempts]
        # The first processing that applied the event: what it did to the stored state. A
        # retry applies the same event again and finds its readings stored by that first
        # one (all "stale"): those re-applications are named, not shown in its place.
        # Attempts are named by their place in `processingAttempts` (1 first): a retry is a
        # copy of the message, whose delivery count starts again.
        applied = [(n, a) for n, a in enumerate(doc["processingAttempts"], 1)
                   if a["vehicleState"] is not None]
        doc["vehicleState"] = applied[0][1]["vehicleState"] if applied else None
        doc["vehicleStateAppliedBy"] = applied[0][0] if applied else None
        doc["vehicleStateReappliedBy"] = [n for n, _ in applied[1:]]
        doc.update(describe_body(self.body))
        if doc["shape"] is not None and self.body is not None:
            shape = fingerprint(self.body)
            doc["shape"]["newParts"] = [] if shape is None else shape.unknown_parts()
        return doc


def curl_command(url: str, body: bytes, signature: str) -> str:
    """A bash command that POSTs `body` byte for byte with its original `SC-Signature`.

    The body goes through `printf '%s' $'...'` into `--data-binary @-`: ANSI-C quoting gives
    every byte exactly (a quote, a backslash, a newline, non-ASCII as \\xHH) and the body is
    never read as a curl option or an `@file`. A NUL byte cannot be passed in a shell word,
    so such a body has no command (ValueError)."""
    if b"\x00" in body:
        raise ValueError("the body holds a NUL byte, which a shell command cannot pass on")
    quoted = "".join(
        "\\'" if byte == 0x27 else "\\\\" if byte == 0x5C
        else chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"
        for byte in body
    )
    return (f"printf '%s' $'{quoted}' | curl -sS -X POST {shlex.quote(url)} "
            f"-H 'Content-Type: application/json' -H {shlex.quote('SC-Signature: ' + signature)} "
            "--data-binary @-")


def _iso(value: datetime | None) -> str | None:
    """UTC to the millisecond: what an `oemUpdatedAt` in epoch milliseconds can say."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: The deepest body shown indented: a stored value's MAX_VALUE_DEPTH levels within the few of
#: its event, with room to spare (indenting adds at most this many spaces to a line).
_INDENTED_DEPTH = 100


def describe_body(body: bytes | None) -> dict[str, Any]:
    """The body pretty-printed, and what the processor's parser reads from it."""
    if body is None:
        return {"body": None, "signals": [], "triggers": [], "errors": [], "parseError": None}
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body)
        # Indented, each level is two more spaces on each of its lines: a body nested n deep
        # would come out n² long (a 7 KB body, 18 MB). Deeper than a stored value may be
        # within its event, it is shown as it came.
        if not nests_deeper(parsed, _INDENTED_DEPTH):
            text = json.dumps(parsed, indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        pass  # shown as it came (too deeply nested, too): the processor will say what it reads
    doc: dict[str, Any] = {"body": text, "signals": [], "triggers": [], "errors": [],
                           "parseError": None}
    try:
        event = parse_event(body)
    except (InvalidEventError, RecursionError) as exc:
        doc["parseError"] = str(exc) or type(exc).__name__
        return doc
    doc["signals"] = [
        {
            "code": s.code,
            "path": s.path,
            "value": s.value if not nests_deeper(s.value) else f"(nested deeper than "
                                                               f"{MAX_VALUE_DEPTH} levels)",
            "unit": s.unit,
            "oemUpdatedAt": _iso(s.oem_updated_at),
            "status": "ok" if s.ok else f"{s.status or 'ERROR'} {s.error_code or ''}".strip(),
        }
        for s in event.signals
    ]
    doc["triggers"] = [
        {"type": t.type, "code": t.code, "path": t.path} for t in event.triggers
    ]
    doc["errors"] = [
        {"type": e.type, "code": e.code, "state": e.state, "description": e.description}
        for e in event.errors
    ]
    return doc


class Recorder:
    """The ring of recent deliveries; safe to call from any thread."""

    def __init__(self, *, capacity: int = RING_SIZE, max_bytes: int = RING_BYTES,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if capacity < 1:
            raise ValueError(f"the ring holds at least one delivery, got capacity {capacity}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._deliveries: OrderedDict[int, Delivery] = OrderedDict()
        # Ids of answered deliveries that were not trusted when last looked at, oldest first:
        # where `_trim` finds its victim without reading every delivery held (which, with a
        # full ring of accepted deliveries, it did for every new one). Entries are checked
        # when they come up; one whose delivery is gone or trusted now is dropped then.
        self._untrusted: list[int] = []
        self._by_trace: dict[str, int] = {}
        # Message id -> delivery, for the vehicle state results that follow a processing span.
        self._by_message: dict[str, int] = {}
        self._next_id = 1
        self._version = 0
        self.span_processor = _SpanTap(self)

    def attach(self, provider: Any = None) -> bool:
        """Read the spans of `provider` (default: the global one). False when it is not the
        OpenTelemetry SDK's (telemetry off): the page then lacks the decided outcomes."""
        provider = provider if provider is not None else trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            logger.warning("inspector: no OpenTelemetry SDK tracer provider; outcomes not shown")
            return False
        provider.add_span_processor(self.span_processor)
        return True

    # -- fed by the host -------------------------------------------------------------------
    def http_request(
        self, route: str, method: str, headers: Mapping[str, str], body: bytes
    ) -> Callable[[int, bytes], None]:
        """Record a request as it arrives; the returned callback records the answer.

        Call it in the task that runs the function: the receive span that ends in that task
        is attributed to this request. Only POSTs (webhook deliveries) are kept."""
        if method != "POST":
            return _ignore
        started = time.perf_counter()
        with self._lock:
            delivery = self._add(route=route, method=method,
                                 headers=list(headers.items()), body=bytes(body))
        _current.set(delivery)

        def answered(status: int, response: bytes) -> None:
            with self._lock:
                delivery.status = status
                delivery.response = bytes(response)
                delivery.latency_ms = (time.perf_counter() - started) * 1000.0
                if delivery.id in self._deliveries:
                    self._bytes += len(delivery.response)
                    self._note_trust(delivery)
                    self._trim(for_trusted=delivery.trusted())
                self._touch(delivery)

        return answered

    # -- fed by the spans ------------------------------------------------------------------
    def _receive_started(self, span: Span) -> None:
        # At the start, not the end: the message may be processed before the receive span
        # ends, and its processing must find this delivery by trace id.
        delivery = _current.get()
        if delivery is None:
            return
        with self._lock:
            delivery.trace_id = format(span.context.trace_id, "032x")
            if delivery.id in self._deliveries:
                self._by_trace[delivery.trace_id] = delivery.id

    def _receive_span(self, span: ReadableSpan) -> None:
        delivery = _current.get()
        if delivery is None:
            return
        attrs = span.attributes or {}
        shape_id, known = attrs.get(names.ATTR_SHAPE_ID), attrs.get(names.ATTR_SHAPE_KNOWN)
        with self._lock:
            delivery.outcome = str(attrs.get(names.ATTR_OUTCOME, "")) or None
            delivery.authenticated = attrs.get(names.ATTR_AUTHENTICATED) is True
            if isinstance(shape_id, str) and isinstance(known, bool):
                delivery.shape_id, delivery.shape_known = shape_id, known
            if delivery.id in self._deliveries:
                self._note_trust(delivery)  # an answered VERIFY is trusted only if signed
            self._touch(delivery)

    def _process_span(self, span: ReadableSpan) -> None:
        attrs = span.attributes or {}
        trace_id = format(span.context.trace_id, "032x") if span.context else None
        start, end = span.start_time or 0, span.end_time or 0
        count = attrs.get(names.ATTR_DELIVERY_COUNT)
        attempt = Attempt(
            at=datetime.fromtimestamp(end / 1e9, UTC) if end else self._clock(),
            message_id=_opt(attrs.get(names.ATTR_MESSAGE_ID)),
            delivery_count=int(count) if isinstance(count, int) else None,
            outcome=_opt(attrs.get(names.ATTR_OUTCOME)),
            dead_letter_reason=_opt(attrs.get(names.ATTR_DEAD_LETTER_REASON)),
            error_type=_opt(attrs.get(names.ATTR_ERROR_TYPE)),
            duration_ms=(end - start) / 1e6,
        )
        with self._lock:
            known = self._by_trace.get(trace_id) if trace_id else None
            delivery = self._deliveries.get(known) if known is not None else None
            if delivery is None:
                # Received before this run (or dropped from the ring): the attempt still shows.
                delivery = self._add(route=None, method=None, headers=[], body=None)
                delivery.received_at = attempt.at
                delivery.trace_id = trace_id
                if trace_id:
                    self._by_trace[trace_id] = delivery.id
            delivery.attempts.append(attempt)
            if attempt.message_id is not None:
                self._by_message[attempt.message_id] = delivery.id
            self._touch(delivery)

    # -- fed by the runtime's `on_processed` hook -------------------------------------------
    def processed(self, message: InboundMessage, result: ProcessResult) -> None:
        """Keep what applying the event did to the vehicle state, on the attempt (its span
        ended just before) of this message id and delivery count; nothing to keep without."""
        state = result.vehicle_state
        if state is None:
            return
        with self._lock:
            known = self._by_message.get(message.message_id)
            delivery = self._deliveries.get(known) if known is not None else None
            if delivery is None:
                return
            for attempt in reversed(delivery.attempts):
                if (attempt.message_id == message.message_id
                        and attempt.delivery_count == message.delivery_count):
                    attempt.vehicle_state = state
                    self._touch(delivery)
                    return

    def attempt_finished(self, message_id: str, delivery_count: int, handler_ms: float | None,
                         error: BaseException | None) -> None:
        """The host's account of an attempt whose processing span has ended: the handlers'
        own run time and, for a failure, the exception's type and message."""
        message = None
        if error is not None:
            text = str(error)
            message = (text if len(text) <= ERROR_MESSAGE_SHOWN
                       else text[: ERROR_MESSAGE_SHOWN - 1] + "…")
        with self._lock:
            for delivery in reversed(self._deliveries.values()):
                for attempt in reversed(delivery.attempts):
                    if (attempt.message_id == message_id
                            and attempt.delivery_count == delivery_count):
                        attempt.handler_ms = handler_ms
                        if error is not None:
                            attempt.error_type = type(error).__name__
                            attempt.error_message = message
                        self._touch(delivery)
                        return

    def original(self, delivery_id: int) -> tuple[str, bytes, str] | None:
        """(route, body, SC-Signature) of a replayable delivery, else None."""
        with self._lock:
            delivery = self._deliveries.get(delivery_id)
            if delivery is None or not delivery.replayable:
                return None
            assert delivery.route is not None and delivery.body is not None
            assert delivery.signature is not None
            return delivery.route, delivery.body, delivery.signature

    # -- read by the page ------------------------------------------------------------------
    def snapshot(self, version: int) -> tuple[int, list[dict[str, Any]], list[int]]:
        """The current version, the summaries of deliveries changed after `version`, and every
        id held, read together under one lock: every id it lists that changed after `version`
        has its summary in the same answer."""
        with self._lock:
            changed = [d for d in self._deliveries.values() if d.version > version]
            return (self._version, [d.summary() for d in reversed(changed)],
                    list(self._deliveries))

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._deliveries)

    def detail(self, delivery_id: int) -> dict[str, Any] | None:
        with self._lock:
            delivery = self._deliveries.get(delivery_id)
            return None if delivery is None else delivery.detail()

    # -- internals (lock held) --------------------------------------------------------------
    def _add(self, *, route: str | None, method: str | None,
             headers: list[tuple[str, str]], body: bytes | None) -> Delivery:
        delivery = Delivery(id=self._next_id, received_at=self._clock(), route=route,
                            method=method, headers=headers, body=body)
        self._next_id += 1
        self._deliveries[delivery.id] = delivery
        self._bytes += _size(delivery)
        self._trim(for_trusted=method is None)  # a processing seen: accepted before
        self._touch(delivery)
        return delivery

    def _trim(self, *, for_trusted: bool = False) -> None:
        """Over the count or the bytes, drop the oldest answered request that was not accepted
        (anyone can send those: a flood of them must not push real deliveries out). Only to
        make room for an accepted one (`for_trusted`) does the oldest accepted one go; a
        request still being answered waits until its answer says which it is."""
        while len(self._deliveries) > 1 and (len(self._deliveries) > self.capacity
                                             or self._bytes > self.max_bytes):
            victim = self._oldest_untrusted()
            if victim is None and for_trusted:
                victim = next(iter(self._deliveries.values()))
            if victim is None:
                return
            del self._deliveries[victim.id]
            self._bytes -= _size(victim)
            if victim.trace_id is not None and self._by_trace.get(victim.trace_id) == victim.id:
                del self._by_trace[victim.trace_id]
            for attempt in victim.attempts:
                if (attempt.message_id is not None
                        and self._by_message.get(attempt.message_id) == victim.id):
                    del self._by_message[attempt.message_id]

    def _note_trust(self, delivery: Delivery) -> None:
        """After a change that can make `delivery` untrusted (its answer, its outcome): if it
        is answered and not trusted, `_trim` may take it."""
        if delivery.status is not None and not delivery.trusted():
            heapq.heappush(self._untrusted, delivery.id)

    def _oldest_untrusted(self) -> Delivery | None:
        """The oldest answered delivery held that is not trusted, if any (`_untrusted`'s
        entries that no longer are one dropped on the way)."""
        while self._untrusted:
            delivery = self._deliveries.get(self._untrusted[0])
            if delivery is not None and delivery.status is not None and not delivery.trusted():
                return delivery
            heapq.heappop(self._untrusted)
        return None

    def _touch(self, delivery: Delivery) -> None:
        self._version += 1
        delivery.version = self._version


def _ignore(status: int, response: bytes) -> None:
    return None


def _size(delivery: Delivery) -> int:
    return (len(delivery.body or b"") + len(delivery.response or b"")
            + sum(len(k) + len(v) for k, v in delivery.headers))


def _opt(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


class _SpanTap(SpanProcessor):
    """Reads the receiver's and processor's spans as they end; exports nothing."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.name == names.SPAN_RECEIVE:
            self._recorder._receive_started(span)

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == names.SPAN_RECEIVE:
            self._recorder._receive_span(span)
        elif span.name == names.SPAN_PROCESS:
            self._recorder._process_span(span)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
