"""Fault tests: the wall clock steps by two hours under a running host (libfaketime reads the
offset from a file at every call, so the test steps the real host process's clock; its
monotonic clock keeps running, as a stepped system clock leaves it).

+2 h used to expire every in-flight lock at once (each message was delivered a second time
while its first delivery still ran) and the duplicate window with them; -2 h hid the whole
backlog for two hours behind `visible_at`. Stored times now move with a step.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

from . import faketime
from .host_process import base_env, free_port, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until
from .test_function_timeout import HOST


def calls(tmp_path: Path) -> Counter[str]:
    path = tmp_path / "calls.jsonl"
    text = path.read_text() if path.exists() else ""
    return Counter(json.loads(line)["eventId"] for line in text.splitlines())


def handled(state: Path) -> Counter[str]:
    path = state / "handled.jsonl"
    text = path.read_text() if path.exists() else ""
    return Counter(json.loads(line)["eventId"] for line in text.splitlines())


def post(port: int, event: dict[str, object]) -> str:
    body = encode(event)
    resp = http_request(port, "POST", WEBHOOK, body, signed_headers(body))
    assert resp.status == 200
    status: str = resp.json()["status"]
    return status


def env_for(tmp_path: Path, port: int, control: Path) -> dict[str, str]:
    env = base_env(tmp_path, port)
    env.update(TEST_CALLS=str(tmp_path / "calls.jsonl"), LOG_LEVEL="WARNING",
               **faketime.stepping_env(control))
    return env


class TestAForwardStep:
    def test_in_flight_messages_are_not_delivered_again_and_duplicates_still_dropped(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        control = tmp_path / "faketime"
        env = env_for(tmp_path, port, control)
        env["TEST_SLOW_SECONDS"] = "3"
        state = tmp_path / "state"
        events = [state_event(eventId=f"slow-{i}") for i in range(4)]
        with host_process([*HOST, "--workers", "8", "--lock-duration", "60"], env, port) as proc:
            for event in events:
                assert post(port, event) == "accepted"
            wait_until(lambda: len(calls(tmp_path)) == len(events), timeout=10)
            control.write_text("+2h")  # while every handler is still running
            wait_until(lambda: len(handled(state)) == len(events), timeout=20)
            time.sleep(1)  # a second delivery, if any, would have started by now
            # The window counts from acceptance, seconds ago, whatever the clock says now.
            assert post(port, events[0]) == "duplicate"
            proc.kill()
        assert calls(tmp_path) == dict.fromkeys((e["eventId"] for e in events), 1)


class TestABackwardStep:
    def test_the_backlog_stays_visible(self, tmp_path: Path) -> None:
        port = free_port()
        control = tmp_path / "faketime"
        env = env_for(tmp_path, port, control)
        env["TEST_SLOW_SECONDS"] = "0.3"
        state = tmp_path / "state"
        events = [state_event(eventId=f"slow-{i}") for i in range(12)]
        with host_process([*HOST, "--workers", "1"], env, port):
            for event in events:
                assert post(port, event) == "accepted"
            wait_until(lambda: len(calls(tmp_path)) >= 2, timeout=10)
            control.write_text("-2h")  # with a backlog of about ten
            wait_until(lambda: len(handled(state)) == len(events), timeout=20)
        assert handled(state) == dict.fromkeys((e["eventId"] for e in events), 1)


class TestAStepWhileNoHostRuns:
    @pytest.mark.parametrize("reboot", [False, True], ids=["same-boot", "after-a-reboot"])
    def test_a_clock_set_back_between_runs_does_not_hide_the_backlog(
        self, tmp_path: Path, reboot: bool
    ) -> None:
        port = free_port()
        control = tmp_path / "faketime"
        env = env_for(tmp_path, port, control)
        state = tmp_path / "state"
        events = [state_event() for _ in range(5)]
        with host_process([*HOST, "--workers", "0"], env, port):
            for event in events:
                assert post(port, event) == "accepted"
        with LocalQueue(state / QUEUE_FILE) as queue:
            assert queue.stats()["active"] == len(events)
        if reboot:  # the monotonic clock restarted: no step can be measured, times are clamped
            with sqlite3.connect(state / QUEUE_FILE) as conn:
                conn.execute("UPDATE clock_reference SET boot_id = 'an earlier boot'")
            conn.close()
        control.write_text("-2h")
        with host_process(HOST, env, port):
            wait_until(lambda: len(handled(state)) == len(events), timeout=20)


class TestASecondHostStarting:
    """Two hosts may share a state directory: the second's start-up clamp must not take the
    first's locks for a clock error (it used to cut them to its own lock duration, and then
    received a message the first was still processing)."""

    def _first_holds_a_lock(self, state: Path) -> tuple[LocalQueue, str]:
        first = LocalQueue(state / QUEUE_FILE)
        first.send(b'{"eventId": "held"}', message_id="held")
        (held,) = first.receive(max_messages=1, lock_duration=60.0)
        assert held.lock_token is not None
        return first, held.lock_token

    def test_in_the_same_boot_the_first_hosts_longer_lock_holds(self, tmp_path: Path) -> None:
        first, token = self._first_holds_a_lock(tmp_path)
        with LocalQueue(tmp_path / QUEUE_FILE) as second:
            assert second.clamp_future_times(lock_seconds=0.5, backoff_seconds=0.05) == 0
            time.sleep(0.6)  # past the second host's own lock duration
            assert second.receive(max_messages=1, lock_duration=0.5) == []
        first.complete(token)  # the first host still holds its lock
        first.close()

    def test_after_a_reboot_stored_locks_are_clamped(self, tmp_path: Path) -> None:
        first, _ = self._first_holds_a_lock(tmp_path)
        first.close()
        with sqlite3.connect(tmp_path / QUEUE_FILE) as conn:
            conn.execute("UPDATE clock_reference SET boot_id = 'an earlier boot'")
        conn.close()
        with LocalQueue(tmp_path / QUEUE_FILE) as second:
            # The monotonic clock restarted: no step can be measured, so a lock further ahead
            # than any this host takes may be the clock's error, and is brought back.
            assert second.clamp_future_times(lock_seconds=0.5, backoff_seconds=0.05) == 1
            time.sleep(0.6)
            assert [m.message_id for m in second.receive(max_messages=1)] == ["held"]
