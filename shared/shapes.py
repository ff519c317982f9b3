"""Payload-shape fingerprints: notice when Smartcar changes what its deliveries look like.

Smartcar's payloads have changed shape between versions, and its own docs disagree about
where `triggers` sit and what type `meta.deliveredAt` has (handbook smartcar.md). The
processor reads all the known variants, but a new one would only show as missing data. So
every authenticated delivery is fingerprinted by its shape, never its values:

- `meta.version`, the set of top-level keys and the set of `meta` keys;
- where `triggers` and `signals` sit (`data.triggers`, top-level `triggers`, absent);
- the JSON type of `meta.deliveredAt`;
- signal codes whose group is not one of Smartcar's signal schema groups.

A shape is *known* when every part of it is one the project reads (`KNOWN_*` below). The
first time an instance sees a shape, `ShapeTracker` says so (the caller emits one metric
point and one log line); later sightings cost a set lookup. The tracker is per instance and
bounded: a restarted or new instance reports the shapes it sees again, which is why the alert
fires on *unknown* shapes only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from .fastjson import DECLINED, loads_or_declined

# What the project reads (shared/events.py); anything else makes a shape unknown.
KNOWN_EVENT_TYPES: Final = frozenset({"VEHICLE_STATE", "VEHICLE_ERROR", "VERIFY"})
#: `meta.version` values; None: absent (Smartcar omits it in TEST mode).
KNOWN_VERSIONS: Final = frozenset({"4.0", None})
KNOWN_TOP_LEVEL_KEYS: Final = frozenset(
    {"eventId", "eventType", "vehicleId", "data", "meta", "triggers"}
)
KNOWN_META_KEYS: Final = frozenset(
    {"version", "webhookId", "webhookName", "deliveryId", "deliveredAt", "mode", "signalCount"}
)
KNOWN_TRIGGER_PLACES: Final = frozenset({"data.triggers", "triggers", "absent"})
KNOWN_SIGNAL_PLACES: Final = frozenset({"data.signals", "absent"})
KNOWN_DELIVERED_AT_TYPES: Final = frozenset({"number", "string"})
#: The signal groups of Smartcar's signal schema (smartcar.com/docs/api-reference/signals/
#: schema), lowercased as they start a signal code (`tractionbattery-stateofcharge`).
SIGNAL_GROUPS: Final = frozenset(
    {
        "charge", "climate", "closure", "connectivitysoftware", "connectivitystatus",
        "diagnostics", "hvac", "internalcombustionengine", "location", "lowvoltagebattery",
        "motion", "odometer", "service", "surveillance", "tractionbattery", "transmission",
        "vehicleidentification", "vehicleuseraccount", "wheel",
    }
)

# Bounds on what a fingerprint (and so its log line) holds, whatever a payload carries.
_MAX_KEYS = 64
_MAX_KEY_LENGTH = 64
_MAX_NEW_CODES = 16
_MAX_VERSION_LENGTH = 16
# Printable ASCII but the quote and the backslash: written as it is, within the length bound.
_PLAIN = re.compile(rf'[ !#-\[\]-~]{{0,{_MAX_KEY_LENGTH}}}')
#: How many shapes an instance remembers; the oldest is forgotten first.
SHAPES_REMEMBERED: Final = 1024


@dataclass(frozen=True, slots=True)
class Shape:
    """The shape of one delivery: names and types, never values (a body holds locations)."""

    event_type: str | None
    version: str | None  # meta.version, None when absent; `<number>` etc. when not a string
    top_level_keys: tuple[str, ...]
    meta_keys: tuple[str, ...]
    triggers_at: str  # data.triggers, triggers, both, absent
    signals_at: str  # data.signals, signals, both, absent
    delivered_at_type: str  # number, string, null, absent, object, array, boolean
    new_signal_codes: tuple[str, ...]  # codes outside SIGNAL_GROUPS, sorted, bounded

    #: 12 hex digits naming the shape: the same shape gets the same id on every instance.
    id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: the receiver reads it for the span, the metric and the tracker.
        parts = (self.event_type or "", self.version or "", *self.top_level_keys, "",
                 *self.meta_keys, "", self.triggers_at, self.signals_at,
                 self.delivered_at_type, *self.new_signal_codes)
        digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass"))
        object.__setattr__(self, "id", digest.hexdigest()[:12])

    def unknown_parts(self) -> list[str]:
        """What in this shape the project does not read; empty for a known shape."""
        parts = []
        if self.event_type not in KNOWN_EVENT_TYPES:
            parts.append(f"eventType {self.event_type!r}")
        if self.version not in KNOWN_VERSIONS:
            parts.append(f"meta.version {self.version!r}")
        # A top-level `signals` is reported by where signals sit, below.
        extra = sorted(set(self.top_level_keys) - KNOWN_TOP_LEVEL_KEYS - {"signals"})
        if extra:
            parts.append(f"top-level keys {extra}")
        extra = sorted(set(self.meta_keys) - KNOWN_META_KEYS)
        if extra:
            parts.append(f"meta keys {extra}")
        if self.triggers_at not in KNOWN_TRIGGER_PLACES:
            parts.append(f"triggers at {self.triggers_at}")
        if self.signals_at not in KNOWN_SIGNAL_PLACES:
            parts.append(f"signals at {self.signals_at}")
        if self.delivered_at_type not in KNOWN_DELIVERED_AT_TYPES:
            parts.append(f"meta.deliveredAt is {self.delivered_at_type}")
        if self.new_signal_codes:
            parts.append(f"signal codes {list(self.new_signal_codes)}")
        return parts

    @property
    def known(self) -> bool:
        return not self.unknown_parts()

    def describe(self) -> dict[str, Any]:
        return {
            "eventType": self.event_type,
            "metaVersion": self.version,
            "topLevelKeys": list(self.top_level_keys),
            "metaKeys": list(self.meta_keys),
            "triggersAt": self.triggers_at,
            "signalsAt": self.signals_at,
            "deliveredAtType": self.delivered_at_type,
            "newSignalCodes": list(self.new_signal_codes),
        }


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _escaped(key: str) -> str:
    """`key` as JSON writes it inside quotes, bounded: it can never break a log line."""
    if _PLAIN.fullmatch(key):  # the usual case, without an encoder call
        return key
    return json.dumps(key)[1:-1][:_MAX_KEY_LENGTH]


def _keys(obj: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(map(_escaped, obj))[:_MAX_KEYS])


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _place(root: Mapping[str, Any], data: Mapping[str, Any], name: str) -> str:
    nested, top = name in data, name in root
    if nested and top:
        return "both"
    return f"data.{name}" if nested else name if top else "absent"


def _new_codes(root: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[str, ...]:
    found: set[str] = set()
    for container in (data, root):
        signals = container.get("signals")
        if not isinstance(signals, list):
            continue
        # Every subscribed signal comes on every delivery: classify each distinct code once.
        for code in {_code_part(s.get("code")) for s in signals if type(s) is dict}:
            if code is not None and not _known_code(code):
                found.add(code)
    return tuple(sorted(found)[:_MAX_NEW_CODES])


def _code_part(code: Any) -> str | None:
    """A signal's code as the shape names it: escaped text; a code that is not text (an
    object, a list: a new format, which the store skips as no-code) by its JSON type, as
    `<object>`; None for none (a signal named by its group and name only)."""
    if type(code) is str:
        return _escaped(code)
    return None if code is None else f"<{_json_type(code)}>"


@lru_cache(maxsize=4096)
def _known_code(code: str) -> bool:
    """Its group (before the first `-`) is one of Smartcar's signal groups."""
    return code.partition("-")[0].lower() in SIGNAL_GROUPS


def _version(meta: Mapping[str, Any]) -> str | None:
    if "version" not in meta:
        return None
    value = meta["version"]
    if isinstance(value, str) and len(value) <= _MAX_VERSION_LENGTH and value.isprintable():
        return value
    return f"<{_json_type(value)}>"


def decode_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (not JSON, not an object). Never raises."""
    decoded = loads_or_declined(body, exact_numbers=False)  # only names and types are read
    if decoded is DECLINED:
        try:
            # A byte order mark, which the event parser and the receiver read past, too.
            decoded = json.loads(body.decode("utf-8").removeprefix("\ufeff"))
        except (ValueError, RecursionError):
            return None
    return decoded if isinstance(decoded, dict) else None


def fingerprint(body: bytes) -> Shape | None:
    """The shape of a delivery's body; None when it is not a JSON object. Never raises."""
    root = decode_object(body)
    return None if root is None else shape_of(root)


def shape_of(root: Mapping[str, Any]) -> Shape:
    """The shape of a decoded delivery."""
    data = _object(root.get("data"))
    meta = _object(root.get("meta"))
    event_type = root.get("eventType")
    return Shape(
        event_type=event_type[:_MAX_KEY_LENGTH] if isinstance(event_type, str) else None,
        version=_version(meta),
        top_level_keys=_keys(root),
        meta_keys=_keys(meta),
        triggers_at=_place(root, data, "triggers"),
        signals_at=_place(root, data, "signals"),
        delivered_at_type=(
            _json_type(meta["deliveredAt"]) if "deliveredAt" in meta else "absent"
        ),
        new_signal_codes=_new_codes(root, data),
    )


class ShapeTracker:
    """The shapes this instance has seen (at most `limit`, least recently seen forgotten).

    Not locked: the receiver calls it from one event loop, and a race between threads would
    at worst report a shape twice."""

    def __init__(self, *, limit: int = SHAPES_REMEMBERED) -> None:
        self._limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first_sighting(self, shape: Shape) -> bool:
        """True the first time this instance sees `shape` (or sees it again after forgetting)."""
        shape_id = shape.id
        if shape_id in self._seen:
            self._seen.move_to_end(shape_id)
            return False
        self._seen[shape_id] = None
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True
