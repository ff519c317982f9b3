"""The vehicle state store's cost per event, on both backends: SQLite (a file in a temporary
directory) and Azure Table Storage on Azurite (started here on a free loopback port).

Per event the processor makes three store calls: `is_processed` (the inbox), `apply` and, after
the handlers, `mark_processed`. SQLite is measured committing each call (as the CLI uses it)
and with its commits deferred and made every 8 events (as the local host uses it; a mean,
since every 8th event carries the commit). Each event is a 5 KB VEHICLE_STATE (22 signals)
whose readings are newer than the last, spread over a few vehicles, so every apply writes.
Figures are wall-clock per call, one call at a time: on Azurite they are mostly HTTP round
trips to a local emulator (Node.js, on the same cores), not Azure's latency.

The decision's share: the SQLite store's CPU per event (this thread's) for the calls as the
local host makes them (the app's `on_change` filter, commits every 8 events), the events of
one vehicle, measured twice on fresh files: as it runs, and with `quick.quick_plan` answering
the plan it gave each event in the first pass (what is left costs the same; the decision costs
nothing). Both end with the same stored vehicle, which is checked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from shared.events import Event, parse_event
from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore
from shared.vehicle_state import VehicleStateStore, VehicleView
from shared.vehicle_state.quick import QuickPlan, quick_plan

from .common import emit, median, note, percentile, state_payload

NAME = "vehicle_state_store"
SIZE = 5 * 1024
VEHICLES = 4
#: Events per commit. The local host commits its deferred writes every 20 ms
#: (`FLUSH_SECONDS`), so how many share a commit grows with the rate: 8 at 400 events a
#: second, 20 at 1,000.
DEFERRED_COMMIT_EVERY = 8
ROOT = Path(__file__).resolve().parent.parent
AZURITE_TABLE = ROOT / "node_modules" / ".bin" / "azurite-table"
# Azurite's well-known development account (published in its README; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


async def measure(store: VehicleStateStore, events: int, *,
                  commit_every: int = 0) -> dict[str, list[float]]:
    """Per-call figures; with `commit_every`, the store defers its commits (as the local host
    has it) and each `commit_every`-th event's figure includes the commit of them all."""
    bodies = [parse_event(state_payload(SIZE, vehicle_id=f"bench-vehicle-{i % VEHICLES}"))
              for i in range(events)]
    apply_ms: list[float] = []
    event_ms: list[float] = []
    for i, event in enumerate(bodies):
        assert event.vehicle_id is not None
        start = time.perf_counter()
        await store.is_processed(event.vehicle_id, event.event_id)
        applied = time.perf_counter()
        result = await store.apply(event)
        done = time.perf_counter()
        await store.mark_processed(event.vehicle_id, event.event_id)
        if commit_every and i % commit_every == commit_every - 1:
            assert isinstance(store, SqliteVehicleStateStore)
            store.flush()
        end = time.perf_counter()
        assert result.changes, "every benchmark event carries newer readings"
        apply_ms.append((done - applied) * 1000)
        event_ms.append((end - start) * 1000)
    return {"apply": apply_ms, "event": event_ms}


#: Passes of each kind for the decision's share (alternating; medians).
SHARE_PASSES = 3


Decide = Callable[..., QuickPlan | None]


async def host_calls(events: list[Event], decide: Decide) -> tuple[float, VehicleView | None]:
    """CPU µs per event of is_processed, apply (with the app's `on_change` filter),
    mark_processed and a commit every `DEFERRED_COMMIT_EVERY` events, on a new file, with
    `decide` in place of `quick_plan`; and the vehicle as stored at the end."""
    from shared.handlers import registry
    from shared.local import vehicle_state as local

    with (tempfile.TemporaryDirectory(prefix="bench-vs-share-") as tmp,
          mock.patch.object(local, "quick_plan", decide)):
        store = SqliteVehicleStateStore(Path(tmp) / FILE_NAME)
        store.defer_commits()
        try:
            started = time.thread_time_ns()
            for i, event in enumerate(events):
                assert event.vehicle_id is not None
                await store.is_processed(event.vehicle_id, event.event_id)
                await store.apply(event, outbox=registry.change_filter)
                await store.mark_processed(event.vehicle_id, event.event_id)
                if i % DEFERRED_COMMIT_EVERY == DEFERRED_COMMIT_EVERY - 1:
                    store.flush()
            spent = (time.thread_time_ns() - started) / 1000 / len(events)
            store.flush()
            return spent, await store.get_vehicle(str(events[0].vehicle_id))
        finally:
            await store.close()


def decision_share(events: int) -> None:
    from shared.local.command import load_function_app

    load_function_app()  # the app's handlers: the `on_change` filter the host applies
    parsed = [parse_event(state_payload(SIZE, event_id=f"share-{i:06d}")) for i in range(events)]
    plans: dict[str, QuickPlan | None] = {}

    def recording(event_id: str, *args: Any) -> QuickPlan | None:
        plans[event_id] = answer = quick_plan(event_id, *args)
        return answer

    def replaying(event_id: str, *args: Any) -> QuickPlan | None:
        return plans[event_id]

    _, expected = asyncio.run(host_calls(parsed, recording))
    assert len(plans) == len(parsed), "the store decides through `quick_plan`"
    assert all(plan is not None for plan in plans.values()), "every event takes the fast path"
    real: list[float] = []
    replayed: list[float] = []
    for _ in range(SHARE_PASSES):
        for decide, spent_by in ((quick_plan, real), (replaying, replayed)):
            spent, vehicle = asyncio.run(host_calls(parsed, decide))
            assert vehicle == expected, "a replayed pass stores what the real one does"
            spent_by.append(spent)
    whole, rest = median(real), median(replayed)
    emit(NAME, "sqlite_host_calls_cpu_us_per_event", whole, "us")
    emit(NAME, "sqlite_host_calls_cpu_us_per_event_decision_replayed", rest, "us")
    emit(NAME, "decision_share_of_host_calls_cpu", max(0.0, 1 - rest / whole), "ratio")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_azurite(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(AZURITE_TABLE), "--tableHost", "127.0.0.1", "--tablePort", str(port),
             "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError(f"Azurite (table) did not start:\n{log.read_text(errors='replace')}")


def _report(backend: str, figures: dict[str, list[float]]) -> None:
    emit(NAME, f"{backend}_apply_p50_ms", percentile(figures["apply"], 50), "ms")
    emit(NAME, f"{backend}_apply_p99_ms", percentile(figures["apply"], 99), "ms")
    emit(NAME, f"{backend}_event_p50_ms", percentile(figures["event"], 50), "ms")
    emit(NAME, f"{backend}_event_p99_ms", percentile(figures["event"], 99), "ms")


def run(*, quick: bool) -> None:
    events = 100 if quick else 1000
    # Azurite answers in tens of milliseconds: fewer events keep the run to a minute or two.
    table_events = 50 if quick else 300
    emit(NAME, "events", events, "count")
    emit(NAME, "table_azurite_events", table_events, "count")
    with tempfile.TemporaryDirectory(prefix="bench-vs-") as tmp:
        async def sqlite() -> dict[str, list[float]]:
            store = SqliteVehicleStateStore(Path(tmp) / FILE_NAME)
            try:
                return await measure(store, events)
            finally:
                await store.close()

        figures = asyncio.run(sqlite())
        note(f"{NAME}: sqlite apply p50 {percentile(figures['apply'], 50):.3f} ms")
        _report("sqlite", figures)
        emit(NAME, "sqlite_event_mean_ms", sum(figures["event"]) / len(figures["event"]), "ms")

        async def deferred() -> dict[str, list[float]]:
            store = SqliteVehicleStateStore(Path(tmp) / f"deferred-{FILE_NAME}")
            store.defer_commits()
            try:
                return await measure(store, events, commit_every=DEFERRED_COMMIT_EVERY)
            finally:
                await store.close()

        figures = asyncio.run(deferred())
        emit(NAME, "sqlite_deferred_event_mean_ms", sum(figures["event"]) / len(figures["event"]),
             "ms")
        emit(NAME, "sqlite_deferred_event_p99_ms", percentile(figures["event"], 99), "ms")
        decision_share(events)

        if not os.access(AZURITE_TABLE, os.X_OK):
            note(f"{NAME}: {AZURITE_TABLE} missing (run `npm ci`); no Table figures")
            return
        process, port = _start_azurite(Path(tmp) / "azurite.log")
        try:
            figures = asyncio.run(_table(port, table_events))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        note(f"{NAME}: table apply p50 {percentile(figures['apply'], 50):.3f} ms")
        _report("table_azurite", figures)


async def _table(port: int, events: int) -> dict[str, Any]:
    from azure.data.tables.aio import TableClient

    from shared.vehicle_state.table_store import TableVehicleStateStore

    connection = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                  f"TableEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
    store = TableVehicleStateStore(TableClient.from_connection_string(connection, "bench"),
                                   create_table=True)
    try:
        await measure(store, 5)  # the table's creation and the client's first connection
        return await measure(store, events)
    finally:
        await store.close()
