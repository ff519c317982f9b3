"""Fault tests: handlers that never return. Each runs the real local host in its own process
(`tests.hanging_host`: the app's handlers plus two that hang on demand), talks to it over
loopback HTTP and stops it with real signals.

What must hold, as with the Functions host in Azure: a delivery is bounded by the function
timeout; hung handlers never starve webhooks; the host stops promptly whatever its handlers
do, and what they were doing is redelivered after the restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from shared.local.queue_open import QUEUE_FILE
from shared.local.queue_rows import MAX_DELIVERY_COUNT_EXCEEDED

from .host_process import base_env, free_port, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until

HOST = [sys.executable, "-m", "tests.hanging_host"]


def post(port: int, event: dict[str, Any]) -> int:
    body = encode(event)
    return http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status


def calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def dead_letters(state: Path) -> list[tuple[str, str, int]]:
    queue = state / QUEUE_FILE
    with sqlite3.connect(f"file:{queue}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT message_id, dl_reason, delivery_count FROM messages "
            "WHERE state = 'deadlettered'"
        ).fetchall()
    conn.close()
    return [(str(a), str(b), int(c)) for a, b, c in rows]


def records(state: Path) -> list[dict[str, Any]]:
    path = state / "handled.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def processed_ids(state: Path) -> list[str]:
    """eventIds whose handlers completed (handled.jsonl also records dead-letterings)."""
    return [r["eventId"] for r in records(state) if r.get("outcome") != "dead_lettered"]


def hanging_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = base_env(tmp_path, port)
    env.update(TEST_HANG="1", TEST_CALLS=str(tmp_path / "calls.jsonl"), LOG_LEVEL="WARNING")
    env.update(extra)
    return env


class TestFunctionTimeout:
    def test_a_hung_async_handler_is_cancelled_at_the_timeout_while_the_queue_flows(
        self, tmp_path: Path
    ) -> None:
        """One worker, and the first event's async handler awaits forever. Without a timeout
        nothing behind it would ever run."""
        port = free_port()
        env = hanging_env(tmp_path, port, FUNCTION_TIMEOUT_SECONDS="2", MAX_DELIVERY_COUNT="2",
                          RETRY_BACKOFF_BASE_SECONDS="1", RETRY_BACKOFF_MAX_SECONDS="1")
        state = tmp_path / "state"
        hung = state_event(eventId=f"hang-async-{time.time_ns()}")
        others = [state_event() for _ in range(10)]
        with host_process([*HOST, "--workers", "1"], env, port) as proc:
            assert post(port, hung) == 200
            wait_until(lambda: calls(tmp_path / "calls.jsonl"), timeout=60)
            for event in others:
                assert post(port, event) == 200
            wait_until(lambda: len(processed_ids(state)) == len(others), timeout=120)
            wait_until(lambda: dead_letters(state), timeout=120)
            os.killpg(proc.pid, signal.SIGINT)
            out = proc.communicate(timeout=30)[0].decode()

        assert sorted(processed_ids(state)) == sorted(e["eventId"] for e in others)
        assert dead_letters(state) == [(hung["eventId"], MAX_DELIVERY_COUNT_EXCEEDED, 2)]
        (final,) = [r for r in records(state) if r["eventId"] == hung["eventId"]]
        assert (final["outcome"], final["reason"]) == ("dead_lettered", MAX_DELIVERY_COUNT_EXCEEDED)
        first, second = calls(tmp_path / "calls.jsonl")
        # Redelivered only after the timeout (2 s) and the backoff (1 s), never at once.
        assert second["at"] - first["at"] >= 3.0
        warnings = re.findall(r"function process_event timed out after 2s "
                              r"\(FUNCTION_TIMEOUT_SECONDS\) on event (\S+) .*? in handler "
                              r"(\S+); cancelled, (.*)", out)
        assert [(w[0], w[1].rsplit(".", 1)[-1]) for w in warnings] == [
            (hung["eventId"], "hang_async"), (hung["eventId"], "hang_async")
        ]
        assert [w[2] for w in warnings] == ["retrying in 1s", "it will be dead-lettered"]


class TestBlockingHandlersHaveTheirOwnThreads:
    def test_six_blocking_hangs_with_eight_workers_leave_webhooks_answering_200(
        self, tmp_path: Path
    ) -> None:
        """Six handlers block their threads for good (more than the event loop's default
        executor has on a 2-core machine, which the receiver needs to store events)."""
        port = free_port()
        env = hanging_env(tmp_path, port, FUNCTION_TIMEOUT_SECONDS="600")
        state = tmp_path / "state"
        with host_process([*HOST, "--workers", "8"], env, port):
            for i in range(6):
                assert post(port, state_event(eventId=f"hang-blocking-{i}")) == 200
            wait_until(lambda: len(calls(tmp_path / "calls.jsonl")) == 6, timeout=60)

            others = [state_event() for _ in range(30)]
            for event in others:
                assert post(port, event) == 200
            assert http_request(port, "GET", "/api/health").status == 200
            wait_until(lambda: len(processed_ids(state)) == len(others), timeout=120)
        assert sorted(processed_ids(state)) == sorted(e["eventId"] for e in others)


class TestShutdown:
    def test_sigterm_with_a_blocking_hang_exits_within_10_s_and_the_event_runs_after_restart(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = hanging_env(tmp_path, port)
        state = tmp_path / "state"
        hung = state_event(eventId=f"hang-blocking-{time.time_ns()}")
        with host_process(HOST, env, port) as proc:
            assert post(port, hung) == 200
            wait_until(lambda: calls(tmp_path / "calls.jsonl"), timeout=60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        assert records(state) == []

        del env["TEST_HANG"]
        with host_process(HOST, env, port):
            wait_until(lambda: processed_ids(state) == [hung["eventId"]], timeout=60)
        assert len(calls(tmp_path / "calls.jsonl")) == 2
