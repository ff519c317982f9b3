"""The worker's memory, CPU and telemetry per event, with the app as deployed: one command.

    make measure-memory        # = python -m benchmarks.memory

A fresh Python process (the worker) imports `function_app.py`, configures telemetry export
with the Azure Monitor distro (as in Azure; the endpoint is a closed loopback port, so nothing
leaves the machine), and calls the app's own functions the way the Functions host does:

1. `smartcar_webhook` with signed 50 KB VEHICLE_STATE bodies, `--http-concurrency` at a time
   (the Bicep default `httpPerInstanceConcurrency`, 64);
2. `process_event` on every message those calls sent, `maxConcurrentCalls` at a time (read from
   host.json, 32), through the default handler registry.

Only the boundaries are replaced: Service Bus by an in-memory sender (the SDK's surface, so the
processor's own sends also run), the Key Vault token by a static one. The vehicle state store
is off (no Table Storage here): the figures per processed event leave out its calls. The worker
reports its resident set (VmRSS) after start-up, after importing and configuring the app, after
each phase, and its peak (VmHWM), plus CPU time per event, and the bytes of telemetry each event
produces as Application Insights would ingest them: its spans converted to Azure Monitor
envelopes, and its log records at the host's level (Information) likewise. Output: one JSON
document on stdout (`--json-lines` for the benchmark suite's format).

What this does not include: the Functions host (a .NET process on the same instance) and the
Python worker's gRPC layer, which are not installable here; docs/cost.md says how the instance
size allows for them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .common import TOKEN, emit, note, state_payload

NAME = "worker_memory"
PAYLOAD_BYTES = 50 * 1024
#: Bicep's default `httpPerInstanceConcurrency` (infra/modules/functionapp.bicep).
HTTP_CONCURRENCY = 64
ROOT = Path(__file__).resolve().parent.parent
CONNECTION = ("InstrumentationKey=00000000-0000-0000-0000-000000000001;"
              "IngestionEndpoint=https://127.0.0.1:9/")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this measurement needs Linux)")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


class InMemoryBus:
    """The Service Bus sender surface (`get_queue_sender().send_messages`): keeps what is sent."""

    def __init__(self) -> None:
        self.sent: deque[Any] = deque()

    def get_queue_sender(self, queue_name: str) -> InMemoryBus:
        return self

    async def send_messages(self, message: Any) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        return None


def _function_message(sent: Any, sequence: int) -> Any:
    from azure.functions.servicebus import ServiceBusMessage

    props = {str(k): v for k, v in (sent.application_properties or {}).items()}
    return ServiceBusMessage(
        body=b"".join(sent.body), message_id=str(sent.message_id), delivery_count=1,
        sequence_number=sequence, application_properties=props, user_properties=props,
        content_type="application/json",
    )


def _request(body: bytes) -> Any:
    import azure.functions as func

    from shared.signature import sign

    return func.HttpRequest(
        method="POST", url="http://localhost/api/webhooks/smartcar",
        headers={"SC-Signature": sign(TOKEN, body), "Content-Type": "application/json"},
        params={}, route_params={}, body=body,
    )


async def _bounded(calls: list[Any], concurrency: int) -> None:
    """Run the coroutines with at most `concurrency` in flight, like the host's slots."""
    slots = asyncio.Semaphore(concurrency)

    async def one(call: Any) -> None:
        async with slots:
            await call

    await asyncio.gather(*(one(c) for c in calls))


def worker(events: int, http_concurrency: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"payloadBytes": PAYLOAD_BYTES, "events": events}
    figures["rssAtStartMB"] = rss_mb()
    os.environ["APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"] = "true"
    sys.path.insert(0, str(ROOT))
    import function_app
    from shared import telemetry
    from shared.handlers import registry
    from shared.local.app_functions import max_concurrent_calls_from_host_json
    from shared.processor import ServiceBusDeadLetterer
    from shared.publisher import ServiceBusPublisher
    from shared.retry import ServiceBusRetrySender
    from shared.runtime import Runtime, set_runtime
    from shared.settings import load_settings
    from shared.tokens import StaticTokenProvider

    functions = {fn.get_function_name(): fn.get_user_function()
                 for fn in function_app.app.get_functions()}
    webhook, process = functions["smartcar_webhook"], functions["process_event"]
    queue_concurrency = max_concurrent_calls_from_host_json()
    figures["queueConcurrency"] = queue_concurrency
    figures["httpConcurrency"] = http_concurrency

    assert telemetry.configure(connection_string=CONNECTION) == telemetry.MODE_AZURE_MONITOR
    # The host's level for the worker's logs (host.json logLevel default: Information).
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK's own request lines
    bus = InMemoryBus()
    sb = ServiceBusPublisher(lambda: bus, "events")
    set_runtime(Runtime(
        settings=load_settings({"SMARTCAR_MANAGEMENT_TOKEN": TOKEN}),
        tokens=StaticTokenProvider(TOKEN), publisher=sb,
        dead_letterer=ServiceBusDeadLetterer(sb.send_raw), registry=registry,
        retry_sender=ServiceBusRetrySender(sb.send_raw),
    ))
    figures["rssAfterImportMB"] = rss_mb()

    template = state_payload(PAYLOAD_BYTES, str(uuid.uuid4()))
    template_ids = [str(json.loads(template)["eventId"]),
                    str(json.loads(template)["meta"]["deliveryId"])]

    def fresh_body() -> bytes:
        """The template with a new eventId and deliveryId (same length, so still 50 KB)."""
        body = template
        for old in template_ids:
            body = body.replace(old.encode(), str(uuid.uuid4()).encode())
        return body

    async def load(count: int) -> tuple[float, float, float, float]:
        """`count` events in rounds of `http_concurrency`: each round's webhooks all in flight
        at once, then its messages processed `queue_concurrency` at a time. Only a round's
        bodies exist at a time, as on an instance (the host holds what is in flight)."""
        http_cpu = http_wall = queue_cpu = queue_wall = 0.0
        done = 0
        while done < count:
            size = min(http_concurrency, count - done)
            requests = [_request(fresh_body()) for _ in range(size)]
            cpu, wall = time.process_time(), time.perf_counter()
            # No invocation context: the host's trace context is optional to the function.
            await _bounded([webhook(r, None) for r in requests], http_concurrency)
            http_cpu += time.process_time() - cpu
            http_wall += time.perf_counter() - wall
            del requests
            assert len(bus.sent) == size, f"{len(bus.sent)} of {size} webhooks were enqueued"
            messages = [_function_message(bus.sent.popleft(), done + i) for i in range(size)]
            cpu, wall = time.process_time(), time.perf_counter()
            await _bounded([process(m) for m in messages], queue_concurrency)
            queue_cpu += time.process_time() - cpu
            queue_wall += time.perf_counter() - wall
            del messages
            assert not bus.sent, f"processing sent {len(bus.sent)} messages (retries?)"
            done += size
        return http_cpu, http_wall, queue_cpu, queue_wall

    http_cpu, http_wall, queue_cpu, queue_wall = asyncio.run(load(events))
    figures["rssAfterLoadMB"] = rss_mb()
    figures["peakRssMB"] = peak_mb()
    figures["cpuMsPerWebhook"] = http_cpu / events * 1000
    figures["cpuMsPerProcessedEvent"] = queue_cpu / events * 1000
    figures["wallMsPerWebhookAtConcurrency"] = http_wall / events * 1000
    figures["wallMsPerProcessedEventAtConcurrency"] = queue_wall / events * 1000

    sample = 50
    spans, logs = _telemetry_sample(lambda count: asyncio.run(load(count)), sample)
    figures["telemetrySampleEvents"] = sample
    figures["spanBytesPerEvent"] = spans / sample
    figures["logBytesPerEvent"] = logs / sample
    return figures


def _telemetry_sample(run: Any, count: int) -> tuple[int, int]:
    """Bytes of the spans and log records `count` events produce, as Azure Monitor envelopes.

    The envelope converters are the exporter's own (private) functions: what its HTTP client
    serialises and Application Insights ingests, without a network."""
    from azure.monitor.opentelemetry.exporter.export.logs._exporter import (
        _convert_log_to_envelope,
    )
    from azure.monitor.opentelemetry.exporter.export.trace._exporter import (
        _convert_span_to_envelope,
    )
    from opentelemetry import trace
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared.telemetry import Telemetry, set_telemetry

    # Every span, not the distro's sample of them (its default sampler keeps at most 5 traces
    # a second per process): the bytes of one event's full telemetry.
    span_exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=trace.get_tracer_provider().resource)  # type: ignore[attr-defined]
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    set_telemetry(Telemetry(tracer_provider=provider, meter_provider=MeterProvider()))
    log_exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]  # OTel leaves its __init__ unannotated
    log_provider = LoggerProvider()
    log_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
    handler = LoggingHandler(level=logging.INFO, logger_provider=log_provider)
    logging.getLogger().addHandler(handler)
    try:
        run(count)
    finally:
        logging.getLogger().removeHandler(handler)
        set_telemetry(None)

    def size(item: Any) -> int:
        # The wire form: the model's mapping under its REST names, as its client sends it.
        return len(json.dumps(item.as_dict(), separators=(",", ":"), default=str).encode())

    span_bytes = sum(size(_convert_span_to_envelope(s)) for s in span_exporter.get_finished_spans())
    log_bytes = sum(size(_convert_log_to_envelope(r)) for r in log_exporter.get_finished_logs())
    return span_bytes, log_bytes


def measure(events: int, http_concurrency: int) -> dict[str, Any]:
    """Run the worker in a fresh interpreter (nothing else loaded) and return its figures."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--worker", "--events", str(events),
         "--http-concurrency", str(http_concurrency)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def run(*, quick: bool = False) -> None:
    """The benchmark suite's entry: JSON lines like the other benchmarks."""
    figures = measure(200 if quick else 5000, HTTP_CONCURRENCY)
    for metric, value in figures.items():
        unit = "MB" if metric.endswith("MB") else "ms" if "Ms" in metric else (
            "bytes" if "Bytes" in metric else "count")
        emit(NAME, metric, value, unit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000,
                        help="webhooks sent and events processed (default 5000)")
    parser.add_argument("--http-concurrency", type=int, default=HTTP_CONCURRENCY)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # stderr gets warnings only, whatever the
        handler.setLevel(logging.WARNING)          # root level the worker sets for export
    if args.worker:
        print(json.dumps(worker(args.events, args.http_concurrency)), flush=True)
        # Skip the exporters' exit flush: it retries the closed endpoint for minutes.
        os._exit(0)
    note(f"measuring {args.events} events of {PAYLOAD_BYTES} bytes in a fresh worker ...")
    figures = measure(args.events, args.http_concurrency)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in figures.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
