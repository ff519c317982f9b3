"""The re-drive timer's adapter: sends spilled events back to the queue (see shared/spill.py).

`function_app.py` runs it every minute. In Azure the Functions host runs a timer function on
one instance at a time; `spill.redrive` is safe even when two runs overlap.
"""

from __future__ import annotations

import logging

import azure.functions as func

from .runtime import get_runtime
from .spill import RedriveResult, redrive

logger = logging.getLogger(__name__)

#: NCRONTAB (with seconds): every minute. A run sends at most `redrive`'s batch (1,000
#: records), so once the queue is back a backlog drains at about 1,000 records a minute: a
#: spilled event waits about a minute per 1,000 records spilled before it.
REDRIVE_SCHEDULE = "0 */1 * * * *"


async def handle_redrive_timer(timer: func.TimerRequest) -> RedriveResult | None:
    runtime = get_runtime()
    if runtime.spill is None or runtime.redrive_publisher is None:
        return None
    if timer.past_due:
        logger.info("re-drive timer is past due; running now")
    return await redrive(runtime.spill, runtime.redrive_publisher)
