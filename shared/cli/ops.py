"""Queue operations for the CLI: counts and the dead-letter queue, on either backend.

`open_ops(settings)` picks the backend the app itself uses: the embedded SQLite queue
(`LocalOps`) or Azure Service Bus (`ServiceBusOps`, sync SDK, `DefaultAzureCredential`).
Both expose the same small interface (`QueueOps`); dead letters are identified by their
sequence number. Failures the operator can act on are raised as `OpsError` with a message.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from ..events import peek_envelope
from ..publisher import (
    DEAD_LETTER_COPY_SUFFIX,
    MAX_MESSAGE_ID_LENGTH,
    PROP_DEAD_LETTER_DELIVERY_COUNT,
    PROP_DEAD_LETTER_DESCRIPTION,
    PROP_DEAD_LETTER_REASON,
    PROP_EVENT_ID,
    PROP_EVENT_TYPE,
)
from ..retry import PROP_ATTEMPT, RETRY_PROPS, event_delivery_count
from ..settings import Settings

PROP_REPLAYED_FROM = "replayedFrom"
PROP_REPLAY_COUNT = "replayCount"
_DEAD_LETTER_COPY_PROPS = (PROP_DEAD_LETTER_REASON, PROP_DEAD_LETTER_DESCRIPTION,
                           PROP_DEAD_LETTER_DELIVERY_COUNT)
# Also removed on replay: the replayed event starts again at attempt 1 (its copies' ids carry
# the replay count, so they are not duplicates of the earlier retries).
_REPLAY_DROPS = (*_DEAD_LETTER_COPY_PROPS, *RETRY_PROPS)
_REPLAY_MARK = ":replay:"


class OpsError(RuntimeError):
    """An operation failed for a reason the operator can act on; the message says which."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sequence_number: int
    message_id: str
    event_id: str | None
    event_type: str | None
    reason: str | None
    description: str | None
    delivery_count: int
    enqueued_time: datetime | None
    application_properties: dict[str, Any]
    body: bytes

    def summary(self) -> dict[str, Any]:
        """The `dlq list` entry: the sequence number (the ID) and the seven contract fields."""
        return {
            "sequenceNumber": self.sequence_number,
            "messageId": self.message_id,
            "eventId": self.event_id,
            "eventType": self.event_type,
            "reason": self.reason,
            "description": self.description,
            "deliveryCount": self.delivery_count,
            "enqueuedTime": None if self.enqueued_time is None else self.enqueued_time.isoformat(),
        }

    def detail(self) -> dict[str, Any]:
        """The `dlq show` document: the summary plus properties and body."""
        doc = self.summary()
        doc["applicationProperties"] = dict(self.application_properties)
        try:
            doc["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            doc["bodyBase64"] = base64.b64encode(self.body).decode("ascii")
        return doc


@dataclass(slots=True)
class ReplayResult:
    replayed: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    not_found: list[int | str] = field(default_factory=list)


@dataclass(slots=True)
class PurgeResult:
    purged: int = 0
    not_found: list[int | str] = field(default_factory=list)


class QueueOps(Protocol):
    backend: str

    @property
    def where(self) -> str:
        """Which queue this is, for the operator: "the local queue .local/queue.sqlite3"."""
        ...

    def stats(self) -> dict[str, int]:
        """`{"active", "deadLettered", "scheduled"}`."""
        ...

    def dead_letters(self, *, limit: int) -> list[DeadLetter]: ...

    def dead_letter(self, sequence_number: int) -> DeadLetter | None: ...

    def replay(self, sequence_numbers: Sequence[int] | None) -> ReplayResult:
        """Re-enqueue the named dead letters (all when None) for processing."""
        ...

    def purge(self, sequence_numbers: Sequence[int] | None) -> PurgeResult:
        """Delete the named dead letters (all when None)."""
        ...

    def close(self) -> None: ...


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else value


def text_properties(properties: Mapping[Any, Any] | None) -> dict[str, Any]:
    """Application properties with str keys (and str for bytes values), as AMQP may give bytes."""
    return {str(_text(k)): _text(v) for k, v in (properties or {}).items()}


def _whole(value: Any) -> int | None:
    """A property's whole number (properties may arrive as text), or None."""
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None


def _describe(
    *,
    sequence_number: int,
    message_id: str,
    body: bytes,
    properties: dict[str, Any],
    reason: str | None,
    description: str | None,
    delivery_count: int,
    enqueued_time: datetime | None,
) -> DeadLetter:
    # A copy sent by ServiceBusDeadLetterer carries its reason in application properties;
    # those win over the broker's generic reason (TTLExpiredException).
    if properties.get(PROP_DEAD_LETTER_REASON) is not None:
        reason = str(properties[PROP_DEAD_LETTER_REASON])
        description = _opt_str(properties.get(PROP_DEAD_LETTER_DESCRIPTION))
    # Such a copy's own count is its refusals before it expired: it carries the event's.
    copied_count = _whole(properties.get(PROP_DEAD_LETTER_DELIVERY_COUNT))
    if copied_count is not None:
        delivery_count = copied_count
    elif PROP_ATTEMPT in properties:  # a retried event's copies start their count afresh
        delivery_count = event_delivery_count(properties, delivery_count)
    envelope = peek_envelope(body)
    return DeadLetter(
        sequence_number=sequence_number,
        message_id=message_id,
        event_id=_opt_str(properties.get(PROP_EVENT_ID)) or envelope.event_id,
        event_type=_opt_str(properties.get(PROP_EVENT_TYPE)) or envelope.event_type,
        reason=reason,
        description=description,
        delivery_count=delivery_count,
        enqueued_time=enqueued_time,
        application_properties=properties,
        body=body,
    )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def replay_properties(properties: Mapping[str, Any], sequence_number: int) -> dict[str, Any]:
    """Properties for the replayed message: the dead-letter copy markers removed (else the
    processor refuses it as a copy) and the retry attempt and history removed (it starts again
    at attempt 1), `replayedFrom` and an incremented `replayCount` added."""
    props = {k: v for k, v in properties.items() if k not in _REPLAY_DROPS}
    try:
        count = int(props.get(PROP_REPLAY_COUNT, 0))
    except (TypeError, ValueError):
        count = 0
    props[PROP_REPLAYED_FROM] = str(sequence_number)
    props[PROP_REPLAY_COUNT] = str(count + 1)
    return props


def replay_message_id(message_id: str, sequence_number: int) -> str:
    """A message id that duplicate detection has not seen: `<original>:replay:<seq>`.

    The original id (the eventId) is usually still inside the queue's duplicate detection
    window, so re-sending under it would be silently dropped. The dead letter's sequence
    number is unique, so each dead letter gets its own id; and replaying the same dead letter
    twice (its removal failed after the send) is de-duplicated instead of processed twice.
    """
    base = message_id
    if base.endswith(DEAD_LETTER_COPY_SUFFIX):
        base = base[: -len(DEAD_LETTER_COPY_SUFFIX)]
    if _REPLAY_MARK in base:
        base = base[: base.index(_REPLAY_MARK)]
    candidate = f"{base}{_REPLAY_MARK}{sequence_number}"
    if len(candidate) <= MAX_MESSAGE_ID_LENGTH:
        return candidate
    digest = hashlib.sha256(base.encode("utf-8")).hexdigest()
    return f"sha256:{digest}{_REPLAY_MARK}{sequence_number}"


# -- the embedded queue ------------------------------------------------------------------------


class LocalOps:
    """The embedded SQLite queue (`${LOCAL_STATE_DIR}/queue.sqlite3`); safe beside the host."""

    backend = "local"

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    @property
    def where(self) -> str:
        return f"the local queue {self._queue.path}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from ..local.queue_rows import QueueUnavailableError

        try:
            yield
        except QueueUnavailableError as exc:
            raise OpsError(f"the local queue at {self._queue.path} is unavailable: {exc}") from None

    def _describe(self, qm: Any) -> DeadLetter:
        return _describe(
            sequence_number=qm.sequence_number,
            message_id=qm.message_id,
            body=qm.body,
            properties=dict(qm.application_properties),
            reason=qm.dead_letter_reason,
            description=qm.dead_letter_description,
            delivery_count=qm.delivery_count,
            enqueued_time=qm.enqueued_time,
        )

    def stats(self) -> dict[str, int]:
        with self._errors():
            return dict(self._queue.stats())

    def dead_letters(self, *, limit: int) -> list[DeadLetter]:
        with self._errors():
            return [self._describe(qm) for qm in self._queue.peek_dead_letters(limit=limit)]

    def dead_letter(self, sequence_number: int) -> DeadLetter | None:
        with self._errors():
            qm = self._queue.get_dead_letter(sequence_number)
        return None if qm is None else self._describe(qm)

    def _all_sequence_numbers(self) -> list[int]:
        return [qm.sequence_number for qm in self._queue.peek_dead_letters(limit=1_000_000)]

    def replay(self, sequence_numbers: Sequence[int] | None) -> ReplayResult:
        result = ReplayResult()
        with self._errors():
            targets = (
                self._all_sequence_numbers() if sequence_numbers is None else sequence_numbers
            )
            for seq in dict.fromkeys(targets):
                replayed = self._replay_one(seq)
                if replayed is None:
                    result.not_found.append(seq)
                else:
                    result.replayed.append(replayed)
        return result

    def _replay_one(self, seq: int) -> dict[str, Any] | None:
        qm = self._queue.get_dead_letter(seq)
        if qm is None:
            return None
        if not any(p in qm.application_properties for p in _DEAD_LETTER_COPY_PROPS):
            # Atomic move back; the queue bypasses duplicate detection for it.
            new = self._queue.replay_dead_letter(seq)
            if new is None:
                return None
            return {"sequenceNumber": seq, "messageId": new.message_id,
                    "newSequenceNumber": new.sequence_number}
        # A dead-letter copy: re-send it without the copy markers, then drop the copy.
        message_id = replay_message_id(qm.message_id, seq)
        self._queue.send(
            qm.body,
            message_id=message_id,
            application_properties=replay_properties(qm.application_properties, seq),
        )
        self._queue.purge_dead_letters([seq])
        return {"sequenceNumber": seq, "messageId": message_id}

    def purge(self, sequence_numbers: Sequence[int] | None) -> PurgeResult:
        with self._errors():
            if sequence_numbers is None:
                return PurgeResult(purged=self._queue.purge_dead_letters(None))
            result = PurgeResult()
            for seq in dict.fromkeys(sequence_numbers):
                removed = self._queue.purge_dead_letters([seq])
                if removed:
                    result.purged += removed
                else:
                    result.not_found.append(seq)
            return result

    def close(self) -> None:
        self._queue.close()


# -- Azure Service Bus ---------------------------------------------------------------------------

#: How long one receive waits for more dead letters before concluding there are none.
RECEIVE_WAIT_SECONDS = 5.0
_BATCH = 50
# Service Bus numbers messages from 1; the SDK treats 0 as "continue after the last peek".
_FIRST_SEQUENCE_NUMBER = 1


def _body_bytes(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return b"".join(bytes(part) for part in body)


class ServiceBusOps:
    """Azure Service Bus through the sync SDK; the factories are the only seams for tests.

    `admin_factory()` returns a `ServiceBusAdministrationClient`, `client_factory()` a
    `ServiceBusClient`; production builds both with `DefaultAzureCredential` (no keys).
    """

    backend = "servicebus"

    def __init__(
        self,
        namespace: str,
        queue_name: str,
        *,
        admin_factory: Callable[[], Any] | None = None,
        client_factory: Callable[[], Any] | None = None,
        receive_wait: float = RECEIVE_WAIT_SECONDS,
    ) -> None:
        self.namespace = namespace
        self.queue_name = queue_name
        self.where = f"the Service Bus queue {queue_name} on {namespace}"
        self._admin_factory = admin_factory or self._real_admin
        self._client_factory = client_factory or self._real_client
        self._receive_wait = receive_wait
        self._credential: Any = None
        self._client: Any = None

    # Real SDK clients, built only when used.
    def _credential_once(self) -> Any:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        return self._credential

    def _real_admin(self) -> Any:
        from azure.servicebus.management import ServiceBusAdministrationClient

        return ServiceBusAdministrationClient(self.namespace, credential=self._credential_once())

    def _real_client(self) -> Any:
        from azure.servicebus import ServiceBusClient

        return ServiceBusClient(self.namespace, credential=self._credential_once())

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        from azure.core.exceptions import AzureError, ClientAuthenticationError

        try:
            yield
        except ClientAuthenticationError as exc:
            raise OpsError(
                f"cannot {action} on {self.namespace}: not authorized ({_first_line(exc)}). "
                "Sign in (az login) with an identity that has a Service Bus data role on the "
                "namespace (Azure Service Bus Data Owner for the DLQ, or Data Receiver + Sender; "
                "stats needs read access to the queue)."
            ) from None
        except AzureError as exc:
            raise OpsError(
                f"cannot {action} on {self.namespace}/{self.queue_name}: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from None

    def _sb_client(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _dlq_receiver(self) -> Any:
        from azure.servicebus import ServiceBusSubQueue

        return self._sb_client().get_queue_receiver(
            queue_name=self.queue_name,
            sub_queue=ServiceBusSubQueue.DEAD_LETTER,
            max_wait_time=self._receive_wait,
        )

    def _describe(self, message: Any) -> DeadLetter:
        enqueued = getattr(message, "enqueued_time_utc", None)
        return _describe(
            sequence_number=int(message.sequence_number),
            message_id=str(message.message_id),
            body=_body_bytes(message),
            properties=text_properties(message.application_properties),
            reason=_opt_str(_text(message.dead_letter_reason)),
            description=_opt_str(_text(message.dead_letter_error_description)),
            delivery_count=int(message.delivery_count or 0),
            enqueued_time=enqueued,
        )

    def stats(self) -> dict[str, int]:
        with self._errors("read the queue's runtime properties"):
            admin = self._admin_factory()
            try:
                props = admin.get_queue_runtime_properties(self.queue_name)
            finally:
                admin.close()
        return {
            "active": int(props.active_message_count),
            "deadLettered": int(props.dead_letter_message_count),
            "scheduled": int(props.scheduled_message_count),
        }

    def _peek_all(self, receiver: Any, limit: int) -> list[Any]:
        """Every message from the lowest sequence number up, paging forward.

        Each page names where it starts: without `sequence_number` a peek resumes after the
        last message this receiver peeked, so a scan that follows another peek would skip
        everything below it.
        """
        found: list[Any] = []
        start = _FIRST_SEQUENCE_NUMBER
        while len(found) < limit:
            page = receiver.peek_messages(
                max_message_count=min(_BATCH, limit - len(found)), sequence_number=start
            )
            if not page:
                break
            found.extend(page)
            start = max(int(m.sequence_number) for m in page) + 1
        return found

    def dead_letters(self, *, limit: int) -> list[DeadLetter]:
        with self._errors("peek the dead-letter queue"), self._dlq_receiver() as receiver:
            return [self._describe(m) for m in self._peek_all(receiver, limit)]

    def dead_letter(self, sequence_number: int) -> DeadLetter | None:
        with self._errors("peek the dead-letter queue"), self._dlq_receiver() as receiver:
            page = receiver.peek_messages(max_message_count=1, sequence_number=sequence_number)
            for message in page:
                if int(message.sequence_number) == sequence_number:
                    return self._describe(message)
            # The dead-letter sub-queue keeps the original sequence numbers, which need not
            # be the order it browses in: fall back to a full scan before saying "not found".
            for message in self._peek_all(receiver, 1_000_000):
                if int(message.sequence_number) == sequence_number:
                    return self._describe(message)
        return None

    def _settle_each(
        self,
        receiver: Any,
        sequence_numbers: Sequence[int] | None,
        act: Callable[[Any], None],
    ) -> list[int]:
        """Receive dead letters and `act` on the named ones while they are locked; others
        received along the way are held and abandoned at the end, so they are not received
        again meanwhile. Returns the named sequence numbers that were not found.
        `act` settles (or abandons) the message itself.

        None means every dead letter present *now*: a snapshot, so a replayed message that the
        app dead-letters again (under a new sequence number) is not replayed again in a loop.
        """
        present = {int(m.sequence_number) for m in self._peek_all(receiver, 1_000_000)}
        if sequence_numbers is None:
            wanted = present
            missing: list[int] = []
        else:
            named = set(sequence_numbers)
            missing = sorted(named - present)
            wanted = named & present
        if not wanted:
            return missing
        report_missing = sequence_numbers is not None
        held: list[Any] = []
        seen: set[int] = set()
        try:
            while wanted:
                batch = receiver.receive_messages(
                    max_message_count=_BATCH, max_wait_time=self._receive_wait
                )
                if not batch:
                    break
                for message in batch:
                    seq = int(message.sequence_number)
                    if seq in seen or seq not in wanted:
                        held.append(message)  # e.g. a failed replay abandoned and received again
                        continue
                    seen.add(seq)
                    wanted.discard(seq)
                    act(message)
        finally:
            for message in held:
                try:
                    receiver.abandon_message(message)
                except Exception:  # noqa: S112 - the lock expires on its own anyway
                    continue
        if wanted and report_missing:
            missing.extend(sorted(wanted))  # removed by someone else between peek and receive
        return sorted(missing)

    def replay(self, sequence_numbers: Sequence[int] | None) -> ReplayResult:
        from azure.core.exceptions import AzureError

        result = ReplayResult()
        with self._errors("replay dead letters"), self._dlq_receiver() as receiver:
            sender = self._sb_client().get_queue_sender(queue_name=self.queue_name)
            with sender:

                def act(message: Any) -> None:
                    seq = int(message.sequence_number)
                    copy = self._replay_message(message)
                    try:
                        sender.send_messages(copy)
                    except AzureError as exc:
                        # Not re-sent: leave it in the DLQ, untouched but for the lock.
                        receiver.abandon_message(message)
                        result.failed.append({"sequenceNumber": seq, "error": _short(exc)})
                        return
                    try:
                        receiver.complete_message(message)
                    except AzureError as exc:
                        # Re-sent but still in the DLQ; a second replay reuses the same id,
                        # which duplicate detection drops, so it is not processed twice.
                        result.failed.append(
                            {"sequenceNumber": seq, "messageId": copy.message_id,
                             "error": f"re-sent, but not removed from the DLQ: {_short(exc)}"}
                        )
                        return
                    result.replayed.append({"sequenceNumber": seq, "messageId": copy.message_id})

                result.not_found.extend(self._settle_each(receiver, sequence_numbers, act))
        return result

    def _replay_message(self, message: Any) -> Any:
        from azure.servicebus import ServiceBusMessage

        seq = int(message.sequence_number)
        replayed = replay_properties(text_properties(message.application_properties), seq)
        props: dict[str | bytes, Any] = {k: v for k, v in replayed.items()}
        # No time_to_live: a dead-letter copy's 1 s TTL must not follow it back.
        return ServiceBusMessage(
            _body_bytes(message),
            message_id=replay_message_id(str(message.message_id), seq),
            application_properties=props,
            content_type=getattr(message, "content_type", None) or "application/json",
            correlation_id=getattr(message, "correlation_id", None),
            subject=getattr(message, "subject", None),
        )

    def purge(self, sequence_numbers: Sequence[int] | None) -> PurgeResult:
        result = PurgeResult()
        with self._errors("purge dead letters"), self._dlq_receiver() as receiver:

            def act(message: Any) -> None:
                receiver.complete_message(message)
                result.purged += 1

            result.not_found.extend(self._settle_each(receiver, sequence_numbers, act))
        return result

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        credential, self._credential = self._credential, None
        if credential is not None:
            credential.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def open_ops(settings: Settings) -> QueueOps:
    """The backend the app uses with these settings."""
    if settings.queue_backend == "servicebus":
        assert settings.servicebus_namespace is not None
        return ServiceBusOps(settings.servicebus_namespace, settings.queue_name)
    from ..local.queue_open import open_local_queue
    from ..local.queue_rows import QueueUnavailableError

    try:
        return LocalOps(open_local_queue(settings))
    except QueueUnavailableError as exc:  # damaged, vanished or locked: the message says which
        raise OpsError(str(exc)) from None


#: Enough to take every dead letter into a snapshot when resolving IDs.
ALL_DEAD_LETTERS = 1_000_000


@dataclass(frozen=True, slots=True)
class IdMatch:
    """A dead letter that an ID given on the command line names, and by which field."""

    dead_letter: DeadLetter
    field: str  # "sequenceNumber", "eventId" or "messageId"


@dataclass(slots=True)
class Resolved:
    """IDs from the command line resolved against a snapshot of the DLQ."""

    sequence_numbers: list[int] = field(default_factory=list)
    matches: dict[str, IdMatch] = field(default_factory=dict)
    not_found: list[int | str] = field(default_factory=list)
    ambiguous: dict[str, list[IdMatch]] = field(default_factory=dict)


#: `seq:N` names the dead letter with sequence number N and nothing else: sequence numbers are
#: unique, so it always picks one where a bare N (also someone's eventId?) is ambiguous.
SEQUENCE_PREFIX = "seq:"


def _sequence_number(text: str) -> int | None:
    """`text` as a sequence number: ASCII digits only (`str.isdigit` also takes '²', which
    int() refuses)."""
    return int(text) if text.isascii() and text.isdigit() else None


def id_matches(entries: Iterable[DeadLetter], given: str) -> list[IdMatch]:
    """The dead letters `given` names: as a sequence number, an eventId or a messageId; or,
    as `seq:N`, the one with sequence number N only."""
    explicit = (_sequence_number(given.removeprefix(SEQUENCE_PREFIX))
                if given.startswith(SEQUENCE_PREFIX) else None)
    if explicit is not None:
        return [IdMatch(e, "sequenceNumber") for e in entries if e.sequence_number == explicit]
    number = _sequence_number(given)
    found: list[IdMatch] = []
    for entry in entries:
        if number == entry.sequence_number:
            found.append(IdMatch(entry, "sequenceNumber"))
        elif given == entry.event_id:
            found.append(IdMatch(entry, "eventId"))
        elif given == entry.message_id:
            found.append(IdMatch(entry, "messageId"))
    return found


def resolve_ids(ops: QueueOps, given: Sequence[str]) -> Resolved:
    """Each ID to the one dead letter it names. An ID naming several (a sequence number that
    is also another's eventId, or an eventId dead-lettered twice) is `ambiguous`, never
    guessed: replay and purge act on exactly what the operator meant."""
    entries = ops.dead_letters(limit=ALL_DEAD_LETTERS)
    resolved = Resolved()
    for value in dict.fromkeys(given):
        found = id_matches(entries, value)
        if not found:
            # As typed: 99 as a number (as `dlq list` shows IDs), but 000123 or seq:7 as text.
            number = _sequence_number(value)
            resolved.not_found.append(
                number if number is not None and str(number) == value else value)
        elif len(found) > 1:
            resolved.ambiguous[value] = found
        else:
            resolved.matches[value] = found[0]
            if found[0].dead_letter.sequence_number not in resolved.sequence_numbers:
                resolved.sequence_numbers.append(found[0].dead_letter.sequence_number)
    return resolved


def describe_ambiguous(value: str, found: Sequence[IdMatch]) -> str:
    which = ", ".join(f"{m.dead_letter.sequence_number} (by its {m.field})" for m in found)
    choices = " or ".join(f"{SEQUENCE_PREFIX}{m.dead_letter.sequence_number}" for m in found)
    return (f"ID {value!r} matches {len(found)} dead letters: {which}; name one by its "
            f"sequence number as {SEQUENCE_PREFIX}N ({choices}), which means nothing else")
