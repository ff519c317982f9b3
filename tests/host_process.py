"""The local host as users run it, `python -m shared.local` in a process of its own, for the
tests that need a real process: kill -9, descriptor limits, full disks, damaged files."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# free_port is here too: a host process test takes its port, env and process from this module.
from .support import free_port, http_request, wait_until

__all__ = [
    "OPEN_FILES",
    "REPO",
    "base_env",
    "free_port",
    "handled_ids",
    "healthy",
    "host_process",
    "limit_open_files",
    "limited_host",
]

REPO = Path(__file__).resolve().parent.parent
#: The descriptor limit of the limited host (`ulimit -n 256`, macOS's default).
OPEN_FILES = 256


def healthy(port: int) -> bool:
    try:
        return http_request(port, "GET", "/api/health").status == 200
    except OSError:
        return False


@contextmanager
def host_process(
    cmd: list[str], env: dict[str, str], port: int
) -> Iterator[subprocess.Popen[bytes]]:
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


def limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@contextmanager
def limited_host(tmp_path: Path, *, header_timeout: float, idle_timeout: float,
                 body_timeout: float) -> Iterator[tuple[int, int]]:
    """(port, pid) of the host with one worker, in its own process with OPEN_FILES
    descriptors and these timeouts. Its output goes to a file (a pipe nobody reads could fill
    up and block it), shown if it exits; the test fails if it died while in use."""
    port = free_port()
    cmd = [sys.executable, "-m", "shared.local", "--workers", "1",
           "--header-timeout", str(header_timeout), "--idle-timeout", str(idle_timeout),
           "--body-timeout", str(body_timeout)]
    log = tmp_path / "host.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=base_env(tmp_path, port), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=limit_open_files)
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, f"host exited:\n{log.read_text()}"
        yield port, proc.pid
        assert proc.poll() is None, f"the host died:\n{log.read_text()}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
