"""A test double for the read side's boundary: `MemoryVehicleStore`, a VehicleStateStore in memory.

The read route, the CLI's `vehicles` commands and the inspector only read a store (and the
inspector shows what each `apply` did). These tests need a store to read, not the store's
own rules, which the backends implement and test (SQLite, Azure Table). So this double keeps
the simplest rules that give readable states: a signal changes for a strictly newer
`oemUpdatedAt` (same or older is stale, none is skipped), an ERROR opens or counts its error,
a RESOLVED closes it. It is used by tests only, injected where the real store goes: the
runtime's `vehicle_state` and the factory the CLI and the local host call.

`fail_with` makes every read raise, as an unreachable backend would.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from shared.cli.simulate import build_event
from shared.events import Event, parse_event
from shared.vehicle_state import (
    ApplyResult,
    Changes,
    ErrorState,
    InboxPruned,
    SignalChange,
    SignalState,
    SkippedSignal,
    VehicleStateStore,
    VehicleSummary,
    VehicleView,
)


@dataclass
class _Vehicle:
    signals: dict[str, SignalState] = field(default_factory=dict)
    errors: dict[tuple[str, str | None], ErrorState] = field(default_factory=dict)
    updated_at: datetime | None = None


class MemoryVehicleStore:
    def __init__(self, *, clock: Any = None) -> None:
        self._vehicles: dict[str, _Vehicle] = {}
        self._processed: set[str] = set()
        self._pending: dict[tuple[str, str], tuple[SignalChange, ...]] = {}
        self._clock = clock or (lambda: datetime.now(UTC))
        self.fail_with: Exception | None = None
        self.closed = False
        self.reads: list[str] = []

    # -- what the tests feed it ------------------------------------------------------------
    def apply_body(self, body: bytes) -> ApplyResult:
        """`apply` for a raw webhook body, from synchronous test code."""
        return asyncio.run(self.apply(parse_event(body)))

    # -- VehicleStateStore -------------------------------------------------------------------
    async def apply(self, event: Event, *, outbox: Any = None) -> ApplyResult:
        """`outbox` (a `(code, path) -> bool` filter of what stays pending for the handlers)
        as the store's interface has it; all changes without it."""
        if event.vehicle_id is None or event.event_type not in ("VEHICLE_STATE", "VEHICLE_ERROR"):
            return ApplyResult()
        vehicle = self._vehicles.setdefault(event.vehicle_id, _Vehicle())
        changes: list[SignalChange] = []
        stale: list[str] = []
        skipped: list[SkippedSignal] = []
        for signal in event.signals:
            code = signal.code or signal.path
            if code is None or signal.oem_updated_at is None:
                skipped.append(SkippedSignal(code=code, reason="no oemUpdatedAt"))
                continue
            previous = vehicle.signals.get(code)
            if previous is not None and previous.oem_updated_at is not None and (
                    signal.oem_updated_at <= previous.oem_updated_at):
                stale.append(code)
                continue
            current = SignalState(
                code=code, path=signal.path, value=signal.value, unit=signal.unit,
                oem_updated_at=signal.oem_updated_at, retrieved_at=signal.retrieved_at,
                event_id=event.event_id, status="ok" if signal.ok else "error",
                error_type=None if signal.ok else signal.error_type,
                error_code=None if signal.ok else signal.error_code,
            )
            vehicle.signals[code] = current
            changes.append(SignalChange(vehicle_id=event.vehicle_id, code=code,
                                        path=signal.path, previous=previous, current=current))
        opened: list[ErrorState] = []
        resolved: list[ErrorState] = []
        now = self._clock()
        for error in event.errors:
            key = (error.type or "", error.code)
            known = vehicle.errors.get(key)
            if (error.state or "").upper() == "RESOLVED":
                if known is not None and known.state == "OPEN":
                    vehicle.errors[key] = replace(known, state="RESOLVED", last_seen=now,
                                                  event_id=event.event_id)
                    resolved.append(vehicle.errors[key])
                continue
            if known is not None and known.event_id == event.event_id:
                continue  # the same delivery again
            vehicle.errors[key] = ErrorState(
                type=key[0], code=error.code, state="OPEN",
                first_seen=known.first_seen if known else now, last_seen=now,
                count=(known.count if known else 0) + 1, description=error.description,
                resolution_type=error.resolution_type,
                signals=tuple(s.code or "" for s in error.signals), event_id=event.event_id,
            )
            opened.append(vehicle.errors[key])
        if changes or opened or resolved:
            vehicle.updated_at = now
        self._pending[event.vehicle_id, event.event_id] = tuple(
            c for c in changes if outbox is None or outbox(c.code, c.path))
        return ApplyResult(changes=Changes(changes), stale=tuple(stale), skipped=tuple(skipped),
                           errors_opened=tuple(opened), errors_resolved=tuple(resolved))

    async def pending_changes(self, vehicle_id: str, event_id: str) -> tuple[SignalChange, ...]:
        return self._pending.get((vehicle_id, event_id), ())

    async def is_processed(self, vehicle_id: str | None, event_id: str) -> bool:
        return event_id in self._processed

    async def mark_processed(self, vehicle_id: str | None, event_id: str) -> None:
        self._processed.add(event_id)
        self._pending.pop((vehicle_id or "", event_id), None)

    async def prune_inbox(self) -> InboxPruned:
        return InboxPruned()  # a test's store: nothing in it lives 8 days

    async def get_vehicle(self, vehicle_id: str) -> VehicleView | None:
        self.reads.append(vehicle_id)
        if self.fail_with is not None:
            raise self.fail_with
        vehicle = self._vehicles.get(vehicle_id)
        if vehicle is None:
            return None
        return VehicleView(
            vehicle_id=vehicle_id, signals=dict(vehicle.signals),
            errors=[e for e in vehicle.errors.values() if e.state == "OPEN"],
            updated_at=vehicle.updated_at,
        )

    async def list_vehicles(self, *, limit: int = 100) -> list[VehicleSummary]:
        if self.fail_with is not None:
            raise self.fail_with
        summaries = [
            VehicleSummary(vehicle_id=vid, updated_at=v.updated_at, signal_count=len(v.signals),
                           open_errors=sum(e.state == "OPEN" for e in v.errors.values()))
            for vid, v in self._vehicles.items()
        ]
        oldest = datetime.min.replace(tzinfo=UTC)
        summaries.sort(key=lambda s: s.updated_at or oldest, reverse=True)
        return summaries[:limit]

    async def close(self) -> None:
        self.closed = True


def _conforms(store: MemoryVehicleStore) -> VehicleStateStore:
    return store  # mypy checks that the double has the protocol's shape


# -- events to feed it (and the local host) -------------------------------------------------------

VEHICLE = "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"


def state_body(vehicle_id: str = VEHICLE, *, oem_ms: int, soc: Any = 78,
               event_id: str | None = None, delivered_ms: int | None = None) -> bytes:
    """A VEHICLE_STATE of `vehicle_id` (the simulator's: state of charge, charging, and a
    signal in error), every dated signal read at `oem_ms`, delivered now."""
    event = json.loads(build_event("state", now_ms=delivered_ms))
    event["vehicleId"] = vehicle_id
    if event_id is not None:
        event["eventId"] = event_id
    for signal in event["data"]["signals"]:
        if "meta" in signal:
            signal["meta"]["oemUpdatedAt"] = oem_ms
        if signal["code"] == "tractionbattery-stateofcharge":
            signal["body"]["value"] = soc
    return json.dumps(event).encode()


def error_body(vehicle_id: str = VEHICLE, *, state: str = "ERROR",
               description: str | None = None) -> bytes:
    """A VEHICLE_ERROR of `vehicle_id` (COMPATIBILITY VEHICLE_NOT_CAPABLE), delivered now."""
    event = json.loads(build_event("error"))
    event["vehicleId"] = vehicle_id
    (error,) = event["data"]["errors"]
    error["state"] = state
    if description is not None:
        error["description"] = description
    return json.dumps(event).encode()
