"""What each authenticated delivery says about Smartcar's view of us, recorded at the answer.

Three signals, read from the raw body after the receiver decided (shared/receiver.py):
- Redeliveries: Smartcar keeps `eventId` across its retries and gives every attempt a new
  `meta.deliveryId`. A delivery that repeats an eventId with a new deliveryId therefore means
  Smartcar did not get our 2xx for an earlier attempt in time (an error, a timeout, a cold
  start). The same deliveryId again is not Smartcar retrying (a replay, a proxy resending)
  and is not counted.
- Delivery-to-answer latency: our answer's time minus `meta.deliveredAt`. The two clocks are
  not the same machine's: Smartcar's stamp may be ahead of ours (counted as 0) or behind.
- Payload shape: the first time this instance sees a shape (shared/shapes.py).

Limits, by design: the redelivery memory is per instance and in memory. A retry that reaches
another instance, or arrives after a restart, or after `REDELIVERY_WINDOW_SECONDS` (well past
Smartcar's ~3 minutes of retries), or once `REDELIVERY_MEMORY` newer events pushed its eventId
out, is not counted: the count is a lower bound. VERIFY is not a data delivery: not observed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from opentelemetry import trace

from . import telemetry_names as names
from .shapes import Shape, ShapeTracker, shape_of

logger = logging.getLogger(__name__)

#: How long an eventId is remembered (seconds): Smartcar retries over about 3 minutes.
REDELIVERY_WINDOW_SECONDS: Final = 900.0
#: How many eventIds an instance remembers (about 200 bytes each).
REDELIVERY_MEMORY: Final = 50_000


class RedeliveryMemory:
    """eventId -> the last deliveryId seen for it, within a window, bounded, oldest first out."""

    def __init__(
        self,
        *,
        window: float = REDELIVERY_WINDOW_SECONDS,
        limit: int = REDELIVERY_MEMORY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._limit = limit
        self._clock = clock
        self._seen: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    @property
    def remembered(self) -> int:
        """How many eventIds are held now (what the memory costs)."""
        return len(self._seen)

    def is_redelivery(self, event_id: str, delivery_id: str | None) -> bool:
        """Remember this delivery; True when the eventId was seen with another deliveryId."""
        now = self._clock()
        previous = self._seen.pop(event_id, None)
        if previous is not None and now - previous[1] >= self._window:
            previous = None
        while self._seen:  # forget what is out of the window, oldest first, and make room
            oldest, (_, at) = next(iter(self._seen.items()))
            if now - at < self._window and len(self._seen) < self._limit:
                break
            del self._seen[oldest]
        self._seen[event_id] = (delivery_id, now)
        if previous is None:
            return False
        # Without a deliveryId on either side the attempts cannot be told apart: not counted.
        return delivery_id is not None and previous[0] is not None and previous[0] != delivery_id


class Recorder(Protocol):
    """The part of shared.telemetry.Telemetry that records these signals."""

    def record_redelivery(self, event_type: str | None) -> None: ...
    def record_delivery_to_answer(self, ms: float, event_type: str | None) -> None: ...
    def record_new_shape(self, shape: Shape) -> None: ...


class ReplyLike(Protocol):
    @property
    def authenticated(self) -> bool: ...
    @property
    def event_type(self) -> str | None: ...


def _delivered_at_ms(meta: Any) -> float | None:
    """`meta.deliveredAt` as epoch milliseconds (a number or an ISO-8601 string), or None."""
    value = meta.get("deliveredAt") if isinstance(meta, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:  # Smartcar's timestamps are UTC, as in shared/events.py
            parsed = parsed.replace(tzinfo=UTC)
        try:
            return parsed.timestamp() * 1000.0
        except (ValueError, OverflowError):
            return None
    return None


class DeliverySignals:
    """Per-instance state (seen shapes, recent eventIds) and the recording of each signal."""

    def __init__(
        self,
        *,
        redeliveries: RedeliveryMemory | None = None,
        shapes: ShapeTracker | None = None,
    ) -> None:
        self.redeliveries = redeliveries or RedeliveryMemory()
        self.shapes = shapes or ShapeTracker()

    def observe(self, root: Mapping[str, Any] | None, reply: ReplyLike, *,
                answered_at: float, recorder: Recorder) -> None:
        """Record what an answered POST says. `root` is its body as the receiver decoded it
        (None: not a JSON object, nothing to record); `answered_at` is epoch seconds. Never
        raises: the answer to Smartcar must not depend on its bookkeeping."""
        if root is None or not reply.authenticated or reply.event_type == "VERIFY":
            return
        try:
            self._observe(root, reply, answered_at, recorder)
        except Exception:  # a telemetry fault must never fail a delivery
            logger.warning("recording the delivery signals failed", exc_info=True)

    def _observe(self, root: Mapping[str, Any], reply: ReplyLike, answered_at: float,
                 recorder: Recorder) -> None:
        span = trace.get_current_span()  # the receive span, when called inside it
        meta = root.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        event_id, delivery_id = root.get("eventId"), meta.get("deliveryId")
        if isinstance(event_id, str) and self.redeliveries.is_redelivery(
            event_id, delivery_id if isinstance(delivery_id, str) else None
        ):
            recorder.record_redelivery(reply.event_type)
            span.set_attribute(names.ATTR_REDELIVERY, True)
        delivered = _delivered_at_ms(meta)
        if delivered is not None:
            ms = max(answered_at * 1000.0 - delivered, 0.0)
            recorder.record_delivery_to_answer(ms, reply.event_type)
            span.set_attribute(names.ATTR_DELIVERY_TO_ANSWER_MS, round(ms, 1))
        shape = shape_of(root)
        span.set_attribute(names.ATTR_SHAPE_ID, shape.id)
        span.set_attribute(names.ATTR_SHAPE_KNOWN, shape.known)
        if self.shapes.first_sighting(shape):
            recorder.record_new_shape(shape)
            unknown = shape.unknown_parts()
            logger.log(
                logging.WARNING if unknown else logging.INFO,
                "payload shape %s first seen by this instance (%s): %s",
                shape.id,
                "unknown to the project: " + "; ".join(unknown) if unknown else "known",
                json.dumps(shape.describe(), sort_keys=True),
            )


_default: DeliverySignals | None = None


def default_signals() -> DeliverySignals:
    """The process's instance (its memory is this instance's)."""
    global _default
    if _default is None:
        _default = DeliverySignals()
    return _default


def set_default_signals(signals: DeliverySignals | None) -> None:
    """Install the process's instance (tests start from an empty memory); None: a new one
    on next use."""
    global _default
    _default = signals
