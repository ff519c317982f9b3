"""The rules' fast path for the common VEHICLE_STATE: the same result as `rules.plan`, from
the decoded signals, without building a `Signal` per entry.

Most deliveries are ~20 signals that each carry a code, a number or short string in `body`,
and integer `oemUpdatedAt`/`retrievedAt` milliseconds, and most of them are newer than what
is stored. For such an event `quick_plan` decides every signal from an integer key, and each
stored row's JSON text is put together from its parts (`text_of`, when it is needed).
Anything else in the event (a signal without a code or with an error status, a repeated code,
a timestamp that is not integer milliseconds or is not usable, a value that may be too large,
a unit, group or name over `MAX_CODE_CHARS`, or a reading that ties with the stored one) makes
it answer None, and the caller runs `rules.plan`, the one definition of the rules.

tests/test_vehicle_state_quick.py checks, by Hypothesis over mixed events and stored states,
that whenever `quick_plan` answers, its plan and its row texts are `rules.plan`'s and
`codec.signal_row`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any, Final

import orjson

from ..events import _from_epoch_ms
from . import ChangeFilter, Changes, Outbox, SignalChange, SignalState
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
#: What `_new_state` needs besides the constant "ok" status, and the row text's parts: (value,
#: the signal's code, path and unit (`_Static`), its times (`_Times`), eventId, the row
#: text's end after the times).
Recipe = tuple[Any, "_Static", "_Times", str, str]
#: A stored signal as a backend keeps it at hand: (rank key, the row's JSON text as
#: `codec.signal_row` spells it, or None until `text_of` makes it from the recipe; its state
#: or the recipe of its state). A plain tuple: the fast path makes ~20 per delivery, and most
#: states and many texts are never looked at (a signal written again before its vehicle's
#: row is written needs no text).
Held = tuple[Key, "str | None", "SignalState | Recipe"]


def _micros(value: datetime | None) -> int:
    return 0 if value is None else (value - _EPOCH) // _US


def held(state: SignalState, text: str) -> Held:
    """`state` and its stored row text, with the key `rules.signal_rank` orders it by."""
    return ((state.oem_updated_at is not None, _micros(state.oem_updated_at),
             _micros(state.retrieved_at), state.event_id or ""), text, state)


def state_of(entry: Held) -> SignalState:
    """The stored signal's state (built from its recipe when the fast path wrote it)."""
    state = entry[2]
    if type(state) is tuple:
        value, static, moments, event_id, _ = state
        return _new_state(static.code, static.path, value, static.unit, moments.oem_at,
                          moments.retrieved_at, event_id, "ok", None, None)
    assert isinstance(state, SignalState)
    return state


def text_of(entry: Held) -> str:
    """The stored signal's row text (made from its recipe when the fast path left it for
    later: a number's, which cannot fail)."""
    text = entry[1]
    if text is not None:
        return text
    recipe = entry[2]
    assert type(recipe) is tuple
    value, static, moments, _, tail = recipe
    return f'{static.head}"{orjson.dumps(value).decode()}"{static.unit_json}{moments.text}{tail}'


#: One accepted change: (code, path, the stored signal before, the signal now).
Changed = tuple[str, str | None, Held | None, Held]
_CODE: Final = itemgetter(0)


def change_of(vehicle_id: str, changed: Changed) -> SignalChange:
    code, path, previous, current = changed
    return SignalChange(vehicle_id=vehicle_id, code=code, path=path,
                        previous=None if previous is None else state_of(previous),
                        current=state_of(current))


@dataclass(slots=True)
class QuickPlan:
    """What `rules.plan` would answer for a signals-only event: the writes (with their row
    texts), the changes, the stale and the refreshed codes in payload order, the vehicle's new
    updatedAt."""

    writes: dict[str, Held]
    changed: list[Changed]
    stale: tuple[str, ...]
    refreshed: tuple[str, ...]
    updated_at: datetime | None

    def changes(self, vehicle_id: str) -> Changes:
        """The changes as `ApplyResult.changes`: each built on first use."""
        changed = self.changed
        return Changes(codes=tuple(map(_CODE, changed)),
                       build=lambda: tuple(change_of(vehicle_id, c) for c in changed))

    def kept(self, vehicle_id: str, outbox: Outbox | None) -> list[SignalChange]:
        """The changes `outbox` keeps pending for the handlers (all without one)."""
        if outbox is None:
            return [change_of(vehicle_id, c) for c in self.changed]
        if type(outbox) is ChangeFilter:
            names = outbox.names
            if not names:
                return []
            return [change_of(vehicle_id, c) for c in self.changed
                    if c[0] in names or c[1] in names]
        return [change_of(vehicle_id, c) for c in self.changed if outbox(c[0], c[1])]


def quick_plan(event_id: str, items: tuple[dict[str, Any], ...],
               stored: Mapping[str, Held], updated_at: datetime | None,
               delivered_at: datetime | None = None) -> QuickPlan | None:
    """`rules.plan` for a VEHICLE_STATE whose signals all take the fast path; None otherwise.

    `stored` holds the vehicle's stored signals by code (those the event names, at least);
    `updated_at` is the vehicle's stored updatedAt; `delivered_at` the event's
    `meta.deliveredAt`.
    """
    # The latest usable oemUpdatedAt by the delivery time, in epoch ms (`rules.usable_oem`).
    latest = None if delivered_at is None else (delivered_at - _EPOCH) // _MS + _MAX_AHEAD_MS
    try:
        return _quick_plan(event_id, items, stored, updated_at, latest)
    except TypeError:
        # Text orjson refuses (a lone surrogate): the rules decide such an event.
        return None


def _quick_plan(event_id: str, items: tuple[dict[str, Any], ...],
                stored: Mapping[str, Held], updated_at: datetime | None,
                latest: int | None) -> QuickPlan | None:
    # The parts of a row text that repeat: per (code, group, name, unit) its start and its
    # path; per (oemUpdatedAt, retrievedAt) the times and the rank key (a delivery's signals
    # mostly share them, so most signals find the previous signal's at hand).
    times: dict[tuple[int, int | None], tuple[_Times, Key]] = {}
    event_tail = ',"eventId":' + orjson.dumps(event_id).decode() + ',"status":"ok"}'
    writes: dict[str, Held] = {}
    changed: list[Changed] = []
    stale: list[str] = []
    refreshed: list[str] = []
    newest: _Times | None = None
    last_oem: Any = None
    last_retrieved: Any = None
    moments: _Times | None = None
    key: Key = (False, 0, 0, "")  # set with `moments`, before its first use
    static_of = _STATIC.get
    stored_of = stored.get
    try:
        for item in items:
            get = item.get
            code = get("code")
            if type(code) is not str:
                return None
            status = get("status")
            if status is not None and not _succeeded(status):
                return None
            meta: Any = get("meta")  # None: `meta.get` raises AttributeError: declined
            oem = meta.get("oemUpdatedAt")
            retrieved = meta.get("retrievedAt")
            if retrieved is None:
                retrieved = meta.get("fetchedAt")
            # Integer milliseconds only (`type` rules out bool and float, which compare
            # equal to an int and would otherwise share its times).
            if type(oem) is not int or (retrieved is not None and type(retrieved) is not int):
                return None
            if oem != last_oem or retrieved != last_retrieved or moments is None:
                found = times.get((oem, retrieved))
                if found is None:
                    made = _times(oem, retrieved)
                    if made is None or (latest is not None and oem > latest):
                        return None
                    found = times[(oem, retrieved)] = (
                        made, (True, made.oem_us, made.retrieved_us, event_id))
                moments, key = found
                last_oem, last_retrieved = oem, retrieved
            previous = stored_of(code)
            older = False
            if previous is not None and key <= previous[0]:
                if key == previous[0]:
                    return None  # a full tie: the content decides (rules.outranks)
                older = True
            body = get("body") or _NO_BODY
            value: Any = body.get("value")
            unit: Any = body.get("unit")
            group = get("group")
            name = get("name")
            static = static_of(code)
            if (static is None or static.group != group or static.name != name
                    or static.unit_given != unit):
                static = _static(code, group, name, unit)
                if static is None:
                    return None
            kind = type(value)
            if kind is float or (kind is int and _MIN_INT <= value <= _MAX_INT):
                text = None  # a number's text cannot fail: `text_of` makes it when needed
            else:
                value_json = _other_value_json(value)  # and whether the fast path takes it
                if value_json is None:
                    return None
                text = f"{static.head}{value_json}{static.unit_json}{moments.text}{event_tail}"
            if older:
                # Stale only now: the rules skip a signal they cannot keep (too large, not
                # Unicode) before they compare it with the stored one, and so does this.
                stale.append(code)
                continue
            entry = writes[code] = (key, text, (value, static, moments, event_id, event_tail))
            if previous is not None and previous[0][1] == key[1] and _same_reading(
                    previous[2], value, static):
                refreshed.append(code)  # the stored reading fetched again (`same_reading`)
            else:
                changed.append((code, static.path, previous, entry))
            if moments is not newest and (newest is None or moments.oem_us > newest.oem_us):
                newest = moments
    except AttributeError:  # a signal without `meta`
        return None
    # A repeated code: one entry fewer in `writes` than signals written, or a code both
    # stale and written, or stale twice (the rules decide which reading counts).
    if len(writes) + len(stale) != len(items) or (stale and (
            len(set(stale)) != len(stale) or not writes.keys().isdisjoint(stale))):
        return None
    if newest is not None and (updated_at is None or newest.oem_at > updated_at):
        updated_at = newest.oem_at
    return QuickPlan(writes, changed, tuple(stale), tuple(refreshed), updated_at)


@dataclass(frozen=True, slots=True)
class _Times:
    """A reading's times: as the rank key orders them, as datetimes, as the row spells them."""

    oem_us: int
    retrieved_us: int
    oem_at: datetime
    retrieved_at: datetime | None
    text: str


def _times(oem: Any, retrieved: Any) -> _Times | None:
    """`oem`/`retrieved` as the fast path takes them, or None: integer milliseconds, and an
    oemUpdatedAt that `rules.usable_oem` accepts (else the reading is undated)."""
    if type(oem) is not int or oem < _MIN_OEM_MS:
        return None
    if retrieved is not None and (type(retrieved) is not int
                                  or oem > retrieved + _MAX_AHEAD_MS):
        return None
    oem_at = _from_epoch_ms(oem)
    text = ',"oemUpdatedAt":"' + oem_at.isoformat() + '"'
    if retrieved is None:
        return _Times(oem * 1000, 0, oem_at, None, text)
    retrieved_at = _from_epoch_ms(retrieved)
    return _Times(oem * 1000, retrieved * 1000, oem_at, retrieved_at,
                  text + ',"retrievedAt":"' + retrieved_at.isoformat() + '"')


@dataclass(frozen=True, slots=True)
class _Static:
    """What a signal's row text starts with (code and path) and its unit part, which stay
    the same from one delivery to the next."""

    code: str
    head: str
    path: str | None
    unit: str | None
    unit_json: str
    #: The group, name and unit as the payload gave them (a signal whose are equal shares
    #: these parts: equal values make the same parts).
    group: Any
    name: Any
    unit_given: Any


#: A signal without a body: no value, no unit.
_NO_BODY: Final[dict[str, Any]] = {}

#: `_Static` by code, for the group, name and unit it holds; emptied when full.
_STATIC: dict[str, _Static] = {}
_STATIC_MAX: Final = 4096


def _static(code: str, group: Any, name: Any, unit: Any) -> _Static | None:
    if not code or len(code) > MAX_CODE_CHARS or (type(unit) is str
                                                  and len(unit) > MAX_CODE_CHARS):
        return None
    path = f"{group}.{name}" if (type(group) is str and group and type(name) is str
                                 and name) else None
    if path is not None and max(len(group), len(name)) > MAX_CODE_CHARS:
        return None  # the rules skip it (`rules.texts_fit`)
    unit_text = unit if type(unit) is str else None
    head = '{"code":' + orjson.dumps(code).decode()
    if path is not None:
        head += ',"path":' + orjson.dumps(path).decode()
    static = _Static(code, head + ',"value":', path, unit_text,
                     "" if unit_text is None else ',"unit":' + orjson.dumps(unit_text).decode(),
                     group, name, unit)
    if len(_STATIC) >= _STATIC_MAX:
        _STATIC.clear()
    _STATIC[code] = static
    return static


def _same_reading(stored: SignalState | Recipe, value: Any, static: _Static) -> bool:
    """`rules.same_reading` for a reading of the fast path (status ok, dated) and a stored one
    with the same `oemUpdatedAt`. A stored value orjson cannot write (an integer beyond 64
    bits) raises TypeError: the rules decide that event."""
    if type(stored) is tuple:
        stored_value, stored_static = stored[0], stored[1]
        if stored_static.path != static.path or stored_static.unit != static.unit:
            return False
    else:
        assert isinstance(stored, SignalState)
        if (stored.status != "ok" or stored.path != static.path or stored.unit != static.unit
                or stored.error_type is not None or stored.error_code is not None):
            return False
        stored_value = stored.value
    return bool(orjson.dumps(stored_value, option=orjson.OPT_SORT_KEYS)
                == orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def _succeeded(status: Any) -> bool:
    """Whether a signal's `status` is one the rules read as a success (`"SUCCESS"`, as
    Smartcar may send with a body, or any value but "ERROR"): its stored state is the same as
    without a status."""
    if type(status) is not dict:
        return False
    value = status.get("value")
    return not (type(value) is str and value.upper() == "ERROR")


def _other_value_json(value: Any) -> str | None:
    """The row's `value` field for what is not a float or a 64-bit int, or None when the
    value is not one the fast path writes."""
    if value is None or type(value) is bool:
        return f'"{orjson.dumps(value).decode()}"'
    if type(value) is str and len(value) <= _SURELY_FITTING_TEXT:
        return orjson.dumps(orjson.dumps(value).decode()).decode()
    return None
