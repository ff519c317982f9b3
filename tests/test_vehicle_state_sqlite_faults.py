"""The local store when SQLite refuses a write or a commit: the call fails, nothing of the
event is kept, and the store goes on with what is really stored.

The faults are SQLite's own: an authorizer that denies a statement makes SQLite fail it, as a
full disk or an I/O error would. What is stored is read through separate connections (what
another process, such as the CLI, sees).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore

from .vehicle_events import SOC, T0, VEHICLE, signal, state_event


def stored_signals(path: Path, vehicle: str) -> dict[str, Any]:
    with sqlite3.connect(path) as other:
        row = other.execute(
            "SELECT signals FROM vehicles WHERE vehicle_id = ?", (vehicle,)).fetchone()
    other.close()
    return {} if row is None else dict(json.loads(row[0]))


def stored_events(path: Path) -> list[tuple[str, bool]]:
    """(eventId, has pending changes) of every event row."""
    with sqlite3.connect(path) as other:
        rows = other.execute("SELECT event_id, pending IS NOT NULL FROM events").fetchall()
    other.close()
    return [(event_id, bool(pending)) for event_id, pending in rows]


def refuse(sql_action: int, target: str) -> Any:
    """An authorizer refusing `sql_action` on `target` (a table, or COMMIT)."""
    return lambda action, arg1, *_: (
        sqlite3.SQLITE_DENY if action == sql_action and arg1 == target else sqlite3.SQLITE_OK)


@pytest.mark.parametrize(("action", "target"), [
    (sqlite3.SQLITE_TRANSACTION, "COMMIT"),
    # The event's pending change goes in first, then the vehicle row is refused.
    (sqlite3.SQLITE_INSERT, "vehicles"),
])
def test_a_refused_write_or_commit_keeps_nothing_of_the_event(
    tmp_path: Path, action: int, target: str
) -> None:
    path = tmp_path / FILE_NAME

    async def scenario() -> tuple[BaseException | None, dict[str, Any], list[Any], Any, bool]:
        store = SqliteVehicleStateStore(path)
        await store.apply(state_event("e0", signal(value=1, oem=T0)))
        store._db.set_authorizer(refuse(action, target))
        failure = None
        try:
            await store.apply(state_event("e1", signal(value=2, oem=T0 + 1000)),
                              outbox=lambda code, path: True)
        except sqlite3.DatabaseError as exc:
            failure = exc
        left_open = store._db.in_transaction
        store._db.set_authorizer(None)
        stored, events = stored_signals(path, VEHICLE), stored_events(path)
        # Applied again, the event is decided against what is stored, not against what the
        # failed call had put in the store's memory.
        again = await store.apply(state_event("e1", signal(value=2, oem=T0 + 1000)))
        await store.close()
        return failure, stored, events, again, left_open

    failure, stored, events, again, left_open = asyncio.run(scenario())
    assert isinstance(failure, sqlite3.DatabaseError)
    assert not left_open
    assert json.loads(stored[SOC]["value"]) == 1
    assert events == [("e0", True)]  # e0 still pending; nothing of e1, not even its change
    (change,) = again.changes
    assert change.previous is not None and change.previous.value == 1
    assert change.current.value == 2


def test_an_apply_that_fails_before_writing_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME

    def broken(code: str, path: str | None) -> bool:
        raise RuntimeError("outbox selector failed")

    async def scenario() -> tuple[BaseException | None, dict[str, Any], Any]:
        store = SqliteVehicleStateStore(path)
        failure = None
        try:
            await store.apply(state_event("bad", signal(value=2, oem=T0)), outbox=broken)
        except RuntimeError as exc:
            failure = exc
        stored = stored_signals(path, VEHICLE)
        later = await store.apply(state_event("ok", signal(value=3, oem=T0 + 1000)))
        await store.close()
        return failure, stored, later

    failure, stored, later = asyncio.run(scenario())
    assert isinstance(failure, RuntimeError)
    assert stored == {}
    assert [c.code for c in later.changes] == [SOC] and later.changes[0].previous is None


def test_nothing_is_left_open_between_calls(tmp_path: Path) -> None:
    """After each call the write lock is free: another process can write at once."""
    path = tmp_path / FILE_NAME

    async def scenario() -> None:
        store = SqliteVehicleStateStore(path)
        await store.apply(state_event("e1", signal(value=1, oem=T0)))
        await store.mark_processed(VEHICLE, "e1")
        await store.get_vehicle(VEHICLE)
        assert not store._db.in_transaction
        with sqlite3.connect(path, timeout=0) as other:  # no wait: it must not be locked
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        other.close()
        await store.close()
        await store.close()  # twice is fine

    asyncio.run(scenario())
