"""Incident: the process dies between the store's write and the end of the handlers.

Fault: the local host (a real process, `tests.crash_host`) receives a signed VEHICLE_STATE
over loopback HTTP; the store applies it; the `on_change` handler starts and the process is
killed with SIGKILL (no finally blocks, no lock release, no flush). What must hold after a
restart: the restarted host hands the same change to `on_change` again, then records the event
as processed and keeps nothing pending.

The local host commits the store's writes shortly after they are made, and always before it
completes a message. A kill after that commit finds the change in the store, pending for its
event (the outbox hands it over again); a kill before it loses the write together with the
delivery, which is redelivered and applied again. Both end the same way.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

from shared.local.vehicle_state import FILE_NAME

from .host_process import base_env, free_port, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until
from .test_function_timeout import processed_ids

HOST = [sys.executable, "-m", "tests.crash_host", "--lock-duration", "2"]


def calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def store_rows(state: Path, event_id: str) -> tuple[Any, Any]:
    with sqlite3.connect(f"file:{state / FILE_NAME}?mode=ro", uri=True) as conn:
        signal_row = conn.execute(
            "SELECT json_extract(signals, '$.\"tractionbattery-stateofcharge\"') FROM vehicles "
            "WHERE json_extract(signals, '$.\"tractionbattery-stateofcharge\"') IS NOT NULL"
        ).fetchone()
        event_row = conn.execute(
            "SELECT pending IS NOT NULL, processed_at FROM events WHERE event_id = ?",
            (event_id,)).fetchone()
    conn.close()
    return signal_row, event_row


def killed_in_its_handler(tmp_path: Path, crash_after: str) -> tuple[int, dict[str, str],
                                                                     dict[str, Any]]:
    """Start the crash host, deliver one event with a charge, and wait until the `on_change`
    handler has killed the host `crash_after` seconds into its call: (port, env, event)."""
    port = free_port()
    env = base_env(tmp_path, port)
    env.update(TEST_CALLS=str(tmp_path / "calls.jsonl"), TEST_CRASH=crash_after,
               LOG_LEVEL="WARNING")
    event = state_event()
    body = encode(event)
    with host_process(HOST, env, port) as proc:
        # The host hands a stored event straight to a free worker, so the kill can beat the
        # 200 out of the door (Smartcar would retry then); the queue had committed it either
        # way, as the restart shows.
        try:
            status = http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status
        except ConnectionError:
            status = 200
        assert status == 200
        assert proc.wait(timeout=60) == -signal.SIGKILL
    del env["TEST_CRASH"]
    return port, env, event


def restarted_until_processed(port: int, env: dict[str, str], state: Path,
                              event_id: str) -> int:
    """Restart the host until it has processed the event and committed its inbox record
    (the record is committed before the message is completed; the host is killed when this
    returns): the restarted host's pid."""
    with host_process(HOST, env, port) as proc:
        wait_until(lambda: processed_ids(state) == [event_id], timeout=60)
        wait_until(lambda: (store_rows(state, event_id)[1] or (1,))[0] == 0, timeout=15)
        return proc.pid


def test_a_kill_between_store_and_handler_fires_on_change_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # The handler dies a second after it started: the store has committed the change then.
    port, env, event = killed_in_its_handler(tmp_path, "1")
    (first,) = calls(tmp_path / "calls.jsonl")
    assert (first["eventId"], first["previous"], first["current"]) == (event["eventId"], None, 78)
    stored, event_row = store_rows(state, event["eventId"])
    assert json.loads(stored[0])["value"] == "78"  # canonical JSON text of the value
    assert event_row == (1, None)  # changes pending, not processed
    assert processed_ids(state) == []

    pid = restarted_until_processed(port, env, state, event["eventId"])
    second = calls(tmp_path / "calls.jsonl")[1]
    assert second["pid"] == pid != first["pid"]
    assert (second["eventId"], second["previous"], second["current"]) == (
        event["eventId"], None, 78)
    assert len(calls(tmp_path / "calls.jsonl")) == 2
    _, event_row = store_rows(state, event["eventId"])
    assert event_row[0] == 0 and event_row[1] is not None  # processed, nothing pending


def test_a_kill_before_the_stores_commit_fires_on_change_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # The handler dies at once, possibly before the store's write was committed.
    port, env, event = killed_in_its_handler(tmp_path, "0")
    assert processed_ids(state) == []

    restarted_until_processed(port, env, state, event["eventId"])
    first, second = calls(tmp_path / "calls.jsonl")
    assert first["pid"] != second["pid"]
    for call in (first, second):
        assert (call["eventId"], call["previous"], call["current"]) == (
            event["eventId"], None, 78)
    stored, event_row = store_rows(state, event["eventId"])
    assert json.loads(stored[0])["value"] == "78"
    assert event_row[0] == 0 and event_row[1] is not None  # processed, nothing pending
