"""Test helpers: signed requests, a local host on a loopback port, polling."""

from __future__ import annotations

import asyncio
import hmac
import http.client
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from shared.clockcheck import CLOCK_WATCH
from shared.handlers import HandlerRegistry
from shared.local.adapters import HandledLog
from shared.local.command import load_function_app
from shared.local.host import LocalHost
from shared.runtime import Runtime, build_runtime, set_runtime
from shared.settings import load_settings
from shared.signature import sign

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "amt"
WEBHOOK = "/api/webhooks/smartcar"
ERRORS_WEBHOOK = "/api/webhooks/smartcar/errors"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def now_ms() -> int:
    return int(time.time() * 1000)


def delivered_now(name: str) -> bytes:
    """A fixture's bytes, unchanged but for `meta.deliveredAt`, which is now: the fixtures'
    own dates are long past, and a delivery that old at receipt is dead-lettered as stale."""
    body, count = re.subn(rb'"deliveredAt": *\d+', b'"deliveredAt": %d' % now_ms(),
                          fixture_bytes(name))
    assert count == 1, name
    return body


def fixture_json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(fixture_bytes(name))
    return data


def state_event(**overrides: Any) -> dict[str, Any]:
    """A VEHICLE_STATE event with a fresh eventId and deliveryId, delivered now."""
    event = fixture_json("vehicle_state.json")
    event["eventId"] = str(uuid.uuid4())
    event["meta"]["deliveryId"] = str(uuid.uuid4())
    event["meta"]["deliveredAt"] = now_ms()
    event.update(overrides)
    return event


def encode(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event).encode("utf-8")


def signed_headers(body: bytes, token: str = TOKEN, *, header: str = "SC-Signature") -> dict[str, str]:
    return {header: sign(token, body), "Content-Type": "application/json"}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def free_port() -> int:
    """A loopback TCP port free at this moment (the OS picks it) for a server to listen on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def local_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "SMARTCAR_MANAGEMENT_TOKEN": TOKEN,
        "LOCAL_STATE_DIR": str(state_dir),
        "RETRY_BACKOFF_BASE_SECONDS": "0.01",
        "RETRY_BACKOFF_MAX_SECONDS": "0.05",
    }
    env.update(extra)
    return env


class RunningHost:
    """The real local host (HTTP on a loopback port, queue workers) on a background loop."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        registry: HandlerRegistry | None = None,
        customize: Callable[[Runtime], None] | None = None,
        workers: int = 4,
        timer_interval: float = 60.0,
        lock_duration: float = 60.0,
        poll_interval: float = 0.05,
    ) -> None:
        self.settings = load_settings(env)
        self.runtime = build_runtime(self.settings, registry=registry)
        if customize is not None:
            customize(self.runtime)
        self._workers = workers
        self._timer_interval = timer_interval
        self._lock_duration = lock_duration
        self._poll_interval = poll_interval
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.host: LocalHost | None = None

    def __enter__(self) -> Self:
        CLOCK_WATCH.reset()  # one per process: the verdicts of an earlier test's deliveries
        self._thread.start()
        set_runtime(self.runtime)

        async def start() -> LocalHost:
            host = LocalHost(load_function_app(), self.runtime, port=0, workers=self._workers,
                             poll_interval=self._poll_interval,
                             timer_interval=self._timer_interval,
                             lock_duration=self._lock_duration)
            await host.start()
            return host

        self.host = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.host is not None
        asyncio.run_coroutine_threadsafe(self.host.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.runtime.queue.close()
        if self.runtime.handled_log is not None:
            self.runtime.handled_log.close()
        set_runtime(None)

    @property
    def port(self) -> int:
        assert self.host is not None
        return self.host.port

    def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
        return http_request(self.port, "POST", path, body, headers)

    def get(self, path: str) -> Response:
        return http_request(self.port, "GET", path)

    def handled(self) -> list[dict[str, Any]]:
        assert isinstance(self.runtime.handled_log, HandledLog)  # local mode's outcome log
        return self.runtime.handled_log.read()

    def dead_letters(self) -> list[Any]:
        return list(self.runtime.queue.peek_dead_letters())


def compare_digest_calls(monkeypatch: pytest.MonkeyPatch,
                         module: str) -> list[tuple[bytes, bytes]]:
    """Every `hmac.compare_digest(a, b)` that `module` makes from now on, as (a, b), still
    answered by the real function: how a test holds a comparison to constant time."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(f"{module}.hmac.compare_digest", spy)
    return calls
