"""The receive function the Functions host calls, in-process: per-request cost and concurrency.

`shared.functions.handle_webhook` is called with real `func.HttpRequest` objects and the real
token provider, signature check, envelope peek and reply; only the publisher is replaced at
the Service Bus boundary (a no-op, or a fake that waits like a Service Bus round trip).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import azure.functions as func

from shared.functions import handle_webhook
from shared.handlers import registry
from shared.local.adapters import LocalDeadLetterer, LocalRetrySender
from shared.publisher import OutboundMessage
from shared.runtime import Runtime, set_runtime
from shared.settings import load_settings
from shared.tokens import StaticTokenProvider

from .common import TOKEN, emit, median, note, percentile, signed_headers, state_payload

HOT_PATH = "receiver_hot_path"
CONCURRENCY = "receiver_concurrency"
SIZES = {"1kb": 1024, "5kb": 5 * 1024, "50kb": 50 * 1024}
SERVICE_BUS_ROUND_TRIP = 0.020  # seconds per send, a realistic in-region Service Bus send
SYNC_THREADS = 16


class NoopPublisher:
    async def publish(self, message: OutboundMessage) -> bool:
        return True

    async def close(self) -> None:
        return None


class SlowAsyncPublisher:
    """Awaits a Service Bus round trip per send: the event loop is free meanwhile."""

    async def publish(self, message: OutboundMessage) -> bool:
        await asyncio.sleep(SERVICE_BUS_ROUND_TRIP)
        return True

    async def close(self) -> None:
        return None


class SlowSyncPublisher:
    """A synchronous sender: blocks its thread for the round trip (time.sleep)."""

    async def publish(self, message: OutboundMessage) -> bool:
        time.sleep(SERVICE_BUS_ROUND_TRIP)  # noqa: ASYNC251 (the blocking call is the point)
        return True

    async def close(self) -> None:
        return None


def install_runtime(publisher: Any) -> None:
    settings = load_settings({"SMARTCAR_MANAGEMENT_TOKEN": TOKEN})
    set_runtime(
        Runtime(
            settings=settings,
            tokens=StaticTokenProvider(TOKEN),
            publisher=publisher,
            dead_letterer=LocalDeadLetterer(None),  # never used by the receiver
            registry=registry,
            retry_sender=LocalRetrySender(None),  # never used by the receiver
        )
    )


def http_request(body: bytes) -> func.HttpRequest:
    """What the Python worker hands the function: headers, the raw body."""
    return func.HttpRequest(
        method="POST",
        url="http://localhost/api/webhooks/smartcar",
        headers=signed_headers(body),
        params={},
        route_params={},
        body=body,
    )


def requests_of(size: int, count: int) -> list[func.HttpRequest]:
    return [http_request(state_payload(size)) for _ in range(count)]


async def _time_handler(requests: Sequence[func.HttpRequest], iterations: int) -> float:
    """Seconds per call of the function entry point."""
    count = len(requests)
    start = time.perf_counter()
    for i in range(iterations):
        response = await handle_webhook(requests[i % count])
        if response.status_code != 200:
            raise RuntimeError(f"receiver answered {response.status_code}: {response.get_body()!r}")
    return (time.perf_counter() - start) / iterations


def _time_baseline(bodies: Sequence[bytes], signatures: Sequence[bytes], iterations: int) -> float:
    """Seconds per HMAC-SHA256 check plus `json.loads` of the same bytes: the floor."""
    key = TOKEN.encode("utf-8")
    count = len(bodies)
    start = time.perf_counter()
    for i in range(iterations):
        body = bodies[i % count]
        digest = hmac.new(key, body, hashlib.sha256).hexdigest().encode("ascii")
        if not hmac.compare_digest(digest, signatures[i % count]):
            raise RuntimeError("baseline signature mismatch")
        json.loads(body)
    return (time.perf_counter() - start) / iterations


def hot_path(*, quick: bool) -> None:
    install_runtime(NoopPublisher())
    rounds = 3 if quick else 7
    try:
        for label, size in SIZES.items():
            iterations = max(20, (200 if quick else 4000) * 1024 // size)
            requests = requests_of(size, 32)
            bodies = [r.get_body() for r in requests]
            signatures = [r.headers["sc-signature"].encode("ascii") for r in requests]
            asyncio.run(_time_handler(requests, iterations // 4 + 1))  # warm up
            _time_baseline(bodies, signatures, iterations // 4 + 1)
            handler_us: list[float] = []
            baseline_us: list[float] = []
            ratios: list[float] = []
            for _ in range(rounds):
                handler = asyncio.run(_time_handler(requests, iterations)) * 1e6
                baseline = _time_baseline(bodies, signatures, iterations) * 1e6
                handler_us.append(handler)
                baseline_us.append(baseline)
                ratios.append(handler / baseline)
            emit(HOT_PATH, f"us_per_request_{label}", median(handler_us), "us")
            emit(HOT_PATH, f"baseline_us_{label}", median(baseline_us), "us")
            emit(HOT_PATH, f"overhead_ratio_{label}", median(ratios), "ratio")
    finally:
        set_runtime(None)


async def _async_load(
    requests: Sequence[func.HttpRequest], total: int, concurrency: int
) -> tuple[float, list[float]]:
    """`concurrency` clients, each sending its next request when the last is answered."""
    latencies: list[float] = []
    remaining = iter(range(total))

    async def client() -> None:
        for i in remaining:
            start = time.perf_counter()
            response = await handle_webhook(requests[i % len(requests)])
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"receiver answered {response.status_code}")

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def _sync_load(requests: Sequence[func.HttpRequest], total: int) -> float:
    """The same function on a 16-thread pool, each thread with its own event loop."""
    local = threading.local()

    def call(i: int) -> int:
        loop = getattr(local, "loop", None)
        if loop is None:
            loop = local.loop = asyncio.new_event_loop()
        response = loop.run_until_complete(handle_webhook(requests[i % len(requests)]))
        status: int = response.status_code  # an untyped property of azure-functions
        return status

    start = time.perf_counter()
    with ThreadPoolExecutor(SYNC_THREADS) as pool:
        statuses = list(pool.map(call, range(total)))
    elapsed = time.perf_counter() - start
    if any(status != 200 for status in statuses):
        raise RuntimeError("the receiver refused requests in the sync baseline")
    return elapsed


def concurrency(*, quick: bool) -> None:
    rounds = 1 if quick else 3
    total = 400 if quick else 4000
    clients = 64
    requests = requests_of(SIZES["5kb"], 256)
    rates: list[float] = []
    p50s: list[float] = []
    p99s: list[float] = []
    sync_rates: list[float] = []
    try:
        for _ in range(rounds):
            install_runtime(SlowAsyncPublisher())
            elapsed, latencies = asyncio.run(_async_load(requests, total, clients))
            rates.append(total / elapsed)
            p50s.append(percentile(latencies, 50) * 1e3)
            p99s.append(percentile(latencies, 99) * 1e3)
            install_runtime(SlowSyncPublisher())
            sync_total = total // 4
            sync_rates.append(sync_total / _sync_load(requests, sync_total))
            note(f"{CONCURRENCY}: {rates[-1]:.0f} req/s async, {sync_rates[-1]:.0f} req/s sync")
    finally:
        set_runtime(None)
    emit(CONCURRENCY, "concurrent_clients", clients, "count")
    emit(CONCURRENCY, "requests_per_s", median(rates), "requests/s")
    emit(CONCURRENCY, "p50_ms", median(p50s), "ms")
    emit(CONCURRENCY, "p99_ms", median(p99s), "ms")
    emit(CONCURRENCY, "sync_baseline_requests_per_s", median(sync_rates), "requests/s")
    emit(CONCURRENCY, "async_speedup", median(rates) / median(sync_rates), "ratio")
