"""The inbox prune timer's adapter: deletes the vehicle state store's processed-event records
past their retention (`VehicleStateStore.prune_inbox`), of every vehicle.

`function_app.py` runs it hourly. The store keeps each record at least 7 days and this
deletes those older than 8, so a vehicle that never sends again does not keep its records for
ever. A run that runs out of time leaves the rest to the next one, and two runs at once are
safe: a delete that finds its rows gone fails, is logged, and changes nothing.
"""

from __future__ import annotations

import logging

import azure.functions as func

from .runtime import get_runtime
from .vehicle_state import InboxPruned

logger = logging.getLogger(__name__)

#: NCRONTAB (with seconds): hourly, at 17 minutes past.
INBOX_PRUNE_SCHEDULE = "0 17 * * * *"


async def handle_inbox_prune_timer(timer: func.TimerRequest) -> InboxPruned | None:
    store = get_runtime().vehicle_state
    if store is None:  # VEHICLE_STATE_STORE=off: there is no inbox
        return None
    if timer.past_due:
        logger.info("inbox prune timer is past due; running now")
    pruned = await store.prune_inbox()
    logger.info("vehicle state inbox: %d records past the retention deleted, %d groups "
                "left for the next prune", pruned.deleted, pruned.failed)
    return pruned
