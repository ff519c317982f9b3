"""The vehicle state store's local backend: one SQLite file in LOCAL_STATE_DIR
(`vehicle_state.sqlite3`). Local only, like the embedded queue: Azure uses Table Storage
(shared/vehicle_state/table_store.py), and both run the same rules (shared/vehicle_state/rules.py).

An apply reads the rows the event touches (from memory while no other connection has
written), decides (`quick.quick_plan` for the common delivery, else `rules.plan`), and writes
the new state together with the event's pending changes (the outbox) in one `BEGIN IMMEDIATE`
transaction, so no crash can separate them. The vehicle and event rows are kept in memory
and written just before the commit (`_write_behind`), so a vehicle's row is written once per
commit. SQLite serialises writers, also across processes (the local host and the CLI), so
there are no write conflicts to retry here.

By default each call commits. The local host calls `defer_commits`: the calls then share one
transaction, committed `FLUSH_SECONDS` after its first write (or sooner by `flush`, as before a
dead-letter), and the host completes a delivery only once the transaction it wrote in is
committed (`writing_in`, `last_committed`, `on_flushed`). A commit that fails loses its writes
with their deliveries' completions (`failed_commits`, `WritesLostError`).

The calls run on the caller's thread: each is a few indexed reads and writes in WAL mode
without an fsync per commit (`synchronous=NORMAL`), well under a millisecond, which costs less
than handing it to a thread. A commit survives a crash of the process; the last commits
before a power loss may not (docs/vehicle-state.md says what that can leave).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, cast

from ..events import Event
from ..vehicle_state import (
    INBOX_RETENTION_SECONDS,
    ApplyResult,
    Changes,
    InboxPruned,
    Outbox,
    SignalChange,
    VehicleSummary,
    VehicleView,
)
from ..vehicle_state.codec import (
    change_text,
    changes_from_text,
    dumps,
    error_from_row,
    error_row,
    loads,
    signal_from_row,
    signal_row,
)
from ..vehicle_state.quick import Held, held, quick_plan, state_of, text_of
from ..vehicle_state.rules import (
    OPEN,
    STORED_TYPES,
    VEHICLE_STATE,
    Plan,
    Snapshot,
    codes_of,
    error_keys_of,
    plan,
)
from .queue_schema import bound_wal

logger = logging.getLogger(__name__)

FILE_NAME: Final = "vehicle_state.sqlite3"
#: Records past the retention are deleted every this many records, and at least every
#: `PRUNE_INTERVAL_SECONDS` (so at a store's first record).
_PRUNE_EVERY: Final = 1000
PRUNE_INTERVAL_SECONDS: Final = 86400.0
#: Events whose writes a failed commit lost are remembered until applied again; past this
#: many, all are forgotten.
_LOST_KEPT: Final = 10_000
#: Deferred writes (`defer_commits`) are committed at most this long after the first.
FLUSH_SECONDS: Final = 0.02
#: Vehicles whose signals are kept in memory between applies (least recently used dropped).
_CACHED_VEHICLES: Final = 1024
#: What `_write` reads of a plan (its errors) for an event of signals only (the fast path).
_SIGNALS_ONLY: Final = Plan()
_NO_VEHICLE: Final = ""

#: `PRAGMA user_version` of the layout below. Version 0 kept one row per signal in a table
#: `signals` and `events` with a rowid; opening such a file moves it over
#: (`_create_or_migrate`).
SCHEMA_VERSION: Final = 1

# A vehicle's signals are one JSON object in its `vehicles` row (`signals`: code -> the row
# `codec.signal_row` writes): an event rewrites one row, not one per signal, and the read route
# reads one row. A delivery names every signal of its webhook, so most events rewrite most of
# the object anyway.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS vehicles (
    vehicle_id TEXT PRIMARY KEY,
    updated_at TEXT,
    updated_epoch REAL,
    signal_count INTEGER NOT NULL DEFAULT 0,
    open_errors INTEGER NOT NULL DEFAULT 0,
    signals TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vehicles_by_update ON vehicles (updated_epoch);
CREATE TABLE IF NOT EXISTS errors (
    vehicle_id TEXT NOT NULL, type TEXT NOT NULL, code TEXT NOT NULL, state TEXT NOT NULL,
    row TEXT NOT NULL,
    PRIMARY KEY (vehicle_id, type, code)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    vehicle_id TEXT NOT NULL, event_id TEXT NOT NULL,
    errors_applied INTEGER NOT NULL DEFAULT 0,
    pending TEXT,
    processed_at REAL,
    PRIMARY KEY (vehicle_id, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_processed ON events (processed_at);
"""


#: An event row's writes (`_EventRow`): NULL `errors_applied` and `processed_at` keep what is
#: stored; `pending` is replaced.
_EVENT_WRITE: Final = (
    "INSERT INTO events (vehicle_id, event_id, errors_applied, pending, processed_at) "
    "VALUES (?, ?, coalesce(?, 0), ?, ?) ON CONFLICT (vehicle_id, event_id) DO UPDATE SET "
    "errors_applied = max(errors_applied, excluded.errors_applied), "
    "pending = excluded.pending, processed_at = coalesce(excluded.processed_at, processed_at)")
#: A vehicle row; a NULL `signals` keeps the stored ones.
_VEHICLE_WRITE: Final = (
    "INSERT INTO vehicles (vehicle_id, updated_at, updated_epoch, signal_count, open_errors, "
    "signals) VALUES (?, ?, ?, ?, ?, coalesce(?6, '{}')) ON CONFLICT (vehicle_id) DO UPDATE SET "
    "updated_at = excluded.updated_at, updated_epoch = excluded.updated_epoch, "
    "signal_count = excluded.signal_count, open_errors = excluded.open_errors, "
    "signals = coalesce(?6, signals)")


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (it holds vehicle data), whatever
    the process umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


#: `"code":` by code (emptied when full): the start of a signal's member.
_MEMBER_KEYS: dict[str, str] = {}
_MEMBER_KEYS_MAX: Final = 4096


def _member(code: str, text: str) -> str:
    """A signal's member of its vehicle's stored JSON object: `"code":{row}`."""
    start = _MEMBER_KEYS.get(code)
    if start is None:
        if len(_MEMBER_KEYS) >= _MEMBER_KEYS_MAX:
            _MEMBER_KEYS.clear()
        start = _MEMBER_KEYS[code] = dumps(code) + ":"
    return start + text


@dataclass(slots=True)
class _Vehicle:
    """One vehicle's stored signals (state, row text and rank key by code) and `updatedAt`."""

    signals: dict[str, Held] = field(default_factory=dict)
    #: Each signal's member of the stored JSON object (`"code":{row}`), by code; None for a
    #: signal written since the row was (made by `_write_behind`).
    members: dict[str, str | None] = field(default_factory=dict)
    updated_at: datetime | None = None
    open_errors: int = 0
    #: Whether a signal was written since the row was: its `signals` column is rewritten.
    signals_changed: bool = False


@dataclass(slots=True)
class _EventRow:
    """An `events` row's writes not yet made: `errors_applied` (None: as stored), `pending`
    (the whole new value: None clears it) and `processed_at` (None: as stored)."""

    errors_applied: bool | None
    pending: str | None
    processed_at: float | None


def _signals_text(vehicle: _Vehicle) -> str:
    """The vehicle's `signals` column: its members, those written since made now."""
    members = vehicle.members
    signals = vehicle.signals
    for code, member in members.items():
        if member is None:
            members[code] = _member(code, text_of(signals[code]))
    return "{" + ",".join(cast(Iterable[str], members.values())) + "}"


class WritesLostError(sqlite3.OperationalError):
    """`mark_processed` for an event whose apply was in a deferred commit that failed: its
    state and pending changes are not stored, so it must not be recorded as processed. The
    delivery fails and is redelivered, and applied again; until then, each try to record the
    event raises this."""


class SqliteVehicleStateStore:
    """`VehicleStateStore` on a local SQLite file."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        _create_private(path)
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        bound_wal(self._db, path.parent)  # it shares the state directory's disk with the queue
        self._create_or_migrate()
        self._marks = 0
        self._pruned_at = -PRUNE_INTERVAL_SECONDS  # none yet: the first record prunes
        self._cache: dict[str, _Vehicle] = {}
        self._version = -1
        # Writes of the open transaction not yet made in SQLite: the vehicles whose rows
        # change, and event rows (`_write_behind` makes them, at the latest before the
        # commit). A vehicle's row is written once however many events changed it.
        self._dirty: dict[str, _Vehicle] = {}
        self._events: dict[tuple[str, str], _EventRow] = {}
        # `is_processed`'s read of an event's row, for the `apply` that follows it:
        # (vehicle key, eventId, errors_applied, pending), valid while `data_version` is.
        self._peeked: tuple[str, str, bool, str | None] | None = None
        # Events applied in the open transaction, and those whose transaction failed (until
        # they are applied again): see `WritesLostError`.
        self._applied: set[tuple[str, str]] = set()
        self._lost: set[tuple[str, str]] = set()
        #: Whether the write calls share one transaction, committed by `flush`
        #: (`defer_commits`), and the timer that commits it at the latest.
        self._deferring = False
        self._flush_timer: asyncio.TimerHandle | None = None
        #: Deferred commits that failed (their writes were lost): see `defer_commits`; and
        #: the last one's error, until a commit succeeds.
        self.failed_commits = 0
        self.commit_error: str | None = None
        #: Transactions begun, and the number of the last one committed: a write made while
        #: `writing_in()` was N is on disk once `last_committed` is N or more, unless a
        #: commit failed meanwhile (`failed_commits`).
        self._transactions = 0
        self.last_committed = 0
        #: Called after each commit of deferred writes (`flush`), or a failed try (then
        #: `failed_commits` has moved), with no lock held.
        self.on_flushed: Callable[[], None] | None = None
        self._closed = False

    def _create_or_migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            old_signals = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'signals'"
            ).fetchone() is not None
            if version == 0 and old_signals:
                db.execute("ALTER TABLE vehicles ADD COLUMN signals TEXT NOT NULL DEFAULT '{}'")
                db.execute(
                    "UPDATE vehicles SET signals = coalesce((SELECT json_group_object("
                    "s.code, json(s.row)) FROM signals AS s WHERE s.vehicle_id = "
                    "vehicles.vehicle_id), '{}')")
                db.execute("DROP TABLE signals")
                # The events, clustered by their key (one B-tree to write, not three).
                db.execute("DROP INDEX IF EXISTS events_by_processed")
                db.execute("ALTER TABLE events RENAME TO events_v0")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if version == 0 and old_signals:
                db.execute("INSERT INTO events SELECT vehicle_id, event_id, errors_applied, "
                           "pending, processed_at FROM events_v0")
                db.execute("DROP TABLE events_v0")
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- writing ------------------------------------------------------------------------------
    def _begin(self) -> None:
        """Open a write transaction, forgetting the cache if another connection committed
        since the last one (`data_version` moves only for other connections' commits; none
        can commit while this transaction holds the write lock). With `_lock` held."""
        self._db.execute("BEGIN IMMEDIATE")
        self._transactions += 1
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        if version != self._version:
            self._cache.clear()
            self._peeked = None
            self._version = version

    async def apply(self, event: Event, *, outbox: Outbox | None = None) -> ApplyResult:
        if event.vehicle_id is None or event.event_type not in STORED_TYPES:
            return ApplyResult()
        with self._lock:
            self._open()
            try:
                applied = self._apply(event, event.vehicle_id, outbox)
                self._close_call()
            except BaseException as exc:
                self._failed(exc)
                raise
        return applied

    def _open(self) -> None:
        """The write transaction this call writes in: a new one, or (deferring) the one
        open. With `_lock` held."""
        if self._db.in_transaction:
            return
        self._begin()
        if self._deferring:
            self._flush_timer = asyncio.get_running_loop().call_later(
                FLUSH_SECONDS, self._flush_on_timer)

    def _close_call(self) -> None:
        """A call's writes are done: make and commit them, unless commits are deferred."""
        if not self._deferring:
            self._write_behind()
            self._db.execute("COMMIT")
            self.last_committed = self._transactions
            self._applied.clear()

    def _failed(self, exc: BaseException) -> None:
        """A write or a commit failed (`exc`): the transaction is rolled back, with whatever
        other calls wrote in it (deferring: counted in `failed_commits`, and `commit_error`
        says why until a commit succeeds), and the cache, which may hold it, is forgotten."""
        self._cache.clear()
        self._dirty.clear()
        self._events.clear()
        self._peeked = None
        if len(self._lost) > _LOST_KEPT:  # events never delivered again: forget them all
            self._lost.clear()
        self._lost |= self._applied
        self._applied.clear()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._deferring:
            self.failed_commits += 1
            self.commit_error = f"{type(exc).__name__}: {exc}"
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    # --- deferred commits (the local host) ----------------------------------------------------
    def commit_each_call(self) -> None:
        """Undo `defer_commits`: commit what waits (`sqlite3.Error` if that fails; the
        writes are lost then), and commit each call again."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._deferring = False

    def defer_commits(self) -> None:
        """From now on the write calls (`apply`, `mark_processed`) share one transaction,
        committed by `flush`, or `FLUSH_SECONDS` after it was opened, whichever comes first.

        For a caller that settles a delivery for good only once the transaction it wrote in is
        committed, as the local host completes messages (`writing_in` when the delivery is
        done, then `last_committed` and `on_flushed`): a delivery's state, pending changes and
        inbox record are then on disk before the queue could stop redelivering its event, and
        the deliveries finished within `FLUSH_SECONDS` share one commit. A crash before the
        commit loses the writes of deliveries that were not completed either: they are
        redelivered, applied again and their handlers run again, as after a crash between
        handling and recording.
        A commit that fails loses every write in its transaction: `failed_commits` counts
        those, and a delivery that was running meanwhile must not be completed."""
        with self._lock:
            self._deferring = True

    def writing_in(self) -> int | None:
        """The number of the open transaction, which the deferred writes made so far wait in;
        None when none is open (every write made so far is committed)."""
        return self._transactions if self._db.in_transaction else None

    def flush(self) -> None:
        """Commit the deferred writes (nothing if none wait), then call `on_flushed`.
        `sqlite3.Error` (a full disk, a locked file) when the commit failed: its writes are
        lost (`failed_commits`)."""
        failure: BaseException | None = None
        with self._lock:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            if not self._db.in_transaction:
                return
            try:
                self._write_behind()
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._failed(exc)
                failure = exc
            else:
                self.last_committed = self._transactions
                self.commit_error = None
                self._applied.clear()
        if self.on_flushed is not None:
            self.on_flushed()
        if failure is not None:
            raise failure

    def _flush_on_timer(self) -> None:
        self._flush_timer = None
        try:
            self.flush()
        except sqlite3.Error as exc:
            logger.warning("vehicle state store %s: deferred writes could not be committed "
                           "(%s); their deliveries are redelivered", self.path, exc)

    def _write_behind(self) -> None:
        """Make the open transaction's writes that wait in memory (event rows first, then
        vehicle rows). With `_lock` held, in the transaction."""
        db = self._db
        if self._events:
            rows = [(vid, eid, None if e.errors_applied is None else int(e.errors_applied),
                     e.pending, e.processed_at) for (vid, eid), e in self._events.items()]
            self._events.clear()
            db.executemany(_EVENT_WRITE, rows)
            marks = sum(1 for row in rows if row[4] is not None)
            if marks:
                self._prune(marks, max(row[4] for row in rows if row[4] is not None))
        if self._dirty:
            vehicles: list[tuple[Any, ...]] = []
            for vid, vehicle in self._dirty.items():
                updated = vehicle.updated_at
                vehicles.append((
                    vid, updated.isoformat() if updated else None,
                    updated.timestamp() if updated else None, len(vehicle.members),
                    vehicle.open_errors,
                    _signals_text(vehicle) if vehicle.signals_changed else None,
                ))
                vehicle.signals_changed = False
            self._dirty.clear()
            db.executemany(_VEHICLE_WRITE, vehicles)

    def _write_waiting(self) -> None:
        """Before a read in SQL: make the open transaction's writes (a failure rolls it back,
        as a failed commit would). With `_lock` held."""
        if self._dirty or self._events:
            try:
                self._write_behind()
            except BaseException as exc:
                self._failed(exc)
                raise

    def _prune(self, marks: int, now: float) -> None:
        """Every `_PRUNE_EVERY` records and at least every `PRUNE_INTERVAL_SECONDS` (by the
        records' clock; so at the first record), drop those past the retention."""
        before, self._marks = self._marks, self._marks + marks
        if (before // _PRUNE_EVERY != self._marks // _PRUNE_EVERY
                or now - self._pruned_at >= PRUNE_INTERVAL_SECONDS):
            self._delete_expired(now)

    def _delete_expired(self, now: float) -> int:
        """Delete the records older than the retention; how many. With `_lock` held, in the
        transaction."""
        self._pruned_at = now
        return int(self._db.execute("DELETE FROM events WHERE processed_at < ?",
                                    (now - INBOX_RETENTION_SECONDS,)).rowcount)

    def _apply(self, event: Event, vehicle_id: str, outbox: Outbox | None) -> ApplyResult:
        cached = self._cached(vehicle_id)
        errors_applied, pending_text = self._marker(vehicle_id, event.event_id)
        quick = None
        if event.event_type == VEHICLE_STATE:
            quick = quick_plan(event.event_id, event.signal_items(),
                               cached.signals, cached.updated_at, event.meta.delivered_at)
        earlier = tuple(changes_from_text(pending_text)) if pending_text else ()
        if quick is not None:  # signals only: no `Plan` to make
            writes = quick.writes
            kept = quick.kept(vehicle_id, outbox)
            self._applying(vehicle_id, event.event_id)
            if writes:
                self._write(event.event_id, vehicle_id, writes, _SIGNALS_ONLY, errors_applied,
                            pending_text, cached, kept)
            cached.updated_at = quick.updated_at
            cached.signals.update(writes)
            return ApplyResult(changes=quick.changes(vehicle_id), stale=quick.stale,
                               refreshed=quick.refreshed, pending=(*earlier, *kept))
        result = plan(self._snapshot(event, vehicle_id, cached, errors_applied), event)
        writes = {code: held(state, dumps(signal_row(state)))
                  for code, state in result.signals.items()}
        kept = [c for c in result.changes if outbox is None or outbox(c.code, c.path)]
        self._applying(vehicle_id, event.event_id)
        if writes or result.errors:  # nothing usable: nothing stored, as in Table
            self._write(event.event_id, vehicle_id, writes, result, errors_applied,
                        pending_text, cached, kept)
        cached.updated_at = result.updated_at
        cached.signals.update(writes)
        return ApplyResult(
            changes=Changes(result.changes), stale=result.stale, refreshed=result.refreshed,
            skipped=result.skipped,
            errors_opened=result.errors_opened, errors_resolved=result.errors_resolved,
            pending=(*earlier, *kept),
        )

    def _applying(self, vehicle_id: str, event_id: str) -> None:
        """The event's writes are about to be made: they are in the open transaction now
        (`WritesLostError`)."""
        key = (vehicle_id, event_id)
        self._lost.discard(key)
        self._applied.add(key)

    def _cached(self, vehicle_id: str) -> _Vehicle:
        """The vehicle's signals as stored, from memory while no other connection has written
        (`_begin` checks that as it opens the write transaction); read inside that
        transaction, so nothing can change it before the commit."""
        cached = self._cache.pop(vehicle_id, None) or self._dirty.get(vehicle_id)
        if cached is None:
            cached = _Vehicle()
            vehicle = self._db.execute(
                "SELECT updated_at, signals, open_errors FROM vehicles WHERE vehicle_id = ?",
                (vehicle_id,)
            ).fetchone()
            if vehicle is not None:
                if vehicle[0]:
                    cached.updated_at = datetime.fromisoformat(vehicle[0])
                cached.open_errors = int(vehicle[2])
                for code, row in loads(vehicle[1]).items():
                    text = dumps(row)
                    cached.signals[code] = held(signal_from_row(row), text)
                    cached.members[code] = _member(code, text)
        self._cache[vehicle_id] = cached  # most recently used last
        if len(self._cache) > _CACHED_VEHICLES:
            del self._cache[next(iter(self._cache))]
        return cached

    def _marker(self, vehicle_id: str, event_id: str) -> tuple[bool, str | None]:
        """Whether this event's errors were applied, and the changes an earlier delivery of it
        left pending (JSON text)."""
        waiting = self._events.get((vehicle_id, event_id))
        if waiting is not None and waiting.errors_applied is not None:
            return waiting.errors_applied, waiting.pending
        peeked, self._peeked = self._peeked, None
        if peeked is not None and peeked[0] == vehicle_id and peeked[1] == event_id:
            stored: tuple[bool, str | None] = (peeked[2], peeked[3])
        else:
            marker = self._db.execute(
                "SELECT errors_applied, pending FROM events WHERE vehicle_id = ? "
                "AND event_id = ?", (vehicle_id, event_id),
            ).fetchone()
            stored = (False, None) if marker is None else (bool(marker[0]), marker[1] or None)
        if waiting is not None:  # processed meanwhile: its pending changes are done with
            return stored[0], waiting.pending
        return stored

    def _snapshot(self, event: Event, vehicle_id: str, cached: _Vehicle,
                  errors_applied: bool) -> Snapshot:
        errors = {}
        for error_type, code in error_keys_of(event):
            found = self._db.execute(
                "SELECT row FROM errors WHERE vehicle_id = ? AND type = ? AND code = ?",
                (vehicle_id, error_type, code),
            ).fetchone()
            if found is not None:
                errors[(error_type, code)] = error_from_row(loads(found[0]))
        signals = {code: state_of(cached.signals[code]) for code in codes_of(event)
                   if code in cached.signals}
        return Snapshot(
            vehicle_id=vehicle_id, signals=signals, errors=errors,
            errors_applied=errors_applied, updated_at=cached.updated_at,
        )

    def _write(self, event_id: str, vehicle_id: str, writes: dict[str, Held], result: Plan,
               errors_applied: bool, pending_text: str | None, cached: _Vehicle,
               kept: list[SignalChange]) -> None:
        """Record the signals (`writes`: new row texts by code) and the rest of the plan: the
        errors at once, the vehicle and event rows for `_write_behind`."""
        if result.errors:
            db = self._db
            db.executemany(
                "INSERT INTO errors (vehicle_id, type, code, state, row) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (vehicle_id, type, code) DO UPDATE SET state = excluded.state, "
                "row = excluded.row",
                [(vehicle_id, key[0], key[1], record.state.state, dumps(error_row(record)))
                 for key, record in result.errors.items()],
            )
            cached.open_errors = int(db.execute(
                "SELECT count(*) FROM errors WHERE vehicle_id = ? AND state = ?",
                (vehicle_id, OPEN)).fetchone()[0])
        # The outbox from the row texts at hand: nothing is serialised twice.
        items = [
            change_text(change, None if change.previous is None
                        else text_of(cached.signals[change.code]), text_of(writes[change.code]))
            for change in kept
        ]
        if pending_text and items:
            pending_text = pending_text[:-1] + "," + ",".join(items) + "]"
        elif items:
            pending_text = "[" + ",".join(items) + "]"
        if items or result.marks_errors:
            key = (vehicle_id, event_id)
            waiting = self._events.get(key)
            self._events[key] = _EventRow(
                errors_applied=errors_applied or result.marks_errors, pending=pending_text,
                processed_at=None if waiting is None else waiting.processed_at)
        if writes:
            # The cache's members change before the commit: a failed write fails the turn,
            # which empties the cache. Their texts are made when the row is written.
            cached.members.update(dict.fromkeys(writes))
            cached.signals_changed = True
        self._dirty[vehicle_id] = cached

    async def pending_changes(self, vehicle_id: str, event_id: str) -> tuple[SignalChange, ...]:
        with self._lock:
            self._write_waiting()
            row = self._db.execute(
                "SELECT pending FROM events WHERE vehicle_id = ? AND event_id = ? "
                "AND processed_at IS NULL", (vehicle_id, event_id),
            ).fetchone()
        return tuple(changes_from_text(row[0])) if row and row[0] else ()

    async def is_processed(self, vehicle_id: str | None, event_id: str) -> bool:
        since = self._clock() - INBOX_RETENTION_SECONDS
        key = vehicle_id or _NO_VEHICLE
        with self._lock:
            waiting = self._events.get((key, event_id))
            if waiting is not None and waiting.processed_at is not None:
                return bool(waiting.processed_at >= since)
            row = self._db.execute(
                "SELECT processed_at, errors_applied, pending FROM events "
                "WHERE vehicle_id = ? AND event_id = ?", (key, event_id),
            ).fetchone()
            if row is None:
                self._peeked = (key, event_id, False, None)
                return False
            if row[0] is not None and float(row[0]) >= since:
                return True
            self._peeked = (key, event_id, bool(row[1]), row[2] or None)
            return False

    async def mark_processed(self, vehicle_id: str | None, event_id: str) -> None:
        now = self._clock()
        with self._lock:
            key = (vehicle_id or _NO_VEHICLE, event_id)
            if key in self._lost:  # until it is applied again (`_applying`)
                raise WritesLostError(
                    f"event {event_id}: what its apply stored was lost with a failed commit "
                    f"({self.commit_error}); it is not recorded as processed")
            self._open()
            try:
                waiting = self._events.get(key)
                self._events[key] = _EventRow(
                    errors_applied=None if waiting is None else waiting.errors_applied,
                    pending=None, processed_at=now)
                if self._peeked is not None and self._peeked[:2] == key:
                    self._peeked = None
                self._close_call()
            except BaseException as exc:
                self._failed(exc)
                raise

    async def prune_inbox(self) -> InboxPruned:
        """Delete the records past the retention now (the `prune_vehicle_inbox` timer; records
        also prune, see `_prune`). A failure is a failed write like any other: it rolls back
        the open transaction (deferring: with the writes waiting in it) and raises."""
        now = self._clock()
        with self._lock:
            self._open()
            try:
                deleted = self._delete_expired(now)
                self._close_call()
            except BaseException as exc:
                self._failed(exc)
                raise
        return InboxPruned(deleted=deleted)

    # --- reading ------------------------------------------------------------------------------
    async def get_vehicle(self, vehicle_id: str) -> VehicleView | None:
        with self._lock:
            if self._db.in_transaction:  # deferred writes: read them too
                self._write_waiting()
                vehicle, signals, errors = self._read_vehicle(vehicle_id)
            else:
                # One read transaction: the vehicle, its signals and its errors as of one
                # commit.
                self._db.execute("BEGIN")
                try:
                    vehicle, signals, errors = self._read_vehicle(vehicle_id)
                finally:
                    self._db.execute("COMMIT")
        if vehicle is None:
            return None
        return VehicleView(
            vehicle_id=vehicle_id,
            signals={code: signal_from_row(row) for code, row in loads(signals).items()},
            errors=[error_from_row(loads(row)).state for (row,) in errors],
            updated_at=datetime.fromisoformat(vehicle[0]) if vehicle[0] else None,
        )

    def _read_vehicle(self, vehicle_id: str) -> tuple[Any, str, list[Any]]:
        vehicle = self._db.execute(
            "SELECT updated_at, signals FROM vehicles WHERE vehicle_id = ?", (vehicle_id,)
        ).fetchone()
        if vehicle is None:
            return None, "{}", []
        errors = self._db.execute(
            "SELECT row FROM errors WHERE vehicle_id = ? AND state = ? ORDER BY type, code",
            (vehicle_id, OPEN),
        ).fetchall()
        return vehicle, vehicle[1], errors

    async def list_vehicles(self, *, limit: int = 100) -> list[VehicleSummary]:
        with self._lock:
            self._write_waiting()
            rows = self._db.execute(
                "SELECT vehicle_id, updated_at, signal_count, open_errors FROM vehicles "
                "ORDER BY updated_epoch IS NULL, updated_epoch DESC, vehicle_id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            VehicleSummary(vehicle_id=vid,
                           updated_at=datetime.fromisoformat(at) if at else None,
                           signal_count=count, open_errors=open_errors)
            for vid, at, count, open_errors in rows
        ]

    async def close(self) -> None:
        """Commit the deferred writes, then close. Writes that cannot be committed are logged
        and lost: their deliveries were not completed (`defer_commits`), so they are
        redelivered."""
        if self._closed:
            return
        try:
            self.flush()
        except sqlite3.Error as exc:
            logger.warning("vehicle state store %s: deferred writes could not be committed at "
                           "close (%s)", self.path, exc)
        with self._lock:
            self._closed = True
            self._db.close()
