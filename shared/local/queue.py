"""The embedded development/test queue: SQLite with the Service Bus semantics the app relies on.

Production queues events in Azure Service Bus. Locally (the `make run` host and the test suite)
this module stands in for it, with the behaviour the receiver and processor depend on:

* **Durable send.** `send` commits before it returns (WAL journal, ``synchronous=FULL`` by
  default), so a message that was acknowledged survives ``kill -9`` of the process.
* **Duplicate detection** on ``message_id`` within a window measured from the time the id was
  first accepted; a duplicate is dropped and `send` returns False (the receiver still answers
  200: the event is stored once).
* **Peek-lock.** `receive` locks messages in sequence order with a lock token; `complete`
  removes, `abandon` releases, `renew_lock` extends. Selection and locking happen in one
  ``BEGIN IMMEDIATE`` transaction, so concurrent receivers (threads or processes) never get the
  same message.
* **Delivery count and dead-lettering.** Every delivery increments ``delivery_count``. A message
  abandoned, or whose lock expired, after ``max_delivery_count`` deliveries is dead-lettered
  with reason ``MaxDeliveryCountExceeded``. `dead_letter` moves one explicitly with a reason.
* **Scheduled messages** are invisible until their time and counted separately in `stats`.
* **Dead-letter operations** for the CLI (list, show, replay, purge), safe to run from another
  process while the host is running.

Time comes from the injected ``clock`` everywhere (lock expiry, scheduling, the duplicate
window), so tests control it without sleeping. It is a development backend, not a production
engine: one SQLite file, one writer at a time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..settings import Settings

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "MAX_DELIVERY_COUNT_EXCEEDED",
    "MAX_MESSAGE_ID_LENGTH",
    "SCHEMA_VERSION",
    "LocalQueue",
    "LockLostError",
    "QueueUnavailableError",
    "QueuedMessage",
]

#: Version of the on-disk schema, stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 1
#: Dead-letter reason Service Bus uses when the delivery count is exhausted.
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
#: Service Bus rejects longer message ids; so does the local queue, so the mistake shows locally.
MAX_MESSAGE_ID_LENGTH = 128
#: Seconds a connection waits for another process's write transaction before giving up.
DEFAULT_BUSY_TIMEOUT = 10.0

_ACTIVE = "active"
_DEADLETTERED = "deadlettered"

_SCHEMA = """
CREATE TABLE messages (
    sequence_number   INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id        TEXT    NOT NULL,
    body              BLOB    NOT NULL,
    properties        TEXT    NOT NULL,
    enqueued_time     REAL    NOT NULL,
    scheduled_time    REAL,
    visible_at        REAL    NOT NULL,
    delivery_count    INTEGER NOT NULL DEFAULT 0,
    lock_token        TEXT,
    locked_until      REAL,
    state             TEXT    NOT NULL CHECK (state IN ('active', 'deadlettered')),
    dl_reason         TEXT,
    dl_description    TEXT,
    dead_lettered_at  REAL
);
CREATE INDEX messages_by_state ON messages (state, sequence_number);
CREATE UNIQUE INDEX messages_by_lock ON messages (lock_token) WHERE lock_token IS NOT NULL;
CREATE INDEX messages_by_lock_expiry ON messages (locked_until) WHERE lock_token IS NOT NULL;
CREATE TABLE duplicates (
    message_id   TEXT PRIMARY KEY,
    accepted_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX duplicates_by_time ON duplicates (accepted_at);
"""

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


class QueueUnavailableError(RuntimeError):
    """The queue database cannot be used (locked too long, unreadable, disk full, closed...).

    The receiver answers 503 on this: nothing is acknowledged that is not stored.
    """


class LockLostError(RuntimeError):
    """The lock token is unknown or its lock has expired: the message may be redelivered."""


def _max_delivery_description(delivery_count: int) -> str:
    return f"Message could not be processed after {delivery_count} delivery attempts."


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _to_datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else _utc(timestamp)


def _row_to_message(row: tuple[Any, ...]) -> QueuedMessage:
    seq, msg_id, body, props, enqueued, scheduled, count, token, until, reason, desc, state = row
    return QueuedMessage(
        sequence_number=int(seq),
        message_id=str(msg_id),
        body=bytes(body),
        application_properties=dict(json.loads(props)),
        enqueued_time=_utc(enqueued),
        scheduled_enqueue_time=_to_datetime(scheduled),
        delivery_count=int(count),
        lock_token=token,
        locked_until=_to_datetime(until),
        dead_letter_reason=reason,
        dead_letter_description=desc,
        state=str(state),
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


class LocalQueue:
    """A durable peek-lock queue in one SQLite file, safe across threads and processes.

    Thread safety: one connection per instance, guarded by a lock. SQLite admits one writer at
    a time anyway, so a connection per thread would buy no write parallelism; it would make
    threads of the same process contend through SQLite's busy handler (millisecond sleeps)
    instead of a fair in-process lock, and leave connections in executor threads that `close`
    cannot reach. Other processes (the operations CLI) are coordinated by SQLite file locks,
    with ``busy_timeout`` so they wait instead of failing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_delivery_count: int = 5,
        lock_duration: float = 60.0,
        duplicate_window: float = 3600.0,
        clock: Callable[[], float] = time.time,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if max_delivery_count < 1:
            raise ValueError(f"max_delivery_count must be >= 1, got {max_delivery_count}")
        if lock_duration <= 0:
            raise ValueError(f"lock_duration must be > 0 seconds, got {lock_duration}")
        if duplicate_window < 0:
            raise ValueError(f"duplicate_window must be >= 0 seconds, got {duplicate_window}")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self.path = Path(path)
        self.max_delivery_count = max_delivery_count
        self.lock_duration = float(lock_duration)
        self.duplicate_window = float(duplicate_window)
        self._clock = clock
        self._lock = threading.Lock()
        # Wakes `wait_for_message` in this process as soon as `send` commits.
        self._sent = threading.Condition()
        self._sent_generation = 0
        # Expired duplicate-detection entries are pruned at most this often (clock seconds).
        self._prune_interval = min(max(self.duplicate_window, 1.0), 60.0)
        self._next_prune = float("-inf")
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # guarded by self._lock
            )
        except (OSError, sqlite3.Error) as exc:
            raise QueueUnavailableError(
                f"local queue {self.path}: cannot open the database: {exc}"
            ) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise QueueUnavailableError(
                f"local queue {self.path}: cannot initialise the database: {exc}"
            ) from exc
        self._conn = conn

    # -- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
            return  # the common case needs no write lock: opening never waits for a writer
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one creates it
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this code understands "
                    f"({SCHEMA_VERSION}); upgrade the app or use another LOCAL_STATE_DIR"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, operation: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Hold the instance lock and, for writes, a ``BEGIN IMMEDIATE`` transaction.

        sqlite errors become `QueueUnavailableError`; any exception rolls back.
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                raise QueueUnavailableError(f"local queue {self.path}: {operation} after close()")
            try:
                if not write:
                    yield conn
                    return
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise QueueUnavailableError(
                    f"local queue {self.path}: {operation} failed: {exc}"
                ) from exc

    def _now(self) -> float:
        return float(self._clock())

    def _sweep_expired_locks(self, conn: sqlite3.Connection, now: float) -> None:
        """An expired lock is a failed delivery: dead-letter those that used their last one."""
        conn.execute(
            "UPDATE messages SET state = ?, dl_reason = ?, "
            "dl_description = 'Message could not be processed after ' || delivery_count "
            "|| ' delivery attempts.', dead_lettered_at = ?, lock_token = NULL, "
            "locked_until = NULL "
            "WHERE lock_token IS NOT NULL AND locked_until <= ? AND state = ? "
            "AND delivery_count >= ?",
            (
                _DEADLETTERED,
                MAX_DELIVERY_COUNT_EXCEEDED,
                now,
                now,
                _ACTIVE,
                self.max_delivery_count,
            ),
        )

    def _locked_row(self, conn: sqlite3.Connection, lock_token: str, now: float) -> tuple[int, int]:
        """(sequence_number, delivery_count) of the message holding this live lock."""
        row = conn.execute(
            "SELECT sequence_number, delivery_count, locked_until FROM messages "
            "WHERE lock_token = ? AND state = ?",
            (lock_token, _ACTIVE),
        ).fetchone()
        if row is None:
            raise LockLostError(
                f"lock token {lock_token!r} is unknown: the message was settled, or its lock "
                "expired and it was redelivered or dead-lettered"
            )
        if row[2] <= now:
            raise LockLostError(
                f"the lock {lock_token!r} on message {row[0]} expired; it will be redelivered"
            )
        return int(row[0]), int(row[1])

    def _dead_letter_row(
        self, conn: sqlite3.Connection, seq: int, reason: str, description: str, now: float
    ) -> None:
        conn.execute(
            "UPDATE messages SET state = ?, dl_reason = ?, dl_description = ?, "
            "dead_lettered_at = ?, lock_token = NULL, locked_until = NULL "
            "WHERE sequence_number = ?",
            (_DEADLETTERED, reason, description, now, seq),
        )

    # -- sending --------------------------------------------------------------------------

    def send(
        self,
        body: bytes,
        *,
        message_id: str,
        application_properties: Mapping[str, str] | None = None,
        scheduled_enqueue_time: datetime | None = None,
    ) -> bool:
        """Store a message durably; False (and nothing stored) for a duplicate ``message_id``.

        Committed before it returns. A duplicate is a ``message_id`` first accepted less than
        ``duplicate_window`` seconds ago; like Service Bus, the window counts from the first
        acceptance and dropped duplicates do not extend it.
        """
        return self.send_many(
            [(body, message_id, application_properties)],
            scheduled_enqueue_time=scheduled_enqueue_time,
        )[0]

    def send_many(
        self,
        messages: Sequence[tuple[bytes, str, Mapping[str, str] | None]],
        *,
        scheduled_enqueue_time: datetime | None = None,
    ) -> list[bool]:
        """`send` for several ``(body, message_id, application_properties)`` in one commit.

        All or nothing: one transaction and one fsync for the lot (group commit), which is
        what lets the local host acknowledge hundreds of events a second with ``FULL`` sync.
        Each result is `send`'s: False for a duplicate, also of an earlier one in the batch.
        """
        rows: list[tuple[bytes, str, str]] = []
        for body, message_id, application_properties in messages:
            if not isinstance(body, bytes | bytearray | memoryview):
                raise TypeError(f"body must be bytes, got {type(body).__name__}")
            if not isinstance(message_id, str) or not message_id:
                raise ValueError("message_id must be a non-empty string")
            if len(message_id) > MAX_MESSAGE_ID_LENGTH:
                raise ValueError(
                    f"message_id is {len(message_id)} characters; Service Bus allows at most "
                    f"{MAX_MESSAGE_ID_LENGTH}"
                )
            properties = json.dumps(_check_properties(application_properties), ensure_ascii=False)
            rows.append((bytes(body), message_id, properties))
        scheduled: float | None = None
        if scheduled_enqueue_time is not None:
            if scheduled_enqueue_time.tzinfo is None:
                raise ValueError("scheduled_enqueue_time must be timezone-aware (UTC)")
            scheduled = scheduled_enqueue_time.timestamp()
        now = self._now()
        results: list[bool] = []
        with self._transaction("send") as conn:
            for body_bytes, message_id, properties in rows:
                row = conn.execute(
                    "SELECT accepted_at FROM duplicates WHERE message_id = ?", (message_id,)
                ).fetchone()
                if row is not None and now - row[0] < self.duplicate_window:
                    results.append(False)
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO duplicates (message_id, accepted_at) VALUES (?, ?)",
                    (message_id, now),
                )
                conn.execute(
                    "INSERT INTO messages (message_id, body, properties, enqueued_time, "
                    "scheduled_time, visible_at, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        message_id,
                        body_bytes,
                        properties,
                        now,
                        scheduled,
                        now if scheduled is None else scheduled,
                        _ACTIVE,
                    ),
                )
                results.append(True)
            if now >= self._next_prune:
                conn.execute(
                    "DELETE FROM duplicates WHERE accepted_at <= ?", (now - self.duplicate_window,)
                )
                self._next_prune = now + self._prune_interval
        if any(results):
            with self._sent:
                self._sent_generation += 1
                self._sent.notify_all()
        return results

    # -- receiving and settling -----------------------------------------------------------

    def receive(
        self, *, max_messages: int = 1, lock_duration: float | None = None
    ) -> list[QueuedMessage]:
        """Peek-lock up to ``max_messages`` available messages, oldest sequence number first."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        duration = self.lock_duration if lock_duration is None else float(lock_duration)
        if duration <= 0:
            raise ValueError(f"lock_duration must be > 0 seconds, got {duration}")
        now = self._now()
        locked_until = now + duration
        received: list[QueuedMessage] = []
        with self._transaction("receive") as conn:
            self._sweep_expired_locks(conn, now)
            seqs = [
                int(r[0])
                for r in conn.execute(
                    "SELECT sequence_number FROM messages WHERE state = ? AND visible_at <= ? "
                    "AND (lock_token IS NULL OR locked_until <= ?) "
                    "ORDER BY sequence_number LIMIT ?",
                    (_ACTIVE, now, now, max_messages),
                )
            ]
            for seq in seqs:
                conn.execute(
                    "UPDATE messages SET delivery_count = delivery_count + 1, lock_token = ?, "
                    "locked_until = ? WHERE sequence_number = ?",
                    (uuid.uuid4().hex, locked_until, seq),
                )
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE sequence_number = ?",  # noqa: S608
                    (seq,),
                ).fetchone()
                received.append(_row_to_message(row))
        return received

    def renew_lock(self, lock_token: str, *, lock_duration: float | None = None) -> datetime:
        """Extend a live lock from now by ``lock_duration`` (default: the queue's); the new
        expiry. A receiver that locked with its own duration renews with the same one."""
        duration = self.lock_duration if lock_duration is None else float(lock_duration)
        if duration <= 0:
            raise ValueError(f"lock_duration must be > 0 seconds, got {duration}")
        now = self._now()
        with self._transaction("renew_lock") as conn:
            seq, _ = self._locked_row(conn, lock_token, now)
            until = now + duration
            conn.execute(
                "UPDATE messages SET locked_until = ? WHERE sequence_number = ?", (until, seq)
            )
        return _utc(until)

    def complete(self, lock_token: str) -> None:
        """Remove a message that was processed; `LockLostError` if the lock is gone."""
        (error,) = self.complete_many([lock_token])
        if error is not None:
            raise error

    def complete_many(self, lock_tokens: Sequence[str]) -> list[LockLostError | None]:
        """`complete` for several locks in one commit; per token None or its `LockLostError`."""
        now = self._now()
        results: list[LockLostError | None] = []
        with self._transaction("complete") as conn:
            for lock_token in lock_tokens:
                try:
                    seq, _ = self._locked_row(conn, lock_token, now)
                except LockLostError as exc:
                    results.append(exc)
                    continue
                conn.execute("DELETE FROM messages WHERE sequence_number = ?", (seq,))
                results.append(None)
        return results

    def abandon(self, lock_token: str) -> None:
        """Release the lock for redelivery, or dead-letter once the delivery count is used up."""
        now = self._now()
        with self._transaction("abandon") as conn:
            seq, count = self._locked_row(conn, lock_token, now)
            if count >= self.max_delivery_count:
                self._dead_letter_row(
                    conn, seq, MAX_DELIVERY_COUNT_EXCEEDED, _max_delivery_description(count), now
                )
            else:
                conn.execute(
                    "UPDATE messages SET lock_token = NULL, locked_until = NULL "
                    "WHERE sequence_number = ?",
                    (seq,),
                )

    def dead_letter(self, lock_token: str, *, reason: str, description: str) -> None:
        """Move a locked message to the dead-letter queue with a reason and description."""
        now = self._now()
        with self._transaction("dead_letter") as conn:
            seq, _ = self._locked_row(conn, lock_token, now)
            self._dead_letter_row(conn, seq, reason, description, now)

    def dead_letter_by_sequence(
        self, sequence_number: int, *, reason: str, description: str
    ) -> None:
        """Dead-letter the currently locked active message with this sequence number."""
        now = self._now()
        with self._transaction("dead_letter_by_sequence") as conn:
            row = conn.execute(
                "SELECT locked_until FROM messages WHERE sequence_number = ? AND state = ? "
                "AND lock_token IS NOT NULL",
                (sequence_number, _ACTIVE),
            ).fetchone()
            if row is None or row[0] <= now:
                raise LockLostError(
                    f"message {sequence_number} is not locked by a receiver (settled, expired, "
                    "never received or already dead-lettered)"
                )
            self._dead_letter_row(conn, sequence_number, reason, description, now)

    def wait_for_message(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds (wall time) until a message may be available.

        Woken at once by `send` in this process; messages from other processes, scheduled
        messages coming due and expired locks are noticed by polling every 50 ms.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._sent:
                generation = self._sent_generation
            if self._has_available():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._sent:
                if self._sent_generation == generation:
                    self._sent.wait(min(remaining, 0.05))

    def _has_available(self) -> bool:
        now = self._now()
        with self._transaction("wait_for_message", write=False) as conn:
            row = conn.execute(
                "SELECT 1 FROM messages WHERE state = ? AND visible_at <= ? "
                "AND (lock_token IS NULL OR locked_until <= ?) LIMIT 1",
                (_ACTIVE, now, now),
            ).fetchone()
        return row is not None

    # -- operations (CLI) -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``{"active", "deadLettered", "scheduled"}`` counts, like Service Bus reports them.

        Expired locks are settled first, so a message whose last delivery timed out is
        counted as dead-lettered, not active.
        """
        now = self._now()
        with self._transaction("stats") as conn:
            self._sweep_expired_locks(conn, now)
            active, scheduled, dead = conn.execute(
                "SELECT "
                "COALESCE(SUM(state = ? AND visible_at <= ?), 0), "
                "COALESCE(SUM(state = ? AND visible_at > ?), 0), "
                "COALESCE(SUM(state = ?), 0) FROM messages",
                (_ACTIVE, now, _ACTIVE, now, _DEADLETTERED),
            ).fetchone()
        return {"active": int(active), "deadLettered": int(dead), "scheduled": int(scheduled)}

    def peek_dead_letters(self, *, limit: int = 1000) -> list[QueuedMessage]:
        """Dead-lettered messages in sequence order, without locking or removing them."""
        now = self._now()
        with self._transaction("peek_dead_letters") as conn:
            self._sweep_expired_locks(conn, now)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE state = ? "  # noqa: S608
                "ORDER BY sequence_number LIMIT ?",
                (_DEADLETTERED, max(limit, 0)),
            ).fetchall()
        return [_row_to_message(r) for r in rows]

    def get_dead_letter(self, sequence_number: int) -> QueuedMessage | None:
        """One dead-lettered message by sequence number, or None."""
        now = self._now()
        with self._transaction("get_dead_letter") as conn:
            self._sweep_expired_locks(conn, now)
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM messages "  # noqa: S608
                "WHERE sequence_number = ? AND state = ?",
                (sequence_number, _DEADLETTERED),
            ).fetchone()
        return None if row is None else _row_to_message(row)

    def replay_dead_letter(self, sequence_number: int) -> QueuedMessage | None:
        """Move a dead-lettered message back as a new active message, atomically.

        The new message has a new sequence number, delivery count 0, the same body and
        properties plus ``replayedFrom`` (the original sequence number) and ``replayCount``
        (incremented). It bypasses duplicate detection: its ``message_id`` is unchanged and is
        usually still inside the window. None when there is no such dead letter.
        """
        now = self._now()
        with self._transaction("replay_dead_letter") as conn:
            row = conn.execute(
                "SELECT message_id, body, properties FROM messages "
                "WHERE sequence_number = ? AND state = ?",
                (sequence_number, _DEADLETTERED),
            ).fetchone()
            if row is None:
                return None
            message_id, body, props_json = row
            properties: dict[str, str] = dict(json.loads(props_json))
            try:
                replay_count = int(properties.get("replayCount", "0"))
            except ValueError:
                replay_count = 0
            properties["replayedFrom"] = str(sequence_number)
            properties["replayCount"] = str(replay_count + 1)
            cursor = conn.execute(
                "INSERT INTO messages (message_id, body, properties, enqueued_time, "
                "scheduled_time, visible_at, state) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (message_id, body, json.dumps(properties, ensure_ascii=False), now, now, _ACTIVE),
            )
            new_seq = cursor.lastrowid
            conn.execute("DELETE FROM messages WHERE sequence_number = ?", (sequence_number,))
            new_row = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE sequence_number = ?",  # noqa: S608
                (new_seq,),
            ).fetchone()
        with self._sent:
            self._sent_generation += 1
            self._sent.notify_all()
        return _row_to_message(new_row)

    def purge_dead_letters(self, sequence_numbers: Iterable[int] | None = None) -> int:
        """Delete the named dead letters (all when None); how many were removed."""
        with self._transaction("purge_dead_letters") as conn:
            if sequence_numbers is None:
                return conn.execute(
                    "DELETE FROM messages WHERE state = ?", (_DEADLETTERED,)
                ).rowcount
            removed = 0
            for seq in set(sequence_numbers):
                removed += conn.execute(
                    "DELETE FROM messages WHERE sequence_number = ? AND state = ?",
                    (int(seq), _DEADLETTERED),
                ).rowcount
            return removed

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; later calls raise `QueueUnavailableError`. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> LocalQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalQueue({str(self.path)!r}, max_delivery_count={self.max_delivery_count})"


QUEUE_FILE = "queue.sqlite3"


def open_local_queue(settings: Settings) -> LocalQueue:
    """The embedded queue in `LOCAL_STATE_DIR`, as the settings configure it."""
    return LocalQueue(
        settings.local_state_dir / QUEUE_FILE, max_delivery_count=settings.max_delivery_count
    )
