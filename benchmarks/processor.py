"""The queue-triggered processing of one event, in-process: `process_message` end to end.

One signed-shape 5 KB `VEHICLE_STATE` goes through `shared.processor.process_message` (parse,
telemetry, dispatch to a no-op handler) and, in the same run, through `json.loads` alone, the
floor any processing of the body pays. Timed in CPU seconds of this process, which a shared
machine disturbs less than wall-clock time.

`Event.signals` and `Event.data` are built on first access, which the no-op handler never
makes; `us_per_message_5kb_signals_read` and `us_per_message_5kb_data_read` time the same
message with a handler that reads one or the other, so the deferred cost stays in view.

The timed loops go through `DISTINCT` messages in turn, each with its own eventId and reading
times, as real traffic brings: one message over and over would find every timestamp already
in the parser's caches.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.processor import InboundMessage, process_message
from shared.retry import RetryCopy
from shared.settings import load_settings

from .common import TOKEN, emit, median, state_payload

NAME = "processor_hot_path"
SIZE = 5 * 1024
#: Distinct messages the timed loops go through in turn.
DISTINCT = 256


class NoDeadLetters:
    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        raise RuntimeError(f"the benchmark event was dead-lettered: {reason}: {description}")

    async def schedule(self, copy: RetryCopy) -> None:
        raise RuntimeError(f"the benchmark event's handler failed: retry {copy.message_id}")


async def _time_process(messages: list[InboundMessage], registry: HandlerRegistry,
                        iterations: int) -> float:
    settings = load_settings({"SMARTCAR_MANAGEMENT_TOKEN": TOKEN})
    dead_letterer = NoDeadLetters()
    start = time.process_time()
    for i in range(iterations):
        await process_message(messages[i % len(messages)], settings=settings,
                              registry=registry, dead_letterer=dead_letterer,
                              retry_sender=dead_letterer)
    return (time.process_time() - start) / iterations


def _time_json(bodies: list[bytes], iterations: int) -> float:
    start = time.process_time()
    for i in range(iterations):
        json.loads(bodies[i % len(bodies)])
    return (time.process_time() - start) / iterations


def _registry(read: Callable[[Event], object] | None) -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.on("VEHICLE_STATE")
    async def handler(event: Event, context: HandlerContext) -> None:
        if read is not None:
            read(event)

    return registry


def run(*, quick: bool) -> None:
    registry = _registry(None)
    readers = {
        "us_per_message_5kb_signals_read": _registry(lambda event: event.signals),
        "us_per_message_5kb_data_read": _registry(lambda event: event.data),
    }

    bodies = [state_payload(SIZE) for _ in range(DISTINCT)]
    messages = [InboundMessage(body=body, message_id=f"bench-{i}", delivery_count=1,
                               sequence_number=i + 1,
                               application_properties={"eventType": "VEHICLE_STATE"})
                for i, body in enumerate(bodies)]
    rounds = 3 if quick else 7
    iterations = 200 if quick else 2000
    asyncio.run(_time_process(messages, registry, iterations // 4))  # warm up
    _time_json(bodies, iterations // 4)
    processed: list[float] = []
    baseline: list[float] = []
    ratios: list[float] = []
    read: dict[str, list[float]] = {metric: [] for metric in readers}
    for _ in range(rounds):
        processed.append(asyncio.run(_time_process(messages, registry, iterations)) * 1e6)
        baseline.append(_time_json(bodies, iterations) * 1e6)
        ratios.append(processed[-1] / baseline[-1])
        for metric, reader in readers.items():
            read[metric].append(
                asyncio.run(_time_process(messages, reader, iterations // 2)) * 1e6)
    emit(NAME, "us_per_message_5kb", median(processed), "us")
    emit(NAME, "baseline_us_5kb", median(baseline), "us")
    emit(NAME, "overhead_ratio_5kb", median(ratios), "ratio")
    for metric, values in read.items():
        emit(NAME, metric, median(values), "us")
