"""The rules' fast path (shared/vehicle_state/quick.py) against the rules themselves.

Whenever `quick_plan` answers, its writes, changes, stale codes and updatedAt must be what
`rules.plan` answers for the same stored state and event, and each row text must be what
`codec.signal_row` writes; whenever the event holds something only the rules handle, it must
decline. Hypothesis draws stored states (built by the rules from earlier events) and events
that mix the common shape with every way out of it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.common import state_payload
from shared.events import Event, _from_epoch_ms, parse_event
from shared.vehicle_state import (
    ApplyResult,
    ChangeFilter,
    Changes,
    SignalChange,
    SignalState,
    quick,
)
from shared.vehicle_state.codec import dumps, signal_row
from shared.vehicle_state.quick import Held, change_of, held, quick_plan, state_of, text_of
from shared.vehicle_state.rules import (
    _SURELY_FITTING_TEXT,
    MAX_CODE_CHARS,
    MAX_VALUE_CHARS,
    Snapshot,
    codes_of,
    plan,
)

from .vehicle_events import T0, VEHICLE


@pytest.fixture(autouse=True)
def cold_caches() -> None:
    """Every test spells its row texts from scratch: the fast path keeps the parts that repeat
    between deliveries in a module-level cache, which earlier tests (or a parent process)
    would otherwise have filled."""
    quick._STATIC.clear()


CODES = ["tractionbattery-stateofcharge", "charge-ischarging", "odometer-traveleddistance",
         "location-preciselocation"]
DAY_MS = 86_400_000
#: Timestamps around the stored ones, and the edges of what is usable.
TIMES = [T0, T0 + 1, T0 + 1000, T0 + 2000, 946_684_800_000, 946_684_799_999, 0, -1000]
VALUES: list[Any] = [0, 1, -1, 2**63 - 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 1.5, -0.0,
                     1e300, True, False, None, "", "km", "é✓", "a" * _SURELY_FITTING_TEXT,
                     "a" * (_SURELY_FITTING_TEXT + 1), [1, 2], {"lat": 1.5, "lon": 2},
                     # What the rules skip, also when the reading is stale.
                     "a" * (MAX_VALUE_CHARS - 1), "x\ud800"]
#: Group, name and unit spellings at and past what the store keeps (MAX_CODE_CHARS).
AT_BOUND, PAST_BOUND = "g" * MAX_CODE_CHARS, "g" * (MAX_CODE_CHARS + 1)


def mostly(common: Any, *others: Any) -> st.SearchStrategy[Any]:
    """`common` four times in five, else one of `others`: most drawn events stay on the fast
    path, so its answers get compared, and each way out of it still comes up."""
    return st.sampled_from([common] * (4 * len(others)) + list(others))


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    """A `data.signals` entry: mostly the common shape, sometimes not."""
    item: dict[str, Any] = {}
    code = draw(st.sampled_from(CODES)) if draw(mostly(True, False)) else draw(st.sampled_from(
        ["", None, 7, "x" * (MAX_CODE_CHARS + 1), "x" * MAX_CODE_CHARS]))
    if code is not None:
        item["code"] = code
    group = draw(st.sampled_from(["TractionBattery", "Odometer", "", 3, None, AT_BOUND,
                                  PAST_BOUND]))
    if group is not None:
        item["group"] = group
    name = draw(st.sampled_from(["StateOfCharge", "", None, PAST_BOUND, "N\udfff"]))
    if name is not None:
        item["name"] = name
    status = draw(mostly(None, {}, {"value": "OK"}, {"value": "SUCCESS"}, {"value": "success"},
                         {"value": 5}, {"value": "Error"},
                         {"value": "SUCCESS", "error": {"type": "T", "code": "C"}},
                         {"value": "ERROR", "error": {"type": "T", "code": "C"}}))
    if status is not None:
        item["status"] = status
    body = draw(mostly("value", "none", "empty"))
    if body == "value":
        item["body"] = {"value": draw(st.sampled_from(VALUES))}
        unit = draw(st.sampled_from(["percent", "km", None, 5, "missing", AT_BOUND,
                                     PAST_BOUND]))
        if unit != "missing":
            item["body"]["unit"] = unit
    elif body == "empty":
        item["body"] = {}
    meta_kind = draw(mostly("meta", "none", "empty"))
    if meta_kind == "meta":
        meta: dict[str, Any] = {}
        oem = draw(st.sampled_from(TIMES)) if draw(mostly(True, False)) else draw(
            st.sampled_from([None, float(T0), "2024-11-18T14:32:08Z"]))
        if oem is not None:
            meta["oemUpdatedAt"] = oem
        which = draw(st.sampled_from(["retrievedAt", "fetchedAt", "both", "none"]))
        retrieved = draw(mostly(T0 + 5000, T0 + 1000, T0 - DAY_MS - 1, T0 - DAY_MS,
                                T0 + 1000 - DAY_MS, float(T0 + 5000), None,
                                253_402_297_200_000))  # 9999-12-31T23:00:00Z
        if which in ("retrievedAt", "both"):
            meta["retrievedAt"] = retrieved
        if which in ("fetchedAt", "both"):
            meta["fetchedAt"] = draw(st.sampled_from([T0 + 6000, T0 + 2000]))
        item["meta"] = meta
    elif meta_kind == "empty":
        item["meta"] = {}
    return item


def event_of(event_id: str, signals: list[dict[str, Any]],
             delivered: int | None = T0) -> Event | None:
    body = {"eventId": event_id, "eventType": "VEHICLE_STATE", "vehicleId": VEHICLE,
            "data": {"signals": signals},
            "meta": {} if delivered is None else {"deliveredAt": delivered}}
    try:
        return parse_event(json.dumps(body))
    except Exception:  # e.g. a timestamp the parser refuses: not an event the store sees
        return None


def stored_state(events: list[Event]) -> tuple[dict[str, Held], datetime | None]:
    """What a backend holds after the rules applied `events` in order."""
    stored: dict[str, Held] = {}
    updated_at = None
    for event in events:
        snapshot = Snapshot(vehicle_id=VEHICLE, updated_at=updated_at,
                            signals={c: state_of(stored[c]) for c in codes_of(event) if c in stored})
        result = plan(snapshot, event)
        for code, state in result.signals.items():
            stored[code] = held(state, dumps(signal_row(state)))
        updated_at = result.updated_at
    return stored, updated_at


def check_against_the_rules(stored: dict[str, Held], updated_at: datetime | None,
                            event: Event) -> bool:
    """Assert the fast path agrees with the rules; True when it answered."""
    quick = quick_plan(event.event_id, event.signal_items(), stored, updated_at,
                       event.meta.delivered_at)
    snapshot = Snapshot(vehicle_id=VEHICLE, updated_at=updated_at,
                        signals={c: state_of(stored[c]) for c in codes_of(event) if c in stored})
    reference = plan(snapshot, event)
    if quick is None:
        return False
    assert reference.skipped == () and reference.errors == {}
    changes = quick.changes(VEHICLE)
    assert changes.codes == tuple(c.code for c in reference.changes)
    assert changes == reference.changes
    assert quick.stale == reference.stale
    assert quick.refreshed == reference.refreshed
    assert quick.updated_at == reference.updated_at
    assert {code: state_of(h) for code, h in quick.writes.items()} == reference.signals
    assert list(quick.writes) == list(reference.signals)
    for entry in quick.writes.values():
        state, text = state_of(entry), text_of(entry)
        assert text == dumps(signal_row(state))
        assert entry[0] == held(state, text)[0]
    return True


@settings(max_examples=400, deadline=None)
@given(earlier=st.lists(st.lists(items(), min_size=1, max_size=4), max_size=3),
       latest=st.lists(items(), min_size=1, max_size=5), same_id=st.booleans(),
       # Delivered when the readings were taken, or so long before that some of their
       # oemUpdatedAt lie more than a day after it (not usable), or without a deliveredAt.
       delivered=mostly(T0, T0 - DAY_MS, T0 - DAY_MS + 1000, T0 - DAY_MS - 1, None))
def test_whenever_the_fast_path_answers_it_answers_as_the_rules(
    earlier: list[list[dict[str, Any]]], latest: list[dict[str, Any]], same_id: bool,
    delivered: int | None,
) -> None:
    events = [e for i, signals in enumerate(earlier)
              if (e := event_of(f"e{i}", signals, delivered))]
    event = event_of("e0" if same_id else "e-latest", latest, delivered)
    if event is None:
        return
    stored, updated_at = stored_state(events)
    answered = check_against_the_rules(stored, updated_at, event)
    hypothesis.event("fast path answered" if answered else "fast path declined")


def common(code: str, value: Any, oem: int, retrieved: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"code": code, "group": "Odometer", "name": "TraveledDistance",
                            "body": {"value": value, "unit": "km"},
                            "meta": {"oemUpdatedAt": oem}}
    if retrieved is not None:
        item["meta"]["fetchedAt"] = retrieved
    return item


def test_a_reading_dated_more_than_a_day_after_its_delivery_goes_to_the_rules() -> None:
    # The rules record it as undated (`rules.usable_oem`); at exactly a day it is usable.
    late = event_of("e1", [common(CODES[0], 1, T0 + DAY_MS + 1)], delivered=T0)
    assert late is not None
    assert quick_plan("e1", late.signal_items(), {}, None, late.meta.delivered_at) is None
    edge = event_of("e1", [common(CODES[0], 1, T0 + DAY_MS)], delivered=T0)
    assert edge is not None
    assert check_against_the_rules({}, None, edge)


class TestItAnswersForTheCommonShape:
    """Declining is always safe, so these pin down that the fast path is taken at all."""

    def test_a_benchmark_delivery_new_then_newer_then_older(self) -> None:
        first = parse_event(state_payload(5 * 1024, vehicle_id=VEHICLE))
        second = parse_event(state_payload(5 * 1024, vehicle_id=VEHICLE))
        assert len(first.signals) >= 20
        stored: dict[str, Held] = {}
        assert check_against_the_rules(stored, None, first)
        stored, updated_at = stored_state([first])
        assert check_against_the_rules(stored, updated_at, second)
        stored, updated_at = stored_state([second])
        assert check_against_the_rules(stored, updated_at, first)  # every signal stale

    @pytest.mark.parametrize("value", [12.5, 7, 2**64 - 1, -(2**63), True, None, "on",
                                       "a" * _SURELY_FITTING_TEXT, "é✓"])
    def test_every_scalar_kind(self, value: Any) -> None:
        event = event_of("e1", [common(CODES[0], value, T0, T0 + 10)])
        assert event is not None
        assert check_against_the_rules({}, None, event)

    def test_the_edges_of_what_it_takes(self) -> None:
        """A code, group, name and unit of the longest length, a reading from the first
        usable moment, and one a full day after its own retrieval are all on the fast path."""
        longest = {"group": AT_BOUND, "name": AT_BOUND,
                   "body": {"value": 3, "unit": AT_BOUND}}
        event = event_of("e1", [common("x" * MAX_CODE_CHARS, 1, 946_684_800_000),
                                common(CODES[0], 2, T0 + DAY_MS, T0),
                                {**common(CODES[1], 3, T0), **longest}])
        assert event is not None
        assert check_against_the_rules({}, None, event)

    def test_the_vehicle_takes_the_newest_reading_of_the_event(self) -> None:
        event = event_of("e1", [common(CODES[0], 1, T0 + 5), common(CODES[1], 2, T0 + 9),
                                common(CODES[2], 3, T0 + 7)])
        assert event is not None
        quick = quick_plan("e1", event.signal_items(), {}, None)
        assert quick is not None and quick.updated_at is not None
        assert int(quick.updated_at.timestamp() * 1000) == T0 + 9
        assert check_against_the_rules({}, None, event)

    def test_a_path_needs_both_a_group_and_a_name(self) -> None:
        signals = [{**common(CODES[0], 1, T0), "name": ""},
                   {**common(CODES[1], 1, T0), "group": ""}]
        event = event_of("e1", signals)
        assert event is not None
        quick = quick_plan("e1", event.signal_items(), {}, None)
        assert quick is not None
        assert [state_of(h).path for h in quick.writes.values()] == [None, None]
        assert check_against_the_rules({}, None, event)

    def test_signals_that_say_they_succeeded(self) -> None:
        # As Smartcar may send them: a body and `"status":{"value":"SUCCESS"}`.
        event = event_of("e1", [{**common(CODES[0], 1, T0), "status": {"value": "SUCCESS"}},
                                {**common(CODES[1], 2, T0), "status": {"value": "success"}}])
        assert event is not None
        assert check_against_the_rules({}, None, event)

    def test_a_later_reading_of_the_same_time_wins_by_its_retrieval(self) -> None:
        before = event_of("e1", [common(CODES[0], 1, T0, T0 + 10)])
        after = event_of("e2", [common(CODES[0], 2, T0, T0 + 20)])
        assert before is not None and after is not None
        stored, updated_at = stored_state([before])
        assert check_against_the_rules(stored, updated_at, after)


class TestItDeclines:
    @pytest.mark.parametrize("signals", [
        [common(CODES[0], 1, T0), common(CODES[0], 2, T0 + 1)],  # a repeated code
        [{**common(CODES[0], 1, T0), "status": {"value": "ERROR"}}],
        [{**common(CODES[0], 1, T0), "status": {"value": "Error"}}],
        [{**common(CODES[0], 1, T0), "code": ""}],
        [{**common(CODES[0], 1, T0), "meta": {}}],  # undated
        [{k: v for k, v in common(CODES[0], 1, T0).items() if k != "meta"}],  # no meta
        [common(CODES[0], 1, 946_684_799_999)],  # before 2000: not a usable time
        [common(CODES[0], 1, T0 + DAY_MS + 1, T0)],  # a day after its own retrieval
        [common(CODES[0], [1, 2], T0)],
        [common(CODES[0], 2**64, T0)],
        [common(CODES[0], "a" * (_SURELY_FITTING_TEXT + 1), T0)],
        [{**common(CODES[0], 1, T0), "group": PAST_BOUND}],
        [{**common(CODES[0], 1, T0), "name": PAST_BOUND}],
        [{**common(CODES[0], 1, T0), "body": {"value": 1, "unit": PAST_BOUND}}],
    ])
    def test_what_only_the_rules_handle(self, signals: list[dict[str, Any]]) -> None:
        event = event_of("e1", signals)
        assert event is not None
        assert quick_plan("e1", event.signal_items(), {}, None) is None

    @pytest.mark.parametrize("signal", [
        common(CODES[0], "a" * (_SURELY_FITTING_TEXT + 1), T0),
        common(CODES[0], "x\ud800", T0),
        {**common(CODES[0], 1, T0), "body": {"value": 1, "unit": PAST_BOUND}},
    ])
    def test_an_older_reading_the_rules_would_skip(self, signal: dict[str, Any]) -> None:
        """Not reported as stale: the rules skip what they cannot keep before comparing."""
        newer, event = event_of("e0", [common(CODES[0], 0, T0 + 1000)]), event_of("e1", [signal])
        assert newer is not None and event is not None
        stored, updated_at = stored_state([newer])
        assert quick_plan("e1", event.signal_items(), stored, updated_at) is None

    # Stored at T0: the repeated code's readings are stale then newer, newer then stale, or
    # both stale; the first and the third also ahead of another signal.
    @pytest.mark.parametrize("readings", [(T0 - 10, T0 + 10), (T0 + 10, T0 - 10),
                                          (T0 - 10, T0 - 20), (T0 - 10, T0 - 10)])
    def test_a_repeated_code_however_its_readings_rank(self, readings: tuple[int, int]) -> None:
        stored, updated_at = stored_state([e for e in [event_of("e0", [
            common(CODES[0], 1, T0), common(CODES[1], 1, T0)])] if e])
        first, second = readings
        event = event_of("e1", [common(CODES[0], 2, first), common(CODES[1], 2, T0 + 5),
                                common(CODES[0], 3, second)])
        assert event is not None
        assert quick_plan("e1", event.signal_items(), stored, updated_at) is None

    # The second: a retrieval so far ahead (year 9987) that its microseconds are not exact
    # as a float, which the rank key must not round.
    @pytest.mark.parametrize("retrieved", [T0 + 10, 253_000_000_000_007])
    def test_a_full_tie_with_the_stored_reading(self, retrieved: int) -> None:
        event = event_of("e1", [common(CODES[0], 1, T0, retrieved)])
        assert event is not None
        stored, updated_at = stored_state([event])
        assert quick_plan("e1", event.signal_items(), stored, updated_at) is None

    def test_text_orjson_refuses(self) -> None:
        # The standard library's decoder keeps a lone surrogate; orjson will not write it.
        event = parse_event('{"eventId":"e1","eventType":"VEHICLE_STATE","vehicleId":"v",'
                            '"data":{"signals":[{"code":"c","body":{"value":"\\ud800"},'
                            f'"meta":{{"oemUpdatedAt":{T0}}}}}]}},"meta":{{}}}}')
        assert quick_plan("e1", event.signal_items(), {}, None) is None


class TestChanges:
    """`ApplyResult.changes` built on first use: counted and named without building, equal to
    the tuple of the same changes, built once."""

    @staticmethod
    def made(count: int) -> tuple[SignalChange, ...]:
        event = event_of("e1", [common(code, i, T0 + i) for i, code in enumerate(CODES[:count])])
        assert event is not None
        quick = quick_plan("e1", event.signal_items(), {}, None)
        assert quick is not None
        return tuple(change_of(VEHICLE, c) for c in quick.changed)

    def test_counted_and_named_without_building(self) -> None:
        builds: list[int] = []
        built = self.made(3)

        def build() -> tuple[SignalChange, ...]:
            builds.append(1)
            return built

        changes = Changes(codes=tuple(c.code for c in built), build=build)
        assert len(changes) == 3 and changes.codes == tuple(CODES[:3]) and bool(changes)
        assert ApplyResult(changes=changes).to_json()["changed"] == list(CODES[:3])
        assert builds == []
        assert changes == built and built == changes and changes[1] == built[1]
        assert list(changes) == list(built) and changes[:2] == built[:2]
        assert builds == [1]  # once, however often it is read

    def test_equal_to_its_tuple_and_to_itself_however_made(self) -> None:
        built = self.made(2)
        lazy = Changes(codes=tuple(c.code for c in built), build=lambda: built)
        assert lazy == Changes(built) == built and lazy == list(built)
        assert hash(lazy) == hash(built)
        assert lazy != built[:1] and lazy != () and Changes() == ()
        assert lazy != built[::-1] and Changes(built[::-1]) != lazy  # same length, not equal
        assert lazy != "ab" and (lazy == 3) is False
        # A tuple is kept as `Changes` (ApplyResult.__post_init__), which the field's type
        # `Changes` does not say: the conversion is what is tested.
        assert ApplyResult(changes=built) == ApplyResult(changes=lazy)  # type: ignore[arg-type]  # a tuple on purpose
        assert isinstance(ApplyResult(changes=built).changes, Changes)  # type: ignore[arg-type]  # a tuple on purpose
        assert repr(lazy) == f"Changes({built!r})"

    def test_built_on_use_needs_the_codes(self) -> None:
        with pytest.raises(TypeError, match=r"^a built-on-use Changes needs its codes$"):
            Changes(build=lambda: ())


@st.composite
def common_items(draw: st.DrawFn, code: str) -> dict[str, Any]:
    """A signal of the common shape: every field in the form the fast path takes."""
    oem = draw(st.integers(946_684_800_000, T0 + 10**9))
    item: dict[str, Any] = {"code": code, "meta": {"oemUpdatedAt": oem}}
    for key in ("group", "name"):
        # Not text (an array, an object, a number): no path, as the rules have it.
        text = draw(st.sampled_from(["Odometer", "TraveledDistance", "", None, "é", ["x"],
                                     {"k": 1}, 7]))
        if text is not None:
            item[key] = text
    value = draw(st.one_of(
        st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(), st.none(), st.text(max_size=40),
        st.text(min_size=_SURELY_FITTING_TEXT, max_size=_SURELY_FITTING_TEXT)))
    body: dict[str, Any] = {"value": value}
    unit = draw(st.sampled_from(["km", "percent", "", None, "missing", ["km"], {"k": 1}, 7]))
    if unit != "missing":
        body["unit"] = unit
    if draw(st.booleans()):
        item["body"] = body
    retrieved = draw(st.sampled_from(["retrievedAt", "fetchedAt", None]))
    if retrieved is not None:
        item["meta"][retrieved] = oem + draw(st.integers(-DAY_MS, DAY_MS))
    return item


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_fast_path_takes_every_event_of_the_common_shape(data: st.DataObject) -> None:
    """Declining is always correct, so only this catches a fast path that declines more than
    it should (and so is slower than it should be)."""
    codes = data.draw(st.lists(st.sampled_from(CODES), min_size=1, max_size=4, unique=True))
    earlier = [e for i in range(data.draw(st.integers(0, 2)))
               if (e := event_of(f"e{i}", data.draw(st.lists(items(), min_size=1, max_size=3))))]
    # Delivered after its readings were taken, as Smartcar's deliveries are.
    event = event_of("e-latest", [data.draw(common_items(code)) for code in codes],
                     delivered=T0 + 10**9)
    assert event is not None
    stored, updated_at = stored_state(earlier)
    assert check_against_the_rules(stored, updated_at, event)


def reading(value: Any = 50, *, unit: str | None = "percent", group: str = "TractionBattery",
            retrieved: int = T0 + 1000) -> dict[str, Any]:
    """The charge read at T0 (oemUpdatedAt), fetched at `retrieved`."""
    body: dict[str, Any] = {"value": value}
    if unit is not None:
        body["unit"] = unit
    return {"code": CODES[0], "group": group, "name": "StateOfCharge", "body": body,
            "meta": {"oemUpdatedAt": T0, "fetchedAt": retrieved}}


class TestTheStoredReadingFetchedAgain:
    """A later reading at the stored oemUpdatedAt is a refresh only when it is the stored
    reading in all but when it was fetched: each way it can differ, with the reading stored as
    the fast path keeps it (a recipe) and as the rules do (a state)."""

    @pytest.mark.parametrize("stored_by", ["fast path", "rules"])
    @pytest.mark.parametrize(("later", "refreshed"), [
        (reading(retrieved=T0 + 2000), True),
        (reading(51, retrieved=T0 + 2000), False),
        (reading(50.0, retrieved=T0 + 2000), False),
        (reading(unit="km", retrieved=T0 + 2000), False),
        (reading(unit=None, retrieved=T0 + 2000), False),
        (reading(group="Battery", retrieved=T0 + 2000), False),
    ])
    def test_a_refresh_or_a_change(self, stored_by: str, later: dict[str, Any],
                                   refreshed: bool) -> None:
        first = event_of("e1", [reading()])
        assert first is not None
        if stored_by == "fast path":
            made = quick_plan("e1", first.signal_items(), {}, None)
            assert made is not None
            stored, updated_at = made.writes, made.updated_at
        else:
            stored, updated_at = stored_state([first])
        event = event_of("e2", [later])
        assert event is not None
        assert check_against_the_rules(stored, updated_at, event)
        quick = quick_plan("e2", event.signal_items(), stored, updated_at)
        assert quick is not None
        assert quick.refreshed == ((CODES[0],) if refreshed else ())

    def test_a_stored_error_is_never_the_same_reading(self) -> None:
        failed = {"code": CODES[0], "group": "TractionBattery", "name": "StateOfCharge",
                  "status": {"value": "ERROR", "error": {"type": "T", "code": "C"}},
                  "meta": {"oemUpdatedAt": T0, "fetchedAt": T0 + 1000}}
        first = event_of("e1", [failed])
        event = event_of("e2", [reading(None, unit=None, retrieved=T0 + 2000)])
        assert first is not None and event is not None
        stored, updated_at = stored_state([first])
        assert check_against_the_rules(stored, updated_at, event)

    @pytest.mark.parametrize("error", [("T", None), (None, "C")])
    def test_a_stored_state_with_an_error_kind_is_never_the_same_reading(
        self, error: tuple[str | None, str | None]
    ) -> None:
        """As a row read back may hold (`codec.signal_from_row` takes what the row says)."""
        event = event_of("e2", [reading(retrieved=T0 + 2000)])
        assert event is not None
        state = SignalState(code=CODES[0], path="TractionBattery.StateOfCharge", value=50,
                            unit="percent", oem_updated_at=_from_epoch_ms(T0),
                            retrieved_at=_from_epoch_ms(T0 + 1000), event_id="e1",
                            error_type=error[0], error_code=error[1])
        stored = {CODES[0]: held(state, dumps(signal_row(state)))}
        assert check_against_the_rules(stored, state.oem_updated_at, event)


def test_the_kept_changes_name_their_vehicle_and_an_outbox_is_asked_by_code_and_path() -> None:
    event = event_of("e1", [reading(), common(CODES[2], 5.0, T0)])
    assert event is not None
    made = quick_plan("e1", event.signal_items(), {}, None)
    assert made is not None
    charge = "TractionBattery.StateOfCharge"
    by_filter = made.kept(VEHICLE, ChangeFilter(frozenset({charge})))
    asked: list[tuple[str, str | None]] = []

    def outbox(code: str, path: str | None) -> bool:
        asked.append((code, path))
        return path == charge

    assert [(c.vehicle_id, c.code) for c in by_filter] == [(VEHICLE, CODES[0])]
    assert made.kept(VEHICLE, outbox) == by_filter
    assert asked == [(CODES[0], charge), (CODES[2], "Odometer.TraveledDistance")]
