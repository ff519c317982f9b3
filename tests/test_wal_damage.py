"""Fault tests: the write-ahead log of a killed host is deleted or damaged before the restart.

After `kill -9` the acknowledged events may live only in `queue.sqlite3-wal`. SQLite replays
the valid frames of a WAL and silently ignores the rest, so without the acknowledged mark the
host started normally with the events of the lost frames gone. Each damage below is applied to
the real file of a real host process killed with SIGKILL; the next start must be refused,
naming the loss and how to recover, and following the advice must start the host again.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.local.ackmark import ACK_MARK_FILE
from shared.local.queue_open import QUEUE_FILE

from .host_process import handled_ids, host_process
from .queue_damage import HOST, acknowledge_events, overwrite, start_refused
from .support import http_request, wait_until

WAL_HEADER = 32
FRAME_HEADER = 24


def accept_then_kill(tmp_path: Path, count: int) -> tuple[dict[str, str], list[str], Path]:
    """A host that only accepts acknowledges `count` events and is killed with SIGKILL: they
    are in the WAL, not yet in the database file. The environment, eventIds and WAL path."""
    env, ids, _ = acknowledge_events(tmp_path, count, stop_with=signal.SIGKILL)
    wal = tmp_path / "state" / f"{QUEUE_FILE}-wal"
    assert wal.stat().st_size > WAL_HEADER, "the events should be in the WAL"
    return env, ids, wal


def page_size(wal: Path) -> int:
    return int.from_bytes(wal.read_bytes()[8:12], "big")


def delete(wal: Path) -> None:
    wal.unlink()


def truncate_to_half(wal: Path) -> None:
    os.truncate(wal, wal.stat().st_size // 2)


def zero_a_middle_frame(wal: Path) -> None:
    size = page_size(wal)
    frames = (wal.stat().st_size - WAL_HEADER) // (FRAME_HEADER + size)
    at = WAL_HEADER + (frames // 2) * (FRAME_HEADER + size)
    overwrite(wal, at, b"\0" * (FRAME_HEADER + size))


def random_header(wal: Path) -> None:
    overwrite(wal, 0, os.urandom(WAL_HEADER))


@pytest.mark.parametrize("damage", [delete, truncate_to_half, zero_a_middle_frame, random_header],
                         ids=lambda f: f.__name__)
def test_a_lost_or_damaged_wal_after_kill_9_is_refused_with_recovery_advice(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    env, ids, wal = accept_then_kill(tmp_path, 30)
    damage(wal)
    result = start_refused(env)
    (line,) = result.stderr.strip().splitlines()
    assert "has lost acknowledged events" in line
    assert f"events up to {len(ids)} were acknowledged" in line
    assert "write-ahead log" in line and "Smartcar will not send them again" in line
    mark = tmp_path / "state" / ACK_MARK_FILE
    assert f"delete {mark}" in line
    # The operator accepts the loss, as the advice says: the host starts on what is left.
    mark.unlink()
    port = int(env["PORT"])
    with host_process(HOST, env, port):
        wait_until(lambda: http_request(port, "GET", "/api/health").status == 200)
    assert set(handled_ids(tmp_path / "state")) < set(ids)


def test_an_intact_wal_after_kill_9_starts_and_every_event_is_handled(tmp_path: Path) -> None:
    env, ids, _ = accept_then_kill(tmp_path, 30)
    port = int(env["PORT"])
    with host_process(HOST, env, port):
        wait_until(lambda: len(handled_ids(tmp_path / "state")) == len(ids), timeout=30)
    assert sorted(handled_ids(tmp_path / "state")) == sorted(ids)
