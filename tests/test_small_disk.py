"""Fault tests: the state directory on a 2 MB disk (a real tmpfs), with a real host process.

The write-ahead log used to fill such a disk before SQLite's automatic checkpoint (1,000 pages,
4 MB) ever ran: after about fifty events every POST got 503, for good, while /api/health said
ok. Now the WAL is bounded to a part of its disk, a full disk shows in /api/health, and once
space is freed the host stores again without a restart.

Mounting needs root and mount permission: without them the tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry

from .host_process import base_env, free_port, handled_ids, host_process
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


def post(port: int) -> tuple[int, str]:
    event = state_event()
    body = encode(event)
    return http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status, event["eventId"]


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def env_on(disk: Path, tmp_path: Path, port: int) -> dict[str, str]:
    env = base_env(tmp_path, port)
    env.update(LOCAL_STATE_DIR=str(disk / "state"), LOG_LEVEL="CRITICAL",
               RETRY_BACKOFF_BASE_SECONDS="0.05", RETRY_BACKOFF_MAX_SECONDS="0.2",
               MAX_DELIVERY_COUNT="100")
    return env


class TestATwoMegabyteStateDisk:
    def test_the_wal_never_fills_it(self, tmp_path: Path, small_disk: Path) -> None:
        port = free_port()
        accepted: list[str] = []
        with host_process([sys.executable, "-m", "shared.local"],
                          env_on(small_disk, tmp_path, port), port):
            for _ in range(800):
                status, event_id = post(port)
                assert status == 200, f"503 after {len(accepted)} events"
                accepted.append(event_id)
            wait_until(lambda: len(handled_ids(small_disk / "state")) == len(accepted),
                       timeout=60)
            assert http_request(port, "GET", "/api/health").json() == {"status": "ok"}
        wal = small_disk / "state" / "queue.sqlite3-wal"
        assert wal.stat().st_size < 1024 * 1024

    def test_a_full_disk_shows_in_health_and_the_host_recovers_once_space_is_freed(
        self, tmp_path: Path, small_disk: Path
    ) -> None:
        port = free_port()
        state = small_disk / "state"
        accepted: list[str] = []
        with host_process([sys.executable, "-m", "shared.local"],
                          env_on(small_disk, tmp_path, port), port):
            for _ in range(20):
                status, event_id = post(port)
                assert status == 200
                accepted.append(event_id)
            filler = small_disk / "filler"
            fill(filler)
            statuses = []
            for _ in range(200):
                status, event_id = post(port)
                statuses.append(status)
                if status == 200:
                    accepted.append(event_id)
                if status == 503:
                    break
            assert statuses[-1] == 503, "the full disk never refused a store"
            health = http_request(port, "GET", "/api/health")
            assert (health.status, health.json()) == (503, {"status": "unavailable"})

            filler.unlink()  # space is back: no restart
            status, event_id = post(port)
            assert status == 200
            accepted.append(event_id)
            # The queue workers' next receive succeeds too (they retry every poll).
            wait_until(lambda: http_request(port, "GET", "/api/health").status == 200,
                       timeout=10)
            wait_until(lambda: set(accepted) <= set(handled_ids(state)), timeout=60)
        handled = [json.loads(line) for line in (state / "handled.jsonl").read_text().splitlines()]
        # Processed, none lost or dead-lettered ("unhandled": a reading no newer than the
        # stored one fires no on_change handler).
        assert {r["outcome"] for r in handled} <= {"handled", "unhandled"}


def test_a_failed_delivery_that_cannot_be_abandoned_on_a_full_disk_is_not_held_for_its_lock(
    tmp_path: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler fails while the disk is full, so the queue cannot write the abandon either.
    The host tries the abandon again until it goes through, once space is back: the event is
    handled within seconds, not after its lock (here five minutes) expires."""
    filler = small_disk / "filler"
    stop_filling = threading.Event()

    def keep_full() -> None:  # whatever SQLite frees (a checkpoint) is taken back at once
        while not stop_filling.is_set():
            with contextlib.suppress(OSError):
                fill(filler)
            time.sleep(0.001)
        filler.unlink()

    registry = HandlerRegistry()
    calls: list[str] = []

    @registry.on("VEHICLE_STATE")
    def fail_once_on_a_full_disk(event: Event, context: HandlerContext) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            threading.Thread(target=keep_full, daemon=True).start()
            threading.Timer(1.0, stop_filling.set).start()
            time.sleep(0.05)
            raise RuntimeError("handler failed while the disk was full")

    body = encode(state_event(eventId="evt-full"))
    env = local_env(small_disk / "state", VEHICLE_STATE_STORE="off", MAX_DELIVERY_COUNT="100")
    caplog.set_level(logging.WARNING, logger="shared.local.host")
    with RunningHost(env, registry=registry, lock_duration=300.0) as running:
        assert running.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: [r["eventId"] for r in running.handled()] == ["evt-full"],
                   timeout=30)
    assert calls == ["evt-full", "evt-full"]
    assert any("cannot settle a delivery" in r.getMessage() for r in caplog.records)
