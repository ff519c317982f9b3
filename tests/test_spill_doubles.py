"""Fault test: an event spilled although its queue send committed is not handled twice.

The incident: another process held the queue's write lock for six seconds. The host's send
waited for it (SQLite's busy timeout), the receiver's five-second budget ran out, the event was
spilled and answered 200, and then the send committed all the same. Re-driven more than an hour
later (after a restart, past the duplicate window), the spilled copy was stored again and
handled a second time. Real processes and files: the lock is held by a `sqlite3` connection in
another process, and the later re-drive runs in a host whose clock libfaketime puts 2 h ahead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

from . import faketime
from .host_process import base_env, free_port, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def calls(path: Path) -> list[str]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["eventId"] for line in text.splitlines()]


def test_a_spilled_event_whose_send_committed_is_not_handled_again_after_the_window(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = base_env(tmp_path, port)
    calls_path = tmp_path / "calls.jsonl"
    env.update(TEST_CALLS=str(calls_path), LOG_LEVEL="WARNING")
    state = tmp_path / "state"
    host = [sys.executable, "-m", "tests.hanging_host", "--timer-interval"]
    event = state_event(eventId="record-spilled-and-stored")
    # No re-drive runs in this first host (it stops before its timer's first run).
    with host_process([*host, "600"], env, port):
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(state / QUEUE_FILE), "6"],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        body = encode(event)
        started = time.monotonic()
        resp = http_request(port, "POST", WEBHOOK, body, signed_headers(body))
        assert resp.status == 200 and time.monotonic() - started >= 5  # spilled
        assert len(list((state / "spill").glob("*.json"))) == 1
        assert holder.wait(20) == 0  # the lock is released: the send commits
        wait_until(lambda: calls(calls_path) == [event["eventId"]], timeout=30)
        # Its spilled copy was written (the 200 came from the spill) and is dropped once the
        # send is known to have committed.
        wait_until(lambda: not list((state / "spill").glob("*.json")), timeout=15)
        with LocalQueue(state / QUEUE_FILE) as queue:  # completed, not merely handled
            wait_until(lambda: queue.stats()["active"] == 0, timeout=15)
    # Restarted two hours later: past the duplicate window, the re-drive runs again.
    later = {**env, **faketime.offset_env("+2h")}
    with host_process([*host, "0.5"], later, port):
        time.sleep(3)
    assert calls(calls_path) == [event["eventId"]]
    assert list((state / "spill").glob("*.json")) == []
