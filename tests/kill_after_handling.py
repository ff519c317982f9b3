"""`python -m tests.kill_after_handling [--rounds 20] [--delay-ms 50]`: how often `kill -9`
just after a handler ran leads to a second handling of the same event.

Each round starts the real local host (`tests.hanging_host`) on one state directory, posts one
signed event, waits until its handler has run (the handler appends to a calls file), waits
`--delay-ms` more and kills the process group with SIGKILL. The next round's host redelivers
what was not completed (locks last `--lock-duration` seconds). After the last round a host
drains the queue, and the figure is the number of events handled more than once, per kill.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.local.queue import LocalQueue

from .support import WEBHOOK, encode, http_request, signed_headers, state_event

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _calls(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        if line.endswith("}"):
            event_id = json.loads(line)["eventId"]
            counts[event_id] = counts.get(event_id, 0) + 1
    return counts


def _start(env: dict[str, str], port: int, lock_duration: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hanging_host", "--port", str(port),
         "--lock-duration", str(lock_duration)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"host exited with {proc.returncode}")
        try:
            if http_request(port, "GET", "/api/health").status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("host did not become healthy within 60 s")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def measure(state: Path, *, rounds: int, delay: float, lock_duration: float = 1.0,
            env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the rounds in `state`; `{"kills", "doubles", "doublesPerKill", ...}`."""
    calls_path = state.parent / f"{state.name}-calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTCAR_", "LOCAL_STATE"))}
    env.update(LOCAL_STATE_DIR=str(state), SMARTCAR_MANAGEMENT_TOKEN="amt",
               TEST_CALLS=str(calls_path), LOG_LEVEL="WARNING", **(env_extra or {}))
    port = _free_port()
    ids: list[str] = []
    for n in range(rounds):
        proc = _start(env, port, lock_duration)
        try:
            event = state_event(eventId=f"record-{n:04d}-{time.time_ns()}")
            ids.append(event["eventId"])
            body = encode(event)
            status = http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status
            if status != 200:
                raise RuntimeError(f"POST answered {status}")
            deadline = time.monotonic() + 30
            while event["eventId"] not in _calls(calls_path):
                if time.monotonic() > deadline:
                    raise RuntimeError("the handler did not run within 30 s")
                time.sleep(0.001)
            time.sleep(delay)
        finally:
            _kill(proc)
    proc = _start(env, port, lock_duration)
    try:
        with LocalQueue(state / "queue.sqlite3") as queue:
            deadline = time.monotonic() + 60
            while queue.stats()["active"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the queue did not drain within 60 s")
                time.sleep(0.05)
    finally:
        _kill(proc)
    counts = _calls(calls_path)
    doubles = sum(1 for event_id in ids if counts.get(event_id, 0) > 1)
    return {"kills": rounds, "delayMs": round(delay * 1000), "doubles": doubles,
            "doublesPerKill": doubles / rounds if rounds else 0.0,
            "missing": sum(1 for event_id in ids if event_id not in counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kill_after_handling",
                                     description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--delay-ms", type=float, default=50.0,
                        help="milliseconds between the handler's call and the kill")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp) / "state", rounds=args.rounds, delay=args.delay_ms / 1000)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
