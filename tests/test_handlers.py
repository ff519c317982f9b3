"""`HandlerRegistry.dispatch`: how each kind of handler is called, and what a delivery leaves
for the host to read (the running handler's name, the error, the time spent).

The handlers' place in processing (the store first, on_change after it, the inbox) is tested
in tests/test_vehicle_state_processing.py; the pool's threads here (TestThePool) and, with hung
handlers in a real host, in tests/test_hung_threads.py.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import operator
import sys
import threading
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import pytest

from shared import handlers as handlers_module
from shared.events import Event, parse_event
from shared.handlers import (
    HANDLER_ERROR,
    HANDLER_SECONDS,
    RUNNING_HANDLER,
    HandlerContext,
    HandlerRegistry,
    handler_name,
)
from shared.handlers.pool import BlockingPool
from shared.settings import load_settings

from .vehicle_events import T0, signal, state_body

CONTEXT = HandlerContext(load_settings({}), "m-1", 1)
EVENT = parse_event(json.dumps(state_body("e1", signal(value=50))))


def dispatch(registry: HandlerRegistry) -> Any:
    async def main() -> Any:
        try:
            ran = await registry.dispatch(EVENT, CONTEXT)
        except Exception as exc:  # what the host reads after a failed delivery
            return exc, RUNNING_HANDLER.get(), HANDLER_ERROR.get(), HANDLER_SECONDS.get()
        return ran, RUNNING_HANDLER.get(), HANDLER_ERROR.get(), HANDLER_SECONDS.get()

    return asyncio.run(main())


class TestHowHandlersAreCalled:
    def test_a_coroutine_handler_runs_on_the_loop_without_a_pool_thread(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        registry = HandlerRegistry()
        threads: list[threading.Thread] = []

        async def no_thread(*args: Any) -> None:
            raise AssertionError("a coroutine handler must not take one of the pool's threads")

        monkeypatch.setattr(registry.pool, "run", no_thread)

        @registry.on("VEHICLE_STATE")
        async def handle(event: Event, context: HandlerContext) -> None:
            threads.append(threading.current_thread())

        ran, *_ = dispatch(registry)
        assert ran is True and threads == [threading.main_thread()]

    def test_a_plain_handler_runs_in_a_pool_thread(self) -> None:
        registry = HandlerRegistry()
        threads: list[threading.Thread] = []

        @registry.on("VEHICLE_STATE")
        def handle(event: Event, context: HandlerContext) -> None:
            threads.append(threading.current_thread())

        ran, *_ = dispatch(registry)
        assert ran is True and len(threads) == 1 and threads[0] is not threading.main_thread()

    def test_what_a_plain_handler_returns_to_await_is_awaited(self) -> None:
        registry = HandlerRegistry()
        done: list[str] = []

        async def later(event: Event) -> None:
            done.append(event.event_id)

        def handle(event: Event, context: HandlerContext) -> Awaitable[None]:
            return later(event)  # e.g. a wrapper around a coroutine function

        registry.on("VEHICLE_STATE")(handle)
        ran, *_ = dispatch(registry)
        assert ran is True and done == ["e1"]


class TestWhatADeliveryLeavesForTheHost:
    def test_a_failed_handler_is_named_with_its_error(self) -> None:
        registry = HandlerRegistry()
        failure = RuntimeError("boom")

        @registry.on("VEHICLE_STATE")
        async def fine(event: Event, context: HandlerContext) -> None:
            return None

        @registry.on("VEHICLE_STATE")
        async def broken(event: Event, context: HandlerContext) -> None:
            raise failure

        raised, running, error, seconds = dispatch(registry)
        assert raised is failure and error is failure
        assert running == f"{__name__}.{broken.__qualname__}"
        assert isinstance(seconds, float) and seconds >= 0

    def test_a_callable_object_and_a_partial_run_and_are_named(self) -> None:
        # Neither has a __qualname__ of its own: naming them must not fail the delivery.
        registry = HandlerRegistry()
        ran: list[str] = []

        class Notifier:
            def __call__(self, event: Event, context: HandlerContext) -> None:
                ran.append("object")
                raise RuntimeError("named?")

        async def notify(event: Event, context: HandlerContext, *, channel: str) -> None:
            ran.append(channel)

        registry.on("VEHICLE_STATE")(functools.partial(notify, channel="ops"))
        registry.on("VEHICLE_STATE")(Notifier())
        raised, running, error, _ = dispatch(registry)
        assert ran == ["ops", "object"]
        assert isinstance(raised, RuntimeError) and error is raised
        assert running == f"{__name__}.{Notifier.__qualname__}"

    def test_a_partial_is_named_after_the_function_it_wraps(self) -> None:
        registry = HandlerRegistry()
        failure = RuntimeError("boom")

        def notify(event: Event, context: HandlerContext, *, channel: str) -> None:
            raise failure

        registry.on("VEHICLE_STATE")(functools.partial(notify, channel="ops"))
        raised, running, *_ = dispatch(registry)
        assert raised is failure
        assert running == f"{__name__}.{notify.__qualname__}"

    def test_a_callable_without_a_module_of_its_own_is_named_with_a_question_mark(
        self
    ) -> None:
        # A built-in method's __module__ is None; a method-wrapper has none at all.
        assert handler_name([].append) == "?.list.append"
        assert handler_name(itertools.count().__next__) == "?.count.__next__"
        assert handler_name(operator.itemgetter(0)) == "operator.itemgetter"

    def test_the_time_is_measured_around_the_handlers(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ticks = iter([100.0, 100.25])
        monkeypatch.setattr(handlers_module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda event, context: None)
        _, _, _, seconds = dispatch(registry)
        assert seconds == 0.25

    def test_a_completed_delivery_names_no_handler_and_no_error(self) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        def fine(event: Event, context: HandlerContext) -> None:
            return None

        assert dispatch(registry)[:3] == (True, None, None)

    def test_no_handler_for_the_type_is_not_run(self) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_ERROR")(lambda event, context: None)
        assert dispatch(registry)[:3] == (False, None, None)


EVENT_OF: list[Event] = []


class TestSignalHandlers:
    def test_each_successful_signal_newest_first_and_a_failed_one_skipped(self) -> None:
        registry = HandlerRegistry()
        seen: list[tuple[str, Any]] = []
        for path in ("TractionBattery.StateOfCharge", "Odometer.TraveledDistance",
                     "Location.PreciseLocation"):
            registry.on_signal(path)(
                lambda event, sig, context: seen.append((sig.path, sig.value))
                if (event, context) == (EVENT_OF[0], CONTEXT) else None)
        event = parse_event(json.dumps(state_body(
            "e1", signal(value=50, oem=T0),
            signal("location-preciselocation", group="Location", name="PreciseLocation",
                   error=("PERMISSION", "DENIED"), oem=T0 + 2000),
            signal("odometer-traveleddistance", 7, group="Odometer", name="TraveledDistance",
                   oem=T0 + 1000))))
        EVENT_OF[:] = [event]

        async def main() -> bool:
            return await registry.dispatch(event, CONTEXT)

        assert asyncio.run(main()) is True
        assert seen == [("Odometer.TraveledDistance", 7), ("TractionBattery.StateOfCharge", 50)]

    def test_by_code_or_path_once_each_spelled_exactly_as_for_on_change(self) -> None:
        # The names on_change takes: a signal's code or its Group.Name, spelled exactly.
        registry = HandlerRegistry()
        seen: list[str] = []
        for name in ("tractionbattery-stateofcharge", "TractionBattery.StateOfCharge",
                     "tractionbattery.stateofcharge", "odometer-traveleddistance"):
            registry.on_signal(name)(
                lambda event, sig, context, name=name: seen.append(f"{name}={sig.value}"))
        event = parse_event(json.dumps(state_body(
            "e1", signal(value=50, oem=T0),
            # A code spelled like its path: one signal, one call.
            signal("Odometer.TraveledDistance", 7, group="Odometer", name="TraveledDistance"))))
        registry.on_signal("Odometer.TraveledDistance")(
            lambda event, sig, context: seen.append(f"path-or-code={sig.value}"))

        async def main() -> bool:
            return await registry.dispatch(event, CONTEXT)

        assert asyncio.run(main()) is True
        assert sorted(seen) == ["TractionBattery.StateOfCharge=50", "path-or-code=7",
                                "tractionbattery-stateofcharge=50"]

    def test_a_signal_named_by_its_code_only_is_found_by_its_code(self) -> None:
        # No group and name, so no Group.Name: the code alone names it.
        registry = HandlerRegistry()
        seen: list[Any] = []
        registry.on_signal("charge-ischarging")(
            lambda event, sig, context: seen.append(sig.value))
        event = parse_event(json.dumps(state_body("e1", signal("charge-ischarging", True))))
        assert event.signals[0].path is None

        async def main() -> bool:
            return await registry.dispatch(event, CONTEXT)

        assert asyncio.run(main()) is True
        assert seen == [True]

    def test_only_for_a_vehicle_state(self) -> None:
        registry = HandlerRegistry()
        seen: list[Any] = []
        registry.on_signal("TractionBattery.StateOfCharge")(lambda *args: seen.append(args))
        body = {**state_body("e1", signal(value=50)), "eventType": "VEHICLE_ERROR"}

        async def main() -> bool:
            return await registry.dispatch(parse_event(json.dumps(body)), CONTEXT)

        assert asyncio.run(main()) is False and seen == []


class TestTheChangeFilter:
    """What the store keeps pending for `on_change` handlers (its outbox)."""

    def test_without_on_change_handlers_it_keeps_nothing(self) -> None:
        registry = HandlerRegistry()
        registry.on("VEHICLE_STATE")(lambda event, context: None)
        assert registry.change_filter("tractionbattery-stateofcharge",
                                      "TractionBattery.StateOfCharge") is False

    def test_it_keeps_the_signals_named_by_path_or_code(self) -> None:
        registry = HandlerRegistry()
        registry.on_change("TractionBattery.StateOfCharge")(lambda *args: None)
        registry.on_change("odometer-traveleddistance")(lambda *args: None)
        keeps = registry.change_filter
        assert keeps("tractionbattery-stateofcharge", "TractionBattery.StateOfCharge")
        assert keeps("odometer-traveleddistance", None)
        assert not keeps("charge-ischarging", "Charge.IsCharging")



class TestWhichTypesHaveHandlers:
    @pytest.mark.parametrize(("register", "event_type", "has"), [
        (None, "VEHICLE_STATE", False),
        ("on", "VEHICLE_ERROR", True),
        ("on", "VEHICLE_STATE", False),  # registered for VEHICLE_ERROR only
        ("on_signal", "VEHICLE_STATE", True),
        ("on_signal", "VEHICLE_ERROR", False),
        ("on_change", "VEHICLE_STATE", True),
        ("on_change", "VEHICLE_ERROR", False),
    ])
    def test_a_type_has_handlers_by_type_and_a_state_event_by_signal_or_change(
        self, register: str | None, event_type: str, has: bool
    ) -> None:
        registry = HandlerRegistry()
        if register == "on":
            registry.on("VEHICLE_ERROR")(lambda event, context: None)
        elif register is not None:
            getattr(registry, register)("TractionBattery.StateOfCharge")(lambda *args: None)
        assert registry.has_handlers_for(event_type) is has


class TestThePool:
    def test_a_call_queued_behind_one_that_timed_out_starts_on_a_replacement_thread(
        self,
    ) -> None:
        # One thread: B waits behind A. A's caller gives up (its delivery timed out) while A
        # hangs in its thread; B must get the replacement thread at once, not at the next
        # `run` (which may never come) or at its own timeout.
        pool = BlockingPool(1)
        started, release = threading.Event(), threading.Event()

        def hang() -> None:
            started.set()
            release.wait(30)

        async def main() -> str:
            hung = asyncio.create_task(pool.run(hang))
            assert await asyncio.to_thread(started.wait, 5)
            queued = asyncio.create_task(pool.run(lambda: "B ran"))
            await asyncio.sleep(0.05)
            hung.cancel()
            result: str = await asyncio.wait_for(queued, 5)
            return result

        try:
            assert asyncio.run(main()) == "B ran"
            assert pool.stuck == 1 and not pool.exhausted
        finally:
            release.set()

    def test_a_stuck_thread_that_returns_is_no_longer_counted_and_the_pool_recovers(
        self,
    ) -> None:
        # The module's promise: exhausted "until one returns". One thread, no replacement:
        # a call whose caller gave up while it ran leaves the pool exhausted; once it returns,
        # the pool is not exhausted any more and takes calls again.
        pool = BlockingPool(1, limit=1)
        started, release, returned = threading.Event(), threading.Event(), threading.Event()

        def hang() -> None:
            started.set()
            release.wait(30)
            returned.set()

        async def main() -> tuple[bool, int, bool, int, str]:
            hung = asyncio.create_task(pool.run(hang))
            assert await asyncio.to_thread(started.wait, 5)
            hung.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hung
            exhausted_while_stuck, stuck_while_stuck = pool.exhausted, pool.stuck
            release.set()
            assert await asyncio.to_thread(returned.wait, 5)
            result: str = await asyncio.wait_for(pool.run(lambda: "ran after"), 5)
            # The thread took the new call, so it had finished with the stuck one first.
            return exhausted_while_stuck, stuck_while_stuck, pool.exhausted, pool.stuck, result

        try:
            assert asyncio.run(main()) == (True, 1, False, 0, "ran after")
        finally:
            release.set()

    def test_a_queued_call_whose_caller_gave_up_is_skipped(self) -> None:
        # run()'s promise: cancelling the await of a call still queued skips it. A holds the
        # only thread; B's caller gives up while B waits; once A returns, B must not run
        # (C, queued after B on the same thread, shows the thread is past B).
        pool = BlockingPool(1)
        started, release = threading.Event(), threading.Event()
        ran: list[str] = []

        def hang() -> str:
            started.set()
            release.wait(30)
            return "A ran"

        async def main() -> tuple[str, str]:
            first = asyncio.create_task(pool.run(hang))
            assert await asyncio.to_thread(started.wait, 5)
            queued = asyncio.create_task(pool.run(ran.append, "B"))
            await asyncio.sleep(0.05)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            release.set()
            after: str = await asyncio.wait_for(pool.run(lambda: "C ran"), 5)
            return await asyncio.wait_for(first, 5), after

        try:
            assert asyncio.run(main()) == ("A ran", "C ran")
            assert ran == [] and pool.stuck == 0
        finally:
            release.set()

    @pytest.mark.parametrize("kind", ["plain", "coroutine", "returns an awaitable"])
    def test_sys_exit_in_a_handler_fails_its_delivery_not_the_loop(self, kind: str) -> None:
        # sys.exit() deep in a library (or argparse's error): raised out of a pool thread or
        # a task it would stop the event loop; only that delivery fails, and another one on
        # the same loop finishes.
        registry = HandlerRegistry()

        async def exit_now() -> None:
            sys.exit(3)

        if kind == "plain":
            @registry.on("VEHICLE_STATE")
            def exits(event: Event, context: HandlerContext) -> None:
                sys.exit(3)
        elif kind == "coroutine":
            @registry.on("VEHICLE_STATE")
            async def exits_async(event: Event, context: HandlerContext) -> None:
                await exit_now()
        else:
            @registry.on("VEHICLE_STATE")
            def exits_later(event: Event, context: HandlerContext) -> Any:
                return exit_now()

        async def other_delivery() -> str:
            await asyncio.sleep(0.1)
            return "finished"

        async def main() -> tuple[Any, ...]:
            return await asyncio.gather(registry.dispatch(EVENT, CONTEXT), other_delivery(),
                                        return_exceptions=True)

        failed, other = asyncio.run(main())
        assert other == "finished"
        assert isinstance(failed, RuntimeError) and "SystemExit(3)" in str(failed)
        assert isinstance(failed.__cause__, SystemExit) and failed.__cause__.code == 3
