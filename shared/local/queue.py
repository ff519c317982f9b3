"""The embedded development/test queue: SQLite with the Service Bus semantics the app relies on.

One module for one class, past 800 lines on purpose: sending, settlement and the dead-letter
operations share one transaction discipline (`_transaction`: the instance lock, the sync level
of a settlement or a send, the wall-clock step followed inside the write, the lock-expiry
sweep's dead letters reported after the commit), and a send completes and locks messages in the
transaction that stores them (`send_and_lock`), so split apart they would be mixins sharing all
of that private state. What does stand alone is in sibling modules: the message types, errors
and row decoding (queue_rows.py), the schema and damage checks (queue_schema.py), and opening a
state directory's queue (queue_open.py).

Production queues events in Azure Service Bus. Locally (the `make run` host and the test suite)
this module stands in for it, with the behaviour the receiver and processor depend on:

* **Durable send.** `send` commits before it returns (WAL journal, ``synchronous=FULL`` by
  default), so a message that was acknowledged survives ``kill -9`` of the process and a power
  cut. Locks and settlements (`receive`, `renew_lock`, `complete`, `abandon`) commit without
  an fsync of their own (``synchronous=NORMAL`` for those transactions): they survive the
  process being killed, and are made durable by the next `send`'s fsync. A power cut can lose
  only the last of them, and the queue then redelivers (at least once, as Service Bus) and may
  count one delivery fewer; it never loses a message. Most of the queue's commits are these,
  so this is what lets a 2-core machine settle thousands of messages a second.
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
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Literal

from ..retry import RETRY_PROPS
from .ackmark import AckMark
from .queue_rows import (
    _ACTIVE,
    _COLUMNS,
    _DEADLETTERED,
    _UNDECODABLE,
    CORRUPT_MESSAGE,
    MAX_DELIVERY_COUNT_EXCEEDED,
    ExpiredMessage,
    LockLostError,
    QueueBusyError,
    QueueDamagedError,
    QueuedMessage,
    QueueFullError,
    QueueUnavailableError,
    _check_properties,
    _properties,
    _properties_text,
    _row_to_dead_letter,
    _row_to_message,
    _utc,
)
from .queue_schema import _is_damage, _migrate, bound_wal, recovery_advice

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "MAX_MESSAGE_ID_LENGTH",
    "LocalQueue",
]

#: Service Bus rejects longer message ids; so does the local queue, so the mistake shows locally.
MAX_MESSAGE_ID_LENGTH = 128
#: Seconds a connection waits for another process's write transaction before giving up.
DEFAULT_BUSY_TIMEOUT = 10.0

#: A change of the wall clock against the monotonic one larger than this is a step. NTP slews
#: far slower. A suspend counts as one too (CLOCK_MONOTONIC stops meanwhile): the handlers
#: holding locks were suspended with it, so their locks keep what was left of them.
CLOCK_STEP_SECONDS = 1.0


def _boot_id() -> str:
    """This boot's id (Linux): CLOCK_MONOTONIC is shared by every process of one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _max_delivery_description(delivery_count: int) -> str:
    return f"Message could not be processed after {delivery_count} delivery attempts."


def _undecodable_description(exc: BaseException) -> str:
    # The exception text may quote stored values (vehicle data): name its type and position.
    where = ""
    if isinstance(exc, json.JSONDecodeError):
        where = f" at character {exc.pos}"
    return (
        f"The stored message cannot be decoded ({type(exc).__name__}{where}): the queue file "
        "was damaged. Inspect it with `dlq show`; purge it, or replay it once repaired."
    )


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
        self.busy_timeout = float(busy_timeout)
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
        # The wall clock's offset from the monotonic clock as this process last stored it.
        self._clock_offset: float | None = None
        self._boot = _boot_id()
        # Whether the clock reference this process found was stored during this boot: then
        # `_follow_clock` measured any step since, and stored times need no clamp at start.
        self._reference_of_this_boot = False
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
            self._busy_ms = int(busy_timeout * 1000)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._bound_wal(conn)
            _migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            if _is_damage(exc):
                raise QueueDamagedError(
                    f"local queue {self.path} is damaged: {exc}. {recovery_advice(self.path)}"
                ) from exc
            raise QueueUnavailableError(
                f"local queue {self.path}: cannot initialise the database: {exc}"
            ) from exc
        self._conn = conn
        #: Told, after the commit, of messages the lock-expiry sweep dead-lettered (their
        #: last delivery's lock expired: no settlement records them); `open_state_queue` sets
        #: it to append them to handled.jsonl. Called outside the queue's lock; must not raise.
        self.on_expired: Callable[[list[ExpiredMessage]], None] | None = None
        #: Why the last send failed (the disk is full...), None once one succeeds: the
        #: local host's health check reports it.
        self.store_failure: str | None = None
        #: Raised after each send that stored something (`open_state_queue` sets it).
        self.ack_mark: AckMark | None = None
        self._expired: list[ExpiredMessage] = []
        self._synchronous = synchronous
        # The level the connection is at now: settlements switch to NORMAL (see the module
        # docstring), sends and every other write switch back to `synchronous`.
        self._sync_level = synchronous
        # The busy timeout the connection is at now: 0 during a call made with wait=False.
        self._busy_level = self._busy_ms

    def check_integrity(self) -> None:
        """`PRAGMA quick_check` of the whole file; `QueueDamagedError` naming what it found.

        The local host runs it at start: a damaged file is refused rather than served, since
        receives would fail (or skip rows) while webhooks were still acknowledged.
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                raise QueueUnavailableError(f"local queue {self.path}: check after close()")
            try:
                found = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            except sqlite3.DatabaseError as exc:
                if not _is_damage(exc):
                    raise QueueUnavailableError(
                        f"local queue {self.path}: integrity check failed: {exc}"
                    ) from exc
                found = [str(exc)]
        problems = [line for line in found if line != "ok"]
        if problems:
            shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)"
                                               if len(problems) > 3 else "")
            raise QueueDamagedError(
                f"local queue {self.path} is damaged: PRAGMA quick_check found: {shown}. "
                f"{recovery_advice(self.path)}"
            )

    def _bound_wal(self, conn: sqlite3.Connection) -> None:
        bound_wal(conn, self.path.parent)

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database file and truncate it to 0 bytes
        (``wal_checkpoint(TRUNCATE)``); False when a reader in another process kept it from
        completing. The local host runs it when idle and after a write found the disk full."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise QueueUnavailableError(f"local queue {self.path}: checkpoint after close()")
            return self._checkpoint_locked(conn)

    def _checkpoint_locked(self, conn: sqlite3.Connection) -> bool:
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            logger.warning("local queue %s: checkpoint failed: %s", self.path, exc)
            return False
        return int(busy) == 0

    def check_readable(self) -> None:
        """A cheap read of the next message the receiver would take; raises
        `QueueUnavailableError` when the file cannot be read (the health check)."""
        now = self._now()
        with self._transaction("health check", write=False) as conn:
            conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE state = ? AND visible_at <= ? "  # noqa: S608
                "ORDER BY sequence_number LIMIT 1",
                (_ACTIVE, now),
            ).fetchall()

    def accepted(self, message_id: str) -> bool:
        """Whether a send of `message_id` was accepted within the duplicate window (a read:
        it does not wait for another process's write lock)."""
        now = self._now()
        with self._transaction("accepted", write=False) as conn:
            row = conn.execute(
                "SELECT accepted_at FROM duplicates WHERE message_id = ?", (message_id,)
            ).fetchone()
        return row is not None and now - float(row[0]) < self.duplicate_window

    def highest_sequence_number(self) -> int:
        """The highest sequence number ever assigned (deletes do not lower it); 0 if none."""
        with self._transaction("highest sequence number", write=False) as conn:
            row = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return int(row[0]) if row is not None else 0

    def recent(self, limit: int = 20) -> list[tuple[bytes, dict[str, str]]]:
        """Body and properties of the newest `limit` messages (active or dead-lettered), newest
        first; rows that cannot be decoded are skipped. For judging the clock at start."""
        with self._transaction("recent", write=False) as conn:
            rows = conn.execute(
                "SELECT body, properties FROM messages ORDER BY sequence_number DESC LIMIT ?",
                (max(limit, 0),),
            ).fetchall()
        found: list[tuple[bytes, dict[str, str]]] = []
        for body, props in rows:
            try:
                if isinstance(body, bytes):
                    found.append((body, _properties(props)))
            except _UNDECODABLE:
                continue
        return found

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _transaction(
        self, operation: str, *, write: bool = True, settlement: bool = False, wait: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """Hold the instance lock and, for writes, a ``BEGIN IMMEDIATE`` transaction.

        A `settlement` (a lock taken, renewed or released, a message completed) commits without
        its own fsync; see the module docstring. Without `wait`, a busy instance lock or SQLite
        write lock raises `QueueBusyError` at once, before anything is written. sqlite errors
        become `QueueUnavailableError`; any exception rolls back.
        """
        if not self._lock.acquire(blocking=wait):
            raise QueueBusyError(f"local queue {self.path}: {operation}: in use by another thread")
        expired: list[ExpiredMessage] = []
        try:
            conn = self._conn
            if conn is None:
                raise QueueUnavailableError(f"local queue {self.path}: {operation} after close()")
            try:
                if not write:
                    yield conn
                    return
                level = "NORMAL" if settlement else self._synchronous
                if level != self._sync_level:
                    conn.execute(f"PRAGMA synchronous = {level}")
                    self._sync_level = level
                busy = self._busy_ms if wait else 0
                if busy != self._busy_level:
                    conn.execute(f"PRAGMA busy_timeout = {busy}")
                    self._busy_level = busy
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if not wait and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                        raise QueueBusyError(
                            f"local queue {self.path}: {operation}: another process holds "
                            "the write lock") from exc
                    raise
                try:
                    self._follow_clock(conn)
                    yield conn
                    conn.execute("COMMIT")
                    expired, self._expired = self._expired, []
                except BaseException:
                    self._expired = []
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
                    full = QueueFullError(f"local queue {self.path}: {operation} failed: {exc} "
                                          "(the disk is full)")
                    # The WAL may be what filled the disk (its automatic checkpoint waits for
                    # 1,000 pages): move it into the database file and cut it to nothing.
                    full.checkpointed = self._checkpoint_locked(conn)
                    raise full from exc
                raise QueueUnavailableError(
                    f"local queue {self.path}: {operation} failed: {exc}"
                ) from exc
        finally:
            self._lock.release()
        if expired and self.on_expired is not None:
            self.on_expired(expired)

    def _now(self) -> float:
        return float(self._clock())

    def _follow_clock(self, conn: sqlite3.Connection) -> None:
        """Move every stored time with a step of the wall clock, inside the write transaction.

        Locks, retry backoffs and the duplicate window are stored as wall-clock times. A step
        of the clock (+2 h: NTP after a suspend, a VM resumed) expired every lock at once, so
        in-flight messages were delivered a second time concurrently, and the duplicate
        window with them; -2 h hid the backlog behind `visible_at` for two hours. The wall
        clock's offset from the monotonic clock (the same for every process of one boot) is
        kept with the times; a write that finds it changed by over CLOCK_STEP_SECONDS shifts
        them by the step first, so what they measure (seconds from now) is kept. One
        transaction: of several processes, the first to see a step applies it, once.
        """
        if self._clock is not time.time:  # an injected clock (tests) has no steps to follow
            return
        offset = time.time() - time.monotonic()
        if self._clock_offset is not None and abs(offset - self._clock_offset) < CLOCK_STEP_SECONDS:
            return
        boot = self._boot
        row = conn.execute(
            "SELECT boot_id, wall_minus_monotonic FROM clock_reference WHERE id = 1").fetchone()
        if self._clock_offset is None:  # the first look of this process
            self._reference_of_this_boot = bool(row is not None and boot and row[0] == boot)
        if row is not None and boot and row[0] == boot:
            step = offset - float(row[1])
            if abs(step) >= CLOCK_STEP_SECONDS:
                self._shift_times(conn, step)
        conn.execute(
            "INSERT INTO clock_reference (id, boot_id, wall_minus_monotonic) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET boot_id = excluded.boot_id, "
            "wall_minus_monotonic = excluded.wall_minus_monotonic",
            (boot, offset),
        )
        self._clock_offset = offset

    def _shift_times(self, conn: sqlite3.Connection, step: float) -> None:
        conn.execute(
            "UPDATE messages SET visible_at = visible_at + ?, "
            "locked_until = locked_until + ?, "
            "scheduled_time = scheduled_time + ? WHERE state = ?",
            (step, step, step, _ACTIVE),
        )
        conn.execute("UPDATE duplicates SET accepted_at = accepted_at + ?", (step,))
        self._next_prune = float("-inf")
        logger.warning(
            "local queue %s: the wall clock stepped by %+.0f s; locks, retry delays, scheduled "
            "times and the duplicate window moved with it (they measure time from now)",
            self.path, step,
        )

    def clamp_future_times(self, *, lock_seconds: float, backoff_seconds: float) -> int:
        """At start: times further ahead than any lock or backoff could have set them (the
        clock went back across a reboot, which `_follow_clock` cannot measure) are wrong by an
        unknown amount: such a message becomes visible now (a retry a little early is
        harmless), such a lock lasts `lock_seconds` from now. How many rows changed.

        Only when the clock reference was stored in another boot (or there is none, or the
        clock is injected): within one boot `_follow_clock` has already moved every stored
        time by any step, and a lock further ahead than `lock_seconds` is another host's on
        this directory, taken with a longer `--lock-duration`, that must hold.
        Scheduled messages keep their times: a schedule may lie far ahead on purpose."""
        now = self._now()
        with self._transaction("clamp future times") as conn:
            if self._reference_of_this_boot:
                return 0
            changed = conn.execute(
                "UPDATE messages SET visible_at = ? WHERE state = ? AND scheduled_time IS NULL "
                "AND visible_at > ?",
                (now, _ACTIVE, now + backoff_seconds),
            ).rowcount
            changed += conn.execute(
                "UPDATE messages SET locked_until = ? WHERE state = ? AND lock_token IS NOT NULL "
                "AND locked_until > ?",
                (now + lock_seconds, _ACTIVE, now + lock_seconds),
            ).rowcount
            conn.execute("UPDATE duplicates SET accepted_at = ? WHERE accepted_at > ?",
                         (now, now))
        if changed:
            logger.warning("local queue %s: %d stored time(s) lay further ahead than any lock "
                           "or retry delay could set them (the clock went back); brought back",
                           self.path, changed)
        return changed

    def _sweep_expired_locks(self, conn: sqlite3.Connection, now: float) -> None:
        """An expired lock is a failed delivery: dead-letter those that used their last one."""
        cursor = conn.execute(
            # Through the expiry index, named: on `state` alone (what the planner picks
            # without it) every receive would read every active message.
            "UPDATE messages INDEXED BY messages_by_lock_expiry SET state = ?, dl_reason = ?, "
            "dl_description = 'Message could not be processed after ' || delivery_count "
            "|| ' delivery attempts.', dead_lettered_at = ?, lock_token = NULL, "
            "locked_until = NULL "
            "WHERE lock_token IS NOT NULL AND locked_until <= ? AND state = ? "
            "AND delivery_count >= ? RETURNING message_id, body, delivery_count",
            (
                _DEADLETTERED,
                MAX_DELIVERY_COUNT_EXCEEDED,
                now,
                now,
                _ACTIVE,
                self.max_delivery_count,
            ),
        )
        self._expired.extend(
            # A damaged row still gets its line: whatever of it can be read.
            ExpiredMessage(str(m), b if isinstance(b, bytes) else b"",
                           c if isinstance(c, int) else 0)
            for m, b, c in cursor
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
        wait: bool = True,
    ) -> list[bool]:
        """`send` for several ``(body, message_id, application_properties)`` in one commit.

        All or nothing: one transaction and one fsync for the lot (group commit), which is
        what lets the local host acknowledge hundreds of events a second with ``FULL`` sync.
        Each result is `send`'s: False for a duplicate, also of an earlier one in the batch.
        Without `wait`, `QueueBusyError` instead of waiting for a busy queue (nothing sent).
        """
        return self._send(messages, scheduled_enqueue_time=scheduled_enqueue_time, wait=wait,
                          max_locked=0, lock_duration=None, complete=())[0]

    def send_and_lock(
        self,
        messages: Sequence[tuple[bytes, str, Mapping[str, str] | None]],
        *,
        max_locked: int,
        lock_duration: float | None = None,
        complete: Sequence[str] = (),
        wait: bool = True,
    ) -> tuple[list[bool], list[QueuedMessage], list[LockLostError | None]]:
        """`send_many`, and up to `max_locked` of the new messages peek-locked for the caller
        in the same transaction: exactly what a `receive` right after the commit would have
        returned (oldest first, delivery count 1), without its transaction.

        Only when no older message is available: then the new ones are the oldest, and the
        order `receive` promises holds. Otherwise nothing is locked and the consumer's next
        `receive` takes the oldest as always. What this saves is the receive's statements, its
        re-read of every body, and a commit: a consumer in the same process with free workers
        (the local host) gets the messages it just stored.

        `complete` are lock tokens of messages the caller has finished: they are completed in
        the same transaction, with `complete_many`'s results third, which saves a consumer that
        also sends a commit of its own. If the call raises, none of them was completed.
        """
        if max_locked < 0:
            raise ValueError(f"max_locked must be >= 0, got {max_locked}")
        return self._send(messages, scheduled_enqueue_time=None, wait=wait,
                          max_locked=max_locked, lock_duration=lock_duration, complete=complete)

    def _send(
        self,
        messages: Sequence[tuple[bytes, str, Mapping[str, str] | None]],
        *,
        scheduled_enqueue_time: datetime | None,
        wait: bool,
        max_locked: int,
        lock_duration: float | None,
        complete: Sequence[str],
    ) -> tuple[list[bool], list[QueuedMessage], list[LockLostError | None]]:
        try:
            try:
                result = self._send_once(
                    messages, scheduled_enqueue_time=scheduled_enqueue_time, wait=wait,
                    max_locked=max_locked, lock_duration=lock_duration, complete=complete)
            except QueueFullError as exc:
                if not exc.checkpointed:
                    raise
                # The checkpoint gave the WAL's space back: once more, before a 503.
                result = self._send_once(
                    messages, scheduled_enqueue_time=scheduled_enqueue_time, wait=wait,
                    max_locked=max_locked, lock_duration=lock_duration, complete=complete)
        except QueueBusyError:
            raise
        except QueueUnavailableError as exc:
            self.store_failure = str(exc)
            raise
        self.store_failure = None
        return result

    def _send_once(
        self,
        messages: Sequence[tuple[bytes, str, Mapping[str, str] | None]],
        *,
        scheduled_enqueue_time: datetime | None,
        wait: bool,
        max_locked: int,
        lock_duration: float | None,
        complete: Sequence[str],
    ) -> tuple[list[bool], list[QueuedMessage], list[LockLostError | None]]:
        rows: list[tuple[bytes, str, str, dict[str, str]]] = []
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
            checked = _check_properties(application_properties)
            properties = _properties_text(checked)
            rows.append((bytes(body), message_id, properties, checked))
        duration = self.lock_duration if lock_duration is None else float(lock_duration)
        if max_locked and duration <= 0:
            raise ValueError(f"lock_duration must be > 0 seconds, got {duration}")
        scheduled: float | None = None
        if scheduled_enqueue_time is not None:
            if scheduled_enqueue_time.tzinfo is None:
                raise ValueError("scheduled_enqueue_time must be timezone-aware (UTC)")
            scheduled = scheduled_enqueue_time.timestamp()
        now = self._now()
        locked_until = now + duration
        results: list[bool] = []
        locked: list[QueuedMessage] = []
        highest = 0
        with self._transaction("send", wait=wait) as conn:
            completed = self._complete_rows(conn, complete, now)
            if max_locked and self._any_available(conn, now):
                max_locked = 0  # older messages first: the consumer's receive takes them
            for body_bytes, message_id, properties, checked in rows:
                # New, or last accepted a window ago: (re)stamped and stored. Within the
                # window the upsert changes nothing: a duplicate, dropped. One statement.
                stamped = conn.execute(
                    "INSERT INTO duplicates (message_id, accepted_at) VALUES (?, ?) "
                    "ON CONFLICT (message_id) DO UPDATE SET accepted_at = excluded.accepted_at "
                    "WHERE excluded.accepted_at - duplicates.accepted_at >= ?",
                    (message_id, now, self.duplicate_window),
                ).rowcount
                if not stamped:
                    results.append(False)
                    continue
                lock = len(locked) < max_locked
                token = os.urandom(16).hex() if lock else None
                seq = conn.execute(
                    "INSERT INTO messages (message_id, body, properties, enqueued_time, "
                    "scheduled_time, visible_at, state, delivery_count, lock_token, "
                    "locked_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message_id,
                        body_bytes,
                        properties,
                        now,
                        scheduled,
                        now if scheduled is None else scheduled,
                        _ACTIVE,
                        1 if lock else 0,
                        token,
                        locked_until if lock else None,
                    ),
                ).lastrowid
                highest = max(highest, seq or 0)
                results.append(True)
                if lock:
                    assert seq is not None
                    locked.append(QueuedMessage(
                        sequence_number=seq,
                        message_id=message_id,
                        body=body_bytes,
                        application_properties=dict(checked),
                        enqueued_time=_utc(now),
                        scheduled_enqueue_time=None,
                        delivery_count=1,
                        lock_token=token,
                        locked_until=_utc(locked_until),
                        dead_letter_reason=None,
                        dead_letter_description=None,
                        state=_ACTIVE,
                    ))
            if now >= self._next_prune:
                conn.execute(
                    "DELETE FROM duplicates WHERE accepted_at <= ?", (now - self.duplicate_window,)
                )
                self._next_prune = now + self._prune_interval
        if highest and self.ack_mark is not None:
            try:
                self.ack_mark.record(highest)
            except OSError as exc:  # stored and committed all the same; the check is weaker
                logger.warning("local queue %s: cannot record the acknowledged mark: %s",
                               self.path, exc)
        if any(results):
            with self._sent:
                self._sent_generation += 1
                self._sent.notify_all()
        return results, locked, completed

    @staticmethod
    def _any_available(conn: sqlite3.Connection, now: float) -> bool:
        """Whether a receive now would find a message (one visible, unlocked or whose lock
        expired)."""
        return conn.execute(
            "SELECT 1 FROM messages WHERE state = ? AND visible_at <= ? "
            "AND (lock_token IS NULL OR locked_until <= ?) LIMIT 1",
            (_ACTIVE, now, now),
        ).fetchone() is not None

    # -- receiving and settling -----------------------------------------------------------

    def receive(
        self, *, max_messages: int = 1, lock_duration: float | None = None
    ) -> list[QueuedMessage]:
        """Peek-lock up to ``max_messages`` available messages, oldest sequence number first."""
        return self.complete_and_receive((), max_messages=max_messages,
                                         lock_duration=lock_duration)[1]

    def complete_and_receive(
        self,
        lock_tokens: Sequence[str],
        *,
        max_messages: int = 1,
        lock_duration: float | None = None,
        wait: bool = True,
        cancelled: threading.Event | None = None,
    ) -> tuple[list[LockLostError | None], list[QueuedMessage]]:
        """`complete_many(lock_tokens)`, then `receive(...)`, in one transaction: what a
        consumer that just finished some messages does next, for one commit instead of two
        (the local host's fetcher). Without `wait`, `QueueBusyError` instead of waiting for a
        busy queue (nothing completed or received). `cancelled`, when set by the time the
        call has the write lock, receives nothing (the completions are made): a consumer that
        stops while the call waits in a thread for another process cannot interrupt it."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        duration = self.lock_duration if lock_duration is None else float(lock_duration)
        if duration <= 0:
            raise ValueError(f"lock_duration must be > 0 seconds, got {duration}")
        now = self._now()
        locked_until = now + duration
        received: list[QueuedMessage] = []
        corrupt: list[int] = []
        with self._transaction("receive", settlement=True, wait=wait) as conn:
            completed = self._complete_rows(conn, lock_tokens, now)
            self._sweep_expired_locks(conn, now)
            seqs = [] if cancelled is not None and cancelled.is_set() else [
                int(r[0])
                for r in conn.execute(
                    "SELECT sequence_number FROM messages WHERE state = ? AND visible_at <= ? "
                    "AND (lock_token IS NULL OR locked_until <= ?) "
                    "ORDER BY sequence_number LIMIT ?",
                    (_ACTIVE, now, now, max_messages),
                )
            ]
            # Three statements for the batch, not two per message: lock them all, read them all.
            conn.executemany(
                "UPDATE messages SET delivery_count = delivery_count + 1, lock_token = ?, "
                "locked_until = ? WHERE sequence_number = ?",
                [(os.urandom(16).hex(), locked_until, seq) for seq in seqs],
            )
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE sequence_number IN "  # noqa: S608
                f"({', '.join('?' * len(seqs))}) ORDER BY sequence_number",
                seqs,
            ).fetchall() if seqs else []
            for row in rows:
                seq = int(row[0])
                try:
                    received.append(_row_to_message(row))
                except _UNDECODABLE as exc:
                    # One damaged row must not block every receive after it.
                    self._dead_letter_row(
                        conn, seq, CORRUPT_MESSAGE, _undecodable_description(exc), now
                    )
                    corrupt.append(seq)
        if corrupt:
            logger.error(
                "local queue %s: message(s) %s cannot be decoded (the file was damaged); "
                "dead-lettered as %s", self.path, ", ".join(map(str, corrupt)), CORRUPT_MESSAGE,
            )
        return completed, received

    def renew_lock(self, lock_token: str, *, lock_duration: float | None = None) -> datetime:
        """Extend a live lock from now by ``lock_duration`` (default: the queue's); the new
        expiry. A receiver that locked with its own duration renews with the same one."""
        duration = self.lock_duration if lock_duration is None else float(lock_duration)
        if duration <= 0:
            raise ValueError(f"lock_duration must be > 0 seconds, got {duration}")
        now = self._now()
        with self._transaction("renew_lock", settlement=True) as conn:
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

    def complete_many(
        self, lock_tokens: Sequence[str], *, wait: bool = True
    ) -> list[LockLostError | None]:
        """`complete` for several locks in one commit; per token None or its `LockLostError`.
        Without `wait`, `QueueBusyError` instead of waiting for a busy queue (nothing
        completed)."""
        now = self._now()
        with self._transaction("complete", settlement=True, wait=wait) as conn:
            return self._complete_rows(conn, lock_tokens, now)

    def _complete_rows(
        self, conn: sqlite3.Connection, lock_tokens: Sequence[str], now: float
    ) -> list[LockLostError | None]:
        results: list[LockLostError | None] = []
        for lock_token in lock_tokens:
            # One statement for a live lock; a lost one is told apart (why) only when it fails.
            if conn.execute(
                "DELETE FROM messages WHERE lock_token = ? AND state = ? AND locked_until > ?",
                (lock_token, _ACTIVE, now),
            ).rowcount:
                results.append(None)
                continue
            try:
                self._locked_row(conn, lock_token, now)
            except LockLostError as exc:
                results.append(exc)
            else:  # never: the DELETE above removes every row _locked_row accepts
                raise AssertionError(f"lock {lock_token!r} is live but was not completed")
        return results

    def abandon(self, lock_token: str, *, retry_after: float = 0.0,
                uncount: bool = False) -> None:
        """Release the lock for redelivery, or dead-letter once the delivery count is used up.

        `retry_after` seconds keep the message invisible first (the local host's backoff after
        a function timeout; Service Bus has no such option, its processor sleeps instead).
        `uncount`: the delivery never reached its handler (the local host's handler threads
        were all stuck), so it does not count: the delivery count goes back down and the
        message is never dead-lettered for it.
        """
        now = self._now()
        with self._transaction("abandon", settlement=True) as conn:
            seq, count = self._locked_row(conn, lock_token, now)
            if uncount:
                conn.execute(
                    "UPDATE messages SET lock_token = NULL, locked_until = NULL, "
                    "delivery_count = MAX(delivery_count - 1, 0), "
                    "visible_at = MAX(visible_at, ?) WHERE sequence_number = ?",
                    (now + max(retry_after, 0.0), seq),
                )
            elif count >= self.max_delivery_count:
                self._dead_letter_row(
                    conn, seq, MAX_DELIVERY_COUNT_EXCEEDED, _max_delivery_description(count), now
                )
            else:
                conn.execute(
                    "UPDATE messages SET lock_token = NULL, locked_until = NULL, "
                    "visible_at = MAX(visible_at, ?) WHERE sequence_number = ?",
                    (now + max(retry_after, 0.0), seq),
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
            return self._any_available(conn, now)

    # -- operations (CLI) -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``{"active", "deadLettered", "scheduled"}`` counts, like Service Bus reports them.

        Expired locks are settled first, so a message whose last delivery timed out is
        counted as dead-lettered, not active.
        """
        now = self._now()
        with self._transaction("stats") as conn:
            self._sweep_expired_locks(conn, now)
            # A message waiting out a retry backoff is active; scheduled means scheduled.
            active, scheduled, dead = conn.execute(
                "SELECT "
                "COALESCE(SUM(state = ? AND (scheduled_time IS NULL OR visible_at <= ?)), 0), "
                "COALESCE(SUM(state = ? AND scheduled_time IS NOT NULL AND visible_at > ?), 0), "
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
        return [_row_to_dead_letter(r) for r in rows]

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
        return None if row is None else _row_to_dead_letter(row)

    def replay_dead_letter(self, sequence_number: int) -> QueuedMessage | None:
        """Move a dead-lettered message back as a new active message, atomically.

        The new message has a new sequence number, delivery count 0, the same body and
        properties (less the retry attempt and history: it starts again at attempt 1) plus
        ``replayedFrom`` (the original sequence number) and ``replayCount``
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
            try:
                properties = _properties(props_json)
            except _UNDECODABLE:
                properties = {}  # a CorruptMessage: what can be replayed is the body
            try:
                replay_count = int(properties.get("replayCount", "0"))
            except ValueError:
                replay_count = 0
            properties["replayedFrom"] = str(sequence_number)
            properties["replayCount"] = str(replay_count + 1)
            for name in RETRY_PROPS:  # a replayed event starts again at attempt 1
                properties.pop(name, None)
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
        return _row_to_dead_letter(new_row)

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
        if self.ack_mark is not None:
            self.ack_mark.close()

    def __enter__(self) -> LocalQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalQueue({str(self.path)!r}, max_delivery_count={self.max_delivery_count})"
