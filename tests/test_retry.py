"""The pieces of a scheduled retry: attempt, history, the copy's id and what a replay resets."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusMessage

from shared.cli.ops import replay_properties
from shared.local.queue import LocalQueue
from shared.retry import (
    ServiceBusRetrySender,
    attempt_of,
    event_delivery_count,
    history_of,
    retry_copy,
    retry_copy_id,
)


class TestAttempt:
    @pytest.mark.parametrize(("props", "expected"), [
        ({}, 1), ({"attempt": "3"}, 3), ({"attempt": 4}, 4), ({"attempt": "x"}, 1),
        ({"attempt": "0"}, 1), ({"attempt": "-2"}, 1),
    ])
    def test_read_from_the_property_and_never_below_one(
        self, props: dict[str, object], expected: int
    ) -> None:
        assert attempt_of(props) == expected

    def test_the_event_delivery_count_adds_this_messages_redeliveries(self) -> None:
        assert event_delivery_count({}, 1) == 1
        assert event_delivery_count({}, 3) == 3
        assert event_delivery_count({"attempt": "3"}, 1) == 3
        assert event_delivery_count({"attempt": "3"}, 2) == 4
        assert event_delivery_count({"attempt": "3"}, 0) == 3  # a copy never delivered


class TestHistory:
    @pytest.mark.parametrize("raw", ["not json", "{}", "3", '"text"'])
    def test_an_unreadable_history_starts_afresh(self, raw: str) -> None:
        assert history_of({"attemptHistory": raw}) == []

    def test_entries_that_are_not_objects_are_dropped(self) -> None:
        assert history_of({"attemptHistory": '[{"attempt": 1}, 2, "x"]'}) == [{"attempt": 1}]


class TestCopy:
    def test_the_copy_carries_the_next_attempt_and_the_history(self) -> None:
        copy = retry_copy(b"{}", {"eventId": "e1", "attempt": "2",
                                  "attemptHistory": '[{"attempt": 1}]'},
                          event_key="e1", error=KeyError("k"), now=1000.0, base=3, maximum=10)
        assert (copy.message_id, copy.attempt, copy.delay_seconds) == ("e1:retry:3", 3, 6.0)
        assert copy.scheduled_enqueue_time == datetime.fromtimestamp(1006.0, UTC)
        assert copy.application_properties["eventId"] == "e1"
        assert json.loads(copy.application_properties["attemptHistory"]) == [
            {"attempt": 1},
            {"attempt": 2, "failedAt": "1970-01-01T00:16:40.000+00:00", "error": "KeyError"},
        ]

    def test_the_backoff_is_capped(self) -> None:
        copy = retry_copy(b"{}", {"attempt": "9"}, event_key="e1", error=KeyError(),
                          now=0.0, base=3, maximum=10)
        assert copy.delay_seconds == 10

    def test_a_replayed_events_copies_are_not_its_earlier_copies(self) -> None:
        copy = retry_copy(b"{}", {"replayCount": "2"}, event_key="e1", error=KeyError(),
                          now=0.0, base=1, maximum=1)
        assert copy.message_id == "e1:replay:2:retry:2"


class TestCopyId:
    def test_same_inputs_same_id(self) -> None:
        assert retry_copy_id("e1", 2) == retry_copy_id("e1", 2) == "e1:retry:2"
        assert retry_copy_id("e1", 2) != retry_copy_id("e1", 3)

    @pytest.mark.parametrize("key", ["e" * 128, "e" * 120, "é" * 127])
    def test_long_event_ids_stay_within_128_characters(self, key: str) -> None:
        ids = {retry_copy_id(key, n) for n in (2, 3)}
        assert len(ids) == 2
        assert all(len(i) <= 128 and i.endswith((":retry:2", ":retry:3")) for i in ids)

    def test_a_huge_replay_count_is_hashed_too(self) -> None:
        copy_id = retry_copy_id("e" * 100, 2, replay="9" * 90)
        assert len(copy_id) <= 128 and copy_id.startswith("sha256:")
        assert copy_id != retry_copy_id("e" * 100, 2, replay="9" * 91)


class TestReplay:
    def test_a_replay_starts_again_at_attempt_one(self) -> None:
        props = replay_properties({"eventId": "e1", "attempt": "5", "attemptHistory": "[]",
                                   "deadLetterReason": "MaxDeliveryCountExceeded"}, 7)
        assert props == {"eventId": "e1", "replayedFrom": "7", "replayCount": "1"}

    def test_the_local_queue_replay_starts_again_at_attempt_one(self, tmp_path: Path) -> None:
        with LocalQueue(tmp_path / "q.sqlite3") as queue:
            queue.send(b"{}", message_id="e1:retry:5",
                       application_properties={"eventId": "e1", "attempt": "5",
                                               "attemptHistory": "[]"})
            (qm,) = queue.receive()
            assert qm.lock_token is not None
            queue.dead_letter(qm.lock_token, reason="MaxDeliveryCountExceeded", description="d")
            replayed = queue.replay_dead_letter(qm.sequence_number)
            assert replayed is not None
            assert dict(replayed.application_properties) == {
                "eventId": "e1", "replayedFrom": str(qm.sequence_number), "replayCount": "1"}


class TestServiceBusSender:
    def test_the_copy_is_sent_as_a_scheduled_json_message_with_its_id_and_properties(
        self
    ) -> None:
        sent: list[ServiceBusMessage] = []

        async def send(message: ServiceBusMessage) -> None:
            sent.append(message)

        copy = retry_copy(b'{"eventId": "e1"}', {"eventId": "e1"}, event_key="e1",
                          error=KeyError(), now=1000.0, base=2, maximum=10)
        asyncio.run(ServiceBusRetrySender(send).schedule(copy))
        (message,) = sent
        assert b"".join(message.body) == b'{"eventId": "e1"}'
        assert message.message_id == "e1:retry:2"
        assert message.content_type == "application/json"  # as the receiver sends originals
        assert message.scheduled_enqueue_time_utc == datetime.fromtimestamp(1002.0, UTC)
        assert message.application_properties is not None
        assert {k: v for k, v in message.application_properties.items()} == (
            copy.application_properties)


class TestCopyIdBounds:
    def test_an_id_of_exactly_128_characters_is_kept_as_it_is(self) -> None:
        key = "e" * (128 - len(":retry:2"))
        assert retry_copy_id(key, 2) == key + ":retry:2"

    def test_a_longer_key_is_replaced_by_its_digest(self) -> None:
        key = "e" * 121
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert retry_copy_id(key, 2) == f"sha256:{digest}:retry:2"

    def test_a_hashed_id_of_exactly_128_characters_is_kept(self) -> None:
        key, replay = "e" * 200, "9" * 41  # sha256:<64>:replay:<41>:retry:2 is 128 long
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert retry_copy_id(key, 2, replay) == f"sha256:{digest}:replay:{replay}:retry:2"
        assert retry_copy_id(key, 2, replay + "9").startswith("sha256:")
        assert len(retry_copy_id(key, 2, replay + "9")) == len("sha256:") + 64

    def test_a_lone_surrogate_in_the_event_id_or_the_replay_count_is_hashed(self) -> None:
        # JSON's \\ud800 escape decodes to a lone surrogate; an id must still come out.
        key = "\ud800" * 200
        assert retry_copy_id(key, 2) == "sha256:" + hashlib.sha256(
            key.encode("utf-8", "surrogatepass")).hexdigest() + ":retry:2"
        assert len(retry_copy_id("e", 2, replay="\ud800" * 200)) == len("sha256:") + 64


def test_the_history_is_written_compactly() -> None:
    # It travels as an application property, in the message's bounded header.
    copy = retry_copy(b"{}", {}, event_key="e1", error=KeyError(), now=0.0, base=1, maximum=1)
    assert copy.application_properties["attemptHistory"] == (
        '[{"attempt":1,"failedAt":"1970-01-01T00:00:00.000+00:00","error":"KeyError"}]')
