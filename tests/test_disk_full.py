"""Fault tests: the disk under `handled.jsonl` fills up while events are processed.

What must hold afterwards: every line of handled.jsonl is a whole JSON record (no torn line,
no two records run together); a delivery whose outcome could not be written is retried after
the processor's backoff, never at once; once space is back, every event is recorded once.

Two injections, both real: a 64 KB tmpfs mounted under the state directory's handled.jsonl
(needs root and mount permission; skipped otherwise, with the reason), and, always, a fault
at the write itself: `os.write` on the log's descriptor writes part of a line, then fails with
ENOSPC, in a real host serving real HTTP.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local import adapters

from .host_process import base_env, free_port, host_process
from .support import (
    WEBHOOK,
    RunningHost,
    encode,
    http_request,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)
from .tmpfs_mount import mounted_tmpfs

BACKOFF = 0.5


def lines_of(path: Path) -> list[dict[str, Any]]:
    """Every line parsed; a torn or merged line fails the test here."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    assert text == "" or text.endswith("\n"), "handled.jsonl ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def whole_lines(path: Path) -> int:
    """Lines written so far, for waiting while writes still fail: a torn write is visible for
    the moment between its short write and the cut back, so only `lines_of`, read once the
    writer is idle or stopped, judges that no torn line remains."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return text.count("\n")


def gaps(calls: list[tuple[str, float]]) -> list[float]:
    """Seconds between consecutive handler calls for the same event."""
    by_event: dict[str, list[float]] = defaultdict(list)
    for event_id, at in calls:
        by_event[event_id].append(at)
    return [b - a for times in by_event.values() for a, b in pairwise(times)]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        yield disk


class TestOnARealFullDisk:
    def test_a_full_tmpfs_under_handled_jsonl_tears_no_line_and_retries_after_the_backoff(
        self, tmp_path: Path, tmpfs: Path
    ) -> None:
        # 15 of the 16 pages are taken: about a dozen records fit, then writes come up short
        # and fail with ENOSPC.
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * 15 * 4096)
        state = tmp_path / "state"
        state.mkdir()
        (state / "handled.jsonl").symlink_to(tmpfs / "handled.jsonl")
        port = free_port()
        env = base_env(tmp_path, port)
        # The handler calls show the retries; with the vehicle state store on, the inbox would
        # (rightly) not run a completed handler again (test_vehicle_state_processing.py).
        env.update(TEST_CALLS=str(tmp_path / "calls.jsonl"), LOG_LEVEL="WARNING",
                   MAX_DELIVERY_COUNT="50", RETRY_BACKOFF_BASE_SECONDS=str(BACKOFF),
                   RETRY_BACKOFF_MAX_SECONDS=str(BACKOFF), VEHICLE_STATE_STORE="off")
        calls_path = tmp_path / "calls.jsonl"

        def calls() -> list[tuple[str, float]]:
            text = calls_path.read_text() if calls_path.exists() else ""
            return [(c["eventId"], c["at"]) for c in map(json.loads, text.splitlines())]

        events = [state_event(eventId=f"record-{i:03d}") for i in range(30)]
        with host_process([sys.executable, "-m", "tests.hanging_host"], env, port):
            for event in events:
                body = encode(event)
                assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            # The disk is full: deliveries fail and come back.
            wait_until(lambda: len(calls()) >= len(events) + 10, timeout=120)
            filler.unlink()  # space is back
            # Waiting reads only whole lines: a failing write may be between its short write
            # and the cut back right now. Tearing is judged below, once the host has stopped.
            wait_until(lambda: whole_lines(state / "handled.jsonl") >= len(events),
                       timeout=120)

        records = lines_of(state / "handled.jsonl")
        assert sorted(r["eventId"] for r in records) == [e["eventId"] for e in events]
        assert {r["outcome"] for r in records} == {"handled"}
        assert any(r["deliveryCount"] > 1 for r in records)
        assert gaps(calls()) and min(gaps(calls())) >= BACKOFF


class TestWithAFaultAtTheWrite:
    def test_writes_that_fail_midway_tear_no_line_and_retry_after_the_backoff(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[tuple[str, float]] = []
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def record(event: Event, context: HandlerContext) -> None:
            calls.append((event.event_id, time.monotonic()))

        # As above: the handler calls show the retries, so no inbox.
        env = local_env(tmp_path / "state", MAX_DELIVERY_COUNT="50",
                        RETRY_BACKOFF_BASE_SECONDS=str(BACKOFF),
                        RETRY_BACKOFF_MAX_SECONDS=str(BACKOFF), VEHICLE_STATE_STORE="off")
        events = [state_event() for _ in range(20)]
        with RunningHost(env, registry=registry) as host:
            log = host.runtime.handled_log
            assert isinstance(log, adapters.HandledLog)
            real_write = os.write
            failures = {"left": 25}

            def full_disk(fd: int, data: bytes | memoryview) -> int:
                if fd != log._fd or failures["left"] <= 0:
                    return real_write(fd, data)
                failures["left"] -= 1
                if failures["left"] % 2:
                    return real_write(fd, bytes(data[: len(data) // 3]))  # a short write
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr("shared.local.adapters.os.write", full_disk)
            for event in events:
                body = encode(event)
                assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: whole_lines(log.path) >= len(events), timeout=120)
            monkeypatch.undo()

        records = lines_of(log.path)
        assert sorted(r["eventId"] for r in records) == sorted(e["eventId"] for e in events)
        assert failures["left"] == 0 and any(r["deliveryCount"] > 1 for r in records)
        assert gaps(calls) and min(gaps(calls)) >= BACKOFF

