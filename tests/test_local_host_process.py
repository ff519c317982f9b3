"""The local host as users run it: a separate process, `make run`, and `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthy(port: int) -> bool:
    try:
        return http_request(port, "GET", "/api/health").status == 200
    except OSError:
        return False


@contextmanager
def host_process(cmd: list[str], env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, timeout=60)
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"host exited with {proc.returncode}:\n{out}")
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def base_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "LOCAL_STATE"))}
    env.update(PORT=str(port), LOCAL_STATE_DIR=str(tmp_path / "state"),
               SMARTCAR_MANAGEMENT_TOKEN="amt", PYTHONUNBUFFERED="1")
    return env


def handled_ids(state: Path) -> list[str]:
    path = state / "handled.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["eventId"] for line in path.read_text().splitlines() if line]


class TestMakeRun:
    @pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(),
                        reason="make run reuses the .venv that make test created")
    def test_make_run_serves_health_on_port_and_prints_the_send_command(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = base_env(tmp_path, port)
        del env["SMARTCAR_MANAGEMENT_TOKEN"]
        with host_process(["make", "--no-print-directory", "run"], env, port) as proc:
            assert http_request(port, "GET", "/api/health").json() == {"status": "ok"}
            os.killpg(proc.pid, signal.SIGINT)
            out = proc.communicate(timeout=20)[0].decode()
        assert f"http://127.0.0.1:{port}/api/webhooks/smartcar" in out
        assert "development token" in out
        assert "-m shared.cli send --url" in out


class TestDurability:
    def test_acknowledged_events_survive_kill_9_and_are_processed_after_restart(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = base_env(tmp_path, port)
        cmd = [sys.executable, "-m", "shared.local"]
        events = [state_event() for _ in range(20)]
        with host_process([*cmd, "--workers", "0"], env, port) as proc:  # accepts, never processes
            for event in events:
                body = encode(event)
                assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        state = tmp_path / "state"
        assert handled_ids(state) == []
        with host_process(cmd, env, port):
            wait_until(lambda: len(handled_ids(state)) == len(events), timeout=30)
        assert sorted(handled_ids(state)) == sorted(e["eventId"] for e in events)

    def test_invalid_settings_fail_fast_with_the_setting_named(self, tmp_path: Path) -> None:
        env = base_env(tmp_path, free_port())
        env["MAX_BODY_BYTES"] = "big"
        result = subprocess.run([sys.executable, "-m", "shared.local"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "MAX_BODY_BYTES must be a whole number, got 'big'" in result.stderr
