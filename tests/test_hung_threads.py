"""Fault tests: more hung plain handlers than the pool has threads, in a real host process.

Each delivery of a `hang-blocking-` event blocks its handler thread for good. The incident: once
the stuck threads outnumbered the pool's, every later event timed out waiting for a thread and
was dead-lettered `MaxDeliveryCountExceeded` without its handler having run, until a restart,
while health said ok. Now a stuck thread is replaced (up to twice the pool's threads); at that
bound the host stops taking messages, says so in /api/health and the log, and a delivery whose
handler never started is never counted. The pool has 2 threads here (`TEST_POOL_THREADS`).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

from .host_process import free_port, host_process
from .support import http_request, state_event, wait_until
from .test_function_timeout import (
    HOST,
    calls,
    dead_letters,
    hanging_env,
    post,
    processed_ids,
    records,
)

MAX_DELIVERIES = 3


def env_for(tmp_path: Path, port: int) -> dict[str, str]:
    return hanging_env(tmp_path, port, TEST_POOL_THREADS="2", FUNCTION_TIMEOUT_SECONDS="0.3",
                       MAX_DELIVERY_COUNT=str(MAX_DELIVERIES),
                       RETRY_BACKOFF_BASE_SECONDS="0.01", RETRY_BACKOFF_MAX_SECONDS="0.05")


def handler_calls(tmp_path: Path) -> Counter[str]:
    return Counter(c["eventId"] for c in calls(tmp_path / "calls.jsonl"))


class TestStuckThreadsAreReplaced:
    def test_three_hung_deliveries_on_two_threads_leave_later_events_handled(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        state = tmp_path / "state"
        with host_process([*HOST, "--workers", "4"], env_for(tmp_path, port), port):
            assert post(port, state_event(eventId="hang-blocking-0")) == 200
            # Three deliveries, each hung in its thread: three stuck threads, two in the pool.
            wait_until(lambda: ("hang-blocking-0", "MaxDeliveryCountExceeded", MAX_DELIVERIES)
                       in dead_letters(state), timeout=30)
            others = [state_event(eventId=f"record-{i}") for i in range(4)]
            for event in others:
                assert post(port, event) == 200
            wait_until(lambda: len(processed_ids(state)) == len(others), timeout=30)
            assert http_request(port, "GET", "/api/health").json() == {"status": "ok"}
        assert sorted(processed_ids(state)) == sorted(e["eventId"] for e in others)
        assert handler_calls(tmp_path)["hang-blocking-0"] == MAX_DELIVERIES


class TestAtTheBound:
    def test_the_host_stops_taking_messages_says_so_and_fails_no_handler_that_never_ran(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        state = tmp_path / "state"
        hung = [f"hang-blocking-{i}" for i in range(2)]  # 6 deliveries to hang: the bound is 4
        others = [state_event(eventId=f"record-{i}") for i in range(3)]
        with host_process([*HOST, "--workers", "4"], env_for(tmp_path, port), port) as proc:
            for event_id in hung:
                assert post(port, state_event(eventId=event_id)) == 200
            wait_until(lambda: sum(handler_calls(tmp_path).values()) == 4, timeout=30)
            health = wait_until(lambda: (r := http_request(port, "GET", "/api/health"))
                                .json()["status"] == "degraded" and r, timeout=10)
            for event in others:
                assert post(port, event) == 200  # webhooks are still stored
            assert health.status == 200
            (problem,) = health.json()["problems"]
            assert "all 4 handler threads are stuck" in problem
            assert "not taking messages" in problem
            with LocalQueue(state / QUEUE_FILE) as queue:
                # Nothing is failed meanwhile: the rest waits in the queue.
                wait_until(lambda: queue.stats()["active"] >= len(others) + 1, timeout=10)
            assert processed_ids(state) == []
            os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate(timeout=20)[0].decode()
        assert "all 4 handler threads are stuck in handlers that timed out" in output

        # Every dead letter's handler ran on each of its deliveries.
        calls_by_event = handler_calls(tmp_path)
        for message_id, reason, count in dead_letters(state):
            assert reason == "MaxDeliveryCountExceeded"
            assert calls_by_event[message_id] == count == MAX_DELIVERIES, (message_id, count)
        assert all(r["eventId"] in hung for r in records(state))

        # After a restart (the stuck threads are gone), everything left is handled.
        env = env_for(tmp_path, port)
        del env["TEST_HANG"]
        with host_process([*HOST, "--workers", "4", "--lock-duration", "1"], env, port):
            wait_until(lambda: {e["eventId"] for e in others} <= set(processed_ids(state)),
                       timeout=30)
