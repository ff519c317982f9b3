"""The local store's inbox records, written after the fact: `mark_processed` keeps a record in
memory until the store's next write or `record_inbox`, and the local host writes them before
it completes the messages they belong to.

What is on disk is read through separate connections (what another process, or the store after
a crash, would find). Faults are SQLite's own (an authorizer that denies a statement).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from shared.local.queue import LocalQueue
from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore

from .support import RunningHost, encode, local_env, signed_headers, wait_until
from .support import state_event as webhook_event
from .vehicle_events import T0, VEHICLE, signal, state_event


def records_on_disk(path: Path) -> set[str]:
    """eventIds with an inbox record in the file."""
    with sqlite3.connect(path) as other:
        rows = other.execute(
            "SELECT event_id FROM events WHERE processed_at IS NOT NULL").fetchall()
    other.close()
    return {event_id for (event_id,) in rows}


def refuse_commit(action: int, arg1: Any, *_: Any) -> int:
    if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class TestTheStore:
    def test_a_deferred_record_counts_at_once_and_reaches_the_disk_with_the_next_write(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_inbox_records()
            seen = []
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            await store.mark_processed(None, "verify-1")
            seen.append(records_on_disk(path))
            seen.append(await store.is_processed(VEHICLE, "e1"))
            seen.append(await store.is_processed(None, "verify-1"))
            seen.append(await store.pending_changes(VEHICLE, "e1"))
            # The next apply takes them along, in its own transaction.
            await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            seen.append(records_on_disk(path))
            await store.mark_processed(VEHICLE, "e2")
            store.record_inbox()
            seen.append(records_on_disk(path))
            await store.mark_processed(VEHICLE, "e3")
            await store.close()
            seen.append(records_on_disk(path))
            return seen

        before, e1, verify, pending, after_apply, after_record, after_close = asyncio.run(
            scenario())
        assert before == set()
        assert e1 and verify
        assert pending == ()
        assert after_apply == {"e1", "verify-1"}
        assert after_record == {"e1", "verify-1", "e2"}
        assert after_close == {"e1", "verify-1", "e2", "e3"}

    def test_records_a_failed_write_could_not_take_wait_for_the_next(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_inbox_records()
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            store._db.set_authorizer(refuse_commit)
            failures = []
            try:
                await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            except sqlite3.DatabaseError as exc:
                failures.append(exc)
            try:
                store.record_inbox()
            except sqlite3.DatabaseError as exc:
                failures.append(exc)
            seen: list[Any] = [len(failures), records_on_disk(path),
                               await store.is_processed(VEHICLE, "e1")]
            store._db.set_authorizer(None)
            store.record_inbox()
            seen.append(records_on_disk(path))
            await store.close()
            return seen

        failures, during, still_counted, after = asyncio.run(scenario())
        assert failures == 2
        assert during == set()
        assert still_counted
        assert after == {"e1"}

    def test_without_deferral_each_record_is_on_disk_when_marked(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> set[str]:
            store = SqliteVehicleStateStore(path)
            await store.mark_processed(VEHICLE, "e1")
            seen = records_on_disk(path)
            await store.close()
            return seen

        assert asyncio.run(scenario()) == {"e1"}


def other_signal_event() -> dict[str, Any]:
    """A delivery without the charge, so no `on_change` handler wants a change of it and its
    apply writes no event row: only its inbox record would."""
    event = webhook_event()
    event["data"] = {"signals": [signal("odometer-traveleddistance", 1234.5, unit="km")]}
    return event


class TestTheLocalHost:
    def test_every_message_is_completed_only_after_its_inbox_record_is_on_disk(
        self, tmp_path: Path
    ) -> None:
        store_path = tmp_path / FILE_NAME
        checks: list[tuple[int, int]] = []

        def watch(runtime: Any) -> None:
            queue: LocalQueue = runtime.queue
            completed = [0]

            def observed(method: Any, tokens_of: Any) -> Any:
                def call(*args: Any, **kwargs: Any) -> Any:
                    tokens = tokens_of(args, kwargs)
                    if tokens:
                        completed[0] += len(tokens)
                        checks.append((completed[0], len(records_on_disk(store_path))))
                    return method(*args, **kwargs)
                return call

            queue.complete_and_receive = observed(  # type: ignore[method-assign]
                queue.complete_and_receive, lambda a, k: a[0] if a else k.get("lock_tokens"))
            queue.send_and_lock = observed(  # type: ignore[method-assign]
                queue.send_and_lock, lambda a, k: k.get("complete"))
            queue.complete_many = observed(  # type: ignore[method-assign]
                queue.complete_many, lambda a, k: a[0] if a else k.get("lock_tokens"))

        events = [other_signal_event() for _ in range(12)]
        with RunningHost(local_env(tmp_path), customize=watch) as host:
            for event in events:
                body = encode(event)
                assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status \
                    == 200
            wait_until(lambda: host.runtime.queue.stats()["active"] == 0, timeout=30)
        assert checks, "no message was completed"
        # Each completion found at least as many records on disk as messages it completed.
        assert all(records >= completed for completed, records in checks), checks
        assert records_on_disk(store_path) >= {e["eventId"] for e in events}

    def test_while_records_cannot_be_written_nothing_is_completed_and_health_says_so(
        self, tmp_path: Path
    ) -> None:
        event = other_signal_event()
        body = encode(event)
        with RunningHost(local_env(tmp_path)) as host:
            store = host.runtime.vehicle_state
            assert isinstance(store, SqliteVehicleStateStore)

            def refuse_records(action: int, arg1: Any, *_: Any) -> int:
                if action == sqlite3.SQLITE_INSERT and arg1 == "events":
                    return sqlite3.SQLITE_DENY
                return sqlite3.SQLITE_OK

            with store._lock:
                store._db.set_authorizer(refuse_records)
            assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status == 200
            wait_until(lambda: host.get("/api/health").status == 503, timeout=15)
            # Handled, but held: its message is still locked, not completed.
            assert host.runtime.queue.stats()["active"] == 1
            assert event["eventId"] not in records_on_disk(tmp_path / FILE_NAME)
            with store._lock:
                store._db.set_authorizer(None)
            wait_until(lambda: host.runtime.queue.stats()["active"] == 0, timeout=15)
            assert host.get("/api/health").status == 200
        assert event["eventId"] in records_on_disk(tmp_path / FILE_NAME)
