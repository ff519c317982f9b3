"""Fakes for the boundaries only: Key Vault, Service Bus, Blob storage, the publisher, the clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from shared.publisher import OutboundMessage, PublishError


@dataclass
class FakeSecretProperties:
    version: str
    enabled: bool
    created_on: datetime


@dataclass
class FakeSecret:
    value: str
    properties: FakeSecretProperties


class FakeSecretClient:
    """The async SecretClient surface the token provider uses, backed by a version list."""

    def __init__(self) -> None:
        self.versions: list[FakeSecret] = []
        self.get_calls = 0
        self.fail_with: Exception | None = None
        #: Secret names asked for, by get_secret and list_properties_of_secret_versions.
        self.names: list[str] = []

    def set_secret(self, value: str) -> None:
        created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=len(self.versions))
        props = FakeSecretProperties(f"v{len(self.versions) + 1}", True, created)
        self.versions.append(FakeSecret(value, props))

    def disable(self, version: str) -> None:
        for secret in self.versions:
            if secret.properties.version == version:
                secret.properties.enabled = False

    async def get_secret(self, name: str, version: str | None = None) -> FakeSecret:
        self.get_calls += 1
        self.names.append(name)
        if self.fail_with is not None:
            raise self.fail_with
        if version is None:
            enabled = [s for s in self.versions if s.properties.enabled]
            if not enabled:
                raise LookupError(f"secret {name} not found")
            return enabled[-1]
        for secret in self.versions:
            if secret.properties.version == version:
                return secret
        raise LookupError(f"secret {name}/{version} not found")

    async def _props(self) -> AsyncIterator[FakeSecretProperties]:
        for secret in self.versions:
            yield secret.properties

    def list_properties_of_secret_versions(self, name: str) -> AsyncIterator[FakeSecretProperties]:
        self.names.append(name)
        if self.fail_with is not None:
            raise self.fail_with
        return self._props()


@dataclass
class FakeSender:
    sent: list[Any] = field(default_factory=list)
    fail_with: Exception | None = None
    closed: bool = False

    async def send_messages(self, message: Any) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(message)

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeServiceBusClient:
    senders: list[FakeSender] = field(default_factory=list)
    queue_names: list[str] = field(default_factory=list)
    fail_next_sender: Exception | None = None
    closed: bool = False

    def get_queue_sender(self, queue_name: str) -> FakeSender:
        self.queue_names.append(queue_name)
        sender = FakeSender(fail_with=self.fail_next_sender)
        self.fail_next_sender = None
        self.senders.append(sender)
        return sender

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeBlobProperties:
    name: str
    last_modified: datetime


@dataclass
class FakeDownloader:
    data: bytes

    async def readall(self) -> bytes:
        return self.data


class FakeItemPaged:
    """`AsyncItemPaged` of `list_blobs`: blob by blob through every page, or page by page
    (`by_page`)."""

    def __init__(self, container: FakeContainerClient, per_page: int) -> None:
        self.container = container
        self.per_page = per_page

    def by_page(self, continuation_token: str | None = None) -> FakePageIterator:
        self.container.markers.append(continuation_token)
        return self.container.page_iterator(self.container, self.per_page, continuation_token)

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for page in self.by_page():
            async for blob in page:
                yield blob


class FakePageIterator:
    """Pages of up to `per_page` blobs, each read when asked for; `continuation_token` is then
    where the next page starts (the service's marker is opaque: here, that page's first name),
    None after the last page."""

    def __init__(self, container: FakeContainerClient, per_page: int,
                 continuation_token: str | None) -> None:
        self.container = container
        self.per_page = per_page
        self.continuation_token = continuation_token
        self.done = False

    def __aiter__(self) -> FakePageIterator:
        return self

    async def __anext__(self) -> AsyncIterator[Any]:
        if self.done:
            raise StopAsyncIteration
        listing = self.container.listing()
        start = 0
        if self.continuation_token is not None:
            start = next((i for i, blob in enumerate(listing)
                          if blob.name >= self.continuation_token), len(listing))
        end = start + self.per_page
        self.continuation_token = listing[end].name if end < len(listing) else None
        self.done = self.continuation_token is None
        return self._page(listing[start:end])

    async def _page(self, blobs: list[Any]) -> AsyncIterator[Any]:
        for blob in blobs:
            yield blob


@dataclass
class FakeContainerClient:
    """The async `azure.storage.blob.aio.ContainerClient` surface the spill store uses."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    modified: dict[str, datetime] = field(default_factory=dict)
    fail_with: Exception | None = None
    closed: bool = False
    #: `results_per_page` of each `list_blobs` call.
    list_calls: list[int | None] = field(default_factory=list)
    #: The continuation token each listing of pages started from.
    markers: list[str | None] = field(default_factory=list)
    page_iterator: ClassVar[type[FakePageIterator]] = FakePageIterator

    async def upload_blob(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if name in self.blobs and not overwrite:
            from azure.core.exceptions import ResourceExistsError

            raise ResourceExistsError(f"blob {name} exists")
        self.blobs[name] = bytes(data)
        self.modified[name] = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=len(self.modified))

    def listing(self) -> list[Any]:
        """The blobs as the service lists them: by name."""
        return [FakeBlobProperties(name, self.modified[name]) for name in sorted(self.blobs)]

    def list_blobs(self, *, results_per_page: int | None = None) -> FakeItemPaged:
        if self.fail_with is not None:
            raise self.fail_with
        self.list_calls.append(results_per_page)
        return FakeItemPaged(self, results_per_page or 5000)

    async def download_blob(self, name: str) -> FakeDownloader:
        from azure.core.exceptions import ResourceNotFoundError

        if name not in self.blobs:
            raise ResourceNotFoundError(f"blob {name} not found")
        return FakeDownloader(self.blobs[name])

    async def delete_blob(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        if name not in self.blobs:
            raise ResourceNotFoundError(f"blob {name} not found")
        del self.blobs[name]

    async def close(self) -> None:
        self.closed = True


class ManualClock:
    """A clock the test moves by hand (`clock.now += 10`), for time-based logic."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingPublisher:
    """The Publisher boundary: records what it stores; once `fail_after` messages are stored
    it raises PublishError, as a queue (or queue and spill store) that went down."""

    def __init__(self, *, fail_after: int | None = None) -> None:
        self.sent: list[OutboundMessage] = []
        self.fail_after = fail_after

    async def publish(self, message: OutboundMessage) -> bool:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise PublishError("the queue is unavailable")
        self.sent.append(message)
        return True

    async def close(self) -> None:
        return None


class FailingPublisher:
    """The Publisher boundary with Service Bus down: every publish raises PublishError."""

    def __init__(self) -> None:
        self.calls = 0

    async def publish(self, message: OutboundMessage) -> bool:
        self.calls += 1
        raise PublishError("Service Bus send failed: ServiceBusConnectionError")

    async def close(self) -> None:
        return None


@dataclass
class BrokerMessage:
    sequence_number: int
    body: bytes
    message_id: str
    application_properties: dict[str, str]
    visible_at: float
    expires_at: float | None
    delivery_count: int = 0
    locked: bool = False


class FakeServiceBusQueue:
    """The Service Bus queue behaviour the retry path relies on, behind the SDK surface the
    app uses (`get_queue_sender().send_messages(ServiceBusMessage)`): duplicate detection on
    `message_id`, `scheduled_enqueue_time_utc`, `time_to_live` with dead-lettering on expiry,
    peek-lock with `maxDeliveryCount`. Time is the test's `clock` (epoch seconds)."""

    def __init__(self, clock: ManualClock, *, max_delivery_count: int = 10,
                 duplicate_window: float = 3600.0) -> None:
        self.clock = clock
        self.max_delivery_count = max_delivery_count
        self.duplicate_window = duplicate_window
        self.active: dict[int, BrokerMessage] = {}
        self.dead_letters: list[tuple[BrokerMessage, str]] = []
        self.duplicates_dropped: list[str] = []
        self._seen: dict[str, float] = {}
        self._next_sequence = 1

    # The client and sender surface (ServiceBusPublisher's client_factory returns this).
    def get_queue_sender(self, queue_name: str) -> FakeServiceBusQueue:
        return self

    async def send_messages(self, message: Any) -> None:
        self.accept(message)

    async def close(self) -> None:
        return None

    def accept(self, message: Any) -> None:
        now = self.clock()
        body = b"".join(message.body)
        message_id = str(message.message_id)
        first = self._seen.get(message_id)
        if first is not None and now - first < self.duplicate_window:
            self.duplicates_dropped.append(message_id)
            return
        self._seen[message_id] = now
        scheduled = message.scheduled_enqueue_time_utc
        visible = scheduled.timestamp() if scheduled is not None else now
        ttl = message.time_to_live
        props = {str(k): str(v) for k, v in (message.application_properties or {}).items()}
        self.active[self._next_sequence] = BrokerMessage(
            self._next_sequence, body, message_id, props, visible,
            None if ttl is None else visible + ttl.total_seconds())
        self._next_sequence += 1

    def receive(self) -> list[BrokerMessage]:
        """Lock every message due now, oldest first; expired ones are dead-lettered."""
        now = self.clock()
        due = []
        for seq, msg in sorted(self.active.items()):
            if msg.expires_at is not None and msg.expires_at <= now:
                del self.active[seq]
                self.dead_letters.append((msg, "TTLExpiredException"))
            elif not msg.locked and msg.visible_at <= now:
                msg.locked = True
                msg.delivery_count += 1
                due.append(msg)
        return due

    def complete(self, msg: BrokerMessage) -> None:
        del self.active[msg.sequence_number]

    def abandon(self, msg: BrokerMessage) -> None:
        msg.locked = False
        if msg.delivery_count >= self.max_delivery_count:
            del self.active[msg.sequence_number]
            self.dead_letters.append((msg, "MaxDeliveryCountExceeded"))

    def next_due(self) -> float | None:
        times = [m.expires_at if m.expires_at is not None else m.visible_at
                 for m in self.active.values() if not m.locked]
        return min(times, default=None)
