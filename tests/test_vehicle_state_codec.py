"""The stored rows (`shared/vehicle_state/codec.py`): what both backends write is read back as
it was, whatever it holds; the keys Table gets are the escaping the stored data was filed
under; the pending changes' text is compact ASCII, so its length is its size.

The stores' own tests (tests/test_vehicle_state_store.py) go through these functions on SQLite
and Azurite; these check each field of each kind of row, which the stores' behaviour shows
only in part (a resolved error's `resolvedAt`, a pending change's previous reading).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.vehicle_state import ErrorState, SignalChange, SignalState
from shared.vehicle_state.codec import (
    change_entry_text,
    change_from_json,
    change_text,
    change_to_json,
    changes_from_text,
    dumps,
    error_from_row,
    error_row,
    escape_key,
    loads,
    pending_text,
    signal_from_row,
    signal_row,
)
from shared.vehicle_state.rules import ErrorRecord, Observation

# Unicode text (no lone surrogate: the rules skip such text before it reaches a row).
text = st.text(st.characters(codec="utf-8"), max_size=12)
maybe_text = st.none() | text
# Times as the rules keep them: aware, to the microsecond; in UTC or another offset (a row
# spells either and reads back an equal time).
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))]))
maybe_moment = st.none() | moments
# JSON values: integers of any size, finite floats, text with any Unicode character.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                         allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8)

signal_states = st.builds(
    SignalState, code=text.filter(bool), path=maybe_text, value=json_values, unit=maybe_text,
    oem_updated_at=maybe_moment, retrieved_at=maybe_moment, event_id=maybe_text,
    status=st.sampled_from(["ok", "error"]), error_type=maybe_text, error_code=maybe_text)
observations = st.none() | st.builds(Observation, at=moments, event_id=text)
error_records = st.builds(
    ErrorRecord,
    state=st.builds(
        ErrorState, type=text.filter(bool), code=maybe_text,
        state=st.sampled_from(["OPEN", "RESOLVED"]), first_seen=maybe_moment,
        last_seen=maybe_moment, count=st.integers(0, 10_000), description=maybe_text,
        resolution_type=maybe_text, signals=st.lists(text, max_size=3).map(tuple),
        event_id=maybe_text, resolved_at=maybe_moment),
    last_error=observations, last_resolved=observations, detail_rank=text)
changes = st.builds(SignalChange, vehicle_id=text, code=text.filter(bool), path=maybe_text,
                    previous=st.none() | signal_states, current=signal_states)


def stored(row: dict[str, Any]) -> dict[str, Any]:
    """`row` as SQLite keeps it (JSON text) and Table gives it back (no None properties)."""
    assert None not in row.values()
    return dict(loads(dumps(row)))


class TestRowsReadBackAsWritten:
    @given(signal_states)
    def test_a_signal(self, state: SignalState) -> None:
        assert signal_from_row(stored(signal_row(state))) == state

    @given(error_records)
    def test_an_error(self, record: ErrorRecord) -> None:
        assert error_from_row(stored(error_row(record))) == record

    def test_a_resolved_error_keeps_when_it_closed(self) -> None:
        closed = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
        record = ErrorRecord(state=ErrorState(type="T", code=None, state="RESOLVED",
                                              resolved_at=closed),
                             last_resolved=Observation(at=closed, event_id="r1"))
        row = error_row(record)
        assert (row["resolvedAt"], row["lastResolvedAt"], row["lastResolvedEvent"]) == (
            "2026-12-01T08:30:00+00:00", "2026-12-01T08:30:00+00:00", "r1")
        assert {"code", "lastErrorAt", "lastErrorEvent", "detailRank"}.isdisjoint(row)
        assert error_from_row(stored(row)) == record

    @given(changes)
    def test_a_pending_change(self, change: SignalChange) -> None:
        assert change_from_json(loads(dumps(change_to_json(change)))) == change

    @given(st.lists(changes, max_size=3))
    def test_pending_changes_as_one_text(self, items: list[SignalChange]) -> None:
        assert changes_from_text(pending_text(map(change_entry_text, items))) == items

    @given(changes)
    def test_one_change_from_its_rows_texts_as_change_to_json_spells_it(
        self, change: SignalChange
    ) -> None:
        previous = None if change.previous is None else dumps(signal_row(change.previous))
        made = change_text(change, previous, dumps(signal_row(change.current)))
        assert made == dumps(change_to_json(change))
        assert change_from_json(loads(made)) == change

    @pytest.mark.parametrize("field", ["code", "value", "status"])
    def test_a_signal_row_without_a_field_every_signal_row_has_is_not_ours(
        self, field: str
    ) -> None:
        row = signal_row(SignalState(code="c", value=None))
        del row[field]
        with pytest.raises(KeyError):
            signal_from_row(row)

    @pytest.mark.parametrize("field", ["type", "state", "count", "signals"])
    def test_an_error_row_without_a_field_every_error_row_has_is_not_ours(
        self, field: str
    ) -> None:
        row = error_row(ErrorRecord(state=ErrorState(type="T", code=None, state="OPEN")))
        del row[field]
        with pytest.raises(KeyError):
            error_from_row(row)


class TestTimes:
    def test_a_time_is_spelled_in_the_offset_it_was_given(self) -> None:
        # Equal instants in other zones compare equal: none may take another's spelling.
        utc = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
        zones = [timezone(timedelta(hours=1)), timezone(timedelta(hours=-5)), UTC]
        rows = [signal_row(SignalState(code="c", oem_updated_at=utc.astimezone(zone)))
                for zone in zones]
        assert [r["oemUpdatedAt"] for r in rows] == [
            "2026-12-01T09:30:00+01:00", "2026-12-01T03:30:00-05:00",
            "2026-12-01T08:30:00+00:00"]


class TestText:
    @given(json_values)
    def test_values_come_back_exact_and_of_the_same_type(self, value: Any) -> None:
        back = loads(dumps(value))
        assert back == value and json.dumps(back) == json.dumps(value)

    def test_an_integer_past_64_bits_is_written_by_the_standard_library_compactly(
        self
    ) -> None:
        # orjson refuses it; the fallback must spell the value as orjson spells the rest.
        value = {"big": [2**64, -(2**63) - 1], "text": "caf\u00e9"}
        assert dumps(value) == '{"big":[18446744073709551616,-9223372036854775809],' \
            '"text":"caf\u00e9"}'
        assert loads(dumps(value)) == value

    def test_pending_changes_are_compact_ascii(self) -> None:
        change = SignalChange(vehicle_id="v", code="c", path="G.N",
                              previous=None, current=SignalState(code="c", value="\u00e9\U0001f697"))
        made = pending_text([change_entry_text(change)])
        assert made == ('[{"vehicleId":"v","code":"c","path":"G.N","previous":null,'
                        '"current":{"code":"c","value":"\\"\\u00e9\\ud83d\\ude97\\"",'
                        '"status":"ok"}}]')
        assert made.isascii()


class TestKeys:
    """The escaping is part of the stored layout: a vehicle is found where it was filed."""

    @pytest.mark.parametrize(("value", "key"), [
        ("9af13248-3b73-4c9d-9a4b-d937ce6bc8e2", "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"),
        ("a/b#c?d\\e f", "a!2fb!23c!3fd!5ce!20f"),
        ("v\u00e9hicule:1", "v!c3!a9hicule!3a1"),
        ("\U0001f697.x_y", "!f0!9f!9a!97.x_y"),
        ("a" * 200, "a" * 200),
        ("a" * 201, "!h" + "a92efd82109373e58f9a2056dee01e807e216ce6075f7051207c0a9f7d666e50"),
    ])
    def test_known_keys(self, value: str, key: str) -> None:
        assert escape_key(value) == key

    def test_an_escaped_key_over_200_characters_is_its_digest(self) -> None:
        assert escape_key("/" * 66) == "!2f" * 66  # 198 characters: kept
        assert escape_key("/" * 67)[:2] == "!h" and len(escape_key("/" * 67)) == 66

    @given(st.lists(text, min_size=2, max_size=2, unique=True))
    def test_distinct_values_get_distinct_keys_table_accepts(self, values: list[str]) -> None:
        first, second = map(escape_key, values)
        assert first != second
        for key in (first, second):
            assert len(key) <= 200
            assert not set(key) & set("/\\#?") and key.isascii() and key.isprintable()
