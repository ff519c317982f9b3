"""Retries scheduled on the queue: a failed event comes back later as a scheduled copy.

When a handler fails, the processor does not wait out the backoff inside the invocation (on
Flex Consumption that wait is billed and holds one of the host's concurrent slots). It sends a
copy of the message, scheduled for now + backoff, with the attempt number and the history of
failed attempts in its application properties, and returns: the host completes the original.

* The attempt number is the message's own `attempt` property (1 when absent), never the
  broker's delivery count, so a redelivered original (a crash between the send and the
  completion) builds the SAME copy, and the copy's `messageId`, derived from the eventId and
  the attempt, is dropped by the queue's duplicate detection. One copy, not two.
* After `MAX_DELIVERY_COUNT` attempts the message is dead-lettered with reason
  `MaxDeliveryCountExceeded` and the history, as the broker would dead-letter it.
* The copy goes through a `RetrySender`: Service Bus's sender in Azure, the embedded queue's
  `send` locally. Everything else (what the copy holds, when it is due) is this module's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from .publisher import MAX_MESSAGE_ID_LENGTH

#: Application property: which attempt this message is (1 for the original, absent = 1).
PROP_ATTEMPT = "attempt"
#: Application property: JSON list of the failed attempts, oldest first, each
#: `{"attempt": n, "failedAt": ISO-8601, "error": exception type}`.
PROP_ATTEMPT_HISTORY = "attemptHistory"
#: Set by a dead-letter replay (shared/cli/ops.py, the local queue): part of the copy id, so
#: the retries of a replayed event are not taken for duplicates of its earlier retries.
PROP_REPLAY_COUNT = "replayCount"
#: The dead-letter reason after the last attempt: the broker's own name for it.
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
#: Properties a dead-letter replay removes, so the replayed event starts again at attempt 1.
RETRY_PROPS = (PROP_ATTEMPT, PROP_ATTEMPT_HISTORY)


def backoff_seconds(attempt: int, *, base: float, maximum: float) -> float:
    """Exponential backoff after failed attempt `attempt`: base, 2*base, 4*base, ... capped at
    `maximum`."""
    exponent = max(attempt - 1, 0)
    return float(min(base * (2 ** min(exponent, 30)), maximum))


def attempt_of(properties: Mapping[str, Any]) -> int:
    """The message's attempt number: its `attempt` property, 1 when absent or unreadable."""
    try:
        attempt = int(str(properties.get(PROP_ATTEMPT, 1)))
    except ValueError:
        return 1
    return max(attempt, 1)


def event_delivery_count(properties: Mapping[str, Any], delivery_count: int) -> int:
    """How many times handlers have been given this event, counting this time: the earlier
    attempts (one delivery each) plus this message's deliveries. What `HandlerContext`
    reports as `delivery_count`, so a handler sees the count grow across scheduled copies."""
    return attempt_of(properties) - 1 + max(delivery_count, 1)


def history_of(properties: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The failed attempts recorded so far; an unreadable history is started afresh (it is
    information for people, never a decision input)."""
    raw = properties.get(PROP_ATTEMPT_HISTORY)
    if raw is None:
        return []
    try:
        history = json.loads(str(raw))
    except ValueError:
        return []
    if not isinstance(history, list):
        return []
    return [entry for entry in history if isinstance(entry, dict)]


def retry_copy_id(event_key: str, attempt: int, replay: str | None = None) -> str:
    """The `messageId` of the copy that is attempt `attempt` of the event `event_key` (its
    eventId, or the original message id): the same inputs always give the same id, within
    Service Bus's 128 characters."""
    suffix = f":retry:{attempt}" if replay is None else f":replay:{replay}:retry:{attempt}"
    candidate = event_key + suffix
    if len(candidate) <= MAX_MESSAGE_ID_LENGTH:
        return candidate
    digest = hashlib.sha256(event_key.encode("utf-8", "surrogatepass")).hexdigest()
    candidate = f"sha256:{digest}{suffix}"
    if len(candidate) <= MAX_MESSAGE_ID_LENGTH:
        return candidate
    # Only a replay count longer than ~40 digits gets here: hash it too.
    return "sha256:" + hashlib.sha256(candidate.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class RetryCopy:
    """The scheduled copy of a failed message: same body, new id and properties."""

    body: bytes
    message_id: str
    application_properties: dict[str, str]
    scheduled_enqueue_time: datetime
    attempt: int
    delay_seconds: float


def failed_attempt(attempt: int, error: BaseException, now: float) -> dict[str, Any]:
    """One entry of the attempt history."""
    return {
        "attempt": attempt,
        "failedAt": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "error": type(error).__name__,
    }


def with_failure(
    properties: Mapping[str, Any], attempt: int, error: BaseException, now: float
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The properties with this failure appended to the history, and that history."""
    history = [*history_of(properties), failed_attempt(attempt, error, now)]
    props = {str(k): str(v) for k, v in properties.items()}
    props[PROP_ATTEMPT_HISTORY] = json.dumps(history, separators=(",", ":"))
    return props, history


def retry_copy(
    body: bytes,
    properties: Mapping[str, Any],
    *,
    event_key: str,
    error: BaseException,
    now: float,
    base: float,
    maximum: float,
) -> RetryCopy:
    """The copy that is the next attempt after this one failed with `error` at `now`."""
    attempt = attempt_of(properties)
    props, _ = with_failure(properties, attempt, error, now)
    props[PROP_ATTEMPT] = str(attempt + 1)
    delay = backoff_seconds(attempt, base=base, maximum=maximum)
    replay = properties.get(PROP_REPLAY_COUNT)
    return RetryCopy(
        body=body,
        message_id=retry_copy_id(event_key, attempt + 1, None if replay is None else str(replay)),
        application_properties=props,
        scheduled_enqueue_time=datetime.fromtimestamp(now + delay, UTC),
        attempt=attempt + 1,
        delay_seconds=delay,
    )


class RetrySender(Protocol):
    async def schedule(self, copy: RetryCopy) -> None:
        """Store `copy` durably, invisible until its scheduled time; a copy whose id the
        queue has seen is dropped (duplicate detection). Raises on failure."""
        ...


class ServiceBusRetrySender:
    """Schedules the copy through the process's Service Bus sender (`send_raw`)."""

    def __init__(self, send: Callable[[Any], Awaitable[None]]) -> None:
        self._send = send

    async def schedule(self, copy: RetryCopy) -> None:
        from azure.servicebus import ServiceBusMessage

        await self._send(ServiceBusMessage(
            copy.body,
            message_id=copy.message_id,
            application_properties={k: v for k, v in copy.application_properties.items()},
            scheduled_enqueue_time_utc=copy.scheduled_enqueue_time,
            content_type="application/json",
        ))
