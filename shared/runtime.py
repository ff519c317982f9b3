"""The objects the functions use, built once per process from the settings.

`get_runtime()` builds them lazily on first use (so a configuration error is reported by the
first request and by `/api/health`, not as an indexing failure). The local host and the tests
install their own with `set_runtime()`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .credentials import ProcessCredential
from .handlers import HandlerRegistry
from .handlers import registry as default_registry
from .processor import (
    DeadLetterer,
    InboundMessage,
    OutcomeLog,
    ProcessResult,
    ServiceBusDeadLetterer,
)
from .publisher import Publisher, RememberingPublisher, build_service_bus_publisher
from .retry import RetrySender, ServiceBusRetrySender
from .settings import Settings, load_settings
from .spill import (
    FileSpillStore,
    SpillingPublisher,
    SpillStore,
    build_blob_spill_store,
    build_connection_string_spill_store,
)
from .telemetry import configure as configure_telemetry
from .tokens import StaticTokenProvider, TokenProvider, build_key_vault_provider
from .vehicle_state import VehicleStateStore
from .vehicle_state.factory import open_store

logger = logging.getLogger(__name__)

HANDLED_FILE = "handled.jsonl"
#: The queue's duplicate-detection window: the embedded queue's, and at most Service Bus's
#: (`duplicateDetectionHistoryTimeWindow` in infra/modules/servicebus.bicep, checked by tests).
DUPLICATE_WINDOW_SECONDS = 3600.0
SPILL_DIR = "spill"


@dataclass(slots=True)
class Runtime:
    settings: Settings
    tokens: TokenProvider
    publisher: Publisher
    dead_letterer: DeadLetterer
    registry: HandlerRegistry
    #: Where a failed event's next attempt is scheduled (shared/retry.py).
    retry_sender: RetrySender
    handled_log: OutcomeLog | None = None
    queue: Any = None  # the LocalQueue in local mode
    # Spill-over (shared/spill.py): where events wait while the queue is down, and the
    # queue publisher the re-drive timer sends them back to.
    spill: SpillStore | None = None
    redrive_publisher: Publisher | None = None
    # The one Azure credential the clients above share (shared/credentials.py).
    credential: ProcessCredential | None = None
    # Local host only: what keeps the app from working although its settings are valid (the
    # queue file cannot be read), or None; `/api/health` answers 503 while there is one.
    health_problem: Callable[[], Awaitable[str | None]] | None = None
    # Local host only: what works but needs the operator (messages left in the queue because
    # every handler thread is stuck): `/api/health` answers 200 "degraded" naming each.
    health_warnings: Callable[[], list[str]] | None = None
    # Local host only: told of each message the queue function processed and its result (the
    # inspector shows what each delivery did to the vehicle state). Called on the event loop;
    # it must be quick and must not raise.
    on_processed: Callable[[InboundMessage, ProcessResult], None] | None = None
    #: Wall clock (epoch seconds) the receiver stamps the time of receipt with.
    clock: Callable[[], float] = time.time
    #: The vehicle state store (shared/vehicle_state); None with VEHICLE_STATE_STORE=off.
    vehicle_state: VehicleStateStore | None = None

    async def close(self) -> None:
        """Close the Azure clients, then the credential they share (the local host's stop).

        The queue and the handled log are the local host's to close. The Python worker has no
        shutdown hook for app code, so in Azure the process exit releases them.
        """
        for part in (self.publisher, self.redrive_publisher, self.spill, self.tokens,
                     self.vehicle_state):
            close = getattr(part, "close", None)
            if close is None:
                continue
            try:
                await close()
            except Exception:  # shutting down: close the rest regardless
                logger.warning("closing %s failed", type(part).__name__, exc_info=True)
        if self.credential is not None:
            await self.credential.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def build_tokens(settings: Settings, credential: ProcessCredential) -> TokenProvider:
    if settings.key_vault_uri:
        return build_key_vault_provider(
            settings.key_vault_uri,
            settings.token_secret_name,
            ttl_seconds=settings.token_cache_seconds,
            credential=credential,
        )
    assert settings.management_token is not None  # guaranteed by load_settings
    return StaticTokenProvider(settings.management_token, settings.previous_management_token)


def build_spill_store(settings: Settings, credential: ProcessCredential) -> SpillStore:
    # The host's precedence: a connection string (local development) before the identity.
    if settings.storage_connection_string:
        return build_connection_string_spill_store(
            settings.storage_connection_string, settings.spill_container_name
        )
    if settings.spill_blob_account_url:
        return build_blob_spill_store(
            settings.spill_blob_account_url, settings.spill_container_name, credential
        )
    return FileSpillStore(settings.local_state_dir / SPILL_DIR)


def build_runtime(
    settings: Settings,
    *,
    registry: HandlerRegistry | None = None,
    tokens: TokenProvider | None = None,
    publisher: Publisher | None = None,
    dead_letterer: DeadLetterer | None = None,
    retry_sender: RetrySender | None = None,
    credential: ProcessCredential | None = None,
    vehicle_state: VehicleStateStore | None = None,
) -> Runtime:
    """Everything the functions need, for the queue backend the settings choose.

    The default publisher is the queue behind a spill store; a `publisher` passed in is used
    as it is (and re-drive sends to it). `vehicle_state` is the store the processor applies
    events to and the read route reads.
    """
    credential = credential or ProcessCredential(settings.azure_client_id)
    queue = None
    handled_log = None
    primary: Publisher
    if settings.queue_backend == "servicebus":
        assert settings.servicebus_namespace is not None
        sb = build_service_bus_publisher(
            settings.servicebus_namespace, settings.queue_name, credential
        )
        primary = sb
        dead_letterer = dead_letterer or ServiceBusDeadLetterer(sb.send_raw)
        retry_sender = retry_sender or ServiceBusRetrySender(sb.send_raw)
    else:
        # Local only: shared/local is not deployed (.funcignore), and Azure always has a
        # Service Bus namespace, so this import never runs there.
        from .local.adapters import (
            HandledLog,
            LocalDeadLetterer,
            LocalQueuePublisher,
            LocalRetrySender,
        )
        from .local.queue_open import open_local_queue

        queue = open_local_queue(settings)
        primary = LocalQueuePublisher(queue)
        dead_letterer = dead_letterer or LocalDeadLetterer(queue)
        retry_sender = retry_sender or LocalRetrySender(queue)
        handled_log = HandledLog(settings.local_state_dir / HANDLED_FILE)
    spill = build_spill_store(settings, credential)
    if publisher is None:
        publisher = SpillingPublisher(primary, spill)
        if settings.queue_backend == "servicebus":
            # The embedded queue reports duplicates itself; Service Bus drops them silently.
            publisher = RememberingPublisher(publisher, window=DUPLICATE_WINDOW_SECONDS)
    else:
        primary = publisher
    return Runtime(
        settings=settings,
        tokens=tokens or build_tokens(settings, credential),
        publisher=publisher,
        dead_letterer=dead_letterer,
        registry=registry or default_registry,
        retry_sender=retry_sender,
        handled_log=handled_log,
        queue=queue,
        spill=spill,
        redrive_publisher=primary,
        credential=credential,
        vehicle_state=vehicle_state or open_store(settings, credential=credential),
    )


def get_runtime() -> Runtime:
    """The process's runtime, built on first use with telemetry export set up. Raises
    SettingsError when misconfigured."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                settings = load_settings()
                # Whichever function runs first on an instance (webhook, queue, timer) sets up
                # telemetry export for the process. First, and the runtime is kept only once
                # both are done: a failure leaves nothing cached, and the next use tries again
                # instead of running on with telemetry silently off.
                configure_telemetry(connection_string=settings.appinsights_connection_string)
                _runtime = build_runtime(settings)
    return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime (local host, tests); None forgets it so the next use rebuilds."""
    global _runtime
    with _lock:
        _runtime = runtime
