"""A host whose clock is wrong, through libfaketime on the real host process.

A slow clock (deliveries look ahead of it) still handles every event, counts and warns about
the skew; a fast clock dead-letters fresh events `StaleDelivery` (only an old deliveredAt is
stale), and then `/api/health` and the next start's banner say the clock is probably wrong, and
the operator's `dlq replay` has the events processed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import faketime
from .host_process import REPO, base_env, free_port, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until


def records(state: Path) -> list[dict[str, Any]]:
    path = state / "handled.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


#: What a processed (not dead-lettered) event's outcome can be.
PROCESSED = {"handled", "unhandled"}


def post_events(port: int, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        event = state_event()  # deliveredAt: the true time, as Smartcar's clock says
        body = encode(event)
        assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
        ids.append(event["eventId"])
    return ids


def stop(proc: subprocess.Popen[bytes]) -> str:
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate(timeout=20)[0]
    return out.decode()


class TestASlowClock:
    def test_deliveries_ahead_of_the_clock_are_handled_counted_and_warned_about(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = {**base_env(tmp_path, port), **faketime.offset_env("-10m")}
        state = tmp_path / "state"
        with host_process([sys.executable, "-m", "shared.local"], env, port) as proc:
            ids = post_events(port, 6)
            wait_until(lambda: len(records(state)) == 6, timeout=30)
            health = http_request(port, "GET", "/api/health")
            output = stop(proc)
        # Processed, none dead-lettered. With the vehicle state store on, an event whose
        # readings are no newer than the stored ones fires no on_change handler: "unhandled".
        assert {r["eventId"] for r in records(state)} == set(ids)
        assert {r["outcome"] for r in records(state)} <= PROCESSED
        assert health.status == 200
        body = health.json()
        assert body["status"] == "degraded"
        (problem,) = body["problems"]
        assert "clock is probably wrong" in problem and "behind" in problem
        assert "6 of the last 6" in problem
        warnings = [line for line in output.splitlines() if "ahead of this host's clock" in line]
        assert len(warnings) == 6
        assert all(" 60" in w or " 59" in w for w in warnings), warnings  # ~600 s, named


class TestAFastClock:
    def test_fresh_events_are_stale_health_and_banner_say_so_and_replay_processes_them(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = base_env(tmp_path, port)
        state = tmp_path / "state"
        cmd = [sys.executable, "-m", "shared.local"]
        with host_process(cmd, {**env, **faketime.offset_env("+20m")}, port) as proc:
            ids = post_events(port, 6)
            wait_until(lambda: len(records(state)) == 6, timeout=30)
            health = http_request(port, "GET", "/api/health").json()
            stop(proc)
        assert {(r["outcome"], r.get("reason")) for r in records(state)} == {
            ("dead_lettered", "StaleDelivery")}
        assert health["status"] == "degraded"
        assert "clock is probably wrong" in health["problems"][0]
        assert "ahead of Smartcar's by about 1200 s" in health["problems"][0]

        # The clock is fixed; the next start warns from the stored deliveries.
        with host_process(cmd, env, port) as proc:
            replayed = subprocess.run(
                [sys.executable, "-m", "shared.cli", "dlq", "replay", "--all", "--json"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            assert replayed.returncode == 0, replayed.stderr
            wait_until(lambda: len(records(state)) == 12, timeout=30)
            output = stop(proc)
        assert "WARNING: the host clock is probably wrong" in output
        handled = [r["eventId"] for r in records(state)[6:]]
        assert sorted(handled) == sorted(ids)
        assert {r["outcome"] for r in records(state)[6:]} <= PROCESSED
