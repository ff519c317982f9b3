"""Spill-over: events are acknowledged even while the queue is down, and re-driven later.

Smartcar stops retrying a webhook after about three minutes; a Service Bus outage can last
longer. `SpillingPublisher` tries the queue within a short time budget and, when that fails,
writes the message (raw body, `message_id`, application properties) to a spill store: a Blob
container in Azure (`BlobSpillStore`), a directory under `LOCAL_STATE_DIR` locally
(`FileSpillStore`). Only when both fail does `publish` raise `PublishError` (the receiver's 503).
A 200 therefore always means "in the queue, or durably in the spill store".

`redrive` (run by a timer function every minute) sends spilled messages to the queue with
their original `message_id` and deletes each one only after its send succeeded.

Concurrent re-drives (several instances, or a run overlapping the next) are made safe by
at-least-once delivery plus the queue's duplicate detection on `message_id` (one hour, see
infra/modules/servicebus.bicep), not by leases: two runs that pick the same spilled message
both send it, the queue keeps one, and the second delete finds nothing and is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .credentials import ProcessCredential
from .publisher import OutboundMessage, Publisher, PublishError
from .telemetry import get_telemetry

logger = logging.getLogger(__name__)

#: Version of the spilled record's JSON layout.
RECORD_VERSION = 1
_SUFFIX = ".json"
_TEMP_PREFIX = ".tmp-"
# A temp file this old belongs to a write that never completed (its request got no 200).
_STALE_TEMP_SECONDS = 600.0


class SpillError(RuntimeError):
    """The spill store could not store (or read) a message."""


def spill_name(message_id: str) -> str:
    """One name per `message_id`: Smartcar's retries of one event overwrite one record."""
    return hashlib.sha256(message_id.encode("utf-8")).hexdigest() + _SUFFIX


def encode_record(message: OutboundMessage) -> bytes:
    record = {
        "version": RECORD_VERSION,
        "messageId": message.message_id,
        "applicationProperties": dict(message.application_properties),
        "body": base64.b64encode(message.body).decode("ascii"),
        "spilledAt": time.time(),
    }
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode_record(data: bytes) -> OutboundMessage:
    """The message a record holds; SpillError when it is not a readable record."""
    try:
        record = json.loads(data)
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            raise ValueError(f"expected a version {RECORD_VERSION} spill record")
        props = record["applicationProperties"]
        if not isinstance(props, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in props.items()
        ):
            raise ValueError("applicationProperties must map strings to strings")
        message_id = record["messageId"]
        if not isinstance(message_id, str) or not message_id:
            raise ValueError("messageId must be a non-empty string")
        body = base64.b64decode(record["body"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SpillError(f"unreadable spill record: {exc}") from exc
    return OutboundMessage(body=body, message_id=message_id, application_properties=props)


class SpillStore(Protocol):
    """Where messages wait while the queue is unavailable."""

    async def put(self, message: OutboundMessage) -> None:
        """Store durably before returning. Raises SpillError."""
        ...

    async def names(self, *, limit: int) -> Sequence[str]:
        """Up to `limit` stored records, oldest first where the store can tell."""
        ...

    async def get(self, name: str) -> OutboundMessage | None:
        """The stored message, None when it is gone. Raises SpillError when unreadable."""
        ...

    async def delete(self, name: str) -> None:
        """Remove a record; a record already gone is not an error."""
        ...

    async def close(self) -> None: ...


class FileSpillStore:
    """A directory of records (local host, `func start` without a storage account).

    Each record is written to a temp file, fsynced, atomically renamed into place and the
    directory fsynced, so `put` returning means the record survives `kill -9` or power loss.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _put_sync(self, message: OutboundMessage) -> None:
        # Private whatever the umask (`func start` without a storage account has no 077 one):
        # the names are hashes of eventIds, and the records vehicle data.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self.directory / spill_name(message.message_id)
        temp = self.directory / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        data = encode_record(message)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def put(self, message: OutboundMessage) -> None:
        try:
            await asyncio.to_thread(self._put_sync, message)
        except OSError as exc:
            raise SpillError(f"spill write to {self.directory} failed: {exc}") from exc

    def _names_sync(self, limit: int) -> list[str]:
        if not self.directory.is_dir():
            return []
        now = time.time()
        found: list[tuple[float, str]] = []
        for entry in os.scandir(self.directory):
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if entry.name.startswith(_TEMP_PREFIX):
                if now - mtime > _STALE_TEMP_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(_SUFFIX):
                found.append((mtime, entry.name))
        found.sort()
        return [name for _, name in found[:limit]]

    async def names(self, *, limit: int) -> Sequence[str]:
        return await asyncio.to_thread(self._names_sync, limit)

    async def get(self, name: str) -> OutboundMessage | None:
        try:
            data = await asyncio.to_thread((self.directory / name).read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpillError(f"spill read of {name} failed: {exc}") from exc
        return decode_record(data)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread((self.directory / name).unlink, missing_ok=True)

    async def close(self) -> None:
        return None


# The Blob SDK's own retries must fit inside the spill budget (SpillingPublisher's 5 s): its
# default policy waits ~15 s before the first retry, so one transient error became a 503.
# Three quick retries a few hundred milliseconds apart, and per-attempt socket timeouts short
# enough that one stalled attempt still leaves time for the next.
BLOB_RETRY_TOTAL = 3
BLOB_RETRY_BACKOFF_SECONDS = 0.25
BLOB_RETRY_JITTER_SECONDS = 0.1
BLOB_CONNECTION_TIMEOUT_SECONDS = 2
BLOB_READ_TIMEOUT_SECONDS = 3
#: Listing spilled records (one re-drive run) gives up after this long.
BLOB_LIST_TIMEOUT_SECONDS = 30.0
#: A re-drive run lists one page of this many spilled records (the most one List Blobs call
#: returns), never the whole container: a backlog of any size is listed in one call's time.
BLOB_LIST_PAGE = 5000


def blob_client_options() -> dict[str, Any]:
    """Keyword arguments for an `azure.storage.blob.aio` client that fit the spill budget."""
    from azure.storage.blob.aio import LinearRetry

    # Annotated `int` in the SDK, but used as seconds in random.uniform: fractions work.
    seconds: dict[str, Any] = {
        "backoff": BLOB_RETRY_BACKOFF_SECONDS,
        "random_jitter_range": BLOB_RETRY_JITTER_SECONDS,
    }
    return {
        "retry_policy": LinearRetry(retry_total=BLOB_RETRY_TOTAL, **seconds),
        "connection_timeout": BLOB_CONNECTION_TIMEOUT_SECONDS,
        "read_timeout": BLOB_READ_TIMEOUT_SECONDS,
    }


def _is_missing_container(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "ContainerNotFound"


class BlobSpillStore:
    """A Blob container in the app's storage account, through `azure.storage.blob.aio`.

    `client_factory` returns a `ContainerClient` (identity-based in production, see
    `build_blob_spill_store`); it is created lazily, once per process, and reused. The
    container is created on the first write that finds it missing.

    `names` lists one page of `list_page` blobs, in the service's order (by name, a hash of
    the message id, so unrelated to age), and answers the oldest of that page; the next call
    lists the page after it, and after the last page the first one again. Up to `list_page`
    records go strictly oldest first; past that, oldest first within each page, the pages in
    turn. Memory and listing time are one page's, whatever the backlog.
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        *,
        timeout: float = 5.0,
        list_timeout: float = BLOB_LIST_TIMEOUT_SECONDS,
        list_page: int = BLOB_LIST_PAGE,
    ) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._timeout = timeout
        self._list_timeout = list_timeout
        self._list_page = list_page
        # Where the next listing starts: the continuation token after the last page listed.
        self._marker: str | None = None

    def _container(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    async def _upload(self, message: OutboundMessage) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        name, data = spill_name(message.message_id), encode_record(message)
        try:
            await self._container().upload_blob(name, data, overwrite=True)
        except ResourceNotFoundError as exc:
            if not _is_missing_container(exc):
                raise
            logger.warning("spill container missing; creating it")
            try:
                await self._container().create_container()
            except ResourceExistsError:  # another instance created it meanwhile
                pass
            await self._container().upload_blob(name, data, overwrite=True)

    async def put(self, message: OutboundMessage) -> None:
        try:
            await asyncio.wait_for(self._upload(message), self._timeout)
        except Exception as exc:
            raise SpillError(f"spill upload failed: {type(exc).__name__}") from exc

    async def _list(self) -> list[tuple[Any, str]]:
        from azure.core.exceptions import ResourceNotFoundError

        found: list[tuple[Any, str]] = []
        try:
            pages = self._container().list_blobs(results_per_page=self._list_page).by_page(
                continuation_token=self._marker
            )
            async for page in pages:
                async for blob in page:
                    found.append((blob.last_modified, blob.name))
                break  # one page per call
        except ResourceNotFoundError as exc:
            if not _is_missing_container(exc):
                raise
            return []  # nothing was ever spilled
        self._marker = pages.continuation_token  # None after the last page
        return found

    async def names(self, *, limit: int) -> Sequence[str]:
        """Up to `limit` of one page of spilled records, oldest first (see the class)."""
        try:
            found = await asyncio.wait_for(self._list(), self._list_timeout)
        except Exception as exc:
            self._marker = None  # the next run starts again from the first page
            raise SpillError(f"listing spilled records failed: {type(exc).__name__}") from exc
        found.sort(key=lambda item: (item[0] is None, item[0] or 0, item[1]))
        return [name for _, name in found[:limit]]

    async def get(self, name: str) -> OutboundMessage | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            downloader = await asyncio.wait_for(
                self._container().download_blob(name), self._timeout
            )
            data: bytes = await asyncio.wait_for(downloader.readall(), self._timeout)
        except ResourceNotFoundError:
            return None
        except Exception as exc:  # kept for the next run, like an unreadable record
            raise SpillError(f"spill download of {name} failed: {type(exc).__name__}") from exc
        return decode_record(data)

    async def delete(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            await asyncio.wait_for(self._container().delete_blob(name), self._timeout)
        except ResourceNotFoundError:
            logger.debug("spilled blob %s was already deleted (another re-drive)", name)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def build_blob_spill_store(
    account_url: str, container_name: str, credential: ProcessCredential
) -> BlobSpillStore:
    """The production store: the blob endpoint with the process's shared credential."""

    def factory() -> Any:
        from azure.storage.blob.aio import ContainerClient

        return ContainerClient(
            account_url, container_name, credential=credential.get(), **blob_client_options()
        )

    return BlobSpillStore(factory)


def build_connection_string_spill_store(
    connection_string: str, container_name: str
) -> BlobSpillStore:
    """Local development only: Azurite (`UseDevelopmentStorage=true`) or an account's key."""

    def factory() -> Any:
        from azure.storage.blob.aio import ContainerClient

        return ContainerClient.from_connection_string(
            connection_string, container_name, **blob_client_options()
        )

    return BlobSpillStore(factory)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class LateStoreCheck(Protocol):
    """What a primary publisher may offer: whether a send that outlived the time budget was
    stored after all (the local queue's send keeps waiting for a busy write lock, and may
    commit after the event was spilled)."""

    async def stored_late(self, message_id: str) -> bool:
        """True once the message is known to be in the queue; False when, by the time the
        send must have ended, it is not."""
        ...


class SpillingPublisher:
    """A `Publisher`: the queue first, within `primary_timeout` seconds; the spill store next.

    The two budgets together stay well inside Smartcar's 15-second response timeout.

    A send that timed out may still commit (it was waiting, not failing). When the primary can
    tell (`LateStoreCheck`), the spilled copy of a message that was stored after all is deleted
    as soon as that is known, so no re-drive, however late (past the duplicate window), stores
    it a second time.
    """

    def __init__(
        self,
        primary: Publisher,
        spill: SpillStore,
        *,
        primary_timeout: float = 5.0,
        spill_timeout: float = 5.0,
    ) -> None:
        self.primary = primary
        self.spill = spill
        self._primary_timeout = primary_timeout
        self._spill_timeout = spill_timeout
        self._followups: set[asyncio.Task[None]] = set()

    async def publish(self, message: OutboundMessage) -> bool:
        try:
            # A timeout scope, not wait_for: no extra task per webhook on the hot path.
            async with asyncio.timeout(self._primary_timeout):
                return await self.primary.publish(message)
        except (PublishError, TimeoutError) as exc:
            primary_error = exc
        try:
            await asyncio.wait_for(self.spill.put(message), self._spill_timeout)
        except (SpillError, TimeoutError) as exc:
            logger.error(
                "message %s could not be queued (%s) nor spilled (%s)",
                message.message_id, type(primary_error).__name__, type(exc).__name__,
            )
            raise PublishError(
                f"queue failed ({_describe(primary_error)}) and spill failed ({_describe(exc)})"
            ) from exc
        logger.warning(
            "queue unavailable (%s); message %s spilled for re-drive",
            type(primary_error).__name__, message.message_id,
        )
        get_telemetry().record_spilled()
        check = getattr(self.primary, "stored_late", None)
        if isinstance(primary_error, TimeoutError) and check is not None:
            task = asyncio.create_task(self._drop_if_stored_late(message.message_id, check))
            self._followups.add(task)
            task.add_done_callback(self._followups.discard)
        return True

    async def _drop_if_stored_late(
        self, message_id: str, stored_late: Callable[[str], Any]
    ) -> None:
        try:
            if not await stored_late(message_id):
                return
            await self.spill.delete(spill_name(message_id))
        except Exception as exc:  # the copy stays: a re-drive in the window drops it
            logger.warning("could not check whether spilled message %s was stored late: %s",
                           message_id, type(exc).__name__)
            return
        logger.info("message %s was stored after its send timed out; its spilled copy is "
                    "deleted", message_id)

    async def close(self) -> None:
        for task in list(self._followups):
            task.cancel()
        await self.primary.close()
        await self.spill.close()


@dataclass(frozen=True, slots=True)
class RedriveResult:
    sent: int
    failed: int
    unreadable: int
    #: True when the run stopped early (queue still failing, or out of time).
    stopped: bool
    #: Records whose send failed while the queue took others after it (too large for the
    #: queue, for one): kept, logged by message id, and tried again by the next run.
    refused: int = 0


#: A run stops after this many failed sends in a row (no send succeeding in between): the queue
#: is down. Twice the sends in flight, so that one record the queue refuses, and the sends it
#: took down with it (a failed send reopens the shared link), never stop a run.
REDRIVE_FAILURES_TO_STOP = 16


async def redrive(
    spill: SpillStore,
    publisher: Publisher,
    *,
    batch: int = 1000,
    concurrency: int = 8,
    failures_to_stop: int = REDRIVE_FAILURES_TO_STOP,
    time_budget: float = 240.0,
    clock: Callable[[], float] = time.monotonic,
) -> RedriveResult:
    """Send spilled messages to the queue, deleting each only after its send succeeded.

    A record whose send fails is kept for the next run, and the run goes on: records go oldest
    first, so one the queue always refuses must not hold back those behind it. The run stops
    after `failures_to_stop` failed sends in a row (the queue is still down; the next run tries
    again) and after `time_budget` seconds (well inside the five-minute function timeout). A
    failed send followed by a successful one was refused by a working queue: it is counted
    (`refused`) and logged by message id. An unreadable record is kept and logged, never
    deleted: it may be the only copy of an event.
    """
    started = clock()
    names = await spill.names(limit=batch)
    sent = failed = unreadable = 0
    failing: list[str] = []  # message ids that failed since the last successful send
    refused: list[str] = []
    stop = asyncio.Event()
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str) -> None:
        nonlocal sent, failed, unreadable
        async with gate:
            if stop.is_set():
                return
            if clock() - started > time_budget:
                stop.set()
                return
            try:
                message = await spill.get(name)
            except SpillError as exc:
                unreadable += 1
                logger.error("spilled record %s kept, it cannot be re-driven: %s", name, exc)
                return
            if message is None:  # another re-drive took it
                return
            try:
                await publisher.publish(message)
            except PublishError as exc:
                failed += 1
                failing.append(message.message_id)
                if len(failing) >= failures_to_stop:
                    stop.set()
                logger.warning("re-drive of %s failed (%s); retrying next run",
                               message.message_id, exc)
                return
            sent += 1
            refused.extend(failing)
            failing.clear()
            try:
                await spill.delete(name)
            except Exception as exc:  # sent already: a second send is a dropped duplicate
                logger.warning("spilled record %s was sent but not deleted: %s",
                               name, type(exc).__name__)

    await asyncio.gather(*(one(name) for name in names))
    for message_id in refused:
        logger.error("spilled message %s was refused by the queue while it took others; kept "
                     "for the next run", message_id)
    if sent:
        get_telemetry().record_redriven(sent)
    if names:
        logger.info("re-drive: %d sent, %d failed, %d unreadable, %d listed",
                    sent, failed, unreadable, len(names))
    return RedriveResult(sent=sent, failed=failed, unreadable=unreadable, stopped=stop.is_set(),
                         refused=len(refused))
