"""The `prune_vehicle_inbox` timer: deletes the processed-event records past the retention of
every vehicle, with the store it runs on (the stores' own pruning is tested on both backends in
tests/test_vehicle_state_store.py)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import azure.functions as func
import pytest

from shared.inbox_prune import INBOX_PRUNE_SCHEDULE, handle_inbox_prune_timer
from shared.local.app_functions import index_functions
from shared.local.command import load_function_app
from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore
from shared.runtime import build_runtime, set_runtime
from shared.settings import load_settings

from .support import RunningHost, local_env, wait_until
from .test_vehicle_state_store import Backend

DAY = 86400.0


def timer(*, past_due: bool = False) -> func.TimerRequest:
    from azure.functions.timer import TimerRequest

    return TimerRequest(past_due=past_due)


def record(path: Path, event_id: str, *, days_ago: float) -> None:
    """An inbox record made `days_ago` days ago, by a store of its own (another process)."""
    at = datetime.now(UTC).timestamp() - days_ago * DAY

    async def mark() -> None:
        store = SqliteVehicleStateStore(path, clock=lambda: at)
        await store.mark_processed("car-1", event_id)
        await store.close()

    asyncio.run(mark())


def recorded(path: Path) -> set[str]:
    return Backend("sqlite", str(path)).stored_event_ids()


def test_the_timer_is_declared_hourly() -> None:
    _, _, timers = index_functions(load_function_app())
    assert [(t.name, t.schedule) for t in timers if t.name == "prune_vehicle_inbox"] == [
        ("prune_vehicle_inbox", INBOX_PRUNE_SCHEDULE)]
    assert INBOX_PRUNE_SCHEDULE == "0 17 * * * *"  # NCRONTAB: hourly, at :17


class TestTheHandler:
    def test_it_deletes_the_expired_records_and_says_how_many(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / FILE_NAME
        record(path, "old", days_ago=9)
        record(path, "kept", days_ago=7)
        runtime = build_runtime(load_settings(local_env(tmp_path)))
        set_runtime(runtime)
        caplog.set_level(logging.INFO, logger="shared.inbox_prune")
        try:
            pruned = asyncio.run(handle_inbox_prune_timer(timer(past_due=True)))
        finally:
            set_runtime(None)
            runtime.queue.close()
            assert runtime.vehicle_state is not None
            asyncio.run(runtime.vehicle_state.close())
        assert pruned is not None and (pruned.deleted, pruned.failed) == (1, 0)
        assert recorded(path) == {"kept"}
        assert [r.getMessage() for r in caplog.records] == [
            "inbox prune timer is past due; running now",
            "vehicle state inbox: 1 records past the retention deleted, 0 groups left for the "
            "next prune"]

    def test_with_the_store_off_there_is_nothing_to_prune(self, tmp_path: Path) -> None:
        runtime = build_runtime(load_settings(local_env(tmp_path, VEHICLE_STATE_STORE="off")))
        set_runtime(runtime)
        try:
            assert runtime.vehicle_state is None
            assert asyncio.run(handle_inbox_prune_timer(timer())) is None
        finally:
            set_runtime(None)
            runtime.queue.close()


def test_the_local_host_runs_it(tmp_path: Path) -> None:
    """With its other timers, every `--timer-interval`: the host's store (deferring its
    commits) deletes the record, and the deletion is committed."""
    path = tmp_path / FILE_NAME
    record(path, "old", days_ago=9)
    record(path, "kept", days_ago=1)
    with RunningHost(local_env(tmp_path), timer_interval=0.05):
        wait_until(lambda: recorded(path) == {"kept"}, timeout=10)
