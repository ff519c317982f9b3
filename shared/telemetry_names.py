"""Every telemetry name the code emits: one constant per name, nothing else.

The ops queries in `infra/queries/*.kql` use exactly these names (tests/test_observability.py
checks it). In Application Insights, metrics land in `customMetrics` (`name`, `value`,
`valueCount`, `valueSum`) with their attributes in `customDimensions`; spans land in
`requests` (kind SERVER or CONSUMER) with their attributes in `customDimensions`.
Changing a name breaks the queries, the alerts and the workbook: change them together.
"""

from __future__ import annotations

from typing import Final

# Instrumentation scope (tracer and meter name).
SCOPE: Final = "smartcar.webhooks"

# --- Metrics ---------------------------------------------------------------------------------
#: Counter, one per webhook POST answered; attributes `outcome` (a receiver outcome),
#: `eventType` (only once the request is authenticated, else "unknown"), `httpStatus`.
WEBHOOK_RECEIVED: Final = "smartcar.webhook.received"
#: Histogram (ms): time to decide and answer one POST; same attributes as WEBHOOK_RECEIVED.
WEBHOOK_RECEIVE_DURATION: Final = "smartcar.webhook.receive.duration"
#: Counter, one per processing attempt; attributes `eventType`, `outcome` (EVENT_* below).
EVENT_PROCESSED: Final = "smartcar.event.processed"
#: Histogram (ms): time to process one delivery of a message; `eventType`, `outcome`.
EVENT_PROCESS_DURATION: Final = "smartcar.event.process.duration"
#: Histogram (ms): processing time minus the event's `meta.deliveredAt`; `eventType`.
EVENT_DELIVERY_LAG: Final = "smartcar.event.delivery_lag"
#: Counter: webhooks stored in the blob spill-over because Service Bus was unavailable.
#: Reserved for the reliability work (the spill-over publisher records it).
WEBHOOK_SPILLED: Final = "smartcar.webhook.spilled"
#: Counter: spilled webhooks re-driven from blob storage to the queue (the timer function).
SPILL_REDRIVEN: Final = "smartcar.spill.redriven"
#: Counter: authenticated deliveries that repeat an eventId with a new meta.deliveryId, i.e.
#: Smartcar retrying because it did not get our 2xx in time (per instance: a lower bound;
#: shared/delivery_signals.py); attribute `eventType`.
WEBHOOK_REDELIVERED: Final = "smartcar.webhook.redelivered"
#: Histogram (ms): our answer's time minus meta.deliveredAt (Smartcar's clock, not ours;
#: negative counts as 0); `eventType`. Also the receive span's `deliveryToAnswerMs`.
WEBHOOK_DELIVERY_TO_ANSWER: Final = "smartcar.webhook.delivery_to_answer"
#: Counter: a payload shape seen for the first time by an instance (shared/shapes.py);
#: attributes `shapeId`, `shapeKnown` ("true"/"false"), `eventType`, `metaVersion`.
PAYLOAD_SHAPE_FIRST_SEEN: Final = "smartcar.payload.shape.first_seen"

#: Counters of the vehicle state store (shared/vehicle_state), per applied event:
#: signal readings stored, readings left alone because the store held a newer or the same
#: one, signals recorded with a caveat or skipped (attribute `reason`), conditional writes
#: that lost a race with another instance and were retried, and deliveries of an eventId
#: whose handlers had already completed (the inbox; handlers did not run again).
VEHICLE_STATE_APPLIED: Final = "smartcar.vehicle_state.applied"
VEHICLE_STATE_STALE: Final = "smartcar.vehicle_state.stale"
VEHICLE_STATE_SKIPPED: Final = "smartcar.vehicle_state.skipped"
VEHICLE_STATE_CONFLICTS: Final = "smartcar.vehicle_state.conflicts_retried"
VEHICLE_STATE_DUPLICATES: Final = "smartcar.vehicle_state.inbox_duplicates"

METRICS: Final = frozenset(
    {
        VEHICLE_STATE_APPLIED,
        VEHICLE_STATE_STALE,
        VEHICLE_STATE_SKIPPED,
        VEHICLE_STATE_CONFLICTS,
        VEHICLE_STATE_DUPLICATES,
        WEBHOOK_RECEIVED,
        WEBHOOK_RECEIVE_DURATION,
        EVENT_PROCESSED,
        EVENT_PROCESS_DURATION,
        EVENT_DELIVERY_LAG,
        WEBHOOK_SPILLED,
        SPILL_REDRIVEN,
        WEBHOOK_REDELIVERED,
        WEBHOOK_DELIVERY_TO_ANSWER,
        PAYLOAD_SHAPE_FIRST_SEEN,
    }
)

# --- Spans -----------------------------------------------------------------------------------
#: SERVER span around one webhook POST (the receive decision and the enqueue).
SPAN_RECEIVE: Final = "smartcar.webhook.receive"
#: CONSUMER span around one delivery of a queued event; child of SPAN_RECEIVE through the
#: message's `traceparent` / `Diagnostic-Id` application properties.
SPAN_PROCESS: Final = "smartcar.event.process"

SPANS: Final = frozenset({SPAN_RECEIVE, SPAN_PROCESS})

# --- Attributes (metric dimensions and span attributes) -------------------------------------
# Same spelling as the message application properties (shared/publisher.py PROP_*).
ATTR_OUTCOME: Final = "outcome"
ATTR_EVENT_TYPE: Final = "eventType"
ATTR_EVENT_ID: Final = "eventId"  # spans only: one value per event
ATTR_VEHICLE_ID: Final = "vehicleId"  # spans only
ATTR_MESSAGE_ID: Final = "messageId"  # spans only
ATTR_DELIVERY_COUNT: Final = "deliveryCount"  # spans only
ATTR_MODE: Final = "mode"  # spans only: LIVE or TEST
ATTR_HTTP_STATUS: Final = "httpStatus"
ATTR_DEAD_LETTER_REASON: Final = "deadLetterReason"  # spans only, when dead-lettered
ATTR_ERROR_TYPE: Final = "errorType"  # spans only: the exception class name, never its text
#: VEHICLE_STATE_SKIPPED only: why (shared/vehicle_state/rules.py: undated, too-large, ...).
ATTR_REASON: Final = "reason"
#: Spans only, VEHICLE_ERROR events: each error the event touched with the state the store
#: now holds for it, `OPEN TYPE:CODE;RESOLVED TYPE:CODE` (infra/queries/open_vehicle_errors.kql).
ATTR_VEHICLE_ERRORS: Final = "vehicleErrors"
ATTR_SHAPE_ID: Final = "shapeId"  # the payload shape's fingerprint (shared/shapes.py)
ATTR_SHAPE_KNOWN: Final = "shapeKnown"  # true when the project reads every part of the shape
ATTR_META_VERSION: Final = "metaVersion"  # metric PAYLOAD_SHAPE_FIRST_SEEN only
ATTR_DELIVERY_TO_ANSWER_MS: Final = "deliveryToAnswerMs"  # receive span: answer - deliveredAt
ATTR_REDELIVERY: Final = "redelivery"  # receive span: true for a Smartcar retry
#: Receive span: true once the signature verified (whatever the answer then was).
ATTR_AUTHENTICATED: Final = "authenticated"

ATTRIBUTES: Final = frozenset(
    {
        ATTR_OUTCOME,
        ATTR_EVENT_TYPE,
        ATTR_EVENT_ID,
        ATTR_VEHICLE_ID,
        ATTR_MESSAGE_ID,
        ATTR_DELIVERY_COUNT,
        ATTR_MODE,
        ATTR_HTTP_STATUS,
        ATTR_DEAD_LETTER_REASON,
        ATTR_ERROR_TYPE,
        ATTR_REASON,
        ATTR_VEHICLE_ERRORS,
        ATTR_SHAPE_ID,
        ATTR_SHAPE_KNOWN,
        ATTR_META_VERSION,
        ATTR_DELIVERY_TO_ANSWER_MS,
        ATTR_REDELIVERY,
        ATTR_AUTHENTICATED,
    }
)

# `eventType` value on metrics for requests that were not authenticated: their body is
# attacker-controlled, so its eventType must not become a metric dimension.
UNKNOWN_EVENT_TYPE: Final = "unknown"

# --- Processing outcomes (values of `outcome` on EVENT_* metrics and SPAN_PROCESS) ----------
PROCESS_HANDLED: Final = "handled"
PROCESS_UNHANDLED: Final = "unhandled"
PROCESS_RETRIED: Final = "retried"
PROCESS_DEAD_LETTERED: Final = "dead_lettered"

PROCESS_OUTCOMES: Final = frozenset(
    {PROCESS_HANDLED, PROCESS_UNHANDLED, PROCESS_RETRIED, PROCESS_DEAD_LETTERED}
)

# --- Trace context on queued messages (application properties) -----------------------------
#: W3C Trace Context, https://www.w3.org/TR/trace-context/.
PROP_TRACEPARENT: Final = "traceparent"
PROP_TRACESTATE: Final = "tracestate"
#: Service Bus's own convention for the same traceparent value.
PROP_DIAGNOSTIC_ID: Final = "Diagnostic-Id"
