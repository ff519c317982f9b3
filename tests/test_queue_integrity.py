"""Fault tests: a damaged queue file. Each is an incident report: the fault, how it is
injected into the real file of a real host process, and what must hold afterwards.

Common ground: events are acknowledged (200) by `python -m shared.local --workers 0` (it
accepts but never processes), the host is stopped cleanly, the file is damaged on disk, and
the host is started again. Nothing acknowledged may silently disappear: either the host
refuses to start and says which file and how to recover, or the damage is isolated to the
rows it hit and every other event is processed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from shared.local.queue_open import QUEUE_FILE
from shared.local.queue_rows import CORRUPT_MESSAGE
from shared.local.queue_schema import INITIALISED_MARKER

from .host_process import REPO, base_env, free_port, handled_ids, host_process
from .queue_damage import HOST, acknowledge_events, overwrite, start_refused
from .support import http_request, wait_until


def accept_events(tmp_path: Path, count: int) -> tuple[dict[str, str], list[str]]:
    """Run a host that only accepts, have it acknowledge `count` events, stop it cleanly
    (the write-ahead log is checkpointed into the file). The environment and the eventIds."""
    env, ids, status = acknowledge_events(tmp_path, count, stop_with=signal.SIGINT)
    assert status == 0
    queue = tmp_path / "state" / QUEUE_FILE
    assert not Path(f"{queue}-wal").exists() or Path(f"{queue}-wal").stat().st_size == 0
    return env, ids


class TestDamageFoundAtStart:
    def test_a_queue_truncated_to_0_bytes_is_refused_not_started_empty(
        self, tmp_path: Path
    ) -> None:
        env, _ = accept_events(tmp_path, 20)
        queue = tmp_path / "state" / QUEUE_FILE
        os.truncate(queue, 0)

        result = start_refused(env)

        assert f"local queue {queue} is empty (0 bytes)" in result.stderr
        assert f"mv {queue} {queue}.damaged" in result.stderr
        assert ".recover" in result.stderr
        assert queue.stat().st_size == 0  # no new empty database was created over it

    def test_a_vanished_queue_file_is_refused_and_deleting_the_marker_starts_afresh(
        self, tmp_path: Path
    ) -> None:
        env, _ = accept_events(tmp_path, 3)
        state = tmp_path / "state"
        (state / QUEUE_FILE).unlink()

        result = start_refused(env)
        assert f"local queue {state / QUEUE_FILE} is missing" in result.stderr
        assert f"deleting {state / INITIALISED_MARKER}" in result.stderr

        (state / INITIALISED_MARKER).unlink()  # the operator's decision: start empty
        port = free_port()
        env["PORT"] = str(port)
        with host_process(HOST, env, port):
            assert http_request(port, "GET", "/api/health").status == 200

    def test_64_kb_of_garbage_in_the_middle_is_refused_with_what_quick_check_found(
        self, tmp_path: Path
    ) -> None:
        env, _ = accept_events(tmp_path, 200)
        queue = tmp_path / "state" / QUEUE_FILE
        size = queue.stat().st_size
        assert size > 4 * 65536
        overwrite(queue, size // 2, os.urandom(65536))

        result = start_refused(env)

        assert f"local queue {queue} is damaged" in result.stderr
        assert "Acknowledged events may be in it" in result.stderr
        assert "Traceback" not in result.stderr

    def test_the_last_1000_bytes_cut_off_is_refused_at_start(self, tmp_path: Path) -> None:
        env, _ = accept_events(tmp_path, 100)
        queue = tmp_path / "state" / QUEUE_FILE
        os.truncate(queue, queue.stat().st_size - 1000)

        result = start_refused(env)

        assert f"local queue {queue} is damaged: PRAGMA quick_check found" in result.stderr


class TestDamageIsolatedToItsRow:
    def test_a_row_whose_properties_read_as_nul_bytes_is_dead_lettered_alone(
        self, tmp_path: Path
    ) -> None:
        """The damage quick_check cannot see (text inside a record) is found when the row is
        received: that row goes to the dead-letter queue as CorruptMessage, the rest flows."""
        env, ids = accept_events(tmp_path, 30)
        state = tmp_path / "state"
        queue = state / QUEUE_FILE
        with sqlite3.connect(f"file:{queue}?mode=ro", uri=True) as conn:
            seq, properties = conn.execute(
                "SELECT sequence_number, properties FROM messages WHERE message_id = ?",
                (ids[10],),
            ).fetchone()
        conn.close()
        raw = queue.read_bytes()
        offset = raw.find(properties.encode("utf-8"))
        assert offset > 0 and raw.count(properties.encode("utf-8")) == 1
        overwrite(queue, offset, b"\0" * 16)  # what a zero-filled sector looks like

        port = free_port()
        env["PORT"] = str(port)
        with host_process(HOST, env, port):
            wait_until(lambda: len(handled_ids(state)) == len(ids) - 1, timeout=60)
            assert http_request(port, "GET", "/api/health").status == 200
        assert sorted(handled_ids(state)) == sorted(i for i in ids if i != ids[10])

        listing = subprocess.run(
            [sys.executable, "-m", "shared.cli", "--json", "dlq", "list"], env=env,
            capture_output=True, text=True, timeout=60, check=True,
            cwd=REPO,
        )
        (entry,) = json.loads(listing.stdout)
        assert entry["messageId"] == ids[10]
        assert entry["reason"] == CORRUPT_MESSAGE
        assert "cannot be decoded (JSONDecodeError at character 0)" in entry["description"]
        assert entry["sequenceNumber"] == seq


class TestHealthWhileRunning:
    def test_health_answers_503_while_the_queue_cannot_be_read_and_200_after(
        self, tmp_path: Path
    ) -> None:
        """Another process holds the queue's write lock and never lets go (a `sqlite3` shell
        left inside a transaction): receives fail after the busy timeout, so health must stop
        saying ok, and say ok again once receives succeed."""
        port = free_port()
        env = base_env(tmp_path, port)
        env["PORT"] = str(port)
        queue = tmp_path / "state" / QUEUE_FILE
        with host_process(HOST, env, port):
            blocker = sqlite3.connect(queue, isolation_level=None, timeout=30)
            try:
                blocker.execute("BEGIN IMMEDIATE")
                wait_until(lambda: http_request(port, "GET", "/api/health").status == 503,
                           timeout=120, interval=0.5)
                assert http_request(port, "GET", "/api/health").json() == {
                    "status": "unavailable"
                }
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            wait_until(lambda: http_request(port, "GET", "/api/health").status == 200,
                       timeout=120, interval=0.5)
