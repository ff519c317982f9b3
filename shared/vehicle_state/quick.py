"""The rules' fast path for the common VEHICLE_STATE: the same result as `rules.plan`, from
the decoded signals, without building a `Signal` per entry.

Most deliveries are ~20 signals that each carry a code, a number or short string in `body`,
and integer `oemUpdatedAt`/`retrievedAt` milliseconds, and most of them are newer than what
is stored. For such an event `quick_plan` decides every signal from an integer key and writes
each stored row's JSON text directly. Anything else in the event (a signal without a code or
with an error status, a repeated code, a timestamp that is not integer milliseconds or is not
usable, a value that may be too large, or a reading that ties with the stored one) makes it
answer None, and the caller runs `rules.plan`, the one definition of the rules.

tests/test_vehicle_state_quick.py checks, by Hypothesis over mixed events and stored states,
that whenever `quick_plan` answers, its plan and its row texts are `rules.plan`'s and
`codec.signal_row`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import orjson

from . import SignalChange, SignalState
from .rules import (
    _EPOCH,
    _SURELY_FITTING_TEXT,
    MAX_CODE_CHARS,
    MAX_OEM_AHEAD,
    MIN_OEM_UPDATED_AT,
    _new_state,
)

_MS: Final = timedelta(milliseconds=1)
_US: Final = timedelta(microseconds=1)
#: `rules.usable_oem`'s bounds in epoch milliseconds.
_MIN_OEM_MS: Final = (MIN_OEM_UPDATED_AT - _EPOCH) // _MS
_MAX_AHEAD_MS: Final = MAX_OEM_AHEAD // _MS
#: The integers orjson writes (what `rules.canonical_json` writes without its fallback).
_MIN_INT: Final = -(1 << 63)
_MAX_INT: Final = (1 << 64) - 1

#: A signal's rank without its content: (dated, oemUpdatedAt µs, retrievedAt µs, eventId).
#: Equal keys are the rare tie that `rules.outranks` settles by content.
Key = tuple[bool, int, int, str]


@dataclass(slots=True)
class Held:
    """A stored signal as a backend keeps it at hand: its state, its row's JSON text (as
    `codec.signal_row` spells it) and its rank key."""

    state: SignalState
    text: str
    key: Key


def _micros(value: datetime | None) -> int:
    return 0 if value is None else (value - _EPOCH) // _US


def held(state: SignalState, text: str) -> Held:
    """`state` and its stored row text, with the key `rules.signal_rank` orders it by."""
    return Held(state, text, (state.oem_updated_at is not None,
                              _micros(state.oem_updated_at), _micros(state.retrieved_at),
                              state.event_id or ""))


@dataclass(slots=True)
class QuickPlan:
    """What `rules.plan` would answer for a signals-only event: the writes (with their row
    texts), the changes and the stale codes in payload order, the vehicle's new updatedAt."""

    writes: dict[str, Held]
    changes: tuple[SignalChange, ...]
    stale: tuple[str, ...]
    updated_at: datetime | None


_CHANGE_FIELDS: Final = ("vehicle_id", "code", "path", "previous", "current")
(_set_vehicle, _set_code, _set_path, _set_previous, _set_current) = (
    getattr(SignalChange, name).__set__ for name in _CHANGE_FIELDS)


def _change(vehicle_id: str, code: str, path: str | None, previous: SignalState | None,
            current: SignalState) -> SignalChange:
    # As `rules._new_state`: a frozen dataclass's __init__ is three times slower.
    change: SignalChange = object.__new__(SignalChange)
    _set_vehicle(change, vehicle_id)
    _set_code(change, code)
    _set_path(change, path)
    _set_previous(change, previous)
    _set_current(change, current)
    return change


def _value_json(value: Any) -> str | None:
    """The row's `value` field as JSON text (a JSON string holding the value's canonical
    JSON), or None when the value is not one the fast path writes."""
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return f'"{orjson.dumps(value).decode()}"'
    if kind is int:
        if not _MIN_INT <= value <= _MAX_INT:
            return None
        return f'"{value}"'
    if kind is str and len(value) <= _SURELY_FITTING_TEXT:
        return orjson.dumps(orjson.dumps(value).decode()).decode()
    return None


def quick_plan(vehicle_id: str, event_id: str, items: tuple[dict[str, Any], ...],
               stored: Mapping[str, Held], updated_at: datetime | None) -> QuickPlan | None:
    """`rules.plan` for a VEHICLE_STATE whose signals all take the fast path; None otherwise.

    `stored` holds the vehicle's stored signals by code (those the event names, at least);
    `updated_at` is the vehicle's stored updatedAt.
    """
    try:
        return _quick_plan(vehicle_id, event_id, items, stored, updated_at)
    except TypeError:  # text orjson refuses (a lone surrogate): codec's fallback spells it
        return None


def _quick_plan(vehicle_id: str, event_id: str, items: tuple[dict[str, Any], ...],
                stored: Mapping[str, Held], updated_at: datetime | None) -> QuickPlan | None:
    times: dict[int, tuple[datetime, str]] = {}  # one conversion per distinct timestamp
    event_json = orjson.dumps(event_id).decode()
    writes: dict[str, Held] = {}
    changes: list[SignalChange] = []
    stale: list[str] = []
    seen: set[str] = set()
    newest = None
    for item in items:
        get = item.get
        code = get("code")
        if type(code) is not str or not code or len(code) > MAX_CODE_CHARS or code in seen:
            return None
        seen.add(code)
        meta, body = get("meta"), get("body")
        if get("status") is not None or meta is None:
            return None
        oem = meta.get("oemUpdatedAt")
        retrieved = meta.get("retrievedAt")
        if retrieved is None:
            retrieved = meta.get("fetchedAt")
        if type(oem) is not int or oem < _MIN_OEM_MS:
            return None
        if retrieved is not None and (type(retrieved) is not int
                                      or oem > retrieved + _MAX_AHEAD_MS):
            return None
        key = (True, oem * 1000, 0 if retrieved is None else retrieved * 1000, event_id)
        previous = stored.get(code)
        if previous is not None and key <= previous.key:
            if key == previous.key:
                return None  # a full tie: the content decides (rules.outranks)
            stale.append(code)
            continue
        if body is None:
            value, unit = None, None
        else:
            value, unit = body.get("value"), body.get("unit")
            if type(unit) is not str:
                unit = None
        value_json = _value_json(value)
        if value_json is None:
            return None
        group, name = get("group"), get("name")
        path = f"{group}.{name}" if (type(group) is str and group and type(name) is str
                                     and name) else None
        oem_at = times.get(oem)
        if oem_at is None:
            moment = _EPOCH + timedelta(milliseconds=oem)
            oem_at = times[oem] = (moment, moment.isoformat())
        text = '{"code":' + orjson.dumps(code).decode()
        if path is not None:
            text += ',"path":' + orjson.dumps(path).decode()
        text += ',"value":' + value_json
        if unit is not None:
            text += ',"unit":' + orjson.dumps(unit).decode()
        text += ',"oemUpdatedAt":"' + oem_at[1] + '"'
        retrieved_at = None
        if retrieved is not None:
            at = times.get(retrieved)
            if at is None:
                moment = _EPOCH + timedelta(milliseconds=retrieved)
                at = times[retrieved] = (moment, moment.isoformat())
            retrieved_at = at[0]
            text += ',"retrievedAt":"' + at[1] + '"'
        text += ',"eventId":' + event_json + ',"status":"ok"}'
        state = _new_state(code, path, value, unit, oem_at[0], retrieved_at, event_id, "ok",
                           None, None)
        writes[code] = Held(state, text, key)
        changes.append(_change(vehicle_id, code, path,
                               None if previous is None else previous.state, state))
        if newest is None or oem > newest:
            newest = oem
    if newest is not None:
        moment = times[newest][0]
        if updated_at is None or moment > updated_at:
            updated_at = moment
    return QuickPlan(writes, tuple(changes), tuple(stale), updated_at)
