"""Retries scheduled on the queue, through the queue function as the host calls it.

The same scenario runs against Service Bus (faked at the SDK's sender surface, driven as the
Functions host drives the trigger: return completes, raise abandons) and against the embedded
local queue: a handler that always fails for 200 events, healthy events sent meanwhile.

Time on the queue is a ManualClock, so the backoffs are long (10 s and up) without the test
waiting for them: an invocation that waited out a backoff would overrun its bound by seconds.
Each invocation's wall time is compared with the handler's own measured time, so a slow,
shared machine slows both; the bound is the 50 ms over the handler time the design allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import azure.functions as func
import pytest
from azure.functions.servicebus import ServiceBusMessage as FunctionMessage

from shared import functions
from shared.events import Event, peek_envelope
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.adapters import (
    HandledLog,
    LocalDeadLetterer,
    LocalQueuePublisher,
    LocalRetrySender,
)
from shared.local.app_functions import to_function_message
from shared.local.queue import LocalQueue
from shared.local.queue_rows import LockLostError
from shared.processor import ServiceBusDeadLetterer
from shared.publisher import OutboundMessage, ServiceBusPublisher, outbound_message
from shared.retry import PROP_ATTEMPT_HISTORY, ServiceBusRetrySender, backoff_seconds
from shared.runtime import Runtime, set_runtime
from shared.settings import Settings, load_settings
from shared.tokens import StaticTokenProvider

from .fakes import FakeServiceBusQueue, ManualClock
from .support import TOKEN, encode, local_env, state_event

FAILING = 200
HEALTHY = 50
ATTEMPTS = 4
BASE, MAXIMUM = 10.0, 60.0
#: What an invocation may take beyond its handler's own time (the design's bound).
MARGIN_SECONDS = 0.050


@dataclass
class Delivery:
    message: func.ServiceBusMessage  # what handle_queue_message takes
    settle: Any  # (ok: bool) -> None


@dataclass(frozen=True)
class DeadLetter:
    properties: dict[str, str]
    reason: str
    description: str


class Backend(Protocol):
    clock: ManualClock
    runtime: Runtime

    async def send(self, message: OutboundMessage) -> None: ...
    def receive(self) -> list[Delivery]: ...
    def dead_letters(self) -> list[DeadLetter]: ...
    def close(self) -> None: ...


class ServiceBusBackend:
    """Azure: the processor's copies go through the ServiceBusPublisher's sender."""

    def __init__(self, settings: Settings, registry: HandlerRegistry, clock: ManualClock,
                 tmp_path: Path) -> None:
        self.clock = clock
        self.broker = FakeServiceBusQueue(clock)
        self.sb = ServiceBusPublisher(lambda: self.broker, "events")
        self.runtime = Runtime(
            settings=settings, tokens=StaticTokenProvider(TOKEN), publisher=self.sb,
            dead_letterer=ServiceBusDeadLetterer(self.sb.send_raw), registry=registry,
            retry_sender=ServiceBusRetrySender(self.sb.send_raw), clock=clock,
        )

    async def send(self, message: OutboundMessage) -> None:
        await self.sb.publish(message)

    def receive(self) -> list[Delivery]:
        deliveries = []
        for msg in self.broker.receive():
            fm = FunctionMessage(
                body=msg.body, message_id=msg.message_id, delivery_count=msg.delivery_count,
                sequence_number=msg.sequence_number,
                application_properties=dict(msg.application_properties),
                user_properties=dict(msg.application_properties),
                content_type="application/json",
            )

            def settle(ok: bool, msg: Any = msg) -> None:
                (self.broker.complete if ok else self.broker.abandon)(msg)

            deliveries.append(Delivery(fm, settle))
        return deliveries

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter(m.application_properties,
                           m.application_properties.get("deadLetterReason", reason),
                           m.application_properties.get("deadLetterDescription", ""))
                for m, reason in self.broker.dead_letters]

    def close(self) -> None:
        return None


class LocalBackend:
    """The local host's queue: the same processor, the embedded queue's scheduled send."""

    def __init__(self, settings: Settings, registry: HandlerRegistry, clock: ManualClock,
                 tmp_path: Path) -> None:
        self.clock = clock
        # In memory-backed storage when there is one, NORMAL sync: what is measured is the
        # processor, not a shared disk's fsync (a WAL checkpoint can stall 100 ms there).
        self._dir = tempfile.TemporaryDirectory(
            dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path)
        self.queue = LocalQueue(Path(self._dir.name) / "q.sqlite3", clock=clock,
                                max_delivery_count=10, synchronous="NORMAL")
        self.runtime = Runtime(
            settings=settings, tokens=StaticTokenProvider(TOKEN),
            publisher=LocalQueuePublisher(self.queue),
            dead_letterer=LocalDeadLetterer(self.queue), registry=registry,
            retry_sender=LocalRetrySender(self.queue),
            handled_log=HandledLog(tmp_path / "handled.jsonl"), queue=self.queue, clock=clock,
        )

    async def send(self, message: OutboundMessage) -> None:
        await self.runtime.publisher.publish(message)

    def receive(self) -> list[Delivery]:
        deliveries = []
        for qm in self.queue.receive(max_messages=10_000, lock_duration=600):
            assert qm.lock_token is not None

            def settle(ok: bool, token: str = qm.lock_token) -> None:
                with contextlib.suppress(LockLostError):  # dead-lettered by the function
                    (self.queue.complete if ok else self.queue.abandon)(token)

            deliveries.append(Delivery(to_function_message(qm), settle))
        return deliveries

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter(dict(m.application_properties), m.dead_letter_reason or "",
                           m.dead_letter_description or "")
                for m in self.queue.peek_dead_letters()]

    def close(self) -> None:
        assert self.runtime.handled_log is not None
        self.runtime.handled_log.close()
        self.queue.close()
        self._dir.cleanup()


def run_queue_wait() -> float:
    """Seconds this process's threads have waited for a CPU while runnable (Linux schedstat;
    0 where there is none). A loaded machine delays an invocation by this much; a backoff
    waited inside it is no such wait (the process sleeps, it is not runnable)."""
    total = 0
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return total / 1e9


class Handler:
    """Fails for every `fail-*` event, after a measured bit of work; records the rest."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.spent = 0.0  # seconds inside the handler, for the current invocation
        self.waited = 0.0  # of which waiting for a CPU
        self.failures: dict[str, list[float]] = {}  # eventId -> queue times of its attempts
        self.handled: dict[str, float] = {}

    async def handle(self, event: Event, context: HandlerContext) -> None:
        start, waited = time.perf_counter(), run_queue_wait()
        try:
            await asyncio.sleep(0.001)  # a downstream call that answers with an error
            if event.event_id.startswith("fail-"):
                self.failures.setdefault(event.event_id, []).append(self.clock())
                raise ConnectionError("downstream unavailable")
            self.handled[event.event_id] = self.clock()
        finally:
            self.spent = time.perf_counter() - start
            self.waited = run_queue_wait() - waited


def message_for(event: dict[str, Any], clock: ManualClock) -> OutboundMessage:
    body = encode(event)
    return outbound_message(body, peek_envelope(body), received_at=clock())


@pytest.fixture(params=["servicebus", "local"])
def scenario(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Backend, Handler]]:
    settings = load_settings(local_env(
        tmp_path, MAX_DELIVERY_COUNT=str(ATTEMPTS), RETRY_BACKOFF_BASE_SECONDS=str(BASE),
        RETRY_BACKOFF_MAX_SECONDS=str(MAXIMUM)))
    # Whole seconds: the schedule (kept to the microsecond) and the clock steps stay exact.
    clock = ManualClock(float(int(time.time())))
    handler = Handler(clock)
    registry = HandlerRegistry()
    registry.on("VEHICLE_STATE")(handler.handle)
    kind = ServiceBusBackend if request.param == "servicebus" else LocalBackend
    backend: Backend = kind(settings, registry, clock, tmp_path)
    set_runtime(backend.runtime)
    try:
        yield backend, handler
    finally:
        set_runtime(None)
        backend.close()


async def deliver_due(backend: Backend, handler: Handler, overheads: list[float]) -> int:
    """One pass of the trigger over what is due: each invocation timed against its handler,
    less the time the process waited for a CPU outside the handler (a shared machine)."""
    deliveries = backend.receive()
    for delivery in deliveries:
        handler.spent = handler.waited = 0.0
        start, waited = time.perf_counter(), run_queue_wait()
        try:
            await functions.handle_queue_message(delivery.message)
        except Exception:
            ok = False
        else:
            ok = True
        elapsed = time.perf_counter() - start
        contention = run_queue_wait() - waited - handler.waited
        overheads.append(elapsed - handler.spent - contention)
        delivery.settle(ok)
    return len(deliveries)


def test_failures_are_retried_on_schedule_without_holding_the_invocation(
    scenario: tuple[Backend, Handler],
) -> None:
    backend, handler = scenario
    clock = backend.clock
    start = clock()

    async def run() -> list[float]:
        overheads: list[float] = []
        for i in range(FAILING):
            await backend.send(message_for(state_event(eventId=f"fail-{i}"), clock))
        assert await deliver_due(backend, handler, overheads) == FAILING
        # Healthy events arrive while every failing one waits for its retry.
        clock.now += 1.0
        healthy_at = clock()
        for i in range(HEALTHY):
            await backend.send(message_for(state_event(eventId=f"ok-{i}"), clock))
        assert await deliver_due(backend, handler, overheads) == HEALTHY
        assert handler.handled == {f"ok-{i}": healthy_at for i in range(HEALTHY)}
        # Then the queue's schedule: move the clock to each next due time.
        for _ in range(100):
            if await deliver_due(backend, handler, overheads):
                continue
            clock.now += 1.0  # past the next due copy (or a dead-letter copy's expiry)
            if all(len(t) == ATTEMPTS for t in handler.failures.values()) and \
                    len(backend.dead_letters()) == FAILING:
                break
            clock.now += BASE - 1.0
        return overheads

    # The collector's pauses (tens of ms in a test process with a large heap) are the test
    # process's, not the invocation's: collect before, not during, the timed passes.
    gc.collect()
    gc.disable()
    try:
        overheads = asyncio.run(run())
    finally:
        gc.enable()

    # Every attempt ran, each healthy event once (plus, on Service Bus, the refusals of the
    # dead-letter copies delivered before they expire).
    assert sum(len(t) for t in handler.failures.values()) == FAILING * ATTEMPTS
    assert len(overheads) >= FAILING * ATTEMPTS + HEALTHY
    slowest = max(overheads)
    if os.environ.get("RETRY_TIMING_LOG"):
        with open(os.environ["RETRY_TIMING_LOG"], "a") as fh:
            fh.write(f"{sorted(overheads)[-3:]}\n")
    assert slowest < MARGIN_SECONDS, (
        f"an invocation took {slowest * 1000:.1f} ms beyond its handler's time")

    expected_gaps = [backoff_seconds(n, base=BASE, maximum=MAXIMUM) for n in range(1, ATTEMPTS)]
    assert len(handler.failures) == FAILING
    for event_id, times in handler.failures.items():
        assert times[0] == start, event_id
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        # Delivered on the first pass at or after its scheduled time (the test's clock steps).
        assert all(expected <= gap < expected + BASE for gap, expected
                   in zip(gaps, expected_gaps, strict=True)), (event_id, gaps)

    dead = backend.dead_letters()
    assert sorted(d.properties["eventId"] for d in dead) == sorted(handler.failures)
    for letter in dead:
        assert letter.reason == "MaxDeliveryCountExceeded"
        assert letter.description.startswith(f"handler failed in {ATTEMPTS} delivery attempts")
        assert letter.description.count("ConnectionError") == ATTEMPTS
        history = json.loads(letter.properties[PROP_ATTEMPT_HISTORY])
        assert [h["attempt"] for h in history][: ATTEMPTS - 1] == list(range(1, ATTEMPTS))


def test_a_crash_between_the_scheduled_send_and_the_completion_leaves_one_copy(
    scenario: tuple[Backend, Handler],
) -> None:
    backend, handler = scenario
    clock = backend.clock
    event_id = "fail-crash"

    async def run() -> list[Delivery]:
        await backend.send(message_for(state_event(eventId=event_id), clock))
        (first,) = backend.receive()
        await functions.handle_queue_message(first.message)  # sends the scheduled copy
        first.settle(False)  # the instance died before the completion: the lock is released
        (again,) = backend.receive()  # the original, delivered a second time
        assert again.message.delivery_count == 2
        await functions.handle_queue_message(again.message)  # builds the same copy again
        again.settle(True)
        assert backend.receive() == []  # the copy waits for its time
        clock.now += BASE + 0.5  # the schedule is kept to the microsecond: step past it
        return backend.receive()

    due = asyncio.run(run())
    assert handler.failures == {event_id: [clock.now - BASE - 0.5] * 2}
    assert [d.message.message_id for d in due] == [f"{event_id}:retry:2"]
    assert due[0].message.application_properties["attempt"] == "2"
