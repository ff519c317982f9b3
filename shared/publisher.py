"""Durable enqueueing of accepted webhooks: Azure Service Bus, or the embedded local queue.

The message body is the raw signed bytes, unchanged. `message_id` is the `eventId` (a hash of
the body when there is none) so the queue's duplicate detection drops Smartcar's retries.
A publisher either stores the message or raises `PublishError`: the receiver answers 200 only
after `publish` returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .credentials import ProcessCredential
from .events import Envelope, is_unicode

logger = logging.getLogger(__name__)

# Service Bus limits message_id to 128 characters.
MAX_MESSAGE_ID_LENGTH = 128

# Application property names, shared by the publisher, processor, CLI and queries.
PROP_EVENT_TYPE = "eventType"
PROP_VEHICLE_ID = "vehicleId"
PROP_WEBHOOK_ID = "webhookId"
PROP_DELIVERY_ID = "deliveryId"
PROP_MODE = "mode"
PROP_EVENT_ID = "eventId"
# When the receiver accepted the message, epoch milliseconds (a decimal string): the processor
# measures a delivery's age from `meta.deliveredAt` to this, not to when it processes it.
PROP_RECEIVED_AT = "receivedAt"
#: Set by `dlq replay` (an operator's decision): how many times the message was replayed.
PROP_REPLAY_COUNT = "replayCount"
# Set on a copy that the processor routes to the dead-letter queue (see ServiceBusDeadLetterer).
PROP_DEAD_LETTER_REASON = "deadLetterReason"
PROP_DEAD_LETTER_DESCRIPTION = "deadLetterDescription"
#: On a dead-letter copy: how many times the event had been delivered to handlers when it was
#: dead-lettered (the copy's own delivery count counts its refusals instead).
PROP_DEAD_LETTER_DELIVERY_COUNT = "deadLetterDeliveryCount"
# Appended to the original message_id of such a copy (see dead_letter_copy_id).
DEAD_LETTER_COPY_SUFFIX = ":dead-letter"


class PublishError(RuntimeError):
    """The message could not be stored; nothing may be acknowledged."""


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    body: bytes
    message_id: str
    application_properties: Mapping[str, str] = field(default_factory=dict)


def message_id_for(body: bytes, event_id: str | None) -> str:
    """`eventId` when usable as a Service Bus message id, else a SHA-256 of the body."""
    if event_id and len(event_id) <= MAX_MESSAGE_ID_LENGTH and is_unicode(event_id):
        return event_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def dead_letter_copy_id(message_id: str) -> str:
    """The id of a message's dead-letter copy, within Service Bus's 128 characters."""
    candidate = message_id + DEAD_LETTER_COPY_SUFFIX
    if len(candidate) <= MAX_MESSAGE_ID_LENGTH:
        return candidate
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest}{DEAD_LETTER_COPY_SUFFIX}"


def outbound_message(
    body: bytes, envelope: Envelope, *, received_at: float | None = None
) -> OutboundMessage:
    """The message to store; `received_at` (epoch seconds) becomes `receivedAt`."""
    props: dict[str, str] = {}
    if received_at is not None:
        props[PROP_RECEIVED_AT] = str(round(received_at * 1000))
    for name, value in (
        (PROP_EVENT_ID, envelope.event_id),
        (PROP_EVENT_TYPE, envelope.event_type),
        (PROP_VEHICLE_ID, envelope.vehicle_id),
        (PROP_WEBHOOK_ID, envelope.webhook_id),
        (PROP_DELIVERY_ID, envelope.delivery_id),
        (PROP_MODE, envelope.mode),
    ):
        if value is not None and is_unicode(value):
            props[name] = value
    return OutboundMessage(
        body=body,
        message_id=message_id_for(body, envelope.event_id),
        application_properties=props,
    )


class Publisher(Protocol):
    async def publish(self, message: OutboundMessage) -> bool:
        """Store the message durably. True when new, False when known to be a duplicate
        (backends that cannot tell return True). Raises PublishError."""
        ...

    async def close(self) -> None: ...


#: How many accepted message ids an instance remembers to answer a retry `duplicate`.
RECENT_IDS_LIMIT = 100_000


class RememberingPublisher:
    """Answers a retry of an id this instance stored within `window` seconds as a duplicate.

    Service Bus drops a duplicate `message_id` silently (the send succeeds), so the sender
    cannot tell. This instance remembers the ids it stored (at most `limit`, oldest forgotten
    first) and does not send them again: the first copy is durable already. A retry that
    reaches another instance is sent, dropped by Service Bus, and answered `accepted`.
    `window` must not exceed the queue's duplicate-detection window.
    """

    def __init__(
        self,
        inner: Publisher,
        *,
        window: float,
        limit: int = RECENT_IDS_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._window = window
        self._limit = limit
        self._clock = clock
        self._stored: OrderedDict[str, float] = OrderedDict()

    async def publish(self, message: OutboundMessage) -> bool:
        now = self._clock()
        while self._stored:  # forget what is out of the window, oldest first
            oldest, at = next(iter(self._stored.items()))
            if now - at < self._window and len(self._stored) <= self._limit:
                break
            del self._stored[oldest]
        if message.message_id in self._stored:
            return False
        stored = await self._inner.publish(message)
        if stored:
            self._stored[message.message_id] = now
        return stored

    async def close(self) -> None:
        await self._inner.close()


class ServiceBusPublisher:
    """One `azure.servicebus.aio` client and sender per process, created lazily and reused.

    A failed send closes and drops the sender so the next request opens a new link (the
    client reconnects by itself), and is
    reported as PublishError within `send_timeout` seconds, well inside Smartcar's 15 s. A send
    cancelled by its caller (a shorter budget of its own, as the spilling publisher's) drops
    the sender too, and closes it in the background: a hung link is not kept for the next
    request, and the caller does not wait for its close.
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        queue_name: str,
        *,
        send_timeout: float = 5.0,
    ) -> None:
        self._client_factory = client_factory
        self._queue_name = queue_name
        self._send_timeout = send_timeout
        self._client: Any = None
        self._sender: Any = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    async def _get_sender(self) -> Any:
        if self._sender is not None:
            return self._sender
        async with self._lock:
            if self._sender is None:
                if self._client is None:
                    self._client = self._client_factory()
                self._sender = self._client.get_queue_sender(queue_name=self._queue_name)
            return self._sender

    async def publish(self, message: OutboundMessage) -> bool:
        from azure.servicebus import ServiceBusMessage

        sb_message = ServiceBusMessage(
            message.body,
            message_id=message.message_id,
            application_properties={k: v for k, v in message.application_properties.items()},
            content_type="application/json",
        )
        sender = None
        try:
            sender = await self._get_sender()
            await asyncio.wait_for(sender.send_messages(sb_message), self._send_timeout)
        except asyncio.CancelledError:
            self._drop(sender)
            raise
        except Exception as exc:
            logger.warning(
                "Service Bus send of message %s failed: %s", message.message_id, type(exc).__name__
            )
            await self._reset(sender)
            raise PublishError(f"Service Bus send failed: {type(exc).__name__}") from exc
        return True

    async def send_raw(self, sb_message: Any) -> None:
        """Send an already-built `azure.servicebus.ServiceBusMessage` (used by the processor)."""
        sender = None
        try:
            sender = await self._get_sender()
            await asyncio.wait_for(sender.send_messages(sb_message), self._send_timeout)
        except asyncio.CancelledError:
            self._drop(sender)
            raise
        except Exception as exc:
            await self._reset(sender)
            raise PublishError(f"Service Bus send failed: {type(exc).__name__}") from exc

    def _take(self, failed: Any = None) -> Any:
        """Drop the current sender and return it: unless `failed` (the one a send failed on)
        is not it, because another failure replaced it already and sends in flight on the new
        link keep that one. None: whichever there is."""
        sender = self._sender
        if sender is None or (failed is not None and sender is not failed):
            return None
        self._sender = None
        return sender

    def _drop(self, sender: Any) -> None:
        """A send on `sender` was cancelled: the next send opens a new one, and this one is
        closed in the background."""
        taken = self._take(sender) if sender is not None else None
        if taken is None:
            return
        task = asyncio.get_running_loop().create_task(self._close_sender(taken))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _reset(self, failed: Any = None) -> None:
        """Close and drop the sender (`_take`)."""
        async with self._lock:
            sender = self._take(failed)
        if sender is not None:
            await self._close_sender(sender)

    async def _close_sender(self, sender: Any) -> None:
        try:
            await asyncio.wait_for(sender.close(), self._send_timeout)
        except Exception:  # closing a broken link may fail too; the reconnect matters
            logger.debug("closing the Service Bus sender failed", exc_info=True)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing)
        await self._reset()
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def build_service_bus_publisher(
    namespace: str, queue_name: str, credential: ProcessCredential
) -> ServiceBusPublisher:
    """The production publisher: the process's shared credential (shared/credentials.py)."""

    def factory() -> Any:
        from azure.servicebus.aio import ServiceBusClient

        return ServiceBusClient(namespace, credential=credential.get())

    return ServiceBusPublisher(factory, queue_name)
