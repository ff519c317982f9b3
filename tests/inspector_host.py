"""A real local host process (`python -m shared.local`) with its inspector, for the tests.

The inspector's URL, token included, is read from the banner the host prints, as a user
would copy it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.signature import sign

from .support import TOKEN, Response, http_request, wait_until

REPO = Path(__file__).resolve().parent.parent
INSPECTOR_LINE = re.compile(r"^Inspector .*?(http://127\.0\.0\.1:(\d+)/([A-Za-z0-9_-]+)/)$", re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class HostProcess:
    """`python -m shared.local` on free loopback ports, its output in `log`."""

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1",
                 extra_env: Mapping[str, str] | None = None,
                 python: list[str] | None = None, expect_inspector: bool = True) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.tmp = workdir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "host.log"
        self.port = free_port()
        self.inspector_port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SMARTCAR_", "LOCAL_STATE", "INSPECTOR_"))}
        env.update(
            HOST=host, PORT=str(self.port), INSPECTOR_PORT=str(self.inspector_port),
            LOCAL_STATE_DIR=str(self.state), SMARTCAR_MANAGEMENT_TOKEN=TOKEN,
            RETRY_BACKOFF_BASE_SECONDS="0.01", RETRY_BACKOFF_MAX_SECONDS="0.05",
            PYTHONUNBUFFERED="1", TMPDIR=str(self.tmp),
        )
        env.update(extra_env or {})
        self.env = env
        self.cmd = [*(python or [sys.executable]), "-m", "shared.local"]
        self.expect_inspector = expect_inspector
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.token = ""

    def __enter__(self) -> HostProcess:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if not self.expect_inspector:
            wait_until(lambda: self._started(), timeout=60)
            return self
        match = wait_until(lambda: self._banner_url(), timeout=60)
        self.url, self.token = match.group(1), match.group(3)
        assert int(match.group(2)) == self.inspector_port
        return self

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"host exited with {self.proc.returncode}:\n{self.output()}")
        return "Press Ctrl-C to stop." in self.output()

    def _banner_url(self) -> re.Match[str] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"host exited with {self.proc.returncode}:\n{self.output()}")
        return INSPECTOR_LINE.search(self.output())

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    # -- the webhook side ------------------------------------------------------------------
    def post(self, body: bytes, *, path: str = "/api/webhooks/smartcar", signed: bool = True,
             signature: str | None = None) -> Response:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["SC-Signature"] = signature
        elif signed:
            headers["SC-Signature"] = sign(TOKEN, body)
        return http_request(self.port, "POST", path, body, headers)

    # -- the inspector side ----------------------------------------------------------------
    def inspector(self, path: str, *, method: str = "GET",
                  headers: Mapping[str, str] | None = None) -> Response:
        return http_request(self.inspector_port, method, f"/{self.token}/{path}",
                            headers=headers)

    def deliveries(self) -> list[dict[str, Any]]:
        doc: dict[str, Any] = json.loads(self.inspector("api/deliveries").body)
        result: list[dict[str, Any]] = doc["deliveries"]
        return result

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> Any:
        return wait_until(predicate, timeout=timeout, interval=0.1)

