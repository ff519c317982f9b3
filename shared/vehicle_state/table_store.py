"""The Azure backend: one Table Storage table, one partition per vehicle.

Rows of a vehicle's partition (`PartitionKey` = the escaped vehicleId, codec.escape_key):

    v                     the vehicle: vehicleId, updatedAt, signalCount, openErrors
    s:<code>              one signal (one entity per signal: a vehicle may report hundreds,
                          and an entity holds at most 252 properties)
    e:<type>:<code>       one error
    i:<eventId>           the event: its errors were applied (`errorsApplied`), how many of
                          them were counted so far (`errorsCounted`), how many outbox
                          chunks it wrote (`chunks`), and once its handlers completed,
                          `processedAt` (the inbox, kept at least 7 days)
    o:<eventId>:<n>       the event's pending changes (the outbox), in chunks

and the inbox index, partitions `!inbox-day:<YYYY-MM-DD>` holding a row `p:<partition>` for each
vehicle partition with records of that day, which `prune_inbox` reads (see `_index`).

Every write of an apply goes in an entity-group transaction that also replaces the `v` row
and the `i:` row with If-Match on the ETags read before planning. So a transaction commits only
if nothing in the partition changed since the read it was planned from; when another instance
wrote first, the whole transaction fails, and the apply reads again and plans again (counted
in `conflicts_retried`). A stored value therefore never goes back in time.

A transaction holds at most 100 operations and 4 MiB, so an event that changes more (500
signals) is written in several, each a consistent step: the signals it holds, the outbox chunk
of their changes, and the event row counting the chunk. A crash between two leaves the rest to
the redelivery, which finds the first part already stored (no change) and writes the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from ..events import Event
from . import (
    CONFLICTS_ATTRIBUTE,
    INBOX_RETENTION_SECONDS,
    ApplyResult,
    Changes,
    InboxPruned,
    Outbox,
    SignalChange,
    StoreConflictError,
    VehicleSummary,
    VehicleView,
)
from .codec import (
    Row,
    change_entry_text,
    changes_from_text,
    error_from_row,
    error_row,
    escape_key,
    pending_text,
    signal_from_row,
    signal_row,
)
from .rules import (
    OPEN,
    STORED_TYPES,
    ErrorRecord,
    Plan,
    Snapshot,
    error_keys_of,
    plan,
    utf16_units,
)

logger = logging.getLogger(__name__)

VEHICLE_ROW: Final = "v"
_NO_VEHICLE: Final = "!none"
#: The inbox index: partition `!inbox-day:<YYYY-MM-DD>` holds a row `p:<partition>` for each
#: vehicle partition with inbox records of that (UTC) day. `escape_key` never starts a key with
#: `!i`, so no vehicle's partition is one of these.
_INDEX_PREFIX: Final = "!inbox-day:"
#: (partition, day) pairs an instance remembers noting; past this many it forgets them all.
#: Notes that failed wait to be written again, up to this many (more are not kept).
_INDEXED_KEPT: Final = 100_000
#: `prune_inbox` starts no partition after this long (the Functions timeout is 5 minutes)...
PRUNE_SECONDS: Final = 240.0
#: ... and prunes this many at once.
_PRUNE_CONCURRENCY: Final = 16
#: An entity-group transaction holds at most 100 operations; two are the `v` and `i:` rows
#: and one the outbox chunk.
MAX_OPERATIONS: Final = 100
_ENTITY_WRITES_PER_TXN: Final = MAX_OPERATIONS - 3
#: A transaction's payload is at most 4 MiB and an entity's 1 MiB, sized as the service
#: counts them (`entity_size`). A chunk's writes and its outbox entry stay under this (the
#: outbox entity under 1 MiB, the transaction far under 4 MiB). One signal's change always
#: fits: two rows of at most MAX_VALUE_CHARS UTF-8 bytes of value, which escaping to ASCII
#: makes at most three times as long.
_CHUNK_BUDGET_BYTES: Final = 800 * 1024
#: One string property holds 64 KiB (32 Ki UTF-16 units); outbox text is ASCII.
_PROPERTY_CHARS: Final = 30_000
MAX_ATTEMPTS: Final = 40
_CONFLICT_STATUSES: Final = frozenset({409, 412})


def entity_size(entity: Row) -> int:
    """An entity's size as Table Storage counts it against its 1 MiB: 4 bytes, its keys in
    UTF-16, and per property 8 bytes, its name in UTF-16 and its value (a string: 4 bytes and
    its UTF-16; a bool 1 byte; an int 4 or 8; a float 8)."""
    size = 4
    for name, value in entity.items():
        if name in ("PartitionKey", "RowKey"):
            size += utf16_units(value) * 2
            continue
        units = utf16_units(name) * 2
        if isinstance(value, str):
            size += 8 + units + 4 + utf16_units(value) * 2
        elif isinstance(value, bool):
            size += 8 + units + 1
        elif isinstance(value, int) and -(2**31) <= value < 2**31:
            size += 8 + units + 4
        else:
            size += 8 + units + 8
    return size


def _signal_key(code: str) -> str:
    return "s:" + escape_key(code)


def _error_key(key: tuple[str, str]) -> str:
    return f"e:{escape_key(key[0])}:{escape_key(key[1])}"


def _event_key(event_id: str) -> str:
    return "i:" + escape_key(event_id)


def _outbox_prefix(event_id: str) -> str:
    return f"o:{escape_key(event_id)}:"


def _partition(vehicle_id: str | None) -> str:
    return _NO_VEHICLE if vehicle_id is None else escape_key(vehicle_id)


def _range(prefix: str) -> str:
    # Everything whose RowKey starts with `prefix`: prefix <= RowKey < prefix with its last
    # character incremented (":" -> ";").
    return (f"PartitionKey eq @pk and RowKey ge '{prefix}' and "
            f"RowKey lt '{prefix[:-1]}{chr(ord(prefix[-1]) + 1)}'")


def _day(epoch: float) -> str:
    """The UTC day of an epoch time, as the inbox index spells it."""
    return datetime.fromtimestamp(epoch, UTC).date().isoformat()


def _is_conflict(exc: BaseException) -> bool:
    return getattr(exc, "status_code", None) in _CONFLICT_STATUSES


class TableVehicleStateStore:
    """`VehicleStateStore` on an Azure Table (or Azurite's)."""

    def __init__(self, table: Any, *, create_table: bool = False,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        #: An `azure.data.tables.aio.TableClient`.
        self._table = table
        self._created = not create_table
        self._clock = clock
        self._sleep = sleep
        #: (partition, day) pairs this instance noted in the inbox index, and those whose
        #: note failed (written at the next record of any vehicle, or the next prune).
        self._indexed: set[tuple[str, str]] = set()
        self._unindexed: set[tuple[str, str]] = set()

    async def _ready(self) -> None:
        if self._created:
            return
        from azure.core.exceptions import ResourceExistsError

        try:
            await self._table.create_table()
        except ResourceExistsError:
            pass
        self._created = True

    # --- reading helpers ------------------------------------------------------------------------
    async def _get(self, pk: str, rk: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return await self._table.get_entity(pk, rk)
        except ResourceNotFoundError:
            return None

    async def _rows(self, pk: str, prefix: str, select: list[str] | None = None) -> list[Any]:
        return [entity async for entity in self._table.query_entities(
            _range(prefix), parameters={"pk": pk}, select=select)]

    # --- writing ------------------------------------------------------------------------------
    async def apply(self, event: Event, *, outbox: Outbox | None = None) -> ApplyResult:
        if event.vehicle_id is None or event.event_type not in STORED_TYPES:
            return ApplyResult()
        await self._ready()
        vehicle_id = event.vehicle_id
        pk = _partition(vehicle_id)
        committed: list[SignalChange] = []
        refreshed: list[str] = []
        conflicts = 0
        for attempt in range(MAX_ATTEMPTS):
            try:
                snapshot, state = await self._read(pk, vehicle_id, event)
                result = plan(snapshot, event)
                if result.writes_anything:
                    await self._write(pk, vehicle_id, event, snapshot, state, result, committed,
                                      refreshed, outbox)
            except Exception as exc:
                if not _is_conflict(exc):
                    if conflicts:  # they count though the apply failed (`conflicts_met`)
                        setattr(exc, CONFLICTS_ATTRIBUTE, conflicts)
                    raise
                conflicts += 1
                # Full jitter: the writers that collided spread out instead of colliding again.
                await self._sleep(random.uniform(0, min(0.005 * 2 ** attempt, 0.5)))  # noqa: S311
                continue
            done = tuple(committed)
            earlier = state["event"] is not None and int(state["event"].get("chunks") or 0)
            # Without earlier chunks (the usual case) the outbox holds exactly this apply's.
            pending = await self._pending(pk, event.event_id, None) if earlier else tuple(
                c for c in done if outbox is None or outbox(c.code, c.path))
            written = {d.code for d in done}.union(refreshed)
            return ApplyResult(
                changes=Changes(done), stale=tuple(c for c in result.stale if c not in written),
                refreshed=tuple(refreshed), skipped=result.skipped,
                errors_opened=result.errors_opened, errors_resolved=result.errors_resolved,
                conflicts_retried=conflicts, pending=pending,
            )
        raise StoreConflictError(
            f"vehicle {vehicle_id!r}: the state changed under each of {MAX_ATTEMPTS} attempts "
            f"to apply event {event.event_id}; the delivery will be retried",
            conflicts=conflicts)

    async def _read(self, pk: str, vehicle_id: str,
                    event: Event) -> tuple[Snapshot, dict[str, Any]]:
        errors_wanted = event.event_type == "VEHICLE_ERROR"
        vehicle, event_row, signals, errors = await asyncio.gather(
            self._get(pk, VEHICLE_ROW),
            self._get(pk, _event_key(event.event_id)),
            self._rows(pk, "s:") if not errors_wanted else _nothing(),
            self._rows(pk, "e:") if errors_wanted else _nothing(),
        )
        by_code = {str(e["code"]): e for e in signals}
        by_key = {error_from_row(e).key: e for e in errors}
        updated = vehicle.get("updatedAt") if vehicle is not None else None
        # An apply cut short between its transactions (a crash, a conflict) counted the
        # errors it wrote: the first `errorsCounted` of the event's keys in sorted order.
        counted = int(event_row.get("errorsCounted") or 0) if event_row is not None else 0
        snapshot = Snapshot(
            vehicle_id=vehicle_id,
            signals={code: signal_from_row(e) for code, e in by_code.items()},
            errors={key: error_from_row(e) for key, e in by_key.items()},
            errors_applied=bool(event_row is not None and event_row.get("errorsApplied")),
            errors_counted=frozenset(error_keys_of(event)[:counted]),
            updated_at=datetime.fromisoformat(updated) if isinstance(updated, str) else None,
        )
        return snapshot, {"vehicle": vehicle, "event": event_row, "signals": by_code,
                          "errors": by_key}

    async def _write(self, pk: str, vehicle_id: str, event: Event, snapshot: Snapshot,
                     state: dict[str, Any], result: Plan, committed: list[SignalChange],
                     refreshed: list[str], outbox: Outbox | None) -> None:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        def put(rk: str, row: Row, found: Any) -> tuple[Any, ...]:
            entity = {"PartitionKey": pk, "RowKey": rk, **row}
            if found is None:
                return ("create", entity)
            return ("update", entity, {"mode": UpdateMode.REPLACE, "etag": found.metadata["etag"],
                                       "match_condition": MatchConditions.IfNotModified})

        changed = {change.code: change for change in result.changes}
        writes: list[_Write] = []
        for code, current in result.signals.items():  # the changes and the refreshed readings
            op = put(_signal_key(code), signal_row(current), state["signals"].get(code))
            change = changed.get(code)
            # The change's entry in the outbox chunk, if it is kept: ASCII, 2 bytes a character.
            entry = (change_entry_text(change) if change is not None and (
                outbox is None or outbox(change.code, change.path)) else None)
            writes.append((op, entity_size(op[1]) + (2 * len(entry) if entry else 0),
                           (code, change, entry)))
        errors: dict[tuple[str, str], ErrorRecord] = {
            **snapshot.errors, **result.errors}
        for key, record in sorted(result.errors.items()):  # in the order `_read` counts
            op = put(_error_key(key), error_row(record), state["errors"].get(key))
            writes.append((op, entity_size(op[1]), None))

        vehicle = state["vehicle"]
        event_row = state["event"]
        signal_count = int(vehicle.get("signalCount") or 0) if vehicle is not None else 0
        open_errors = (sum(1 for r in errors.values() if r.state.state == OPEN)
                       if result.errors else
                       int(vehicle.get("openErrors") or 0) if vehicle is not None else 0)
        chunks = int(event_row.get("chunks") or 0) if event_row is not None else 0
        errors_applied = snapshot.errors_applied
        errors_counted = int(event_row.get("errorsCounted") or 0) if event_row is not None else 0
        errors_written = 0
        batches = _batches(writes)
        for number, batch in enumerate(batches, start=1):
            signals = [signal for _, _, signal in batch if signal is not None]
            changes = [change for _, change, _ in signals if change is not None]
            signal_count += sum(1 for code, _, _ in signals if code not in snapshot.signals)
            ops = [op for op, _, _ in batch]
            kept = [entry for _, _, entry in signals if entry is not None]
            if kept:
                ops.append(("create", {"PartitionKey": pk,
                                       "RowKey": f"{_outbox_prefix(event.event_id)}{chunks:05d}",
                                       **_split(pending_text(kept))}))
                chunks += 1
            # Marked with the last of its errors: an apply cut short before then is followed
            # by one that writes them all again, counting those past `errorsCounted`.
            errors_applied = errors_applied or (result.marks_errors and number == len(batches))
            errors_written += len(batch) - len(signals)
            errors_counted = max(errors_counted, errors_written)
            event_props = {"eventId": event.event_id, "errorsApplied": errors_applied,
                           "chunks": chunks, "errorsCounted": errors_counted}
            vehicle_props: Row = {"vehicleId": vehicle_id, "signalCount": signal_count,
                                  "openErrors": open_errors}
            if result.updated_at is not None:
                vehicle_props["updatedAt"] = result.updated_at.isoformat()
            ops.append(put(_event_key(event.event_id), event_props, event_row))
            ops.append(put(VEHICLE_ROW, vehicle_props, vehicle))
            answers: Sequence[Any] = await self._table.submit_transaction(ops)
            committed.extend(changes)
            refreshed.extend(code for code, change, _ in signals if change is None)
            # The next transaction of this apply replaces what this one wrote.
            event_row = _Written(answers[-2]["etag"])
            vehicle = _Written(answers[-1]["etag"])

    async def _pending(self, pk: str, event_id: str, event_row: Any) -> tuple[SignalChange, ...]:
        if event_row is None:
            event_row = await self._get(pk, _event_key(event_id))
        if event_row is None or event_row.get("processedAt") is not None:
            return ()
        if not int(event_row.get("chunks") or 0):
            return ()
        rows = await self._rows(pk, _outbox_prefix(event_id))
        changes: list[SignalChange] = []
        for row in sorted(rows, key=lambda r: str(r["RowKey"])):
            changes.extend(changes_from_text(_join(row)))
        return tuple(changes)

    async def pending_changes(self, vehicle_id: str, event_id: str) -> tuple[SignalChange, ...]:
        return await self._pending(_partition(vehicle_id), event_id, None)

    async def is_processed(self, vehicle_id: str | None, event_id: str) -> bool:
        await self._ready()
        row = await self._get(_partition(vehicle_id), _event_key(event_id))
        at = row.get("processedAt") if row is not None else None
        return isinstance(at, int | float) and at >= self._clock() - INBOX_RETENTION_SECONDS

    async def mark_processed(self, vehicle_id: str | None, event_id: str) -> None:
        from azure.data.tables import UpdateMode

        await self._ready()
        pk = _partition(vehicle_id)
        outbox = await self._rows(pk, _outbox_prefix(event_id), ["RowKey"])  # keys, to delete
        now = float(self._clock())
        ops: list[tuple[Any, ...]] = [
            ("upsert", {"PartitionKey": pk, "RowKey": _event_key(event_id),
                        "eventId": event_id, "processedAt": now, "chunks": 0},
             {"mode": UpdateMode.MERGE}),
            *(("delete", {"PartitionKey": pk, "RowKey": row["RowKey"]}) for row in outbox),
        ]
        await self._index(pk, now)
        for start in range(0, len(ops), MAX_OPERATIONS):
            await self._table.submit_transaction(ops[start:start + MAX_OPERATIONS])

    async def _index(self, pk: str, now: float) -> None:
        """Note in the day's index partition that partition `pk` has inbox records of that day
        (once per instance, partition and day), so `prune_inbox` finds them without a scan of
        the table; and the notes that failed before, so a vehicle whose last record of a day
        met a failed note is still pruned. Housekeeping: a note that fails is logged and
        written at the next record or prune."""
        note = (pk, _day(now))
        await self._write_notes(None if note in self._indexed else note)

    async def _write_notes(self, current: tuple[str, str] | None = None) -> None:
        """Write the notes that wait, then `current`, stopping at the first that fails (Table
        is refusing: the rest wait with it). `current` waits too if it is not written, unless
        `_INDEXED_KEPT` notes wait already."""
        from azure.core.exceptions import AzureError

        notes = sorted(self._unindexed)
        if current is not None and current not in self._unindexed:
            notes.append(current)
        for pk, day in notes:
            try:
                await self._table.submit_transaction([("upsert", {
                    "PartitionKey": _INDEX_PREFIX + day, "RowKey": f"p:{pk}", "partition": pk})])
            except AzureError as exc:
                logger.warning("vehicle state table: noting partition %r in the inbox index "
                               "failed (%s); it is tried again at the next record or prune",
                               pk, type(exc).__name__)
                if current is not None and len(self._unindexed) < _INDEXED_KEPT:
                    self._unindexed.add(current)
                return
            self._unindexed.discard((pk, day))
            if len(self._indexed) >= _INDEXED_KEPT:
                self._indexed.clear()
            self._indexed.add((pk, day))

    async def prune_inbox(self, *, seconds: float = PRUNE_SECONDS) -> InboxPruned:
        """Delete the inbox records past the retention (Table has no expiry of its own): for
        each partition the index notes for a day that is wholly past it, one query of that
        partition, deletes of up to 100 rows in a transaction, then the index row. A
        transaction that fails (another run deleted the rows first, or a transient error) is
        logged and counted, and its index row kept for the next run. Starts no partition
        after `seconds` (under the Functions timeout), counting the wait for one of the
        `_PRUNE_CONCURRENCY` slots; the rest waits for the next run. A query of the index that
        fails raises."""
        await self._ready()
        await self._write_notes()
        cutoff = float(self._clock()) - INBOX_RETENTION_SECONDS
        deadline = time.monotonic() + seconds
        limit = asyncio.Semaphore(_PRUNE_CONCURRENCY)
        tasks: list[asyncio.Task[InboxPruned]] = []
        async for entry in self._table.query_entities(
                "PartitionKey ge @first and PartitionKey lt @last",
                parameters={"first": _INDEX_PREFIX, "last": _INDEX_PREFIX + _day(cutoff)}):
            await limit.acquire()  # a free slot first: the wait for it counts in `seconds`
            if time.monotonic() >= deadline:
                break  # (the slot is not given back: no partition starts after this)
            tasks.append(asyncio.ensure_future(self._prune_partition(entry, cutoff, limit)))
        done = await asyncio.gather(*tasks)
        return InboxPruned(deleted=sum(p.deleted for p in done),
                           failed=sum(p.failed for p in done))

    async def _prune_partition(self, entry: Any, cutoff: float,
                               limit: asyncio.Semaphore) -> InboxPruned:
        """One index row's partition: its records deleted, and 1 in `failed` if some could
        not be (those deleted before the failure still count)."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        pk = str(entry["partition"])
        deleted = 0
        try:
            old = [row["RowKey"] async for row in self._table.query_entities(
                _range("i:") + " and processedAt lt @cutoff",
                parameters={"pk": pk, "cutoff": cutoff}, select=["RowKey"])]
            for start in range(0, len(old), MAX_OPERATIONS):
                batch = old[start:start + MAX_OPERATIONS]
                await self._table.submit_transaction(
                    [("delete", {"PartitionKey": pk, "RowKey": rk}) for rk in batch])
                deleted += len(batch)
            try:
                await self._table.delete_entity(entry["PartitionKey"], entry["RowKey"])
            except ResourceNotFoundError:
                pass  # another run got there first
        except AzureError as exc:
            logger.warning("vehicle state table: expired inbox records of partition %r could "
                           "not be deleted (%s); the next prune tries again", pk,
                           type(exc).__name__)
            return InboxPruned(deleted=deleted, failed=1)
        finally:
            limit.release()
        return InboxPruned(deleted=deleted)

    # --- reading ------------------------------------------------------------------------------
    async def get_vehicle(self, vehicle_id: str) -> VehicleView | None:
        await self._ready()
        pk = _partition(vehicle_id)
        vehicle, signals, errors = await asyncio.gather(
            self._get(pk, VEHICLE_ROW), self._rows(pk, "s:"), self._rows(pk, "e:"))
        if vehicle is None:
            return None
        updated = vehicle.get("updatedAt")
        records = sorted((error_from_row(e) for e in errors), key=lambda r: r.key)
        return VehicleView(
            vehicle_id=vehicle_id,
            signals={str(e["code"]): signal_from_row(e) for e in signals},
            errors=[r.state for r in records if r.state.state == OPEN],
            updated_at=datetime.fromisoformat(updated) if isinstance(updated, str) else None,
        )

    async def list_vehicles(self, *, limit: int = 100) -> list[VehicleSummary]:
        await self._ready()
        rows = [e async for e in self._table.query_entities(
            "RowKey eq @rk", parameters={"rk": VEHICLE_ROW})]
        summaries = [
            VehicleSummary(
                vehicle_id=str(e["vehicleId"]),
                updated_at=(datetime.fromisoformat(e["updatedAt"])
                            if isinstance(e.get("updatedAt"), str) else None),
                signal_count=int(e.get("signalCount") or 0),
                open_errors=int(e.get("openErrors") or 0),
            )
            for e in rows
        ]
        summaries.sort(key=lambda s: (s.updated_at is None,
                                      -(s.updated_at.timestamp() if s.updated_at else 0),
                                      s.vehicle_id))
        return summaries[:limit]

    async def close(self) -> None:
        await self._table.close()


class _Written:
    """A row this apply has just written: what the next transaction's If-Match needs."""

    def __init__(self, etag: str) -> None:
        self.metadata = {"etag": etag}


async def _nothing() -> list[Any]:
    return []


#: One entity write of an apply: (the operation, its size with its outbox entry's, and for a
#: signal its code, its change (None: the stored reading fetched again) and the change's
#: outbox entry (None: not kept); None for an error).
_Write = tuple[tuple[Any, ...], int, "tuple[str, SignalChange | None, str | None] | None"]


def _batches(writes: list[_Write]) -> list[list[_Write]]:
    """Writes grouped into transactions within the operation count and the size limits."""
    batches: list[list[_Write]] = []
    current: list[_Write] = []
    size = 0
    for write in writes:
        cost = write[1]
        full = len(current) >= _ENTITY_WRITES_PER_TXN or size + cost > _CHUNK_BUDGET_BYTES
        if current and full:
            batches.append(current)
            current, size = [], 0
        current.append(write)
        size += cost
    if current:
        batches.append(current)
    return batches


def _split(text: str) -> Row:
    parts = [text[i:i + _PROPERTY_CHARS] for i in range(0, len(text), _PROPERTY_CHARS)] or [""]
    return {"parts": len(parts), **{f"c{i}": part for i, part in enumerate(parts)}}


def _join(row: Any) -> str:
    return "".join(str(row[f"c{i}"]) for i in range(int(row.get("parts") or 0)))
