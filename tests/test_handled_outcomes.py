"""handled.jsonl records every final outcome of a message, with `outcome` telling them apart.

Incident the test guards against: a developer watching handled.jsonl saw nothing for an event
that had been dead-lettered, and could not tell "not processed yet" from "given up on".
Run over real HTTP against the local host; the handler fails on purpose for one event type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shared.handlers import HandlerRegistry

from .support import (
    WEBHOOK,
    RunningHost,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

HOW_IT_WORKS = (Path(__file__).resolve().parent.parent / "docs" / "how-it-works.md").read_text()
CONTRACT_FIELDS = {"eventId", "eventType", "vehicleId", "deliveryCount"}


@pytest.fixture
def host(tmp_path: Path) -> Any:
    registry = HandlerRegistry()

    @registry.on("VEHICLE_STATE")
    def handle(event: Any, context: Any) -> None:
        if event.event_id.startswith("poison"):
            raise RuntimeError("downstream system is down")

    with RunningHost(local_env(tmp_path, MAX_DELIVERY_COUNT="2"), registry=registry) as running:
        yield running


def post(host: RunningHost, event: dict[str, Any]) -> None:
    body = encode(event)
    assert host.post(WEBHOOK, body, signed_headers(body)).status == 200


def record_of(host: RunningHost, event_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in host.handled() if r["eventId"] == event_id), None)

    found: dict[str, Any] = wait_until(find, timeout=60)
    return found


class TestEveryFinalOutcomeIsRecorded:
    def test_a_handled_event(self, host: RunningHost) -> None:
        event = state_event()
        post(host, event)
        record = record_of(host, event["eventId"])
        assert record["outcome"] == "handled"
        assert CONTRACT_FIELDS <= record.keys()
        assert "reason" not in record

    def test_an_event_type_without_handlers_is_unhandled(self, host: RunningHost) -> None:
        event = state_event(eventType="VEHICLE_ERROR", data={"errors": []})
        post(host, event)
        assert record_of(host, event["eventId"])["outcome"] == "unhandled"

    def test_an_unreadable_payload_is_dead_lettered_with_its_reason(
        self, host: RunningHost
    ) -> None:
        event = state_event(data="oops")
        post(host, event)
        record = record_of(host, event["eventId"])
        assert record["outcome"] == "dead_lettered"
        assert record["reason"] == "InvalidPayload"
        assert record["description"] == "data must be an object, got str"
        assert record["eventType"] == "VEHICLE_STATE"  # ids read from the unparsed body
        assert record["deliveryCount"] == 1

    def test_a_handler_failing_every_delivery_is_recorded_once_when_dead_lettered(
        self, host: RunningHost
    ) -> None:
        event = state_event(eventId="poison-1")
        post(host, event)
        record = record_of(host, "poison-1")
        assert record["outcome"] == "dead_lettered"
        assert record["reason"] == "MaxDeliveryCountExceeded"
        assert record["description"] == "RuntimeError on the last of 2 deliveries"
        assert record["deliveryCount"] == 2
        (dead,) = wait_until(host.dead_letters)
        assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
        # The first, retried delivery is not a final outcome: one line only.
        assert [r["eventId"] for r in host.handled()].count("poison-1") == 1


class TestTheDocsSayWhatIsRecorded:
    def test_the_docs_name_each_outcome_and_the_fields(self, host: RunningHost) -> None:
        section = re.search(r"Locally, every final outcome.*?\n\n", HOW_IT_WORKS, re.S)
        assert section is not None, "docs/how-it-works.md no longer explains handled.jsonl"
        text = section.group(0)
        for outcome in ("handled", "unhandled", "dead_lettered"):
            assert f"`{outcome}`" in text
        for reason in ("InvalidPayload", "MaxDeliveryCountExceeded"):
            assert f"`{reason}`" in text
        event = state_event(data="oops")
        post(host, event)
        for field in record_of(host, event["eventId"]):
            assert f"`{field}`" in text, f"docs/how-it-works.md does not name the field {field}"
