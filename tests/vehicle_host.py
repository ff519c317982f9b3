"""`python -m tests.vehicle_host [host options]`: the local host with a `MemoryVehicleStore`.

For the tests that need a real host process with vehicle state to read (the inspector's
Vehicles tab in Chromium). The store goes where the app's store goes: `build_runtime`'s
`vehicle_state`, which the runtime keeps and the read route, the inspector and the processor
use.

The processor applies each event to the store before its handlers (another part of the app).
Where a build's processor has not applied it (`ProcessResult.vehicle_state` is None), this host
does it right after processing, so each delivery's `ProcessResult.vehicle_state` is what this
store did with it: that is all the inspector reads.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import shared.functions
import shared.local.command
from shared.processor import InboundMessage, Outcome, ProcessResult
from shared.processor import process_message as _process_message
from shared.runtime import build_runtime

from .vehicle_fakes import MemoryVehicleStore

STORE = MemoryVehicleStore()


async def process_then_apply(message: InboundMessage, **kwargs: Any) -> ProcessResult:
    result = await _process_message(message, **kwargs)
    if result.vehicle_state is None and result.event is not None \
            and result.outcome is not Outcome.DEAD_LETTERED:
        result = dataclasses.replace(result, vehicle_state=await STORE.apply(result.event))
    return result


if __name__ == "__main__":
    # The names these modules call, imported there (not re-exported): patched in place.
    shared.local.command.build_runtime = functools.partial(  # type: ignore[attr-defined]  # not re-exported
        build_runtime, vehicle_state=STORE)
    shared.functions.process_message = process_then_apply  # type: ignore[attr-defined]  # not re-exported
    sys.exit(shared.local.command.main())
