"""Is this host's clock wrong? Judged from the deliveries themselves.

Smartcar signs `meta.deliveredAt` with its own (NTP-disciplined) clock, and a delivery reaches
the receiver within seconds. So when most recent deliveries look stale (deliveredAt long before
the time of receipt) or skewed (deliveredAt ahead of it), the likelier explanation is this
host's clock, not Smartcar's: laptop, VM and WSL clocks drift by minutes after a suspend.
`/api/health` and the local host's banner say so, with the skew, so the operator fixes the
clock instead of chasing dead letters.

One watch per process (`CLOCK_WATCH`); the processor feeds it one verdict per delivery.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

#: `meta.deliveredAt` this far ahead of the time of receipt is counted and warned about (the
#: delivery is still processed: a future time cannot be a replay).
SKEW_WARNING_SECONDS = 300.0
#: How many recent deliveries the verdict looks at, and how many it needs before judging.
WINDOW = 20
MIN_SAMPLES = 5


class ClockWatch:
    """The last `WINDOW` deliveries' age at receipt (seconds; negative: deliveredAt ahead)."""

    def __init__(self, *, window: int = WINDOW, min_samples: int = MIN_SAMPLES) -> None:
        self._ages: deque[tuple[float, bool]] = deque(maxlen=window)
        self._min_samples = min_samples
        self._lock = threading.Lock()
        #: Deliveries whose deliveredAt was ahead of the clock by over SKEW_WARNING_SECONDS.
        self.ahead_count = 0

    def record(self, age_seconds: float, *, stale: bool) -> None:
        """One delivery's age at receipt, and whether it was dead-lettered as stale."""
        with self._lock:
            ahead = age_seconds < -SKEW_WARNING_SECONDS
            if ahead:
                self.ahead_count += 1
            self._ages.append((age_seconds, stale or ahead))

    def problem(self) -> str | None:
        """A sentence saying the clock is probably wrong, or None."""
        with self._lock:
            ages = list(self._ages)
        odd = [age for age, suspicious in ages if suspicious]
        if len(ages) < self._min_samples or len(odd) * 2 <= len(ages):
            return None
        skew = statistics.median(odd)
        direction = (f"behind Smartcar's by about {-skew:.0f} s (deliveredAt ahead of it)"
                     if skew < 0 else f"ahead of Smartcar's by about {skew:.0f} s")
        return (
            f"the host clock is probably wrong: {len(odd)} of the last {len(ages)} deliveries "
            f"were stale or ahead of it; it looks {direction}. Set the clock right (NTP); "
            "deliveries dead-lettered StaleDelivery meanwhile can be replayed after checking them"
        )

    def reset(self) -> None:
        with self._lock:
            self._ages.clear()
            self.ahead_count = 0


CLOCK_WATCH = ClockWatch()
