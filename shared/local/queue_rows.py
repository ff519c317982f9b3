"""The local queue's messages as its callers see them, and as its rows store them.

The message types `LocalQueue` hands out, the errors it raises, the dead-letter reasons it
records, and turning a stored row into a `QueuedMessage` (and checked properties into their
stored text). Decoding a damaged row raises one of `_UNDECODABLE` rather than returning a
wrong message; a dead letter is read as far as it can be, so it can still be listed and purged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "CORRUPT_MESSAGE",
    "MAX_DELIVERY_COUNT_EXCEEDED",
    "ExpiredMessage",
    "LockLostError",
    "QueueBusyError",
    "QueueDamagedError",
    "QueueFullError",
    "QueueUnavailableError",
    "QueuedMessage",
]

#: Dead-letter reason Service Bus uses when the delivery count is exhausted.
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
#: Dead-letter reason for a stored row that cannot be decoded (a damaged file): it is moved
#: aside alone, so the rest of the queue keeps flowing.
CORRUPT_MESSAGE = "CorruptMessage"

_ACTIVE = "active"
_DEADLETTERED = "deadlettered"

_COLUMNS = (
    "sequence_number, message_id, body, properties, enqueued_time, scheduled_time, "
    "delivery_count, lock_token, locked_until, dl_reason, dl_description, state"
)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One message as the queue holds it. ``application_properties`` is a fresh copy."""

    sequence_number: int
    message_id: str
    body: bytes
    application_properties: dict[str, str]
    enqueued_time: datetime
    scheduled_enqueue_time: datetime | None
    delivery_count: int
    lock_token: str | None
    locked_until: datetime | None
    dead_letter_reason: str | None
    dead_letter_description: str | None
    state: str


@dataclass(frozen=True, slots=True)
class ExpiredMessage:
    """A message the lock-expiry sweep dead-lettered (`LocalQueue.on_expired`)."""

    message_id: str
    body: bytes
    delivery_count: int


class QueueUnavailableError(RuntimeError):
    """The queue database cannot be used (locked too long, unreadable, disk full, closed...).

    The receiver answers 503 on this: nothing is acknowledged that is not stored.
    """


class QueueFullError(QueueUnavailableError):
    """A write failed with SQLITE_FULL (the disk is full); nothing of it was stored.

    `checkpointed` says whether the write-ahead log was then checkpointed and truncated,
    which gives its space back: a retry may succeed at once."""

    checkpointed: bool = False


class QueueDamagedError(QueueUnavailableError):
    """The queue file is damaged, missing or emptied: the host refuses to start on it.

    The message names the file and how to recover (see `recovery_advice`).
    """


class QueueBusyError(QueueUnavailableError):
    """A call made with ``wait=False`` found the queue busy (another thread of this process in a
    call, or another process holding SQLite's write lock) and did nothing; call again with
    ``wait=True`` (from a thread: it may wait up to the busy timeout)."""


class LockLostError(RuntimeError):
    """The lock token is unknown or its lock has expired: the message may be redelivered."""


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _to_datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else _utc(timestamp)


#: What decoding a damaged row can raise (bad JSON, wrong column types, absurd timestamps).
_UNDECODABLE = (ValueError, TypeError, OverflowError, OSError)


def _properties(raw: Any) -> dict[str, str]:
    decoded = json.loads(raw)
    if not isinstance(decoded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in decoded.items()
    ):
        raise ValueError("the application properties are not an object of strings")
    return decoded


def _row_to_message(row: tuple[Any, ...]) -> QueuedMessage:
    """Decode a row; raises one of `_UNDECODABLE` when the stored values are damaged."""
    seq, msg_id, body, props, enqueued, scheduled, count, token, until, reason, desc, state = row
    if not isinstance(body, bytes) or not isinstance(msg_id, str):
        raise TypeError(
            f"body is {type(body).__name__} and message_id {type(msg_id).__name__}, "
            "expected bytes and str"
        )
    return QueuedMessage(
        sequence_number=int(seq),
        message_id=msg_id,
        body=body,
        application_properties=_properties(props),
        enqueued_time=_utc(enqueued),
        scheduled_enqueue_time=_to_datetime(scheduled),
        delivery_count=int(count),
        lock_token=token,
        locked_until=_to_datetime(until),
        dead_letter_reason=reason,
        dead_letter_description=desc,
        state=str(state),
    )


def _row_to_dead_letter(row: tuple[Any, ...]) -> QueuedMessage:
    """A dead letter as far as it can be read: a `CorruptMessage` row must still be listed,
    shown and purged, so damaged values are replaced by empty ones instead of raising."""
    try:
        return _row_to_message(row)
    except _UNDECODABLE:
        pass
    seq, msg_id, body, props, enqueued, scheduled, count, _, _, reason, desc, _ = row

    def safely(decode: Callable[[], Any], default: Any) -> Any:
        try:
            return decode()
        except _UNDECODABLE:
            return default

    return QueuedMessage(
        sequence_number=int(seq),
        message_id=msg_id if isinstance(msg_id, str) else "",
        body=body if isinstance(body, bytes) else b"",
        application_properties=safely(lambda: _properties(props), {}),
        enqueued_time=safely(lambda: _utc(enqueued), _utc(0)),
        scheduled_enqueue_time=safely(lambda: _to_datetime(scheduled), None),
        delivery_count=safely(lambda: int(count), 0),
        lock_token=None,
        locked_until=None,
        dead_letter_reason=reason if isinstance(reason, str) else CORRUPT_MESSAGE,
        dead_letter_description=desc if isinstance(desc, str) else None,
        state=_DEADLETTERED,
    )


def _check_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in (properties or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"application property {key!r}: keys and values must be str, "
                f"got {type(key).__name__}={type(value).__name__}"
            )
        result[key] = value
    return result


def _properties_text(properties: dict[str, str]) -> str:
    """The stored form of checked properties: a JSON object of strings, written by orjson
    (about 15 times faster than `json`); a lone surrogate, which orjson refuses, goes through
    `json`, as all did before (and SQLite then refuses the text, as it always did)."""
    try:
        return orjson.dumps(properties).decode()
    except orjson.JSONEncodeError:
        return json.dumps(properties, ensure_ascii=False)
