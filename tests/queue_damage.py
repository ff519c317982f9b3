"""Damaging the local queue's files on disk, for the fault tests of the queue file and its
write-ahead log: a real host acknowledges events, is stopped, its file is damaged, and the next
start is judged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .host_process import REPO, base_env, free_port, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event

HOST = [sys.executable, "-m", "shared.local"]


def acknowledge_events(
    tmp_path: Path, count: int, *, stop_with: signal.Signals
) -> tuple[dict[str, str], list[str], int]:
    """A host that only accepts (`--workers 0`) acknowledges `count` events (200 each) and is
    stopped with `stop_with`. The environment to start it again, the eventIds, and the host's
    exit status."""
    port = free_port()
    env = base_env(tmp_path, port)
    env["LOG_LEVEL"] = "WARNING"  # the host's stdout is a pipe nobody reads until the end
    ids = []
    with host_process([*HOST, "--workers", "0"], env, port) as proc:
        for _ in range(count):
            event = state_event()
            body = encode(event)
            assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            ids.append(event["eventId"])
        os.killpg(proc.pid, stop_with)
        status = proc.wait(30)
    return env, ids, status


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """`data` written over the file's bytes at `offset`, in place, as a bad sector would."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def start_refused(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The host started on the damaged files; it must refuse (exit status 3)."""
    result = subprocess.run(HOST, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    return result
