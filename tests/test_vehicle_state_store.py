"""The vehicle state store's behaviour, the same tests on both backends: SQLite (local) and
Azure Table Storage on Azurite, through the real azure-data-tables async client.

Plus what only one backend has: Table's limits (transactions of 100, 64 KiB properties, keys
without / \\ # ?), 8+ concurrent writers to one vehicle on Azurite (real ETag conflicts,
retried; the result equals the sequential one), a crash between two transactions of one
event on Azurite, and the SQLite file's permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import stat
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from azure.data.tables.aio import TableClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import telemetry_names as names
from shared.events import Event, parse_event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local import vehicle_state as store_module
from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore
from shared.processor import run_handlers
from shared.settings import load_settings
from shared.vehicle_state import (
    INBOX_RETENTION_SECONDS,
    ChangeFilter,
    StoreConflictError,
    VehicleStateStore,
    VehicleView,
    table_store,
)
from shared.vehicle_state.factory import open_store
from shared.vehicle_state.rules import (
    MAX_CODE_CHARS,
    MAX_ERROR_SIGNALS,
    MAX_ID_CHARS,
    MAX_VALUE_CHARS,
    MAX_VALUE_DEPTH,
    NO_CODE,
    NOT_UNICODE,
    TOO_LARGE,
    UNDATED,
    plan,
)
from shared.vehicle_state.table_store import TableVehicleStateStore

from .azurite import azurite_table_port, connection_string
from .otel_capture import captured
from .table_limits import Limited, size_of
from .test_vehicle_state_rules import event_sets, orders
from .test_vehicle_state_rules import run as run_in_memory
from .vehicle_events import (
    SOC,
    T0,
    VEHICLE,
    error,
    error_event,
    signal,
    state_body,
    state_event,
)

__all__ = ["azurite_table_port"]  # the fixture, used by name

T = TypeVar("T")
DAY = 86400.0
#: The local store's first layout (one row per signal), as files written by it hold it.
OLD_LAYOUT = """
CREATE TABLE vehicles (vehicle_id TEXT PRIMARY KEY, updated_at TEXT, updated_epoch REAL,
    signal_count INTEGER NOT NULL DEFAULT 0, open_errors INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX vehicles_by_update ON vehicles (updated_epoch);
CREATE TABLE signals (vehicle_id TEXT NOT NULL, code TEXT NOT NULL, row TEXT NOT NULL,
    PRIMARY KEY (vehicle_id, code)) WITHOUT ROWID;
CREATE TABLE errors (vehicle_id TEXT NOT NULL, type TEXT NOT NULL, code TEXT NOT NULL,
    state TEXT NOT NULL, row TEXT NOT NULL, PRIMARY KEY (vehicle_id, type, code)) WITHOUT ROWID;
CREATE TABLE events (vehicle_id TEXT NOT NULL, event_id TEXT NOT NULL,
    errors_applied INTEGER NOT NULL DEFAULT 0, pending TEXT, processed_at REAL,
    PRIMARY KEY (vehicle_id, event_id));
CREATE INDEX events_by_processed ON events (processed_at);
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    where: str  # a file path (sqlite) or a connection string (table)
    table: str = "vehiclestate"
    clock: Clock | None = None

    def open(self) -> VehicleStateStore:
        clock = self.clock or Clock()
        if self.name == "sqlite":
            return SqliteVehicleStateStore(Path(self.where), clock=clock)
        # Azurite does not refuse an entity over 1 MiB or a transaction over 4 MiB: Limited
        # does, as Azure would.
        client = Limited(TableClient.from_connection_string(self.where, self.table))
        return TableVehicleStateStore(client, create_table=True, clock=clock)

    def stored_event_ids(self) -> set[str]:
        """The eventIds the inbox holds (those recorded as processed), read from the storage
        itself."""
        if self.name == "sqlite":
            with sqlite3.connect(self.where) as db:
                return {row[0] for row in db.execute(
                    "SELECT event_id FROM events WHERE processed_at IS NOT NULL")}

        async def rows() -> set[str]:
            async with TableClient.from_connection_string(self.where, self.table) as client:
                return {str(entity["eventId"]) async for entity in client.list_entities()
                        if str(entity["RowKey"]).startswith("i:")
                        and entity.get("processedAt") is not None}

        return asyncio.run(rows())

    def run(self, scenario: Callable[[VehicleStateStore], Awaitable[T]]) -> T:
        async def main() -> T:
            store = self.open()
            try:
                return await scenario(store)
            finally:
                await store.close()

        return asyncio.run(main())


@pytest.fixture(params=["sqlite", "table"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / FILE_NAME), clock=Clock())
    port = request.getfixturevalue("azurite_table_port")
    return Backend("table", connection_string("table", port),
                   table=f"vs{uuid.uuid4().hex[:16]}", clock=Clock())


def sqlite_at(path: Path) -> Backend:
    return Backend("sqlite", str(path))


def keep_every_change(code: str, path: str | None) -> bool:
    """An outbox that keeps every accepted change pending."""
    return True


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def shown(store: VehicleStateStore, vehicle: str) -> VehicleView:
    """The vehicle as the store shows it (it must have been seen)."""
    view = await store.get_vehicle(vehicle)
    assert view is not None, f"vehicle {vehicle} not found"
    return view


async def apply_all(store: VehicleStateStore, *events: Event) -> list[Any]:
    return [await store.apply(event) for event in events]


# ---------------------------------------------------------------------------------------------
class TestSignals:
    def test_a_newer_reading_replaces_an_older_one_and_an_older_one_is_stale(
        self, backend: Backend
    ) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            first, older, newer = await apply_all(
                store,
                state_event("e1", signal(value=50, oem=T0 + 1000)),
                state_event("e2", signal(value=40, oem=T0)),
                state_event("e3", signal(value=30, oem=T0 + 2000)),
            )
            return first, older, newer, await store.get_vehicle(VEHICLE)

        first, older, newer, view = backend.run(scenario)
        assert [c.code for c in first.changes] == [SOC] and first.changes[0].previous is None
        assert older.changes == () and older.stale == (SOC,)
        (change,) = newer.changes
        assert change.previous is not None and change.previous.value == 50
        assert change.current.value == 30 and change.path == "TractionBattery.StateOfCharge"
        stored = view.signals[SOC]
        assert (stored.value, stored.unit, stored.oem_updated_at, stored.event_id) == (
            30, "percent", at(T0 + 2000), "e3")
        assert view.to_json()["signals"][SOC]["oemUpdatedAt"] == at(T0 + 2000).isoformat()

    def test_the_vehicles_updated_at_never_goes_back_whichever_path_decides(
        self, backend: Backend
    ) -> None:
        """An older delivery that still changes something (a signal never seen, here one
        that carried an error, which the rules decide and not the fast path) leaves the
        vehicle's updatedAt at the newest reading stored."""
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("e1", signal(value=50, oem=T0 + 5000)))
            older = await store.apply(state_event(
                "e2", signal(value=40, oem=T0),
                signal("odometer-traveleddistance", oem=T0, error=("UPSTREAM", "RATE_LIMIT"))))
            # And one the fast path decides: a plain reading of a signal never seen.
            quick = await store.apply(state_event("e3", signal("charge-ischarging", True,
                                                             oem=T0 + 1)))
            return older, quick, await store.get_vehicle(VEHICLE)

        older, quick, view = backend.run(scenario)
        assert older.changes.codes == ("odometer-traveleddistance",)
        assert quick.changes.codes == ("charge-ischarging",)
        assert view is not None and view.updated_at == at(T0 + 5000)

    def test_applying_an_event_twice_changes_nothing(self, backend: Backend) -> None:
        event = state_event("e1", signal(value=50), signal("charge-ischarging", True))

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(event)
            before = await store.get_vehicle(VEHICLE)
            again = await store.apply(event)
            return before, again, await store.get_vehicle(VEHICLE)

        before, again, after = backend.run(scenario)
        assert again.changes == () and sorted(again.stale) == ["charge-ischarging", SOC]
        assert before == after

    def test_a_tie_on_oem_updated_at_goes_to_the_later_retrieval_then_the_greater_event_id(
        self, backend: Backend
    ) -> None:
        def a(v: str) -> Event:
            return state_event("a", signal(value=1, oem=T0, retrieved=T0 + 9000), vehicle=v)

        def b(v: str) -> Event:
            return state_event("b", signal(value=2, oem=T0, retrieved=T0 + 5000), vehicle=v)

        def c(v: str) -> Event:
            return state_event("c", signal(value=3, oem=T0, retrieved=T0 + 5000), vehicle=v)

        async def scenario(store: VehicleStateStore) -> Any:
            await apply_all(store, c("v1"), b("v1"), a("v1"))
            await apply_all(store, a("v2"), b("v2"), c("v2"))
            await apply_all(store, b("v3"), c("v3"))
            await apply_all(store, c("v4"), b("v4"))
            return [(await shown(store, v)).signals[SOC].value
                    for v in ("v1", "v2", "v3", "v4")]

        assert backend.run(scenario) == [1, 1, 3, 3]

    def test_the_stored_reading_fetched_again_is_kept_but_is_no_change(
        self, backend: Backend
    ) -> None:
        # Smartcar sends every subscribed signal on each delivery: a signal the car has not
        # updated comes again with its oemUpdatedAt and value and a later retrievedAt.
        first = state_event("e1", signal(value=50, oem=T0, retrieved=T0 + 1000),
                            signal("charge-ischarging", True, oem=T0, retrieved=T0 + 1000))
        again = state_event("e2", signal(value=50, oem=T0, retrieved=T0 + 61_000),
                            signal("charge-ischarging", False, oem=T0, retrieved=T0 + 61_000))

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(first)
            applied = await store.apply(again, outbox=keep_every_change)
            return (applied, await store.pending_changes(VEHICLE, "e2"),
                    await shown(store, VEHICLE))

        applied, pending, view = backend.run(scenario)
        assert applied.refreshed == (SOC,) and applied.stale == ()
        # The same oemUpdatedAt with another value is a change: only the value tells.
        assert [c.code for c in applied.changes] == ["charge-ischarging"]
        assert [c.code for c in pending] == ["charge-ischarging"]
        stored = view.signals[SOC]
        assert (stored.value, stored.retrieved_at, stored.event_id) == (50, at(T0 + 61_000), "e2")
        assert applied.to_json()["refreshed"] == [SOC]

    def test_a_failed_signal_sent_again_by_every_delivery_is_no_change(
        self, backend: Backend
    ) -> None:
        # No meta at all, as Smartcar sends a failed signal: the greater eventId ranks higher,
        # yet nothing changed.
        def failed(event_id: str) -> Event:
            return state_event(event_id, signal("location-isathome", oem=None,
                                                error=("COMPATIBILITY", "NOT_CAPABLE")))

        async def scenario(store: VehicleStateStore) -> Any:
            first = await store.apply(failed("00000000-0001"))
            later = await store.apply(failed("ffffffff-0002"))
            lower = await store.apply(failed("11111111-0003"))
            return first, later, lower, await shown(store, VEHICLE)

        first, later, lower, view = backend.run(scenario)
        assert [c.code for c in first.changes] == ["location-isathome"]
        assert (later.changes, later.refreshed) == ((), ("location-isathome",))
        assert (lower.changes, lower.stale) == ((), ("location-isathome",))
        assert view.signals["location-isathome"].event_id == "ffffffff-0002"

    def test_a_reading_without_oem_updated_at_is_kept_until_any_dated_one_arrives(
        self, backend: Backend
    ) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            undated = await store.apply(state_event("u1", signal(value=5, oem=None)))
            first = (await shown(store, VEHICLE)).signals[SOC].value
            await store.apply(state_event("d1", signal(value=6, oem=T0 - 10**9)))
            late_undated = await store.apply(state_event("u2", signal(value=7, oem=None)))
            return undated, first, late_undated, (await store.get_vehicle(VEHICLE))

        undated, first, late_undated, view = backend.run(scenario)
        assert first == 5 and [s.reason for s in undated.skipped] == [UNDATED]
        assert late_undated.changes == () and view.signals[SOC].value == 6

    @pytest.mark.parametrize("oem", [0, T0 + 2 * 86_400_000], ids=["1970", "a-day-after-fetch"])
    def test_an_unusable_oem_updated_at_counts_as_none(self, backend: Backend, oem: int) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("d", signal(value=1, oem=T0 - 1000)))
            bogus = await store.apply(state_event("x", signal(value=99, oem=oem, retrieved=T0)))
            return bogus, await store.get_vehicle(VEHICLE)

        bogus, view = backend.run(scenario)
        assert bogus.changes == () and [s.reason for s in bogus.skipped] == [UNDATED]
        assert view.signals[SOC].value == 1

    def test_a_failed_signal_is_kept_with_its_error(self, backend: Backend) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event(
                "e", signal("location-isathome", error=("COMPATIBILITY", "VEHICLE_NOT_CAPABLE"),
                            oem=None)))
            return await store.get_vehicle(VEHICLE)

        stored = backend.run(scenario).to_json()["signals"]["location-isathome"]
        assert stored["status"] == "error" and stored["value"] is None
        assert stored["error"] == {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}


class TestBadInput:
    def test_a_value_larger_than_table_allows_is_skipped_and_the_rest_stored(
        self, backend: Backend
    ) -> None:
        huge = "x" * (MAX_VALUE_CHARS + 1)
        event = state_event("e", signal("big-one", huge), signal(value=42))

        async def scenario(store: VehicleStateStore) -> Any:
            return await store.apply(event), await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert [(s.code, s.reason) for s in result.skipped] == [("big-one", TOO_LARGE)]
        assert set(view.signals) == {SOC} and view.signals[SOC].value == 42

    def test_a_value_nested_deeper_than_the_store_keeps_is_skipped(
        self, backend: Backend
    ) -> None:
        """Arrays and objects nested MAX_VALUE_DEPTH levels are stored; one more, or some
        thousands (7 KB of JSON: orjson corrupted its heap on the frozen tuples, and the
        process aborted), is skipped as `too-large`, before anything serialises it, and the
        rest of the event is stored."""
        def nested(levels: int) -> str:  # arrays and objects in turn, around a number
            text = "1"
            for level in range(levels):
                text = f"[{text}]" if level % 2 else f'{{"k":{text}}}'
            return text

        body = json.dumps(state_body(
            "e", signal("custom-at", "AT"), signal("custom-over", "OVER"),
            signal("custom-deep", "DEEP"), signal(value=42)))
        for name, levels in (("AT", MAX_VALUE_DEPTH), ("OVER", MAX_VALUE_DEPTH + 1),
                             ("DEEP", 3000)):
            body = body.replace(f'"{name}"', nested(levels))
        event = parse_event(body)

        async def scenario(store: VehicleStateStore) -> Any:
            return await store.apply(event), await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert [(s.code, s.reason) for s in result.skipped] == [
            ("custom-over", TOO_LARGE), ("custom-deep", TOO_LARGE)]
        assert sorted(view.signals) == ["custom-at", SOC]
        assert json.dumps(view.signals["custom-at"].value,
                          separators=(",", ":")) == nested(MAX_VALUE_DEPTH)

    def test_a_value_just_within_the_bound_is_stored_whole(self, backend: Backend) -> None:
        value = "y" * (MAX_VALUE_CHARS - 2)  # its JSON has two quotes

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("e", signal("big-one", value)))
            return await store.get_vehicle(VEHICLE)

        assert backend.run(scenario).signals["big-one"].value == value

    def test_integers_past_64_bits_come_back_exact(self, backend: Backend) -> None:
        """orjson would read 2**70 back as a float (1.1805916207174113e+21), and so any integer
        outside 64 bits, the first of them with 19 digits (-2**63 - 1): such text is read by
        the standard library, and a value comes back as it was sent."""
        values = {"odometer-big": 2**70, "custom-negative": -(2**63) - 1, "custom-nested": {
            "reading": 10**25 + 1, "unit": "mm"}}

        async def scenario(store: VehicleStateStore) -> dict[str, Any]:
            stored = {}
            for code, value in values.items():  # each alone in its vehicle's stored text
                await store.apply(state_event("e", signal(code, value), vehicle=code))
                stored[code] = (await shown(store, code)).signals[code].value
            return stored

        stored = backend.run(scenario)
        assert stored == values
        assert type(stored["odometer-big"]) is type(stored["custom-negative"]) is int

    def test_text_that_is_not_unicode_is_skipped_and_the_rest_stored(
        self, backend: Backend
    ) -> None:
        """JSON's `\\u` escapes can spell a lone surrogate, which the events' decoder keeps
        and neither SQLite nor Table (UTF-8, UTF-16 on the wire) can hold: wherever a signal
        holds one, it is skipped as `not-unicode`, and the event's other signals are stored.
        Before this rule such an event failed on every delivery."""
        lone = "\ud800"
        event = state_event(
            "e", signal("custom-text", f"a{lone}b"), signal("custom-key", {f"k{lone}": 1}),
            signal(f"custom-{lone}code", 1), signal("custom-unit", 1, unit=lone),
            signal("custom-path", 1, group=f"G{lone}", name="N"),
            signal("custom-failed", error=("AUTH", f"X{lone}")),
            signal("custom-failed-type", error=(f"A{lone}", "X")),
            signal("custom-fine", "caf\u00e9 \U0001f697"), signal(value=42))

        async def scenario(store: VehicleStateStore) -> Any:
            return await store.apply(event), await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert [(s.code, s.reason) for s in result.skipped] == [
            (code, NOT_UNICODE) for code in ("custom-text", "custom-key", "custom-\ufffdcode",
                                             "custom-unit", "custom-path", "custom-failed",
                                             "custom-failed-type")]
        assert {code: s.value for code, s in view.signals.items()} == {
            "custom-fine": "caf\u00e9 \U0001f697", SOC: 42}

    def test_an_error_entry_that_is_not_unicode_is_skipped_and_the_rest_applied(
        self, backend: Backend
    ) -> None:
        lone = "\udfff"
        event = error_event(
            "e", error("A", description=f"broken {lone}"), error("B", code=f"C{lone}"),
            error("D", signals=(f"s{lone}",)), error("E", description="fine \u00e9"),
            error(f"F{lone}", "F1"), {**error("G", "G1"), "resolution": {"type": lone}},
            {**error("H", "H1"), "signals": [{"group": f"G{lone}", "name": "N"}]})

        async def scenario(store: VehicleStateStore) -> Any:
            return await store.apply(event), await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert [(s.code, s.reason) for s in result.skipped] == [
            ("VEHICLE_NOT_CAPABLE", NOT_UNICODE), ("C\ufffd", NOT_UNICODE),
            ("VEHICLE_NOT_CAPABLE", NOT_UNICODE), ("F1", NOT_UNICODE), ("G1", NOT_UNICODE),
            ("H1", NOT_UNICODE)]
        assert [(e.type, e.description) for e in view.errors] == [("E", "fine \u00e9")]

    def test_text_longer_than_the_store_keeps_is_skipped_and_the_rest_stored(
        self, backend: Backend
    ) -> None:
        """A unit, group or name, or a failed signal's error type or code, past
        MAX_CODE_CHARS is skipped as `too-large` on both backends: a unit of 33,000
        characters alone is more than one Table property holds (64 KiB of UTF-16), and SQLite
        keeps what Table keeps. At the bound they are stored."""
        over, at = "u" * (MAX_CODE_CHARS + 1), "u" * MAX_CODE_CHARS
        event = state_event(
            "e", signal("custom-unit", 1, unit="u" * 33_000),
            signal("custom-unit-over", 1, unit=over), signal("custom-unit-at", 1, unit=at),
            signal("custom-group", 1, group=over, name="N"),
            signal("custom-name", 1, group="G", name=over),
            signal("custom-path-at", 1, group=at, name=at),
            signal("custom-failed-type", error=(over, "X")),
            signal("custom-failed-code", error=("AUTH", over)),
            signal("custom-failed-at", error=(at, at)), signal(value=42))

        async def scenario(store: VehicleStateStore) -> Any:
            return await store.apply(event), await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert [(s.code, s.reason) for s in result.skipped] == [
            (code, TOO_LARGE) for code in ("custom-unit", "custom-unit-over", "custom-group",
                                           "custom-name", "custom-failed-type",
                                           "custom-failed-code")]
        assert sorted(view.signals) == ["custom-failed-at", "custom-path-at", "custom-unit-at",
                                        SOC]
        assert view.signals["custom-unit-at"].unit == at
        assert view.signals["custom-path-at"].path == f"{at}.{at}"
        assert (view.signals["custom-failed-at"].error_type,
                view.signals["custom-failed-at"].error_code) == (at, at)

    def test_an_older_reading_the_store_cannot_keep_is_skipped_not_stale(
        self, backend: Backend
    ) -> None:
        """The same report on both backends (SQLite's fast path decides most events): a
        reading older than the stored one that is also too large is reported as skipped, as
        the rules do, not as stale."""
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("new", signal("custom-text", "fits", oem=T0 + 1000)))
            return await store.apply(state_event(
                "old", signal("custom-text", "x" * (MAX_VALUE_CHARS + 1), oem=T0),
                signal("custom-unit", 1, unit="u" * (MAX_CODE_CHARS + 1), oem=T0)))

        result = backend.run(scenario)
        assert [(s.code, s.reason) for s in result.skipped] == [
            ("custom-text", TOO_LARGE), ("custom-unit", TOO_LARGE)]
        assert result.stale == ()

    def test_large_changes_kept_for_handlers_fit_table_s_entities(
        self, backend: Backend
    ) -> None:
        """Changes kept for on_change handlers are written as ASCII JSON, where a character
        outside the BMP takes 12 characters: six values of 7,499 such characters (each
        within MAX_VALUE_CHARS as UTF-8) make more than one 1 MiB entity of pending changes,
        and a second event carries the previous values too. Both are stored, in several
        transactions on Table, and every change is kept whole."""
        car = "\U0001f697"
        codes = [f"custom-big{i}" for i in range(6)]

        def event(event_id: str, oem: int, mark: str) -> Event:
            return state_event(event_id, *(
                signal(code, mark + car * 7_498, oem=oem) for code in codes))

        async def scenario(store: VehicleStateStore) -> Any:
            first = await store.apply(event("e1", T0, "a"))
            second = await store.apply(event("e2", T0 + 1000, "b"))
            return first, second, await store.pending_changes(VEHICLE, "e2")

        first, second, pending = backend.run(scenario)
        assert [c.code for c in first.pending] == codes
        assert [(c.code, c.previous.value if c.previous else None, c.current.value)
                for c in second.pending] == [
            (code, "a" + car * 7_498, "b" + car * 7_498) for code in codes]
        assert pending == second.pending

    def test_500_signals_in_one_event_are_all_stored(self, backend: Backend) -> None:
        signals = [signal(f"custom-s{i:03d}", i, oem=T0 + i) for i in range(500)]

        async def scenario(store: VehicleStateStore) -> Any:
            result = await store.apply(state_event("many", *signals))
            return result, await store.get_vehicle(VEHICLE), await store.list_vehicles()

        result, view, listed = backend.run(scenario)
        assert len(result.changes) == 500 and len(result.pending) == 500
        assert len(view.signals) == 500 and view.signals["custom-s499"].value == 499
        assert listed[0].signal_count == 500

    def test_an_unknown_code_is_stored_and_one_without_any_code_is_skipped(
        self, backend: Backend
    ) -> None:
        nameless = {"body": {"value": 1}, "meta": {"oemUpdatedAt": T0}}

        async def scenario(store: VehicleStateStore) -> Any:
            result = await store.apply(state_event(
                "e", signal("futuregroup-newsignal", "v"), nameless))
            return result, await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert view.signals["futuregroup-newsignal"].value == "v"
        assert [(s.code, s.reason) for s in result.skipped] == [(None, NO_CODE)]

    @pytest.mark.parametrize("vehicle", ["a/b#c?d\\e", "v\u00e9hicule:1", "x" * 300,
                                         "\u00e9" * MAX_ID_CHARS])
    def test_a_vehicle_id_with_characters_table_keys_refuse_is_stored_and_read(
        self, backend: Backend, vehicle: str
    ) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("e", signal(value=3), vehicle=vehicle))
            await store.apply(state_event("e", signal(value=4), vehicle=vehicle + "#2"))
            return (await store.get_vehicle(vehicle), await store.get_vehicle("a"),
                    await store.list_vehicles())

        view, other, listed = backend.run(scenario)
        assert view is not None and view.vehicle_id == vehicle and view.signals[SOC].value == 3
        assert other is None
        assert {s.vehicle_id for s in listed} == {vehicle, vehicle + "#2"}


    def test_an_event_id_at_the_bound_is_stored_and_recorded(self, backend: Backend) -> None:
        event_id = "\u00e9" * MAX_ID_CHARS  # escaped in Table keys: hashed

        async def scenario(store: VehicleStateStore) -> Any:
            result = await store.apply(state_event(event_id, signal(value=5)))
            await store.mark_processed(VEHICLE, event_id)
            return (result, await store.is_processed(VEHICLE, event_id),
                    await store.get_vehicle(VEHICLE))

        result, processed, view = backend.run(scenario)
        assert result.changes.codes == (SOC,) and processed
        assert view.signals[SOC].event_id == event_id

    def test_times_at_the_ends_of_the_calendar_are_stored(self, backend: Backend) -> None:
        """Timestamps the parser accepts, up to the last hour of year 9999: the rules compare
        them without making a datetime past the calendar's end (a day after the retrievedAt
        or deliveredAt), which raised OverflowError on every delivery."""
        last_hour = 253_402_297_200_000  # 9999-12-31T23:00:00Z

        async def scenario(store: VehicleStateStore) -> Any:
            first = await store.apply(state_event("e1", signal(retrieved=last_hour)))
            late = await store.apply(state_event(
                "e2", signal("custom-late", 1, oem=T0 + 1), delivered=last_hour))
            iso = await store.apply(state_event("e3", {
                **signal("custom-iso", 2),
                "meta": {"oemUpdatedAt": T0, "retrievedAt": "9999-12-31T23:00:00Z"}}))
            return first, late, iso, await store.get_vehicle(VEHICLE)

        first, late, iso, view = backend.run(scenario)
        assert (first.changes.codes, late.changes.codes, iso.changes.codes) == (
            (SOC,), ("custom-late",), ("custom-iso",))
        assert view.signals[SOC].retrieved_at == datetime(9999, 12, 31, 23, tzinfo=UTC)
        assert all(s.oem_updated_at is not None for s in view.signals.values())


class TestErrors:
    def test_an_error_event_applied_again_reports_its_errors_as_they_stand(
        self, backend: Backend
    ) -> None:
        """Applied again before its handlers completed (a retry, a replay): nothing changes,
        and the result names the errors it opened, and the one it resolved, as the first
        apply did; not one that another event resolved."""
        async def scenario(store: VehicleStateStore) -> Any:
            # An entry the store skips, keyed like an error another event opened: not its.
            await store.apply(error_event("x0", error("F", "G"), delivered=T0 - 1000))
            opening = error_event("x1", error(), error("B", "C"), error("D", "E"),
                                  error("F", "G", state="CLEARED"))
            first = await store.apply(opening)
            again = await store.apply(opening)
            closing = error_event("x2", error(state="RESOLVED"), delivered=T0 + 600_000)
            closed = await store.apply(closing)
            other = await store.apply(error_event("x3", error("B", "C", state="RESOLVED"),
                                                  delivered=T0 + 600_000))
            later, closed_again = await store.apply(opening), await store.apply(closing)
            # An older reading after them: the vehicle's updatedAt stays the errors' time.
            await store.apply(state_event("s1", signal(oem=T0)))
            return (first, again, later, closed, closed_again, other,
                    await shown(store, VEHICLE))

        first, again, later, closed, closed_again, _, view = backend.run(scenario)
        names = [(e.type, e.code) for e in first.errors_opened]
        assert names == [("COMPATIBILITY", "VEHICLE_NOT_CAPABLE"), ("B", "C"), ("D", "E")]
        assert again.errors_opened == first.errors_opened and again.errors_resolved == ()
        # After x2 and x3 closed two of them: x1 again reports the one still open only.
        assert [(e.type, e.code) for e in later.errors_opened] == [("D", "E")]
        assert later.errors_resolved == ()
        assert closed_again.errors_resolved == closed.errors_resolved
        assert [e.code for e in closed.errors_resolved] == ["VEHICLE_NOT_CAPABLE"]
        assert [(e.code, e.count) for e in view.errors] == [("E", 1), ("G", 1)]
        assert view.updated_at == at(T0 + 600_000)  # applying again leaves it

    def test_an_error_s_affected_signals_fit_one_table_property(
        self, backend: Backend
    ) -> None:
        """100 affected signals of 200 characters are 20,000 characters, but escaped in the
        stored JSON list a quote takes two and a character outside the BMP two UTF-16 units:
        the list keeps the first entries that fit MAX_VALUE_CHARS UTF-16 units, on both
        backends, rather than failing the event on Table."""
        quotes = tuple(f'{i:03d}' + '"' * (MAX_CODE_CHARS - 3) for i in range(MAX_ERROR_SIGNALS))
        cars = tuple("\U0001f697" * MAX_CODE_CHARS for _ in range(MAX_ERROR_SIGNALS))

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", error("A", signals=quotes),
                                          error("B", signals=cars)))
            return await store.get_vehicle(VEHICLE)

        view = backend.run(scenario)
        stored = {e.type: e.signals for e in view.errors}
        for kind, sent in (("A", quotes), ("B", cars)):
            kept = stored[kind]
            assert kept == sent[:len(kept)]
            text = json.dumps(list(kept), separators=(",", ":"), ensure_ascii=False)
            assert len(text.encode("utf-16-le")) // 2 <= MAX_VALUE_CHARS
            longer = json.dumps(list(sent[:len(kept) + 1]), separators=(",", ":"),
                                ensure_ascii=False)
            assert len(longer.encode("utf-16-le")) // 2 > MAX_VALUE_CHARS
        assert (len(stored["A"]), len(stored["B"])) == (74, 74)

    def test_a_long_resolution_type_is_cut(self, backend: Backend) -> None:
        entry = {**error(), "resolution": {"type": "R" * 40_000}}

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", entry))
            return await store.get_vehicle(VEHICLE)

        [stored] = backend.run(scenario).errors
        assert stored.resolution_type == "R" * MAX_CODE_CHARS

    @pytest.mark.parametrize("first", ["empty", "none"])
    def test_an_empty_code_and_none_are_one_error_stored_as_none(
        self, backend: Backend, first: str
    ) -> None:
        entries = {"empty": error("T", ""), "none": error("T", None)}
        later = "none" if first == "empty" else "empty"

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", entries[first], delivered=T0))
            await store.apply(error_event("x2", entries[later], delivered=T0 + 1000))
            return await store.get_vehicle(VEHICLE)

        [stored] = backend.run(scenario).errors
        assert (stored.code, stored.count) == (None, 2)

    def test_errors_at_the_start_of_the_calendar_resolve(self, backend: Backend) -> None:
        """A deliveredAt in year 1 (the parser accepts it): the 3-minute allowance is
        compared as a difference, never as a datetime before year 1."""
        year_one = -62_135_596_800_000  # 0001-01-01T00:00:00Z

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", error(), delivered=year_one + 60_000))
            resolved = await store.apply(error_event("x2", error(state="RESOLVED"),
                                                     delivered=year_one))
            return resolved, await store.get_vehicle(VEHICLE)

        resolved, view = backend.run(scenario)
        assert [e.state for e in resolved.errors_resolved] == ["RESOLVED"]
        assert view.errors == []

    def test_an_error_opens_counts_and_is_resolved_by_a_later_resolved(
        self, backend: Backend
    ) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            opened = await store.apply(error_event("x1", error(), delivered=T0))
            await store.apply(error_event("x2", error(description="again"), delivered=T0 + 1000))
            view_open = await store.get_vehicle(VEHICLE)
            resolved = await store.apply(error_event(
                "x3", error(state="RESOLVED"), delivered=T0 + 600_000))
            return opened, view_open, resolved, await store.get_vehicle(VEHICLE)

        opened, view_open, resolved, view = backend.run(scenario)
        assert [e.state for e in opened.errors_opened] == ["OPEN"]
        (open_error,) = view_open.errors
        assert (open_error.type, open_error.code, open_error.count) == (
            "COMPATIBILITY", "VEHICLE_NOT_CAPABLE", 2)
        assert (open_error.first_seen, open_error.last_seen) == (at(T0), at(T0 + 1000))
        assert open_error.description == "again" and open_error.resolution_type == (
            "CONTACT_SUPPORT")
        assert open_error.signals == (SOC,)
        assert [e.state for e in resolved.errors_resolved] == ["RESOLVED"]
        assert view.errors == []

    def test_a_resolved_older_than_the_error_does_not_close_it(self, backend: Backend) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", error(), delivered=T0 + 600_000))
            late = await store.apply(error_event("r1", error(state="RESOLVED"), delivered=T0))
            return late, await store.get_vehicle(VEHICLE)

        late, view = backend.run(scenario)
        assert late.errors_resolved == () and [e.state for e in view.errors] == ["OPEN"]

    def test_a_duplicate_error_event_counts_once_and_a_repeated_entry_too(
        self, backend: Backend
    ) -> None:
        event = error_event("x1", error(), error())

        async def scenario(store: VehicleStateStore) -> Any:
            await apply_all(store, event, event)
            return await store.get_vehicle(VEHICLE), await store.list_vehicles()

        view, listed = backend.run(scenario)
        assert [e.count for e in view.errors] == [1]
        assert listed[0].open_errors == 1

    def test_errors_of_two_types_with_one_code_are_two_errors(self, backend: Backend) -> None:
        """An error is keyed by type and code: the same code under another type is another
        error, and resolving one leaves the other open."""
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", error("COMPATIBILITY", "SHARED_CODE"),
                                          error("PERMISSION", "SHARED_CODE")))
            both = await store.get_vehicle(VEHICLE)
            await store.apply(error_event("x2", error("PERMISSION", "SHARED_CODE",
                                                      state="RESOLVED"), delivered=T0 + 1000))
            return both, await store.get_vehicle(VEHICLE)

        both, after = backend.run(scenario)
        assert sorted((e.type, e.code) for e in both.errors) == [
            ("COMPATIBILITY", "SHARED_CODE"), ("PERMISSION", "SHARED_CODE")]
        assert [(e.type, e.code) for e in after.errors] == [("COMPATIBILITY", "SHARED_CODE")]

    def test_a_state_event_keeps_the_vehicles_count_of_open_errors(
        self, backend: Backend
    ) -> None:
        """The count a state event writes is the one stored: one open error, or none once
        it was resolved."""
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("x1", error(), vehicle="open"))
            await store.apply(error_event("x1", error(), vehicle="closed"))
            await store.apply(error_event("r1", error(state="RESOLVED"), vehicle="closed",
                                          delivered=T0 + 1000))
            for vehicle in ("open", "closed"):
                await store.apply(state_event("e1", signal(value=40), vehicle=vehicle))
            return await store.list_vehicles()

        listed = backend.run(scenario)
        assert sorted((v.vehicle_id, v.open_errors) for v in listed) == [
            ("closed", 0), ("open", 1)]

    def test_a_redelivered_error_event_does_not_count_again_after_another_event_counted(
        self, backend: Backend
    ) -> None:
        """The store remembers that an event's errors were applied: after another event
        counted the same error, a redelivery of the first (its handlers had not completed)
        leaves the count alone."""
        first = error_event("x1", error(), delivered=T0)

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(first)
            await store.apply(error_event("x2", error(), delivered=T0 + 1000))
            await store.apply(first)
            return await store.get_vehicle(VEHICLE)

        view = backend.run(scenario)
        assert [e.count for e in view.errors] == [2]

    def test_errors_with_a_null_code_and_without_a_type(self, backend: Backend) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            result = await store.apply(error_event(
                "x1", error(code=None), {"state": "ERROR", "code": "NOTYPE"}))
            return result, await store.get_vehicle(VEHICLE)

        result, view = backend.run(scenario)
        assert [(e.type, e.code) for e in view.errors] == [("COMPATIBILITY", None)]
        assert [s.reason for s in result.skipped] == ["bad-error"]

    def test_an_event_with_nothing_usable_stores_nothing(self, backend: Backend) -> None:
        """A vehicle is known once an event stored something for it: an event whose every
        error or signal was skipped leaves it unknown (the read route's 404), counted as
        skipped, on both backends alike."""
        async def scenario(store: VehicleStateStore) -> Any:
            results = [
                await store.apply(error_event("x1", {"state": "ERROR", "code": "NOTYPE"})),
                await store.apply(state_event("e1", {"body": {"value": 1}})),
            ]
            return results, await store.get_vehicle(VEHICLE), await store.list_vehicles()

        results, view, listed = backend.run(scenario)
        assert [[s.reason for s in r.skipped] for r in results] == [["bad-error"], [NO_CODE]]
        assert (view, listed) == (None, [])


class TestOutboxAndInbox:
    def test_pending_changes_longer_than_a_table_property_come_back_whole(
        self, backend: Backend
    ) -> None:
        """40 changes of 2,000-character texts (Table keeps them in several properties of
        its outbox row: at most 64 KiB each, counted in UTF-16 units, which a character
        outside the BMP takes two of) are handed back exactly as they were stored."""
        values = {f"custom-long{i:02d}": f"{i:02d}" + ("é" if i % 2 else "😀") * 1998
                  for i in range(40)}
        event = state_event("e1", *(signal(code, value) for code, value in values.items()))

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(event, outbox=keep_every_change)
            return await store.pending_changes(VEHICLE, "e1")

        pending = backend.run(scenario)
        assert {c.code: c.current.value for c in pending} == values

    def test_changes_stay_pending_until_the_event_is_marked_processed(
        self, backend: Backend
    ) -> None:
        event = state_event("e1", signal(value=50))

        async def scenario(store: VehicleStateStore) -> Any:
            applied = await store.apply(event)
            # Another event's changes pending beside them are its own.
            other = await store.apply(state_event("e2", signal("odometer-traveleddistance", 9)))
            assert await store.pending_changes(VEHICLE, "e2") == other.pending
            assert await store.pending_changes(VEHICLE, "never-applied") == ()
            pending = await store.pending_changes(VEHICLE, "e1")
            processed_before = await store.is_processed(VEHICLE, "e1")
            # The delivery crashed here; its redelivery applies again: nothing new, but the
            # stored change is still handed over.
            redelivered = await store.apply(event)
            await store.mark_processed(VEHICLE, "e1")
            return (applied, pending, processed_before, redelivered,
                    await store.pending_changes(VEHICLE, "e1"),
                    await store.is_processed(VEHICLE, "e1"))

        applied, pending, before, redelivered, after, processed = backend.run(scenario)
        assert applied.pending == applied.changes == pending
        assert redelivered.changes == () and redelivered.pending == pending
        assert (before, after, processed) == (False, (), True)

    def test_a_pending_change_keeps_the_reading_it_replaced(self, backend: Backend) -> None:
        # What an on_change handler gets on redelivery after a crash: the same previous value.
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("e1", signal(value=50, oem=T0)))
            await store.mark_processed(VEHICLE, "e1")
            applied = await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
            return applied, await store.pending_changes(VEHICLE, "e2")

        applied, pending = backend.run(scenario)
        assert pending == applied.pending
        [change] = pending
        assert change.previous is not None
        assert (change.previous.value, change.previous.event_id, change.current.value) == (
            50, "e1", 40)

    def test_only_the_changes_the_outbox_selects_stay_pending(self, backend: Backend) -> None:
        event = state_event("e1", signal(value=50), signal("charge-ischarging", True))

        async def scenario(store: VehicleStateStore) -> Any:
            applied = await store.apply(event, outbox=lambda code, path: code == SOC)
            return applied, await store.pending_changes(VEHICLE, "e1")

        applied, pending = backend.run(scenario)
        assert sorted(c.code for c in applied.changes) == ["charge-ischarging", SOC]
        assert [c.code for c in applied.pending] == [SOC] == [c.code for c in pending]

    @pytest.mark.parametrize("names, kept", [
        ({SOC}, [SOC]), ({"TractionBattery.StateOfCharge"}, [SOC]),
        ({"Charge.IsCharging", SOC}, ["charge-ischarging", SOC]), (set(), []),
        ({"charge-voltage"}, ["charge-voltage"])])
    @pytest.mark.parametrize("rules_path", [False, True])
    def test_a_change_filter_keeps_the_changes_of_the_signals_it_names(
        self, backend: Backend, names: set[str], kept: list[str], rules_path: bool
    ) -> None:
        """What the processor passes (`registry.change_filter`), by code or by path, on the
        fast path and (a signal with an error status) on the rules' path."""
        signals = [signal(value=50), signal("charge-ischarging", True, group="Charge", name="IsCharging")]
        if rules_path:
            signals.append(signal("charge-voltage", error=("COMPATIBILITY", "NOT_CAPABLE")))
        event = state_event("e1", *signals)

        async def scenario(store: VehicleStateStore) -> Any:
            applied = await store.apply(event, outbox=ChangeFilter(frozenset(names)))
            return applied, await store.pending_changes(VEHICLE, "e1")

        applied, pending = backend.run(scenario)
        assert len(applied.changes) == len(signals)
        kept = [code for code in kept if rules_path or code != "charge-voltage"]
        assert sorted(c.code for c in applied.pending) == kept
        assert sorted(c.code for c in pending) == kept

    @pytest.mark.parametrize("by", ["code", "path"])
    def test_the_outbox_selects_by_code_or_by_path_on_the_rules_path_too(
        self, backend: Backend, by: str
    ) -> None:
        """A signal with an error status makes the fast path decline the event: the rules
        decide it, and the outbox is asked about each change by its code and its path."""
        event = state_event("e1", signal(value=50), signal("charge-ischarging", True),
                            signal("charge-voltage", error=("COMPATIBILITY", "NOT_CAPABLE")))

        def wanted(code: str, path: str | None) -> bool:
            return code == SOC if by == "code" else path == "TractionBattery.StateOfCharge"

        async def scenario(store: VehicleStateStore) -> Any:
            applied = await store.apply(event, outbox=wanted)
            return applied, await store.pending_changes(VEHICLE, "e1")

        applied, pending = backend.run(scenario)
        assert sorted(c.code for c in applied.changes) == [
            "charge-ischarging", "charge-voltage", SOC]
        assert [(c.code, c.vehicle_id) for c in applied.pending] == [(SOC, VEHICLE)]
        assert [(c.code, c.vehicle_id) for c in pending] == [(SOC, VEHICLE)]

    def test_the_inbox_keeps_an_event_id_at_least_7_days(self, backend: Backend) -> None:
        assert backend.clock is not None
        clock = backend.clock

        async def scenario(store: VehicleStateStore) -> Any:
            await store.mark_processed(VEHICLE, "e1")
            await store.mark_processed(None, "verify-1")
            clock.now += 7 * DAY + 3600
            kept = (await store.is_processed(VEHICLE, "e1"),
                    await store.is_processed(None, "verify-1"),
                    await store.is_processed("other", "e1"))
            clock.now += 2 * DAY
            return kept, await store.is_processed(VEHICLE, "e1")

        kept, much_later = backend.run(scenario)
        assert kept == (True, True, False) and much_later is False

    def test_the_inbox_answers_at_exactly_the_retention_and_not_a_moment_later(
        self, backend: Backend
    ) -> None:
        assert backend.clock is not None
        clock = backend.clock

        async def scenario(store: VehicleStateStore) -> tuple[bool, bool]:
            await store.mark_processed(VEHICLE, "e1")
            clock.now += 8 * DAY
            exactly = await store.is_processed(VEHICLE, "e1")
            clock.now += 0.5
            return exactly, await store.is_processed(VEHICLE, "e1")

        assert backend.run(scenario) == (True, False)

    def test_a_redelivered_error_event_counts_once_after_the_inbox_was_asked(
        self, backend: Backend
    ) -> None:
        """The processor asks the inbox, then applies: a VEHICLE_ERROR applied but not yet
        recorded as processed (a crash before the handlers completed) is redelivered, and
        its error is not counted again."""
        event = error_event("err-1", error())

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(event)
            for _ in range(2):
                assert await store.is_processed(VEHICLE, "err-1") is False
                await store.apply(event)
            return await store.get_vehicle(VEHICLE)

        view = backend.run(scenario)
        assert view is not None
        assert [(e.code, e.count) for e in view.errors] == [("VEHICLE_NOT_CAPABLE", 1)]

    def test_a_prune_deletes_every_vehicles_records_past_the_retention_and_keeps_the_rest(
        self, backend: Backend
    ) -> None:
        """The inbox does not grow without end, not even for vehicles that never send again:
        `prune_inbox` (the daily timer) deletes every record older than the retention (8 days),
        in every vehicle's partition, as stored. Records of 7 days stay, and so do the pending
        changes of an event whose handlers never completed (a dead-lettered one, replayable)."""
        assert backend.clock is not None
        clock = backend.clock

        async def old(store: VehicleStateStore) -> None:
            for vehicle in (VEHICLE, "quiet-1", "quiet-2", None):
                await store.mark_processed(vehicle, f"old-{vehicle}")
            await store.apply(state_event("dead-lettered", signal(value=40)))
            clock.now += 2 * DAY
            await store.mark_processed("quiet-1", "recent")

        async def later(store: VehicleStateStore) -> Any:
            pruned = await store.prune_inbox()
            return pruned, await store.pending_changes(VEHICLE, "dead-lettered")

        backend.run(old)
        clock.now += 7 * DAY  # old-*: 9 days ago, recent: 7 days ago
        pruned, pending = backend.run(later)  # a new instance, as a timer run is
        assert backend.stored_event_ids() == {"recent"}
        assert (pruned.deleted, pruned.failed) == (4, 0)
        assert [c.code for c in pending] == [SOC]


class TestListing:
    def test_the_listing_holds_a_hundred_vehicles_unless_asked_for_more(
        self, backend: Backend
    ) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            for i in range(101):
                await store.apply(state_event(f"e{i}", signal(oem=T0 + i), vehicle=f"v{i:03}"))
            return await store.list_vehicles(), await store.list_vehicles(limit=101)

        default, more = backend.run(scenario)
        assert len(default) == 100 and default[0].vehicle_id == "v100"
        assert len(more) == 101 and more[-1].vehicle_id == "v000"

    def test_a_vehicle_without_signals_or_without_a_reading_time_is_listed(
        self, backend: Backend
    ) -> None:
        """Listed too: a vehicle known only by an error (no signal), and one whose only reading
        has no usable time (no updatedAt: listed after every dated one)."""
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("u", signal(value=5, oem=None), vehicle="undated"))
            await store.apply(error_event("x", error(), vehicle="errors-only"))
            await store.apply(state_event("d", signal(value=6, oem=T0 - 10**6), vehicle="dated"))
            await store.apply(error_event("y", error(), vehicle="errors-first",
                                          delivered=T0 - 2 * 10**6))
            await store.apply(state_event("z", signal(oem=T0 - 3 * 10**6), vehicle="errors-first"))
            return await store.list_vehicles()

        listed = backend.run(scenario)
        assert [(v.vehicle_id, v.signal_count, v.open_errors, v.updated_at) for v in listed] == [
            ("errors-only", 0, 1, at(T0)), ("dated", 1, 0, at(T0 - 10**6)),
            ("errors-first", 1, 1, at(T0 - 2 * 10**6)), ("undated", 1, 0, None)]

    def test_an_event_id_a_state_event_reuses_still_counts_its_errors_once(
        self, backend: Backend
    ) -> None:
        """A sender that reuses an error event's eventId for a state event: the state is
        stored, and a redelivery of the error event still counts nothing again."""
        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(error_event("same", error()))
            await store.apply(state_event("same", signal(value=40)))
            await store.apply(error_event("same", error()))
            # The other way round: the state event first.
            await store.apply(state_event("other", signal(value=30), vehicle="v2"))
            await store.apply(error_event("other", error(), vehicle="v2"))
            return await store.get_vehicle(VEHICLE), await store.get_vehicle("v2")

        view, other = backend.run(scenario)
        assert view is not None and view.signals[SOC].value == 40
        assert [e.count for e in view.errors] == [1]
        assert other is not None and other.signals[SOC].value == 30
        assert [e.count for e in other.errors] == [1]

    def test_an_event_without_a_vehicle_changes_nothing(self, backend: Backend) -> None:
        body = state_body("e1", signal(value=50))
        del body["vehicleId"]
        event = parse_event(json.dumps(body))

        async def scenario(store: VehicleStateStore) -> Any:
            return await store.apply(event), await store.list_vehicles()

        applied, listed = backend.run(scenario)
        assert applied.changes == () and applied.pending == () and listed == []

    def test_vehicles_are_listed_most_recently_updated_first_with_open_errors(
        self, backend: Backend
    ) -> None:
        async def scenario(store: VehicleStateStore) -> Any:
            # "recent" sorts after "old": the order is by time, not by name.
            await store.apply(state_event("a", signal(oem=T0), vehicle="old"))
            await store.apply(state_event("b", signal(oem=T0 + 5000), vehicle="recent"))
            await store.apply(error_event("c", error(), vehicle="old", delivered=T0 + 1000))
            return await store.list_vehicles(), await store.list_vehicles(limit=1)

        listed, first = backend.run(scenario)
        assert [(s.vehicle_id, s.open_errors, s.signal_count) for s in listed] == [
            ("recent", 0, 1), ("old", 1, 1)]
        assert [s.vehicle_id for s in first] == ["recent"]
        assert listed[1].updated_at == at(T0 + 1000)


class TestSqliteOnly:
    def test_a_write_waits_ten_seconds_for_another_writer(self, tmp_path: Path) -> None:
        """docs/vehicle-state.md: a CLI command writing beside the host is waited for, up to
        10 s (SQLite's own default would be none, Python's 5 s), before a write fails."""
        async def scenario() -> int:
            store = SqliteVehicleStateStore(tmp_path / FILE_NAME)
            try:
                return int(store._db.execute("PRAGMA busy_timeout").fetchone()[0])
            finally:
                await store.close()

        assert asyncio.run(scenario()) == 10_000

    def test_a_plain_signals_event_is_decided_without_the_rules(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The fast path (docs/vehicle-state.md) is what the local host's per-event cost
        rests on: a delivery of dated numeric signals never reaches `rules.plan`, while an
        error event (which it does not decide) does."""
        planned: list[str] = []

        def counting_plan(snapshot: Any, event: Event) -> Any:
            planned.append(event.event_id)
            return plan(snapshot, event)

        monkeypatch.setattr(store_module, "plan", counting_plan)

        async def scenario() -> Any:
            store = SqliteVehicleStateStore(tmp_path / FILE_NAME)
            try:
                first = await store.apply(state_event("e1", signal(value=50)))
                await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
                await store.apply(error_event("x1", error()))
                return first, await store.get_vehicle(VEHICLE)
            finally:
                await store.close()

        first, view = asyncio.run(scenario())
        assert planned == ["x1"]
        assert len(first.changes) == 1 and view.signals[SOC].value == 40

    def test_a_record_waiting_for_its_deferred_commit_already_answers_the_inbox(
        self, tmp_path: Path
    ) -> None:
        """The local host defers commits up to 20 ms: a duplicate delivery in between finds
        the event processed (at exactly the retention too), before and after the commit."""
        clock = Clock()

        async def scenario() -> list[bool]:
            store = SqliteVehicleStateStore(tmp_path / FILE_NAME, clock=clock)
            store.defer_commits()
            try:
                await store.apply(state_event("e1", signal(value=50)))
                await store.mark_processed(VEHICLE, "e1")
                answers = [await store.is_processed(VEHICLE, "e1")]
                clock.now += 8 * DAY
                answers.append(await store.is_processed(VEHICLE, "e1"))
                clock.now += 0.5
                answers.append(await store.is_processed(VEHICLE, "e1"))
                clock.now -= 8 * DAY
                store.flush()
                answers.append(await store.is_processed(VEHICLE, "e1"))
                return answers
            finally:
                await store.close()

        assert asyncio.run(scenario()) == [True, True, False, True]

    def test_deferred_writes_are_read_by_the_store_and_seen_by_others_once_committed(
        self, tmp_path: Path
    ) -> None:
        """With commits deferred (the local host), the store's own reads (the read route,
        `vehicles list`) include what waits for the commit, and another connection (the CLI)
        sees it only after the commit; `commit_each_call` commits each call again."""
        path = tmp_path / FILE_NAME

        async def scenario() -> list[Any]:
            store, other = SqliteVehicleStateStore(path), SqliteVehicleStateStore(path)
            store.defer_commits()
            try:
                # Kept pending for no handler: only the vehicle's row waits.
                await store.apply(state_event("e1", signal(value=50, oem=T0)),
                                  outbox=lambda code, p: False)
                seen: list[Any] = [await store.list_vehicles(), await other.list_vehicles()]
                await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)))
                view = await store.get_vehicle(VEHICLE)
                seen += [view, await other.get_vehicle(VEHICLE)]
                store.commit_each_call()
                seen.append(await other.get_vehicle(VEHICLE))
                await store.apply(state_event("e3", signal(value=30, oem=T0 + 2000)))
                seen.append(await other.get_vehicle(VEHICLE))
                return seen
            finally:
                await store.close()
                await other.close()

        mine, others, view, other_view, committed, at_once = asyncio.run(scenario())
        assert [(v.vehicle_id, v.signal_count) for v in mine] == [(VEHICLE, 1)]
        assert others == [] and other_view is None
        assert view is not None and view.signals[SOC].value == 40
        assert view.updated_at == at(T0 + 1000)
        assert committed is not None and committed.signals[SOC].value == 40
        assert at_once is not None and at_once.signals[SOC].value == 30

    def test_an_event_applied_twice_in_one_deferred_commit_counts_its_error_once(
        self, tmp_path: Path
    ) -> None:
        """A redelivery inside the host's 20 ms commit window: the first apply's record waits
        in memory, and the second must read it there (and report the error as it stands)."""
        event = error_event("err-1", error())

        async def scenario() -> Any:
            store = SqliteVehicleStateStore(tmp_path / FILE_NAME)
            store.defer_commits()
            try:
                first = await store.apply(event)
                again = await store.apply(event)
                return first, again, await store.get_vehicle(VEHICLE)
            finally:
                await store.close()

        first, again, view = asyncio.run(scenario())
        assert again.errors_opened == first.errors_opened
        assert [e.count for e in again.errors_opened] == [1]
        assert [(e.code, e.count) for e in view.errors] == [("VEHICLE_NOT_CAPABLE", 1)]

    def test_a_vehicle_dropped_from_the_cache_keeps_its_deferred_writes(
        self, tmp_path: Path
    ) -> None:
        """More vehicles in one deferred commit than the cache holds (1,024): the first
        vehicle, dropped from the cache with its writes not yet made, is read back from what
        waits, not from the file."""
        from shared.local.vehicle_state import _CACHED_VEHICLES

        async def scenario() -> Any:
            store = SqliteVehicleStateStore(tmp_path / FILE_NAME)
            store.defer_commits()
            try:
                await store.apply(state_event("e0", signal(value=50, oem=T0)))
                for n in range(_CACHED_VEHICLES + 1):
                    await store.apply(state_event(f"x{n}", signal(value=n),
                                                  vehicle=f"car-{n}"))
                older = await store.apply(state_event("e1", signal(value=40, oem=T0 - 1000)))
                store.flush()
                return older, await store.get_vehicle(VEHICLE)
            finally:
                await store.close()

        older, view = asyncio.run(scenario())
        assert older.stale == (SOC,) and older.changes == ()
        assert view is not None and view.signals[SOC].value == 50

    def test_every_thousandth_record_prunes_too(self, tmp_path: Path) -> None:
        """Not only daily: a busy store prunes every 1,000 records, so a record that expires
        soon after a daily prune goes within the next 1,000."""
        backend = Backend("sqlite", str(tmp_path / FILE_NAME), clock=Clock())
        assert backend.clock is not None
        clock = backend.clock

        async def scenario(store: VehicleStateStore) -> set[str]:
            await store.mark_processed(VEHICLE, "old")  # the first record: a prune
            clock.now += 7.5 * DAY
            await store.mark_processed(VEHICLE, "daily")  # a day since: a prune
            clock.now += 0.75 * DAY  # "old" expires; the next daily prune is 0.25 day away
            for n in range(997):
                await store.mark_processed(VEHICLE, f"busy-{n}")
            kept = backend.stored_event_ids() & {"old"}
            await store.mark_processed(VEHICLE, "thousandth")
            return kept

        assert backend.run(scenario) == {"old"}
        assert "old" not in backend.stored_event_ids()

    def test_records_also_prune_at_a_stores_first_and_then_at_least_daily(
        self, tmp_path: Path
    ) -> None:
        """The local store also prunes as it records, for a store the timer does not run for
        (a host stopped and started again within the minute, a test's store): a new store's
        first record prunes, and a store that runs for days prunes at least daily."""
        backend = Backend("sqlite", str(tmp_path / FILE_NAME), clock=Clock())
        assert backend.clock is not None
        clock = backend.clock

        async def old(store: VehicleStateStore) -> None:
            await store.mark_processed(VEHICLE, "old-1")
            clock.now += 2 * DAY
            await store.mark_processed(VEHICLE, "recent")

        async def runs_for_days(store: VehicleStateStore) -> set[str]:
            await store.mark_processed(VEHICLE, "first")  # prunes old-1 (9 days)
            kept = backend.stored_event_ids()
            clock.now += 2 * DAY
            await store.mark_processed(VEHICLE, "days-later")  # prunes recent (9 days)
            return kept

        backend.run(old)
        clock.now += 7 * DAY
        assert backend.run(runs_for_days) == {"recent", "first"}
        assert backend.stored_event_ids() == {"first", "days-later"}

    def test_a_record_exactly_a_day_after_the_last_prune_prunes(self, tmp_path: Path) -> None:
        from shared.local.vehicle_state import PRUNE_INTERVAL_SECONDS

        backend = Backend("sqlite", str(tmp_path / FILE_NAME), clock=Clock())
        assert backend.clock is not None
        clock = backend.clock

        async def scenario(store: VehicleStateStore) -> None:
            await store.mark_processed(VEHICLE, "old")  # the first record: a prune
            # A prune that keeps "old", one second short of its retention less a day...
            clock.now += INBOX_RETENTION_SECONDS + 1 - PRUNE_INTERVAL_SECONDS
            await store.mark_processed(VEHICLE, "day-before")
            # ...and exactly a day later the next one, which deletes it.
            clock.now += PRUNE_INTERVAL_SECONDS
            await store.mark_processed(VEHICLE, "a-day-later")

        backend.run(scenario)
        assert backend.stored_event_ids() == {"day-before", "a-day-later"}

    def test_the_file_is_private_to_its_owner_whatever_the_umask(self, tmp_path: Path) -> None:
        import os

        old = os.umask(0o022)
        try:
            SqliteVehicleStateStore(tmp_path / "deep" / FILE_NAME)
        finally:
            os.umask(old)
        mode = stat.S_IMODE((tmp_path / "deep" / FILE_NAME).stat().st_mode)
        assert mode == 0o600

    def test_a_write_by_another_connection_is_seen_before_the_next_apply(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME

        async def scenario() -> Any:
            first, second = SqliteVehicleStateStore(path), SqliteVehicleStateStore(path)
            await first.apply(state_event("e1", signal(value=50, oem=T0 + 1000)))
            await second.apply(state_event("e2", signal(value=40, oem=T0 + 2000)))
            # `first` held 50 from T0+1000 in memory; 45 from T0+1500 is older than what
            # `second` stored, so it must be stale, not a step back in time.
            late = await first.apply(state_event("e3", signal(value=45, oem=T0 + 1500)))
            view = await first.get_vehicle(VEHICLE)
            await first.close()
            await second.close()
            return late, view

        late, view = asyncio.run(scenario())
        assert late.changes == () and late.stale == (SOC,)
        assert view.signals[SOC].value == 40

    def test_a_file_of_the_one_row_per_signal_layout_is_moved_over_and_kept(
        self, tmp_path: Path
    ) -> None:
        """A state directory from before signals moved into the vehicle's row still reads the
        same, and takes new events."""
        path = tmp_path / FILE_NAME
        with sqlite3.connect(path) as old:
            old.executescript(OLD_LAYOUT)
            old.execute("INSERT INTO vehicles VALUES (?, ?, ?, 2, 0)",
                        (VEHICLE, "2024-11-18T14:32:09+00:00", 1731940329.0))
            for code, value in ((SOC, "50"), ("charge-ischarging", "true")):
                old.execute("INSERT INTO signals VALUES (?, ?, ?)", (VEHICLE, code, json.dumps(
                    {"code": code, "value": value, "oemUpdatedAt": "2024-11-18T14:32:09+00:00",
                     "eventId": "old", "status": "ok"})))
            old.execute("INSERT INTO vehicles VALUES ('no-signals', NULL, NULL, 0, 0)")
            old.execute("INSERT INTO events VALUES (?, 'done', 0, NULL, ?)", (VEHICLE, 1e12))
            old.execute("INSERT INTO events VALUES (?, 'cut-short', 0, ?, NULL)", (VEHICLE, json.dumps(
                [{"vehicleId": VEHICLE, "code": SOC, "path": None, "previous": None,
                  "current": {"code": SOC, "value": "50", "status": "ok"}}])))
        old.close()

        async def scenario() -> Any:
            store = SqliteVehicleStateStore(path)
            before = await store.get_vehicle(VEHICLE)
            empty = await store.get_vehicle("no-signals")
            older = await store.apply(state_event("e1", signal(value=40, oem=T0 - 5000)))
            newer = await store.apply(state_event("e2", signal(value=45, oem=T0 + 5000)))
            listed = await store.list_vehicles()
            inbox = (await store.is_processed(VEHICLE, "done"),
                     await store.is_processed(VEHICLE, "cut-short"),
                     await store.pending_changes(VEHICLE, "cut-short"))
            await store.close()
            return before, empty, older, newer, listed, inbox

        before, empty, older, newer, listed, inbox = asyncio.run(scenario())
        assert inbox[0] is True and inbox[1] is False
        assert [(c.code, c.current.value) for c in inbox[2]] == [(SOC, 50)]
        assert before.signals[SOC].value == 50 and before.signals["charge-ischarging"].value
        assert before.signals[SOC].event_id == "old"
        assert empty is not None and empty.signals == {}
        assert older.stale == (SOC,) and [c.code for c in newer.changes] == [SOC]
        assert newer.changes[0].previous == before.signals[SOC]
        assert {v.vehicle_id: v.signal_count for v in listed} == {VEHICLE: 2, "no-signals": 0}
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
            assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '%signals'"
                                " OR name LIKE 'events_v%'").fetchone() is None
            (events_sql,) = conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
            assert "WITHOUT ROWID" in events_sql
            assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND "
                                "name = 'events_by_processed' AND tbl_name = 'events'"
                                ).fetchone() == (1,)
        conn.close()
        # Opening it again changes nothing.
        again = sqlite_at(path).run(lambda store: store.get_vehicle(VEHICLE))
        assert again is not None and again.signals[SOC].value == 45

    def test_a_reopened_store_decides_against_what_its_file_holds(self, tmp_path: Path) -> None:
        """A new store (the host restarted, or the vehicle left the cache) reads each vehicle
        from the file: the stored updatedAt, every signal, and a vehicle with no updatedAt yet
        (its only reading had no oemUpdatedAt)."""
        path = tmp_path / FILE_NAME
        # A code no earlier test in this process used: its JSON key is made, not reused.
        fresh = f"custom-{uuid.uuid4().hex}"
        odometer = "odometer-traveleddistance"

        async def first(store: VehicleStateStore) -> None:
            await store.apply(state_event("e1", signal(value=50, oem=T0 + 5000),
                                          signal(fresh, 7, oem=T0 + 5000, unit=None)))
            await store.apply(state_event("e2", signal(value=60, oem=None), vehicle="undated"))

        async def second(store: VehicleStateStore) -> None:
            # An older reading of another signal: applied, but updatedAt stays the newer one.
            await store.apply(state_event("e3", signal(odometer, 10, oem=T0, unit="km")))
            await store.apply(state_event("e4", signal(value=40, oem=T0), vehicle="undated"))

        async def read(store: VehicleStateStore) -> Any:
            return await store.get_vehicle(VEHICLE), await store.get_vehicle("undated")

        for step in (first, second):
            sqlite_at(path).run(step)
        view, undated = sqlite_at(path).run(read)
        assert {code: s.value for code, s in view.signals.items()} == {
            SOC: 50, fresh: 7, odometer: 10}
        assert view.updated_at == at(T0 + 5000)
        assert undated.signals[SOC].value == 40 and undated.updated_at == at(T0)

    def test_an_inbox_check_serves_only_the_apply_of_its_own_vehicle_and_event(
        self, tmp_path: Path
    ) -> None:
        """`is_processed` keeps what it read for the apply that follows it; another event, or
        the same eventId of another vehicle, reads its own record. e1 crashed after its
        apply: its change is still pending."""
        path = tmp_path / FILE_NAME

        def pending(result: Any) -> list[tuple[str, Any, Any]]:
            return [(c.vehicle_id, c.previous and c.previous.value, c.current.value)
                    for c in result.pending]

        async def scenario(store: VehicleStateStore) -> list[Any]:
            await store.apply(state_event("e1", signal(value=50, oem=T0)), outbox=keep_every_change)
            await store.is_processed(VEHICLE, "e1")
            other_event = await store.apply(state_event("e2", signal(value=40, oem=T0 + 1000)),
                                            outbox=keep_every_change)
            await store.is_processed(VEHICLE, "e1")
            other_vehicle = await store.apply(
                state_event("e1", signal(value=30, oem=T0), vehicle="other"), outbox=keep_every_change)
            return [pending(other_event), pending(other_vehicle)]

        async def redelivered(store: VehicleStateStore) -> list[Any]:
            # No inbox check first, nothing in memory: the pending changes come from the file,
            # with their previous values.
            return [pending(await store.apply(event, outbox=keep_every_change)) for event in (
                state_event("e1", signal(value=50, oem=T0)),
                state_event("e2", signal(value=40, oem=T0 + 1000)))]

        other_event, other_vehicle = sqlite_at(path).run(scenario)
        assert other_event == [(VEHICLE, 50, 40)]
        assert other_vehicle == [("other", None, 30)]
        assert sqlite_at(path).run(redelivered) == [
            [(VEHICLE, None, 50)], [(VEHICLE, 50, 40)]]

    def test_an_apply_after_the_record_finds_nothing_pending_that_a_check_read_before(
        self, tmp_path: Path
    ) -> None:
        """`is_processed` read e1's pending change; e1's record makes that read stale, so an
        apply of e1 after the record hands nothing over again."""

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("e1", signal(value=50)), outbox=keep_every_change)
            await store.is_processed(VEHICLE, "e1")
            await store.mark_processed(VEHICLE, "e1")
            again = await store.apply(state_event("e1", signal(value=50)), outbox=keep_every_change)
            return again.pending, await store.is_processed(VEHICLE, "e1")

        assert sqlite_at(tmp_path / FILE_NAME).run(scenario) == ((), True)

    def test_a_file_whose_move_to_the_new_layout_fails_is_left_as_it_was(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / FILE_NAME
        with sqlite3.connect(path) as old:
            old.executescript(OLD_LAYOUT)
            old.execute("INSERT INTO vehicles VALUES (?, NULL, NULL, 1, 0)", (VEHICLE,))
            old.execute("INSERT INTO signals VALUES (?, ?, ?)", (VEHICLE, SOC, "{not json"))
        old.close()
        with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
            SqliteVehicleStateStore(path)
        with sqlite3.connect(path) as db:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = db.execute("PRAGMA user_version").fetchone()[0]
        db.close()
        assert tables == {"vehicles", "signals", "errors", "events"} and version == 0

    def test_the_file_may_be_several_new_folders_deep(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b" / FILE_NAME

        async def scenario(store: VehicleStateStore) -> Any:
            await store.apply(state_event("e1", signal(value=50)))
            return await store.get_vehicle(VEHICLE)

        view = sqlite_at(path).run(scenario)
        assert view is not None and view.signals[SOC].value == 50 and path.is_file()

    # differing_executors: `make mutate` runs this test many times in one process, each time
    # on a new instance of the class.
    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(data=st.data())
    def test_any_order_with_duplicates_ends_in_the_reference_state(
        self, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
    ) -> None:
        events = data.draw(event_sets())
        order = data.draw(orders(len(events)))
        reference = run_in_memory(events, list(range(len(events))))
        path = tmp_path_factory.mktemp("perm") / FILE_NAME
        store = SqliteVehicleStateStore(path)

        async def scenario() -> Any:
            try:
                for index in order:
                    await store.apply(events[index])
                return await store.get_vehicle(VEHICLE)
            finally:
                await store.close()

        view = asyncio.run(scenario())
        assert view is not None
        assert dict(view.signals) == reference.signals
        assert list(view.errors) == [r.state for _, r in sorted(reference.errors.items())
                                     if r.state.state == "OPEN"]


class TestFactory:
    def test_the_settings_choose_off_sqlite_or_table(self, tmp_path: Path) -> None:
        base = {"LOCAL_STATE_DIR": str(tmp_path)}
        assert open_store(load_settings({**base, "VEHICLE_STATE_STORE": "off"})) is None
        local = open_store(load_settings(base))
        assert isinstance(local, SqliteVehicleStateStore)
        assert local.path == tmp_path / FILE_NAME
        asyncio.run(local.close())

        async def table() -> Any:
            store = open_store(load_settings({
                **base, "AzureWebJobsStorage__accountName": "acct123"}))
            url = store._table.url  # type: ignore[union-attr]
            await store.close()  # type: ignore[union-attr]
            return store, url

        store, url = asyncio.run(table())
        assert isinstance(store, TableVehicleStateStore)
        assert url.startswith("https://acct123.table.core.windows.net")
        # Made for the identity, as in Azure: Bicep creates the table, the store never tries.
        assert store._created

    @staticmethod
    def retries(store: Any) -> tuple[str, int, float, float]:
        """What azure-data-tables made of the store's client options: the retry policy in
        its request pipeline (the SDK ignores a keyword it does not know, silently)."""
        [policy] = [p for p in store._table._client._client._pipeline._impl_policies
                    if type(p).__name__.endswith("RetryPolicy")]
        return (type(policy).__name__, policy.total_retries, policy.backoff_factor,
                policy.backoff_max)

    def test_both_table_clients_retry_briefly_and_the_queue_retries_later(
        self, tmp_path: Path
    ) -> None:
        """The SDK's default (10 retries, up to 120 s apart) would hold a delivery for
        minutes on a storage outage; the store's clients give up after 3, at most 2 s apart."""
        from azure.data.tables.aio import TableClient as SdkTableClient

        base = {"LOCAL_STATE_DIR": str(tmp_path)}

        async def scenario() -> list[tuple[str, int, float, float]]:
            default = TableVehicleStateStore(SdkTableClient.from_connection_string(
                connection_string("table", 10002), "t"))
            by_key = open_store(load_settings({
                **base, "AzureWebJobsStorage": connection_string("table", 10002)}))
            by_identity = open_store(load_settings({
                **base, "AzureWebJobsStorage__accountName": "acct123"}))
            found = [self.retries(default), self.retries(by_key), self.retries(by_identity)]
            for store in (default, by_key, by_identity):
                await store.close()  # type: ignore[union-attr]
            return found

        default, by_key, by_identity = asyncio.run(scenario())
        assert default == ("AsyncTablesRetryPolicy", 10, 0.8, 120)
        assert by_key == by_identity == ("AsyncTablesRetryPolicy", 3, 0.2, 2)

    def test_the_identity_is_the_apps_user_assigned_one(self, tmp_path: Path) -> None:
        """With AZURE_CLIENT_ID set (Bicep sets it), the Table client signs in as that
        user-assigned identity: read back from the credential azure-identity made."""
        client_id = "11111111-2222-3333-4444-555555555555"

        async def scenario() -> Any:
            store = open_store(load_settings({
                "LOCAL_STATE_DIR": str(tmp_path), "AZURE_CLIENT_ID": client_id,
                "AzureWebJobsStorage__accountName": "acct123"}))
            credential = store._table.credential  # type: ignore[union-attr]
            await store.close()  # type: ignore[union-attr]
            return credential

        credential = asyncio.run(scenario())
        assert type(credential).__name__ == "ManagedIdentityCredential"
        assert credential._credential._client._identity_config == {"client_id": client_id}

    def test_with_a_connection_string_the_table_is_made_on_first_use(
        self, tmp_path: Path, azurite_table_port: int
    ) -> None:
        """Local development on Azurite: no Bicep made the table, the store makes it."""
        table = f"vs{uuid.uuid4().hex[:16]}"

        async def scenario() -> Any:
            store = open_store(load_settings({
                "LOCAL_STATE_DIR": str(tmp_path), "VEHICLE_STATE_TABLE": table,
                "AzureWebJobsStorage": connection_string("table", azurite_table_port)}))
            assert isinstance(store, TableVehicleStateStore)
            try:
                await store.apply(state_event("e1", signal(oem=T0), vehicle="fresh"))
                return await store.get_vehicle("fresh")
            finally:
                await store.close()

        view = asyncio.run(scenario())
        assert view is not None and view.signals[SOC].event_id == "e1"

    def test_without_the_local_package_and_a_storage_account_it_says_what_to_set(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import sys

        from shared.settings import SettingsError

        # As in the deployed package: shared/local is not there.
        monkeypatch.setitem(sys.modules, "shared.local.vehicle_state", None)
        with pytest.raises(SettingsError, match=r"AzureWebJobsStorage__accountName .* "
                           r"or set VEHICLE_STATE_STORE=off"):
            open_store(load_settings({"LOCAL_STATE_DIR": str(tmp_path)}))


# ---------------------------------------------------------------------------------------------
class CountingCreates:
    """A TableClient that counts the store's `create_table` calls."""

    def __init__(self, client: TableClient) -> None:
        self._client = client
        self.creates = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def create_table(self) -> Any:
        self.creates += 1
        return await self._client.create_table()


class TestTheTableOnAzurite:
    """In Azure, Bicep creates the table and the app's data role is scoped to it, so a store
    made without `create_table` (the factory's, for an identity: TestFactory) never creates
    one: a missing table is an error, and stays missing. Made with it (the factory's, for a
    connection string such as Azurite's) the store creates its table, once per instance, and
    takes an existing one as it is."""

    @staticmethod
    async def table_exists(connection: str, name: str) -> bool:
        from azure.data.tables.aio import TableServiceClient

        async with TableServiceClient.from_connection_string(connection) as service:
            return [t.name async for t in service.query_tables(f"TableName eq '{name}'")] == [name]

    def test_by_default_a_missing_table_is_an_error_and_is_not_created(
        self, azurite_table_port: int
    ) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"

        async def scenario() -> None:
            client = CountingCreates(TableClient.from_connection_string(connection, table))
            store = TableVehicleStateStore(client)
            try:
                with pytest.raises(ResourceNotFoundError, match="TableNotFound"):
                    await store.apply(state_event("e1", signal()))
            finally:
                await store.close()
            assert client.creates == 0
            assert not await self.table_exists(connection, table)

        asyncio.run(scenario())

    def test_asked_to_it_creates_its_table_once_and_takes_an_existing_one(
        self, azurite_table_port: int
    ) -> None:
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"

        async def scenario() -> None:
            for instance, event_id in enumerate(("e1", "e2")):
                client = CountingCreates(TableClient.from_connection_string(connection, table))
                store = TableVehicleStateStore(client, create_table=True)
                try:
                    await store.apply(state_event(event_id, signal(oem=T0 + instance * 1000)))
                    await store.apply(state_event(event_id + "b",
                                                  signal(oem=T0 + instance * 1000 + 500)))
                    assert await store.get_vehicle(VEHICLE) is not None
                finally:
                    await store.close()
                assert client.creates == 1  # the second instance found it there
                assert await self.table_exists(connection, table)

        asyncio.run(scenario())


class RecordingQueries:
    """A TableClient that records, for each query, the properties of each entity it read."""

    def __init__(self, client: TableClient) -> None:
        self._client = client
        self.read: list[tuple[str, set[str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def _entities(self, query: str, kwargs: Any) -> Any:
        async for entity in self._client.query_entities(query, **kwargs):
            self.read.append((query, set(entity)))
            yield entity

    def query_entities(self, query: str, **kwargs: Any) -> Any:
        return self._entities(query, kwargs)


def test_recording_an_event_reads_only_the_keys_of_its_outbox_rows(
    azurite_table_port: int,
) -> None:
    """An outbox chunk is up to an entity's 1 MiB; recording the event deletes the chunks by
    key, so it reads their keys, not their text."""
    connection = connection_string("table", azurite_table_port)

    async def scenario() -> RecordingQueries:
        async with TableClient.from_connection_string(
                connection, f"vs{uuid.uuid4().hex[:16]}") as client:
            recording = RecordingQueries(client)
            store = TableVehicleStateStore(recording, create_table=True)
            applied = await store.apply(state_event("e1", signal(value="x" * 20_000)))
            assert applied.pending
            recording.read.clear()
            await store.mark_processed(VEHICLE, "e1")
            assert await store.pending_changes(VEHICLE, "e1") == ()
            return recording

    read = asyncio.run(scenario()).read
    outbox = [properties for query, properties in read if "'o:" in query]
    assert outbox and all(not properties - {"RowKey"} for properties in outbox), outbox


# ---------------------------------------------------------------------------------------------
class TestConcurrentWritersOnAzurite:
    WRITERS = 10

    def test_writers_racing_on_one_vehicle_end_in_the_sequential_state(
        self, azurite_table_port: int
    ) -> None:
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        codes = [SOC, "charge-ischarging", "odometer-traveleddistance"]
        events = [
            state_event(f"e{i:02d}", *(signal(code, i * 10 + j, oem=T0 + ((i * 7 + j) % 13) * 1000,
                                              retrieved=T0 + 20_000)
                                       for j, code in enumerate(codes)),
                        vehicle="racer")
            for i in range(40)
        ] + [error_event(f"x{i}", error(state="RESOLVED" if i % 3 == 0 else "ERROR"),
                         vehicle="racer", delivered=T0 + i * 300_000) for i in range(6)]

        async def race() -> tuple[Any, list[Any]]:
            # One client per writer, as separate Function instances would have.
            stores = [TableVehicleStateStore(TableClient.from_connection_string(connection, table),
                                             create_table=True) for _ in range(self.WRITERS)]
            await stores[0].apply(state_event("warm", signal(oem=T0 - 10**6), vehicle="racer"))
            shares = [events[k::self.WRITERS] for k in range(self.WRITERS)]

            async def writer(store: TableVehicleStateStore, mine: list[Event]) -> list[Any]:
                return [await store.apply(event) for event in mine]

            results = await asyncio.gather(*(writer(s, m) for s, m in zip(stores, shares, strict=True)))
            view = await stores[0].get_vehicle("racer")
            for store in stores:
                await store.close()
            return view, [r for rs in results for r in rs]

        async def sequential() -> Any:
            store = TableVehicleStateStore(
                TableClient.from_connection_string(connection, table + "seq"), create_table=True)
            await store.apply(state_event("warm", signal(oem=T0 - 10**6), vehicle="racer"))
            for event in events:
                await store.apply(event)
            view = await store.get_vehicle("racer")
            await store.close()
            return view

        raced, results = asyncio.run(race())
        expected = asyncio.run(sequential())
        assert sum(r.conflicts_retried for r in results) > 0  # the race really happened
        assert raced == expected
        # The processor counts each apply's retried conflicts: the counter holds them all.
        otel = captured()
        for result in results:
            otel.telemetry.record_vehicle_state(result)
        assert otel.values(names.VEHICLE_STATE_CONFLICTS) == [
            ({}, sum(r.conflicts_retried for r in results))]
        # Every accepted change was reported to exactly one writer, in time order per code.
        for code in codes:
            accepted = sorted((c.current.oem_updated_at, c.current.event_id)
                              for r in results for c in r.changes if c.code == code)
            assert len(accepted) == len(set(accepted))
            assert accepted[-1][1] == raced.signals[code].event_id


# ---------------------------------------------------------------------------------------------
class _FaultyTransactions:
    """A TableClient whose transactions go through `fault` first: given the operations, it
    returns the exception to raise instead of submitting them, or None to submit them."""

    def __init__(self, client: TableClient,
                 fault: Callable[[Any], BaseException | None]) -> None:
        self._client = client
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def submit_transaction(self, operations: Any, **kwargs: Any) -> Any:
        error = self._fault(operations)
        if error is not None:
            raise error
        return await self._client.submit_transaction(operations, **kwargs)


def conflict_error() -> BaseException:
    """What Table answers a write whose If-Match lost: another writer changed the row."""
    from azure.core.exceptions import ResourceModifiedError

    refused = ResourceModifiedError("The update condition was not satisfied.")
    refused.status_code = 412
    return refused


class _Killed(BaseException):
    """The process dying: nothing after it runs."""


def killed_at(n: int) -> Callable[[Any], BaseException | None]:
    """The `n`-th transaction does not happen: the process dies after those before it were
    committed."""
    seen = [0]

    def fault(_: Any) -> BaseException | None:
        seen[0] += 1
        return _Killed() if seen[0] == n else None

    return fault


class TestTransactionsOfOneEventOnAzurite:
    def test_a_crash_between_two_transactions_of_one_event_loses_no_change_on_redelivery(
        self, azurite_table_port: int
    ) -> None:
        """An event of 250 changes takes three transactions (100 operations each at most).
        Killed after the first, its redelivery stores the rest and hands the handlers every
        change once: the first part's from the outbox chunk it committed, the rest as new."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        codes = [f"custom-s{i:03d}" for i in range(250)]
        event = state_event("big", *(signal(code, i, oem=T0 + i) for i, code in enumerate(codes)))

        async def crash_then_redeliver() -> tuple[Any, Any, Any, Any]:
            client = TableClient.from_connection_string(connection, table)
            store = TableVehicleStateStore(_FaultyTransactions(client, killed_at(2)),
                                           create_table=True)
            with pytest.raises(_Killed):
                await store.apply(event)
            await client.close()
            again = TableVehicleStateStore(TableClient.from_connection_string(connection, table))
            try:
                partial = await again.get_vehicle(VEHICLE)
                applied = await again.apply(event)
                pending = await again.pending_changes(VEHICLE, "big")
                return partial, applied, pending, await again.get_vehicle(VEHICLE)
            finally:
                await again.close()

        partial, applied, pending, view = asyncio.run(crash_then_redeliver())
        assert partial is not None and 0 < len(partial.signals) < 250  # killed half-way
        assert sorted(view.signals) == codes
        assert [view.signals[c].value for c in codes] == list(range(250))
        # Every change reaches the handlers exactly once, whichever apply stored it.
        assert sorted(c.code for c in applied.pending) == codes
        assert sorted(c.code for c in pending) == codes
        # This apply changed only what the killed one had not stored.
        assert set(applied.changes.codes) == set(codes) - set(partial.signals)


    def test_an_event_of_three_transactions_chains_them_and_keeps_the_vehicles_counts(
        self, azurite_table_port: int
    ) -> None:
        """Each transaction of a 250-change event replaces the vehicle and event rows the one
        before it wrote (their new ETags: no conflict with itself), and carries the counts on:
        the signals, the open errors, one outbox chunk per transaction."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        codes = [f"custom-s{i:03d}" for i in range(250)]
        event = state_event("big", *(signal(code, i, oem=T0 + i) for i, code in enumerate(codes)))

        async def scenario() -> tuple[Any, ...]:
            async with TableClient.from_connection_string(connection, table) as client:
                store = TableVehicleStateStore(client, create_table=True)
                await store.apply(state_event("first", signal(value=50, oem=T0)))
                await store.apply(error_event("x1", error()))
                applied = await store.apply(event)
                rows = {str(e["RowKey"]): e async for e in client.list_entities()}
                listed = await store.list_vehicles()
                view = await store.get_vehicle(VEHICLE)
                await store.mark_processed(VEHICLE, "big")
                after = {str(e["RowKey"]): e async for e in client.list_entities()}
                left = sorted(k for k in after if k.startswith("o:big"))
                return applied, rows, listed, view, left, after["i:big"]

        applied, rows, listed, view, left, recorded = asyncio.run(scenario())
        assert applied.conflicts_retried == 0
        assert list(applied.changes.codes) == codes
        assert [c.code for c in applied.pending] == codes  # in payload order, across chunks
        assert sorted(k for k in rows if k.startswith("o:big")) == [
            "o:big:00000", "o:big:00001", "o:big:00002"]
        assert rows["i:big"]["chunks"] == 3 and not rows["i:big"]["errorsApplied"]
        assert rows["i:big"]["eventId"] == "big"  # for whoever browses the table
        assert (rows["v"]["signalCount"], rows["v"]["openErrors"]) == (251, 1)
        assert [(s.signal_count, s.open_errors) for s in listed] == [(251, 1)]
        assert view is not None and len(view.signals) == 251 and len(view.errors) == 1
        assert view.updated_at == at(T0 + 249)
        assert left == [] and recorded["chunks"] == 0  # the record deletes every chunk
        assert recorded["processedAt"] > 0

    @pytest.mark.parametrize("cut", ["killed", "conflict"])
    def test_errors_an_event_wrote_before_it_was_cut_short_are_not_counted_twice(
        self, azurite_table_port: int, cut: str
    ) -> None:
        """An error event of 150 errors takes two transactions. Cut short after the first (the
        process killed, or other instances writing the vehicle in between), its next apply
        writes them all again and each error still counts this event once."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        # Not in key order: the transactions write them in key order.
        many = error_event("many", *(error(code=f"C{i:03d}") for i in reversed(range(150))))

        def fault() -> Callable[[Any], BaseException | None]:
            if cut == "killed":
                return killed_at(2)
            seen: list[Any] = []

            def conflict_twice(_: Any) -> BaseException | None:
                seen.append(_)
                if len(seen) in (2, 3):  # the first apply's second, the next one's first
                    return conflict_error()
                return None

            return conflict_twice

        async def scenario() -> tuple[Any, Any]:
            client = TableClient.from_connection_string(connection, table)
            store = TableVehicleStateStore(_FaultyTransactions(client, fault()),
                                           create_table=True)
            try:
                first = await store.apply(many)
            except _Killed:
                first = None
            await client.close()
            again = TableVehicleStateStore(TableClient.from_connection_string(connection, table))
            try:
                if first is None:
                    first = await again.apply(many)
                await again.apply(many)  # and a plain duplicate
                return first, await again.get_vehicle(VEHICLE)
            finally:
                await again.close()

        applied, view = asyncio.run(scenario())
        assert applied.conflicts_retried == (2 if cut == "conflict" else 0)
        assert view is not None and len(view.errors) == 150
        assert {e.count for e in view.errors} == {1}


    def test_errors_counted_stay_counted_when_a_later_cut_comes_at_another_point(
        self, azurite_table_port: int
    ) -> None:
        """The event's next applies write it in smaller transactions (another event made its
        errors' rows longer) and are cut short too, once before and once after the point the
        first apply reached: what was counted stays counted, and each error counts each of
        the two events once."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        keys = [f"C{i:03d}" for i in range(150)]
        many = error_event("many", *(error(code=k) for k in reversed(keys)))
        # Rows of about 20 KB (a long description and 30 long affected signals): about 40
        # fit a transaction's 800 KiB.
        affected = tuple("s" * 200 for _ in range(30))
        longer = error_event("longer", *(error(code=k, description="d" * 3900,
                                               signals=affected) for k in keys),
                             delivered=T0 + 60_000)

        async def counted(client: TableClient) -> int:
            return int((await client.get_entity(VEHICLE, "i:many"))["errorsCounted"])

        async def scenario() -> tuple[list[int], Any]:
            marks: list[int] = []
            async with TableClient.from_connection_string(connection, table) as client:
                for cut in (2, None, 2, 4, None):  # "longer" is the second, applied whole
                    fault = killed_at(cut) if cut else (lambda _: None)
                    store = TableVehicleStateStore(_FaultyTransactions(client, fault),
                                                   create_table=True)
                    with contextlib.suppress(_Killed):
                        await store.apply(many if len(marks) != 1 else longer)
                    marks.append(await counted(client))
                return marks, await TableVehicleStateStore(client).get_vehicle(VEHICLE)

        marks, view = asyncio.run(scenario())
        # Smaller transactions: fewer than the first cut's 97 at the second cut, more at the
        # third (the count only grows); all at the end.
        assert marks[0] == 97 and marks[2] == 97 and 97 < marks[3] < 150 and marks[4] == 150
        assert view is not None and {e.count for e in view.errors} == {2}


    def test_a_partition_that_keeps_changing_is_retried_with_backoff_then_given_up(
        self, azurite_table_port: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every transaction meets a conflict: each attempt waits a random time between 0 and
        a bound that starts at 5 ms and doubles up to 0.5 s (full jitter), and after
        MAX_ATTEMPTS the delivery fails with an error that names the vehicle."""
        def conflict(_: Any) -> BaseException:
            return conflict_error()

        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"

        def waits(end: int) -> list[float]:
            """The waits, with the jitter drawing its low (0) or its high (1) end."""
            slept: list[float] = []

            async def sleep(seconds: float) -> None:
                slept.append(seconds)

            async def scenario() -> None:
                async with TableClient.from_connection_string(connection, table) as client:
                    store = TableVehicleStateStore(_FaultyTransactions(client, conflict),
                                                   create_table=True, sleep=sleep)
                    with pytest.raises(StoreConflictError,
                                       match=rf"vehicle '{VEHICLE}'.* each of 40 attempts "
                                             r"to apply event e1; the delivery will "
                                             r"be retried") as raised:
                        await store.apply(state_event("e1", signal()))
                    assert raised.value.conflicts == 40

            monkeypatch.setattr("shared.vehicle_state.table_store.random.uniform",
                                lambda low, high: (low, high)[end])
            asyncio.run(scenario())
            return slept

        assert table_store.MAX_ATTEMPTS == 40
        assert waits(0) == [0.0] * 40
        assert waits(1) == [min(0.005 * 2 ** n, 0.5) for n in range(40)]

    def test_the_conflicts_of_an_apply_that_gave_up_are_counted(
        self, azurite_table_port: int
    ) -> None:
        """The conflicts counter is what shows contention: an apply that meets a conflict at
        every attempt and gives up counts them all, though it has no result."""
        otel = captured()
        connection = connection_string("table", azurite_table_port)

        async def scenario() -> None:
            async with TableClient.from_connection_string(
                    connection, f"vs{uuid.uuid4().hex[:16]}") as client:
                async def no_wait(seconds: float) -> None:
                    return None

                store = TableVehicleStateStore(
                    _FaultyTransactions(client, lambda _: conflict_error()),
                    create_table=True, sleep=no_wait)
                event = state_event("e1", signal())
                context = HandlerContext(settings=load_settings(
                    {"SMARTCAR_MANAGEMENT_TOKEN": "t"}), message_id="e1", delivery_count=1)
                with pytest.raises(StoreConflictError):
                    await run_handlers(event, context, HandlerRegistry(), store, otel.telemetry)

        asyncio.run(scenario())
        assert otel.values(names.VEHICLE_STATE_CONFLICTS) == [({}, 40)]

    @pytest.mark.parametrize("failing", ["transaction", "read"])
    def test_the_conflicts_of_an_apply_that_then_failed_otherwise_are_counted(
        self, azurite_table_port: int, failing: str
    ) -> None:
        """Two conflicts, then the next transaction (or the read before it) fails for another
        reason: the apply raises that error, and the two conflicts still count."""
        from azure.core.exceptions import ServiceRequestError

        otel = captured()
        connection = connection_string("table", azurite_table_port)
        faults = [conflict_error(), conflict_error()]

        class ReadFails(_FaultyTransactions):
            def query_entities(self, *args: Any, **kwargs: Any) -> Any:
                if not faults:
                    raise ServiceRequestError("Connection reset by peer")
                return self._client.query_entities(*args, **kwargs)

        def fault(_: Any) -> BaseException | None:
            return faults.pop() if faults else ServiceRequestError("Connection reset by peer")

        async def scenario() -> None:
            async with TableClient.from_connection_string(
                    connection, f"vs{uuid.uuid4().hex[:16]}") as client:
                async def no_wait(seconds: float) -> None:
                    return None

                wrapper = ReadFails if failing == "read" else _FaultyTransactions
                store = TableVehicleStateStore(wrapper(client, fault), create_table=True,
                                               sleep=no_wait)
                context = HandlerContext(settings=load_settings(
                    {"SMARTCAR_MANAGEMENT_TOKEN": "t"}), message_id="e1", delivery_count=1)
                with pytest.raises(ServiceRequestError, match="Connection reset"):
                    await run_handlers(state_event("e1", signal()), context, HandlerRegistry(),
                                       store, otel.telemetry)

        asyncio.run(scenario())
        assert otel.values(names.VEHICLE_STATE_CONFLICTS) == [({}, 2)]

    def test_a_transaction_failing_for_another_reason_fails_the_apply_with_that_error(
        self, azurite_table_port: int
    ) -> None:
        """Not a conflict (no status code at all: the connection dropped): not retried here;
        the delivery fails with it and is retried as a whole."""
        from azure.core.exceptions import ServiceRequestError

        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        calls: list[Any] = []

        def dropped(operations: Any) -> BaseException:
            calls.append(operations)
            return ServiceRequestError("Connection reset by peer")

        async def scenario() -> None:
            async with TableClient.from_connection_string(connection, table) as client:
                store = TableVehicleStateStore(_FaultyTransactions(client, dropped),
                                               create_table=True)
                with pytest.raises(ServiceRequestError, match="Connection reset"):
                    await store.apply(state_event("e1", signal()))

        asyncio.run(scenario())
        assert len(calls) == 1


    def test_an_event_of_many_values_near_the_bound_stays_within_table_limits(
        self, azurite_table_port: int
    ) -> None:
        """120 signals of 29,000-character texts: the transactions are cut by size as well as
        by count (the outbox entity of 97 of them would be far over Table's 1 MiB), and
        everything is stored and handed back whole."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        values = {f"custom-big{i:03d}": f"{i:03d}" + "x" * 28_997 for i in range(120)}
        event = state_event("huge", *(signal(code, value) for code, value in values.items()))
        sizes: list[int] = []

        def count(operations: Any) -> None:
            sizes.append(len(operations))

        async def scenario() -> tuple[Any, Any, Any]:
            async with TableClient.from_connection_string(connection, table) as client:
                store = TableVehicleStateStore(_FaultyTransactions(client, count),
                                               create_table=True)
                applied = await store.apply(event)
                return (applied, await store.pending_changes(VEHICLE, "huge"),
                        await store.get_vehicle(VEHICLE))

        applied, pending, view = asyncio.run(scenario())
        assert len(sizes) > 2 and max(sizes) < 100  # many small transactions
        assert {c.code: c.current.value for c in pending} == values
        assert view is not None and {c: s.value for c, s in view.signals.items()} == values
        assert applied.conflicts_retried == 0


    def test_an_error_event_applied_again_writes_nothing(self, azurite_table_port: int) -> None:
        """Its event row says its errors were applied: a redelivery leaves every row as it was
        (the same ETags), also after a state event that reused its eventId wrote that row."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"

        async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
            async with TableClient.from_connection_string(connection, table) as client:
                store = TableVehicleStateStore(client, create_table=True)

                async def rows() -> dict[str, Any]:
                    return {str(e["RowKey"]): e async for e in client.list_entities()}

                await store.apply(error_event("x1", error(), error("T2", "C2")))
                first = await rows()
                await store.apply(error_event("x1", error(), error("T2", "C2")))
                await store.apply(state_event("x1", signal(value=40)))
                await store.apply(error_event("x1", error(), error("T2", "C2")))
                return first, await rows()

        first, last = asyncio.run(scenario())
        errors = [key for key in first if key.startswith("e:")]
        assert len(errors) == 2
        assert [last[k].metadata["etag"] for k in errors] == [
            first[k].metadata["etag"] for k in errors]
        event_row = last["i:x1"]
        assert event_row["errorsApplied"] is True and event_row["chunks"] == 1
        assert sorted(k for k in last if k.startswith("o:")) == ["o:x1:00000"]


def refusing_once(kind: str, partition: str,
                  seen: list[Any]) -> Callable[[Any], BaseException | None]:
    """Every transaction is appended to `seen`; the first of `kind` ("delete", "upsert") in
    `partition` fails: a delete finds its rows gone (another run deleted them first: Table
    answers 404 and fails the whole transaction), an upsert meets a transient 503."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    refused: list[bool] = []

    def fault(operations: Any) -> BaseException | None:
        seen.append(list(operations))
        if (not refused and operations[0][0] == kind
                and operations[0][1]["PartitionKey"] == partition):
            refused.append(True)
            if kind == "delete":
                return ResourceNotFoundError("The specified resource does not exist.")
            return HttpResponseError("Server Busy")
        return None

    return fault


class TestTransactionLimits:
    """How an event's writes are cut into transactions: at most 97 entity writes (the vehicle
    row, the event row and the outbox chunk make 100, Table's limit), and their sizes (each
    entity's as Table counts it, with its change's entry in the outbox) within 800 KiB, under
    the 1 MiB an outbox entity may hold and far under the 4 MiB a transaction may carry."""

    @staticmethod
    def cut(*sizes: int) -> list[list[int]]:
        writes: list[tuple[tuple[Any, ...], int, Any]] = [
            (("create", {"RowKey": f"s:{i}"}), size, None) for i, size in enumerate(sizes)]
        batches = table_store._batches(writes)
        assert [w for batch in batches for w in batch] == writes  # all, in order, once
        return [[size for _, size, _ in batch] for batch in batches]

    def test_at_most_97_writes_go_in_one_transaction(self) -> None:
        assert [len(b) for b in self.cut(*[10] * 200)] == [97, 97, 6]
        assert [len(b) for b in self.cut(*[10] * 97)] == [97]

    def test_writes_share_a_transaction_while_their_sizes_fit_800_kib(self) -> None:
        budget = 800 * 1024
        assert self.cut(budget // 2, budget - budget // 2) == [[budget // 2,
                                                                 budget - budget // 2]]
        assert self.cut(budget // 2, budget - budget // 2 + 1) == [[budget // 2],
                                                                   [budget - budget // 2 + 1]]
        assert self.cut(*[budget // 3] * 4) == [[budget // 3] * 3, [budget // 3]]

    def test_after_a_cut_a_transaction_fills_the_budget_again(self) -> None:
        budget = 800 * 1024
        assert self.cut(budget, budget // 2, budget - budget // 2) == [
            [budget], [budget // 2, budget - budget // 2]]

    @pytest.mark.parametrize("number", [3, 2**40, -(2**31), 2**31 - 1, -(2**31) - 1, 2**31])
    def test_an_entity_is_sized_as_table_counts_it(self, number: int) -> None:
        """Integers take 4 bytes within 32 bits and 8 beyond, at each edge."""
        row = {"PartitionKey": "p", "RowKey": "s:c", "code": "c", "value": "\U0001f697",
               "count": number, "seen": 1.5, "ok": True}
        assert table_store.entity_size(row) == size_of(row)
        assert size_of({"n": number}) - size_of({}) == 8 + 2 + (
            4 if -(2**31) <= number < 2**31 else 8)

    def test_large_changes_share_a_transaction_while_their_size_fits(
        self, azurite_table_port: int
    ) -> None:
        """Three changes whose outbox entries are about 180 KB each (values of 7,499
        characters outside the BMP, 12 ASCII characters each in the outbox) fit 800 KiB with
        their entities: one transaction, one outbox chunk, not a cut per change."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        car = "\U0001f697"
        event = state_event("e1", *(signal(f"custom-big{i}", "a" + car * 7_498)
                                    for i in range(3)))

        async def scenario() -> int:
            async with TableClient.from_connection_string(connection, table) as client:
                store = TableVehicleStateStore(Limited(client), create_table=True)
                await store.apply(event)
                row = await client.get_entity(VEHICLE, "i:e1")
                return int(row["chunks"])

        assert asyncio.run(scenario()) == 1

    def test_a_write_larger_than_the_budget_goes_alone(self) -> None:
        assert self.cut(10, 10**6, 10) == [[10], [10**6], [10]]
        assert self.cut(10**6) == [[10**6]]
        assert self.cut() == []


class TestPruningOnAzurite:
    """The inbox index (`!inbox-day:<day>` partitions) and the prune that reads it."""

    @staticmethod
    async def index_rows_now(connection: str, table: str) -> list[tuple[str, str]]:
        async with TableClient.from_connection_string(connection, table) as client:
            return sorted([(str(e["PartitionKey"]), str(e["partition"]))
                           async for e in client.list_entities()
                           if str(e["PartitionKey"]).startswith("!inbox-day:")])

    @classmethod
    def index_rows(cls, connection: str, table: str) -> list[tuple[str, str]]:
        return asyncio.run(cls.index_rows_now(connection, table))

    @staticmethod
    def store(connection: str, table: str, clock: Clock,
              fault: Callable[[Any], BaseException | None] | None = None,
              ) -> TableVehicleStateStore:
        client: Any = TableClient.from_connection_string(connection, table)
        if fault is not None:
            client = _FaultyTransactions(client, fault)
        return TableVehicleStateStore(client, create_table=True, clock=clock)

    def test_a_prune_deletes_in_transactions_of_one_partition_and_a_failed_one_waits(
        self, azurite_table_port: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        """150 expired records of one vehicle take two transactions (100 at most), and one
        vehicle's transaction never holds another's row (Table refuses that). A transaction
        that fails is logged and counted, the rest are deleted, and the next prune deletes
        what it left. The index rows of what was pruned go too."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        seen: list[Any] = []
        busy = [f"busy-{i:03d}" for i in range(150)]

        async def record() -> None:
            store = self.store(connection, table, clock)
            for event_id in busy:
                await store.mark_processed(VEHICLE, event_id)
            await store.mark_processed("quiet", "quiet-1")
            await store.close()

        async def prune() -> Any:
            store = self.store(connection, table, clock, fault)
            try:
                return await store.prune_inbox()
            finally:
                await store.close()

        fault = refusing_once("delete", "quiet", seen)
        asyncio.run(record())
        day = datetime.fromtimestamp(clock.now, UTC).date().isoformat()
        assert self.index_rows(connection, table) == [
            (f"!inbox-day:{day}", VEHICLE), (f"!inbox-day:{day}", "quiet")]
        clock.now += 9 * DAY
        first = asyncio.run(prune())
        left = Backend("table", connection, table).stored_event_ids()
        second = asyncio.run(prune())
        assert (first.deleted, first.failed) == (150, 1)
        assert "expired inbox records of partition 'quiet' could not be deleted" in caplog.text
        assert left == {"quiet-1"}
        assert (second.deleted, second.failed) == (1, 0)
        assert Backend("table", connection, table).stored_event_ids() == set()
        assert self.index_rows(connection, table) == []
        sizes = sorted(len(ops) for ops in seen)
        assert sizes == [1, 1, 50, 100]  # quiet refused, then deleted; busy in two
        for ops in seen:
            assert len({op[1]["PartitionKey"] for op in ops}) == 1

    def test_a_partition_whose_deletes_fail_half_way_counts_what_was_deleted(
        self, azurite_table_port: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        deletes: list[Any] = []

        def second_delete_refused(operations: Any) -> BaseException | None:
            from azure.core.exceptions import ResourceNotFoundError

            if operations[0][0] == "delete":
                deletes.append(operations)
                if len(deletes) == 2:
                    return ResourceNotFoundError("The specified resource does not exist.")
            return None

        async def scenario() -> tuple[Any, Any]:
            store = self.store(connection, table, clock, second_delete_refused)
            try:
                for n in range(150):
                    await store.mark_processed(VEHICLE, f"e{n:03d}")
                clock.now += 9 * DAY
                return await store.prune_inbox(), await store.prune_inbox()
            finally:
                await store.close()

        first, second = asyncio.run(scenario())
        assert (first.deleted, first.failed) == (100, 1)
        assert "(ResourceNotFoundError)" in caplog.text
        assert (second.deleted, second.failed) == (50, 0)

    def test_records_are_indexed_by_their_utc_day_whatever_the_machines_zone(
        self, azurite_table_port: int
    ) -> None:
        """23:30 UTC is already the next day at UTC+14: the index names the UTC day, the one
        the prune's cutoff is computed in."""
        import os
        import time

        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        clock.now = datetime(2027, 1, 15, 23, 30, tzinfo=UTC).timestamp()

        async def scenario() -> None:
            store = self.store(connection, table, clock)
            try:
                await store.mark_processed(VEHICLE, "late")
            finally:
                await store.close()

        zone = os.environ.get("TZ")
        os.environ["TZ"] = "LINE-14"  # POSIX: 14 hours east of UTC
        time.tzset()
        try:
            assert datetime.fromtimestamp(clock.now).date().isoformat() == "2027-01-16"
            asyncio.run(scenario())
        finally:
            if zone is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = zone
            time.tzset()
        assert self.index_rows(connection, table) == [("!inbox-day:2027-01-15", VEHICLE)]

    def test_only_days_wholly_past_the_retention_are_pruned(
        self, azurite_table_port: int
    ) -> None:
        """A record 8 days and a second old is past the retention, but its day is not over
        past it: the prune leaves that day (and records of 7 days) for a later run."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        clock.now = 1_800_057_600.0  # 2027-01-16T00:00:00Z

        async def scenario() -> tuple[Any, Any]:
            store = self.store(connection, table, clock)
            try:
                await store.mark_processed(VEHICLE, "late")  # day D, 00:00
                clock.now += 8 * DAY + 1
                early = await store.prune_inbox()  # cutoff: D 00:00:01
                clock.now += DAY - 2
                on_time = await store.prune_inbox()  # cutoff: D+1 00:00:00 minus 1 s
                clock.now += 1
                return early, (on_time, await store.prune_inbox())
            finally:
                await store.close()

        early, (still_early, due) = asyncio.run(scenario())
        assert (early.deleted, still_early.deleted, due.deleted) == (0, 0, 1)

    def test_a_prune_out_of_time_leaves_the_rest_to_the_next_run(
        self, azurite_table_port: int
    ) -> None:
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()

        async def scenario() -> tuple[Any, Any]:
            store = self.store(connection, table, clock)
            try:
                for vehicle in ("a", "b", "c"):
                    await store.mark_processed(vehicle, f"e-{vehicle}")
                clock.now += 9 * DAY
                return await store.prune_inbox(seconds=0), await store.prune_inbox()
            finally:
                await store.close()

        out_of_time, next_run = asyncio.run(scenario())
        assert (out_of_time.deleted, next_run.deleted) == (0, 3)
        assert self.index_rows(connection, table) == []

    def test_a_partition_whose_slot_came_free_after_the_time_is_up_does_not_start(
        self, azurite_table_port: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The time a partition waits for a free slot counts: with one slot, the first
        partition's deletes take the run to the end of its time, so the second, which waited
        for that slot, is left to the next run (a late start could outlast the timeout)."""
        from shared.vehicle_state import table_store

        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        elapsed = [0.0]
        monkeypatch.setattr(table_store, "_PRUNE_CONCURRENCY", 1)
        monkeypatch.setattr(table_store, "time",
                            SimpleNamespace(monotonic=lambda: elapsed[0]))

        def slow_deletes(operations: Any) -> None:
            if operations[0][0] == "delete":
                elapsed[0] += 100.0
            return None

        async def scenario() -> tuple[Any, Any]:
            store = self.store(connection, table, clock, slow_deletes)
            try:
                for vehicle in ("a", "b"):
                    await store.mark_processed(vehicle, f"e-{vehicle}")
                clock.now += 9 * DAY
                return await store.prune_inbox(seconds=100), await store.prune_inbox()
            finally:
                await store.close()

        out_of_time, next_run = asyncio.run(scenario())
        assert (out_of_time.deleted, next_run.deleted) == (1, 1)
        assert self.index_rows(connection, table) == []

    def test_an_index_write_that_fails_does_not_fail_the_record_and_is_made_at_the_next(
        self, azurite_table_port: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An instance notes a partition once a day; a note that failed is not remembered, so
        the next record makes it and the day's records are pruned in time."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        seen: list[Any] = []
        day = datetime.fromtimestamp(clock.now, UTC).date().isoformat()

        async def scenario() -> tuple[bool, Any]:
            store = self.store(connection, table, clock,
                               refusing_once("upsert", f"!inbox-day:{day}", seen))
            try:
                await store.mark_processed(VEHICLE, "e1")  # its note fails
                recorded = await store.is_processed(VEHICLE, "e1")
                for n in range(2, 6):
                    await store.mark_processed(VEHICLE, f"e{n}")
                clock.now += 9 * DAY
                return recorded, await store.prune_inbox()
            finally:
                await store.close()

        recorded, pruned = asyncio.run(scenario())
        assert recorded is True
        assert "noting partition" in caplog.text and "(HttpResponseError)" in caplog.text
        notes = [ops for ops in seen if ops[0][1]["PartitionKey"].startswith("!inbox-day:")]
        assert len(notes) == 2  # the failed one, then one for the day's other records
        assert pruned.deleted == 5

    @pytest.mark.parametrize("then", ["another vehicle records", "the prune runs"])
    def test_a_failed_note_of_a_vehicles_last_record_is_made_at_the_next_chance(
        self, azurite_table_port: int, caplog: pytest.LogCaptureFixture, then: str
    ) -> None:
        """A vehicle that records once and never again still has its day noted: the note
        that failed is written at the instance's next record, of any vehicle, or at the
        start of the next prune, and the record is pruned in time."""
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        seen: list[Any] = []
        day = datetime.fromtimestamp(clock.now, UTC).date().isoformat()

        async def scenario() -> tuple[list[tuple[str, str]], Any]:
            store = self.store(connection, table, clock,
                               refusing_once("upsert", f"!inbox-day:{day}", seen))
            try:
                await store.mark_processed("once", "e-once")  # its note fails
                noted = await self.index_rows_now(connection, table)
                clock.now += 60
                if then == "another vehicle records":
                    await store.mark_processed("other", "e-other")
                clock.now += 9 * DAY
                return noted, await store.prune_inbox()
            finally:
                await store.close()

        noted, pruned = asyncio.run(scenario())
        assert noted == []
        assert "noting partition 'once' in the inbox index failed" in caplog.text
        assert pruned.deleted == (2 if then == "another vehicle records" else 1)
        assert Backend("table", connection, table).stored_event_ids() == set()

    def test_notes_wait_behind_the_first_that_fails_and_only_so_many_wait(
        self, azurite_table_port: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While Table refuses notes, a record tries the waiting ones in order and stops at
        the first refusal; at most `_INDEXED_KEPT` wait (Table refusing for days must not
        grow an instance's memory without end)."""
        from azure.core.exceptions import HttpResponseError

        from shared.vehicle_state import table_store

        monkeypatch.setattr(table_store, "_INDEXED_KEPT", 2)
        connection = connection_string("table", azurite_table_port)
        table = f"vs{uuid.uuid4().hex[:16]}"
        clock = Clock()
        tried: list[str] = []
        refusing = [True]

        def notes_refused(operations: Any) -> BaseException | None:
            row = operations[0][1]
            if not row["PartitionKey"].startswith("!inbox-day:"):
                return None
            tried.append(row["partition"])
            return HttpResponseError("Server Busy") if refusing[0] else None

        async def scenario() -> list[list[str]]:
            store = self.store(connection, table, clock, notes_refused)
            tries = []
            try:
                for vehicle in ("a", "b", "c"):
                    await store.mark_processed(vehicle, f"e-{vehicle}")
                    tries.append(tried[:])
                    tried.clear()
                refusing[0] = False
                await store.mark_processed("d", "e-d")
                tries.append(tried[:])
                return tries
            finally:
                await store.close()

        tries = asyncio.run(scenario())
        # "c" is not kept (two wait already); "d" is written with the two that waited.
        assert tries == [["a"], ["a"], ["a"], ["a", "b", "d"]]
        assert [p for _, p in self.index_rows(connection, table)] == ["a", "b", "d"]
