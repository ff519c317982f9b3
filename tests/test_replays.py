"""Replays: a captured, correctly signed delivery sent again is never processed again.

Inside the queue's duplicate-detection window it is a duplicate (tests/test_http_contract.py
TestDuplicates); after it, its `meta.deliveredAt` is older than MAX_DELIVERY_AGE_SECONDS, so it
is stale: still answered 200 (the bytes are authentic), stored, and dead-lettered with reason
`StaleDelivery`, never given to handlers. The age is measured when the receiver accepts the
event, not when the processor gets to it. Over real HTTP against the local host, with the
dead-letter queue read through the real CLI in its own process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.handlers import HandlerRegistry
from shared.local.adapters import LocalQueuePublisher
from shared.runtime import Runtime
from shared.spill import SpillingPublisher

from .support import (
    WEBHOOK,
    RunningHost,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
HOUR_MS = 3600 * 1000


class Recorder:
    """Every handler call, by eventId: the proof that handlers never saw an event."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.registry = HandlerRegistry()

        @self.registry.on("VEHICLE_STATE")
        def record(event: Any, context: Any) -> None:
            self.seen.append(event.event_id)


def cli_json(env: dict[str, str], *argv: str) -> Any:
    """`python -m shared.cli ... --json` as an operator runs it, against the same state."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SMARTCAR_", "LOCAL_STATE", "ServiceBusConnection", "KEY_VAULT"))}
    full.update(env)
    result = subprocess.run([sys.executable, "-m", "shared.cli", *argv, "--json"], cwd=ROOT,
                            env=full, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def delivered(offset_ms: int, *, iso: bool = False) -> dict[str, Any]:
    """A signed-to-be VEHICLE_STATE whose deliveredAt is now + offset_ms."""
    event = state_event()
    at = int(time.time() * 1000) + offset_ms
    event["meta"]["deliveredAt"] = (
        datetime.fromtimestamp(at / 1000, UTC).isoformat().replace("+00:00", "Z") if iso else at
    )
    return event


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return local_env(tmp_path)


@pytest.fixture
def host(env: dict[str, str], recorder: Recorder) -> Any:
    with RunningHost(env, registry=recorder.registry) as running:
        yield running


def not_handled(host: RunningHost, event_id: str) -> bool:
    return not any(r["eventId"] == event_id and r["outcome"] in {"handled", "unhandled"}
                   for r in host.handled())


class TestStaleDeliveries:
    @pytest.mark.parametrize(
        ("offset_ms", "iso", "description"),
        [(-2 * HOUR_MS, False, r"was 720\d s old when received at .*, over "
                               r"MAX_DELIVERY_AGE_SECONDS \(900 s\)"),
         (-2 * HOUR_MS, True, r"was 720\d s old when received at .*, over "
                              r"MAX_DELIVERY_AGE_SECONDS \(900 s\)")],
        ids=["two-hours-old-epoch-ms", "two-hours-old-iso-8601"],
    )
    def test_stale_delivery_is_answered_200_dead_lettered_and_never_handled(
        self, host: RunningHost, env: dict[str, str], recorder: Recorder, offset_ms: int,
        iso: bool, description: str,
    ) -> None:
        # The incident: a delivery captured two hours ago (past the one-hour duplicate window)
        # was re-sent and processed again. Now it is kept, but only in the DLQ.
        stale = delivered(offset_ms, iso=iso)
        body = encode(stale)
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.status == 200
        assert resp.json()["eventId"] == stale["eventId"]
        # A fresh event behind it shows the processor has moved past the stale one.
        fresh = state_event()
        fresh_body = encode(fresh)
        assert host.post(WEBHOOK, fresh_body, signed_headers(fresh_body)).status == 200
        wait_until(lambda: fresh["eventId"] in recorder.seen)

        (entry,) = wait_until(lambda: cli_json(env, "dlq", "list"))
        assert entry["eventId"] == stale["eventId"]
        assert entry["reason"] == "StaleDelivery"
        assert re.search(description, entry["description"]), entry["description"]
        assert stale["eventId"] not in recorder.seen
        assert not_handled(host, stale["eventId"])
        # handled.jsonl records it as what it is: a final outcome, dead-lettered (the line
        # follows the dead-lettering).
        (record,) = wait_until(
            lambda: [r for r in host.handled() if r["eventId"] == stale["eventId"]])
        assert (record["outcome"], record["reason"]) == ("dead_lettered", "StaleDelivery")
        shown = cli_json(env, "dlq", "show", str(entry["sequenceNumber"]))
        assert shown["body"] == body.decode()

    @pytest.mark.parametrize(
        ("offset_ms", "iso"),
        [(-14 * 60 * 1000, False), (4 * 60 * 1000, False), (-60 * 1000, True),
         (HOUR_MS, False), (30 * 24 * HOUR_MS, True)],
        ids=["fourteen-minutes-old", "four-minutes-ahead", "a-minute-old-iso-8601",
             "one-hour-ahead", "thirty-days-ahead-iso-8601"],
    )
    def test_a_delivery_within_the_limits_is_handled(
        self, host: RunningHost, recorder: Recorder, offset_ms: int, iso: bool
    ) -> None:
        event = delivered(offset_ms, iso=iso)
        body = encode(event)
        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: event["eventId"] in recorder.seen)
        assert host.dead_letters() == []

    def test_an_event_without_delivered_at_is_processed_as_before(
        self, host: RunningHost, recorder: Recorder
    ) -> None:
        event = state_event()
        del event["meta"]["deliveredAt"]
        body = encode(event)
        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: event["eventId"] in recorder.seen)

    def test_the_limit_is_max_delivery_age_seconds(self, tmp_path: Path) -> None:
        recorder = Recorder()
        with RunningHost(local_env(tmp_path, MAX_DELIVERY_AGE_SECONDS="300"),
                         registry=recorder.registry) as host:
            event = delivered(-400 * 1000)  # fresh under the default 900 s, stale under 300 s
            body = encode(event)
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            (dead,) = wait_until(host.dead_letters)
            assert dead.dead_letter_reason == "StaleDelivery"
            assert "MAX_DELIVERY_AGE_SECONDS (300 s)" in (dead.dead_letter_description or "")
            assert recorder.seen == []

    def test_a_replayed_stale_dead_letter_is_processed(
        self, host: RunningHost, env: dict[str, str], recorder: Recorder
    ) -> None:
        # Replaying is the operator's decision (after a wrong clock, say): the event is handled,
        # although `dlq replay` keeps the receipt time that made it stale. A captured delivery
        # re-sent over HTTP is still stale: only the operator's replay skips the check.
        event = delivered(-2 * HOUR_MS)
        body = encode(event)
        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        (entry,) = wait_until(lambda: cli_json(env, "dlq", "list"))
        assert entry["reason"] == "StaleDelivery" and recorder.seen == []
        cli_json(env, "dlq", "replay", str(entry["sequenceNumber"]))
        wait_until(lambda: event["eventId"] in recorder.seen)
        assert cli_json(env, "dlq", "list") == []
        assert host.post(WEBHOOK, body, signed_headers(body)).json()["status"] == "duplicate"


class _BrokenQueue:
    """The queue boundary during an outage: every send fails."""

    def send_many(self, *args: Any, **kwargs: Any) -> list[bool]:
        raise OSError("database is locked")


class TestAgeIsMeasuredAtReceipt:
    def test_a_spilled_event_re_driven_20_minutes_later_is_handled_normally(
        self, tmp_path: Path
    ) -> None:
        # The queue is down when the event arrives a minute after Smartcar sent it: it is
        # spilled and answered 200. The re-drive runs 20 minutes after receipt (the receiver's
        # clock is set 20 minutes back, so for it receipt was 20 minutes ago), by when the
        # event is 21 minutes past its deliveredAt: older than MAX_DELIVERY_AGE_SECONDS had it
        # been measured at processing. It was not stale when received, so it is handled.
        recorder = Recorder()
        twenty_minutes = 20 * 60

        def outage_at_receipt(runtime: Runtime) -> None:
            assert runtime.spill is not None
            runtime.publisher = SpillingPublisher(LocalQueuePublisher(_BrokenQueue()),
                                                  runtime.spill)
            runtime.clock = lambda: time.time() - twenty_minutes

        # Every send to the queue fails, so the event reaches the processor only through the
        # spill store and the re-drive timer (which sends to the queue that works again).
        event = delivered(-(twenty_minutes + 60) * 1000)
        body = encode(event)
        with RunningHost(local_env(tmp_path), registry=recorder.registry,
                         customize=outage_at_receipt, timer_interval=0.2) as host:
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: event["eventId"] in recorder.seen, timeout=60)
            assert host.dead_letters() == []
            # The handler has run; its outcome line follows once it returned.
            (record,) = wait_until(
                lambda: [r for r in host.handled() if r["eventId"] == event["eventId"]])
            assert record["outcome"] == "handled"
        assert list((tmp_path / "spill").glob("*.json")) == []
