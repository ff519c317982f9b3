"""The embedded queue behind the interfaces the deployed code uses.

The local host and the tests plug these into the runtime where Azure has Service Bus: a
publisher with group commit, a dead-letterer by sequence number, and `handled.jsonl`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..processor import InboundMessage, Outcome, outcome_record
from ..publisher import OutboundMessage, PublishError
from ..retry import RetryCopy
from .batching import Batcher, on_loop_unless_busy
from .queue_rows import MAX_DELIVERY_COUNT_EXCEEDED, ExpiredMessage, QueuedMessage

logger = logging.getLogger(__name__)

#: `stored_late` asks the queue this often, until its busy timeout and this margin have passed.
LATE_STORE_POLL_SECONDS = 0.2
LATE_STORE_MARGIN_SECONDS = 2.0


class Consumer(Protocol):
    """A consumer of the queue in this process that takes messages as they are stored (the
    local host): see `LocalQueuePublisher.consumer`."""

    lock_duration: float

    def free_workers(self) -> int:
        """How many messages it can start processing now (0: none, receive as usual)."""

    def deliver(self, messages: list[QueuedMessage]) -> None:
        """Start processing these messages, each locked for it; must not block."""

    def completions(self) -> list[str]:
        """Take the lock tokens of messages it finished, to complete with the send."""

    def not_completed(self, lock_tokens: list[str]) -> None:
        """The send failed: these (from `completions`) were not completed; keep them."""

    def wake(self) -> None:
        """Messages were stored that it was not handed: receive them."""


class LocalQueuePublisher:
    """Publishes to the embedded SQLite queue (local host and tests).

    Concurrent publishes share commits (`Batcher`): each still returns only after its own
    message is committed. A batch is written on the event loop unless the queue is busy.

    With a `consumer` (the local host sets itself), a batch written on the event loop also
    completes what the consumer finished and locks up to `consumer.free_workers()` of its new
    messages for it, in the same transaction (`LocalQueue.send_and_lock`), then hands them
    over: an idle worker starts on an event without a receive of its own, and completions
    need no commit of their own while events arrive. New messages are locked only when no
    older message waits, so the order is the queue's; the consumer is woken for any message
    stored without a lock.
    """

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.consumer: Consumer | None = None
        self._batcher: Batcher[tuple[bytes, str, dict[str, str]], bool] = Batcher(self._write)

    async def _write(
        self, items: Sequence[tuple[bytes, str, dict[str, str]]]
    ) -> Sequence[bool | BaseException]:
        results, unlocked = await on_loop_unless_busy(self._send, items)
        consumer = self.consumer
        if unlocked and consumer is not None:
            consumer.wake()
        return results

    def _send(self, items: Sequence[tuple[bytes, str, dict[str, str]]], *,
              wait: bool = True) -> tuple[list[bool], int]:
        """The batch's results, and how many messages were stored without a lock."""
        consumer = self.consumer
        if wait or consumer is None:
            # In a worker thread (`wait`: the queue was busy) nothing is handed over or taken
            # from the consumer: its methods belong on the event loop.
            results = list(self.queue.send_many(items, wait=wait))
            return results, sum(results)
        done = consumer.completions()
        try:
            results, locked, _ = self.queue.send_and_lock(
                items, max_locked=max(consumer.free_workers(), 0),
                lock_duration=consumer.lock_duration, complete=done, wait=False)
        except BaseException:
            if done:
                consumer.not_completed(done)
            raise
        if locked:
            try:
                consumer.deliver(locked)
            except Exception:  # stored all the same: redelivered once their locks expire
                logger.exception("handing %d stored message(s) to the consumer failed; they "
                                 "are delivered again when their locks expire", len(locked))
        return list(results), sum(results) - len(locked)

    async def publish(self, message: OutboundMessage) -> bool:
        try:
            return await self._batcher.submit(
                (message.body, message.message_id, dict(message.application_properties))
            )
        except Exception as exc:
            raise PublishError(f"local queue send failed: {type(exc).__name__}: {exc}") from exc

    async def stored_late(self, message_id: str) -> bool:
        """`LateStoreCheck`: whether the queue accepted `message_id` (within its duplicate
        window), asked until a send that waits for a busy write lock must have ended."""
        deadline = time.monotonic() + self.queue.busy_timeout + LATE_STORE_MARGIN_SECONDS
        while True:
            if await asyncio.to_thread(self.queue.accepted, message_id):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(LATE_STORE_POLL_SECONDS)

    async def close(self) -> None:
        return None


class LocalDeadLetterer:
    """The embedded queue can dead-letter the locked message by its sequence number."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        if message.sequence_number is None:
            raise ValueError("a local message always has a sequence number")
        await asyncio.to_thread(
            self._queue.dead_letter_by_sequence,
            message.sequence_number,
            reason=reason,
            description=description,
        )


class LocalRetrySender:
    """Schedules a failed event's next attempt on the embedded queue, as Service Bus would:
    invisible until its time, dropped when its id was seen (duplicate detection)."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    async def schedule(self, copy: RetryCopy) -> None:
        await asyncio.to_thread(
            self._queue.send,
            copy.body,
            message_id=copy.message_id,
            application_properties=copy.application_properties,
            scheduled_enqueue_time=copy.scheduled_enqueue_time,
        )


def _write_whole(fd: int, data: bytes) -> None:
    """`os.write` may write part of the data (a nearly full disk): loop on the rest, and if a
    write fails after part of the line is in, cut the file back so no torn line remains.

    The descriptor appends (O_APPEND) and its writer holds the log's lock, so the part written
    is the file's tail: its start is found only when it must be cut, not before every line."""
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, "write made no progress", str(fd))
            view = view[written:]
    except OSError:
        if len(view) < len(data):
            os.ftruncate(fd, os.fstat(fd).st_size - (len(data) - len(view)))
        raise


def json_line(record: Mapping[str, Any]) -> bytes:
    """`json.dumps(record, separators=(",", ":"), sort_keys=True)` and a line feed, in bytes.

    ASCII only, as json writes it (non-ASCII and DEL escaped), so that no line splitter can find a
    line end inside a record (U+2028, NEL). orjson writes the same bytes about five times
    faster when the result is ASCII; otherwise (orjson leaves non-ASCII unescaped, and refuses
    lone surrogates and integers beyond 64 bits) json's own path is taken.
    """
    try:
        line = orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError
        line = b""
    if line and line.isascii() and b"\x7f" not in line:  # json escapes DEL too
        return line
    return (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode("ascii")


class HandledLog:
    """Local mode: one JSON line per processed event in `${LOCAL_STATE_DIR}/handled.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one line, whole or not at all: OSError (a full disk) leaves the file as it
        was, and the caller fails the delivery (retried after the backoff)."""
        # Runs on the event loop: one O_APPEND write on a descriptor kept open, instead of
        # opening the file per line. The stat notices a deleted or rotated file and reopens.
        line = json_line(record)
        with self._lock:
            try:
                st = os.stat(self.path)
                current: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                current = None
            if self._fd is None or current != self._inode:
                self._close()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                st = os.fstat(fd)
                self._fd, self._inode = fd, (st.st_dev, st.st_ino)
            _write_whole(self._fd, line)

    def _close(self) -> None:
        fd, self._fd, self._inode = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._close()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def expired_recorder(
    log: HandledLog, max_delivery_count: int
) -> Callable[[list[ExpiredMessage]], None]:
    """`LocalQueue.on_expired`: a line in handled.jsonl for each message dead-lettered because
    the lock of its last delivery expired (the process that held it died or hung), since no
    settlement records that final outcome. A full disk loses the line, not the dead letter."""

    def record(messages: list[ExpiredMessage]) -> None:
        for expired in messages:
            message = InboundMessage(body=expired.body, message_id=expired.message_id,
                                     delivery_count=expired.delivery_count)
            try:
                log.append(outcome_record(
                    message, str(Outcome.DEAD_LETTERED), reason=MAX_DELIVERY_COUNT_EXCEEDED,
                    description=f"the lock of the last of {max_delivery_count} deliveries "
                                "expired before the message was settled"))
            except OSError as exc:
                logger.warning("cannot record dead-lettered message %s in handled.jsonl: %s",
                               expired.message_id, exc)

    return record
