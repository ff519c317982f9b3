"""Shared pieces: signed Smartcar payloads of a given size, statistics, JSON-lines output."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from shared.signature import sign

TOKEN = "benchmark-management-token"

_BASE: dict[str, Any] = {
    "eventId": "",
    "eventType": "VEHICLE_STATE",
    "vehicleId": "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2",
    "data": {
        "user": {"id": "93b3ea96-ca37-43a9-9073-f4334719a0b7"},
        "vehicle": {
            "id": "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2",
            "make": "TESLA",
            "model": "Model 3",
            "year": 2020,
        },
        "triggers": [
            {"code": "tractionbattery-stateofcharge", "name": "StateOfCharge",
             "group": "TractionBattery"}
        ],
        "signals": [
            {"code": "tractionbattery-stateofcharge", "name": "StateOfCharge",
             "group": "TractionBattery", "body": {"unit": "percent", "value": 78},
             "meta": {"oemUpdatedAt": 1731940328000, "fetchedAt": 1731940330000}},
        ],
    },
    "meta": {
        "version": "4.0",
        "deliveryId": "",
        "deliveredAt": 1731940328000,
        "webhookId": "abde94ff-d57d-43b9-8d09-6020db2d977a",
        "webhookName": "",
        "signalCount": 1,
        "mode": "LIVE",
    },
}


#: Each payload's signals are read one second after the previous payload's, so the vehicle
#: state store keeps (writes) them rather than ignoring them as stale.
_READINGS = itertools.count()


def state_payload(size: int, event_id: str | None = None, *,
                  vehicle_id: str | None = None) -> bytes:
    """A VEHICLE_STATE body of exactly `size` bytes: signals added, then the name padded."""
    event = json.loads(json.dumps(_BASE))
    oem = 1731940328000 + next(_READINGS) * 1000
    if vehicle_id is not None:
        event["vehicleId"] = vehicle_id
    event["eventId"] = event_id or str(uuid.uuid4())
    event["meta"]["deliveryId"] = str(uuid.uuid4())
    # Delivered now (13 digits, as the template's): an old deliveredAt is a stale delivery.
    event["meta"]["deliveredAt"] = int(time.time() * 1000)
    signals = event["data"]["signals"]
    index = 0
    while len(json.dumps(event)) < size - 200:
        signals.append(
            {"code": f"odometer-traveleddistance{index}", "name": f"TraveledDistance{index}",
             "group": "Odometer", "body": {"unit": "km", "value": 12345.6 + index},
             "meta": {"oemUpdatedAt": oem, "fetchedAt": oem + 2000}}
        )
        index += 1
    if len(json.dumps(event)) >= size:
        signals.pop()
    signals[0]["meta"] = {"oemUpdatedAt": oem, "fetchedAt": oem + 2000}
    event["meta"]["signalCount"] = len(signals)
    event["meta"]["webhookName"] = "x" * (size - len(json.dumps(event)))
    body = json.dumps(event).encode("utf-8")
    assert len(body) == size, (len(body), size)
    return body


def signed_headers(body: bytes) -> dict[str, str]:
    return {"SC-Signature": sign(TOKEN, body), "Content-Type": "application/json"}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_interval(values: Sequence[float],
                    confidence: float = 0.95) -> tuple[float, float, float]:
    """A confidence interval for the median of what `values` sample, assuming nothing of its
    distribution but that the values are independent: the sign test's interval between the
    k-th smallest and the k-th largest value, for the largest k whose coverage
    (1 - 2 P(Binomial(n, 1/2) < k)) is at least `confidence`. Returns (low, high, coverage);
    with too few values for `confidence`, the widest interval (smallest to largest) and its
    lower coverage (0 for a single value)."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return math.nan, math.nan, 0.0

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / float(2**n)

    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return float(ordered[k - 1]), float(ordered[n - k]), coverage(k)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


def emit(benchmark: str, metric: str, value: float, unit: str) -> None:
    number = value if isinstance(value, int) else round(float(value), 3)
    line = {"benchmark": benchmark, "metric": metric, "value": number, "unit": unit}
    print(json.dumps(line), flush=True)


def note(message: str) -> None:
    """Progress on stderr, so stdout stays pure JSON lines."""
    print(message, file=sys.stderr, flush=True)
