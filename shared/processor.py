"""Processing one queued event: parse, dispatch to handlers, decide the outcome.

Settlement follows the Functions host's built-in behaviour: returning completes the message,
raising abandons it, and the queue's `maxDeliveryCount` moves it to the dead-letter queue.
A handler failure is retried by a scheduled copy on the queue (shared/retry.py) and the
invocation returns: no backoff is waited out inside it. After `MAX_DELIVERY_COUNT` attempts
the event is dead-lettered with its attempt history. Unreadable payloads are dead-lettered at once
with reason `InvalidPayload`, and stale deliveries with reason `StaleDelivery`, through a
`DeadLetterer`; handlers never see either.

With the vehicle state store on (`store`), a readable, current event first meets the inbox:
an eventId whose handlers completed before is not handled again (counted as a duplicate).
Otherwise the store applies it, the handlers run (`on_change` ones with the changes the store
accepted, including those an earlier, interrupted or failed attempt stored), and only then is
the eventId recorded as processed. A failure anywhere in that sequence takes the failure path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, NoReturn, Protocol

from .clockcheck import CLOCK_WATCH, SKEW_WARNING_SECONDS
from .events import Event, InvalidEventError, parse_event, peek_envelope
from .handlers import RUNNING_HANDLER, HandlerContext, HandlerRegistry
from .publisher import (
    PROP_DEAD_LETTER_DELIVERY_COUNT,
    PROP_DEAD_LETTER_DESCRIPTION,
    PROP_DEAD_LETTER_REASON,
    PROP_RECEIVED_AT,
    PROP_REPLAY_COUNT,
    dead_letter_copy_id,
    message_id_for,
)
from .retry import (
    MAX_DELIVERY_COUNT_EXCEEDED,
    RetrySender,
    attempt_of,
    backoff_seconds,
    event_delivery_count,
    retry_copy,
    with_failure,
)
from .settings import Settings
from .telemetry import Telemetry, get_telemetry
from .telemetry_names import ATTR_VEHICLE_ERRORS, PROCESS_DEAD_LETTERED, PROCESS_RETRIED
from .vehicle_state import ApplyResult, VehicleStateStore, conflicts_met
from .vehicle_state import rules as vehicle_state_rules

logger = logging.getLogger(__name__)

INVALID_PAYLOAD = "InvalidPayload"
STALE_DELIVERY = "StaleDelivery"


class Outcome(StrEnum):
    HANDLED = "handled"
    UNHANDLED = "unhandled"
    DEAD_LETTERED = "dead_lettered"
    #: A handler failed and a scheduled copy will try again: not a final outcome.
    RETRIED = "retried"


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """What the processor needs of a received message, whichever queue it came from."""

    body: bytes
    message_id: str
    delivery_count: int
    sequence_number: int | None = None
    application_properties: Mapping[str, Any] = field(default_factory=dict)
    enqueued_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ProcessResult:
    outcome: Outcome
    event: Event | None = None
    description: str | None = None
    #: The dead-letter reason, when the outcome is DEAD_LETTERED.
    reason: str | None = None
    #: The handler's exception class, when the outcome is RETRIED or a last failed attempt.
    error_type: str | None = None
    #: What the vehicle state store did with the event (None: store off, or not applied).
    vehicle_state: ApplyResult | None = None
    #: The eventId's handlers had completed before: they did not run again (the inbox).
    duplicate: bool = False


class HandlerFailedError(RuntimeError):
    """A handler raised; the message is abandoned and redelivered (or dead-lettered)."""


def handler_budget_for(function_timeout: float) -> float:
    """The store's and the handlers' share of a function timeout: all but 30 s (a tenth of
    shorter ones), left for scheduling the retry and settling the message before the host's
    timeout, which in Azure restarts the whole worker (every delivery and request in it)."""
    return function_timeout - min(30.0, function_timeout / 10)


class HandlerTimeoutError(TimeoutError):
    """The store and the handlers of an attempt ran past `handler_budget`: cancelled, and
    failed as a handler that raised."""


class DeadLetterCopyError(RuntimeError):
    """The message is a copy on its way to the dead-letter queue; it is never processed."""


class DeadLetterer(Protocol):
    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        """Move `message` to the dead-letter queue with a reason. Raises on failure."""
        ...


class OutcomeLog(Protocol):
    """Where local mode records each final outcome (`shared/local`'s `HandledLog`)."""

    def append(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class ServiceBusDeadLetterer:
    """Dead-letters with a reason although the host, not this code, settles the message.

    The Python worker's built-in Service Bus binding cannot dead-letter explicitly (only the
    preview SDK-type bindings can). So the processor sends a copy carrying `deadLetterReason`
    and `deadLetterDescription` with a one-second time-to-live: the queue has
    `deadLetteringOnMessageExpiration`, so the copy lands in the dead-letter queue with those
    properties, and the original is completed. A copy that is delivered before it expires is
    refused (`DeadLetterCopyError`) and ends there all the same.
    """

    def __init__(self, send: Callable[[Any], Awaitable[None]]) -> None:
        self._send = send

    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        from azure.servicebus import ServiceBusMessage

        props: dict[str | bytes, Any] = {k: v for k, v in message.application_properties.items()}
        props[PROP_DEAD_LETTER_REASON] = reason
        props[PROP_DEAD_LETTER_DESCRIPTION] = description
        props[PROP_DEAD_LETTER_DELIVERY_COUNT] = event_delivery_count(
            message.application_properties, message.delivery_count)
        copy = ServiceBusMessage(
            message.body,
            message_id=dead_letter_copy_id(message.message_id),
            application_properties=props,
            time_to_live=timedelta(seconds=1),
        )
        await self._send(copy)


def received_at(properties: Mapping[str, Any]) -> datetime | None:
    """The receiver's `receivedAt` stamp; None when absent or unreadable (a message queued by
    a version that did not stamp it is not checked for staleness)."""
    raw = properties.get(PROP_RECEIVED_AT)
    try:
        return datetime.fromtimestamp(int(str(raw)) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def delivery_age(event: Event, received: datetime | None) -> float | None:
    """Seconds from `meta.deliveredAt` to the time of receipt (negative: deliveredAt is ahead
    of this host's clock); None when either is unknown."""
    delivered = event.meta.delivered_at
    if delivered is None or received is None:
        return None
    return (received - delivered).total_seconds()


def staleness(event: Event, received: datetime | None, max_age_seconds: float) -> str | None:
    """Why the delivery is stale, or None: its age at receipt (`received` minus
    `meta.deliveredAt`) is over `max_age_seconds`.

    Only an old deliveredAt is stale: that is what a captured delivery sent again looks like.
    One in the future cannot be a replay (Smartcar signed it), so it is this host's clock
    that is behind: the event is processed, and the skew is counted and warned about.
    """
    age = delivery_age(event, received)
    if age is None or age <= max_age_seconds:
        return None
    delivered, at = event.meta.delivered_at, received
    assert delivered is not None and at is not None
    return (
        f"meta.deliveredAt {delivered.isoformat()} was {age:.0f} s old when received at "
        f"{at.isoformat()}, over MAX_DELIVERY_AGE_SECONDS ({max_age_seconds:.0f} s): "
        "a replay, or a delivery held back (or this host's clock is ahead)"
    )


def _check_age(message: InboundMessage, event: Event, settings: Settings) -> str | None:
    """The staleness verdict for a delivery (None: process it); feeds the clock watch.

    A replayed dead letter (`replayCount`, set by `dlq replay`) is not checked: replaying a
    StaleDelivery is the operator's decision that the event should be processed."""
    if PROP_REPLAY_COUNT in message.application_properties:
        return None
    received = received_at(message.application_properties)
    age = delivery_age(event, received)
    if age is None:
        return None
    stale = staleness(event, received, settings.max_delivery_age_seconds)
    CLOCK_WATCH.record(age, stale=stale is not None)
    if age < -SKEW_WARNING_SECONDS:
        logger.warning(
            "event %s: meta.deliveredAt is %.0f s ahead of this host's clock at receipt; "
            "processing it, but this host's clock is probably behind (check NTP)",
            event.event_id, -age,
        )
    return stale


def outcome_record(
    message: InboundMessage,
    outcome: str,
    *,
    event: Event | None = None,
    reason: str | None = None,
    description: str | None = None,
    vehicle_state: ApplyResult | None = None,
    duplicate: bool = False,
) -> dict[str, Any]:
    """One line of `handled.jsonl`: a final outcome of one message (docs/how-it-works.md).

    The ids come from the parsed event, or, for a payload that could not be parsed, from
    whatever of them the body holds (None when absent)."""
    ids: tuple[str | None, str | None, str | None]
    if event is not None:
        ids = (event.event_id, event.event_type, event.vehicle_id)
    else:
        envelope = peek_envelope(message.body)
        ids = (envelope.event_id, envelope.event_type, envelope.vehicle_id)
    event_id, event_type, vehicle_id = ids
    record: dict[str, Any] = {
        "eventId": event_id,
        "eventType": event_type,
        "vehicleId": vehicle_id,
        "deliveryCount": event_delivery_count(message.application_properties,
                                              message.delivery_count),
        "messageId": message.message_id,
        "outcome": outcome,
        "handledAt": datetime.now(UTC).isoformat(),
    }
    if reason is not None:
        record["reason"] = reason
        record["description"] = description
    if vehicle_state is not None:
        record["vehicleState"] = vehicle_state.to_json()
    if duplicate:
        record["duplicate"] = True
    return record


def retry_delay(delivery_count: int, settings: Settings) -> float:
    """How long a failed delivery waits before it is released for the next one: the backoff,
    or nothing after the last delivery (the message is dead-lettered instead)."""
    if delivery_count >= settings.max_delivery_count:
        return 0.0
    return backoff_seconds(
        delivery_count,
        base=settings.retry_backoff_base_seconds,
        maximum=settings.retry_backoff_max_seconds,
    )


async def process_message(
    message: InboundMessage,
    *,
    settings: Settings,
    registry: HandlerRegistry,
    dead_letterer: DeadLetterer,
    retry_sender: RetrySender,
    handled_log: OutcomeLog | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    telemetry: Telemetry | None = None,
    clock: Callable[[], float] = time.time,
    store: VehicleStateStore | None = None,
    handler_budget: float | None = None,
) -> ProcessResult:
    """Process one message. Returns on completion (also when a handler failed and its retry
    is scheduled); raises to have the message abandoned.

    `handler_budget`: seconds the store and the handlers may take before they are cancelled
    and the attempt fails as a handler failure would (retry scheduled, dead letter after the
    last); None for no bound of its own (the local host cancels the whole function at its
    timeout instead)."""
    telemetry = telemetry or get_telemetry()
    with telemetry.observe_process(
        message.application_properties,
        message_id=message.message_id,
        delivery_count=message.delivery_count,
    ) as observed:
        try:
            result = await _process(
                message, settings=settings, registry=registry, dead_letterer=dead_letterer,
                retry_sender=retry_sender, clock=clock, store=store, telemetry=telemetry,
                handler_budget=handler_budget,
            )
        except HandlerFailedError as exc:
            # The retry (or dead letter) could not be sent: the original is abandoned and
            # delivered again, which tries again.
            observed.outcome = PROCESS_RETRIED
            observed.error_type = type(exc.__cause__ or exc).__name__
            raise
        except DeadLetterCopyError:
            raise  # not an event: no outcome, no metrics
        except Exception as exc:
            # E.g. an InvalidPayload or StaleDelivery whose dead letter could not be sent: the
            # message is abandoned and delivered again, a failed attempt like a handler's, so
            # the span, the metric and the failure queries see it.
            observed.outcome = PROCESS_RETRIED
            observed.error_type = type(exc).__name__
            raise
        if result.vehicle_state is not None:
            errors = error_summary(result.vehicle_state)
            if errors:
                observed.extra[ATTR_VEHICLE_ERRORS] = errors
        if result.outcome is Outcome.RETRIED:  # not final: handled.jsonl waits for the end
            observed.outcome = PROCESS_RETRIED
            observed.error_type = result.error_type
            return result
        if handled_log is not None:
            try:
                handled_log.append(outcome_record(
                    message, str(result.outcome), event=result.event, reason=result.reason,
                    description=result.description, vehicle_state=result.vehicle_state,
                    duplicate=result.duplicate))
            except OSError as exc:
                last = message.delivery_count >= settings.max_delivery_count
                observed.outcome = PROCESS_DEAD_LETTERED if last else PROCESS_RETRIED
                observed.error_type = type(exc).__name__
                await _unrecorded(message, settings, sleep, exc, last=last)
        observed.outcome = str(result.outcome)
        if result.outcome is Outcome.DEAD_LETTERED:
            if result.reason == MAX_DELIVERY_COUNT_EXCEEDED:
                # A handler's last failure: named by its error, as every failed attempt is
                # (the queries and the inspector tell it from an unreadable payload so).
                observed.error_type = result.error_type
            else:
                observed.dead_letter_reason = result.reason or INVALID_PAYLOAD
        if result.event is not None:
            observed.event_type = result.event.event_type
            observed.event_id = result.event.event_id
            observed.vehicle_id = result.event.vehicle_id
            if PROP_REPLAY_COUNT not in message.application_properties:
                # A replayed dead letter is as old as the operator's decision to replay it:
                # its age is not a lag of the pipeline, and would set off the lag alert.
                observed.delivered_at = result.event.meta.delivered_at
        return result


#: What `error_summary` percent-encodes in an error's type and code: its own separators, the
#: escape character, and '+' (which some URL decoders read as a space).
_SUMMARY_ESCAPES: Final = str.maketrans(
    {"%": "%25", ";": "%3B", " ": "%20", ":": "%3A", "+": "%2B"})


def error_summary(state: ApplyResult) -> str:
    """The span attribute the open-errors query reads: each error the event touched, with the
    state the store now holds for it (`OPEN TYPE:CODE;RESOLVED TYPE:CODE`). A type or code
    holding a separator has it percent-encoded (the query's `url_decode` restores it)."""
    return ";".join(
        f"{error.state} {error.type.translate(_SUMMARY_ESCAPES)}:"
        f"{(error.code or '').translate(_SUMMARY_ESCAPES)}"
        for error in (*state.errors_opened, *state.errors_resolved)
    )


async def _unrecorded(
    message: InboundMessage,
    settings: Settings,
    sleep: Callable[[float], Awaitable[None]],
    exc: OSError,
    *,
    last: bool,
) -> NoReturn:
    """The outcome could not be written to handled.jsonl (a full disk): a failed delivery like
    a handler failure, retried after the same backoff, never at once."""
    delay = retry_delay(message.delivery_count, settings)
    logger.warning(
        "cannot record message %s in handled.jsonl (delivery %d of %d): %s; %s",
        message.message_id, message.delivery_count, settings.max_delivery_count, exc,
        "it will be dead-lettered" if last else f"retrying in {delay:.1f}s",
    )
    if delay > 0:
        await sleep(delay)
    raise HandlerFailedError(
        f"outcome of message {message.message_id} not recorded: {type(exc).__name__}"
    ) from exc


async def _process(
    message: InboundMessage,
    *,
    settings: Settings,
    registry: HandlerRegistry,
    dead_letterer: DeadLetterer,
    retry_sender: RetrySender,
    clock: Callable[[], float],
    store: VehicleStateStore | None = None,
    telemetry: Telemetry | None = None,
    handler_budget: float | None = None,
) -> ProcessResult:
    if PROP_DEAD_LETTER_REASON in message.application_properties:
        raise DeadLetterCopyError(
            f"message {message.message_id} is a dead-letter copy; refusing it so it expires"
        )
    try:
        event = parse_event(message.body)
    except InvalidEventError as exc:
        description = str(exc)
        logger.warning(
            "message %s is not a readable Smartcar event (%s); dead-lettering it as %s",
            message.message_id,
            description,
            INVALID_PAYLOAD,
        )
        await dead_letterer.dead_letter(message, reason=INVALID_PAYLOAD, description=description)
        return ProcessResult(Outcome.DEAD_LETTERED, description=description,
                             reason=INVALID_PAYLOAD)

    stale = _check_age(message, event, settings)
    if stale is not None:
        logger.warning(
            "event %s (message %s) is a stale delivery (%s); dead-lettering it as %s",
            event.event_id, message.message_id, stale, STALE_DELIVERY,
        )
        await dead_letterer.dead_letter(message, reason=STALE_DELIVERY, description=stale)
        return ProcessResult(Outcome.DEAD_LETTERED, event=event, description=stale,
                             reason=STALE_DELIVERY)

    logger.debug("processing event %s body=%r", event.event_id, message.body)
    context = HandlerContext(
        settings=settings, message_id=message.message_id,
        delivery_count=event_delivery_count(message.application_properties,
                                            message.delivery_count),
    )
    applied = Applied()
    budget = asyncio.timeout(handler_budget)
    try:
        async with budget:
            handled = await run_handlers(event, context, registry, store,
                                         telemetry or get_telemetry(), applied=applied)
    except Exception as exc:
        if isinstance(exc, TimeoutError) and budget.expired():
            handler = RUNNING_HANDLER.get() or "(none: the store)"
            logger.warning("event %s: the handlers ran past their budget (%g s, under the "
                           "function timeout) in %s, which was cancelled; the attempt "
                           "fails", event.event_id, handler_budget, handler)
            exc = HandlerTimeoutError(f"the handlers ran past their {handler_budget:g} s "
                                      f"budget in {handler}")
        failed = await _handler_failed(message, event, exc, settings=settings,
                                       dead_letterer=dead_letterer, retry_sender=retry_sender,
                                       now=clock())
        # What the store did before the handlers failed is done: the attempt reports it (the
        # open-errors query reads it from every attempt, a failed one included).
        return replace(failed, vehicle_state=applied.state)

    if handled.duplicate:
        logger.info("event %s was processed before (its eventId is in the inbox); its handlers "
                    "do not run again", event.event_id)
        return ProcessResult(Outcome.HANDLED, event=event, duplicate=True,
                             description="eventId processed before")
    outcome = Outcome.HANDLED if handled.ran else Outcome.UNHANDLED
    if not handled.ran and registry.has_handlers_for(event.event_type):
        logger.info("no handler ran for event %s of type %s: none is registered for the "
                    "signals it holds or the changes it stored", event.event_id,
                    event.event_type)
    elif not handled.ran:
        logger.info("no handler for event %s of type %s", event.event_id, event.event_type)
    return ProcessResult(outcome, event=event, vehicle_state=handled.state)


@dataclass(frozen=True, slots=True)
class Handled:
    #: Whether a handler ran (False for a duplicate: none was called).
    ran: bool = False
    duplicate: bool = False
    state: ApplyResult | None = None


@dataclass(slots=True)
class Applied:
    """What the store did with an event, set by `run_handlers` as soon as it is known."""

    state: ApplyResult | None = None


async def run_handlers(
    event: Event,
    context: HandlerContext,
    registry: HandlerRegistry,
    store: VehicleStateStore | None,
    telemetry: Telemetry,
    *,
    applied: Applied | None = None,
) -> Handled:
    """The inbox check, the store, the handlers, the inbox record: in this order, so a crash
    or a failure anywhere before the record runs the handlers again on the next attempt, with
    the changes the store kept for them. `applied.state` is set to the store's result as soon
    as there is one, for the caller to report when the handlers then fail."""
    if store is None:
        return Handled(ran=await registry.dispatch(event, context))
    unkeyed = vehicle_state_rules.unkeyed(event)
    if unkeyed is not None:
        # Neither backend can key such an id: no store, no inbox, for it.
        logger.warning("an event whose vehicleId or eventId no store can key (%s: not Unicode, "
                       "or over %d characters) is not stored (its %d signals or errors are "
                       "skipped); its handlers run without the inbox",
                       vehicle_state_rules.unkeyed_reason(event),
                       vehicle_state_rules.MAX_ID_CHARS, len(unkeyed.skipped))
        telemetry.record_vehicle_state(unkeyed)
        if applied is not None:
            applied.state = unkeyed
        return Handled(ran=await registry.dispatch(event, context.with_vehicle_state(unkeyed)),
                       state=unkeyed)
    if await store.is_processed(event.vehicle_id, event.event_id):
        telemetry.record_inbox_duplicate()
        return Handled(duplicate=True)
    try:
        state = await store.apply(event, outbox=registry.change_filter)
    except Exception as exc:  # the conflicts it met count, though it gave up or failed
        if conflicts := conflicts_met(exc):
            telemetry.record_vehicle_state(ApplyResult(conflicts_retried=conflicts))
        raise
    telemetry.record_vehicle_state(state)
    if applied is not None:
        applied.state = state
    ran = await registry.dispatch(event, context.with_vehicle_state(state),
                                  changes=state.pending)
    await store.mark_processed(event.vehicle_id, event.event_id)
    return Handled(ran=ran, state=state)


async def _handler_failed(
    message: InboundMessage,
    event: Event,
    exc: Exception,
    *,
    settings: Settings,
    dead_letterer: DeadLetterer,
    retry_sender: RetrySender,
    now: float,
) -> ProcessResult:
    """A handler raised: schedule the next attempt as a copy on the queue, or after the last
    attempt dead-letter the event with its history. Raises HandlerFailedError only when that
    send fails (the original is then abandoned and redelivered, and tries the send again)."""
    attempt = attempt_of(message.application_properties)
    error_type = type(exc).__name__
    last = attempt >= settings.max_delivery_count
    # The error's text often quotes the payload value a handler choked on (a location): it
    # is for DEBUG only; above it, the type names the failure (SECURITY.md).
    logger.debug("handler failed for event %s (attempt %d): %s: %s", event.event_id, attempt,
                 error_type, exc, exc_info=exc)
    try:
        if last:
            props, history = with_failure(message.application_properties, attempt, exc, now)
            description = (
                f"handler failed in {attempt} delivery attempts "
                f"(MAX_DELIVERY_COUNT={settings.max_delivery_count}): "
                + ", ".join(f"{h.get('attempt')} {h.get('error')} at {h.get('failedAt')}"
                            for h in history)
            )
            logger.warning(
                "handler failed for event %s (%s, attempt %d of %d): %s; dead-lettering "
                "it as %s", event.event_id, event.event_type, attempt,
                settings.max_delivery_count, error_type, MAX_DELIVERY_COUNT_EXCEEDED,
            )
            await dead_letterer.dead_letter(
                replace(message, application_properties=props),
                reason=MAX_DELIVERY_COUNT_EXCEEDED, description=description,
            )
            return ProcessResult(Outcome.DEAD_LETTERED, event=event, description=description,
                                 reason=MAX_DELIVERY_COUNT_EXCEEDED, error_type=error_type)
        copy = retry_copy(
            message.body, message.application_properties,
            event_key=message_id_for(message.body, event.event_id), error=exc, now=now,
            base=settings.retry_backoff_base_seconds,
            maximum=settings.retry_backoff_max_seconds,
        )
        logger.warning(
            "handler failed for event %s (%s, attempt %d of %d): %s; retrying in %.1fs "
            "as message %s", event.event_id, event.event_type, attempt,
            settings.max_delivery_count, error_type, copy.delay_seconds, copy.message_id,
        )
        await retry_sender.schedule(copy)
    except Exception as send_exc:
        logger.warning(
            "cannot %s event %s after its handler failed: %s; the message is abandoned and "
            "delivered again", "dead-letter" if last else "schedule the retry of",
            event.event_id, type(send_exc).__name__,
        )
        raise HandlerFailedError(
            f"handler failed for event {event.event_id}: {error_type}"
        ) from exc
    return ProcessResult(Outcome.RETRIED, event=event, description=str(exc),
                         error_type=error_type)
