"""The store's rules (shared/vehicle_state/rules.py) as properties: order-free, idempotent,
never back in time, newest oemUpdatedAt wins.

`MemoryStore` does what both backends do around the pure rules (read what the event touches,
plan, write the plan), without I/O; tests/test_vehicle_state_store.py runs the same permutation
property against the real SQLite backend, and the behaviour tests against both backends.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.events import Event, Signal, is_unicode, parse_event
from shared.vehicle_state import ErrorState, SignalChange, SignalState, SkippedSignal
from shared.vehicle_state.codec import signal_row
from shared.vehicle_state.rules import (
    _SURELY_FITTING_TEXT,
    BAD_ERROR,
    MAX_CODE_CHARS,
    MAX_ERROR_SIGNALS,
    MAX_TEXT_CHARS,
    MAX_VALUE_CHARS,
    MIN_OEM_UPDATED_AT,
    NO_CODE,
    NOT_UNICODE,
    OPEN,
    RESOLVED,
    RETRY_ALLOWANCE,
    TOO_LARGE,
    UNDATED,
    ErrorRecord,
    Plan,
    Snapshot,
    canonical_json,
    codes_of,
    error_keys_of,
    nests_deeper,
    plan,
    reading,
    shown,
    signal_rank,
    thawed,
    utf16_units,
    value_fits,
)

from .vehicle_events import SOC, T0, VEHICLE, error, error_event, signal, state_body, state_event


class MemoryStore:
    """The backends' apply, in memory: the reference the properties run on."""

    def __init__(self) -> None:
        self.signals: dict[str, SignalState] = {}
        self.errors: dict[tuple[str, str], ErrorRecord] = {}
        self.errors_applied: set[str] = set()

    def apply(self, event: Event) -> Any:
        snapshot = Snapshot(
            vehicle_id=VEHICLE,
            signals={c: self.signals[c] for c in codes_of(event) if c in self.signals},
            errors={k: self.errors[k] for k in error_keys_of(event) if k in self.errors},
            errors_applied=event.event_id in self.errors_applied,
        )
        result = plan(snapshot, event)
        self.signals.update(result.signals)
        self.errors.update(result.errors)
        if result.marks_errors:
            self.errors_applied.add(event.event_id)
        return result

    def state(self) -> tuple[dict[str, SignalState], dict[tuple[str, str], ErrorRecord]]:
        return dict(self.signals), dict(self.errors)


# --- strategies ------------------------------------------------------------------------------
CODES = ["tractionbattery-stateofcharge", "charge-ischarging", "odometer-traveleddistance"]
OEMS = [None, T0, T0 + 1000, T0 + 2000]
#: An empty code and none key the same error (`error_key`), whichever arrives first.
ERROR_KEYS = [("COMPATIBILITY", "VEHICLE_NOT_CAPABLE"), ("COMPATIBILITY", None),
              ("COMPATIBILITY", ""), ("PERMISSION", "DENIED")]
DELIVERIES = [T0, T0 + 60_000, T0 + 600_000]  # 0, 1 min (within the retry allowance), 10 min


@st.composite
def signal_items(draw: st.DrawFn) -> dict[str, Any]:
    code = draw(st.sampled_from(CODES))
    meta: dict[str, Any] = {}
    oem = draw(st.sampled_from(OEMS))
    if oem is not None:
        meta["oemUpdatedAt"] = oem
    if draw(st.booleans()):
        meta["retrievedAt"] = T0 + 5000
    item: dict[str, Any] = {"code": code, "meta": meta}
    if draw(st.integers(0, 5)) == 0:
        item["status"] = {"value": "ERROR", "error": {"type": "COMPATIBILITY",
                                                       "code": "VEHICLE_NOT_CAPABLE"}}
    else:
        item["body"] = {"value": draw(st.integers(0, 3)), "unit": "percent"}
    return item


@st.composite
def error_items(draw: st.DrawFn) -> dict[str, Any]:
    error_type, code = draw(st.sampled_from(ERROR_KEYS))
    return {"type": error_type, "code": code,
            "state": draw(st.sampled_from(["ERROR", "RESOLVED"])),
            "description": draw(st.sampled_from(["a", "b"])),
            "signals": [{"code": c} for c in draw(st.lists(st.sampled_from(CODES), max_size=2))]}


@st.composite
def event_sets(draw: st.DrawFn) -> list[Event]:
    count = draw(st.integers(1, 6))
    events = []
    for index in range(count):
        delivered = draw(st.sampled_from(DELIVERIES))
        if draw(st.booleans()):
            body: dict[str, Any] = {
                "eventId": f"e{index}", "eventType": "VEHICLE_STATE", "vehicleId": VEHICLE,
                "data": {"signals": draw(st.lists(signal_items(), min_size=1, max_size=3))},
                "meta": {"deliveredAt": delivered}}
        else:
            body = {
                "eventId": f"e{index}", "eventType": "VEHICLE_ERROR", "vehicleId": VEHICLE,
                "data": {"errors": draw(st.lists(error_items(), min_size=1, max_size=3))},
                "meta": {"deliveredAt": delivered}}
        events.append(parse_event(json.dumps(body)))
    return events


@st.composite
def orders(draw: st.DrawFn, size: int) -> list[int]:
    """Every index at least once, some twice or more, in any order."""
    extra = draw(st.lists(st.integers(0, size - 1), max_size=size * 2))
    return draw(st.permutations([*range(size), *extra]))


def run(events: list[Event], order: list[int]) -> MemoryStore:
    store = MemoryStore()
    for index in order:
        store.apply(events[index])
    return store


# --- properties ------------------------------------------------------------------------------
class TestOrderFree:
    @settings(max_examples=400, deadline=None)
    @given(data=st.data())
    def test_any_order_with_duplicates_ends_in_the_same_state(self, data: st.DataObject) -> None:
        events = data.draw(event_sets())
        first = data.draw(orders(len(events)))
        second = data.draw(orders(len(events)))
        assert run(events, first).state() == run(events, second).state()

    @settings(max_examples=200, deadline=None)
    @given(data=st.data())
    def test_applying_an_event_again_changes_nothing(self, data: st.DataObject) -> None:
        events = data.draw(event_sets())
        store = run(events, list(range(len(events))))
        before = store.state()
        again = store.apply(events[data.draw(st.integers(0, len(events) - 1))])
        assert again.changes == () and again.signals == {} and again.errors == {}
        assert store.state() == before

    @settings(max_examples=200, deadline=None)
    @given(data=st.data())
    def test_a_stored_reading_never_goes_back_in_time(self, data: st.DataObject) -> None:
        events = data.draw(event_sets())
        store = MemoryStore()
        for index in data.draw(orders(len(events))):
            before = dict(store.signals)
            store.apply(events[index])
            for code, state in before.items():
                assert signal_rank(store.signals[code]) >= signal_rank(state)

    @settings(max_examples=200, deadline=None)
    @given(data=st.data())
    def test_the_newest_oem_updated_at_wins(self, data: st.DataObject) -> None:
        # An oracle that does not use the rules: among dated readings with distinct times, the
        # stored value is the one with the greatest oemUpdatedAt.
        times = data.draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=8, unique=True))
        values = {t: data.draw(st.integers()) for t in times}
        events = [parse_event(json.dumps({
            "eventId": f"e{i}", "eventType": "VEHICLE_STATE", "vehicleId": VEHICLE,
            "data": {"signals": [{"code": CODES[0], "body": {"value": values[t]},
                                  "meta": {"oemUpdatedAt": T0 + t}}]}}))
            for i, t in enumerate(times)]
        store = run(events, data.draw(orders(len(events))))
        assert store.signals[CODES[0]].value == values[max(times)]


class TestErrorRules:
    def test_resolved_closes_an_error_it_follows_and_not_one_it_precedes(self) -> None:
        def make(event_id: str, state: str, at: int) -> Event:
            return parse_event(json.dumps({
                "eventId": event_id, "eventType": "VEHICLE_ERROR", "vehicleId": VEHICLE,
                "data": {"errors": [{"type": "T", "code": "C", "state": state}]},
                "meta": {"deliveredAt": at}}))

        key = ("T", "C")
        late_resolve = run([make("a", "ERROR", T0), make("b", "RESOLVED", T0 + 600_000)], [1, 0])
        assert late_resolve.errors[key].state.state == RESOLVED
        early_resolve = run([make("a", "ERROR", T0 + 600_000), make("b", "RESOLVED", T0)], [0, 1])
        assert early_resolve.errors[key].state.state == OPEN
        # An ERROR restamped by Smartcar's retries (up to ~3 minutes later) does not reopen it.
        retried = run([make("a", "ERROR", T0 + 170_000), make("b", "RESOLVED", T0)], [1, 0])
        assert retried.errors[key].state.state == RESOLVED
        assert retried.errors[key].state.resolved_at == datetime.fromtimestamp(T0 / 1000, UTC)


def test_memory_store_matches_the_sqlite_backend(tmp_path: Path) -> None:
    # The reference above is what the backends do: one fixed sequence through both.
    from shared.local.vehicle_state import SqliteVehicleStateStore

    events = _fixed_events()
    memory = run(events, list(range(len(events))))
    store = SqliteVehicleStateStore(tmp_path / "v.sqlite3")

    async def apply_all() -> Any:
        for event in events:
            await store.apply(event)
        return await store.get_vehicle(VEHICLE)

    view = asyncio.run(apply_all())
    assert view is not None
    assert dict(view.signals) == memory.signals
    assert list(view.errors) == [r.state for _, r in sorted(memory.errors.items())
                                 if r.state.state == OPEN]


def _fixed_events() -> list[Event]:
    return [
        parse_event(json.dumps({
            "eventId": "s1", "eventType": "VEHICLE_STATE", "vehicleId": VEHICLE,
            "data": {"signals": [{"code": CODES[0], "body": {"value": 1},
                                  "meta": {"oemUpdatedAt": T0}},
                                 {"code": CODES[1], "body": {"value": True}}]}})),
        parse_event(json.dumps({
            "eventId": "x1", "eventType": "VEHICLE_ERROR", "vehicleId": VEHICLE,
            "data": {"errors": [{"type": "T", "code": "C", "state": "ERROR"},
                                {"type": "U", "code": None, "state": "ERROR"}]},
            "meta": {"deliveredAt": T0}})),
    ]


# `value_fits` skips serialising values that cannot be too long; it must still agree with
# measuring the canonical JSON, for every value, including strings near the shortcut's bound
# made of the characters that grow most (controls escape to 6 bytes, astral ones take 4).
_GROWING = st.sampled_from(["\x00", "\x1f", '"', "\\", "é", "€", "\U0001f600", "a"])


@given(st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(10 ** 60), max_value=10 ** 60),
    st.text(_GROWING, min_size=_SURELY_FITTING_TEXT - 3, max_size=_SURELY_FITTING_TEXT + 3),
    st.text(_GROWING, min_size=MAX_VALUE_CHARS // 6, max_size=MAX_VALUE_CHARS // 3),
    st.lists(st.integers(), max_size=5),
))
@settings(max_examples=60, deadline=None)
def test_value_fits_agrees_with_measuring_the_json(value: Any) -> None:
    signal = Signal(code="c", value=value)
    assert value_fits(signal) == (len(canonical_json(value).encode()) <= MAX_VALUE_CHARS)


def test_the_value_limit_counts_utf8_bytes_as_documented() -> None:
    # docs/vehicle-state.md: over 30,000 bytes in UTF-8, so `é` (two bytes) counts twice.
    fits = "é" * ((MAX_VALUE_CHARS - 2) // 2)  # with its quotes, exactly 30,000 bytes
    assert value_fits(Signal(code="c", value=fits))
    assert not value_fits(Signal(code="c", value=fits + "é"))
    assert len(fits + "é") + 2 < MAX_VALUE_CHARS  # in characters it would fit


def test_value_fits_refuses_a_string_of_controls_just_past_the_shortcut() -> None:
    # Short in characters but six bytes each once escaped: measured, not waved through.
    value = "\x00" * (MAX_VALUE_CHARS // 6 + 1)
    assert len(value) > _SURELY_FITTING_TEXT
    assert not value_fits(Signal(code="c", value=value))
    assert value_fits(Signal(code="c", value="\x00" * _SURELY_FITTING_TEXT))


def test_stored_times_keep_their_own_offset() -> None:
    # Equal instants in different zones compare equal; each row must still spell its own.
    utc = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    plus_one = utc.astimezone(timezone(timedelta(hours=1)))
    assert signal_row(SignalState(code="c", oem_updated_at=utc))["oemUpdatedAt"] == (
        "2026-01-02T03:04:05+00:00")
    assert signal_row(SignalState(code="c", oem_updated_at=plus_one))["oemUpdatedAt"] == (
        "2026-01-02T04:04:05+01:00")
    assert signal_row(SignalState(code="c", oem_updated_at=utc))["oemUpdatedAt"] == (
        "2026-01-02T03:04:05+00:00")


# --- the error rules, example by example ------------------------------------------------------
# The properties above compare whole runs with each other; these pin what one plan holds.
def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _plan_error_event(*errors: dict[str, Any], snapshot: Snapshot | None = None,
                      event_id: str = "x1", delivered: int = T0) -> Any:
    return plan(snapshot or Snapshot(vehicle_id=VEHICLE),
                error_event(event_id, *errors, delivered=delivered))


class TestOneErrorEvent:
    def test_an_error_opens_with_its_times_count_details_and_event(self) -> None:
        result = _plan_error_event(error("T", "C", description="d", signals=("s1", "s2")),
                                   delivered=T0 + 5000)
        (record,) = result.errors.values()
        assert record.state == ErrorState(
            type="T", code="C", state=OPEN, first_seen=_at(T0 + 5000),
            last_seen=_at(T0 + 5000), count=1, description="d",
            resolution_type="CONTACT_SUPPORT", signals=("s1", "s2"), event_id="x1")
        assert record.last_error is not None and record.last_resolved is None
        assert record.last_error.key() == (_at(T0 + 5000), "x1")
        assert result.errors_opened == (record.state,) and result.errors_resolved == ()
        assert result.updated_at == _at(T0 + 5000) and result.marks_errors

    def test_an_error_without_a_code_is_keyed_by_an_empty_code(self) -> None:
        # The key both backends store an error under (SQLite's `code` column, the table's
        # RowKey): rows already written hold "" for an error without a code.
        event = error_event("x1", error("T", None))
        assert error_keys_of(event) == [("T", "")]
        assert list(plan(Snapshot(vehicle_id=VEHICLE), event).errors) == [("T", "")]

    def test_a_repeated_entry_counts_once(self) -> None:
        result = _plan_error_event(error("T", "C"), error("T", "C"))
        assert result.errors[("T", "C")].state.count == 1

    def test_error_then_resolved_in_one_event_keeps_both_observations(self) -> None:
        result = _plan_error_event(error("T", "C"), error("T", "C", state="RESOLVED"))
        record = result.errors[("T", "C")]
        assert record.last_error is not None and record.last_resolved is not None
        assert (record.state.state, record.state.count) == (RESOLVED, 1)
        assert record.state.first_seen == record.state.last_seen == _at(T0)
        assert record.state.resolved_at == _at(T0)
        assert result.errors_opened == () and result.errors_resolved == (record.state,)

    def test_a_resolved_alone_neither_counts_nor_sets_the_error_times(self) -> None:
        record = _plan_error_event(error("T", "C", state="RESOLVED")).errors[("T", "C")]
        assert (record.state.state, record.state.count) == (RESOLVED, 0)
        assert (record.state.first_seen, record.state.last_seen) == (None, None)
        assert record.last_error is None

    @pytest.mark.parametrize("order", [(0, 1), (1, 0)])
    def test_entries_of_one_event_that_differ_only_in_detail_agree_in_any_order(
        self, order: tuple[int, int]
    ) -> None:
        # The tie-break on content makes the stored details independent of payload order.
        pairs = [
            (error("T", "C", description="first"), error("T", "C", description="second")),
            (error("T", "C", signals=("s1",)), error("T", "C", signals=("s2",))),
        ]
        for pair in pairs:
            expected = _plan_error_event(*pair).errors[("T", "C")].state
            flipped = _plan_error_event(*(pair[i] for i in order)).errors[("T", "C")].state
            assert flipped == expected

    def test_bad_entries_are_skipped_with_their_code_and_the_rest_kept(self) -> None:
        long = "x" * (MAX_CODE_CHARS + 1)
        result = _plan_error_event(
            error(None, "no-type"),  # type: ignore[arg-type]
            error("T", "bad-state", state="PENDING"),
            error(long, "long-type"),
            error("T", long),
            error("T", "C"),
        )
        assert result.skipped == tuple(
            SkippedSignal(code=c, reason=BAD_ERROR)
            for c in ("no-type", "bad-state", "long-type", long))
        assert list(result.errors) == [("T", "C")]

    def test_a_type_and_a_code_of_the_longest_length_are_kept(self) -> None:
        longest = "x" * MAX_CODE_CHARS
        result = _plan_error_event(error(longest, longest))
        assert list(result.errors) == [(longest, longest)] and result.skipped == ()

    def test_only_bad_entries_write_nothing_but_the_applied_mark(self) -> None:
        later = _at(T0 + 3_600_000)
        result = _plan_error_event(error("T", "C", state="PENDING"),
                                   snapshot=Snapshot(vehicle_id=VEHICLE, updated_at=later))
        assert result.errors == {} and result.updated_at == later and result.marks_errors
        assert _plan_error_event(error("T", "C", state="PENDING")).updated_at is None


class TestErrorEventOverStoredState:
    def test_the_vehicles_updated_at_only_moves_forward(self) -> None:
        later = _at(T0 + 3_600_000)
        stored = Snapshot(vehicle_id=VEHICLE, updated_at=later)
        assert _plan_error_event(error("T", "C"), snapshot=stored).updated_at == later
        earlier = Snapshot(vehicle_id=VEHICLE, updated_at=_at(T0 - 1000))
        assert _plan_error_event(error("T", "C"), snapshot=earlier).updated_at == _at(T0)

    def test_an_event_whose_errors_were_applied_writes_nothing_and_reports_its_skips(
        self
    ) -> None:
        stored = Snapshot(vehicle_id=VEHICLE, errors_applied=True, updated_at=_at(T0))
        result = _plan_error_event(error("T", "C"), error("T", "x", state="PENDING"),
                                   snapshot=stored)
        assert result == Plan(skipped=(SkippedSignal(code="x", reason=BAD_ERROR),),
                              updated_at=_at(T0))

    def test_a_stored_error_counts_on_and_keeps_its_first_sighting(self) -> None:
        first = _plan_error_event(error("T", "C"), event_id="x1", delivered=T0)
        stored = Snapshot(vehicle_id=VEHICLE, errors=first.errors)
        second = _plan_error_event(error("T", "C"), snapshot=stored, event_id="x2",
                                   delivered=T0 + 60_000)
        state = second.errors[("T", "C")].state
        assert (state.count, state.first_seen, state.last_seen) == (2, _at(T0), _at(T0 + 60_000))
        # An earlier delivery arriving last moves neither the last sighting nor the first.
        third = _plan_error_event(error("T", "C"), snapshot=Snapshot(
            vehicle_id=VEHICLE, errors=second.errors), event_id="x0", delivered=T0 + 30_000)
        state = third.errors[("T", "C")].state
        assert (state.count, state.first_seen, state.last_seen) == (3, _at(T0), _at(T0 + 60_000))
        assert third.errors[("T", "C")].last_error == second.errors[("T", "C")].last_error

    def test_errors_the_event_counted_already_are_observed_again_but_not_counted(
        self
    ) -> None:
        """An apply cut short between transactions: of the event's errors, those it wrote
        (`errors_counted`) keep their count; the rest count this event once."""
        first = _plan_error_event(error("T", "A"), error("T", "B"), event_id="x1",
                                  delivered=T0)
        partly = {key: record for key, record in first.errors.items() if key == ("T", "A")}
        again = _plan_error_event(error("T", "A"), error("T", "B"), event_id="x1",
                                  delivered=T0, snapshot=Snapshot(
                                      vehicle_id=VEHICLE, errors=partly,
                                      errors_counted=frozenset({("T", "A")})))
        assert again.errors == first.errors
        assert [s.count for s in again.errors_opened] == [1, 1]

    def test_resolving_is_reported_once(self) -> None:
        opened = _plan_error_event(error("T", "C"), event_id="x1", delivered=T0)
        resolved = _plan_error_event(error("T", "C", state="RESOLVED"), snapshot=Snapshot(
            vehicle_id=VEHICLE, errors=opened.errors), event_id="x2", delivered=T0 + 600_000)
        assert [s.state for s in resolved.errors_resolved] == [RESOLVED]
        again = _plan_error_event(error("T", "C", state="RESOLVED"), snapshot=Snapshot(
            vehicle_id=VEHICLE, errors=resolved.errors), event_id="x3", delivered=T0 + 700_000)
        assert again.errors[("T", "C")].state.state == RESOLVED
        assert again.errors_resolved == () and again.errors_opened == ()
        assert again.errors[("T", "C")].state.resolved_at == _at(T0 + 700_000)


class TestErrorDetails:
    def _state(self, entry: dict[str, Any]) -> ErrorState:
        record: ErrorRecord = _plan_error_event(entry).errors[(entry["type"], entry["code"])]
        return record.state

    def test_signals_are_named_by_code_else_by_path_else_left_empty(self) -> None:
        entry = error("T", "C")
        entry["signals"] = [{"code": "c1"}, {"group": "TractionBattery", "name": "Range"},
                            {"name": "OnlyAName"}]
        assert self._state(entry).signals == ("c1", "TractionBattery.Range", "")

    def test_description_signals_and_codes_are_cut_to_their_bounds(self) -> None:
        entry = error("T", "C", description="d" * (MAX_TEXT_CHARS + 10))
        entry["signals"] = [{"code": "s" * (MAX_CODE_CHARS + 10)}] + [
            {"code": f"c{i}"} for i in range(MAX_ERROR_SIGNALS + 10)]
        state = self._state(entry)
        assert state.description == "d" * MAX_TEXT_CHARS
        assert len(state.signals) == MAX_ERROR_SIGNALS
        assert state.signals[0] == "s" * MAX_CODE_CHARS
        assert state.signals[-1] == f"c{MAX_ERROR_SIGNALS - 2}"

    @pytest.mark.parametrize(("last", "kept"), [("ab", 25), ("abc", 24)])
    def test_signals_are_kept_while_their_json_fits_the_bound_exactly(
        self, last: str, kept: int
    ) -> None:
        """24 entries of 200 control characters (1,202 UTF-16 units each as JSON, `\\u0001`)
        and a 25th of 1,126 units with "ab" make a list of exactly MAX_VALUE_CHARS units: all
        kept; one unit more and the 25th is left out, and so is whatever follows."""
        sent = ["\x01" * 200] * 24 + ["\x01" * 187 + last]
        assert utf16_units(canonical_json(sent)) == MAX_VALUE_CHARS + len(last) - 2
        entry = error("T", "C")
        entry["signals"] = [{"code": code} for code in [*sent, "z"]]
        assert self._state(entry).signals == tuple(sent[:kept])

    def test_a_resolution_type_is_cut_and_text_outside_the_bmp_counts_twice(self) -> None:
        entry = {**error("T", "C"), "resolution": {"type": "r" * (MAX_CODE_CHARS + 1)}}
        assert self._state(entry).resolution_type == "r" * MAX_CODE_CHARS
        assert utf16_units("a\U0001f697\u00e9") == 4 and utf16_units("abc") == 3

    def test_no_description_and_no_resolution_are_none(self) -> None:
        entry = error("T", "C")
        del entry["description"], entry["resolution"]
        state = self._state(entry)
        assert (state.description, state.resolution_type) == (None, None)
        entry["description"] = ""
        assert self._state(entry).description is None

    def test_a_later_observation_replaces_the_details_an_earlier_one_does_not(self) -> None:
        first = _plan_error_event(error("T", "C", description="old"), event_id="x1",
                                  delivered=T0)
        later = _plan_error_event(error("T", "C", description="new", signals=()),
                                  snapshot=Snapshot(vehicle_id=VEHICLE, errors=first.errors),
                                  event_id="x2", delivered=T0 + 1000)
        state = later.errors[("T", "C")].state
        assert (state.description, state.signals, state.event_id) == ("new", (), "x2")
        earlier = _plan_error_event(error("T", "C", description="older"),
                                    snapshot=Snapshot(vehicle_id=VEHICLE, errors=later.errors),
                                    event_id="x0", delivered=T0 - 1000)
        assert earlier.errors[("T", "C")].state.description == "new"
        assert earlier.errors[("T", "C")].state.event_id == "x2"

    def test_a_resolved_exactly_the_retry_allowance_before_the_error_closes_it(self) -> None:
        allowance_ms = int(RETRY_ALLOWANCE.total_seconds() * 1000)
        opened = _plan_error_event(error("T", "C"), event_id="x1", delivered=T0 + allowance_ms)
        stored = Snapshot(vehicle_id=VEHICLE, errors=opened.errors)
        closed = _plan_error_event(error("T", "C", state="RESOLVED"), snapshot=stored,
                                   event_id="r1", delivered=T0)
        state = closed.errors[("T", "C")].state
        assert (state.state, state.resolved_at) == (RESOLVED, _at(T0))
        still_open = _plan_error_event(error("T", "C", state="RESOLVED"), snapshot=stored,
                                       event_id="r0", delivered=T0 - 1)
        state = still_open.errors[("T", "C")].state
        assert (state.state, state.resolved_at) == (OPEN, None)
        assert still_open.errors_opened == (state,)


# --- the signal rules, example by example -----------------------------------------------------
def _plan_state_event(*signals: dict[str, Any], snapshot: Snapshot | None = None,
                      event_id: str = "s1") -> Any:
    return plan(snapshot or Snapshot(vehicle_id=VEHICLE), state_event(event_id, *signals))


class TestOneStateEvent:
    def test_a_reading_is_stored_whole_and_reported_as_a_change(self) -> None:
        result = _plan_state_event(signal(SOC, 81, oem=T0, retrieved=T0 + 500),
                                   snapshot=Snapshot(vehicle_id=VEHICLE,
                                                     updated_at=_at(T0 - 1000)))
        expected = SignalState(code=SOC, path="TractionBattery.StateOfCharge", value=81,
                               unit="percent", oem_updated_at=_at(T0),
                               retrieved_at=_at(T0 + 500), event_id="s1")
        assert result.signals == {SOC: expected}
        assert result.changes == (SignalChange(vehicle_id=VEHICLE, code=SOC,
                                               path=expected.path, previous=None,
                                               current=expected),)
        assert (result.stale, result.skipped, result.updated_at) == ((), (), _at(T0))
        assert not result.marks_errors

    @pytest.mark.parametrize(("again", "refreshed"), [
        ({}, True),  # only fetched later
        ({"value": 81.0}, False),  # another JSON value, though equal in Python
        ({"unit": "km"}, False),
        ({"oem": T0 + 1}, False),  # a newer reading of the same value
        ({"error": ("T", "C")}, False),
        ({"group": "Other"}, False),  # another path
    ])
    def test_the_stored_reading_fetched_again_is_written_but_no_change(
        self, again: dict[str, Any], refreshed: bool
    ) -> None:
        stored = _plan_state_event(signal(SOC, 81, oem=T0, retrieved=T0 + 500)).signals
        fields: dict[str, Any] = {"value": 81, "oem": T0, "retrieved": T0 + 60_000, **again}
        value = fields.pop("value")
        result = _plan_state_event(signal(SOC, value, **fields), event_id="s2",
                                   snapshot=Snapshot(vehicle_id=VEHICLE, signals=stored))
        assert result.signals[SOC].retrieved_at == _at(T0 + 60_000)
        assert result.refreshed == ((SOC,) if refreshed else ())
        assert [c.code for c in result.changes] == ([] if refreshed else [SOC])

    @pytest.mark.parametrize(("again", "refreshed"), [
        (("T", "C"), True), (("T", "D"), False), (("U", "C"), False)])
    def test_a_failed_signal_fetched_again_is_no_change_unless_its_error_differs(
        self, again: tuple[str, str], refreshed: bool
    ) -> None:
        stored = _plan_state_event(signal(SOC, error=("T", "C"), retrieved=T0 + 500)).signals
        result = _plan_state_event(signal(SOC, error=again, retrieved=T0 + 60_000),
                                   event_id="s2",
                                   snapshot=Snapshot(vehicle_id=VEHICLE, signals=stored))
        assert result.signals[SOC].retrieved_at == _at(T0 + 60_000)
        assert result.refreshed == ((SOC,) if refreshed else ())

    def test_a_failure_without_details_after_an_empty_reading_is_a_change(self) -> None:
        # Only the status tells them apart: no value, no unit, no error type or code.
        stored = _plan_state_event(signal(SOC, None, unit=None, retrieved=T0 + 500)).signals
        failed = signal(SOC, None, unit=None, retrieved=T0 + 60_000)
        del failed["body"]
        failed["status"] = {"value": "ERROR"}
        result = _plan_state_event(failed, event_id="s2",
                                   snapshot=Snapshot(vehicle_id=VEHICLE, signals=stored))
        assert result.signals[SOC].status == "error" and stored[SOC].status == "ok"
        assert [c.code for c in result.changes] == [SOC] and result.refreshed == ()

    @pytest.mark.parametrize(("value", "error", "refreshed"), [
        (81, None, True), (80, None, False), (None, ("T", "C"), True), (None, ("T", "D"), False)])
    def test_an_undated_reading_fetched_again_is_no_change_unless_its_content_differs(
        self, value: Any, error: tuple[str, str] | None, refreshed: bool
    ) -> None:
        # A failed signal has no oemUpdatedAt: each delivery brings it again, with a later
        # retrievedAt or another eventId, which ranks it higher; its content says whether it
        # changed. And an undated reading never equals a dated one.
        stored = _plan_state_event(signal(SOC, 81, oem=None, retrieved=T0, error=(
            ("T", "C") if error else None))).signals
        result = _plan_state_event(signal(SOC, value, oem=None, retrieved=T0 + 1000,
                                          error=error), event_id="s2",
                                   snapshot=Snapshot(vehicle_id=VEHICLE, signals=stored))
        assert result.signals[SOC].retrieved_at == _at(T0 + 1000)
        assert result.refreshed == ((SOC,) if refreshed else ())
        assert [c.code for c in result.changes] == ([] if refreshed else [SOC])

    def test_an_undated_reading_after_a_dated_one_of_the_same_value_is_stale(self) -> None:
        stored = _plan_state_event(signal(SOC, 81, oem=T0)).signals
        result = _plan_state_event(signal(SOC, 81, oem=None, retrieved=T0 + 1000),
                                   event_id="s2",
                                   snapshot=Snapshot(vehicle_id=VEHICLE, signals=stored))
        assert result.stale == (SOC,) and result.refreshed == () and result.changes == ()

    def test_a_failed_signal_keeps_its_error_and_no_value(self) -> None:
        result = _plan_state_event(signal(SOC, error=("COMPATIBILITY", "NOT_CAPABLE")))
        state = result.signals[SOC]
        assert (state.status, state.value, state.unit) == ("error", None, None)
        assert (state.error_type, state.error_code) == ("COMPATIBILITY", "NOT_CAPABLE")

    def test_a_value_is_stored_as_plain_lists_and_dicts(self) -> None:
        result = _plan_state_event(signal("location-preciselocation",
                                          {"a": [1, {"b": [2]}], "c": None}, unit=None))
        value = result.signals["location-preciselocation"].value
        assert value == {"a": [1, {"b": [2]}], "c": None}
        assert type(value) is dict and type(value["a"]) is list and type(value["a"][1]) is dict

    def test_a_code_is_made_from_group_and_name_when_missing(self) -> None:
        item = signal("", 1, group="Charge", name="IsCharging")
        del item["code"]
        assert list(_plan_state_event(item).signals) == ["charge-ischarging"]

    def test_a_signal_without_any_code_or_with_an_overlong_one_is_skipped(self) -> None:
        no_code = {"body": {"value": 1}, "meta": {"oemUpdatedAt": T0}}
        only_name = {"name": "IsCharging", "body": {"value": 1}}
        too_long = signal("x" * (MAX_CODE_CHARS + 1), 1)
        longest = signal("y" * MAX_CODE_CHARS, 1)
        result = _plan_state_event(no_code, only_name, too_long, longest)
        assert result.skipped == (SkippedSignal(code=None, reason=NO_CODE),
                                  SkippedSignal(code=None, reason=NO_CODE),
                                  SkippedSignal(code="x" * (MAX_CODE_CHARS + 1), reason=NO_CODE))
        assert list(result.signals) == ["y" * MAX_CODE_CHARS]

    def test_a_value_too_large_is_skipped_but_a_failed_signal_never_is(self) -> None:
        big = "v" * MAX_VALUE_CHARS
        result = _plan_state_event(signal("charge-big", big),
                                   signal("charge-failed", big, error=("T", "C")))
        assert result.skipped == (SkippedSignal(code="charge-big", reason=TOO_LARGE),)
        assert list(result.signals) == ["charge-failed"]

    @pytest.mark.parametrize(("oem", "retrieved", "delivered", "usable"), [
        (None, None, T0, False),
        (int(MIN_OEM_UPDATED_AT.timestamp() * 1000) - 1, None, T0, False),
        (int(MIN_OEM_UPDATED_AT.timestamp() * 1000), None, T0, True),
        (T0 + 86_400_000 + 1, T0, None, False),  # more than a day after its own retrieval
        (T0 + 86_400_000, T0, None, True),
        (T0 + 86_400_000 + 1, None, T0, False),  # more than a day after its delivery
        (T0 + 86_400_000 + 1, T0 + 86_400_000, T0, False),  # whichever is earlier bounds it
        (T0 + 86_400_000, None, T0, True),
        (T0 + 86_400_000 + 1, None, None, True),  # nothing to compare with
    ])
    def test_an_unusable_oem_updated_at_is_recorded_as_undated(
        self, oem: int | None, retrieved: int | None, delivered: int | None, usable: bool
    ) -> None:
        body = state_body("s1", signal(SOC, 1, oem=oem, retrieved=retrieved))
        if delivered is None:
            del body["meta"]["deliveredAt"]
        else:
            body["meta"]["deliveredAt"] = delivered
        result = plan(Snapshot(vehicle_id=VEHICLE), parse_event(json.dumps(body)))
        state = result.signals[SOC]
        assert (state.oem_updated_at is not None) == usable
        assert result.skipped == (() if usable else (SkippedSignal(code=SOC, reason=UNDATED),))
        assert result.updated_at == (state.oem_updated_at if usable else None)

    def test_a_reading_dated_far_after_its_delivery_does_not_hide_later_ones(self) -> None:
        # An OEM clock in 2100, without a retrievedAt: kept as undated, so the next real
        # reading replaces it instead of being stale for good.
        bogus = _plan_state_event(signal(SOC, 99, oem=4_102_444_800_000)).signals
        real = _plan_state_event(signal(SOC, 50, oem=T0 + 1000), event_id="s2",
                                 snapshot=Snapshot(vehicle_id=VEHICLE, signals=bogus))
        assert [c.code for c in real.changes] == [SOC] and real.signals[SOC].value == 50

    def test_of_two_readings_in_one_event_the_newer_is_kept_in_either_order(self) -> None:
        old, new = signal(SOC, 1, oem=T0), signal(SOC, 2, oem=T0 + 1000)
        for pair in ((old, new), (new, old)):
            result = _plan_state_event(*pair)
            assert result.signals[SOC].value == 2 and result.stale == (SOC,)
            assert len(result.changes) == 1

    def test_the_latest_reading_time_of_the_event_is_the_vehicles_updated_at(self) -> None:
        result = _plan_state_event(signal(SOC, 1, oem=T0 + 5000), signal("charge-x", 1, oem=T0),
                                   signal("charge-y", 1, oem=None))
        assert result.updated_at == _at(T0 + 5000)


class TestStateEventOverStoredState:
    def test_an_older_or_equal_reading_is_stale_and_a_newer_replaces_it(self) -> None:
        stored = _plan_state_event(signal(SOC, 1, oem=T0)).signals
        snapshot = Snapshot(vehicle_id=VEHICLE, signals=stored, updated_at=_at(T0))
        older = _plan_state_event(signal(SOC, 0, oem=T0 - 1000), snapshot=snapshot,
                                  event_id="s0")
        assert (older.signals, older.changes, older.stale) == ({}, (), (SOC,))
        assert older.updated_at == _at(T0)
        same = _plan_state_event(signal(SOC, 1, oem=T0), snapshot=snapshot)
        assert (same.signals, same.stale) == ({}, (SOC,))
        newer = _plan_state_event(signal(SOC, 2, oem=T0 + 1000), snapshot=snapshot,
                                  event_id="s2")
        (change,) = newer.changes
        assert change.previous == stored[SOC] and change.current == newer.signals[SOC]
        assert newer.stale == () and newer.updated_at == _at(T0 + 1000)

    def test_a_stored_updated_at_later_than_the_reading_stays(self) -> None:
        later = Snapshot(vehicle_id=VEHICLE, updated_at=_at(T0 + 9000))
        assert _plan_state_event(signal(SOC, 1, oem=T0), snapshot=later).updated_at == (
            _at(T0 + 9000))


class TestWhatIsStored:
    @pytest.mark.parametrize("body", [
        {"eventId": "e", "eventType": "VEHICLE_STATE",  # no vehicleId
         "data": {"signals": [{"code": SOC, "body": {"value": 1}}]}},
        {"eventId": "e", "eventType": "VEHICLE_COMMAND", "vehicleId": VEHICLE},
    ])
    def test_an_event_without_a_vehicle_or_of_another_type_writes_nothing(
        self, body: dict[str, Any]
    ) -> None:
        event = parse_event(json.dumps(body))
        stored = Snapshot(vehicle_id=VEHICLE, updated_at=_at(T0))
        assert plan(stored, event) == Plan(updated_at=_at(T0))

    def test_an_event_names_only_its_own_kind_of_keys(self) -> None:
        state = state_event("s1", signal(SOC, 1), signal(SOC, 2), signal("charge-x", 1))
        errors = error_event("x1", error("T", "C"), error("T", "C"), error("A", None),
                             error("T", "bad", state="PENDING"))
        assert (codes_of(state), error_keys_of(state)) == (["charge-x", SOC], [])
        assert (codes_of(errors), error_keys_of(errors)) == ([], [("A", ""), ("T", "C")])

    def test_canonical_json_sorts_keys_and_reads_integers_beyond_64_bits(self) -> None:
        assert canonical_json({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'
        assert canonical_json({"b": 2**70, "a": "é", "c": MappingProxyType({"y": 1, "x": 2})}) == (
            '{"a":"é","b":1180591620717411303424,"c":{"x":2,"y":1}}')


class TestRanking:
    def test_an_undated_reading_never_replaces_a_dated_one_and_yields_to_any(self) -> None:
        dated = _plan_state_event(signal(SOC, 1, oem=T0), event_id="s1").signals
        undated = _plan_state_event(signal(SOC, 2, oem=None), event_id="s9",
                                    snapshot=Snapshot(vehicle_id=VEHICLE, signals=dated))
        assert (undated.signals, undated.stale) == ({}, (SOC,))
        first = _plan_state_event(signal(SOC, 2, oem=None), event_id="s9").signals
        replaced = _plan_state_event(signal(SOC, 1, oem=T0), event_id="s1",
                                     snapshot=Snapshot(vehicle_id=VEHICLE, signals=first))
        assert replaced.signals[SOC].value == 1

    def test_a_full_tie_goes_to_the_greater_content_in_either_order(self) -> None:
        # Two readings of one signal in one event, same times: only the content tells them
        # apart, and the result must not depend on their order in the payload.
        low, high = signal(SOC, 10, oem=T0), signal(SOC, 9, oem=T0, unit="km")
        kept = {_plan_state_event(*pair).signals[SOC].value for pair in ((low, high),
                                                                          (high, low))}
        assert len(kept) == 1


class TestReadings:
    def test_a_failed_signal_keeps_no_value_and_an_ok_one_no_error(self) -> None:
        failed = signal(SOC, error=("T", "C"))
        failed["body"] = {"value": 5, "unit": "percent"}  # sent alongside the error
        ok = signal("charge-x", 1)
        ok["status"] = {"value": "OK", "error": {"type": "T", "code": "C"}}
        result = _plan_state_event(failed, ok)
        assert (result.signals[SOC].value, result.signals[SOC].unit) == (None, None)
        assert (result.signals[SOC].error_type, result.signals[SOC].error_code) == ("T", "C")
        state = result.signals["charge-x"]
        assert (state.status, state.value, state.error_type, state.error_code) == (
            "ok", 1, None, None)

    def test_a_reading_without_a_given_code_is_keyed_by_its_signal_code(self) -> None:
        named = Signal(group="Charge", name="IsCharging", value=True)
        assert reading(named, "e1").code == "charge-ischarging"
        assert reading(Signal(code="c", value=1), "e1").code == "c"
        assert reading(Signal(value=1), "e1").code == ""


class TestValueBounds:
    def test_a_value_of_exactly_the_largest_size_fits_and_one_more_does_not(self) -> None:
        exact = "a" * (MAX_VALUE_CHARS - 2)  # plus its two quotes
        assert value_fits(Signal(code="c", value=exact))
        assert not value_fits(Signal(code="c", value=exact + "a"))

    def test_a_short_list_of_long_strings_is_measured(self) -> None:
        value = ["x" * 1000] * 100  # 100 items, over 100 KB of JSON
        assert not value_fits(Signal(code="c", value=value))

    def test_a_frozen_mapping_is_spelled_as_the_same_plain_object(self) -> None:
        # One spelling per value: an event's read-only mapping, and its float, as a dict's.
        # (orjson writes 1e-7 where the standard library writes 1e-07.)
        frozen = MappingProxyType({"x": 1e-7, "y": [MappingProxyType({"z": 0.1})]})
        assert canonical_json(frozen) == canonical_json(thawed(frozen)) == (
            '{"x":1e-7,"y":[{"z":0.1}]}')


    @pytest.mark.parametrize(("value", "limit", "deeper"), [
        (1, 0, False), ("text", 0, False), ([], 0, True), ({}, 0, True),
        ([[1]], 2, False), ([[1]], 1, True), ([1, [2, [3]]], 2, True),
        ({"a": {"b": 1}}, 2, False), ({"a": [{"b": 1}]}, 2, True),
        ((MappingProxyType({"a": (1,)}),), 2, True), ((MappingProxyType({"a": (1,)}),), 3, False),
    ])
    def test_nesting_is_counted_in_arrays_and_objects_frozen_or_not(
        self, value: Any, limit: int, deeper: bool
    ) -> None:
        assert nests_deeper(value, limit) is deeper

class TestTextThatIsNotUnicode:
    """A lone surrogate: what JSON's `\\u` escapes can spell and UTF-8 cannot encode."""

    @pytest.mark.parametrize(("text", "unicode"), [
        (None, True), ("", True), ("plain", True), ("caf\u00e9 \U0001f697", True),
        ("\ud800", False), ("caf\u00e9\udfff", False), ("\ud83d\ude97", False)])
    def test_is_unicode(self, text: str | None, unicode: bool) -> None:
        assert is_unicode(text) is unicode

    def test_shown_puts_the_replacement_character_in_its_place(self) -> None:
        assert shown("a\ud800b\udfff") == "a\ufffdb\ufffd"
        assert shown("caf\u00e9") == "caf\u00e9" and shown(None) is None

    @pytest.mark.parametrize("value", [
        "a\ud800", ["ok", "\udfff"], {"k\ud800": 1}, {"k": {"deeper": ["\ud800"]}},
        [2**70, "\ud800"]])
    def test_a_value_holding_one_at_any_depth_is_skipped(self, value: Any) -> None:
        event = state_event("e1", signal("custom-v", value))
        result = plan(Snapshot(vehicle_id=VEHICLE), event)
        assert [(s.code, s.reason) for s in result.skipped] == [("custom-v", NOT_UNICODE)]
        assert result.signals == {}

    @pytest.mark.parametrize("value", [None, True, 1.5, 2**70, [1, "\u00e9"], {"\u00e9": [None]}])
    def test_any_other_value_is_kept(self, value: Any) -> None:
        result = plan(Snapshot(vehicle_id=VEHICLE), state_event("e1", signal("custom-v", value)))
        assert result.skipped == () and result.signals["custom-v"].value == value

