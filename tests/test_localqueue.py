"""The embedded queue keeps the Service Bus semantics the receiver and processor rely on.

Time is injected (`FakeClock`), so lock expiry, scheduling and the duplicate window are tested
without sleeping. Cross-process behaviour and durability use real child processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.local.ackmark import ACK_MARK_FILE, AckMark
from shared.local.queue import LocalQueue
from shared.local.queue_rows import (
    CORRUPT_MESSAGE,
    MAX_DELIVERY_COUNT_EXCEEDED,
    ExpiredMessage,
    LockLostError,
    QueueBusyError,
    QueuedMessage,
    QueueFullError,
    QueueUnavailableError,
)
from shared.local.queue_schema import SCHEMA_VERSION

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.db"


@pytest.fixture
def queue(db_path: Path, clock: FakeClock) -> Iterator[LocalQueue]:
    q = LocalQueue(
        db_path, max_delivery_count=3, lock_duration=30.0, duplicate_window=600.0, clock=clock
    )
    yield q
    q.close()


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def receive_one(queue: LocalQueue) -> QueuedMessage:
    messages = queue.receive()
    assert len(messages) == 1, messages
    return messages[0]


def run_child(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def lines_then_sigkill(code: str, db_path: Path, count: int) -> list[str]:
    """Run `code` in a child process on `db_path`, read `count` lines it prints, then kill it
    with SIGKILL: no cleanup, no close(), no checkpoint."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(db_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lines: list[str] = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if len(lines) >= count:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert len(lines) == count
    return lines


# --- send, receive, complete --------------------------------------------------------------


class TestSendReceiveComplete:
    def test_sent_message_is_received_with_its_metadata_and_a_lock(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        assert queue.send(b"hello", message_id="evt-1") is True
        msg = receive_one(queue)
        assert msg.message_id == "evt-1"
        assert msg.body == b"hello"
        assert msg.delivery_count == 1
        assert msg.state == "active"
        assert msg.lock_token
        assert msg.enqueued_time == datetime.fromtimestamp(T0, tz=UTC)
        assert msg.enqueued_time.tzinfo is not None
        assert msg.locked_until == datetime.fromtimestamp(T0 + 30.0, tz=UTC)
        assert msg.scheduled_enqueue_time is None
        assert msg.dead_letter_reason is None

    def test_complete_removes_the_message(self, queue: LocalQueue) -> None:
        queue.send(b"x", message_id="evt-1")
        queue.complete(receive_one(queue).lock_token or "")
        assert queue.receive() == []
        assert queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 0}

    def test_messages_are_received_in_sequence_order_up_to_max_messages(
        self, queue: LocalQueue
    ) -> None:
        for i in range(5):
            queue.send(f"m{i}".encode(), message_id=f"evt-{i}")
        first = queue.receive(max_messages=3)
        second = queue.receive(max_messages=3)
        assert [m.body for m in first] == [b"m0", b"m1", b"m2"]
        assert [m.body for m in second] == [b"m3", b"m4"]
        seqs = [m.sequence_number for m in first + second]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5

    def test_receive_on_an_empty_queue_returns_nothing(self, queue: LocalQueue) -> None:
        assert queue.receive(max_messages=10) == []

    def test_complete_and_receive_settles_then_locks_the_next_ones(
        self, queue: LocalQueue
    ) -> None:
        for i in range(4):
            queue.send(f"m{i}".encode(), message_id=f"evt-{i}")
        first, second = queue.receive(max_messages=2)
        queue.complete(second.lock_token or "")  # settled already: its lock is gone
        lost, received = queue.complete_and_receive(
            [first.lock_token or "", second.lock_token or ""], max_messages=5
        )
        assert lost[0] is None
        assert isinstance(lost[1], LockLostError)
        assert [m.body for m in received] == [b"m2", b"m3"]  # never the completed ones
        assert queue.stats()["active"] == 2
        lost, received = queue.complete_and_receive(
            [m.lock_token or "" for m in received], max_messages=1
        )
        assert (lost, received) == ([None, None], [])
        assert queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 0}

    def test_complete_and_receive_takes_one_message_unless_told_otherwise(
        self, queue: LocalQueue
    ) -> None:
        for i in range(3):
            queue.send(f"m{i}".encode(), message_id=f"evt-{i}")
        _, received = queue.complete_and_receive([])
        assert [m.body for m in received] == [b"m0"]

    def test_complete_and_receive_cancelled_completes_and_locks_nothing(
        self, queue: LocalQueue
    ) -> None:
        for i in range(2):
            queue.send(f"m{i}".encode(), message_id=f"evt-{i}")
        (first,) = queue.receive()
        cancelled = threading.Event()
        cancelled.set()  # the consumer stopped while the call waited
        lost, received = queue.complete_and_receive(
            [first.lock_token or ""], max_messages=5, cancelled=cancelled)
        assert (lost, received) == ([None], [])
        assert [(m.body, m.delivery_count) for m in queue.receive()] == [(b"m1", 1)]

    def test_abandon_with_retry_after_keeps_the_message_invisible_that_long(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt-1")
        queue.abandon(receive_one(queue).lock_token or "", retry_after=10.0)
        assert queue.receive() == []  # the backoff: not redelivered at once
        clock.advance(9.9)
        assert queue.receive() == []
        clock.advance(0.1)
        assert receive_one(queue).delivery_count == 2

    def test_sequence_numbers_are_never_reused_after_removal(self, queue: LocalQueue) -> None:
        queue.send(b"a", message_id="a")
        first = receive_one(queue)
        queue.complete(first.lock_token or "")
        queue.send(b"b", message_id="b")
        assert receive_one(queue).sequence_number > first.sequence_number


class TestSendAndLock:
    """`send_and_lock`: the local host's workers take what it stores without a receive."""

    @staticmethod
    def _comparable(message: QueuedMessage) -> dict[str, Any]:
        fields = {name: getattr(message, name) for name in QueuedMessage.__slots__}
        token = fields.pop("lock_token")
        assert isinstance(token, str) and len(token) == 32 and int(token, 16) >= 0
        return fields

    def test_the_locked_messages_are_what_a_receive_right_after_would_return(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        batch = [(b"m0", "evt-0", {"eventType": "VEHICLE_STATE"}), (b"m1", "evt-1", None),
                 (b"m2", "evt-2", {"k": "\u00e9"})]
        sent = LocalQueue(tmp_path / "a.db", lock_duration=30.0, clock=clock)
        assert sent.send_many(batch) == [True, True, True]
        received = sent.receive(max_messages=5, lock_duration=12.5)
        locking = LocalQueue(tmp_path / "b.db", lock_duration=30.0, clock=clock)
        results, locked, _ = locking.send_and_lock(batch, max_locked=5, lock_duration=12.5)
        assert results == [True, True, True]
        assert [self._comparable(m) for m in locked] == [self._comparable(m) for m in received]
        assert locked[0].locked_until == datetime.fromtimestamp(T0 + 12.5, tz=UTC)
        assert locked[0].delivery_count == 1
        # Locked in the queue too: no receive gets them, the tokens settle them.
        assert locking.receive(max_messages=5) == []
        assert locking.stats() == {"active": 3, "deadLettered": 0, "scheduled": 0}
        assert locking.complete_many([m.lock_token or "" for m in locked]) == [None] * 3
        assert locking.stats()["active"] == 0
        sent.close()
        locking.close()

    def test_the_queue_lock_duration_is_the_default(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        _, (locked,), _ = queue.send_and_lock([(b"x", "evt-1", None)], max_locked=1)
        assert locked.locked_until == datetime.fromtimestamp(T0 + 30.0, tz=UTC)

    def test_a_lock_may_be_shorter_than_a_second(self, queue: LocalQueue) -> None:
        _, (locked,), _ = queue.send_and_lock([(b"x", "evt-1", None)], max_locked=1,
                                           lock_duration=0.5)
        assert locked.locked_until == datetime.fromtimestamp(T0 + 0.5, tz=UTC)

    def test_by_default_it_waits_for_a_queue_another_thread_is_using(
        self, queue: LocalQueue
    ) -> None:
        queue._lock.acquire()  # another thread is in a call, and leaves it soon
        releaser = threading.Timer(0.2, queue._lock.release)
        releaser.start()
        try:
            results, locked, _ = queue.send_and_lock([(b"x", "evt-1", None)], max_locked=1)
        finally:
            releaser.join()
        assert (results, [m.message_id for m in locked]) == ([True], ["evt-1"])

    def test_at_most_max_locked_and_the_rest_wait_in_order(self, queue: LocalQueue) -> None:
        batch = [(f"m{i}".encode(), f"evt-{i}", None) for i in range(5)]
        results, locked, _ = queue.send_and_lock(batch, max_locked=2)
        assert results == [True] * 5
        assert [m.body for m in locked] == [b"m0", b"m1"]
        assert [m.body for m in queue.receive(max_messages=5)] == [b"m2", b"m3", b"m4"]

    def test_nothing_is_locked_while_an_older_message_is_available(
        self, queue: LocalQueue
    ) -> None:
        queue.send(b"old", message_id="evt-old")
        results, locked, _ = queue.send_and_lock([(b"new", "evt-new", None)], max_locked=4)
        assert (results, locked) == ([True], [])
        # The consumer's receive takes the oldest first, as always.
        assert [m.body for m in queue.receive(max_messages=4)] == [b"old", b"new"]

    def test_an_older_message_whose_lock_expired_is_available_too(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"old", message_id="evt-old")
        receive_one(queue)
        clock.advance(30.0)  # the lock expired: the next receive would redeliver it
        assert queue.send_and_lock([(b"new", "evt-new", None)], max_locked=4)[1] == []
        assert [m.body for m in queue.receive(max_messages=4)] == [b"old", b"new"]

    def test_older_messages_in_flight_or_scheduled_do_not_hold_the_new_ones_back(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"in flight", message_id="evt-1")
        receive_one(queue)
        queue.send(b"later", message_id="evt-2",
                   scheduled_enqueue_time=datetime.fromtimestamp(T0 + 60, tz=UTC))
        _, locked, _ = queue.send_and_lock([(b"new", "evt-3", None)], max_locked=1)
        assert [m.body for m in locked] == [b"new"]

    def test_duplicates_are_neither_stored_nor_locked_nor_take_a_slot(
        self, queue: LocalQueue
    ) -> None:
        queue.complete(queue.send_and_lock([(b"a", "evt-a", None)], max_locked=1)[1][0]
                       .lock_token or "")
        results, locked, _ = queue.send_and_lock(
            [(b"a", "evt-a", None), (b"b", "evt-b", None), (b"b", "evt-b", None)], max_locked=1)
        assert results == [False, True, False]
        assert [m.message_id for m in locked] == ["evt-b"]
        assert queue.stats()["active"] == 1

    def test_with_no_slot_it_is_a_plain_send(self, queue: LocalQueue) -> None:
        assert queue.send_and_lock([(b"x", "evt-1", None)], max_locked=0) == ([True], [], [])
        assert receive_one(queue).delivery_count == 1

    def test_a_lock_taken_at_send_expires_and_is_redelivered_like_any_other(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        _, (locked,), _ = queue.send_and_lock([(b"x", "evt-1", None)], max_locked=1)
        clock.advance(29.9)
        assert queue.receive() == []
        clock.advance(0.1)
        again = receive_one(queue)
        assert (again.sequence_number, again.delivery_count) == (locked.sequence_number, 2)
        with pytest.raises(LockLostError):
            queue.complete(locked.lock_token or "")

    def test_locks_passed_in_are_completed_in_the_same_transaction(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        _, done, _ = queue.send_and_lock([(b"a", "evt-a", None), (b"b", "evt-b", None)],
                                         max_locked=2)
        queue.complete(done[1].lock_token or "")  # settled already: its lock is gone
        results, locked, completed = queue.send_and_lock(
            [(b"c", "evt-c", None)], max_locked=1,
            complete=[done[0].lock_token or "", done[1].lock_token or ""])
        assert results == [True] and [m.message_id for m in locked] == ["evt-c"]
        assert completed[0] is None and isinstance(completed[1], LockLostError)
        assert queue.stats()["active"] == 1  # only evt-c, locked

    def test_a_send_that_fails_completes_nothing(self, queue: LocalQueue) -> None:
        _, (done,), _ = queue.send_and_lock([(b"a", "evt-a", None)], max_locked=1)
        with queue._lock, pytest.raises(QueueBusyError):
            queue.send_and_lock([(b"b", "evt-b", None)], max_locked=1, wait=False,
                                complete=[done.lock_token or ""])
        assert queue.complete_many([done.lock_token or ""]) == [None]  # still held

    def test_a_send_that_fails_after_completing_rolls_the_completions_back(
        self, queue: LocalQueue, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, (done,), _ = queue.send_and_lock([(b"a", "evt-a", None)], max_locked=1)

        def disk_error(conn: sqlite3.Connection, now: float) -> bool:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(queue, "_any_available", disk_error)  # after the completion ran
        with pytest.raises(QueueUnavailableError, match="disk I/O error"):
            queue.send_and_lock([(b"b", "evt-b", None)], max_locked=1,
                                complete=[done.lock_token or ""])
        monkeypatch.undo()
        assert queue.stats()["active"] == 1  # evt-a only, and still locked by its holder
        assert queue.complete_many([done.lock_token or ""]) == [None]

    def test_arguments_are_checked_before_anything_is_stored(self, queue: LocalQueue) -> None:
        with pytest.raises(ValueError, match=r"max_locked must be >= 0, got -1"):
            queue.send_and_lock([(b"x", "evt-1", None)], max_locked=-1)
        with pytest.raises(ValueError, match=r"lock_duration must be > 0 seconds, got 0\.0"):
            queue.send_and_lock([(b"x", "evt-1", None)], max_locked=1, lock_duration=0)
        assert queue.stats()["active"] == 0

    def test_without_wait_a_busy_queue_raises_at_once_and_stores_nothing(
        self, queue: LocalQueue
    ) -> None:
        with queue._lock:  # another thread of this process is in a call
            with pytest.raises(QueueBusyError):
                queue.send_and_lock([(b"x", "evt-1", None)], max_locked=1, wait=False)
        assert queue.stats()["active"] == 0

    def test_what_was_locked_at_send_survives_sigkill_and_is_redelivered(
        self, db_path: Path
    ) -> None:
        code = """
            import sys
            from shared.local.queue import LocalQueue
            q = LocalQueue(sys.argv[1], lock_duration=30.0)
            results, locked, _ = q.send_and_lock([(b"kept", "evt-1", None)], max_locked=1)
            print(locked[0].lock_token, flush=True)
            import time
            time.sleep(60)
        """
        (token,) = lines_then_sigkill(code, db_path, 1)
        reopened = LocalQueue(db_path, clock=FakeClock(time.time() + 31.0))
        (message,) = reopened.receive()
        assert (message.body, message.delivery_count) == (b"kept", 2)
        assert message.lock_token != token
        reopened.close()


class TestPayloadRoundTrip:
    @pytest.mark.parametrize(
        "body",
        [
            b"",
            b'{"eventId": "e", "eventType": "VEHICLE_STATE"}',
            bytes(range(256)),
            b"\xff\xfe\x00not utf-8\x80\xc3\x28",
            "caf\u00e9 \U0001f697".encode(),
        ],
        ids=["empty", "json", "all-byte-values", "invalid-utf8", "utf8"],
    )
    def test_body_bytes_round_trip_exactly(self, queue: LocalQueue, body: bytes) -> None:
        queue.send(body, message_id="evt")
        received = receive_one(queue).body
        assert type(received) is bytes
        assert received == body

    def test_application_properties_round_trip(self, queue: LocalQueue) -> None:
        props = {
            "eventType": "VEHICLE_STATE",
            "vehicleId": "veh-\u00e9",
            "webhookId": "",
            "deliveryId": '"quoted"\n',
        }
        queue.send(b"x", message_id="evt", application_properties=props)
        msg = receive_one(queue)
        assert msg.application_properties == props
        msg.application_properties["eventType"] = "changed"  # a copy: the queue is unaffected
        queue.abandon(msg.lock_token or "")
        assert receive_one(queue).application_properties == props

    def test_a_body_that_is_not_bytes_is_rejected_by_its_type(self, queue: LocalQueue) -> None:
        with pytest.raises(TypeError, match=r"^body must be bytes, got str$"):
            queue.send("x", message_id="evt")  # type: ignore[arg-type]
        assert queue.stats()["active"] == 0

    def test_non_string_property_values_are_rejected(self, queue: LocalQueue) -> None:
        with pytest.raises(TypeError, match="must be str"):
            queue.send(b"x", message_id="evt", application_properties={"n": 1})  # type: ignore[dict-item]

    def test_message_id_must_be_non_empty_and_at_most_128_chars_like_service_bus(
        self, queue: LocalQueue
    ) -> None:
        with pytest.raises(ValueError, match=r"^message_id must be a non-empty string$"):
            queue.send(b"x", message_id="")
        with pytest.raises(ValueError, match="128"):
            queue.send(b"x", message_id="a" * 129)
        assert queue.send(b"x", message_id="a" * 128) is True


# --- duplicate detection ------------------------------------------------------------------


class TestDuplicateDetection:
    def test_same_message_id_within_the_window_is_dropped(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        assert queue.send(b"first", message_id="evt") is True
        clock.advance(599)
        assert queue.send(b"second", message_id="evt") is False
        assert [m.body for m in queue.receive(max_messages=10)] == [b"first"]

    def test_duplicate_is_detected_even_after_the_original_was_completed(
        self, queue: LocalQueue
    ) -> None:
        queue.send(b"x", message_id="evt")
        queue.complete(receive_one(queue).lock_token or "")
        assert queue.send(b"x", message_id="evt") is False
        assert queue.receive() == []

    def test_same_message_id_is_accepted_after_the_window_expires(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"first", message_id="evt")
        clock.advance(600)
        assert queue.send(b"second", message_id="evt") is True
        assert len(queue.receive(max_messages=10)) == 2

    def test_dropped_duplicates_do_not_extend_the_window(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"first", message_id="evt")
        clock.advance(500)
        assert queue.send(b"dup", message_id="evt") is False
        clock.advance(100)  # 600 s after the first acceptance
        assert queue.send(b"again", message_id="evt") is True

    def test_duplicate_detection_spans_queue_instances_on_the_same_file(
        self, db_path: Path, clock: FakeClock
    ) -> None:
        with LocalQueue(db_path, clock=clock) as first:
            first.send(b"x", message_id="evt")
        with LocalQueue(db_path, clock=clock) as second:
            assert second.send(b"x", message_id="evt") is False

    def test_expired_entries_are_pruned(
        self, queue: LocalQueue, clock: FakeClock, db_path: Path
    ) -> None:
        for i in range(20):
            queue.send(b"x", message_id=f"old-{i}")
        clock.advance(601)
        queue.send(b"x", message_id="new")
        with sqlite3.connect(db_path) as conn:
            ids = [r[0] for r in conn.execute("SELECT message_id FROM duplicates")]
        assert ids == ["new"]


    def test_pruning_runs_at_most_once_per_interval_and_as_soon_as_it_is_due(
        self, db_path: Path, clock: FakeClock
    ) -> None:
        # A 30 s window: pruning (a scan of the expired ids) runs on a send at most every 30 s.
        def ids() -> list[str]:
            with sqlite3.connect(db_path) as conn:
                return sorted(r[0] for r in conn.execute("SELECT message_id FROM duplicates"))

        with LocalQueue(db_path, duplicate_window=30.0, clock=clock) as queue:
            queue.send(b"x", message_id="a")  # T0: pruned now, next due at T0 + 30
            clock.advance(29)
            queue.send(b"x", message_id="b")  # not due
            clock.advance(1)
            queue.send(b"x", message_id="c")  # due exactly now: "a" (T0) has expired
            assert ids() == ["b", "c"]
            clock.advance(29)
            queue.send(b"x", message_id="d")  # T0 + 59: "b" has expired, but no prune is due
            assert ids() == ["b", "c", "d"]


# --- peek-lock, lock expiry, abandon ------------------------------------------------------


class TestPeekLock:
    def test_locked_message_is_hidden_from_a_second_receiver(
        self, queue: LocalQueue, db_path: Path, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        assert len(queue.receive()) == 1
        with LocalQueue(db_path, clock=clock) as other:
            assert other.receive() == []
        assert queue.receive() == []

    def test_expired_lock_makes_the_message_visible_again_with_delivery_count_incremented(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        first = receive_one(queue)
        clock.advance(29.9)
        assert queue.receive() == []
        clock.advance(0.1)
        second = receive_one(queue)
        assert second.sequence_number == first.sequence_number
        assert second.delivery_count == 2
        assert second.lock_token != first.lock_token

    def test_receive_lock_duration_overrides_the_default(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        msg = queue.receive(lock_duration=5.0)[0]
        assert msg.locked_until == datetime.fromtimestamp(T0 + 5.0, tz=UTC)
        clock.advance(5.0)
        assert receive_one(queue).delivery_count == 2

    def test_renew_lock_extends_the_lock_from_now(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        token = receive_one(queue).lock_token or ""
        clock.advance(20)
        assert queue.renew_lock(token) == datetime.fromtimestamp(T0 + 50.0, tz=UTC)
        clock.advance(20)  # past the original expiry, inside the renewed one
        assert queue.receive() == []
        queue.complete(token)

    def test_abandon_releases_the_message_for_immediate_redelivery(self, queue: LocalQueue) -> None:
        queue.send(b"x", message_id="evt")
        first = receive_one(queue)
        queue.abandon(first.lock_token or "")
        second = receive_one(queue)
        assert second.sequence_number == first.sequence_number
        assert second.delivery_count == 2

    def test_complete_with_an_expired_lock_raises_lock_lost(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        token = receive_one(queue).lock_token or ""
        clock.advance(30)
        with pytest.raises(LockLostError, match="expired"):
            queue.complete(token)
        assert receive_one(queue).delivery_count == 2  # still there, redelivered

    def test_old_lock_token_is_lost_once_the_message_is_redelivered(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        old = receive_one(queue).lock_token or ""
        clock.advance(30)
        new = receive_one(queue).lock_token or ""
        for settle in (queue.complete, queue.abandon, queue.renew_lock):
            with pytest.raises(LockLostError, match="unknown"):
                settle(old)
        queue.complete(new)

    @pytest.mark.parametrize("operation", ["complete", "abandon", "renew_lock", "dead_letter"])
    def test_settling_with_an_unknown_token_raises_lock_lost(
        self, queue: LocalQueue, operation: str
    ) -> None:
        with pytest.raises(LockLostError):
            if operation == "dead_letter":
                queue.dead_letter("nope", reason="r", description="d")
            else:
                getattr(queue, operation)("nope")

    def test_completing_twice_raises_lock_lost(self, queue: LocalQueue) -> None:
        queue.send(b"x", message_id="evt")
        token = receive_one(queue).lock_token or ""
        queue.complete(token)
        with pytest.raises(LockLostError):
            queue.complete(token)


# --- dead-lettering -----------------------------------------------------------------------


class TestDeadLettering:
    def test_abandon_at_max_delivery_count_dead_letters_with_service_bus_reason(
        self, queue: LocalQueue
    ) -> None:
        queue.send(b"poison", message_id="evt", application_properties={"eventType": "X"})
        for expected_count in (1, 2, 3):
            msg = receive_one(queue)
            assert msg.delivery_count == expected_count
            queue.abandon(msg.lock_token or "")
        assert queue.receive() == []
        [dead] = queue.peek_dead_letters()
        assert dead.state == "deadlettered"
        assert dead.dead_letter_reason == MAX_DELIVERY_COUNT_EXCEEDED == "MaxDeliveryCountExceeded"
        assert dead.dead_letter_description == (
            "Message could not be processed after 3 delivery attempts."
        )
        assert dead.delivery_count == 3
        assert dead.lock_token is None and dead.locked_until is None
        assert dead.body == b"poison" and dead.application_properties == {"eventType": "X"}
        assert queue.stats() == {"active": 0, "deadLettered": 1, "scheduled": 0}

    def test_lock_expiry_at_max_delivery_count_dead_letters_instead_of_redelivering(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"poison", message_id="evt")
        for expected_count in (1, 2, 3):
            assert receive_one(queue).delivery_count == expected_count
            clock.advance(30)  # the processor died or hung: the lock expires
        assert queue.receive() == []
        dead = queue.peek_dead_letters()
        assert [m.dead_letter_reason for m in dead] == [MAX_DELIVERY_COUNT_EXCEEDED]
        assert dead[0].dead_letter_description == (
            "Message could not be processed after 3 delivery attempts."
        )

    def test_stats_and_dead_letter_views_account_for_an_expired_last_delivery(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"poison", message_id="evt")
        for _ in range(3):
            receive_one(queue)
            clock.advance(30)
        # No receive has run since the last lock expired: the views still see it dead-lettered.
        assert queue.stats() == {"active": 0, "deadLettered": 1, "scheduled": 0}
        [dead] = queue.peek_dead_letters()
        assert queue.get_dead_letter(dead.sequence_number) == dead

    def test_explicit_dead_letter_keeps_reason_and_description(self, queue: LocalQueue) -> None:
        queue.send(b"not json", message_id="evt")
        msg = receive_one(queue)
        queue.dead_letter(msg.lock_token or "", reason="InvalidPayload", description="bad JSON")
        dead = queue.get_dead_letter(msg.sequence_number)
        assert dead is not None
        assert (dead.dead_letter_reason, dead.dead_letter_description) == (
            "InvalidPayload",
            "bad JSON",
        )
        assert dead.delivery_count == 1
        assert queue.receive() == []
        with pytest.raises(LockLostError):
            queue.complete(msg.lock_token or "")

    def test_dead_letter_by_sequence_dead_letters_the_locked_message(
        self, queue: LocalQueue
    ) -> None:
        queue.send(b"x", message_id="evt")
        msg = receive_one(queue)
        queue.dead_letter_by_sequence(
            msg.sequence_number, reason="InvalidPayload", description="missing eventType"
        )
        dead = queue.get_dead_letter(msg.sequence_number)
        assert dead is not None and dead.dead_letter_reason == "InvalidPayload"
        assert dead.dead_letter_description == "missing eventType"
        with pytest.raises(LockLostError):
            queue.complete(msg.lock_token or "")

    def test_dead_letter_by_sequence_requires_a_live_lock(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        queue.send(b"y", message_id="evt-2")
        locked = receive_one(queue).sequence_number
        unlocked_seq = locked + 1
        with pytest.raises(LockLostError):  # never received
            queue.dead_letter_by_sequence(unlocked_seq, reason="r", description="d")
        with pytest.raises(LockLostError):  # no such message
            queue.dead_letter_by_sequence(9999, reason="r", description="d")
        clock.advance(30)
        with pytest.raises(LockLostError):  # lock expired
            queue.dead_letter_by_sequence(locked, reason="r", description="d")
        assert queue.stats()["deadLettered"] == 0

    def test_dead_letter_by_sequence_without_a_lock_says_what_may_have_happened(
        self, queue: LocalQueue
    ) -> None:
        with pytest.raises(LockLostError) as raised:
            queue.dead_letter_by_sequence(9999, reason="r", description="d")
        assert str(raised.value) == (
            "message 9999 is not locked by a receiver (settled, expired, never received or "
            "already dead-lettered)"
        )

    def test_a_lost_lock_says_whether_it_was_unknown_or_expired(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="first")
        queue.complete(receive_one(queue).lock_token or "")
        queue.send(b"y", message_id="second")
        second = receive_one(queue)  # sequence number 2, delivery 1
        clock.advance(30)
        with pytest.raises(LockLostError) as expired:
            queue.complete(second.lock_token or "")
        assert str(expired.value) == (
            f"the lock {second.lock_token!r} on message 2 expired; it will be redelivered"
        )
        with pytest.raises(LockLostError) as unknown:
            queue.abandon("no-such-token")
        assert str(unknown.value) == (
            "lock token 'no-such-token' is unknown: the message was settled, or its lock "
            "expired and it was redelivered or dead-lettered"
        )

    def test_a_lock_can_be_renewed_for_less_than_a_second(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        token = receive_one(queue).lock_token or ""
        assert queue.renew_lock(token, lock_duration=0.5) == datetime.fromtimestamp(
            T0 + 0.5, tz=UTC
        )

    def test_receive_arguments_are_checked_with_a_clear_message(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        with pytest.raises(ValueError) as raised:
            queue.receive(max_messages=0)
        assert str(raised.value) == "max_messages must be >= 1, got 0"
        for duration in (0.0, -1.0):
            with pytest.raises(ValueError) as raised:
                queue.receive(lock_duration=duration)
            assert str(raised.value) == f"lock_duration must be > 0 seconds, got {duration}"
        (msg,) = queue.receive(lock_duration=0.5)  # nothing was locked by the refusals
        assert msg.delivery_count == 1
        assert msg.locked_until == datetime.fromtimestamp(T0 + 0.5, tz=UTC)

    def test_renewing_for_no_time_is_refused(self, queue: LocalQueue) -> None:
        queue.send(b"x", message_id="evt")
        token = receive_one(queue).lock_token or ""
        for duration in (0.0, -1.0):
            with pytest.raises(ValueError) as raised:
                queue.renew_lock(token, lock_duration=duration)
            assert str(raised.value) == f"lock_duration must be > 0 seconds, got {duration}"
        queue.complete(token)  # the lock was left as it was

    def test_dead_letter_by_sequence_rejects_an_already_dead_lettered_message(
        self, queue: LocalQueue
    ) -> None:
        queue.send(b"x", message_id="evt")
        msg = receive_one(queue)
        queue.dead_letter(msg.lock_token or "", reason="First", description="d")
        with pytest.raises(LockLostError):
            queue.dead_letter_by_sequence(msg.sequence_number, reason="Second", description="d")
        dead = queue.get_dead_letter(msg.sequence_number)
        assert dead is not None and dead.dead_letter_reason == "First"

    def test_get_dead_letter_returns_none_for_active_or_missing_messages(
        self, queue: LocalQueue
    ) -> None:
        queue.send(b"x", message_id="evt")
        seq = receive_one(queue).sequence_number
        assert queue.get_dead_letter(seq) is None
        assert queue.get_dead_letter(12345) is None

    def test_peek_dead_letters_is_ordered_and_limited(self, queue: LocalQueue) -> None:
        for i in range(4):
            queue.send(b"x", message_id=f"evt-{i}")
        for msg in queue.receive(max_messages=4):
            queue.dead_letter(msg.lock_token or "", reason=f"R{msg.body!r}", description="d")
        seqs = [m.sequence_number for m in queue.peek_dead_letters()]
        assert seqs == sorted(seqs) and len(seqs) == 4
        assert [m.sequence_number for m in queue.peek_dead_letters(limit=2)] == seqs[:2]


# --- scheduled messages and stats ---------------------------------------------------------


class TestScheduledAndStats:
    def test_scheduled_message_is_invisible_until_its_time_and_counted_as_scheduled(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        at = datetime.fromtimestamp(T0 + 120, tz=UTC)
        queue.send(b"later", message_id="evt", scheduled_enqueue_time=at)
        assert queue.receive() == []
        assert queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 1}
        clock.advance(119.9)
        assert queue.receive() == []
        clock.advance(0.1)
        assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}
        msg = receive_one(queue)
        assert msg.body == b"later"
        assert msg.scheduled_enqueue_time == at

    def test_scheduled_time_in_the_past_is_visible_at_once(self, queue: LocalQueue) -> None:
        past = datetime.fromtimestamp(T0, tz=UTC) - timedelta(hours=1)
        queue.send(b"x", message_id="evt", scheduled_enqueue_time=past)
        assert receive_one(queue).body == b"x"

    def test_scheduled_time_must_be_timezone_aware(self, queue: LocalQueue) -> None:
        with pytest.raises(ValueError,
                           match=r"^scheduled_enqueue_time must be timezone-aware \(UTC\)$"):
            queue.send(b"x", message_id="evt", scheduled_enqueue_time=datetime(2030, 1, 1))

    def test_stats_counts_locked_and_unlocked_active_scheduled_and_dead_lettered(
        self, queue: LocalQueue
    ) -> None:
        for i in range(4):
            queue.send(b"x", message_id=f"evt-{i}")
        queue.send(
            b"s",
            message_id="sched",
            scheduled_enqueue_time=datetime.fromtimestamp(T0 + 3600, tz=UTC),
        )
        [locked, to_dead] = queue.receive(max_messages=2)
        queue.dead_letter(to_dead.lock_token or "", reason="r", description="d")
        assert locked.lock_token
        assert queue.stats() == {"active": 3, "deadLettered": 1, "scheduled": 1}


# --- replay and purge ---------------------------------------------------------------------


def dead_letter_one(queue: LocalQueue, body: bytes, message_id: str, **props: str) -> int:
    queue.send(body, message_id=message_id, application_properties=props)
    msg = receive_one(queue)
    queue.dead_letter(msg.lock_token or "", reason="InvalidPayload", description="d")
    return msg.sequence_number


class TestReplayAndPurge:
    def test_replay_creates_a_new_active_message_and_removes_the_dead_letter(
        self, queue: LocalQueue
    ) -> None:
        body = b"\xff\x00 raw signed bytes"
        seq = dead_letter_one(queue, body, "evt", eventType="VEHICLE_STATE")
        replayed = queue.replay_dead_letter(seq)
        assert replayed is not None
        assert replayed.sequence_number > seq
        assert replayed.state == "active"
        assert replayed.delivery_count == 0
        assert replayed.lock_token is None and replayed.dead_letter_reason is None
        assert replayed.message_id == "evt"
        assert replayed.body == body
        assert replayed.application_properties == {
            "eventType": "VEHICLE_STATE",
            "replayedFrom": str(seq),
            "replayCount": "1",
        }
        assert queue.get_dead_letter(seq) is None
        assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}
        msg = receive_one(queue)
        assert (msg.sequence_number, msg.body, msg.delivery_count) == (
            replayed.sequence_number,
            body,
            1,
        )

    def test_replay_bypasses_duplicate_detection_but_keeps_the_id_in_the_window(
        self, queue: LocalQueue
    ) -> None:
        seq = dead_letter_one(queue, b"x", "evt")
        assert queue.send(b"x", message_id="evt") is False  # still inside the window
        assert queue.replay_dead_letter(seq) is not None
        assert queue.send(b"x", message_id="evt") is False
        assert len(queue.receive(max_messages=10)) == 1

    def test_replay_count_increments_on_each_replay(self, queue: LocalQueue) -> None:
        seq = dead_letter_one(queue, b"x", "evt")
        for expected in ("1", "2"):
            replayed = queue.replay_dead_letter(seq)
            assert replayed is not None
            assert replayed.application_properties["replayCount"] == expected
            msg = receive_one(queue)
            queue.dead_letter(msg.lock_token or "", reason="again", description="d")
            seq = msg.sequence_number
        dead = queue.get_dead_letter(seq)
        assert dead is not None and dead.application_properties["replayCount"] == "2"

    def test_replay_of_a_missing_or_active_message_returns_none(self, queue: LocalQueue) -> None:
        assert queue.replay_dead_letter(42) is None
        queue.send(b"x", message_id="evt")
        active_seq = receive_one(queue).sequence_number
        assert queue.replay_dead_letter(active_seq) is None

    def test_purge_named_removes_only_those_dead_letters_and_returns_the_count(
        self, queue: LocalQueue
    ) -> None:
        seqs = [dead_letter_one(queue, b"x", f"evt-{i}") for i in range(3)]
        queue.send(b"active", message_id="active")
        active_seq = seqs[-1] + 1
        assert queue.purge_dead_letters([seqs[0], seqs[2], 9999, active_seq]) == 2
        assert [m.sequence_number for m in queue.peek_dead_letters()] == [seqs[1]]
        assert queue.stats() == {"active": 1, "deadLettered": 1, "scheduled": 0}

    def test_purge_all_removes_every_dead_letter_and_returns_the_count(
        self, queue: LocalQueue
    ) -> None:
        for i in range(3):
            dead_letter_one(queue, b"x", f"evt-{i}")
        queue.send(b"active", message_id="active")
        assert queue.purge_dead_letters() == 3
        assert queue.purge_dead_letters() == 0
        assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}


# --- storage, lifetime, errors ------------------------------------------------------------


class TestStorage:
    def test_creates_parent_directories_and_uses_wal_with_a_schema_version(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "a" / "b" / "q.db"
        LocalQueue(path).close()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_messages_survive_reopening(self, db_path: Path, clock: FakeClock) -> None:
        with LocalQueue(db_path, clock=clock) as q:
            q.send(b"kept", message_id="evt")
        with LocalQueue(db_path, clock=clock) as q:
            assert receive_one(q).body == b"kept"

    def test_a_database_from_a_newer_schema_is_refused_clearly(self, db_path: Path) -> None:
        LocalQueue(db_path).close()
        with sqlite3.connect(db_path) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with pytest.raises(QueueUnavailableError, match="newer"):
            LocalQueue(db_path)

    def test_a_path_that_is_not_a_database_raises_queue_unavailable(self, tmp_path: Path) -> None:
        path = tmp_path / "garbage.db"
        path.write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(QueueUnavailableError, match=str(path)):
            LocalQueue(path)

    def test_operations_after_close_raise_queue_unavailable(self, queue: LocalQueue) -> None:
        queue.close()
        queue.close()  # idempotent
        with pytest.raises(QueueUnavailableError, match="close"):
            queue.send(b"x", message_id="evt")
        with pytest.raises(QueueUnavailableError):
            queue.receive()

    @pytest.mark.parametrize(("operation", "call"), [
        ("receive", lambda q: q.receive()),
        ("renew_lock", lambda q: q.renew_lock("t")),
        ("complete", lambda q: q.complete("t")),
        ("complete", lambda q: q.complete_many(["t"])),
        ("abandon", lambda q: q.abandon("t")),
        ("dead_letter", lambda q: q.dead_letter("t", reason="r", description="d")),
        ("dead_letter_by_sequence",
         lambda q: q.dead_letter_by_sequence(1, reason="r", description="d")),
    ])
    def test_a_settlement_after_close_names_the_queue_and_the_operation(
        self, queue: LocalQueue, operation: str, call: Any
    ) -> None:
        queue.close()
        with pytest.raises(QueueUnavailableError) as raised:
            call(queue)
        assert str(raised.value) == f"local queue {queue.path}: {operation} after close()"

    def test_send_while_another_process_holds_the_write_lock_raises_queue_unavailable(
        self, db_path: Path
    ) -> None:
        LocalQueue(db_path).close()
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            q = LocalQueue(db_path, busy_timeout=0.05)  # opening needs no write lock
            with pytest.raises(QueueUnavailableError, match="send failed: database is locked"):
                q.send(b"x", message_id="evt")
            with pytest.raises(QueueUnavailableError, match="receive failed"):
                q.receive()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert q.send(b"x", message_id="evt") is True  # nothing half-done was left behind
        q.close()

    def test_invalid_settings_are_rejected(self, db_path: Path) -> None:
        with pytest.raises(ValueError, match="max_delivery_count"):
            LocalQueue(db_path, max_delivery_count=0)
        with pytest.raises(ValueError, match="lock_duration"):
            LocalQueue(db_path, lock_duration=0)


class TestWaitForMessage:
    def test_returns_at_once_when_a_message_is_available(self, queue: LocalQueue) -> None:
        queue.send(b"x", message_id="evt")
        started = time.monotonic()
        queue.wait_for_message(5.0)
        assert time.monotonic() - started < 1.0

    def test_times_out_on_an_empty_queue(self, queue: LocalQueue) -> None:
        started = time.monotonic()
        queue.wait_for_message(0.02)
        assert 0.015 <= time.monotonic() - started < 1.0

    def test_is_woken_by_a_send_from_another_thread(self, queue: LocalQueue) -> None:
        sender = threading.Timer(0.01, lambda: queue.send(b"x", message_id="evt"))
        started = time.monotonic()
        sender.start()
        queue.wait_for_message(5.0)
        sender.join()
        assert time.monotonic() - started < 1.0
        assert len(queue.receive()) == 1


# --- concurrency: threads and processes ---------------------------------------------------


class TestConcurrency:
    @pytest.mark.parametrize(
        "shared_instance", [True, False], ids=["one-instance", "two-instances"]
    )
    def test_two_threads_receiving_concurrently_never_get_the_same_message(
        self, db_path: Path, shared_instance: bool
    ) -> None:
        total = 200
        producer = LocalQueue(db_path, synchronous="NORMAL")
        for i in range(total):
            producer.send(str(i).encode(), message_id=f"evt-{i}")
        queues = [producer, producer] if shared_instance else [producer, LocalQueue(db_path)]
        got: list[list[int]] = [[], []]
        barrier = threading.Barrier(2)
        # Each receiver holds its first batch locked until the other has received one too, so
        # both take part however the threads are scheduled (no timing luck on a loaded machine).
        holding = [threading.Event(), threading.Event()]

        def worker(index: int) -> None:
            q = queues[index]
            barrier.wait()
            while batch := q.receive(max_messages=3):
                got[index].extend(m.sequence_number for m in batch)
                holding[index].set()
                holding[1 - index].wait(timeout=30)
                for m in batch:
                    q.complete(m.lock_token or "")
            holding[index].set()  # an empty queue must not keep the other waiting

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for q in set(queues):
            q.close()
        received = got[0] + got[1]
        assert len(received) == total
        assert len(set(received)) == total
        assert got[0] and got[1], "both receivers should have taken part"

    def test_a_separate_process_sees_our_messages_and_we_see_its_messages(
        self, db_path: Path
    ) -> None:
        with LocalQueue(db_path) as q:
            q.send(b"from parent", message_id="parent-1", application_properties={"k": "v"})
            child = run_child(
                """
                import json, sys
                from shared.local.queue import LocalQueue
                with LocalQueue(sys.argv[1]) as q:
                    [m] = q.receive()
                    q.complete(m.lock_token)
                    q.send(b"from child", message_id="child-1")
                    print(json.dumps({"body": m.body.decode(), "props": m.application_properties,
                                      "stats": q.stats()}))
                """,
                str(db_path),
            )
            seen = json.loads(child.stdout)
            assert seen == {
                "body": "from parent",
                "props": {"k": "v"},
                "stats": {"active": 1, "deadLettered": 0, "scheduled": 0},
            }
            msg = receive_one(q)
            assert (msg.body, msg.message_id) == (b"from child", "child-1")
            assert q.send(b"again", message_id="child-1") is False  # its id is in our window

    def test_a_process_receiving_concurrently_never_gets_a_message_this_process_got(
        self, db_path: Path
    ) -> None:
        total = 200
        with LocalQueue(db_path, synchronous="NORMAL") as q:
            for i in range(total):
                q.send(b"x", message_id=f"evt-{i}")
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(
                        """
                        import sys
                        from shared.local.queue import LocalQueue
                        with LocalQueue(sys.argv[1]) as q:
                            while batch := q.receive(max_messages=2):
                                for m in batch:
                                    q.complete(m.lock_token)
                                    print(m.sequence_number, flush=True)
                        """
                    ),
                    str(db_path),
                ],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=subprocess.PIPE,
                text=True,
            )
            mine: list[int] = []
            while batch := q.receive(max_messages=2):
                for m in batch:
                    q.complete(m.lock_token or "")
                    mine.append(m.sequence_number)
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0
        theirs = [int(line) for line in out.split()]
        assert len(mine) + len(theirs) == total
        assert not set(mine) & set(theirs)
        assert len(set(mine) | set(theirs)) == total


class TestDurability:
    def test_every_send_that_returned_survives_sigkill_of_the_sender(self, db_path: Path) -> None:
        LocalQueue(db_path).close()
        acknowledged = lines_then_sigkill(
            """
            import sys
            from shared.local.queue import LocalQueue
            q = LocalQueue(sys.argv[1])
            i = 0
            while True:  # until killed, mid-send
                q.send(b"body-%d" % i, message_id="evt-%d" % i)
                print(i, flush=True)
                i += 1
            """,
            db_path,
            150,
        )
        with LocalQueue(db_path) as q:
            stored = {m.message_id: m.body for m in q.receive(max_messages=100_000)}
        for i in map(int, acknowledged):
            assert stored.get(f"evt-{i}") == b"body-%d" % i

    def test_settlements_survive_sigkill_of_the_settler(self, db_path: Path) -> None:
        """Locks and completions commit without an fsync of their own (module docstring): they
        must still survive the process being killed the moment the call returned."""
        with LocalQueue(db_path) as q:
            for i in range(40):
                q.send(b"body-%d" % i, message_id=f"evt-{i}")
        completed = lines_then_sigkill(
            """
            import sys
            import time
            from shared.local.queue import LocalQueue
            q = LocalQueue(sys.argv[1])
            for m in q.receive(max_messages=10):  # locked, delivery 1, not settled
                pass
            for _ in range(20):
                (m,) = q.receive()
                q.complete(m.lock_token)
                print(m.message_id, flush=True)
            time.sleep(600)  # killed here
            """,
            db_path,
            20,
        )
        with LocalQueue(db_path, lock_duration=60.0) as q:
            stats = q.stats()
            available = {m.message_id for m in q.receive(max_messages=100)}
        assert stats["active"] == 40 - 20
        assert not available & set(completed)  # every completion that returned is kept
        # The ten locks taken first (evt-0 to evt-9) are still held: the locks survived too.
        assert available == {f"evt-{i}" for i in range(30, 40)}

    def test_sends_commit_at_the_configured_level_and_settlements_at_normal(
        self, queue: LocalQueue
    ) -> None:
        """A 200 means stored: the send's commit is fsynced (FULL); settlements skip the fsync
        (NORMAL), as the module docstring says, and never leave the next send at NORMAL."""
        level = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

        def current() -> str:
            assert queue._conn is not None
            return level[queue._conn.execute("PRAGMA synchronous").fetchone()[0]]

        queue.send(b"a", message_id="a")
        assert current() == "FULL"
        (message,) = queue.receive()
        assert current() == "NORMAL"
        queue.send(b"b", message_id="b")
        assert current() == "FULL"
        queue.complete(message.lock_token or "")
        assert current() == "NORMAL"
        queue.abandon(receive_one(queue).lock_token or "")
        assert current() == "NORMAL"
        queue.dead_letter(receive_one(queue).lock_token or "", reason="r", description="d")
        assert current() == "FULL"
        queue.send(b"c", message_id="c")
        queue.renew_lock(receive_one(queue).lock_token or "")
        assert current() == "NORMAL"


class TestNoWait:
    """`wait=False` (what the local host calls on its event loop) never waits for a busy queue:
    it raises `QueueBusyError` having done nothing, and the caller retries from a thread."""

    def test_another_connection_holding_the_write_lock_makes_it_busy_at_once(
        self, db_path: Path
    ) -> None:
        with LocalQueue(db_path, busy_timeout=30.0) as queue:
            queue.send(b"old", message_id="old")
            other = sqlite3.connect(db_path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # as `dlq purge` in another process would
            try:
                with pytest.raises(QueueBusyError, match="another process holds the write lock"):
                    queue.send_many([(b"new", "new", None)], wait=False)
                with pytest.raises(QueueBusyError):
                    queue.complete_and_receive([], max_messages=5, wait=False)
                waited: list[list[bool]] = []
                sender = threading.Thread(
                    target=lambda: waited.append(queue.send_many([(b"new", "new", None)])))
                sender.start()
                # The waiting sender holds the instance: a no-wait call from another thread
                # does not queue up behind it either.
                wait_for(lambda: queue._lock.locked())
                with pytest.raises(QueueBusyError, match="in use by another thread"):
                    queue.complete_and_receive([], max_messages=5, wait=False)
            finally:
                other.execute("COMMIT")
                other.close()
            sender.join(30)
            assert waited == [[True]]  # wait=True waited for the lock, then sent
            # Nothing was received by the refused calls: both messages are still available.
            _, received = queue.complete_and_receive([], max_messages=5, wait=False)
            assert [m.message_id for m in received] == ["old", "new"]
            assert all(m.delivery_count == 1 for m in received)


    def test_completing_without_wait_is_refused_at_once_and_with_wait_waits(
        self, db_path: Path
    ) -> None:
        # What the local host's fetcher calls on its loop (`complete_many(wait=False)`) and,
        # when refused, from a thread (the default, which waits).
        with LocalQueue(db_path, busy_timeout=30.0) as queue:
            queue.send_many([(b"a", "a", None), (b"b", "b", None)])
            _, received = queue.complete_and_receive([], max_messages=2)
            tokens = [m.lock_token for m in received if m.lock_token is not None]
            other = sqlite3.connect(db_path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(QueueBusyError, match="another process holds the write lock"):
                    queue.complete_many(tokens, wait=False)
                completed: list[list[LockLostError | None]] = []
                completer = threading.Thread(
                    target=lambda: completed.append(queue.complete_many(tokens)))
                completer.start()
                wait_for(lambda: queue._lock.locked())
                assert completed == []  # waiting for the write lock
            finally:
                other.execute("COMMIT")
                other.close()
            completer.join(30)
            assert completed == [[None, None]]
            assert queue.stats()["active"] == 0


class TestReceiveDoesNotReadTheBacklog:
    """Receiving costs the same with 20 or 2,000 messages waiting: counted in SQLite virtual
    machine steps (a progress handler), not in time. The lock-expiry sweep once went through
    the `state` index and read every active message on every receive."""

    @staticmethod
    def steps_to_receive(queue: LocalQueue, backlog: int) -> int:
        queue.send_many(
            [(b"x" * 5000, f"m{i}", {"eventType": "T"}) for i in range(backlog)]
        )
        for _ in range(3):  # some locks held, as under load
            queue.receive(max_messages=4)
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        assert queue._conn is not None
        queue._conn.set_progress_handler(count, 10)
        try:
            assert len(queue.receive(max_messages=4)) == 4
        finally:
            queue._conn.set_progress_handler(None, 10)
        return steps

    def test_receive_steps_do_not_grow_with_the_backlog(self, tmp_path: Path) -> None:
        with LocalQueue(tmp_path / "small.sqlite3") as small:
            few = self.steps_to_receive(small, 20)
        with LocalQueue(tmp_path / "large.sqlite3") as large:
            many = self.steps_to_receive(large, 2000)
        assert many < few * 2, (few, many)


class TestDamagedRowOnReceive:
    """A row whose stored values cannot be decoded is dead-lettered by the receive that finds
    it (reason CorruptMessage), with a description that says what to do and quotes nothing
    stored; the messages after it are delivered as usual."""

    @pytest.mark.parametrize(("damage", "found"), [
        ("properties = 'not json'", "JSONDecodeError at character 0"),
        ("properties = '[1]'", "ValueError"),
        ("body = 'text, not bytes'", "TypeError"),
    ])
    def test_the_damaged_rows_are_dead_lettered_and_the_next_one_delivered(
        self, queue: LocalQueue, db_path: Path, damage: str, found: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        queue.send(b"x", message_id="damaged-1")
        queue.send(b"x", message_id="damaged-2")
        queue.send(b"y", message_id="intact")
        conn = sqlite3.connect(db_path)
        with conn:
            conn.execute(f"UPDATE messages SET {damage} WHERE message_id LIKE 'damaged-%'")
        conn.close()
        with caplog.at_level(logging.ERROR, logger="shared.local.queue"):
            (delivered,) = queue.receive(max_messages=3)
        assert delivered.message_id == "intact"
        assert [r.getMessage() for r in caplog.records] == [
            f"local queue {queue.path}: message(s) 1, 2 cannot be decoded (the file was "
            "damaged); dead-lettered as CorruptMessage"
        ]
        dead = queue.peek_dead_letters()
        assert [d.sequence_number for d in dead] == [1, 2]
        for d in dead:
            assert d.dead_letter_reason == CORRUPT_MESSAGE
            assert d.dead_letter_description == (
                f"The stored message cannot be decoded ({found}): the queue file was damaged. "
                "Inspect it with `dlq show`; purge it, or replay it once repaired."
            )


class TestUncountedAbandon:
    """`abandon(uncount=True)`: a delivery that never reached its handler (the local host's
    handler threads all stuck) is released after its backoff and does not count."""

    def test_the_delivery_does_not_count_and_waits_its_backoff(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        queue.send(b"x", message_id="evt")
        for _ in range(5):  # more than max_delivery_count (3): never dead-lettered for these
            queue.abandon(receive_one(queue).lock_token or "", retry_after=10.0, uncount=True)
            assert queue.receive() == []  # the backoff
            clock.advance(9.9)
            assert queue.receive() == []
            clock.advance(0.1)
        assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}
        assert receive_one(queue).delivery_count == 1

    def test_a_negative_backoff_releases_it_at_once(self, queue: LocalQueue) -> None:
        queue.send(b"x", message_id="evt")
        queue.abandon(receive_one(queue).lock_token or "", retry_after=-5.0, uncount=True)
        assert receive_one(queue).delivery_count == 1


class TestExpiredLastDelivery:
    """`on_expired` hears of each message the lock-expiry sweep dead-lettered."""

    def expire_last_delivery(self, queue: LocalQueue, clock: FakeClock) -> None:
        for _ in range(3):
            receive_one(queue)
            clock.advance(30)

    def test_the_message_is_reported_with_its_id_body_and_delivery_count(
        self, queue: LocalQueue, clock: FakeClock
    ) -> None:
        heard: list[ExpiredMessage] = []
        queue.on_expired = heard.extend
        queue.send(b"poison", message_id="evt")
        self.expire_last_delivery(queue, clock)
        assert queue.receive() == []  # the receive that sweeps
        assert heard == [ExpiredMessage("evt", b"poison", 3)]

    def test_a_damaged_row_is_reported_with_what_can_be_read(
        self, queue: LocalQueue, clock: FakeClock, db_path: Path
    ) -> None:
        heard: list[ExpiredMessage] = []
        queue.on_expired = heard.extend
        queue.send(b"poison", message_id="evt")
        self.expire_last_delivery(queue, clock)
        conn = sqlite3.connect(db_path)
        with conn:  # text where bytes and an integer belong (text sorts above any number)
            conn.execute("UPDATE messages SET body = 'text', delivery_count = 'three'")
        conn.close()
        assert queue.receive() == []
        assert heard == [ExpiredMessage("evt", b"", 0)]


class TestAcknowledgedMark:
    """After a send commits, the queue raises its acknowledged mark (shared/local/ackmark.py)
    to the highest sequence number it stored."""

    def test_the_mark_is_the_highest_sequence_number_stored(
        self, queue: LocalQueue, db_path: Path
    ) -> None:
        queue.ack_mark = AckMark(db_path.parent / ACK_MARK_FILE)
        queue.send_many([])  # nothing stored: no mark, which would claim sequence numbers
        assert queue.ack_mark.read() is None
        queue.send_many([(b"a", "evt-1", None), (b"b", "evt-2", None)])
        assert queue.ack_mark.read() == 2
        queue.send(b"a", message_id="evt-1")  # a duplicate: nothing stored, the mark stays
        queue.send(b"c", message_id="evt-3")
        assert queue.ack_mark.read() == 3

    def test_a_mark_that_cannot_be_written_is_logged_and_the_event_is_stored(
        self, queue: LocalQueue, db_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        blocked = db_path.parent / "a-directory"
        blocked.mkdir()  # where the mark's file should be: opening it fails (EISDIR)
        queue.ack_mark = AckMark(blocked)
        with caplog.at_level(logging.WARNING, logger="shared.local.queue"):
            assert queue.send(b"a", message_id="evt-1") is True
        assert [r.getMessage() for r in caplog.records] == [
            f"local queue {queue.path}: cannot record the acknowledged mark: [Errno 21] Is a "
            f"directory: '{blocked}'"]
        assert receive_one(queue).message_id == "evt-1"


def hold_at_its_size(conn: sqlite3.Connection) -> None:
    """SQLite's own limit on the file's pages at its present size: a write that needs more
    is answered SQLITE_FULL, as on a full disk."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


class CheckpointGivesSpaceBack:
    """The queue's connection, on a disk that a checkpoint gives space back to: after `PRAGMA
    wal_checkpoint` the file may grow again (SQLite's `max_page_count` lifted)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        cursor = self._conn.execute(sql, *args)
        if sql.startswith("PRAGMA wal_checkpoint"):
            row = cursor.fetchone()
            self._conn.execute("PRAGMA max_page_count = 1073741823")
            return _OneRow(row)
        return cursor


class WriterArrivesAtCheckpoint(CheckpointGivesSpaceBack):
    """As `CheckpointGivesSpaceBack`, and another process takes the database's write lock
    during the checkpoint, holding it for `hold` seconds: the queue's next write must wait."""

    def __init__(self, conn: sqlite3.Connection, path: Path, hold: float) -> None:
        super().__init__(conn)
        self._path = path
        self._hold = hold
        self.writer: subprocess.Popen[str] | None = None

    def execute(self, sql: str, *args: Any) -> Any:
        answer = super().execute(sql, *args)
        if sql.startswith("PRAGMA wal_checkpoint") and self.writer is None:
            self.writer = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent("""
                    import sqlite3, sys, time
                    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
                    conn.execute("BEGIN IMMEDIATE")
                    print("holding", flush=True)
                    time.sleep(float(sys.argv[2]))
                    conn.execute("COMMIT")
                """), str(self._path), str(self._hold)],
                stdout=subprocess.PIPE, text=True,
            )
            assert self.writer.stdout is not None
            assert self.writer.stdout.readline() == "holding\n"
        return answer


class _OneRow:
    """The checkpoint's answer, read before the connection ran anything else."""

    def __init__(self, row: Any) -> None:
        self.row = row

    def fetchone(self) -> Any:
        return self.row


class TestSendFailures:
    """What a send that SQLite refuses leaves behind: the error, `store_failure` (the health
    check's reason) until a send succeeds, and one more try after a checkpoint."""

    def test_a_refused_send_is_the_store_failure_until_a_send_succeeds(
        self, queue: LocalQueue
    ) -> None:
        assert queue._conn is not None

        def refuse(action: int, arg1: Any, *_: Any) -> int:
            if action == sqlite3.SQLITE_INSERT and arg1 == "messages":
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        queue._conn.set_authorizer(refuse)
        with pytest.raises(QueueUnavailableError) as raised:
            queue.send(b"a", message_id="evt-1")
        assert queue.store_failure == str(raised.value) == (
            f"local queue {queue.path}: send failed: not authorized")
        queue._conn.set_authorizer(None)
        assert queue.send(b"a", message_id="evt-2") is True
        assert queue.store_failure is None

    def test_a_full_database_is_tried_once_more_after_its_checkpoint(
        self, queue: LocalQueue
    ) -> None:
        conn = queue._conn
        assert conn is not None
        inserts: list[str] = []
        conn.set_trace_callback(lambda sql: inserts.append(sql) if sql.lower().startswith(
            "insert into messages") else None)
        hold_at_its_size(conn)
        with pytest.raises(QueueFullError, match="the disk is full"):
            queue.send(b"x" * 100_000, message_id="evt-1")
        assert len(inserts) == 2  # the checkpoint succeeded: one more try, then the error
        assert queue.store_failure is not None

    def test_a_send_tried_again_after_its_checkpoint_stores_what_was_asked(
        self, queue: LocalQueue
    ) -> None:
        conn = queue._conn
        assert conn is not None
        queue._conn = CheckpointGivesSpaceBack(conn)  # type: ignore[assignment]
        hold_at_its_size(conn)
        later = datetime.fromtimestamp(T0 + 60, UTC)
        assert queue.send(b"x" * 100_000, message_id="evt-1", scheduled_enqueue_time=later)
        assert queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 1}
        hold_at_its_size(conn)
        stored, locked, _ = queue.send_and_lock([(b"y" * 100_000, "evt-2", None)],
                                                max_locked=1, lock_duration=5.0)
        assert stored == [True] and [m.message_id for m in locked] == ["evt-2"]
        assert locked[0].locked_until == datetime.fromtimestamp(T0 + 5.0, UTC)
        assert queue.store_failure is None

    def test_the_send_tried_again_waits_for_another_writer_as_the_first_try_would(
        self, queue: LocalQueue, db_path: Path
    ) -> None:
        conn = queue._conn
        assert conn is not None
        proxy = WriterArrivesAtCheckpoint(conn, db_path, hold=0.3)
        queue._conn = proxy  # type: ignore[assignment]
        hold_at_its_size(conn)
        assert queue.send(b"x" * 100_000, message_id="evt-1") is True
        assert proxy.writer is not None and proxy.writer.wait(timeout=10) == 0
        assert queue.stats() == {"active": 1, "deadLettered": 0, "scheduled": 0}
        assert queue.store_failure is None
