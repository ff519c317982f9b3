"""Small builders of VEHICLE_STATE / VEHICLE_ERROR events for the vehicle state store tests."""

from __future__ import annotations

import json
from typing import Any

from shared.events import Event, parse_event

VEHICLE = "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"
T0 = 1_731_940_328_000  # epoch ms, 2024-11-18
SOC = "tractionbattery-stateofcharge"


def signal(code: str = SOC, value: Any = 50, *, oem: int | None = T0,
           retrieved: int | None = None, unit: str | None = "percent",
           group: str | None = None, name: str | None = None,
           error: tuple[str, str] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"code": code}
    if group is not None or code == SOC:
        item["group"] = group or "TractionBattery"
        item["name"] = name or "StateOfCharge"
    if error is None:
        item["body"] = {"value": value, **({"unit": unit} if unit else {})}
    else:
        item["status"] = {"value": "ERROR", "error": {"type": error[0], "code": error[1]}}
    meta = {}
    if oem is not None:
        meta["oemUpdatedAt"] = oem
    if retrieved is not None:
        meta["retrievedAt"] = retrieved
    if meta:
        item["meta"] = meta
    return item


def state_event(event_id: str, *signals: dict[str, Any], vehicle: str = VEHICLE,
                delivered: int = T0) -> Event:
    return parse_event(json.dumps(state_body(event_id, *signals, vehicle=vehicle,
                                             delivered=delivered)))


def state_body(event_id: str, *signals: dict[str, Any], vehicle: str = VEHICLE,
               delivered: int = T0) -> dict[str, Any]:
    return {
        "eventId": event_id, "eventType": "VEHICLE_STATE", "vehicleId": vehicle,
        "data": {"signals": list(signals)},
        "meta": {"version": "4.0", "deliveryId": f"d-{event_id}", "deliveredAt": delivered,
                 "mode": "LIVE"},
    }


def error(error_type: str = "COMPATIBILITY", code: str | None = "VEHICLE_NOT_CAPABLE",
          state: str = "ERROR", description: str = "not capable",
          signals: tuple[str, ...] = (SOC,)) -> dict[str, Any]:
    return {"type": error_type, "code": code, "state": state, "description": description,
            "resolution": {"type": "CONTACT_SUPPORT"},
            "signals": [{"code": s} for s in signals]}


def error_event(event_id: str, *errors: dict[str, Any], vehicle: str = VEHICLE,
                delivered: int = T0) -> Event:
    body = {
        "eventId": event_id, "eventType": "VEHICLE_ERROR", "vehicleId": vehicle,
        "data": {"errors": list(errors)},
        "meta": {"version": "4.0", "deliveryId": f"d-{event_id}", "deliveredAt": delivered,
                 "mode": "LIVE"},
    }
    return parse_event(json.dumps(body))
