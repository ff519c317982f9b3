"""Example handler: warn when a vehicle's traction battery falls below a threshold.

The threshold is the `LOW_BATTERY_PERCENT` setting (default 20). Replace the log line with a
notification of your own; keep the handler idempotent, since events can be delivered twice.
"""

from __future__ import annotations

import logging

from ..events import Event, Signal
from . import HandlerContext, registry

logger = logging.getLogger(__name__)

STATE_OF_CHARGE = "TractionBattery.StateOfCharge"


def is_low(signal: Signal, threshold_percent: float) -> bool:
    value = signal.value
    return isinstance(value, int | float) and not isinstance(value, bool) and (
        value < threshold_percent
    )


@registry.on_signal(STATE_OF_CHARGE)
async def warn_on_low_battery(event: Event, signal: Signal, context: HandlerContext) -> None:
    threshold = context.settings.low_battery_percent
    if is_low(signal, threshold):
        logger.warning(
            "low battery: vehicle %s at %s%% (threshold %s%%, eventId %s)",
            event.vehicle_id,
            signal.value,
            threshold,
            event.event_id,
        )
