"""Per-invocation overhead of the real Functions runtime beside the local host's, in one run.

The same signed VERIFY request (the webhook route's full receive path: signature, challenge
HMAC, reply; nothing stored, so no queue's cost is in it) is answered three ways, one after
the other, in this process:

- `in_process_us`: the function called directly with a `func.HttpRequest` (no host at all);
- `local_host_us`: an HTTP request over loopback to the local host (shared/local);
- `runtime_us`: an `InvocationRequest` over gRPC to the real `azure-functions-runtime` in its
  worker process, from the tests' Functions host (tests/functions_host), which loads the
  deployed package. The Functions host's own HTTP front door is not in it.

Each figure is a median of per-request wall times; `*_overhead_us` subtract `in_process_us`.
The runtime's dependencies are installed once and reused from `.pytest_cache` (as `make test`
leaves them).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import azure.functions as func

from shared.functions import handle_webhook
from tests.functions_host.host import FUNCTION_KEY
from tests.functions_host.session import TOKEN as RUNTIME_TOKEN
from tests.functions_host.session import start_session
from tests.support import RunningHost, local_env, signed_headers

from .common import emit, median, note, percentile

NAME = "runtime_invocation"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".pytest_cache" / "d" / "functions-host"
ROUTE = "/api/webhooks/smartcar"
BODY = (b'{"eventId": "bench-verify", "eventType": "VERIFY", "data": {"challenge": '
        b'"3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f"}, "meta": {"version": "4.0"}}')


def _timed(call: Callable[[], int], count: int) -> list[float]:
    """Microseconds per call, one sample per call; every answer must be a 200."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        status = call()
        samples.append((time.perf_counter() - start) * 1e6)
        if status != 200:
            raise RuntimeError(f"the VERIFY request was answered {status}")
    return samples


def run(*, quick: bool) -> None:
    count = 200 if quick else 2000
    warm_up = 50
    headers = {**signed_headers(BODY, RUNTIME_TOKEN), "x-functions-key": FUNCTION_KEY}
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as scratch:
        tmp = Path(scratch)
        note(f"{NAME}: starting the runtime (dependencies cached in {CACHE})")
        session = start_session(tmp / "runtime", CACHE)
        try:
            with RunningHost(local_env(tmp / "local")) as local:
                request = func.HttpRequest(method="POST", url=f"http://localhost{ROUTE}",
                                           headers=headers, params={}, route_params={},
                                           body=BODY)
                loop = asyncio.new_event_loop()  # RunningHost installed its runtime for it
                try:
                    calls: dict[str, Callable[[], int]] = {
                        "in_process": lambda: loop.run_until_complete(
                            handle_webhook(request)).status_code,
                        "local_host": lambda: local.post(ROUTE, BODY, headers).status,
                        "runtime": lambda: session.host.http("POST", ROUTE, BODY, headers).status,
                    }
                    results = {}
                    for name, call in calls.items():
                        _timed(call, warm_up)
                        results[name] = _timed(call, count)
                finally:
                    loop.close()
        finally:
            session.close()
    base = median(results["in_process"])
    for name, samples in results.items():
        emit(NAME, f"{name}_us", median(samples), "us")
        emit(NAME, f"{name}_p99_us", percentile(samples, 99), "us")
        if name != "in_process":
            emit(NAME, f"{name}_overhead_us", max(median(samples) - base, 0.0), "us")
