"""Faults through the real local host over loopback HTTP: nothing acknowledged is lost.

Faults are injected at the boundaries only: the queue's `send` (a LocalQueue wrapper), the
Key Vault client (FakeSecretClient), the process itself (SIGKILL), a handler.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.adapters import LocalQueuePublisher
from shared.runtime import Runtime
from shared.spill import SpillingPublisher
from shared.tokens import KeyVaultTokenProvider

from .fakes import FakeSecretClient, ManualClock
from .support import (
    TOKEN,
    WEBHOOK,
    RunningHost,
    encode,
    fixture_bytes,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
# Smartcar's retries: about 0, 25, 50 and 100 s after the first attempt, then it gives up.
SMARTCAR_RETRY_OFFSETS = (0.0, 25.0, 50.0, 100.0)


class FlakyQueue:
    """The LocalQueue boundary with sends failing while the simulated clock says "outage"."""

    def __init__(self, inner: Any, clock: ManualClock, *, down_until: float) -> None:
        self._inner = inner
        self._clock = clock
        self.down_until = down_until
        self.failed_sends = 0
        self._lock = threading.Lock()

    def send_many(self, messages: Any, *, wait: bool = True) -> list[bool]:
        if self._clock() < self.down_until:
            with self._lock:
                self.failed_sends += len(messages)
            raise OSError("Service Bus unavailable (simulated outage)")
        result: list[bool] = self._inner.send_many(messages, wait=wait)
        return result


def queue_behind(flaky: FlakyQueue) -> Callable[[Runtime], None]:
    def customize(runtime: Runtime) -> None:
        assert runtime.spill is not None
        primary = LocalQueuePublisher(flaky)
        runtime.publisher = SpillingPublisher(primary, runtime.spill)
        runtime.redrive_publisher = primary

    return customize


def handled_counts(host: RunningHost) -> Counter[str]:
    return Counter(r["eventId"] for r in host.handled())


class TestServiceBusOutage:
    def test_outage_longer_than_smartcars_retry_window_loses_nothing(self, tmp_path: Path) -> None:
        clock = ManualClock()
        outage = SMARTCAR_RETRY_OFFSETS[-1] + 500.0  # well past Smartcar's last retry
        flaky_holder: list[FlakyQueue] = []

        def customize(runtime: Runtime) -> None:
            flaky_holder.append(FlakyQueue(runtime.queue, clock, down_until=outage))
            queue_behind(flaky_holder[0])(runtime)

        events = [state_event() for _ in range(40)]
        with RunningHost(local_env(tmp_path), customize=customize, timer_interval=0.02) as host:
            flaky = flaky_holder[0]
            # Smartcar delivers each event during the outage; some deliveries are repeated
            # (a retry after a lost response). Every one is acknowledged.
            for offset in SMARTCAR_RETRY_OFFSETS:
                clock.now = offset
                for index, event in enumerate(events):
                    if offset == 0.0 or index % 10 == 0:
                        body = encode(event)
                        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            clock.now = SMARTCAR_RETRY_OFFSETS[-1] + 60.0
            # Re-drive runs during the outage, fails and keeps every spilled event.
            before = flaky.failed_sends
            wait_until(lambda: flaky.failed_sends >= before + 3)
            assert host.handled() == []
            assert len(list((tmp_path / "spill").glob("*.json"))) == len(events)

            clock.now = outage + 1.0  # Service Bus is back
            wait_until(lambda: len(handled_counts(host)) == len(events))
            wait_until(lambda: not list((tmp_path / "spill").glob("*.json")))
            # A late Smartcar retry of an event already re-driven is dropped as a duplicate.
            late = encode(events[0])
            assert host.post(WEBHOOK, late, signed_headers(late)).status == 200
            marker = state_event()
            body = encode(marker)
            host.post(WEBHOOK, body, signed_headers(body))
            wait_until(lambda: marker["eventId"] in handled_counts(host))

            counts = handled_counts(host)
            assert {e["eventId"] for e in events} <= set(counts)
            assert all(n == 1 for n in counts.values()), counts
            assert host.dead_letters() == []


class TestKeyVaultFailure:
    def host_with_vault(self, tmp_path: Path, client: FakeSecretClient,
                        clock: ManualClock) -> RunningHost:
        provider = KeyVaultTokenProvider(client, "smartcar-management-token", ttl_seconds=300,
                                         min_refresh_interval=10, clock=clock)

        def customize(runtime: Runtime) -> None:
            runtime.tokens = provider

        return RunningHost(local_env(tmp_path), customize=customize)

    def test_cached_token_keeps_working_while_key_vault_fails(self, tmp_path: Path) -> None:
        client, clock = FakeSecretClient(), ManualClock()
        client.set_secret(TOKEN)
        with self.host_with_vault(tmp_path, client, clock) as host:
            first = state_event()
            body = encode(first)
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            client.fail_with = ConnectionError("vault unreachable")
            clock.now = 10_000.0  # far past the cache TTL
            second = state_event()
            body = encode(second)
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            assert host.post(WEBHOOK, fixture_bytes("verify.json")).status == 200
            wait_until(lambda: {first["eventId"], second["eventId"]} <= set(handled_counts(host)))

    def test_no_token_at_all_gives_503(self, tmp_path: Path) -> None:
        client, clock = FakeSecretClient(), ManualClock()
        client.set_secret(TOKEN)
        client.fail_with = ConnectionError("vault unreachable")
        with self.host_with_vault(tmp_path, client, clock) as host:
            body = encode(state_event())
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 503
            assert host.post(WEBHOOK, fixture_bytes("verify.json")).status == 503
            assert host.runtime.queue.stats()["active"] == 0
            # The vault comes back: the next Smartcar retry is accepted.
            client.fail_with = None
            clock.now += 60.0
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200


class TestIntermittentHandler:
    def test_every_event_is_handled_once_despite_failures(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()
        attempts: Counter[str] = Counter()

        @registry.on("VEHICLE_STATE")
        def flaky(event: Event, context: HandlerContext) -> None:
            attempts[event.event_id] += 1
            # Every other event fails its first two deliveries.
            if int(event.event_id[-1], 16) % 2 == 0 and context.delivery_count <= 2:
                raise ConnectionError("downstream API timed out")

        events = [state_event() for _ in range(20)]
        with RunningHost(local_env(tmp_path), registry=registry) as host:
            for event in events:
                body = encode(event)
                assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: len(handled_counts(host)) == len(events))
            assert all(n == 1 for n in handled_counts(host).values())
            assert host.dead_letters() == []
            assert any(n == 3 for n in attempts.values())


def _start_host(state_dir: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PORT="0", LOCAL_STATE_DIR=str(state_dir),
               SMARTCAR_MANAGEMENT_TOKEN=TOKEN, LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.local", "--lock-duration", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise AssertionError(f"local host exited with {proc.wait()} before listening")


def _read_handled(state_dir: Path) -> set[str]:
    path = state_dir / "handled.jsonl"
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["eventId"])
        except (ValueError, KeyError):
            continue
    return ids


class TestKillDashNine:
    def test_every_acknowledged_event_is_handled_after_kill_and_restart(
        self, tmp_path: Path
    ) -> None:
        proc, port = _start_host(tmp_path)
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def sender() -> None:
            while not stop.is_set():
                event = state_event()
                body = encode(event)
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("POST", WEBHOOK, body, signed_headers(body))
                    status = conn.getresponse().status
                    conn.close()
                except OSError:
                    return  # the host is gone: this event was never acknowledged
                if status == 200:
                    with lock:
                        acknowledged.append(event["eventId"])

        try:
            with ThreadPoolExecutor(4) as pool:
                for _ in range(4):
                    pool.submit(sender)
                wait_until(lambda: len(acknowledged) >= 150, timeout=60)
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream: requests and handlers in flight
                proc.wait(10)
                stop.set()
            assert acknowledged
            proc, port = _start_host(tmp_path)
            wait_until(lambda: set(acknowledged) <= _read_handled(tmp_path), timeout=60)
        finally:
            proc.kill()
            proc.wait(10)


class TestLoad:
    EVENTS = 2000
    SENDERS = 32

    def test_2000_signed_events_from_32_senders_each_handled_once(self, tmp_path: Path) -> None:
        events = [state_event() for _ in range(self.EVENTS)]
        with RunningHost(local_env(tmp_path)) as host:
            port = host.port

            def send(chunk: list[dict[str, Any]]) -> list[int]:
                statuses = []
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                for event in chunk:
                    body = encode(event)
                    conn.request("POST", WEBHOOK, body, signed_headers(body))
                    resp = conn.getresponse()
                    resp.read()
                    statuses.append(resp.status)
                conn.close()
                return statuses

            chunks = [events[i :: self.SENDERS] for i in range(self.SENDERS)]
            with ThreadPoolExecutor(self.SENDERS) as pool:
                statuses = [s for result in pool.map(send, chunks) for s in result]
            assert Counter(statuses) == {200: self.EVENTS}
            wait_until(lambda: len(host.handled()) >= self.EVENTS, timeout=120, interval=0.2)
            counts = handled_counts(host)
            assert set(counts) == {e["eventId"] for e in events}
            assert all(n == 1 for n in counts.values())
            assert host.dead_letters() == []
            wait_until(lambda: host.runtime.queue.stats()["active"] == 0)
