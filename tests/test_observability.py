"""Observability as a spec: what the code emits, that the ops queries and alerts use exactly
those names, and that no token, signature or body ever reaches telemetry or INFO+ logs.

Telemetry is captured with the OpenTelemetry SDK's in-memory span exporter and metric reader,
passed to the code as a `Telemetry` (no global provider is touched).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from shared import receiver
from shared import telemetry_names as names
from shared.events import Event
from shared.handlers import HandlerContext, HandlerRegistry
from shared.local.adapters import LocalDeadLetterer, LocalQueuePublisher, LocalRetrySender
from shared.local.queue import LocalQueue
from shared.local.queue_rows import LockLostError
from shared.processor import (
    InboundMessage,
    Outcome,
    process_message,
)
from shared.settings import load_settings
from shared.signature import sign
from shared.telemetry import (
    context_from_properties,
    metric_event_type,
    set_telemetry,
)
from shared.tokens import StaticTokenProvider, TokenUnavailableError

from .bicep_tree import find_calls, load, text
from .fakes import ManualClock
from .otel_capture import Captured, captured
from .support import (
    ERRORS_WEBHOOK,
    TOKEN,
    WEBHOOK,
    RunningHost,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ROOT / "infra" / "queries"
MODULES = ROOT / "infra" / "modules"
DOCS = ROOT / "docs"
MAX_BODY = 196608


def _registry(*, fail: bool = False) -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.on("VEHICLE_STATE")
    async def handle(event: Event, context: HandlerContext) -> None:
        if fail:
            raise RuntimeError("handler broke")

    return registry


def _inbound(queue: LocalQueue) -> InboundMessage:
    (qm,) = queue.receive(max_messages=1, lock_duration=30)
    return InboundMessage(
        body=qm.body,
        message_id=qm.message_id,
        delivery_count=qm.delivery_count,
        sequence_number=qm.sequence_number,
        application_properties=dict(qm.application_properties),
        enqueued_time=qm.enqueued_time,
    )


# ---------------------------------------------------------------------------------------------
# 1. One webhook, received and processed: metrics, attributes, one trace.
# ---------------------------------------------------------------------------------------------
class TestOneWebhookEndToEnd:
    def test_receive_and_process_emit_named_metrics_and_one_trace(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        settings = load_settings(local_env(tmp_path))
        queue = LocalQueue(tmp_path / "q.sqlite3", max_delivery_count=5)
        delivered = datetime.now(UTC) - timedelta(seconds=2)
        event = state_event()
        event["meta"]["deliveredAt"] = int(delivered.timestamp() * 1000)
        body = encode(event)

        async def flow() -> Any:
            reply = await receiver.receive(
                body, signed_headers(body), tokens=StaticTokenProvider("amt"),
                publisher=LocalQueuePublisher(queue), max_body_bytes=MAX_BODY,
                telemetry=otel.telemetry,
            )
            assert reply.outcome == receiver.ACCEPTED
            return await process_message(
                _inbound(queue), settings=settings, registry=_registry(),
                dead_letterer=LocalDeadLetterer(queue), retry_sender=LocalRetrySender(queue),
                telemetry=otel.telemetry,
            )

        result = asyncio.run(flow())
        queue.close()
        assert result.outcome is Outcome.HANDLED

        (receive_span,) = otel.finished(names.SPAN_RECEIVE)
        (process_span,) = otel.finished(names.SPAN_PROCESS)
        assert receive_span.kind is SpanKind.SERVER
        assert process_span.kind is SpanKind.CONSUMER
        # One trace: the processing span is the receive span's child, through the message.
        assert process_span.parent is not None
        assert process_span.parent.span_id == receive_span.context.span_id
        assert process_span.context.trace_id == receive_span.context.trace_id
        assert receive_span.attributes is not None and process_span.attributes is not None
        assert receive_span.attributes[names.ATTR_OUTCOME] == "accepted"
        assert receive_span.attributes[names.ATTR_EVENT_TYPE] == "VEHICLE_STATE"
        assert receive_span.attributes[names.ATTR_EVENT_ID] == event["eventId"]
        assert process_span.attributes[names.ATTR_OUTCOME] == "handled"
        assert process_span.attributes[names.ATTR_EVENT_ID] == event["eventId"]
        assert process_span.attributes[names.ATTR_VEHICLE_ID] == event["vehicleId"]
        assert process_span.attributes[names.ATTR_DELIVERY_COUNT] == 1

        points = otel.points()
        assert {names.WEBHOOK_RECEIVED, names.WEBHOOK_RECEIVE_DURATION, names.EVENT_PROCESSED,
                names.EVENT_PROCESS_DURATION, names.EVENT_DELIVERY_LAG} <= set(points)
        received = {"outcome": "accepted", "eventType": "VEHICLE_STATE", "httpStatus": 200}
        assert [(a, p.value) for a, p in points[names.WEBHOOK_RECEIVED]] == [(received, 1)]
        ((attrs, duration),) = points[names.WEBHOOK_RECEIVE_DURATION]
        assert attrs == received and duration.count == 1
        processed = {"eventType": "VEHICLE_STATE", "outcome": "handled"}
        assert [(a, p.value) for a, p in points[names.EVENT_PROCESSED]] == [(processed, 1)]
        ((attrs, lag),) = points[names.EVENT_DELIVERY_LAG]
        assert attrs == {"eventType": "VEHICLE_STATE"}
        assert 2000 <= lag.sum < 60000  # deliveredAt was two seconds ago

    def test_message_carries_traceparent_and_diagnostic_id(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        body = encode(state_event())
        asyncio.run(receiver.receive(
            body, signed_headers(body), tokens=StaticTokenProvider("amt"),
            publisher=LocalQueuePublisher(queue), max_body_bytes=MAX_BODY,
            telemetry=otel.telemetry,
        ))
        (qm,) = queue.receive(max_messages=1)
        queue.close()
        (span,) = otel.finished(names.SPAN_RECEIVE)
        props = qm.application_properties
        expected = f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-"
        assert props[names.PROP_TRACEPARENT].startswith(expected)  # then the trace flags
        assert props[names.PROP_DIAGNOSTIC_ID] == props[names.PROP_TRACEPARENT]
        assert props["eventType"] == "VEHICLE_STATE"  # the publisher's properties are kept

    def test_diagnostic_id_alone_parents_the_processing_span(self) -> None:
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ctx = context_from_properties({b"Diagnostic-Id": parent.encode()})
        assert ctx is not None
        assert context_from_properties({"traceparent": "garbage"}) is None
        assert context_from_properties({}) is None

    def test_handler_failure_is_retried_then_dead_lettered(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        settings = load_settings(local_env(tmp_path, MAX_DELIVERY_COUNT="2"))
        clock = ManualClock(time.time())
        queue = LocalQueue(tmp_path / "q.sqlite3", max_delivery_count=2, clock=clock)
        body = encode(state_event())
        queue.send(body, message_id="m1", application_properties={"eventType": "VEHICLE_STATE"})

        async def attempt() -> None:
            clock.now += settings.retry_backoff_max_seconds  # the scheduled copy is due
            (qm,) = queue.receive(max_messages=1, lock_duration=30)
            assert qm.lock_token is not None
            message = InboundMessage(body=qm.body, message_id=qm.message_id,
                                     delivery_count=qm.delivery_count,
                                     sequence_number=qm.sequence_number,
                                     application_properties=dict(qm.application_properties))
            await process_message(
                message, settings=settings, registry=_registry(fail=True),
                dead_letterer=LocalDeadLetterer(queue), retry_sender=LocalRetrySender(queue),
                telemetry=otel.telemetry, clock=clock,
            )
            with contextlib.suppress(LockLostError):  # dead-lettered already
                queue.complete(qm.lock_token)  # what the host does when the function returns

        for _ in range(2):
            asyncio.run(attempt())
        queue.close()
        outcomes = sorted(
            (a["outcome"], p.value) for a, p in otel.points()[names.EVENT_PROCESSED]
        )
        assert outcomes == [("dead_lettered", 1), ("retried", 1)]
        spans = otel.finished(names.SPAN_PROCESS)
        assert {s.attributes[names.ATTR_ERROR_TYPE] for s in spans if s.attributes} == {
            "RuntimeError"
        }
        assert all(not s.status.is_ok for s in spans)
        assert names.EVENT_DELIVERY_LAG not in otel.points()

    def test_invalid_payload_is_counted_dead_lettered_with_its_reason(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        settings = load_settings(local_env(tmp_path))
        queue = LocalQueue(tmp_path / "q.sqlite3")
        queue.send(b"not json", message_id="m2", application_properties={})
        result = asyncio.run(process_message(
            _inbound(queue), settings=settings, registry=_registry(),
            dead_letterer=LocalDeadLetterer(queue), retry_sender=LocalRetrySender(queue),
            telemetry=otel.telemetry,
        ))
        queue.close()
        assert result.outcome is Outcome.DEAD_LETTERED
        (span,) = otel.finished(names.SPAN_PROCESS)
        assert span.attributes is not None
        assert span.attributes[names.ATTR_DEAD_LETTER_REASON] == "InvalidPayload"
        assert [(a, p.value) for a, p in otel.points()[names.EVENT_PROCESSED]] == [
            ({"eventType": "unknown", "outcome": "dead_lettered"}, 1)
        ]


class TestReceiveOutcomes:
    @pytest.mark.parametrize(
        ("headers", "outcome", "event_type"),
        [
            ({"SC-Signature": "00" * 32}, "signature_rejected", "unknown"),
            ({}, "unsigned_rejected", "unknown"),
        ],
    )
    def test_unauthenticated_requests_never_put_their_event_type_on_metrics(
        self, otel: Captured, headers: dict[str, str], outcome: str, event_type: str
    ) -> None:
        body = encode(state_event(eventType="ATTACKER_" + uuid.uuid4().hex))
        reply = asyncio.run(receiver.receive(
            body, headers, tokens=StaticTokenProvider("amt"),
            publisher=LocalQueuePublisher(None), max_body_bytes=MAX_BODY,
            telemetry=otel.telemetry,
        ))
        assert reply.outcome == outcome
        ((attrs, _),) = otel.points()[names.WEBHOOK_RECEIVED]
        assert attrs == {"outcome": outcome, "eventType": event_type, "httpStatus": 401}

    def test_a_signed_request_s_event_type_is_on_the_metric_only_when_stored_or_a_duplicate(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        # docs/operations.md: the received counter's eventType is `unknown` unless the outcome
        # is accepted, duplicate or verify_answered; a 503 or 400 to a signed request is
        # `unknown` too, though its signature matched or was never checked.
        class NoTokens:  # Key Vault unreachable
            async def get_tokens(self) -> list[str]:
                raise TokenUnavailableError("Key Vault unreachable")

            async def refresh(self) -> bool:
                raise TokenUnavailableError("Key Vault unreachable")

        body = encode(state_event())
        not_an_object = b"\xef\xbb\xbf" + encode(state_event())  # eventType readable, not stored
        with LocalQueue(tmp_path / "queue.sqlite3") as queue:
            publisher = LocalQueuePublisher(queue)

            async def post(payload: bytes, tokens: Any = None) -> str:
                reply = await receiver.receive(
                    payload, signed_headers(payload), tokens=tokens or StaticTokenProvider(TOKEN),
                    publisher=publisher, max_body_bytes=MAX_BODY, telemetry=otel.telemetry)
                return str(reply.outcome)

            async def main() -> list[str]:
                return [await post(body), await post(body), await post(not_an_object),
                        await post(body, NoTokens())]

            assert asyncio.run(main()) == ["accepted", "duplicate", "not_an_object",
                                           "unavailable"]
        points = otel.points()[names.WEBHOOK_RECEIVED]
        assert sorted((a["outcome"], a["eventType"], a["httpStatus"], p.value)
                      for a, p in points) == [
            ("accepted", "VEHICLE_STATE", 200, 1),
            ("duplicate", "VEHICLE_STATE", 200, 1),
            ("not_an_object", "unknown", 400, 1),
            ("unavailable", "unknown", 503, 1),
        ]

    @pytest.mark.parametrize("signed", [False, True])
    def test_a_verify_puts_its_event_id_on_the_span_only_when_signed(
        self, otel: Captured, signed: bool
    ) -> None:
        # Anyone can send a VERIFY and have it answered: its eventId is a stranger's text
        # (a line break, a terminal escape, 100 KB) until the signature says otherwise.
        event_id = "forged\n2026-12-05 WARNING shared.functions: FORGED \x1b[31m" + "x" * 1000
        body = json.dumps({"eventId": event_id, "eventType": "VERIFY",
                           "data": {"challenge": "abc"}}).encode()
        reply = asyncio.run(receiver.receive(
            body, {"SC-Signature": sign("amt", body)} if signed else {},
            tokens=StaticTokenProvider("amt"), publisher=LocalQueuePublisher(None),
            max_body_bytes=MAX_BODY, telemetry=otel.telemetry,
        ))
        assert (reply.outcome, reply.status) == ("verify_answered", 200)
        (span,) = otel.finished(names.SPAN_RECEIVE)
        assert span.attributes is not None
        assert span.attributes.get(names.ATTR_EVENT_ID) == (event_id if signed else None)
        assert span.attributes[names.ATTR_EVENT_TYPE] == "VERIFY"

    def test_metric_event_type_is_bounded(self) -> None:
        assert metric_event_type("VEHICLE_STATE") == "VEHICLE_STATE"
        assert metric_event_type(None) == "unknown"
        assert metric_event_type("x" * 64) == "x" * 64
        assert metric_event_type("x" * 65) == "unknown"
        assert metric_event_type("a b{}") == "unknown"
        assert metric_event_type("smartcar.VEHICLE-STATE_2") == "smartcar.VEHICLE-STATE_2"


# ---------------------------------------------------------------------------------------------
# 2. Queries and alerts use exactly the names the code emits.
# ---------------------------------------------------------------------------------------------
QUERY_FILES = sorted(QUERIES.glob("*.kql"))
RECEIVE_OUTCOMES = set(receiver.OUTCOMES)
KNOWN_OUTCOMES = RECEIVE_OUTCOMES | names.PROCESS_OUTCOMES
# Columns of Application Insights tables, not names this code chooses.
AI_COLUMNS = {"name", "timestamp", "duration", "value", "valueSum", "valueCount", "valueMax",
              "valueMin", "customDimensions", "operation_Id", "success"}


def kql_names(query: str) -> tuple[set[str], set[str], set[str]]:
    """(smartcar.* names, customDimensions keys, literals compared with an outcome)."""
    code = "\n".join(line for line in query.splitlines() if not line.lstrip().startswith("//"))
    smartcar = set(re.findall(r'"(smartcar\.[A-Za-z0-9_.]+)"', code))
    dims = set(re.findall(r"customDimensions\.([A-Za-z_][A-Za-z0-9_]*)", code))
    dims |= set(re.findall(r"customDimensions\[['\"]([^'\"]+)['\"]\]", code))
    outcomes: set[str] = set()
    for match in re.finditer(r"outcome\s*(?:==|!=|in\s*\()\s*([^)\n]*)", code):
        outcomes |= set(re.findall(r'"([^"]+)"', match.group(1)))
    return smartcar, dims, outcomes


class TestQueriesUseEmittedNames:
    def test_the_ops_queries_exist_with_a_header_saying_what_they_answer(self) -> None:
        expected = {"delivery_success_rate", "receive_latency", "signature_failures",
                    "processing_failures", "end_to_end_lag", "top_vehicles_by_errors"}
        assert expected <= {p.stem for p in QUERY_FILES}
        for path in QUERY_FILES:
            header = [ln for ln in path.read_text().splitlines() if ln.startswith("//")]
            assert len(header) >= 2 and header[0].startswith("// ") and ":" in header[0], path

    @pytest.mark.parametrize("path", QUERY_FILES, ids=lambda p: p.name)
    def test_every_name_a_query_uses_is_emitted(self, path: Path) -> None:
        smartcar, dims, outcomes = kql_names(path.read_text())
        assert smartcar, f"{path.name} uses none of the code's metric or span names"
        assert smartcar <= names.METRICS | names.SPANS, smartcar - (names.METRICS | names.SPANS)
        assert dims <= names.ATTRIBUTES, dims - names.ATTRIBUTES
        assert outcomes <= KNOWN_OUTCOMES, outcomes - KNOWN_OUTCOMES

    def test_the_name_check_catches_a_misspelt_name(self) -> None:
        smartcar, dims, outcomes = kql_names(
            'customMetrics | where name == "smartcar.webhook.recieved"\n'
            '| where tostring(customDimensions.outcom) == "x"\n'
            '| where outcome in ("accepted", "acepted")'
        )
        assert smartcar - names.METRICS == {"smartcar.webhook.recieved"}
        assert dims - names.ATTRIBUTES == {"outcom"}
        assert outcomes - KNOWN_OUTCOMES == {"acepted"}

    def test_receiver_outcomes_are_all_the_outcome_constants(self) -> None:
        # The constants between the "Outcomes" comment and the next blank line of receiver.py.
        source = Path(receiver.__file__).read_text()
        block = source[source.index("# Outcomes"):].split("\n\n", 1)[0]
        constants = set(re.findall(r'(?m)^[A-Z_]+ = "([a-z_]+)"$', block))
        assert len(constants) == 9 and constants == RECEIVE_OUTCOMES

    def test_the_success_rate_puts_every_receiver_outcome_in_one_column(self) -> None:
        # succeeded + unavailable + rejected is the total: an outcome left out of every column
        # hides its answers from the breakdown.
        query = (QUERIES / "delivery_success_rate.kql").read_text()
        columns = {}
        for column in ("succeeded", "unavailable", "rejected"):
            found = re.search(rf"(?m)^\s*{column} = sumif\(valueSum, outcome (.*)\)[,]?$", query)
            assert found is not None, column
            columns[column] = set(re.findall(r'"([a-z_]+)"', found.group(1)))
        everything = set().union(*columns.values())
        assert sum(len(c) for c in columns.values()) == len(everything)  # no outcome twice
        assert everything == RECEIVE_OUTCOMES, RECEIVE_OUTCOMES ^ everything

    def test_every_alert_and_workbook_query_file_exists(self) -> None:
        loaded: set[str] = set()
        for module in ("alerts", "workbook"):
            template = load(MODULES / f"{module}.bicep")
            for call in find_calls(template.root, "loadTextContent"):
                arg = re.search(r"'([^']+)'", text(call))
                assert arg is not None
                target = (MODULES / arg.group(1)).resolve()
                assert target.is_file(), f"{module}.bicep loads missing {arg.group(1)}"
                loaded.add(target.name)
        assert {"delivery_success_rate.kql", "signature_failures.kql",
                "end_to_end_lag.kql", "receive_latency.kql"} <= loaded
        assert loaded == {p.name for p in QUERY_FILES}  # the workbook shows every query

    def test_each_log_alert_runs_its_query_file(self) -> None:
        alerts = load(MODULES / "alerts.bicep")
        rules = alerts.resources_of_type("Microsoft.Insights/scheduledQueryRules")
        # success rate, signature failures, processing lag, receive latency (Smartcar's 5 s),
        # Smartcar retries, delivery-to-answer latency, new payload shape
        assert len(rules) == 7
        for rule in rules:
            (call,) = find_calls(rule.body, "loadTextContent")
            assert "../queries/" in text(call), rule.symbol


# ---------------------------------------------------------------------------------------------
# 3. No token, signature or body in telemetry or in any log line at INFO or above.
# ---------------------------------------------------------------------------------------------
SECRET_TOKEN = "tok-" + uuid.uuid4().hex  # a test token


def _all_attribute_values(otel: Captured) -> list[str]:
    values: list[str] = []
    for span in otel.spans.get_finished_spans():
        values += [f"{k}={v!s}" for k, v in (span.attributes or {}).items()]
        values.append(span.name)
        for event in span.events:
            values += [f"{k}={v!s}" for k, v in (event.attributes or {}).items()]
        values.append(span.status.description or "")
    for name, points in otel.points().items():
        values.append(name)
        for attrs, _ in points:
            values += [f"{k}={v}" for k, v in attrs.items()]
    return values


class TestNothingSensitiveLeaks:
    def test_full_flow_over_http(
        self, otel: Captured, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        registry = _registry(fail=True)
        env = local_env(tmp_path, MAX_DELIVERY_COUNT="2")
        env["SMARTCAR_MANAGEMENT_TOKEN"] = SECRET_TOKEN
        marker = "secret-location-" + uuid.uuid4().hex
        event = state_event()
        event["data"]["signals"][0]["body"]["value"] = marker
        body = encode(event)
        signature = sign(SECRET_TOKEN, body)
        verify = encode({"eventType": "VERIFY", "eventId": str(uuid.uuid4()),
                         "data": {"challenge": "c-" + uuid.uuid4().hex}, "meta": {}})
        forged_signature = sign("wrong-" + SECRET_TOKEN, body)
        unreadable = b'{"eventType": "VEHICLE_STATE", "marker": "' + marker.encode() + b'"'
        set_telemetry(otel.telemetry)
        try:
            with RunningHost(env, registry=registry) as host:
                assert host.post(WEBHOOK, body, {"SC-Signature": signature}).status == 200
                assert host.post(WEBHOOK, verify, {}).status == 200
                assert host.post(WEBHOOK, body, {"SC-Signature": forged_signature}).status == 401
                assert host.post(ERRORS_WEBHOOK, body, {}).status == 401
                unreadable_sig = sign(SECRET_TOKEN, unreadable)
                assert host.post(WEBHOOK, unreadable, {"SC-Signature": unreadable_sig}).status == 200
                wait_until(lambda: len(host.dead_letters()) == 2, timeout=30)
        finally:
            set_telemetry(None)

        outcomes = {s.attributes[names.ATTR_OUTCOME]
                    for s in otel.finished(names.SPAN_PROCESS) if s.attributes}
        assert {"retried", "dead_lettered"} <= outcomes
        assert len(otel.finished(names.SPAN_RECEIVE)) == 5

        forbidden = [SECRET_TOKEN, signature, forged_signature, unreadable_sig, marker,
                     body.decode(), json.loads(verify)["data"]["challenge"]]
        telemetry_text = "\n".join(_all_attribute_values(otel))
        loud = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert loud, "the flow logs at INFO or above"
        log_text = "\n".join(
            r.getMessage() + (f"\n{r.exc_text}" if r.exc_text else "") for r in loud
        )
        for needle in forbidden:
            assert needle not in telemetry_text
            assert needle not in log_text
        # The body is logged, at DEBUG only: the filter above is not vacuous.
        quiet = "\n".join(r.getMessage() for r in caplog.records if r.levelno < logging.INFO)
        assert marker in quiet


# ---------------------------------------------------------------------------------------------
# Configuration: once per process; host.json asks the host for OpenTelemetry.
# ---------------------------------------------------------------------------------------------
class TestConfiguration:
    def test_host_json_enables_opentelemetry(self) -> None:
        host = json.loads((ROOT / "host.json").read_text())
        assert host["telemetryMode"] == "OpenTelemetry"

    def test_console_mode_prints_one_line_per_span_and_configures_once(self) -> None:
        script = (
            "import asyncio, logging\n"
            "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
            "from shared import telemetry\n"
            "assert telemetry.configure(connection_string=None, console=True) == 'console'\n"
            "assert telemetry.configure(connection_string='InstrumentationKey=x') == 'console'\n"
            "class R:\n"
            "    status = 200; outcome = 'accepted'; event_id = 'e1'; event_type = 'VERIFY'\n"
            "    authenticated = True\n"
            "async def decide():\n"
            "    return R()\n"
            "asyncio.run(telemetry.get_telemetry().observe_receive(decide))\n"
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert re.search(r"shared\.telemetry span smartcar\.webhook\.receive [\d.]+ms "
                         r"trace=[0-9a-f]{32} outcome=accepted", done.stderr), done.stderr

    def test_a_tracer_provider_the_worker_installed_is_used_and_nothing_configured_again(
        self,
    ) -> None:
        # shared/telemetry.py: with PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true the worker
        # calls the distro itself; configuring it again would export every span twice. The
        # distro is replaced by a recorder (the SDK boundary); the worker's provider is real.
        script = (
            "import json, os\n"
            "import azure.monitor.opentelemetry as distro\n"
            "calls = []\n"
            "distro.configure_azure_monitor = lambda **kwargs: calls.append(kwargs)\n"
            "from opentelemetry import trace\n"
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "worker = TracerProvider()\n"
            "trace.set_tracer_provider(worker)\n"
            "from shared import telemetry\n"
            "mode = telemetry.configure(connection_string='InstrumentationKey=x')\n"
            "print(json.dumps({'mode': mode, 'calls': len(calls),\n"
            "                  'same': trace.get_tracer_provider() is worker,\n"
            "                  'logs': os.environ.get('OTEL_LOGS_EXPORTER')}))\n"
        )
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_"))}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {
            "mode": "preconfigured", "calls": 0, "same": True, "logs": None}

    def test_the_redrive_timer_sets_telemetry_up_in_its_process(self, tmp_path: Path) -> None:
        # On Flex Consumption a timer can run on an instance no HTTP request reached.
        script = (
            "import asyncio\n"
            "from shared import redrive, telemetry\n"
            "class Timer:\n"
            "    past_due = False\n"
            "asyncio.run(redrive.handle_redrive_timer(Timer()))\n"
            "print(telemetry.configured_mode())\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "APPLICATIONINSIGHTS_CONNECTION_STRING"}
        env["LOCAL_STATE_DIR"] = str(tmp_path)
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "off"

    def test_a_refused_configuration_caches_no_runtime_and_the_next_request_tries_again(
        self, tmp_path: Path
    ) -> None:
        # The Azure Monitor distro refuses its configuration once (the SDK boundary, faked):
        # the request is told the app is misconfigured (503, not a 500), and nothing is kept,
        # so the next request configures telemetry instead of running on with it off.
        script = (
            "import asyncio, json\n"
            "import azure.functions as func\n"
            "import azure.monitor.opentelemetry as distro\n"
            "calls = []\n"
            "def configure_azure_monitor(**kwargs):\n"
            "    calls.append(kwargs['connection_string'])\n"
            "    if len(calls) == 1:\n"
            "        raise ValueError('Invalid instrumentation key. It should be a valid UUID.')\n"
            "distro.configure_azure_monitor = configure_azure_monitor\n"
            "from shared import functions, runtime, telemetry\n"
            "req = func.HttpRequest('GET', 'http://x/api/health', body=b'')\n"
            "seen = []\n"
            "for _ in range(2):\n"
            "    reply = asyncio.run(functions.handle_health(req))\n"
            "    seen.append([reply.status_code, json.loads(reply.get_body()),\n"
            "                 runtime._runtime is not None, telemetry.configured_mode()])\n"
            "print(json.dumps([seen, len(calls)]))\n"
        )
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_", "APPINSIGHTS_"))}
        env.update(LOCAL_STATE_DIR=str(tmp_path), SMARTCAR_MANAGEMENT_TOKEN="amt",
                   APPLICATIONINSIGHTS_CONNECTION_STRING=(
                       "InstrumentationKey=00000000-0000-0000-0000-000000000001"))
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False, env=env)
        assert done.returncode == 0, done.stderr
        seen, calls = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen == [[503, {"status": "misconfigured"}, False, None],
                        [200, {"status": "ok"}, True, "azure-monitor"]]
        assert calls == 2
        assert "APPLICATIONINSIGHTS_CONNECTION_STRING was refused by Azure Monitor" in done.stderr

    def test_without_connection_string_nothing_is_exported(self) -> None:
        script = (
            "from shared import telemetry\n"
            "assert telemetry.configure(connection_string=None) == 'off'\n"
            "from opentelemetry import trace\n"
            "print(type(trace.get_tracer_provider()).__name__)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ProxyTracerProvider"


@pytest.fixture(autouse=True)
def _no_leftover_telemetry() -> Iterator[None]:
    yield
    set_telemetry(None)


class TestRunbook:
    def test_observe_section_follows_its_marker_and_covers_queries_and_alerts(self) -> None:
        runbook = (ROOT / "docs" / "operations.md").read_text()
        assert "<!-- section: observe -->\n\n## Observe\n" in runbook
        section = runbook.split("\n## Observe\n", 1)[1].split("\n## ", 1)[0]
        assert "az monitor app-insights query --app" in section
        assert '--analytics-query "$(cat infra/queries/' in section
        # This section, or another docs page (docs/troubleshooting.md holds the delivery
        # signals, their queries and their runbook entries).
        documented = section + "".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
        for path in QUERY_FILES:
            assert path.name in documented, path.name
        for name in sorted(names.METRICS | names.SPANS):
            assert f"`{name}`" in documented, name
        for alert in ("delivery success rate", "signature failure spike", "processing lag",
                      "dead-lettered"):
            assert alert in section, alert


class TestSpillCounters:
    """The spill-over path counts what it spilled and what the timer re-drove."""

    def test_spilled_and_redriven_are_counted(self, otel: Captured, tmp_path: Path) -> None:
        from shared.publisher import OutboundMessage, PublishError
        from shared.spill import FileSpillStore, SpillingPublisher, redrive

        class DownQueue:
            async def publish(self, message: OutboundMessage) -> bool:
                raise PublishError("namespace unreachable")

            async def close(self) -> None:
                return None

        queue = LocalQueue(tmp_path / "q.sqlite3")
        store = FileSpillStore(tmp_path / "spill")
        set_telemetry(otel.telemetry)
        try:
            async def scenario() -> None:
                spilling = SpillingPublisher(DownQueue(), store)
                for i in range(3):
                    await spilling.publish(OutboundMessage(b"{}", f"m{i}"))
                await redrive(store, LocalQueuePublisher(queue))

            asyncio.run(scenario())
        finally:
            set_telemetry(None)
            queue.close()
        points = otel.points()
        assert sum(p.value for _, p in points[names.WEBHOOK_SPILLED]) == 3
        assert sum(p.value for _, p in points[names.SPILL_REDRIVEN]) == 3


class TestHostTraceContext:
    """The host's request, the receive span and the processing span are one trace."""

    def test_invocation_trace_context_parents_the_receive_span(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        trace_id, host_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        traceparent = f"00-{trace_id}-{host_span}-01"
        set_telemetry(otel.telemetry)
        try:
            with RunningHost(local_env(tmp_path)) as host:
                body = encode(state_event())
                headers = {**signed_headers(body), "traceparent": traceparent,
                           "tracestate": "k=v"}
                assert host.post(WEBHOOK, body, headers).status == 200
                wait_until(host.handled)
                wait_until(lambda: otel.finished(names.SPAN_PROCESS))
        finally:
            set_telemetry(None)
        (receive,) = otel.finished(names.SPAN_RECEIVE)
        (process,) = otel.finished(names.SPAN_PROCESS)
        assert format(receive.context.trace_id, "032x") == trace_id
        assert receive.parent is not None and format(receive.parent.span_id, "016x") == host_span
        assert process.context.trace_id == receive.context.trace_id
        assert process.parent is not None and process.parent.span_id == receive.context.span_id
        # The caller's tracestate (a vendor's part of the trace context) goes along: from the
        # request to the receive span, and through the message to the processing span.
        assert dict(receive.parent.trace_state) == {"k": "v"}
        assert dict(process.parent.trace_state) == {"k": "v"}

    def test_without_an_invocation_context_the_receive_span_is_a_root(
        self, otel: Captured, tmp_path: Path
    ) -> None:
        set_telemetry(otel.telemetry)
        try:
            with RunningHost(local_env(tmp_path)) as host:
                body = encode(state_event())
                assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        finally:
            set_telemetry(None)
        (receive,) = otel.finished(names.SPAN_RECEIVE)
        assert receive.parent is None

    def test_functions_read_the_workers_trace_context(self) -> None:
        from types import SimpleNamespace

        from shared.functions import invocation_trace_parent

        ctx = SimpleNamespace(trace_context=SimpleNamespace(trace_parent="00-a-b-01",
                                                            trace_state="k=v"))
        assert invocation_trace_parent(ctx) == {"traceparent": "00-a-b-01", "tracestate": "k=v"}  # type: ignore[arg-type]
        assert invocation_trace_parent(None) is None


class TestRecorders:
    """Each recorder's metric, read back through the SDK's own in-memory reader."""

    def test_redriven_counts_one_by_default(self, otel: Captured) -> None:
        otel.telemetry.record_redriven()
        otel.telemetry.record_spilled()
        assert otel.total(names.SPILL_REDRIVEN) == otel.total(names.WEBHOOK_SPILLED) == 1

    def test_delivery_to_answer_is_recorded_by_a_bounded_event_type(self, otel: Captured) -> None:
        otel.telemetry.record_delivery_to_answer(12.5, "VEHICLE_STATE")
        otel.telemetry.record_delivery_to_answer(7.5, "not a <type>")
        recorded = {attrs[names.ATTR_EVENT_TYPE]: (point.count, point.sum) for attrs, point
                    in otel.points()[names.WEBHOOK_DELIVERY_TO_ANSWER]}
        assert recorded == {"VEHICLE_STATE": (1, 12.5), names.UNKNOWN_EVENT_TYPE: (1, 7.5)}

    def test_a_new_shape_is_counted_with_what_it_is(self, otel: Captured) -> None:
        @dataclass
        class Shape:
            id: str
            known: bool
            event_type: str | None
            version: str | None

        otel.telemetry.record_new_shape(Shape("abc123", False, "VEHICLE_ERROR", None))
        otel.telemetry.record_new_shape(Shape("def456", True, "VEHICLE_STATE", "4.0"))
        assert sorted((attrs for attrs, _ in otel.points()[names.PAYLOAD_SHAPE_FIRST_SEEN]),
                      key=lambda a: a[names.ATTR_SHAPE_ID]) == [
            {names.ATTR_SHAPE_ID: "abc123", names.ATTR_SHAPE_KNOWN: "false",
             names.ATTR_EVENT_TYPE: "VEHICLE_ERROR", names.ATTR_META_VERSION: "absent"},
            {names.ATTR_SHAPE_ID: "def456", names.ATTR_SHAPE_KNOWN: "true",
             names.ATTR_EVENT_TYPE: "VEHICLE_STATE", names.ATTR_META_VERSION: "4.0"},
        ]

    def test_a_failing_decision_leaves_no_exception_on_the_receive_span(
        self, otel: Captured
    ) -> None:
        """An exception's message may quote what a sender wrote: the span records neither
        it nor an error status (the host logs the failure its own way)."""
        async def decide() -> Any:
            raise RuntimeError("body said: 52.1,13.4")

        with pytest.raises(RuntimeError):
            asyncio.run(otel.telemetry.observe_receive(decide))
        [span] = otel.finished(names.SPAN_RECEIVE)
        assert list(span.events) == []
        assert span.status.status_code.name == "UNSET"

    def test_message_properties_are_read_as_text_and_the_rest_left_out(
        self, otel: Captured
    ) -> None:
        """Service Bus may hand application properties over as bytes: those are text; a
        number, or bytes that are not UTF-8, are not taken for an eventType or an eventId."""
        props = {names.ATTR_EVENT_TYPE.encode(): b"VEHICLE_STATE", names.ATTR_EVENT_ID: 42,
                 names.ATTR_VEHICLE_ID: b"\xff\xfe"}
        with otel.telemetry.observe_process(props, message_id="m1", delivery_count=1) as obs:
            assert (obs.event_type, obs.event_id, obs.vehicle_id) == ("VEHICLE_STATE", None, None)


class TestMetricsAreDocumented:
    """The runbook's metrics table (docs/operations.md) names every instrument the app
    creates, with its kind and, for a histogram, its unit; and nothing it does not create."""

    @staticmethod
    def documented() -> dict[str, str]:
        rows: dict[str, str] = {}
        text = (DOCS / "operations.md").read_text()
        table = text[text.index("**Metrics**"):text.index("**Traces**")]
        for line in table.splitlines():
            if not line.startswith("| `smartcar."):
                continue
            first, kind = (cell.strip() for cell in line.split("|")[1:3])
            for name in re.findall(r"`([^`]+)`", first):
                rows[name] = kind
        return rows

    def test_every_instrument_is_in_the_runbook_with_its_kind(self, otel: Captured) -> None:
        from opentelemetry.metrics import Counter, Histogram
        from opentelemetry.sdk.metrics.export import Histogram as HistogramData
        from opentelemetry.sdk.metrics.export import Sum

        for instrument in vars(otel.telemetry).values():
            if isinstance(instrument, Counter):
                instrument.add(1)
            elif isinstance(instrument, Histogram):
                instrument.record(1.0)
        data = otel.metrics.get_metrics_data()
        assert data is not None
        emitted = {metric.name: metric for rm in data.resource_metrics
                   for sm in rm.scope_metrics for metric in sm.metrics}
        documented = self.documented()
        assert set(emitted) == set(documented)
        for name, metric in emitted.items():
            kind = documented[name]
            if isinstance(metric.data, HistogramData):
                assert kind == "histogram, ms" and metric.unit == "ms", name
            else:
                assert isinstance(metric.data, Sum) and metric.data.is_monotonic, name
                assert kind in ("counter", "counters"), name


class TestProcessAndReceiveRecords:
    """What the processing span and its metrics carry for each outcome, and the receive
    span's status, through the SDK's in-memory exporter and reader."""

    NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    @pytest.fixture
    def clocked(self) -> Captured:
        return captured(clock=lambda: self.NOW)

    def process(self, otel: Captured, outcome: str | None, *,
                delivered_at: datetime | None = None,
                error_type: str | None = None) -> None:
        with otel.telemetry.observe_process({}, message_id="m", delivery_count=1) as obs:
            obs.event_type = "VEHICLE_STATE"
            obs.outcome = outcome
            obs.delivered_at = delivered_at
            obs.error_type = error_type

    def test_the_lag_is_recorded_for_handled_and_unhandled_never_below_zero(
        self, clocked: Captured
    ) -> None:
        self.process(clocked, names.PROCESS_HANDLED, delivered_at=self.NOW - timedelta(seconds=2))
        self.process(clocked, names.PROCESS_UNHANDLED, delivered_at=self.NOW - timedelta(seconds=1))
        # Smartcar's clock ahead of ours: counted as no lag, not a negative one.
        self.process(clocked, names.PROCESS_HANDLED, delivered_at=self.NOW + timedelta(seconds=5))
        # A retry or a dead-letter is not a delivery done: no lag.
        self.process(clocked, names.PROCESS_RETRIED, delivered_at=self.NOW - timedelta(hours=1))
        self.process(clocked, names.PROCESS_DEAD_LETTERED,
                     delivered_at=self.NOW - timedelta(hours=1))
        [(attrs, point)] = clocked.points()[names.EVENT_DELIVERY_LAG]
        assert attrs == {names.ATTR_EVENT_TYPE: "VEHICLE_STATE"}
        assert (point.count, point.sum, point.min) == (3, 3000.0, 0.0)

    def test_each_outcome_has_its_duration_and_a_failure_its_error_status(
        self, clocked: Captured
    ) -> None:
        self.process(clocked, names.PROCESS_RETRIED, error_type="ValueError")
        self.process(clocked, names.PROCESS_DEAD_LETTERED)
        self.process(clocked, names.PROCESS_HANDLED)
        durations = sorted(attrs[names.ATTR_OUTCOME] for attrs, point
                           in clocked.points()[names.EVENT_PROCESS_DURATION]
                           if attrs[names.ATTR_EVENT_TYPE] == "VEHICLE_STATE"
                           and point.count == 1)
        assert durations == sorted([names.PROCESS_RETRIED, names.PROCESS_DEAD_LETTERED,
                                    names.PROCESS_HANDLED])
        statuses = [(s.status.status_code.name, s.status.description)
                    for s in clocked.finished(names.SPAN_PROCESS)]
        assert statuses == [("ERROR", "ValueError"), ("ERROR", names.PROCESS_DEAD_LETTERED),
                            ("UNSET", None)]

    def test_a_delivery_that_is_not_an_event_is_traced_but_not_counted(
        self, clocked: Captured
    ) -> None:
        """No outcome (a dead-letter copy, for one): a span, and no metric at all."""
        self.process(clocked, None, delivered_at=self.NOW)
        assert len(clocked.finished(names.SPAN_PROCESS)) == 1
        assert clocked.points() == {}

    def test_the_processing_span_names_the_vehicle_and_keeps_no_exception(
        self, clocked: Captured
    ) -> None:
        """The processor decides the outcome; an exception escaping the span is not recorded
        on it (its message may quote the payload, which holds a location)."""
        props = {names.ATTR_VEHICLE_ID: "v-1", names.ATTR_EVENT_ID: "e-1"}
        with pytest.raises(RuntimeError), clocked.telemetry.observe_process(
                props, message_id="m", delivery_count=1) as obs:
            assert (obs.vehicle_id, obs.event_id) == ("v-1", "e-1")
            raise RuntimeError("at 52.52,13.40")
        [span] = clocked.finished(names.SPAN_PROCESS)
        assert list(span.events) == [] and span.status.status_code.name == "UNSET"
        assert span.attributes is not None and span.attributes[names.ATTR_VEHICLE_ID] == "v-1"

    @pytest.mark.parametrize(("status", "code"), [(499, "UNSET"), (500, "ERROR"), (503, "ERROR")])
    def test_a_server_error_answer_marks_the_receive_span(
        self, otel: Captured, status: int, code: str
    ) -> None:
        @dataclass
        class Reply:
            status: int
            outcome: str = "unavailable"
            event_id: str | None = None
            event_type: str | None = None
            authenticated: bool = False

        async def decide() -> Reply:
            return Reply(status)

        asyncio.run(otel.telemetry.observe_receive(decide))
        [span] = otel.finished(names.SPAN_RECEIVE)
        assert span.status.status_code.name == code
