"""Hosts (and the CLI) starting at the same moment on a fresh state directory all start.

Real processes, released at one wall-clock instant, in a loop of fresh directories: without
the start-up lock, about one round in three had a process fail with "cannot write
initialised" or "database is locked".
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .host_process import REPO, base_env, free_port, handled_ids, healthy
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until

OPEN_AT = """
import sys, time
from pathlib import Path
from shared.local.queue_open import open_state_queue
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
open_state_queue(Path(sys.argv[1])).close()
"""


class TestSimultaneousStarts:
    def test_processes_opening_a_fresh_state_directory_at_once_all_succeed(
        self, tmp_path: Path
    ) -> None:
        failures: list[str] = []
        for round_ in range(6):
            state = tmp_path / f"state-{round_}"
            at = time.time() + 0.8  # every process has imported by then
            procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(state), str(at)],
                                      cwd=REPO, stderr=subprocess.PIPE, text=True)
                     for _ in range(6)]
            for proc in procs:
                _, err = proc.communicate(timeout=60)
                if proc.returncode:
                    failures.append(err.strip().splitlines()[-1])
            assert (state / "initialised").exists()
        assert failures == []

    def test_two_hosts_started_together_both_serve_one_queue(self, tmp_path: Path) -> None:
        ports = [free_port(), free_port()]
        procs = []
        for port in ports:
            env = base_env(tmp_path, port)
            env["INSPECTOR_PORT"] = str(free_port())
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shared.local", "--port", str(port)], cwd=REPO,
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        try:
            wait_until(lambda: all(healthy(p) or proc.poll() is not None
                                   for p, proc in zip(ports, procs, strict=True)), timeout=60)
            assert [proc.poll() for proc in procs] == [None, None]
            events = [state_event() for _ in range(6)]
            for i, event in enumerate(events):
                body = encode(event)
                port = ports[i % 2]
                assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            state = tmp_path / "state"
            wait_until(lambda: len(handled_ids(state)) >= len(events), timeout=30)
            assert sorted(handled_ids(state)) == sorted(e["eventId"] for e in events)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)
