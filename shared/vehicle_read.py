"""The read route's decision: a vehicleId and the store in, a reply out. No Azure objects here.

`GET /api/vehicles/{vehicleId}` (contract.md) answers, in this order of checks:

| situation | status |
| --- | --- |
| the vehicleId is not 1-128 of `A-Z a-z 0-9 - _ . :` (`valid_vehicle_id`) | 400 |
| the store is off (`VEHICLE_STATE_STORE=off`) | 503, `"store": "off"` |
| the store fails (unreachable, damaged, ...) | 503, `"store": "unavailable"` |
| the store has never seen the vehicle | 404 |
| otherwise | 200, `VehicleView.to_json()` |

The key is checked before any of this: by the Functions host in Azure (function auth level),
by the local host's per-run key locally (shared/local/host.py). The body of a 400 never echoes
the id it refuses (a stranger's text); the 503s name no setting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .vehicle_state import VehicleStateStore, valid_vehicle_id
from .vehicle_state.rules import MAX_ID_CHARS, TOO_LARGE, id_problem

logger = logging.getLogger(__name__)

#: What a vehicle's state answer carries besides its type: vehicle data is personal data,
#: so no cache (a proxy, the browser) keeps a copy.
READ_HEADERS: Mapping[str, str] = {
    "Content-Type": "application/json",
    "Cache-Control": "no-store",
}
#: VEHICLE_ID_PATTERN's limit, for the message (tests hold the two together).
MAX_VEHICLE_ID_LENGTH = 128

STORE_OFF = "off"
STORE_UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class ReadReply:
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=lambda: READ_HEADERS)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def vehicle_id_problem(vehicle_id: str) -> str | None:
    """Why `vehicle_id` cannot be asked for, or None. Says what came without repeating it."""
    if valid_vehicle_id(vehicle_id):
        return None
    if not vehicle_id:
        came = "an empty vehicleId"
    elif len(vehicle_id) > MAX_VEHICLE_ID_LENGTH:
        came = f"{len(vehicle_id)} characters"
    else:
        came = "a character outside that set"
    return (
        f"vehicleId must be 1 to {MAX_VEHICLE_ID_LENGTH} letters, digits, '-', '_', '.' or ':' "
        f"(Smartcar's vehicle ids are UUIDs), got {came}"
    )


def stored_vehicle_id_problem(vehicle_id: str) -> str | None:
    """Why no store can hold a vehicle of this id, or None: for the operator's own tools
    (`vehicles show`, the inspector), which open any vehicle `vehicles list` shows. Unlike the
    read route, which is open to the network and takes Smartcar's id characters only, they
    take any id a store keys: 1 to MAX_ID_CHARS characters of Unicode text."""
    if not vehicle_id:
        return "vehicleId must not be empty"
    problem = id_problem(vehicle_id)
    if problem == TOO_LARGE:
        return (f"vehicleId must be at most {MAX_ID_CHARS} characters (no store keys a longer "
                f"one), got {len(vehicle_id)}")
    if problem is not None:
        return "vehicleId must be Unicode text (it holds a lone surrogate): no store keys it"
    return None


async def read_vehicle(vehicle_id: str, store: VehicleStateStore | None) -> ReadReply:
    """Answer one `GET /api/vehicles/{vehicleId}`. Never raises for any id or store failure."""
    problem = vehicle_id_problem(vehicle_id)
    if problem is not None:
        return ReadReply(400, {"error": problem})
    if store is None:
        return ReadReply(503, {"error": "the vehicle state store is turned off for this app",
                               "store": STORE_OFF})
    try:
        view = await store.get_vehicle(vehicle_id)
    except Exception as exc:  # any backend failure is the store's unavailability, not a 500
        logger.error("vehicle state store unavailable for a read: %s: %s",
                     type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        return ReadReply(503, {"error": "the vehicle state store is unavailable; the app's logs "
                                        "say why", "store": STORE_UNAVAILABLE})
    if view is None:
        return ReadReply(404, {
            "error": "no state for this vehicle: no VEHICLE_STATE or VEHICLE_ERROR of it has "
                     "been processed (or the store was emptied since)",
            "vehicleId": vehicle_id,
        })
    return ReadReply(200, view.to_json())
