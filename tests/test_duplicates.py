"""A duplicate is answered `duplicate`, and the window it is detected in is the one documented.

Locally the embedded queue knows a duplicate exactly (tests/test_http_contract.py::TestDuplicates
runs it over HTTP). Service Bus drops a duplicate without telling the sender, so an instance
answers `duplicate` for what it stored itself within the window (`RememberingPublisher`).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from shared.local.queue_open import open_local_queue
from shared.publisher import RememberingPublisher, ServiceBusPublisher
from shared.receiver import receive
from shared.runtime import DUPLICATE_WINDOW_SECONDS
from shared.settings import load_settings
from shared.signature import sign
from shared.tokens import StaticTokenProvider

from .fakes import FakeServiceBusClient, ManualClock
from .support import TOKEN, encode, state_event

ROOT = Path(__file__).resolve().parent.parent
HOW_IT_WORKS = (ROOT / "docs" / "how-it-works.md").read_text()
SERVICEBUS_BICEP = (ROOT / "infra" / "modules" / "servicebus.bicep").read_text()


def bicep_window() -> str:
    found = re.search(r"duplicateDetectionHistoryTimeWindow:\s*'([^']+)'", SERVICEBUS_BICEP)
    assert found is not None, "servicebus.bicep sets no duplicateDetectionHistoryTimeWindow"
    return found.group(1)


def iso_seconds(duration: str) -> float:
    """An ISO-8601 duration as Bicep writes it (P1D, PT1H, PT15M, P1DT2H...) in seconds."""
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", duration)
    assert match is not None and duration not in ("P", "PT"), f"not a duration: {duration}"
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def human(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


class TestTheDocumentedWindow:
    def test_the_docs_give_the_embedded_queues_window(self, tmp_path: Path) -> None:
        queue = open_local_queue(load_settings({"LOCAL_STATE_DIR": str(tmp_path)}))
        try:
            assert queue.duplicate_window == DUPLICATE_WINDOW_SECONDS
        finally:
            queue.close()
        assert f"window: {human(DUPLICATE_WINDOW_SECONDS)} locally" in HOW_IT_WORKS

    def test_the_docs_quote_the_service_bus_window_from_the_bicep(self) -> None:
        assert f"`{bicep_window()}` on Service Bus" in HOW_IT_WORKS

    def test_an_instance_remembers_no_longer_than_service_bus_does(self) -> None:
        # Longer, and it would answer `duplicate` for a copy Service Bus would have taken.
        assert DUPLICATE_WINDOW_SECONDS <= iso_seconds(bicep_window())


def _publisher(clock: ManualClock, **options: Any
               ) -> tuple[RememberingPublisher, FakeServiceBusClient]:
    client = FakeServiceBusClient()
    inner = ServiceBusPublisher(lambda: client, "smartcar-events", send_timeout=1.0)
    return RememberingPublisher(inner, window=DUPLICATE_WINDOW_SECONDS, clock=clock,
                                **options), client


def _post(publisher: RememberingPublisher, body: bytes) -> tuple[int, dict[str, object]]:
    reply = asyncio.run(receive(body, {"SC-Signature": sign(TOKEN, body)},
                                tokens=StaticTokenProvider(TOKEN), publisher=publisher,
                                max_body_bytes=196608))
    return reply.status, dict(reply.body)


class TestServiceBusDuplicates:
    def test_a_retry_to_the_same_instance_is_answered_duplicate_and_not_sent_again(self) -> None:
        clock = ManualClock(1000.0)
        publisher, client = _publisher(clock)
        event = state_event()
        body = encode(event)
        assert _post(publisher, body) == (200, {"status": "accepted", "eventId": event["eventId"]})
        clock.now += 180  # Smartcar's retries come within about three minutes
        assert _post(publisher, body) == (200, {"status": "duplicate", "eventId": event["eventId"]})
        assert [m.message_id for s in client.senders for m in s.sent] == [event["eventId"]]

    def test_after_the_window_the_same_event_id_is_sent_again(self) -> None:
        clock = ManualClock(1000.0)
        publisher, client = _publisher(clock)
        event = state_event()
        body = encode(event)
        _post(publisher, body)
        clock.now += DUPLICATE_WINDOW_SECONDS
        assert _post(publisher, body)[1]["status"] == "accepted"
        assert len([m for s in client.senders for m in s.sent]) == 2

    def test_a_send_that_failed_is_not_remembered(self) -> None:
        clock = ManualClock(1000.0)
        publisher, client = _publisher(clock)
        client.fail_next_sender = ConnectionError("link detached")
        event = state_event()
        body = encode(event)
        assert _post(publisher, body)[0] == 503
        assert _post(publisher, body) == (200, {"status": "accepted", "eventId": event["eventId"]})

    @pytest.mark.parametrize(("ids", "again"), [(2, "duplicate"), (3, "accepted")])
    def test_it_remembers_as_many_ids_as_its_limit(self, ids: int, again: str) -> None:
        clock = ManualClock(1000.0)
        publisher, client = _publisher(clock, limit=2)
        first, *others = [encode(state_event()) for _ in range(ids)]
        for body in (first, *others):
            assert _post(publisher, body)[1]["status"] == "accepted"
        # Two ids are both kept; of three, the oldest is forgotten and sent again.
        assert _post(publisher, first)[1]["status"] == again
        assert len([m for s in client.senders for m in s.sent]) == ids + (again == "accepted")
