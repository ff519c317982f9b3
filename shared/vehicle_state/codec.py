"""Stored rows: the flat property maps both backends keep, and the escaping of keys.

A row is a `dict[str, str | int]` with no None values (Azure Table Storage drops them, so
neither backend keeps them): the same map is a Table entity's properties and a SQLite row's
JSON. Values are canonical JSON text; times are ISO-8601 in UTC. Reading a row back gives what
was written (tests/test_vehicle_state_codec.py); the fields every row of its kind has are
required, so a row that is not ours fails with a KeyError rather than reading as defaults.

The escaped keys are part of the stored layout: a changed escaping would file a known vehicle
under a new partition and lose sight of what is stored under the old one.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

import orjson

from . import ErrorState, SignalChange, SignalState
from .rules import ErrorRecord, Observation, canonical_json

Row = dict[str, Any]

# Key characters kept as they are; everything else (Table forbids / \ # ? and control
# characters in keys) is written `!xx` per UTF-8 byte. `:` separates key parts.
_SAFE: Final = frozenset(string.ascii_letters + string.digits + "-_.")
#: Table keys hold at most 1 KiB; a longer escaped id is replaced by its SHA-256 (the row keeps
#: the id itself).
_MAX_KEY_PART: Final = 200


def escape_key(value: str) -> str:
    """`value` as a Table key part: reversible for short values, a digest for long ones."""
    escaped = "".join(c if c in _SAFE else "".join(f"!{b:02x}" for b in c.encode())
                      for c in value)
    if len(escaped) > _MAX_KEY_PART:
        return "!h" + hashlib.sha256(value.encode()).hexdigest()
    return escaped


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    # The signals of one delivery mostly share their times, so most spellings are repeats.
    # Only UTC times are cached: equal datetimes in other zones compare equal but spell
    # differently.
    return _utc_iso(value) if value.tzinfo is UTC else value.isoformat()


@lru_cache(maxsize=256)
def _utc_iso(value: datetime) -> str:
    return value.isoformat()


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _put(row: Row, **values: Any) -> Row:
    row.update({k: v for k, v in values.items() if v is not None})
    return row


def signal_row(state: SignalState) -> Row:
    # Written out rather than through `_put`: this runs for every stored signal.
    row: Row = {"code": state.code}
    if state.path is not None:
        row["path"] = state.path
    row["value"] = canonical_json(state.value)
    if state.unit is not None:
        row["unit"] = state.unit
    if state.oem_updated_at is not None:
        row["oemUpdatedAt"] = _iso(state.oem_updated_at)
    if state.retrieved_at is not None:
        row["retrievedAt"] = _iso(state.retrieved_at)
    if state.event_id is not None:
        row["eventId"] = state.event_id
    row["status"] = state.status
    if state.error_type is not None:
        row["errorType"] = state.error_type
    if state.error_code is not None:
        row["errorCode"] = state.error_code
    return row


def signal_from_row(row: Row) -> SignalState:
    return SignalState(
        code=str(row["code"]), path=row.get("path"), value=loads(row["value"]),
        unit=row.get("unit"), oem_updated_at=_time(row.get("oemUpdatedAt")),
        retrieved_at=_time(row.get("retrievedAt")), event_id=row.get("eventId"),
        status=str(row["status"]), error_type=row.get("errorType"),
        error_code=row.get("errorCode"),
    )


def error_row(record: ErrorRecord) -> Row:
    state = record.state
    return _put(
        {}, type=state.type, code=state.code, state=state.state,
        firstSeen=_iso(state.first_seen), lastSeen=_iso(state.last_seen), count=state.count,
        description=state.description, resolutionType=state.resolution_type,
        signals=canonical_json(list(state.signals)), eventId=state.event_id,
        resolvedAt=_iso(state.resolved_at),
        lastErrorAt=_iso(record.last_error.at) if record.last_error else None,
        lastErrorEvent=record.last_error.event_id if record.last_error else None,
        lastResolvedAt=_iso(record.last_resolved.at) if record.last_resolved else None,
        lastResolvedEvent=record.last_resolved.event_id if record.last_resolved else None,
        detailRank=record.detail_rank or None,
    )


def _observation(row: Row, at: str, event_id: str) -> Observation | None:
    """The observation `error_row` wrote as the pair of fields `at` and `event_id`."""
    when = _time(row.get(at))
    return None if when is None else Observation(at=when, event_id=str(row[event_id]))


def error_from_row(row: Row) -> ErrorRecord:
    state = ErrorState(
        type=str(row["type"]), code=row.get("code"), state=str(row["state"]),
        first_seen=_time(row.get("firstSeen")), last_seen=_time(row.get("lastSeen")),
        count=int(row["count"]), description=row.get("description"),
        resolution_type=row.get("resolutionType"), signals=tuple(loads(row["signals"])),
        event_id=row.get("eventId"), resolved_at=_time(row.get("resolvedAt")),
    )
    return ErrorRecord(
        state=state,
        last_error=_observation(row, "lastErrorAt", "lastErrorEvent"),
        last_resolved=_observation(row, "lastResolvedAt", "lastResolvedEvent"),
        # Not written while empty (`error_row`).
        detail_rank=str(row.get("detailRank", "")),
    )


def change_to_json(change: SignalChange) -> dict[str, Any]:
    return {
        "vehicleId": change.vehicle_id, "code": change.code, "path": change.path,
        "previous": None if change.previous is None else signal_row(change.previous),
        "current": signal_row(change.current),
    }


def change_from_json(data: dict[str, Any]) -> SignalChange:
    previous = data.get("previous")
    return SignalChange(
        vehicle_id=str(data["vehicleId"]), code=str(data["code"]), path=data.get("path"),
        previous=None if previous is None else signal_from_row(previous),
        current=signal_from_row(data["current"]),
    )


# orjson reads an integer beyond 64 bits as a float; the standard library keeps it exact.
_LONG_NUMBER: Final = re.compile(r"\d{19}")


def change_text(change: SignalChange, previous_row: str | None, current_row: str) -> str:
    """One change as `change_to_json` spells it, from the two rows' JSON texts."""
    return (f'{{"vehicleId":{dumps(change.vehicle_id)},"code":{dumps(change.code)},'
            f'"path":{dumps(change.path)},"previous":{previous_row or "null"},'
            f'"current":{current_row}}}')


def loads(text: str) -> Any:
    """JSON text back to values, exactly as they were written."""
    if _LONG_NUMBER.search(text):
        return json.loads(text)
    return orjson.loads(text)


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def change_entry_text(change: SignalChange) -> str:
    """One pending change as compact JSON in ASCII (json's default `ensure_ascii`), so that
    its length in characters is its size wherever it is counted (a Table property counts
    UTF-16 units)."""
    return json.dumps(change_to_json(change), separators=(",", ":"))


def pending_text(entries: Iterable[str]) -> str:
    """Pending changes as one JSON list, from their `change_entry_text`s."""
    return "[" + ",".join(entries) + "]"


def changes_from_text(text: str) -> list[SignalChange]:
    return [change_from_json(item) for item in loads(text)]
