"""The store's rules, with no I/O: what one event does to a vehicle's stored state.

Both backends read the part of a vehicle's state an event touches (a `Snapshot`), call
`plan(snapshot, event)`, and write the `Plan` back conditionally, so the rules are written and
tested once (tests/test_vehicle_state_rules.py, by Hypothesis over permutations).

Why the result does not depend on arrival order: every stored value is the maximum, under one
total order, of the readings that arrived for it (signals), or is built from maxima, minima and
a count of distinct events (errors). A maximum does not care about order or repetition.

Signals (keyed by vehicleId and signal code) are ordered by `signal_rank`:
    (has a usable oemUpdatedAt, oemUpdatedAt, retrievedAt, eventId, the reading's canonical JSON)
so a newer `oemUpdatedAt` wins; a tie goes to the later `retrievedAt`, then to the greater
eventId, then to the greater canonical JSON (only readings of one event can get that far). A
reading without a usable `oemUpdatedAt` ranks below every dated one: it is recorded for a
signal the store knows nothing newer of, and never hides a dated value.

Errors (keyed by vehicleId, error type, error code) keep the latest ERROR and the latest
RESOLVED observation, each as (meta.deliveredAt, eventId). The error is RESOLVED when its
latest RESOLVED is not older than its latest ERROR, where "older" means delivered more than
`RETRY_ALLOWANCE` before it: Smartcar restamps `meta.deliveredAt` on each of its retries
(about 3 minutes in all), so an ERROR whose first attempts did not reach us can carry a
`deliveredAt` later than a RESOLVED that was sent after it. `count` is the number of distinct
ERROR events; an event applied once is never counted again (the backends keep its eventId).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from ..events import Event, Signal, VehicleError, is_unicode
from . import ApplyResult, ErrorState, SignalChange, SignalState, SkippedSignal

VEHICLE_STATE: Final = "VEHICLE_STATE"
VEHICLE_ERROR: Final = "VEHICLE_ERROR"
STORED_TYPES: Final = frozenset({VEHICLE_STATE, VEHICLE_ERROR})

OPEN: Final = "OPEN"
RESOLVED: Final = "RESOLVED"

#: Smartcar's retries of one delivery span about 3 minutes (0, 25, 50, 100 s); a RESOLVED
#: delivered up to this long before an ERROR may have been sent after it.
RETRY_ALLOWANCE: Final = timedelta(minutes=3)
#: An `oemUpdatedAt` before this, or more than `MAX_OEM_AHEAD` after the signal's own
#: `retrievedAt` or after the delivery's `meta.deliveredAt`, is not a usable reading time (an
#: unset OEM clock reports 1970; a reading cannot have been taken a day after Smartcar fetched
#: or delivered it, and one dated in the future would hide every real reading after it).
MIN_OEM_UPDATED_AT: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_OEM_AHEAD: Final = timedelta(days=1)
#: The largest value the store keeps, as canonical JSON (ASCII): what one Azure Table string
#: property holds (64 KiB of UTF-16) with room to spare. Both backends use the same bound so
#: they keep the same things.
MAX_VALUE_CHARS: Final = 30_000
#: The deepest value the store keeps: arrays and objects nested at most this many levels
#: (Smartcar's are a few). Deeper is skipped before anything serialises it: orjson corrupts
#: its heap on tuples nested some thousands deep (the process aborts), and the recursive
#: steps of the rules would raise RecursionError.
MAX_VALUE_DEPTH: Final = 64
#: A signal code or error type/code longer than this is not one Smartcar sends; nor is a
#: signal's group, name or unit, a failed signal's error type or code, or an error's
#: resolution type.
MAX_CODE_CHARS: Final = 200
#: A vehicleId or eventId longer than this is not one Smartcar sends (its are UUIDs), and
#: Table cannot hold every id (one property holds 64 KiB; rows repeat the ids).
MAX_ID_CHARS: Final = 1024
#: An error's description and its list of affected signals are cut to these; the list
#: further to the first entries whose JSON fits MAX_VALUE_CHARS UTF-16 units (escaping can
#: make 100 entries of 200 characters far longer than one Table property holds).
MAX_TEXT_CHARS: Final = 4000
MAX_ERROR_SIGNALS: Final = 100

# Why a signal or error was recorded with a caveat or skipped (`SkippedSignal.reason`).
#: Recorded: no usable oemUpdatedAt, so it ranks below every dated reading.
UNDATED: Final = "undated"
#: Skipped: the value's JSON is longer than MAX_VALUE_CHARS or it nests deeper than
#: MAX_VALUE_DEPTH, or the signal's group, name or
#: unit (an error's type or code, for a failed signal) is longer than MAX_CODE_CHARS; or, for
#: every signal and error of the event, its vehicleId or eventId is longer than MAX_ID_CHARS
#: (`unkeyed`).
TOO_LARGE: Final = "too-large"
#: Skipped: neither a code nor a group and name, or a code over MAX_CODE_CHARS.
NO_CODE: Final = "no-code"
#: Skipped (an error entry): no usable `type`, or a `state` other than ERROR or RESOLVED.
BAD_ERROR: Final = "bad-error"
#: Skipped: text that is not Unicode (a lone surrogate, which JSON's `\u` escapes can spell
#: and no UTF-8 store can hold) in a signal's code, path, unit, value or error, or in an
#: error entry's fields; or, for every signal and error of the event, in its vehicleId or
#: eventId (`unkeyed`: the processor does not reach the store for such an event).
NOT_UNICODE: Final = "not-unicode"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, frozen mappings as objects (orjson; the
    standard library for what orjson refuses: integers beyond 64 bits)."""
    try:
        return orjson.dumps(value, default=dict, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          default=dict, allow_nan=False)


def thawed(value: Any) -> Any:
    """A parsed value with its read-only mappings and tuples as plain dicts and lists, as it
    reads back from storage."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {k: thawed(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thawed(v) for v in value]
    return value


def nests_deeper(value: Any, limit: int = MAX_VALUE_DEPTH) -> bool:
    """Whether `value` holds arrays or objects nested more than `limit` levels (iterative:
    any depth the parser accepted is measured without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, tuple | list):
            children = item
        else:
            continue
        if depth == limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _unicode_value(value: Any) -> bool:
    # Keys and strings at any depth. orjson refuses a lone surrogate, so only the standard
    # library's fallback can spell one.
    return is_unicode(canonical_json(value))


def _unicode_signal(signal: Signal, code: str) -> bool:
    """Whether all the text the store would keep of `signal` is Unicode."""
    if not (is_unicode(code) and is_unicode(signal.path)):
        return False
    if signal.ok:
        return is_unicode(signal.unit) and _unicode_value(signal.value)
    return is_unicode(signal.error_type) and is_unicode(signal.error_code)


def shown(text: str | None) -> str | None:
    """`text` with each lone surrogate as U+FFFD: for a skipped signal's record."""
    if is_unicode(text):
        return text
    assert text is not None
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def id_problem(text: str | None) -> str | None:
    """Why a vehicleId or eventId cannot key stored rows (NOT_UNICODE, TOO_LARGE), or None."""
    if not is_unicode(text):
        return NOT_UNICODE
    if text is not None and len(text) > MAX_ID_CHARS:
        return TOO_LARGE
    return None


def unkeyed_reason(event: Event) -> str | None:
    """Why no backend can key the event's rows: its vehicleId's `id_problem`, else its
    eventId's; None when both are usable."""
    return id_problem(event.vehicle_id) or id_problem(event.event_id)


def unkeyed(event: Event) -> ApplyResult | None:
    """The result for an event of any type whose vehicleId or eventId no backend can key
    (not Unicode, or longer than MAX_ID_CHARS): neither the store nor the inbox can take it,
    and its signals or error entries are skipped for that reason. None for any other event."""
    reason = unkeyed_reason(event)
    if reason is None:
        return None
    if event.event_type == VEHICLE_STATE:
        codes = [shown(signal_code(s)) for s in event.signals]
    elif event.event_type == VEHICLE_ERROR:
        codes = [shown(e.code) for e in event.errors]
    else:
        codes = []
    return ApplyResult(skipped=tuple(SkippedSignal(code=c, reason=reason) for c in codes))


def signal_code(signal: Signal) -> str | None:
    """The signal's key: its code, else Smartcar's spelling of one (`group-name`, lowercase)."""
    if signal.code:
        code = signal.code
    elif signal.group and signal.name:
        code = f"{signal.group}-{signal.name}".lower()
    else:
        return None
    return code if len(code) <= MAX_CODE_CHARS else None


def usable_oem(signal: Signal, delivered_at: datetime | None = None) -> datetime | None:
    oem = signal.oem_updated_at
    if oem is None or oem < MIN_OEM_UPDATED_AT:
        return None
    # `oem - MAX_OEM_AHEAD` rather than `retrieved_at + MAX_OEM_AHEAD`: a time within a day
    # of year 9999's end has no datetime a day later, and oem (2000 or later) one a day before.
    ahead = oem - MAX_OEM_AHEAD
    if signal.retrieved_at is not None and ahead > signal.retrieved_at:
        return None
    if delivered_at is not None and ahead > delivered_at:
        return None
    return oem


def signal_rank(state: SignalState) -> tuple[bool, datetime, datetime, str, str]:
    """The total order readings of one signal are kept by: the greatest is stored."""
    return (*_time_rank(state), _content_rank(state))


def _time_rank(state: SignalState) -> tuple[bool, datetime, datetime, str]:
    return (
        state.oem_updated_at is not None,
        state.oem_updated_at or _EPOCH,
        state.retrieved_at or _EPOCH,
        state.event_id or "",
    )


def _content_rank(state: SignalState) -> str:
    return canonical_json([state.value, state.unit, state.status, state.error_type,
                           state.error_code, state.path])


def outranks(a: SignalState, b: SignalState) -> bool:
    """`signal_rank(a) > signal_rank(b)`, with the content compared only on a full tie."""
    ta, tb = _time_rank(a), _time_rank(b)
    if ta != tb:
        return ta > tb
    return _content_rank(a) > _content_rank(b)


def same_reading(new: SignalState, old: SignalState) -> bool:
    """Whether `new` is the reading `old` fetched again: the same `oemUpdatedAt` (or neither
    has one), value, unit, status, error and path, only a later `retrievedAt` (or another
    eventId). Smartcar sends every subscribed signal on each delivery, so most signals of most
    deliveries are such re-reads, a failed signal (undated) among them: the store keeps the
    later fetch, but it is not a change."""
    return (new.oem_updated_at == old.oem_updated_at
            and _content_rank(new) == _content_rank(old))


def reading(signal: Signal, event_id: str, code: str | None = None,
            delivered_at: datetime | None = None) -> SignalState:
    """What the store would keep of one signal (check `value_fits` first); `code` is its
    `signal_code` when the caller has it already, `delivered_at` its event's
    `meta.deliveredAt`."""
    ok = signal.ok
    return _new_state(
        code or signal_code(signal) or "",
        signal.path,
        thawed(signal.value) if ok else None,
        signal.unit if ok else None,
        usable_oem(signal, delivered_at),
        signal.retrieved_at,
        event_id,
        "ok" if ok else "error",
        None if ok else signal.error_type,
        None if ok else signal.error_code,
    )


# `reading` runs for every signal of every delivery (~20 per 5 KB event). A frozen dataclass's
# __init__ sets each field through object.__setattr__; the slot descriptors set them three
# times faster, with the same result. The field list is checked at import, so a field added
# to SignalState cannot be left unset here.
_STATE_FIELDS: Final = ("code", "path", "value", "unit", "oem_updated_at", "retrieved_at",
                        "event_id", "status", "error_type", "error_code")
assert tuple(f.name for f in fields(SignalState)) == _STATE_FIELDS, "update _new_state"
(_set_code, _set_path, _set_value, _set_unit, _set_oem, _set_retrieved, _set_event_id,
 _set_status, _set_error_type, _set_error_code) = (
    getattr(SignalState, name).__set__ for name in _STATE_FIELDS)


def _new_state(code: str, path: str | None, value: Any, unit: str | None,
               oem_updated_at: datetime | None, retrieved_at: datetime | None,
               event_id: str, status: str, error_type: str | None,
               error_code: str | None) -> SignalState:
    state: SignalState = object.__new__(SignalState)
    _set_code(state, code)
    _set_path(state, path)
    _set_value(state, value)
    _set_unit(state, unit)
    _set_oem(state, oem_updated_at)
    _set_retrieved(state, retrieved_at)
    _set_event_id(state, event_id)
    _set_status(state, status)
    _set_error_type(state, error_type)
    _set_error_code(state, error_code)
    return state


#: A string value of at most this many characters fits whatever it holds: one character is at
#: most 4 UTF-8 bytes, plus the quotes (orjson writes non-ASCII as is and escapes controls as
#: `\uXXXX`, 6 bytes for a 1-byte character).
_SURELY_FITTING_TEXT: Final = (MAX_VALUE_CHARS - 2) // 6


def _short(text: str | None) -> bool:
    return text is None or len(text) <= MAX_CODE_CHARS


def texts_fit(signal: Signal) -> bool:
    """The signal's group and name (when it has both: its path), and its unit (or, failed,
    its error type and code) are at most MAX_CODE_CHARS each: with the code and the value,
    everything a stored signal holds is bounded."""
    if signal.path is not None and not (_short(signal.group) and _short(signal.name)):
        return False
    if signal.ok:
        return _short(signal.unit)
    return _short(signal.error_type) and _short(signal.error_code)


def value_fits(signal: Signal) -> bool:
    """The value's JSON fits MAX_VALUE_CHARS in UTF-8 bytes (so at most twice that in UTF-16,
    which is how Table Storage counts)."""
    value = signal.value
    # Most readings are numbers: a float or a bool is never long, and an int is at most the
    # 4300 digits a JSON parser reads. Only what could be long is serialised to measure it.
    if value is None or type(value) in (float, bool, int):
        return True
    if type(value) is str and len(value) <= _SURELY_FITTING_TEXT:
        return True
    return len(canonical_json(value).encode()) <= MAX_VALUE_CHARS


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """When an error was reported: the (deliveredAt, eventId) of the delivery that applied."""

    at: datetime
    event_id: str

    def key(self) -> tuple[datetime, str]:
        return (self.at, self.event_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorRecord:
    """Everything the store keeps of one error; `state` is what the read side shows."""

    state: ErrorState
    last_error: Observation | None = None
    last_resolved: Observation | None = None
    #: The canonical JSON of the observation the descriptive fields came from (tie-break).
    detail_rank: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return error_key(self.state.type, self.state.code)


def error_key(error_type: str, code: str | None) -> tuple[str, str]:
    return (error_type, code or "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The part of one vehicle's stored state an event touches."""

    vehicle_id: str
    signals: Mapping[str, SignalState] = field(default_factory=dict)
    errors: Mapping[tuple[str, str], ErrorRecord] = field(default_factory=dict)
    #: This eventId's errors were applied already (counts must not grow twice).
    errors_applied: bool = False
    #: Errors this eventId counted already, by an apply cut short before it applied the rest
    #: (a backend that writes an event in several transactions): not counted again.
    errors_counted: frozenset[tuple[str, str]] = frozenset()
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What to write for one event, and what to report."""

    signals: dict[str, SignalState] = field(default_factory=dict)
    errors: dict[tuple[str, str], ErrorRecord] = field(default_factory=dict)
    changes: tuple[SignalChange, ...] = ()
    stale: tuple[str, ...] = ()
    #: Codes of signals written that are not changes: the stored reading fetched again
    #: (`same_reading`).
    refreshed: tuple[str, ...] = ()
    skipped: tuple[SkippedSignal, ...] = ()
    errors_opened: tuple[ErrorState, ...] = ()
    errors_resolved: tuple[ErrorState, ...] = ()
    #: The vehicle's `updatedAt` after this event (the newest reading time it holds).
    updated_at: datetime | None = None
    #: The event's errors must be recorded as applied with the writes.
    marks_errors: bool = False

    @property
    def writes_anything(self) -> bool:
        return bool(self.signals or self.errors or self.marks_errors)


def codes_of(event: Event) -> list[str]:
    """The signal codes an event may write (what a backend reads before `plan`)."""
    if event.event_type != VEHICLE_STATE:
        return []
    return sorted({c for s in event.signals if (c := signal_code(s)) is not None})


def error_keys_of(event: Event) -> list[tuple[str, str]]:
    if event.event_type != VEHICLE_ERROR:
        return []
    return sorted({error_key(e.type or "", e.code) for e in event.errors if _usable_error(e)})


def plan(snapshot: Snapshot, event: Event) -> Plan:
    """What `event` does to `snapshot`. Pure: the same inputs give the same plan."""
    if event.vehicle_id is None or event.event_type not in STORED_TYPES:
        return Plan(updated_at=snapshot.updated_at)
    if event.event_type == VEHICLE_STATE:
        return _plan_signals(snapshot, event)
    return _plan_errors(snapshot, event)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    return a if b is None or a >= b else b


def _plan_signals(snapshot: Snapshot, event: Event) -> Plan:
    best: dict[str, SignalState] = {}
    skipped: list[SkippedSignal] = []
    stale: list[str] = []
    for signal in event.signals:
        code = signal_code(signal)
        if code is None:
            skipped.append(SkippedSignal(code=signal.code, reason=NO_CODE))
            continue
        if signal.ok and nests_deeper(signal.value):  # before anything serialises it
            skipped.append(SkippedSignal(code=shown(code), reason=TOO_LARGE))
            continue
        if not _unicode_signal(signal, code):
            skipped.append(SkippedSignal(code=shown(code), reason=NOT_UNICODE))
            continue
        if not texts_fit(signal) or (signal.ok and not value_fits(signal)):
            skipped.append(SkippedSignal(code=code, reason=TOO_LARGE))
            continue
        state = reading(signal, event.event_id, code, event.meta.delivered_at)
        if state.oem_updated_at is None:
            skipped.append(SkippedSignal(code=code, reason=UNDATED))
        held = best.get(code)
        if held is None or outranks(state, held):
            if held is not None:
                stale.append(code)
            best[code] = state
        else:
            stale.append(code)
    writes: dict[str, SignalState] = {}
    changes: list[SignalChange] = []
    refreshed: list[str] = []
    updated_at = snapshot.updated_at
    for code, state in best.items():
        stored = snapshot.signals.get(code)
        if stored is not None and not outranks(state, stored):
            stale.append(code)
            continue
        writes[code] = state
        if stored is not None and same_reading(state, stored):
            refreshed.append(code)
        else:
            changes.append(SignalChange(vehicle_id=snapshot.vehicle_id, code=code,
                                        path=state.path, previous=stored, current=state))
        updated_at = _latest(updated_at, state.oem_updated_at)
    return Plan(signals=writes, changes=tuple(changes), stale=tuple(stale),
                refreshed=tuple(refreshed), skipped=tuple(skipped), updated_at=updated_at)


def _usable_error(error: VehicleError) -> bool:
    return _error_problem(error) is None


def _error_problem(error: VehicleError) -> str | None:
    """Why an error entry is skipped (BAD_ERROR, NOT_UNICODE), or None."""
    if not (error.type and len(error.type) <= MAX_CODE_CHARS
            and len(error.code or "") <= MAX_CODE_CHARS and error.state in OPEN_STATES):
        return BAD_ERROR
    if not (is_unicode(error.type) and is_unicode(error.code)
            and is_unicode(error.description) and is_unicode(error.resolution_type)
            and all(is_unicode(ref.code) and is_unicode(ref.path) for ref in error.signals)):
        return NOT_UNICODE
    return None


# What a VEHICLE_ERROR's `state` may be: ERROR opens (or repeats) an error, RESOLVED closes it.
OPEN_STATES: Final = ("ERROR", RESOLVED)


def _detail_rank(error: VehicleError, observed: Observation) -> str:
    """Orders observations by (deliveredAt, eventId), then by content (a digest: fixed size)."""
    content = hashlib.sha256(canonical_json([
        error.state, error.description, error.resolution_type,
        [ref.code or ref.path for ref in error.signals]]).encode()).hexdigest()
    return f"{observed.at.isoformat()}|{observed.event_id}|{content}"


def _plan_errors(snapshot: Snapshot, event: Event) -> Plan:
    skipped = [SkippedSignal(code=shown(e.code), reason=problem)
               for e in event.errors if (problem := _error_problem(e)) is not None]
    if snapshot.errors_applied:
        return _applied_before(snapshot, event, tuple(skipped))
    observed = Observation(at=event.meta.delivered_at or _EPOCH, event_id=event.event_id)
    records: dict[tuple[str, str], ErrorRecord] = {}
    counted: set[tuple[str, str]] = set()
    for error in event.errors:
        if not _usable_error(error):
            continue
        assert error.type is not None
        key = error_key(error.type, error.code)
        record = records.get(key) or snapshot.errors.get(key) or ErrorRecord(
            state=ErrorState(type=error.type, code=error.code, state=OPEN))
        records[key] = _observe(record, error, observed,
                                count=key not in counted and key not in snapshot.errors_counted)
        if error.state != RESOLVED:
            counted.add(key)
    opened: list[ErrorState] = []
    resolved: list[ErrorState] = []
    for key, record in records.items():
        before = snapshot.errors.get(key)
        if record.state.state == OPEN:
            opened.append(record.state)
        elif before is None or before.state.state != RESOLVED:
            resolved.append(record.state)
    updated_at = _latest(snapshot.updated_at, observed.at if records else None)
    return Plan(errors=records, skipped=tuple(skipped), errors_opened=tuple(opened),
                errors_resolved=tuple(resolved), updated_at=updated_at, marks_errors=True)


def _applied_before(snapshot: Snapshot, event: Event,
                    skipped: tuple[SkippedSignal, ...]) -> Plan:
    """An error event an earlier attempt applied, whose handlers did not complete (they failed,
    the process died, or it was dead-lettered and is replayed): nothing to write, and the
    handlers get its errors as they stand now, so a retry reports what the first attempt did.
    Open ones are opened (as on the first attempt); a resolved one is resolved when this
    event's RESOLVED is the one that closed it."""
    opened: list[ErrorState] = []
    resolved: list[ErrorState] = []
    keys = dict.fromkeys(error_key(e.type or "", e.code) for e in event.errors
                         if _usable_error(e))
    for record in [snapshot.errors[key] for key in keys if key in snapshot.errors]:
        if record.state.state == OPEN:
            opened.append(record.state)
        elif record.last_resolved is not None and (
                record.last_resolved.event_id == event.event_id):
            resolved.append(record.state)
    return Plan(skipped=skipped, errors_opened=tuple(opened), errors_resolved=tuple(resolved),
                updated_at=snapshot.updated_at)


def _observe(record: ErrorRecord, error: VehicleError, observed: Observation, *,
             count: bool) -> ErrorRecord:
    """`record` after one more observation of it (order-free: maxima, minima, a count)."""
    state = record.state
    last_error, last_resolved = record.last_error, record.last_resolved
    first_seen, last_seen, total = state.first_seen, state.last_seen, state.count
    if error.state == RESOLVED:
        if last_resolved is None or observed.key() > last_resolved.key():
            last_resolved = observed
    else:
        if last_error is None or observed.key() > last_error.key():
            last_error = observed
        first_seen = observed.at if first_seen is None else min(first_seen, observed.at)
        last_seen = observed.at if last_seen is None else max(last_seen, observed.at)
        total += 1 if count else 0
    rank = _detail_rank(error, observed)
    if rank > record.detail_rank:
        state = replace(
            state,
            description=(error.description or "")[:MAX_TEXT_CHARS] or None,
            resolution_type=(error.resolution_type or "")[:MAX_CODE_CHARS] or None,
            signals=_affected(error),
            event_id=observed.event_id,
        )
        detail_rank = rank
    else:
        detail_rank = record.detail_rank
    # A difference, not `last_error.at - RETRY_ALLOWANCE`: no datetime is 3 minutes before
    # year 1's start.
    closed = last_resolved is not None and (
        last_error is None or last_error.at - last_resolved.at <= RETRY_ALLOWANCE)
    # The code as `error_key` keys it: an empty code and none are one error, stored as None
    # whichever arrived first.
    state = replace(state, code=state.code or None,
                    state=RESOLVED if closed else OPEN, first_seen=first_seen,
                    last_seen=last_seen, count=total,
                    resolved_at=last_resolved.at if closed and last_resolved else None)
    return ErrorRecord(state=state, last_error=last_error, last_resolved=last_resolved,
                       detail_rank=detail_rank)


def _affected(error: VehicleError) -> tuple[str, ...]:
    """The error's affected signals as stored: each cut to MAX_CODE_CHARS, the first
    MAX_ERROR_SIGNALS, and of those as many as fit MAX_VALUE_CHARS UTF-16 units as the
    canonical JSON list the row keeps."""
    kept: list[str] = []
    units = 2  # the brackets
    for ref in error.signals[:MAX_ERROR_SIGNALS]:
        entry = (ref.code or ref.path or "")[:MAX_CODE_CHARS]
        units += utf16_units(canonical_json(entry)) + (1 if kept else 0)
        if units > MAX_VALUE_CHARS:
            break
        kept.append(entry)
    return tuple(kept)


def utf16_units(text: str) -> int:
    """`text`'s length as Table Storage counts it: in UTF-16 code units."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2
