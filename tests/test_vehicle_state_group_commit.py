"""The local store's group commit: the writes the event loop's tasks make in one turn share one
SQLite transaction, and each call returns only once that transaction is committed.

What is committed is read through separate SQLite connections (what another process, such as
the CLI, would see), and the statements are counted by SQLite's own trace callback. The failed
commit is SQLite refusing it (an authorizer that denies COMMIT), so the error path is SQLite's.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore

from .vehicle_events import SOC, T0, signal, state_event

ODOMETER = "odometer-traveleddistance"


def committed_signals(path: Path, vehicle: str) -> dict[str, Any]:
    """What another connection sees of a vehicle's signals: committed rows only."""
    with sqlite3.connect(path) as other:
        row = other.execute(
            "SELECT signals FROM vehicles WHERE vehicle_id = ?", (vehicle,)).fetchone()
    return {} if row is None else dict(json.loads(row[0]))


def committed_marks(path: Path) -> set[str]:
    with sqlite3.connect(path) as other:
        return {event_id for (event_id,) in other.execute(
            "SELECT event_id FROM events WHERE processed_at IS NOT NULL")}


def commits(store: SqliteVehicleStateStore) -> list[str]:
    """Every COMMIT that SQLite runs on the store's write connection from now on."""
    seen: list[str] = []
    store._db.set_trace_callback(
        lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


class TestOneCommitPerTurn:
    def test_concurrent_applies_and_marks_share_one_commit_and_return_committed(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[list[str], dict[int, dict[str, str]], set[str]]:
            store = SqliteVehicleStateStore(path)
            seen = commits(store)
            after: dict[int, dict[str, str]] = {}

            async def one(index: int) -> None:
                vehicle = f"vehicle-{index}"
                event = state_event(f"e{index}", signal(value=index, oem=T0 + 1000),
                                    vehicle=vehicle)
                await store.apply(event)
                # Returned: another connection sees it at once.
                after[index] = committed_signals(path, vehicle)
                await store.mark_processed(vehicle, f"e{index}")

            await asyncio.gather(*(one(i) for i in range(8)))
            marks = committed_marks(path)
            await store.close()
            return seen, after, marks

        seen, after, marks = asyncio.run(scenario())
        assert all(SOC in rows for rows in after.values()), after
        assert len(after) == 8
        assert marks == {f"e{i}" for i in range(8)}
        # Eight applies in one turn, eight marks in the next: two commits, not sixteen.
        assert len(seen) == 2, seen

    def test_a_call_awaited_alone_commits_alone(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[list[str], dict[str, str]]:
            store = SqliteVehicleStateStore(path)
            seen = commits(store)
            await store.apply(state_event("e1", signal(value=1, oem=T0 + 1000)))
            rows = committed_signals(path, "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2")
            await store.close()
            return seen, rows

        seen, rows = asyncio.run(scenario())
        assert len(seen) == 1
        assert SOC in rows

    def test_reads_see_committed_state_only(self, tmp_path: Path) -> None:
        """The read route and the inspector never show a write that might still roll back."""
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[Any, Any, Any]:
            store = SqliteVehicleStateStore(path)
            task = asyncio.ensure_future(store.apply(
                state_event("e1", signal(value=1, oem=T0 + 1000), vehicle="v-read")))
            await asyncio.sleep(0)  # the apply has written; its commit is the next turn's
            assert store._db.in_transaction
            during = await store.get_vehicle("v-read")
            listed = await store.list_vehicles()
            await task
            after = await store.get_vehicle("v-read")
            await store.close()
            return during, listed, after

        during, listed, after = asyncio.run(scenario())
        assert during is None and listed == []
        assert after is not None and after.signals[SOC].value == 1


class TestFailures:
    def test_a_refused_commit_fails_every_call_in_it_and_keeps_nothing(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[list[Any], dict[str, str], Any]:
            store = SqliteVehicleStateStore(path)
            # SQLite asks the authorizer before each transaction statement; refusing COMMIT
            # makes SQLite's own COMMIT fail, as a full disk or an I/O error would.
            store._db.set_authorizer(lambda action, arg1, *_: (
                sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_TRANSACTION
                and arg1 == "COMMIT" else sqlite3.SQLITE_OK))
            outcomes = await asyncio.gather(
                store.apply(state_event("e1", signal(value=1, oem=T0 + 1000))),
                store.apply(state_event("e2", signal(ODOMETER, 7, oem=T0 + 1000))),
                store.mark_processed("v", "e0"),
                return_exceptions=True,
            )
            rows = committed_signals(path, "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2")
            store._db.set_authorizer(None)
            # The store is usable again, and forgot what it had cached of the lost writes.
            again = await store.apply(state_event("e1", signal(value=1, oem=T0 + 1000)))
            await store.close()
            return outcomes, rows, again

        outcomes, rows, again = asyncio.run(scenario())
        assert len(outcomes) == 3
        for outcome in outcomes:
            assert isinstance(outcome, sqlite3.OperationalError)
            assert "could not commit" in str(outcome)
        assert rows == {}
        assert [c.code for c in again.changes] == [SOC]

    def test_an_apply_that_fails_before_writing_leaves_the_others_to_commit(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        def refuse(code: str, path: str | None) -> bool:
            raise RuntimeError("outbox selector failed")

        async def scenario() -> tuple[list[Any], dict[str, str], dict[str, str]]:
            store = SqliteVehicleStateStore(path)
            outcomes = await asyncio.gather(
                store.apply(state_event("ok", signal(value=1, oem=T0 + 1000), vehicle="a")),
                store.apply(state_event("bad", signal(value=2, oem=T0 + 1000), vehicle="b"),
                            outbox=refuse),
                return_exceptions=True,
            )
            a, b = committed_signals(path, "a"), committed_signals(path, "b")
            await store.close()
            return outcomes, a, b

        outcomes, a, b = asyncio.run(scenario())
        assert not isinstance(outcomes[0], BaseException)
        assert isinstance(outcomes[1], RuntimeError)
        assert SOC in a
        assert b == {}

    def test_a_write_that_fails_takes_the_whole_turn_back(self, tmp_path: Path) -> None:
        """Half an event is never committed: when SQLite refuses one of an apply's writes,
        every call of the turn fails (and is tried again by its caller)."""
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[list[Any], set[str], dict[str, Any], Any]:
            store = SqliteVehicleStateStore(path)
            # The inbox mark (into `events`) is allowed; the apply's vehicle row is refused.
            store._db.set_authorizer(lambda action, table, *_: (
                sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_INSERT and table == "vehicles"
                else sqlite3.SQLITE_OK))
            outcomes = await asyncio.gather(
                store.mark_processed("v", "e0"),
                store.apply(state_event("e1", signal(value=1, oem=T0 + 1000), vehicle="a")),
                return_exceptions=True,
            )
            marks, rows = committed_marks(path), committed_signals(path, "a")
            store._db.set_authorizer(None)
            again = await store.apply(
                state_event("e1", signal(value=1, oem=T0 + 1000), vehicle="a"))
            await store.close()
            return outcomes, marks, rows, again

        outcomes, marks, rows, again = asyncio.run(scenario())
        assert isinstance(outcomes[0], sqlite3.OperationalError)
        assert "rolled back" in str(outcomes[0])
        assert isinstance(outcomes[1], sqlite3.DatabaseError)
        assert marks == set() and rows == {}
        assert [c.code for c in again.changes] == [SOC]

    def test_a_cancelled_caller_leaves_the_others_committed(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[bool, dict[str, str]]:
            store = SqliteVehicleStateStore(path)
            first = asyncio.ensure_future(
                store.apply(state_event("e1", signal(value=1, oem=T0 + 1000), vehicle="a")))
            second = asyncio.ensure_future(
                store.apply(state_event("e2", signal(value=2, oem=T0 + 1000), vehicle="b")))
            await asyncio.sleep(0)  # both have written and wait for the commit
            first.cancel()
            await second
            cancelled = first.cancelled()
            rows = committed_signals(path, "b")
            await store.close()
            return cancelled, rows

        cancelled, rows = asyncio.run(scenario())
        assert cancelled
        assert SOC in rows

    def test_close_commits_what_is_still_waiting(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[bool, set[str]]:
            store = SqliteVehicleStateStore(path)
            task = asyncio.ensure_future(store.mark_processed("v", "e1"))
            await asyncio.sleep(0)
            await store.close()
            await store.close()  # twice is fine
            await task
            return task.done(), committed_marks(path)

        done, marks = asyncio.run(scenario())
        assert done and marks == {"e1"}


@pytest.mark.parametrize("calls", [1, 5])
def test_nothing_is_left_open_between_turns(tmp_path: Path, calls: int) -> None:
    """After the calls return the transaction is closed: another process can write."""
    path = tmp_path / FILE_NAME

    async def scenario() -> None:
        store = SqliteVehicleStateStore(path)
        await asyncio.gather(*(store.mark_processed("v", f"e{i}") for i in range(calls)))
        assert not store._db.in_transaction
        with sqlite3.connect(path, timeout=0) as other:  # no wait: it must not be locked
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        await store.close()

    asyncio.run(scenario())
