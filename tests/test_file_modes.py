"""Payloads (vehicle locations) on disk are the user's alone: after a real run of the local host
and the CLI, the state directory is 0700 and every file in it 0600, whatever created it (our
code, SQLite's -wal and -shm, or a store added later). The test lists the directory rather than
naming files, so a new file is checked the day it appears.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .host_process import REPO, base_env, free_port, handled_ids, host_process
from .support import encode, http_request, signed_headers, state_event, wait_until

WEBHOOK = "/api/webhooks/smartcar"


def modes(state: Path) -> dict[str, str]:
    """Every entry under `state` (itself included) with its permission bits."""
    found = {".": oct(stat.S_IMODE(state.stat().st_mode))}
    for path in state.rglob("*"):
        found[str(path.relative_to(state))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def wrong(state: Path) -> dict[str, str]:
    return {name: mode for name, mode in modes(state).items()
            if mode != ("0o700" if (state / name).is_dir() else "0o600")}


def test_the_state_directory_and_every_file_in_it_are_private(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, port)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # left open to others by an earlier run
    os.chmod(state, 0o755)
    events = [state_event() for _ in range(5)]
    with host_process([sys.executable, "-m", "shared.local"], env, port) as proc:
        for event in events:
            body = encode(event)
            assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
        body = b'{"eventType": "VEHICLE_STATE", not json'  # signed, then dead-lettered
        assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: len(handled_ids(state)) >= len(events), timeout=30)
        cli = subprocess.run([sys.executable, "-m", "shared.cli", "dlq", "list"], cwd=REPO,
                             env=env, capture_output=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        running = modes(state)
        # While the host runs, SQLite's write-ahead log and shared memory are there too.
        assert {"queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm",
                "handled.jsonl"} <= set(running), running
        assert wrong(state) == {}, running
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert wrong(state) == {}, modes(state)


def test_the_cli_makes_an_existing_state_directory_private(tmp_path: Path) -> None:
    """The CLI creates the queue and the vehicle store (and their -wal, -shm) in
    LOCAL_STATE_DIR too: like the local host, it first makes the directory 0700, also when an
    earlier run left it open to others."""
    env = base_env(tmp_path, free_port())
    state = tmp_path / "state"
    for command in (["dlq", "list"], ["vehicles", "list"]):
        state.mkdir(mode=0o755, exist_ok=True)
        os.chmod(state, 0o755)  # left open to others by an earlier run
        cli = subprocess.run([sys.executable, "-m", "shared.cli", *command], cwd=REPO, env=env,
                             capture_output=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert wrong(state) == {}, (command, modes(state))


def test_a_command_run_in_process_leaves_the_umask_to_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m shared.cli` sets the umask as it starts; the commands only make the state
    directory private. Called as a library (tests, tools), they leave the caller's umask."""
    import io

    from shared.cli.commands import main

    monkeypatch.setenv("LOCAL_STATE_DIR", str(tmp_path / "state"))
    before = os.umask(0o022)
    try:
        assert main(["dlq", "list"], out=io.StringIO(), err=io.StringIO()) == 0
        assert main(["vehicles", "list"], out=io.StringIO(), err=io.StringIO()) == 0
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


@pytest.mark.parametrize("command", [["stats"], ["dlq", "list"], ["vehicles", "list"]])
def test_a_state_directory_that_cannot_be_made_private_is_a_clear_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """A file where LOCAL_STATE_DIR should be: one line saying so (one JSON document with
    --json), exit 1, no traceback."""
    import io
    import json

    from shared.cli.commands import main

    in_the_way = tmp_path / "state"
    in_the_way.write_text("not a directory")
    monkeypatch.setenv("LOCAL_STATE_DIR", str(in_the_way))
    out, err = io.StringIO(), io.StringIO()
    assert main([*command, "--json"], out=out, err=err) == 1
    assert json.loads(out.getvalue()) == {
        "error": f"cannot make the state directory {in_the_way} private (created, 0700): "
                 "File exists"}
