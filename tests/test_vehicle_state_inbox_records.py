"""The local store's deferred commits: with `defer_commits` (the local host) the write calls
share one transaction, committed by `flush` or `FLUSH_SECONDS` after its first write, and the
host completes a message only once the commit that holds its state and inbox record is made.

What is on disk is read through separate connections (what another process, or the store after
a crash, would find). Faults are SQLite's own (an authorizer that denies a statement).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local import vehicle_state as store_module
from shared.local.queue import LocalQueue
from shared.local.vehicle_state import (
    FILE_NAME,
    FLUSH_SECONDS,
    SqliteVehicleStateStore,
    WritesLostError,
)

from .support import RunningHost, encode, local_env, signed_headers, wait_until
from .support import state_event as webhook_event
from .vehicle_events import SOC as SOC_CODE
from .vehicle_events import T0, VEHICLE, error, error_event, signal, state_event

SLOW_VEHICLE = "4f6c2b1e-8d3a-4c5b-9e7f-0a1b2c3d4e5f"
STORE_LOGGER = "shared.local.vehicle_state"


def records_on_disk(path: Path) -> set[str]:
    """eventIds with an inbox record in the file."""
    with sqlite3.connect(path) as other:
        rows = other.execute(
            "SELECT event_id FROM events WHERE processed_at IS NOT NULL").fetchall()
    other.close()
    return {event_id for (event_id,) in rows}


#: `commit_error` after a statement the authorizer refused.
REFUSED = "DatabaseError: not authorized"


def refuse_commit(action: int, arg1: Any, *_: Any) -> int:
    if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def flush_refused(store: SqliteVehicleStateStore) -> None:
    """A flush whose COMMIT SQLite refuses: the open transaction's writes are lost."""
    store._db.set_authorizer(refuse_commit)
    try:
        with pytest.raises(sqlite3.DatabaseError):
            store.flush()
    finally:
        store._db.set_authorizer(None)


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The store's log records: (level, message)."""
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == STORE_LOGGER]


def vehicles_on_disk(path: Path) -> set[str]:
    with sqlite3.connect(path) as other:
        rows = other.execute("SELECT vehicle_id FROM vehicles").fetchall()
    other.close()
    return {vehicle_id for (vehicle_id,) in rows}


def error_counts_after(path: Path,
                       steps: Callable[[SqliteVehicleStateStore], Awaitable[None]]) -> list[int]:
    """The counts of the vehicle's open errors after `steps` on a new store of `path`."""
    async def scenario() -> list[int]:
        store = SqliteVehicleStateStore(path)
        try:
            await steps(store)
            view = await store.get_vehicle(VEHICLE)
        finally:
            await store.close()
        return [] if view is None else [e.count for e in view.errors]

    return asyncio.run(scenario())


class TestDeferredCommits:
    def test_writes_are_the_stores_at_once_and_on_disk_after_flush(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            seen: list[Any] = []
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            await store.mark_processed(None, "verify-1")
            seen.append((records_on_disk(path), vehicles_on_disk(path)))
            # The store itself reads what it wrote.
            seen.append(await store.is_processed(VEHICLE, "e1"))
            seen.append(await store.is_processed(None, "verify-1"))
            seen.append(await store.pending_changes(VEHICLE, "e1"))
            view = await store.get_vehicle(VEHICLE)
            seen.append(None if view is None else view.signals[SOC_CODE].value)
            store.flush()
            seen.append((records_on_disk(path), vehicles_on_disk(path)))
            await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            await store.mark_processed(VEHICLE, "e2")
            await store.close()
            seen.append(records_on_disk(path))
            return seen

        before, e1, verify, pending, value, flushed, closed = asyncio.run(scenario())
        assert before == (set(), set())
        assert e1 and verify
        assert pending == ()
        assert value == 50
        assert flushed == ({"e1", "verify-1"}, {VEHICLE})
        assert closed == {"e1", "verify-1", "e2"}

    def test_the_writes_are_committed_soon_without_a_flush(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> tuple[set[str], set[str]]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.mark_processed(VEHICLE, "e1")
            at_once = records_on_disk(path)
            await asyncio.sleep(FLUSH_SECONDS * 10)
            later = records_on_disk(path)
            await store.close()
            return at_once, later

        assert asyncio.run(scenario()) == (set(), {"e1"})

    def test_a_failed_commit_loses_its_writes_and_says_so(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            store.flush()
            await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            await store.mark_processed(VEHICLE, "e2")
            store._db.set_authorizer(refuse_commit)
            seen: list[Any] = [store.failed_commits]
            try:
                store.flush()
            except sqlite3.DatabaseError:
                seen.append("raised")
            seen += [store.failed_commits, store.commit_error,
                     records_on_disk(path), await store.is_processed(VEHICLE, "e2")]
            store._db.set_authorizer(None)
            # Decided against what is stored (e1's 50), not against the lost e2.
            result = await store.apply(state_event("e3", signal(value=45, oem=T0 + 500)))
            seen.append([(c.previous.value if c.previous else None, c.current.value)
                         for c in result.changes])
            store.flush()
            seen.append(store.commit_error)
            await store.close()
            return seen

        before, raised, after, error, on_disk, e2, changes, cleared = asyncio.run(scenario())
        assert (before, raised, after, error) == (0, "raised", 1, REFUSED)
        assert on_disk == set()
        assert not e2
        assert changes == [(50, 45)]
        assert cleared is None

    def test_a_write_refused_inside_apply_loses_the_transaction_and_says_so(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        def refuse_errors(action: int, arg1: Any, *_: Any) -> int:
            if action == sqlite3.SQLITE_INSERT and arg1 == "errors":
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            store._db.set_authorizer(refuse_errors)
            seen: list[Any] = []
            try:
                await store.apply(error_event("e2", error()))
            except sqlite3.DatabaseError:
                seen.append("raised")
            seen += [store.failed_commits, store.commit_error]
            store._db.set_authorizer(None)
            await store.mark_processed(VEHICLE, "e3")
            store.flush()
            seen += [store.commit_error, vehicles_on_disk(path), records_on_disk(path)]
            await store.close()
            return seen

        raised, failures, said, cleared, vehicles, records = asyncio.run(scenario())
        assert (raised, failures, said) == ("raised", 1, REFUSED)
        assert cleared is None
        # e1's state was in the transaction the refused write rolled back.
        assert vehicles == set() and records == {"e3"}

    def test_a_commit_refused_on_the_timer_is_logged_and_the_store_carries_on(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            store._db.set_authorizer(refuse_commit)
            await asyncio.sleep(FLUSH_SECONDS * 10)
            seen: list[Any] = [store.failed_commits, store.commit_error]
            store.flush()  # nothing waits now
            # The next apply needs no inbox check first; a second refusal counts too.
            await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            try:
                store.flush()
            except sqlite3.DatabaseError:
                seen.append(store.failed_commits)
            with pytest.raises(WritesLostError) as lost:
                await store.mark_processed(VEHICLE, "e2")
            seen.append(str(lost.value))
            store._db.set_authorizer(None)
            # e1 is delivered again: applied again (against nothing: both writes were
            # lost), and this time recorded.
            again = await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            store.flush()
            seen += [[(c.previous, c.current.value) for c in again.changes],
                     records_on_disk(path)]
            await store.close()
            return seen

        with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
            first, error, second, lost, changes, records = asyncio.run(scenario())
        assert (first, error, second) == (1, REFUSED, 2)
        assert lost == (f"event e2: what its apply stored was lost with a failed commit "
                        f"({REFUSED}); it is not recorded as processed")
        assert changes == [(None, 50)] and records == {"e1"}
        assert store_warnings(caplog) == [
            ("WARNING", f"vehicle state store {path}: deferred writes could not be committed "
                        "(not authorized); their deliveries are redelivered")]

    def test_a_commit_refused_at_close_is_logged_once_and_the_store_is_closed(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> None:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            store._db.set_authorizer(refuse_commit)
            await store.close()
            await store.close()  # a second close does nothing

        with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
            asyncio.run(scenario())
        assert store_warnings(caplog) == [
            ("WARNING", f"vehicle state store {path}: deferred writes could not be committed "
                        "at close (not authorized)")]
        assert vehicles_on_disk(path) == set()

    @pytest.mark.parametrize("call", ["prune_inbox", "get_vehicle", "list_vehicles"])
    def test_a_refused_write_of_any_call_loses_the_transaction_and_says_why(
        self, tmp_path: Path, call: str
    ) -> None:
        """The prune's DELETE, or the writes that wait in memory until a read needs them."""
        path = tmp_path / FILE_NAME
        refused = {"prune_inbox": (sqlite3.SQLITE_DELETE, "events"),
                   "get_vehicle": (sqlite3.SQLITE_INSERT, "vehicles"),
                   "list_vehicles": (sqlite3.SQLITE_INSERT, "vehicles")}[call]

        def refuse(action: int, arg1: Any, *_: Any) -> int:
            return sqlite3.SQLITE_DENY if (action, arg1) == refused else sqlite3.SQLITE_OK

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            store._db.set_authorizer(refuse)
            seen: list[Any] = []
            try:
                await (store.get_vehicle(VEHICLE) if call == "get_vehicle"
                       else getattr(store, call)())
            except sqlite3.DatabaseError:
                seen.append("raised")
            store._db.set_authorizer(None)
            seen += [store.failed_commits, store.commit_error]
            store.flush()
            seen += [vehicles_on_disk(path), records_on_disk(path)]
            await store.close()
            return seen

        assert asyncio.run(scenario()) == ["raised", 1, REFUSED, set(), set()]

    def test_an_apply_after_the_record_in_the_same_commit_keeps_the_record(
        self, tmp_path: Path
    ) -> None:
        """Whatever order the calls come in, an apply never undoes a record: here the record
        comes first, and the apply after it in the same deferred commit still has a change to
        keep pending."""
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.mark_processed(VEHICLE, "e1")
            applied = await store.apply(state_event("e1", signal(value=50, oem=T0)),
                                        outbox=lambda code, path: True)
            store.flush()
            seen = [len(applied.pending), records_on_disk(path),
                    await store.is_processed(VEHICLE, "e1")]
            await store.close()
            return seen

        assert asyncio.run(scenario()) == [1, {"e1"}, True]

    def test_a_record_in_the_same_commit_as_its_apply_keeps_the_errors_applied(
        self, tmp_path: Path
    ) -> None:
        """A VEHICLE_ERROR applied and recorded in one deferred commit, then applied again
        by a store that reads it from the file: its error is not counted twice."""
        path = tmp_path / FILE_NAME
        event = error_event("e1", error())

        async def first() -> None:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(event)
            await store.mark_processed(VEHICLE, "e1")
            await store.close()

        async def again() -> Any:
            store = SqliteVehicleStateStore(path)
            await store.apply(event)
            view = await store.get_vehicle(VEHICLE)
            await store.close()
            return view

        asyncio.run(first())
        view = asyncio.run(again())
        assert view is not None and [e.count for e in view.errors] == [1]

    def test_without_deferral_each_call_commits(self, tmp_path: Path) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            seen: list[Any] = [vehicles_on_disk(path), store.writing_in(), store.last_committed]
            await store.mark_processed(VEHICLE, "e1")
            seen += [records_on_disk(path), store.writing_in(), store.last_committed]
            await store.close()
            return seen

        # Each call's own transaction, committed before it returns.
        assert asyncio.run(scenario()) == [{VEHICLE}, None, 1, {"e1"}, None, 2]

    def test_a_write_is_on_disk_once_last_committed_reaches_its_transaction(
        self, tmp_path: Path
    ) -> None:
        """What the local host completes a delivery by: the number `writing_in` gave when the
        delivery was done, against `last_committed`."""
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            seen: list[Any] = [store.writing_in()]
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            first = store.writing_in()
            assert first is not None
            seen += [store.last_committed < first, records_on_disk(path)]
            store.flush()
            seen += [store.writing_in(), store.last_committed == first, records_on_disk(path)]
            await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            await store.mark_processed(VEHICLE, "e2")
            second = store.writing_in()
            assert second is not None
            seen += [second > first, store.last_committed < second, records_on_disk(path)]
            store.flush()
            seen += [store.last_committed == second, records_on_disk(path)]
            await store.close()
            return seen

        assert asyncio.run(scenario()) == [
            None, True, set(), None, True, {"e1"}, True, True, {"e1"}, True, {"e1", "e2"}]

    @pytest.mark.parametrize("kind", ["state", "error"])
    def test_an_apply_lost_with_its_commit_cannot_be_recorded_until_applied_again(
        self, tmp_path: Path, kind: str
    ) -> None:
        """The lost writes are known by event: an event of signals only (decided by the fast
        path) and a VEHICLE_ERROR (decided by the rules), whose record would otherwise say it
        was processed. Each try to record it fails until it is applied again."""
        path = tmp_path / FILE_NAME
        event = (state_event("e1", signal(value=50, oem=T0)) if kind == "state"
                 else error_event("e1", error()))

        async def scenario() -> list[Any]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await store.apply(event)
            flush_refused(store)
            seen: list[Any] = []
            for _ in range(2):
                try:
                    await store.mark_processed(VEHICLE, "e1")
                except WritesLostError:
                    seen.append("lost")
            store.flush()
            seen.append(records_on_disk(path))
            # Applied again (its redelivery), it can be recorded.
            await store.apply(event)
            await store.mark_processed(VEHICLE, "e1")
            store.flush()
            seen.append(records_on_disk(path))
            await store.close()
            return seen

        assert asyncio.run(scenario()) == ["lost", "lost", set(), {"e1"}]

    def test_the_lost_events_are_forgotten_only_past_their_bound(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The store remembers up to `_LOST_KEPT` lost events (those never delivered again
        would grow it without end); one more failed commit past that forgets them all."""
        monkeypatch.setattr(store_module, "_LOST_KEPT", 2)
        path = tmp_path / FILE_NAME

        async def lose(store: SqliteVehicleStateStore, *event_ids: str) -> None:
            for number, event_id in enumerate(event_ids):
                await store.apply(state_event(event_id, signal(value=number, oem=T0 + number)))
            flush_refused(store)

        async def recorded(store: SqliteVehicleStateStore, event_id: str) -> bool:
            try:
                await store.mark_processed(VEHICLE, event_id)
            except WritesLostError:
                return False
            return True

        async def scenario() -> list[bool]:
            store = SqliteVehicleStateStore(path)
            store.defer_commits()
            await lose(store, "e1", "e2")
            await lose(store, "e3")  # two kept: at the bound, not past it
            seen = [await recorded(store, "e1")]
            await lose(store, "e4")  # three kept: past the bound, forgotten
            seen += [await recorded(store, "e2"), await recorded(store, "e4")]
            await store.close()
            return seen

        assert asyncio.run(scenario()) == [False, True, False]

    def test_an_error_applied_again_after_its_record_in_the_same_commit_counts_once(
        self, tmp_path: Path
    ) -> None:
        """A VEHICLE_ERROR applied and committed, then recorded and delivered again in one
        deferred commit: the record that waits says nothing of its errors, the file does."""
        async def steps(store: SqliteVehicleStateStore) -> None:
            await store.apply(error_event("x1", error()))
            store.defer_commits()
            await store.mark_processed(VEHICLE, "x1")
            await store.apply(error_event("x1", error()))

        assert error_counts_after(tmp_path / FILE_NAME, steps) == [1]

    def test_signals_under_an_error_event_s_id_keep_its_errors_applied(
        self, tmp_path: Path
    ) -> None:
        """An eventId is the store's key for what an event applied: a VEHICLE_STATE that
        reuses a VEHICLE_ERROR's eventId within one deferred commit must not make the store
        forget that the error was counted, or a redelivery of the error counts it twice."""
        async def steps(store: SqliteVehicleStateStore) -> None:
            store.defer_commits()
            await store.apply(error_event("x1", error()))
            await store.apply(state_event("x1", signal(value=50, oem=T0)),
                              outbox=lambda code, path: True)
            await store.apply(error_event("x1", error()))

        assert error_counts_after(tmp_path / FILE_NAME, steps) == [1]

    def test_a_reading_dated_past_a_day_after_its_delivery_is_stored_undated(
        self, tmp_path: Path
    ) -> None:
        """The store hands the fast path the delivery time, so such a reading is the rules'
        (`usable_oem`), as for the Table backend."""
        path = tmp_path / FILE_NAME
        day_ms = 86_400_000

        async def scenario() -> Any:
            store = SqliteVehicleStateStore(path)
            event = state_event("e1", signal(value=50, oem=T0 + day_ms + 1000), delivered=T0)
            await store.apply(event)
            view = await store.get_vehicle(VEHICLE)
            await store.close()
            return view

        view = asyncio.run(scenario())
        assert view is not None
        assert (view.signals[SOC_CODE].value, view.signals[SOC_CODE].oem_updated_at) == (50, None)


def other_signal_event() -> dict[str, Any]:
    """A delivery without the charge, so no `on_change` handler wants a change of it and its
    apply writes no event row: only its inbox record would."""
    event = webhook_event()
    event["data"] = {"signals": [signal("odometer-traveleddistance", 1234.5, unit="km")]}
    return event


def on_disk_when_dead_lettered(tmp_path: Path, registry: HandlerRegistry, method: str,
                               **env: str) -> tuple[list[set[str]], dict[str, Any]]:
    """One event through a local host whose last delivery fails: the vehicles on disk each
    time the queue's `method` (the dead-letter's way in) was called, and the event."""
    found: list[set[str]] = []

    def watch(runtime: Any) -> None:
        queue: LocalQueue = runtime.queue
        original = getattr(queue, method)

        def observed(*args: Any, **kwargs: Any) -> Any:
            found.append(vehicles_on_disk(tmp_path / FILE_NAME))
            return original(*args, **kwargs)

        setattr(queue, method, observed)

    event = other_signal_event()
    body = encode(event)
    with RunningHost(local_env(tmp_path, **env), registry=registry, customize=watch) as host:
        assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status == 200
        wait_until(lambda: host.runtime.queue.stats()["deadLettered"] == 1, timeout=30)
    return found, event


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
                    # Read before the completion; counted once it happened (a send that
                    # finds the queue busy raises, and its completions are tried again).
                    on_disk = len(records_on_disk(store_path)) if tokens else 0
                    result = method(*args, **kwargs)
                    if tokens:
                        completed[0] += len(tokens)
                        checks.append((completed[0], on_disk))
                    return result
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

    def test_deliveries_share_the_commit_of_their_window_and_complete_after_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A window long enough that every send below comes within it: no send commits, and
        # every message waits for the one commit that holds its writes.
        monkeypatch.setattr(store_module, "FLUSH_SECONDS", 3.0)
        events = [other_signal_event() for _ in range(5)]
        with RunningHost(local_env(tmp_path)) as host:
            store = host.runtime.vehicle_state
            assert isinstance(store, SqliteVehicleStateStore)
            committed = store.last_committed
            for event in events:
                body = encode(event)
                assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status \
                    == 200
            wait_until(lambda: len(host.handled()) == len(events), timeout=15)
            assert store.last_committed == committed  # the sends committed nothing
            assert records_on_disk(tmp_path / FILE_NAME) == set()
            assert host.runtime.queue.stats()["active"] == len(events)  # none completed
            wait_until(lambda: host.runtime.queue.stats()["active"] == 0, timeout=15)
            assert store.last_committed == committed + 1  # one commit for all five
        assert records_on_disk(tmp_path / FILE_NAME) == {e["eventId"] for e in events}

    def test_a_failed_commit_completes_nothing_and_the_event_is_handled_again(
        self, tmp_path: Path
    ) -> None:
        event = other_signal_event()
        body = encode(event)
        handled = tmp_path / "handled.jsonl"

        def attempts() -> int:
            if not handled.exists():
                return 0
            return sum(json.loads(line)["eventId"] == event["eventId"]
                       for line in handled.read_text().splitlines() if line)

        with RunningHost(local_env(tmp_path), lock_duration=2.0) as host:
            store = host.runtime.vehicle_state
            assert isinstance(store, SqliteVehicleStateStore)
            with store._lock:
                store._db.set_authorizer(refuse_commit)
            assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status == 200
            wait_until(lambda: host.get("/api/health").status == 503, timeout=15)
            # Handled, but its writes were lost: its message is not completed.
            assert attempts() == 1
            assert host.runtime.queue.stats()["active"] == 1
            assert records_on_disk(tmp_path / FILE_NAME) == set()
            with store._lock:
                store._db.set_authorizer(None)
            # Redelivered when its lock expires, handled again, and completed.
            wait_until(lambda: host.runtime.queue.stats()["active"] == 0, timeout=30)
            assert host.get("/api/health").status == 200
            assert attempts() == 2
        assert event["eventId"] in records_on_disk(tmp_path / FILE_NAME)

    def test_an_event_is_dead_lettered_only_after_what_it_stored_is_on_disk(
        self, tmp_path: Path
    ) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def fail(event: Event, context: HandlerContext) -> None:
            raise RuntimeError("this handler always fails")

        found, event = on_disk_when_dead_lettered(
            tmp_path, registry, "dead_letter_by_sequence", MAX_DELIVERY_COUNT="1")
        # The event's vehicle was on disk when the event was dead-lettered: it is not
        # redelivered, so nothing would write it later.
        assert found == [{event["vehicleId"]}]

    def test_a_last_delivery_that_times_out_is_dead_lettered_after_its_writes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The function itself fails on the last delivery (here it times out after the
        store applied the event): the host's abandon dead-letters the message, and commits
        the store's writes first, as the processor's dead-letters do; the 30 s window would
        otherwise leave them uncommitted."""
        monkeypatch.setattr(store_module, "FLUSH_SECONDS", 30.0)
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def hang(event: Event, context: HandlerContext) -> None:
            await asyncio.sleep(60)

        found, event = on_disk_when_dead_lettered(
            tmp_path, registry, "abandon", MAX_DELIVERY_COUNT="1", FUNCTION_TIMEOUT_SECONDS="1")
        assert found == [{event["vehicleId"]}]

    def test_a_delivery_running_when_a_commit_failed_is_not_completed(
        self, tmp_path: Path
    ) -> None:
        registry = HandlerRegistry()
        slow_first = {"left": 1}

        @registry.on("VEHICLE_STATE")
        async def slow_once(event: Event, context: HandlerContext) -> None:
            if event.vehicle_id == SLOW_VEHICLE and slow_first["left"]:
                slow_first["left"] = 0
                await asyncio.sleep(1.0)  # the commit of its writes fails meanwhile

        slow = other_signal_event()
        slow["vehicleId"] = SLOW_VEHICLE
        fast = other_signal_event()
        handled = tmp_path / "handled.jsonl"

        def attempts(event_id: str) -> int:
            if not handled.exists():
                return 0
            return sum(json.loads(line)["eventId"] == event_id
                       for line in handled.read_text().splitlines() if line)

        with RunningHost(local_env(tmp_path), registry=registry, lock_duration=2.0) as host:
            store = host.runtime.vehicle_state
            assert isinstance(store, SqliteVehicleStateStore)
            with store._lock:
                store._db.set_authorizer(refuse_commit)
            body = encode(slow)
            assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status == 200
            wait_until(lambda: store.failed_commits >= 1, timeout=15)
            with store._lock:
                store._db.set_authorizer(None)
            # Another delivery completes meanwhile (the host has seen the failure then).
            body = encode(fast)
            assert host.post("/api/webhooks/smartcar", body, signed_headers(body)).status == 200
            wait_until(lambda: attempts(slow["eventId"]) >= 1, timeout=15)
            # The slow one's writes were in the failed commit: it is redelivered when its
            # lock expires, and handled again, not completed without them.
            wait_until(lambda: attempts(slow["eventId"]) == 2, timeout=30)
            wait_until(lambda: host.runtime.queue.stats()["active"] == 0, timeout=30)
        assert SLOW_VEHICLE in vehicles_on_disk(tmp_path / FILE_NAME)
        assert slow["eventId"] in records_on_disk(tmp_path / FILE_NAME)
