"""Processing one queued event: parse, dispatch to handlers, decide the outcome.

Settlement follows the Functions host's built-in behaviour: returning completes the message,
raising abandons it, and the queue's `maxDeliveryCount` moves it to the dead-letter queue.
Abandon redelivers at once, so a handler failure waits (asynchronously, with exponential
backoff on the delivery count) before re-raising. Unreadable payloads are dead-lettered at once
with reason `InvalidPayload`, and stale deliveries with reason `StaleDelivery`, through a
`DeadLetterer`; handlers never see either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NoReturn, Protocol

from .events import Event, InvalidEventError, parse_event, peek_envelope
from .handlers import HandlerContext, HandlerRegistry
from .publisher import (
    PROP_DEAD_LETTER_DESCRIPTION,
    PROP_DEAD_LETTER_REASON,
    PROP_RECEIVED_AT,
    dead_letter_copy_id,
)
from .settings import Settings
from .telemetry import Telemetry, get_telemetry
from .telemetry_names import PROCESS_DEAD_LETTERED, PROCESS_RETRIED
from .vehicle_state import ApplyResult

logger = logging.getLogger(__name__)

INVALID_PAYLOAD = "InvalidPayload"
STALE_DELIVERY = "StaleDelivery"
#: How far `meta.deliveredAt` may be ahead of the time of receipt (clocks differ) before the
#: delivery counts as stale.
MAX_DELIVERY_AHEAD_SECONDS = 300.0


class Outcome(StrEnum):
    HANDLED = "handled"
    UNHANDLED = "unhandled"
    DEAD_LETTERED = "dead_lettered"


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
    #: What the vehicle state store did with the event (None: store off, or not applied).
    vehicle_state: ApplyResult | None = None


class HandlerFailedError(RuntimeError):
    """A handler raised; the message is abandoned and redelivered (or dead-lettered)."""


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


def staleness(event: Event, received: datetime | None, max_age_seconds: float) -> str | None:
    """Why the delivery is stale, or None: its age at receipt (`received` minus
    `meta.deliveredAt`) is over `max_age_seconds`, or it is more than 300 s in the future."""
    delivered = event.meta.delivered_at
    if delivered is None or received is None:
        return None
    age = (received - delivered).total_seconds()
    if age > max_age_seconds:
        return (
            f"meta.deliveredAt {delivered.isoformat()} was {age:.0f} s old when received at "
            f"{received.isoformat()}, over MAX_DELIVERY_AGE_SECONDS ({max_age_seconds:.0f} s): "
            "a replay, or a delivery held back"
        )
    if age < -MAX_DELIVERY_AHEAD_SECONDS:
        return (
            f"meta.deliveredAt {delivered.isoformat()} was {-age:.0f} s in the future when "
            f"received at {received.isoformat()}, over {MAX_DELIVERY_AHEAD_SECONDS:.0f} s ahead"
        )
    return None


def outcome_record(
    message: InboundMessage,
    outcome: str,
    *,
    event: Event | None = None,
    reason: str | None = None,
    description: str | None = None,
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
        "deliveryCount": message.delivery_count,
        "messageId": message.message_id,
        "outcome": outcome,
        "handledAt": datetime.now(UTC).isoformat(),
    }
    if reason is not None:
        record["reason"] = reason
        record["description"] = description
    return record


def backoff_seconds(delivery_count: int, *, base: float, maximum: float) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped at `maximum`."""
    exponent = max(delivery_count - 1, 0)
    return float(min(base * (2 ** min(exponent, 30)), maximum))


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
    handled_log: OutcomeLog | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    telemetry: Telemetry | None = None,
) -> ProcessResult:
    """Process one message. Returns on completion; raises to have the message abandoned."""
    with (telemetry or get_telemetry()).observe_process(
        message.application_properties,
        message_id=message.message_id,
        delivery_count=message.delivery_count,
    ) as observed:
        try:
            result = await _process(
                message, settings=settings, registry=registry, dead_letterer=dead_letterer,
                sleep=sleep,
            )
        except HandlerFailedError as exc:
            last = message.delivery_count >= settings.max_delivery_count
            observed.outcome = PROCESS_DEAD_LETTERED if last else PROCESS_RETRIED
            observed.error_type = type(exc.__cause__ or exc).__name__
            raise
        if handled_log is not None:
            try:
                handled_log.append(outcome_record(
                    message, str(result.outcome), event=result.event, reason=result.reason,
                    description=result.description))
            except OSError as exc:
                last = message.delivery_count >= settings.max_delivery_count
                observed.outcome = PROCESS_DEAD_LETTERED if last else PROCESS_RETRIED
                observed.error_type = type(exc).__name__
                await _unrecorded(message, settings, sleep, exc, last=last)
        observed.outcome = str(result.outcome)
        if result.outcome is Outcome.DEAD_LETTERED:
            observed.dead_letter_reason = result.reason or INVALID_PAYLOAD
        if result.event is not None:
            observed.event_type = result.event.event_type
            observed.event_id = result.event.event_id
            observed.vehicle_id = result.event.vehicle_id
            observed.delivered_at = result.event.meta.delivered_at
        return result


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
    sleep: Callable[[float], Awaitable[None]],
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

    stale = staleness(event, received_at(message.application_properties),
                      settings.max_delivery_age_seconds)
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
        settings=settings, message_id=message.message_id, delivery_count=message.delivery_count
    )
    try:
        ran = await registry.dispatch(event, context)
    except Exception as exc:
        last = message.delivery_count >= settings.max_delivery_count
        delay = retry_delay(message.delivery_count, settings)
        logger.warning(
            "handler failed for event %s (%s, delivery %d of %d): %s: %s; %s",
            event.event_id,
            event.event_type,
            message.delivery_count,
            settings.max_delivery_count,
            type(exc).__name__,
            exc,
            "it will be dead-lettered" if last else f"retrying in {delay:.1f}s",
        )
        if delay > 0:
            await sleep(delay)
        raise HandlerFailedError(
            f"handler failed for event {event.event_id}: {type(exc).__name__}"
        ) from exc

    outcome = Outcome.HANDLED if ran else Outcome.UNHANDLED
    if not ran:
        logger.info("no handler for event %s of type %s", event.event_id, event.event_type)
    return ProcessResult(outcome, event=event)
