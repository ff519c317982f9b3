"""`python -m tests.crash_host [host options]`: the local host with an `on_change` handler that
kills its own process (SIGKILL, no clean-up of any kind) `TEST_CRASH` seconds after it was
called, while that is set, for the tests of a crash between the store's write and the handlers'
completion.

Each call appends `{"eventId", "code", "previous", "current", "pid"}` to `$TEST_CALLS` first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from shared.events import Event
from shared.handlers import HandlerContext, registry
from shared.local.command import main
from shared.vehicle_state import SignalChange


@registry.on_change("TractionBattery.StateOfCharge")
def record_then_maybe_die(event: Event, change: SignalChange,
                          context: HandlerContext) -> None:
    line = json.dumps({
        "eventId": event.event_id, "code": change.code, "pid": os.getpid(),
        "previous": None if change.previous is None else change.previous.value,
        "current": change.current.value,
    })
    with open(os.environ["TEST_CALLS"], "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    crash = os.environ.get("TEST_CRASH")
    if crash:
        # After this many seconds: long enough, and the store's deferred commit has written
        # the change (and its pending entry) meanwhile; 0 kills at once, before it may have.
        time.sleep(float(crash))
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
