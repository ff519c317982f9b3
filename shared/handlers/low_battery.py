"""Example handler: warn once when a vehicle's traction battery falls below a threshold.

The threshold is the `LOW_BATTERY_PERCENT` setting (default 20). The handler acts on changes
the vehicle state store accepted (`on_change`), so it sees the charge before and after: it
warns when the charge crosses below the threshold (the previous reading was at or above it, or
unknown), not on every delivery while the charge stays low. Duplicates and readings older
than the stored one never reach it. Replace the log line with a notification of your own; a
crash or a failed handler before the delivery completes runs it again for the same change (at
least once), even when a newer reading has been stored since.
"""

from __future__ import annotations

import logging
from typing import Any

from ..events import Event
from ..vehicle_state import SignalChange, SignalState
from . import HandlerContext, registry

logger = logging.getLogger(__name__)

STATE_OF_CHARGE = "TractionBattery.StateOfCharge"


def charge(state: SignalState | None) -> float | None:
    """The state's charge in percent; None when unknown (never seen, an error, not a number)."""
    value: Any = None if state is None or state.status != "ok" else state.value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def crossed_below(change: SignalChange, threshold_percent: float) -> bool:
    """The charge is now below the threshold and was not known to be below it before."""
    now, before = charge(change.current), charge(change.previous)
    return now is not None and now < threshold_percent and (
        before is None or before >= threshold_percent)


@registry.on_change(STATE_OF_CHARGE)
async def warn_on_low_battery(event: Event, change: SignalChange, context: HandlerContext) -> None:
    threshold = context.settings.low_battery_percent
    if crossed_below(change, threshold):
        logger.warning(
            "low battery: vehicle %s fell to %s%% (threshold %s%%, eventId %s)",
            event.vehicle_id,
            change.current.value,
            threshold,
            event.event_id,
        )
