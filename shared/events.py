"""Smartcar webhook payloads as typed, immutable objects.

`parse_event(body)` reads every payload shape described in the handbook (smartcar.md) into an
`Event` and raises `InvalidEventError`, and only that, for anything it cannot read, with a
message naming the JSON path that is wrong. `peek_envelope(body)` is the receiver's cheap,
never-raising look at the envelope fields it needs before the payload is stored.

Why one module past ~800 lines: the types and the parser are one job. `Event`'s lazy views
(`signals`, `data`) are built by the parser's own helpers from what `parse_event` checked, and
`peek_envelope` reads the envelope by the same text rules (`_text_of`, `_text`), so that it and
`parse_event` agree on `eventId`. Split into types, parsing and peeking, each part would lean
on the others' private helpers, and the decisions below would be spread over three files.

How tolerant parsing is, in four rules:

1. Required: `eventId` and `eventType` are non-empty strings (any `eventType` is valid, so new
   Smartcar types pass through); a `VERIFY` event has a string `data.challenge`.
2. Known containers (`data`, `meta`, `data.vehicle`, `data.triggers`, `triggers`,
   `data.signals` and each signal's `body`, `status`, `status.error` and `meta`,
   `data.errors` and each error's `resolution` and `signals`) must have their JSON type when
   present; `null` counts as absent. A wrong type is an error naming the path.
3. Timestamps (`meta.deliveredAt`, signal `oemUpdatedAt`, `retrievedAt`/`fetchedAt`) are epoch
   milliseconds or ISO-8601 strings (a trailing `Z` and a missing offset both mean UTC); one
   that is present but unreadable is an error.
4. Everything else is read where it has the expected type and is `None` otherwise: descriptive
   text fields of the wrong type carry no clear meaning, and an unknown key is ignored.

Decisions:

- The body must be UTF-8 (a leading BOM is dropped). `bytes.decode` is used rather than
  `json.loads(bytes)`, which would also guess UTF-16 and UTF-32.
- `NaN`, `Infinity` and numbers that overflow to infinity (`1e400`) are rejected: they are not
  JSON (RFC 8259), Smartcar never sends them, they make `Event` unequal to itself and they would
  be written back out as invalid JSON. Parsing the event fails with a clear message, so the
  processor dead-letters it for inspection instead of acting on a meaningless number.
- Duplicate keys: the last one wins, as with every `json.loads` in the app, so the receiver's
  `peek_envelope` and the processor's `parse_event` always agree on `eventId`.
- Nesting deeper than the interpreter's recursion limit is an `InvalidEventError`.
- The parsed JSON is frozen deeply: objects become read-only mappings (`MappingProxyType`) and
  arrays become tuples, in `Event.data`, `Signal.body` and `Signal.value`. To write one out as
  JSON, use `json.dumps(value, default=dict)`.
- Everything above is checked when `parse_event` runs, so an event that parsed is valid
  throughout. Only the costly views are built later, on first access, and then kept:
  `Event.signals` and the frozen `Event.data` (most handlers read a few signals, some none).
  The event stays immutable, and equality, hashing and `repr` are the same either way.
- Error messages never contain the payload, string values, or numbers found under `data`
  (signal values can be locations); they name the path and the JSON type that was found.
- Passing something that is neither `bytes` nor `str` is a programming error: `TypeError`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final

from .fastjson import DECLINED, loads_or_declined

__all__ = [
    "Envelope",
    "Event",
    "InvalidEventError",
    "Meta",
    "Signal",
    "SignalRef",
    "Trigger",
    "VehicleError",
    "parse_event",
    "peek_envelope",
]

VERIFY: Final = "VERIFY"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})
# Longest number literal an error message may show (only for envelope fields, see _describe).
_MAX_SHOWN_NUMBER: Final = 24
_SHOWS_NUMBERS: Final = frozenset({"eventId", "eventType", "data.challenge", "meta"})


class InvalidEventError(ValueError):
    """The payload is not a Smartcar event we can read; the message says what is wrong.

    Messages name the JSON path and what was found, e.g. "eventType is missing" or
    "data.signals[2] must be an object, got list". They never include the payload body or
    signal values.
    """


def _path(group: str | None, name: str | None) -> str | None:
    return f"{group}.{name}" if group and name else None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalRef:
    """A signal named by a trigger or a vehicle error: its code and/or `Group.Name`."""

    code: str | None = None
    name: str | None = None
    group: str | None = None

    @property
    def path(self) -> str | None:
        """`Group.Name`, e.g. `TractionBattery.StateOfCharge`; None unless both are known."""
        return _path(self.group, self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Trigger:
    """Why a delivery happened: a signal that changed, or `code="FIRST_DELIVERY"`."""

    type: str | None = None
    code: str | None = None
    name: str | None = None
    group: str | None = None

    @property
    def path(self) -> str | None:
        """`Group.Name` of the triggering signal; None unless both are known."""
        return _path(self.group, self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Signal:
    """One entry of `data.signals`. A failed signal (`ok` False) has no body."""

    code: str | None = None
    name: str | None = None
    group: str | None = None
    value: Any = field(default=None, hash=False)
    unit: str | None = None
    body: Mapping[str, Any] | None = field(default=None, hash=False)
    ok: bool = True
    status: str | None = None
    error_code: str | None = None
    error_type: str | None = None
    oem_updated_at: datetime | None = None
    retrieved_at: datetime | None = None

    @property
    def path(self) -> str | None:
        """`Group.Name`, e.g. `TractionBattery.StateOfCharge`; None unless both are known."""
        return _path(self.group, self.name)


# The parser makes ~20 Signals per 5 KB event. A frozen dataclass's __init__ sets each field
# through object.__setattr__; the slot descriptors set them three times faster, with the same
# result (equality and hashing are the dataclass's). The field list is checked at import, so
# a field added to Signal cannot be left unset here.
_SIGNAL_FIELDS: Final = ("code", "name", "group", "value", "unit", "body", "ok", "status",
                         "error_code", "error_type", "oem_updated_at", "retrieved_at")
assert tuple(f.name for f in fields(Signal)) == _SIGNAL_FIELDS, "update _new_signal"
(_set_code, _set_name, _set_group, _set_value, _set_unit, _set_body, _set_ok, _set_status,
 _set_error_code, _set_error_type, _set_oem, _set_retrieved) = (
    getattr(Signal, name).__set__ for name in _SIGNAL_FIELDS)


def _new_signal(code: str | None, name: str | None, group: str | None, value: Any,
                unit: str | None, body: Mapping[str, Any] | None, ok: bool, status: str | None,
                error_code: str | None, error_type: str | None,
                oem_updated_at: datetime | None, retrieved_at: datetime | None) -> Signal:
    signal: Signal = object.__new__(Signal)
    _set_code(signal, code)
    _set_name(signal, name)
    _set_group(signal, group)
    _set_value(signal, value)
    _set_unit(signal, unit)
    _set_body(signal, body)
    _set_ok(signal, ok)
    _set_status(signal, status)
    _set_error_code(signal, error_code)
    _set_error_type(signal, error_type)
    _set_oem(signal, oem_updated_at)
    _set_retrieved(signal, retrieved_at)
    return signal


@dataclass(frozen=True, slots=True, kw_only=True)
class VehicleError:
    """One entry of a VEHICLE_ERROR's `data.errors`."""

    type: str | None = None
    code: str | None = None
    state: str | None = None
    description: str | None = None
    suggested_user_message: str | None = None
    doc_url: str | None = None
    resolution_type: str | None = None
    signals: tuple[SignalRef, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Meta:
    """The delivery's `meta`. Every field is optional (TEST mode omits version and webhookId)."""

    version: str | None = None
    webhook_id: str | None = None
    webhook_name: str | None = None
    delivery_id: str | None = None
    delivered_at: datetime | None = None
    mode: str | None = None
    signal_count: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Event:
    """A parsed Smartcar webhook delivery. Build it with `parse_event`.

    `signals` and `data` are built from the decoded `data` object on first access and kept;
    `parse_event` has already checked everything they read.
    """

    event_id: str
    event_type: str
    vehicle_id: str | None = None
    meta: Meta = field(default_factory=Meta)
    triggers: tuple[Trigger, ...] = ()
    errors: tuple[VehicleError, ...] = ()
    challenge: str | None = None
    # The decoded `data` object as the JSON decoder returned it, never mutated. Equality
    # compares it (`signals` and `data` are read from it); hashing leaves it out, as it left
    # out `data` when that was a field.
    _raw_data: dict[str, Any] = field(default_factory=dict, hash=False)
    # The views, once built (two threads may both build one: they build equal values).
    _data: Mapping[str, Any] | None = field(default=None, init=False, compare=False)
    _signals: tuple[Signal, ...] | None = field(default=None, init=False, compare=False)

    @property
    def data(self) -> Mapping[str, Any]:
        """The payload's `data` object, frozen deeply (empty when absent or null)."""
        frozen = self._data
        if frozen is None:
            frozen = _frozen_copy(self._raw_data)
            object.__setattr__(self, "_data", frozen)
        return frozen

    @property
    def signals(self) -> tuple[Signal, ...]:
        """`data.signals`, in payload order."""
        signals = self._signals
        if signals is None:
            signals = tuple(_signal(item) for item in self._raw_data.get("signals") or ())
            object.__setattr__(self, "_signals", signals)
        return signals

    def signal_items(self) -> tuple[dict[str, Any], ...]:
        """`data.signals` as the JSON decoder returned them, in payload order: what `signals`
        is built from, for readers that need a few fields of every signal (the vehicle state
        store) without building them all. `parse_event` has checked every field `signals`
        reads. The objects are the event's own: never mutate them."""
        return tuple(self._raw_data.get("signals") or ())

    def signal(self, path: str) -> Signal | None:
        """The signal named `Group.Name` (e.g. `TractionBattery.StateOfCharge`) or by its code
        (e.g. `tractionbattery-stateofcharge`), case-insensitively; None when absent. An empty
        `path` names no signal.

        If the payload repeats a signal, the one with the latest `oem_updated_at` wins.
        """
        wanted = path.casefold()
        if not wanted:
            return None
        for candidate in self.signals_by_recency():
            if (candidate.path or "").casefold() == wanted or (
                candidate.code or ""
            ).casefold() == wanted:
                return candidate
        return None

    def signals_by_recency(self) -> tuple[Signal, ...]:
        """Signals newest first by `oem_updated_at`; those without one last, in payload order.

        Smartcar does not guarantee the order of `data.signals`.
        """
        return _by_recency(self.signals)

    def signals_at(self, paths: Collection[str]) -> tuple[Signal, ...]:
        """The signals whose `Group.Name` or code is one of `paths` (exactly, as the vehicle
        state store's `ChangeFilter` matches them), in `signals_by_recency` order. Only those
        are built when `signals` has not been read: a handler registry looks up the few
        signals it has handlers for, not the ~20 of a delivery."""
        if self._signals is not None:
            return _by_recency([s for s in self._signals if s.path in paths or s.code in paths])
        # A signal's name is what follows one of the dots of its path: comparing names first
        # leaves one dict lookup per signal that cannot match by path.
        names = {path[i + 1:] for path in paths for i, c in enumerate(path) if c == "."}
        return _by_recency([
            _signal(item) for item in self._raw_data.get("signals") or ()
            if (type(name := item.get("name")) is str and name in names
                and _path(_str_or_none(item.get("group")), name) in paths)
            or (type(code := item.get("code")) is str and code in paths)
        ])

    def __repr__(self) -> str:
        # The dataclass repr of the public attributes, lazy ones included.
        return (
            f"Event(event_id={self.event_id!r}, event_type={self.event_type!r}, "
            f"vehicle_id={self.vehicle_id!r}, meta={self.meta!r}, triggers={self.triggers!r}, "
            f"signals={self.signals!r}, errors={self.errors!r}, challenge={self.challenge!r}, "
            f"data={self.data!r})"
        )


def _by_recency(signals: Sequence[Signal]) -> tuple[Signal, ...]:
    dated = [s for s in signals if s.oem_updated_at is not None]
    undated = [s for s in signals if s.oem_updated_at is None]
    # sort() stays stable with reverse=True, so equal timestamps keep payload order.
    dated.sort(key=lambda s: s.oem_updated_at or _EPOCH, reverse=True)
    return (*dated, *undated)


def _refuse_assignment(self: Event, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _refuse_deletion(self: Event, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


# A frozen dataclass with slots refuses assignment to its fields only; on Python 3.11, assigning
# any other name (`event.signals = ...`) fails with an unrelated TypeError from super(). The
# event refuses every assignment alike, as it did when `signals` and `data` were fields.
setattr(Event, "__setattr__", _refuse_assignment)  # noqa: B010 (mypy refuses a method assignment)
setattr(Event, "__delattr__", _refuse_deletion)  # noqa: B010


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """What `peek_envelope` could read; None for anything absent or not a string."""

    event_id: str | None = None
    event_type: str | None = None
    vehicle_id: str | None = None
    webhook_id: str | None = None
    delivery_id: str | None = None
    mode: str | None = None
    challenge: str | None = None
    #: Where `challenge` was read: `payload.challenge` in Smartcar's older VERIFY format.
    challenge_path: str = "data.challenge"


# ---------------------------------------------------------------------------------------------
# Decoding


def _text_of(body: bytes | bytearray | memoryview | str) -> str:
    if isinstance(body, str):
        text = body
    elif isinstance(body, bytes | bytearray | memoryview):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEventError(
                f"body is not valid UTF-8: {exc.reason} at byte {exc.start}"
            ) from None
    else:
        raise TypeError(f"body must be bytes or str, got {type(body).__name__}")
    return text.removeprefix("\ufeff")


def _reject_constant(name: str) -> Any:
    raise InvalidEventError(f"body is not valid JSON: {name} is not a JSON number")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):
        raise InvalidEventError("body is not valid JSON: a number is too large for a float")
    return number


# The C decoder with two hooks: `parse_constant` runs only for NaN and Infinity, and
# `parse_float` once per literal with a fraction or exponent (about 0.2 µs each, ~4 µs for a
# 5 KB event), to catch the literals that overflow to infinity (1e400). Scanning the text for
# such literals first was dearer: `re` over 5 KB costs 14 to 230 µs, a `bytes.translate`
# filter about 9 µs. Built once: `json.loads` with hooks builds a decoder per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _load(body: bytes | bytearray | memoryview | str) -> Any:
    # orjson refuses NaN, Infinity and literals that overflow to infinity, as the hooks do, so
    # what it returns needs no check; whatever it declines is decoded here as before.
    decoded = loads_or_declined(body)
    if decoded is not DECLINED:
        return decoded
    text = _text_of(body)
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidEventError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except InvalidEventError:
        raise
    except RecursionError:
        raise InvalidEventError("body is nested too deeply to read") from None
    except ValueError:
        # The only other ValueError: int() refusing a literal longer than the interpreter's
        # limit (a guard against quadratic-time conversion).
        raise InvalidEventError(
            f"body is not valid JSON: a number has more than {sys.get_int_max_str_digits()} digits"
        ) from None


def _frozen_copy(root: dict[str, Any]) -> Mapping[str, Any]:
    """A deeply read-only copy of a decoded JSON object: objects become `MappingProxyType`s
    over copies, arrays become tuples.

    Iterative, so nesting that the decoder accepted cannot exhaust the stack of whoever reads
    `Event.data` first. Copies of objects are filled in after their proxies are made (a proxy
    is a live view); an array becomes a tuple only once everything inside it is final, so
    arrays are converted last, innermost first (reverse order of discovery).
    """
    top = dict(root)
    pending: list[dict[str, Any] | list[Any]] = [top]
    arrays: list[tuple[Any, Any, list[Any]]] = []  # (holder, key, copy)
    while pending:
        container: Any = pending.pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, value in items:
            kind = type(value)
            if kind is dict:
                copy: Any = dict(value)
                container[key] = MappingProxyType(copy)  # replacing a value, not resizing
            elif kind is list:
                copy = list(value)  # replaced by its tuple below, once its contents are final
                arrays.append((container, key, copy))
            else:
                continue
            pending.append(copy)
    for holder, key, copy in reversed(arrays):
        holder[key] = tuple(copy)
    return MappingProxyType(top)


# ---------------------------------------------------------------------------------------------
# Checking and reading the decoded tree


def _describe(value: Any, path: str) -> str:
    """The JSON type found, for error messages. Numbers are shown only for envelope fields
    (an allow-list): elsewhere they may be vehicle data such as a latitude."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        shown = path in _SHOWS_NUMBERS or path.startswith("meta.")
        literal = repr(value)
        return literal if shown and len(literal) <= _MAX_SHOWN_NUMBER else type(value).__name__
    return type(value).__name__


def _not_object(value: Any, path: str) -> InvalidEventError:
    return InvalidEventError(f"{path} must be an object, got {_describe(value, path)}")


def _object(value: Any, path: str) -> dict[str, Any] | None:
    # The decoder makes every JSON object exactly a dict: an exact type test is the fastest.
    if value is None or type(value) is dict:
        return value
    raise _not_object(value, path)


def _array(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if type(value) is list:
        return value
    raise InvalidEventError(f"{path} must be a list, got {_describe(value, path)}")


def _text(obj: Mapping[str, Any] | None, key: str) -> str | None:
    if obj is None:
        return None
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _required_text(obj: Mapping[str, Any], key: str) -> str:
    if key not in obj:
        raise InvalidEventError(f"{key} is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidEventError(f"{key} must be a non-empty string, got {_describe(value, key)}")
    if not value.strip():
        found = "an empty string" if not value else "a blank string"
        raise InvalidEventError(f"{key} must be a non-empty string, got {found}")
    return value


@lru_cache(maxsize=4096)
def _from_epoch_ms(value: int | float) -> datetime:
    return _EPOCH + timedelta(milliseconds=value)


def _from_iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        # Smartcar's timestamps are UTC; a string without an offset means UTC too.
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


# Integer epoch milliseconds in this range are timestamps for certain (datetime's years 1 to
# 9999): the check a 5 KB event needs ~40 times skips the conversion and its error handling.
_MIN_EPOCH_MS: Final = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_MAX_EPOCH_MS: Final = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)


def _timestamp(value: Any, path: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return _from_epoch_ms(value)
        except (OverflowError, ValueError):
            raise InvalidEventError(
                f"{path} is out of range for a timestamp in epoch milliseconds"
            ) from None
    if isinstance(value, str):
        try:
            return _from_iso(value)
        except ValueError:
            raise InvalidEventError(f"{path} is not an ISO-8601 timestamp") from None
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise InvalidEventError(f"{path} is out of range for a UTC timestamp") from None
    raise InvalidEventError(
        f"{path} must be epoch milliseconds or an ISO-8601 string, got {_describe(value, path)}"
    )


def _known_timestamp(value: int | float | str) -> datetime:
    """A timestamp that `_timestamp` accepted when the event was parsed."""
    return _from_iso(value) if type(value) is str else _from_epoch_ms(value)


def _ref_from_string(text: str) -> SignalRef:
    """`"Group.Name"` (split on the first dot) or, without a dot, a signal code."""
    if "." in text:
        group, name = text.split(".", 1)
        return SignalRef(group=group or None, name=name or None)
    return SignalRef(code=text or None)


def _ref_from_object(obj: Mapping[str, Any]) -> SignalRef:
    return SignalRef(code=_text(obj, "code"), name=_text(obj, "name"), group=_text(obj, "group"))


def _signal_ref(value: Any, path: str) -> SignalRef:
    if isinstance(value, str):
        return _ref_from_string(value)
    if type(value) is dict:
        return _ref_from_object(value)
    raise InvalidEventError(f"{path} must be an object or a string, got {_describe(value, path)}")


def _trigger(value: Any, path: str) -> Trigger:
    if isinstance(value, str):
        # A bare signal, as in `"triggers": ["InternalCombustionEngine.FuelLevel"]`.
        ref = _ref_from_string(value)
        return Trigger(code=ref.code, name=ref.name, group=ref.group)
    if type(value) is not dict:
        raise InvalidEventError(
            f"{path} must be an object or a string, got {_describe(value, path)}"
        )
    # Either {"code","name","group"} or {"type", "signal": {...} | "Group.Name"}; a nested
    # signal's fields win over the trigger's own.
    get = value.get
    code, name, group = _str_or_none(get("code")), _str_or_none(get("name")), _str_or_none(
        get("group"))
    nested = get("signal")
    if nested is not None:
        ref = _signal_ref(nested, f"{path}.signal")
        code, name, group = ref.code or code, ref.name or name, ref.group or group
    return Trigger(type=_str_or_none(get("type")), code=code, name=name, group=group)


def is_unicode(text: str | None) -> bool:
    """False for text holding a lone surrogate: legal in JSON (a `\\u` escape, which the
    standard library's decoder keeps), but not Unicode, so UTF-8 cannot encode it (AMQP
    properties, SQLite, Table Storage)."""
    if text is None or text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _str_or_none(value: Any) -> str | None:
    return value if type(value) is str else None


def _check_signals(items: list[Any]) -> None:
    """Everything `_signal` will read of each `data.signals` entry has its JSON type and every
    timestamp is readable. The hot path of parsing (a 5 KB event holds ~20 signals): one loop,
    exact type tests, and JSON paths formatted only for an error message."""
    low, high = _MIN_EPOCH_MS, _MAX_EPOCH_MS
    for index, item in enumerate(items):
        if type(item) is not dict:
            raise _not_object(item, f"data.signals[{index}]")
        get = item.get
        body, status, meta = get("body"), get("status"), get("meta")
        if body is not None and type(body) is not dict:
            raise _not_object(body, f"data.signals[{index}].body")
        if status is not None:
            if type(status) is not dict:
                raise _not_object(status, f"data.signals[{index}].status")
            error = status.get("error")
            if error is not None and type(error) is not dict:
                raise _not_object(error, f"data.signals[{index}].status.error")
        if meta is None:
            continue
        if type(meta) is not dict:
            raise _not_object(meta, f"data.signals[{index}].meta")
        # Integer epoch milliseconds in range (what Smartcar sends) are known good without a
        # conversion; anything else, null included, is checked by `_timestamp`.
        oem = meta.get("oemUpdatedAt")
        if type(oem) is not int or not low <= oem <= high:
            _timestamp(oem, f"data.signals[{index}].meta.oemUpdatedAt")
        # Smartcar's docs say retrievedAt, real deliveries say fetchedAt.
        retrieved_key = "retrievedAt" if meta.get("retrievedAt") is not None else "fetchedAt"
        retrieved = meta.get(retrieved_key)
        if type(retrieved) is not int or not low <= retrieved <= high:
            _timestamp(retrieved, f"data.signals[{index}].meta.{retrieved_key}")


def _signal(item: dict[str, Any]) -> Signal:
    """A decoded `data.signals` entry that `_check_signals` accepted; only its body, which the
    signal keeps, is frozen (freezing all of `data` would cost twice as much)."""
    get = item.get
    body, status, meta = get("body"), get("status"), get("meta") or _EMPTY
    if body is not None:
        body = _frozen_copy(body)
    error = status.get("error") if status else None
    status_value = _str_or_none(status.get("value")) if status else None
    retrieved_key = "retrievedAt" if meta.get("retrievedAt") is not None else "fetchedAt"
    oem, retrieved = meta.get("oemUpdatedAt"), meta.get(retrieved_key)
    return _new_signal(
        _str_or_none(get("code")),
        _str_or_none(get("name")),
        _str_or_none(get("group")),
        body.get("value") if body is not None else None,
        _str_or_none(body.get("unit")) if body is not None else None,
        body,
        status_value is None or status_value.upper() != "ERROR",
        status_value,
        _str_or_none(error.get("code")) if error else None,
        _str_or_none(error.get("type")) if error else None,
        None if oem is None else _known_timestamp(oem),
        None if retrieved is None else _known_timestamp(retrieved),
    )


def _vehicle_error(value: Any, path: str) -> VehicleError:
    item = _object(value, path)
    if item is None:
        raise InvalidEventError(f"{path} must be an object, got null")
    resolution = _object(item.get("resolution"), f"{path}.resolution")
    refs = _array(item.get("signals"), f"{path}.signals")
    return VehicleError(
        type=_text(item, "type"),
        code=_text(item, "code"),
        state=_text(item, "state"),
        description=_text(item, "description"),
        suggested_user_message=_text(item, "suggestedUserMessage"),
        doc_url=_text(item, "docURL"),
        resolution_type=_text(resolution, "type"),
        signals=tuple(_signal_ref(ref, f"{path}.signals[{i}]") for i, ref in enumerate(refs)),
    )


def _meta(value: Any) -> Meta:
    meta = _object(value, "meta")
    if meta is None:
        return Meta()
    count = meta.get("signalCount")
    return Meta(
        version=_text(meta, "version"),
        webhook_id=_text(meta, "webhookId"),
        webhook_name=_text(meta, "webhookName"),
        delivery_id=_text(meta, "deliveryId"),
        delivered_at=_timestamp(meta.get("deliveredAt"), "meta.deliveredAt"),
        mode=_text(meta, "mode"),
        signal_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
    )


def _triggers(root: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[Trigger, ...]:
    found: list[Trigger] = []
    for path, container in (
        ("data.triggers", data.get("triggers")),
        ("triggers", root.get("triggers")),
    ):
        for i, item in enumerate(_array(container, path)):
            found.append(_trigger(item, f"{path}[{i}]"))
    # Both places may list the same trigger; keep each once, in payload order.
    return tuple(dict.fromkeys(found))


def parse_event(body: bytes | str) -> Event:
    """Parse a Smartcar webhook body into an `Event`.

    Raises `InvalidEventError` (a `ValueError`) for every body that is not a Smartcar event we
    can read, whatever its bytes; `TypeError` only if `body` is neither bytes nor str.
    """
    root = _load(body)
    if type(root) is not dict:
        raise InvalidEventError(f"body must be a JSON object, got {_describe(root, 'body')}")
    event_id = _required_text(root, "eventId")
    event_type = _required_text(root, "eventType")
    data = _object(root.get("data"), "data")
    if data is None:
        data = {}

    if event_type == VERIFY:
        if "challenge" not in data:
            raise InvalidEventError("data.challenge is missing")
        challenge = data["challenge"]
        if not isinstance(challenge, str):
            raise InvalidEventError(
                f"data.challenge must be a string, got {_describe(challenge, 'data.challenge')}"
            )
    else:
        challenge = _text(data, "challenge")

    meta = _meta(root.get("meta"))
    vehicle = _object(data.get("vehicle"), "data.vehicle")
    vehicle_id = _text(root, "vehicleId") or _text(vehicle, "id")
    triggers = _triggers(root, data)
    _check_signals(_array(data.get("signals"), "data.signals"))
    errors = tuple(
        _vehicle_error(item, f"data.errors[{i}]")
        for i, item in enumerate(_array(data.get("errors"), "data.errors"))
    )
    return Event(
        event_id=event_id,
        event_type=event_type,
        vehicle_id=vehicle_id,
        meta=meta,
        triggers=triggers,
        errors=errors,
        challenge=challenge,
        _raw_data=data,
    )


def peek_envelope(body: bytes) -> Envelope:
    """Best-effort envelope fields for the receiver's hot path; never raises.

    Reads what it can from any body (not only valid events: a signed payload is stored even
    when the processor will reject it) and returns all None for non-JSON. Unlike
    `parse_event` it accepts NaN/Infinity, so a body that will be dead-lettered still gets its
    `eventId` for de-duplication.
    """
    return peek(body)[0]


def peek(body: bytes) -> tuple[Envelope, dict[str, Any] | None]:
    """`peek_envelope`, and the JSON object it decoded (None when the body is not one), so
    the receiver decodes a body once for its envelope and its delivery signals. The object
    is the decoder's own: read it, never change it. Never raises."""
    try:
        # Only strings are read here, so orjson's reading of huge integers does not matter.
        root = loads_or_declined(body, exact_numbers=False)
        if root is DECLINED:
            root = json.loads(_text_of(body))
        if not isinstance(root, dict):
            return Envelope(), None
        return _envelope_of(root), root
    except Exception:
        # The receiver must answer Smartcar whatever arrives: bad UTF-8, bad JSON, nesting
        # deeper than the recursion limit, or a caller passing the wrong type.
        return Envelope(), None


def _envelope_of(root: dict[str, Any]) -> Envelope:
    data = root.get("data")
    data = data if isinstance(data, dict) else {}
    meta = root.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    vehicle = data.get("vehicle")
    vehicle = vehicle if isinstance(vehicle, dict) else {}
    if "eventType" not in root and root.get("eventName") == "verify":
        return _legacy_verify(root)
    return Envelope(
        event_id=_text(root, "eventId"),
        event_type=_text(root, "eventType"),
        vehicle_id=_text(root, "vehicleId") or _text(vehicle, "id"),
        webhook_id=_text(meta, "webhookId"),
        delivery_id=_text(meta, "deliveryId"),
        mode=_text(meta, "mode"),
        challenge=_text(data, "challenge"),
    )


def _legacy_verify(root: Mapping[str, Any]) -> Envelope:
    """Smartcar's older VERIFY, `{"version": "2.0", "webhookId": ..., "eventName": "verify",
    "payload": {"challenge": ...}}`: answered by the same rules as `eventType` VERIFY."""
    payload = root.get("payload")
    payload = payload if isinstance(payload, dict) else {}
    return Envelope(
        event_type=VERIFY,
        webhook_id=_text(root, "webhookId"),
        challenge=_text(payload, "challenge"),
        challenge_path="payload.challenge",
    )
