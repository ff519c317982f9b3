"""The local host's view of its own clock at start: what the stored deliveries say about it.

The processor judges each delivery as it comes (shared/clockcheck.py). At start there are none
yet, but the queue keeps the newest messages (and every StaleDelivery dead letter): their age at
receipt says whether the clock was wrong when they arrived, so the banner can say so before the
next delivery is dead-lettered for it.
"""

from __future__ import annotations

from ..clockcheck import CLOCK_WATCH
from ..events import InvalidEventError, parse_event
from ..processor import delivery_age, received_at
from .queue import LocalQueue


def judge_stored_deliveries(queue: LocalQueue, max_age_seconds: float, *, limit: int = 20) -> None:
    """Feed the clock watch the age at receipt of the newest stored deliveries."""
    for body, properties in reversed(queue.recent(limit)):
        try:
            event = parse_event(body)
        except InvalidEventError:
            continue
        age = delivery_age(event, received_at(properties))
        if age is not None:
            CLOCK_WATCH.record(age, stale=age > max_age_seconds)
