"""The store in processing: the processor applies each event before the handlers, `on_change`
runs for what the store accepted, the inbox ends duplicates, the outbox survives a crash, and
the low-battery example warns once per crossing.

Real processor, real registry, real SQLite store; only the dead-letterer is a recording fake
(the boundary). The crash between storing and handling with a real SIGKILL is in
tests/test_vehicle_state_crash.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared import telemetry_names as names
from shared.events import Event, parse_event
from shared.handlers import HandlerContext, HandlerRegistry, low_battery
from shared.local.vehicle_state import FILE_NAME, SqliteVehicleStateStore
from shared.processor import (
    InboundMessage,
    Outcome,
    outcome_record,
    process_message,
)
from shared.retry import RetryCopy
from shared.settings import load_settings
from shared.telemetry import Telemetry
from shared.vehicle_state import (
    ApplyResult,
    Changes,
    ErrorState,
    SignalChange,
    SignalState,
    SkippedSignal,
    VehicleStateStore,
)
from shared.vehicle_state.rules import MAX_ID_CHARS, NOT_UNICODE, TOO_LARGE, unkeyed

from .otel_capture import captured
from .vehicle_events import SOC, T0, VEHICLE, error, signal, state_body

SETTINGS = load_settings({"RETRY_BACKOFF_BASE_SECONDS": "0", "MAX_DELIVERY_COUNT": "3"})


class NoDeadLetters:
    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        raise AssertionError(f"unexpected dead-letter: {reason} {description}")


class DeadLetters:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def dead_letter(self, message: InboundMessage, *, reason: str, description: str) -> None:
        self.reasons.append(reason)


class Retries:
    """The retry boundary: the copies the processor schedules after a handler failure."""

    def __init__(self) -> None:
        self.copies: list[RetryCopy] = []

    async def schedule(self, copy: RetryCopy) -> None:
        self.copies.append(copy)

    def last(self) -> InboundMessage:
        copy = self.copies[-1]
        return InboundMessage(body=copy.body, message_id=copy.message_id, delivery_count=1,
                              application_properties=copy.application_properties)


async def no_sleep(delay: float) -> None:
    return None


def message(body: dict[str, Any], delivery: int = 1) -> InboundMessage:
    return InboundMessage(body=json.dumps(body).encode(), message_id=body["eventId"],
                          delivery_count=delivery)


def error_body(event_id: str, *errors: dict[str, Any], delivered: int = T0) -> dict[str, Any]:
    return {"eventId": event_id, "eventType": "VEHICLE_ERROR", "vehicleId": VEHICLE,
            "data": {"errors": list(errors)}, "meta": {"deliveredAt": delivered}}


class Records:
    """handled.jsonl's lines, in memory (the OutcomeLog protocol)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def append(self, record: Any) -> None:
        self.lines.append(dict(record))

    def close(self) -> None:
        return None


class Harness:
    """One store, one registry with a recording on_change handler that fails on demand."""

    def __init__(self, store: VehicleStateStore, telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.telemetry = telemetry
        self.registry = HandlerRegistry()
        self.changes: list[tuple[str, SignalChange]] = []
        self.fail_next = 0
        self.log = Records()
        self.retries = Retries()
        self.dead_letters = DeadLetters()

        @self.registry.on_change("TractionBattery.StateOfCharge")
        async def on_charge(event: Event, change: SignalChange, context: HandlerContext) -> None:
            self.changes.append((event.event_id, change))
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("handler crashed after the store kept the change")

    async def deliver(self, body: dict[str, Any] | InboundMessage, delivery: int = 1) -> Any:
        inbound = body if isinstance(body, InboundMessage) else message(body, delivery)
        return await process_message(
            inbound, settings=SETTINGS, registry=self.registry,
            dead_letterer=self.dead_letters, retry_sender=self.retries, sleep=no_sleep,
            telemetry=self.telemetry, store=self.store, handled_log=self.log)


def run(tmp_path: Path, scenario: Any, telemetry: Telemetry | None = None) -> Any:
    async def main() -> Any:
        store = SqliteVehicleStateStore(tmp_path / FILE_NAME)
        try:
            return await scenario(Harness(store, telemetry))
        finally:
            await store.close()

    return asyncio.run(main())


class TestOnChange:
    def test_runs_once_per_accepted_change_and_never_for_stale_or_duplicate(
        self, tmp_path: Path
    ) -> None:
        async def scenario(h: Harness) -> Any:
            first = await h.deliver(state_body("e1", signal(value=50, oem=T0 + 1000)))
            stale = await h.deliver(state_body("e0", signal(value=60, oem=T0)))
            duplicate = await h.deliver(state_body("e1", signal(value=50, oem=T0 + 1000)), 2)
            newer = await h.deliver(state_body("e2", signal(value=40, oem=T0 + 2000)))
            return first, stale, duplicate, newer, h.changes, h.log.lines

        first, stale, duplicate, newer, changes, lines = run(tmp_path, scenario)
        assert [(r["eventId"], r.get("duplicate"), r.get("vehicleState", {}).get("changed"))
                for r in lines] == [("e1", None, [SOC]), ("e0", None, []), ("e1", True, None),
                                    ("e2", None, [SOC])]
        assert lines[1]["vehicleState"]["stale"] == [SOC]
        assert [(eid, c.previous.value if c.previous else None, c.current.value)
                for eid, c in changes] == [("e1", None, 50), ("e2", 50, 40)]
        assert first.outcome is Outcome.HANDLED and stale.outcome is Outcome.UNHANDLED
        assert stale.vehicle_state.stale == (SOC,)
        assert duplicate.outcome is Outcome.HANDLED and duplicate.duplicate
        assert newer.vehicle_state.changes[0].current.event_id == "e2"

    def test_a_duplicate_is_reported_by_event_and_said_so_in_the_log(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def scenario(h: Harness) -> Any:
            await h.deliver(state_body("e1", signal(value=50)))
            with caplog.at_level(logging.INFO, logger="shared.processor"):
                return await h.deliver(state_body("e1", signal(value=50)), 2)

        again = run(tmp_path, scenario)
        assert (again.outcome, again.duplicate, again.description) == (
            Outcome.HANDLED, True, "eventId processed before")
        assert again.event is not None and again.event.event_id == "e1"
        assert [r.getMessage() for r in caplog.records if r.name == "shared.processor"] == [
            "event e1 was processed before (its eventId is in the inbox); its handlers do not "
            "run again"]

    def test_never_runs_for_the_stored_reading_fetched_again(self, tmp_path: Path) -> None:
        # Each delivery carries every subscribed signal: one the car has not updated comes
        # with its oemUpdatedAt and value and only a later retrievedAt, and is no change.
        async def scenario(h: Harness) -> Any:
            await h.deliver(state_body("e1", signal(value=50, oem=T0, retrieved=T0 + 1000)))
            await h.deliver(state_body("e2", signal(value=50, oem=T0, retrieved=T0 + 61_000)))
            await h.deliver(state_body("e3", signal(value=49, oem=T0 + 120_000,
                                                    retrieved=T0 + 121_000)))
            return h.changes, h.log.lines

        changes, lines = run(tmp_path, scenario)
        assert [(eid, c.current.value) for eid, c in changes] == [("e1", 50), ("e3", 49)]
        assert [(r["eventId"], r["vehicleState"]["changed"], r["vehicleState"]["refreshed"])
                for r in lines] == [("e1", [SOC], []), ("e2", [], [SOC]), ("e3", [SOC], [])]

    def test_a_handler_crash_after_the_store_wrote_fires_again_on_redelivery(
        self, tmp_path: Path
    ) -> None:
        # With a signal no on_change handler watches: its change is stored, not kept pending.
        body = state_body("e1", signal(value=50),
                          signal("odometer-traveleddistance", 12000, unit="km",
                                 group="Odometer", name="TraveledDistance"))

        async def scenario(h: Harness) -> Any:
            h.fail_next = 1
            failed = await h.deliver(body, 1)
            assert failed.outcome is Outcome.RETRIED
            kept = await h.store.pending_changes(VEHICLE, "e1")
            again = await h.deliver(h.retries.last())  # the scheduled retry copy
            after = await h.store.pending_changes(VEHICLE, "e1")
            return kept, again, after, h.changes

        kept, again, after, changes = run(tmp_path, scenario)
        assert [(c.code, c.current.value) for c in kept] == [(SOC, 50)]
        # The redelivery stored nothing new, yet the handler got the change the crash cut off.
        assert again.vehicle_state.changes == () and again.outcome is Outcome.HANDLED
        assert [(eid, c.current.value) for eid, c in changes] == [("e1", 50), ("e1", 50)]
        assert after == ()

    def test_a_dead_lettered_event_is_not_in_the_inbox_so_its_replay_runs_handlers(
        self, tmp_path: Path
    ) -> None:
        body = state_body("e1", signal(value=50))

        async def scenario(h: Harness) -> Any:
            h.fail_next = 3
            outcomes = [(await h.deliver(body, 1)).outcome]
            for _ in (2, 3):  # the retry copies; the last failure dead-letters the event
                outcomes.append((await h.deliver(h.retries.last())).outcome)
            processed = await h.store.is_processed(VEHICLE, "e1")
            replay = await h.deliver(body, 1)  # `dlq replay` sends it back
            return outcomes, h.dead_letters.reasons, processed, replay, len(h.changes)

        outcomes, reasons, processed, replay, calls = run(tmp_path, scenario)
        assert outcomes == [Outcome.RETRIED, Outcome.RETRIED, Outcome.DEAD_LETTERED]
        assert len(reasons) == 1 and processed is False
        assert replay.outcome is Outcome.HANDLED and not replay.duplicate and calls == 4

    def test_other_handlers_also_do_not_run_again_for_a_processed_event(
        self, tmp_path: Path
    ) -> None:
        seen: list[str] = []

        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_ERROR")
            async def page(event: Event, context: HandlerContext) -> None:
                seen.append(event.event_id)

            body = error_body("x1", error())
            first = await h.deliver(body)
            second = await h.deliver(body, 2)
            return first, second

        first, second = run(tmp_path, scenario)
        assert seen == ["x1"] and second.duplicate
        assert [e.state for e in first.vehicle_state.errors_opened] == ["OPEN"]

    @pytest.mark.parametrize("replayed", [False, True])
    def test_an_error_event_whose_handler_failed_reports_its_errors_again(
        self, tmp_path: Path, replayed: bool
    ) -> None:
        """The first attempt applied the errors (they are not counted again), its handler
        failed: the retry, or the replay of the dead letter, hands the handlers the errors the
        event opened or resolved, as the first attempt did, so a handler that pages on them
        is not left with nothing once the event is recorded as processed."""
        seen: list[tuple[str, list[tuple[str, str | None, str]], list[str | None]]] = []
        failures = [3 if replayed else 1]

        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_ERROR")
            async def page(event: Event, context: HandlerContext) -> None:
                state = context.vehicle_state
                assert state is not None
                seen.append((event.event_id,
                             [(e.type, e.code, e.state) for e in state.errors_opened],
                             [e.code for e in state.errors_resolved]))
                if failures[0]:
                    failures[0] -= 1
                    raise RuntimeError("pager down")

            opened = error_body("x1", error(), error("PERMISSION", "DENIED"))
            results = [await h.deliver(opened)]
            while results[-1].outcome is Outcome.RETRIED:
                results.append(await h.deliver(h.retries.last()))
            if replayed:
                failures[0] = 0
                results.append(await h.deliver(opened))  # `dlq replay`
            resolved = error_body("x2", error(state="RESOLVED"), delivered=T0 + 600_000)
            failures[0] = 1
            results.append(await h.deliver(resolved))
            results.append(await h.deliver(h.retries.last()))
            view = await h.store.get_vehicle(VEHICLE)
            return [r.outcome for r in results], view

        outcomes, view = run(tmp_path, scenario)
        both = [("COMPATIBILITY", "VEHICLE_NOT_CAPABLE", "OPEN"), ("PERMISSION", "DENIED", "OPEN")]
        first: list[Any] = [("x1", both, [])] * (4 if replayed else 2)
        assert seen == [*first, ("x2", [], ["VEHICLE_NOT_CAPABLE"]),
                        ("x2", [], ["VEHICLE_NOT_CAPABLE"])]
        assert outcomes[-2:] == [Outcome.RETRIED, Outcome.HANDLED]
        assert outcomes[:-2] == ([Outcome.RETRIED, Outcome.RETRIED, Outcome.DEAD_LETTERED,
                                  Outcome.HANDLED] if replayed
                                 else [Outcome.RETRIED, Outcome.HANDLED])
        assert view is not None and [(e.code, e.count) for e in view.errors] == [("DENIED", 1)]

    def test_with_the_store_off_handlers_run_as_before_and_nothing_is_kept(
        self, tmp_path: Path
    ) -> None:
        registry = HandlerRegistry()
        seen: list[str] = []

        @registry.on("VEHICLE_STATE")
        async def handle(event: Event, context: HandlerContext) -> None:
            seen.append(event.event_id)
            assert context.vehicle_state is None

        async def scenario() -> Any:
            body = state_body("e1", signal(value=50))
            results = [await process_message(message(body, n), settings=SETTINGS,
                                             registry=registry, dead_letterer=NoDeadLetters(),
                                             retry_sender=Retries(), sleep=no_sleep,
                                             store=None) for n in (1, 2)]
            return results

        results = asyncio.run(scenario())
        assert seen == ["e1", "e1"] and all(r.vehicle_state is None for r in results)
        assert not (tmp_path / FILE_NAME).exists()

    def test_handlers_get_the_delivery_s_context_with_the_store_s_result(
        self, tmp_path: Path
    ) -> None:
        contexts: list[HandlerContext] = []

        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_STATE")
            async def handle(event: Event, context: HandlerContext) -> None:
                contexts.append(context)

            return await h.deliver(state_body("e1", signal(value=50)), 2)

        result = run(tmp_path, scenario)
        [context] = contexts
        assert context.vehicle_state is result.vehicle_state is not None
        assert (context.settings, context.message_id, context.delivery_count) == (
            SETTINGS, "e1", 2)


class TestChangeHandlersByName:
    def test_by_path_or_by_code_and_once_when_the_code_is_the_path(
        self, tmp_path: Path
    ) -> None:
        calls: list[tuple[str, str]] = []

        async def scenario(h: Harness) -> Any:
            for name in ("tractionbattery-stateofcharge", "Custom.Dotted"):
                @h.registry.on_change(name)
                async def handle(event: Event, change: SignalChange, context: HandlerContext,
                                 name: str = name) -> None:
                    calls.append((name, change.code))

            # A custom signal whose code is spelled as its Group.Name path.
            await h.deliver(state_body("e1", signal(value=50),
                                       signal("Custom.Dotted", 1, group="Custom", name="Dotted")))
            return [c.code for _, c in h.changes]

        by_path = run(tmp_path, scenario)
        assert by_path == [SOC]  # the Harness's handler, registered by path
        assert sorted(calls) == [("Custom.Dotted", "Custom.Dotted"),
                                 ("tractionbattery-stateofcharge", SOC)]


class TestIdsNoStoreCanKey:
    """A vehicleId or eventId holding a lone surrogate (a `\\u` escape JSON allows), or longer
    than MAX_ID_CHARS, cannot key rows in either backend (Table holds 64 KiB in a property): such
    an event is handled without the store and the inbox, its signals counted as skipped, rather
    than failing on every delivery."""

    @pytest.mark.parametrize(("vehicle", "event_id", "reason"), [
        ("v\ud800", "e1", NOT_UNICODE), (VEHICLE, "e\udfff", NOT_UNICODE),
        ("v" * (MAX_ID_CHARS + 1), "e1", TOO_LARGE),
        (VEHICLE, "e" * (MAX_ID_CHARS + 1), TOO_LARGE)])
    def test_handlers_run_and_nothing_is_stored(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture, vehicle: str, event_id: str,
        reason: str,
    ) -> None:
        otel = captured()
        seen: list[tuple[str, Any]] = []

        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_STATE")
            async def handle(event: Event, context: HandlerContext) -> None:
                seen.append((event.event_id, context.vehicle_state))

            nameless = {"group": "Odometer", "name": "TraveledDistance", "body": {"value": 1}}
            body = {**state_body(event_id, signal(value=50), signal("x-other", 1), nameless),
                    "vehicleId": vehicle}
            with caplog.at_level(logging.WARNING, logger="shared.processor"):
                results = [await h.deliver(body, n) for n in (1, 2)]
            return results, await h.store.list_vehicles()

        results, listed = run(tmp_path, scenario, otel.telemetry)
        assert [r.outcome for r in results] == [Outcome.HANDLED] * 2
        assert not any(r.duplicate for r in results)  # no inbox: each delivery runs them
        [state, _] = [r.vehicle_state for r in results]
        assert [(s.code, s.reason) for s in state.skipped] == [
            (SOC, reason), ("x-other", reason), ("odometer-traveleddistance", reason)]
        assert state.changes == () and state.pending == ()
        assert [(eid, context) for eid, context in seen] == [(event_id, state)] * 2
        assert listed == []
        assert otel.values(names.VEHICLE_STATE_SKIPPED) == [({"reason": reason}, 6)]
        assert [r.getMessage() for r in caplog.records if r.name == "shared.processor"] == [
            f"an event whose vehicleId or eventId no store can key ({reason}: not Unicode, or "
            f"over 1024 characters) is not stored (its 3 signals or errors are skipped); its "
            f"handlers run without the inbox"] * 2

    def test_a_failed_attempt_reports_what_the_unkeyed_path_skipped(
        self, tmp_path: Path
    ) -> None:
        """The attempt's result says what the store did even when a handler then failed:
        here, that every signal was skipped as not Unicode."""
        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_STATE")
            async def fail(event: Event, context: HandlerContext) -> None:
                raise RuntimeError("downstream is down")

            body = {**state_body("e1", signal(value=50)), "vehicleId": "v\ud800"}
            return await h.deliver(body)

        result = run(tmp_path, scenario)
        assert result.outcome is Outcome.RETRIED
        assert [(s.code, s.reason) for s in result.vehicle_state.skipped] == [
            (SOC, NOT_UNICODE)]

    def test_an_error_event_s_entries_are_skipped_by_their_codes(self) -> None:
        event = parse_event(json.dumps({**error_body("e\ud800", error(), error("B", None)),
                                        "eventType": "VEHICLE_ERROR"}))
        state = unkeyed(event)
        assert state is not None
        assert [(s.code, s.reason) for s in state.skipped] == [
            ("VEHICLE_NOT_CAPABLE", NOT_UNICODE), (None, NOT_UNICODE)]

    def test_an_event_the_store_can_key_is_left_to_it(self) -> None:
        longest = "x" * MAX_ID_CHARS
        for body in (state_body("e1", signal()), error_body("e1", error()),
                     {**state_body(longest, signal()), "vehicleId": longest},
                     {**error_body(longest, error()), "vehicleId": longest},
                     {**state_body("e1"), "eventType": "VEHICLE_UNKNOWN"}):
            assert unkeyed(parse_event(json.dumps(body))) is None

    @pytest.mark.parametrize(("vehicle", "event_id"), [("v\ud800", "e1"),
                                                       (VEHICLE, "e" * (MAX_ID_CHARS + 1))])
    def test_an_event_of_another_type_runs_its_handlers_without_the_inbox(
        self, tmp_path: Path, vehicle: str, event_id: str
    ) -> None:
        """The inbox keys every type of event by its ids: one it cannot key (here a type
        the store does not apply) runs its handlers on each delivery rather than failing in
        the inbox check on every one."""
        seen: list[str] = []

        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_UNKNOWN")
            async def handle(event: Event, context: HandlerContext) -> None:
                seen.append(event.event_id)

            body = {**state_body(event_id), "eventType": "VEHICLE_UNKNOWN", "vehicleId": vehicle}
            return [await h.deliver(body, n) for n in (1, 2)]

        results = run(tmp_path, scenario)
        assert [(r.outcome, r.duplicate) for r in results] == [(Outcome.HANDLED, False)] * 2
        assert seen == [event_id] * 2
        assert all(r.vehicle_state is not None and r.vehicle_state.skipped == ()
                   for r in results)

    def test_the_reason_is_the_first_id_s_problem(self) -> None:
        long = "x" * (MAX_ID_CHARS + 1)
        for vehicle, event_id, reason in (("v\ud800", long, NOT_UNICODE),
                                          (long, "e\ud800", TOO_LARGE)):
            state = unkeyed(parse_event(json.dumps(
                {**state_body(event_id, signal()), "vehicleId": vehicle})))
            assert state is not None and [s.reason for s in state.skipped] == [reason]


def test_a_context_with_the_store_s_result_keeps_every_other_field() -> None:
    """`with_vehicle_state` builds the copy field by field: one added to HandlerContext and
    not to it would be lost."""
    values: dict[str, Any] = {f.name: object() for f in dataclasses.fields(HandlerContext)}
    context = HandlerContext(**values)
    state = ApplyResult()
    assert context.with_vehicle_state(state) == dataclasses.replace(context, vehicle_state=state)


class TestTelemetryAndRecords:
    def test_counters_span_attribute_and_handled_record(self, tmp_path: Path) -> None:
        otel = captured()

        async def scenario(h: Harness) -> Any:
            applied = await h.deliver(state_body(
                "e1", signal(value=50, oem=T0 + 1000), signal("x-undated", 1, oem=None)))
            await h.deliver(state_body("e0", signal(value=60, oem=T0)))
            await h.deliver(state_body("e0", signal(value=60, oem=T0)), 2)
            # Fetched again, unchanged: stored (counted as applied), though no change.
            await h.deliver(state_body("e2", signal(value=50, oem=T0 + 1000, retrieved=T0 + 5000)))
            errors = await h.deliver(error_body(
                "x1", error(), error("PERMISSION", "DENIED", state="RESOLVED")))
            return applied, errors

        applied, errors = run(tmp_path, scenario, otel.telemetry)
        assert otel.values(names.VEHICLE_STATE_APPLIED) == [({}, 3)]
        assert otel.values(names.VEHICLE_STATE_STALE) == [({}, 1)]
        assert otel.values(names.VEHICLE_STATE_SKIPPED) == [({"reason": "undated"}, 1)]
        assert otel.values(names.VEHICLE_STATE_DUPLICATES) == [({}, 1)]
        process_spans = otel.finished(names.SPAN_PROCESS)
        last_attributes = process_spans[-1].attributes
        assert last_attributes is not None
        assert last_attributes[names.ATTR_VEHICLE_ERRORS] == (
            "OPEN COMPATIBILITY:VEHICLE_NOT_CAPABLE;RESOLVED PERMISSION:DENIED")
        assert all(names.ATTR_VEHICLE_ERRORS not in (s.attributes or {})
                   for s in process_spans[:-1])
        record = outcome_record(message(state_body("e1")), "handled", event=applied.event,
                                vehicle_state=applied.vehicle_state)
        assert record["vehicleState"]["changed"] == [SOC, "x-undated"]
        assert errors.vehicle_state.errors_resolved[0].code == "DENIED"

    def test_every_attempt_reports_the_errors_the_store_holds_a_failed_one_too(
        self, tmp_path: Path
    ) -> None:
        """A RESOLVED whose handler fails on every attempt: the store closed the error at the
        first attempt, and each attempt's span (the open-errors query's input) and the dead
        letter's handled.jsonl line say so, rather than leaving the query's latest report
        at OPEN until the dead letter is replayed."""
        otel = captured()

        async def scenario(h: Harness) -> Any:
            @h.registry.on("VEHICLE_ERROR")
            async def page(event: Event, context: HandlerContext) -> None:
                if event.event_id == "x2":
                    raise RuntimeError("pager down")

            await h.deliver(error_body("x1", error()))
            results = [await h.deliver(error_body("x2", error(state="RESOLVED"),
                                                  delivered=T0 + 600_000))]
            while results[-1].outcome is Outcome.RETRIED:
                results.append(await h.deliver(h.retries.last()))
            return results, h.log.lines

        results, lines = run(tmp_path, scenario, otel.telemetry)
        assert [r.outcome for r in results] == [Outcome.RETRIED, Outcome.RETRIED,
                                                Outcome.DEAD_LETTERED]
        spans = otel.finished(names.SPAN_PROCESS)
        assert [(s.attributes or {}).get(names.ATTR_VEHICLE_ERRORS) for s in spans] == [
            "OPEN COMPATIBILITY:VEHICLE_NOT_CAPABLE"] + [
            "RESOLVED COMPATIBILITY:VEHICLE_NOT_CAPABLE"] * 3
        assert lines[-1]["outcome"] == "dead_lettered"
        assert [(e["code"], e["state"]) for e in lines[-1]["vehicleState"]["errorsResolved"]] \
            == [("VEHICLE_NOT_CAPABLE", "RESOLVED")]


def test_the_handled_record_spells_the_store_s_result_as_the_readme_shows() -> None:
    """handled.jsonl's `vehicleState`: every field of an ApplyResult, under the names the
    README's example line shows."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [line] = [text for text in readme.splitlines()
              if text.startswith("{") and '"vehicleState"' in text]
    shown = json.loads(line)["vehicleState"]
    opened = ErrorState(type="COMPATIBILITY", code="VEHICLE_NOT_CAPABLE", state="OPEN")
    resolved = ErrorState(type="PERMISSION", code="DENIED", state="RESOLVED",
                          resolved_at=datetime(2026, 12, 1, 8, 30, tzinfo=UTC))
    current = SignalState(code=SOC, value=50)
    result = ApplyResult(
        changes=Changes((SignalChange(vehicle_id=VEHICLE, code=SOC, path=None, previous=None,
                                      current=current),)),
        stale=("odometer-traveleddistance",), refreshed=("charge-ischarging",),
        skipped=(SkippedSignal(code="location-isathome", reason="undated"),),
        errors_opened=(opened,), errors_resolved=(resolved,), conflicts_retried=2)
    assert result.to_json() == {
        "changed": [SOC], "stale": ["odometer-traveleddistance"],
        "refreshed": ["charge-ischarging"],
        "skipped": [{"code": "location-isathome", "reason": "undated"}],
        "errorsOpened": [opened.to_json()],
        "errorsResolved": [{
            "type": "PERMISSION", "code": "DENIED", "state": "RESOLVED", "firstSeen": None,
            "lastSeen": None, "count": 0, "description": None, "resolutionType": None,
            "signals": [], "eventId": None, "resolvedAt": "2026-12-01T08:30:00+00:00"}],
        "conflictsRetried": 2}
    assert set(result.to_json()) == set(shown)
    assert shown["skipped"] == [{"code": "location-isathome", "reason": "undated"}]


class TestLowBattery:
    def test_warns_once_per_crossing_below_the_threshold(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        from shared.handlers import registry as app_registry

        caplog.set_level(logging.WARNING, logger=low_battery.__name__)
        readings = [("a", 50, 1), ("b", 15, 2), ("c", 10, 3), ("old", 5, 0), ("d", 30, 4),
                    ("e", 12, 5), ("f", 20, 6), ("g", 19.9, 7)]

        async def scenario() -> None:
            store = SqliteVehicleStateStore(tmp_path / FILE_NAME)
            for event_id, value, second in readings:
                await process_message(
                    message(state_body(event_id, signal(value=value, oem=T0 + second * 1000))),
                    settings=SETTINGS, registry=app_registry, dead_letterer=NoDeadLetters(),
                    retry_sender=Retries(), sleep=no_sleep, store=store)
            await store.close()

        asyncio.run(scenario())
        warned = [r.getMessage() for r in caplog.records if r.name == low_battery.__name__]
        # 50 -> 15 crosses; 10 stays low; the older 5 is stale; 30 -> 12 crosses; 20 -> 19.9.
        assert [m.split(" fell to ")[1].split("%")[0] for m in warned] == ["15", "12", "19.9"]
        assert all("threshold 20.0%" in m for m in warned)

    @pytest.mark.parametrize(("previous", "current", "warns"), [
        (None, 10, True), (20, 19, True), (19, 18, False), ("n/a", 5, True), (25, 20, False),
        (30, True, False),
    ])
    def test_the_crossing_rule(self, previous: Any, current: Any, warns: bool) -> None:
        from shared.vehicle_state import SignalState

        before = None if previous is None else SignalState(code=SOC, value=previous)
        change = SignalChange(vehicle_id=VEHICLE, code=SOC, path=None, previous=before,
                              current=SignalState(code=SOC, value=current))
        assert low_battery.crossed_below(change, 20.0) is warns

    @pytest.mark.parametrize(("previous", "current", "warns"), [
        (None, 10, True), (20, 19, True), (19, 18, False), (25, 20, False), (None, None, False),
        (30, "error", False), ("error", 5, True),
    ])
    def test_the_readme_s_on_change_example_runs_on_every_reading(
        self, monkeypatch: pytest.MonkeyPatch, previous: Any, current: Any, warns: bool
    ) -> None:
        """The README's example, as printed (its `...` replaced by a record of the call), on
        a registry of its own: a failed reading (value None) must not make it raise."""
        import re
        from types import SimpleNamespace

        from shared import handlers
        from shared.vehicle_state import SignalState

        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        [block] = re.findall(r"## Write your own handlers\n.*?```python\n(.*?)```", readme, re.S)
        example = block.split("\n@registry.on(")[0]
        assert "        ...  #" in example
        example = example.replace("        ...  #", "        crossings.append(change)  #")
        own = HandlerRegistry()
        monkeypatch.setattr(handlers, "registry", own)
        crossings: list[SignalChange] = []
        exec(compile(example, "README.md", "exec"), {"crossings": crossings})

        def state(value: Any) -> SignalState:
            if value == "error":
                return SignalState(code=SOC, status="error", error_type="T")
            return SignalState(code=SOC, value=value)

        change = SignalChange(vehicle_id=VEHICLE, code=SOC, path=None,
                              previous=None if previous is None else state(previous),
                              current=state(current))
        context = SimpleNamespace(settings=SimpleNamespace(low_battery_percent=20.0))
        [handler] = own._by_change["TractionBattery.StateOfCharge"]
        call: Any = handler
        asyncio.run(call(None, change, context))
        assert crossings == ([change] if warns else [])

    def test_a_signal_error_before_counts_as_unknown(self) -> None:
        from shared.vehicle_state import SignalState

        change = SignalChange(
            vehicle_id=VEHICLE, code=SOC, path=None,
            previous=SignalState(code=SOC, status="error", error_type="T"),
            current=SignalState(code=SOC, value=3))
        assert low_battery.crossed_below(change, 20.0)
