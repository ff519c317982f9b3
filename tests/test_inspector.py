"""The local inspector: who can reach it, what it keeps, and where (memory only).

The HTTP tests run the real local host process (`python -m shared.local`) and read the
inspector's URL from its banner; the recorder's own rules are tested in-process.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from shared import telemetry_names as names
from shared.cli.simulate import build_event
from shared.local.inspector import Recorder, redact_header
from shared.local.queue_open import QUEUE_FILE
from shared.settings import SettingsError, load_settings
from shared.signature import sign

from .inspector_host import HostProcess
from .support import http_request, wait_until

# -- what the page shows ---------------------------------------------------------------------


class TestRedaction:
    def test_the_signature_is_cut_to_its_first_8_hex_digits(self) -> None:
        signature = sign("amt", b'{"pizza":"pasta"}')
        shown = redact_header("sc-signature", signature)
        assert shown.startswith("4c05a8da") and signature not in shown
        assert signature[8:16] not in shown

    def test_any_header_case_is_redacted(self) -> None:
        signature = "ab" * 32
        assert redact_header("SC-SIGNATURE", signature).startswith("abababab…")
        assert signature not in redact_header("Sc-Signature", signature)

    def test_a_signature_header_that_is_not_hex_is_hidden_entirely(self) -> None:
        assert redact_header("SC-Signature", "<script>x") == "[redacted: not a hex signature]"

    def test_credentials_are_hidden_entirely(self) -> None:
        for header in ("Authorization", "Cookie", "x-functions-key"):
            assert redact_header(header, "secret-value") == "[redacted]"
        assert redact_header("Content-Type", "application/json") == "application/json"

    def test_proxy_credentials_and_api_keys_are_hidden_entirely(self) -> None:
        # A client behind a proxy (or a tunnel that adds one) sends its proxy credentials;
        # gateways and test tools send API keys: the headers table must not show either.
        for header in ("Proxy-Authorization", "proxy-authorization", "X-Api-Key", "x-api-key"):
            assert redact_header(header, "Basic dXNlcjpzZWNyZXQ=") == "[redacted]"


def _record(recorder: Recorder, body: bytes, status: int = 200) -> None:
    answered = recorder.http_request("webhooks/smartcar", "POST",
                                     {"SC-Signature": sign("amt", body)}, body)
    answered(status, b'{"status":"accepted"}')


class TestRing:
    def test_only_the_last_deliveries_are_kept_and_older_bodies_are_forgotten(self) -> None:
        recorder = Recorder(capacity=3)
        bodies = [build_event("state") for _ in range(5)]
        for body in bodies:
            _record(recorder, body)
        assert recorder.ids() == [3, 4, 5]
        assert recorder.detail(1) is None and recorder.detail(2) is None
        kept = recorder.detail(5)
        assert kept is not None and json.loads(kept["body"]) == json.loads(bodies[4])

    def test_changes_are_listed_newest_first_and_only_once_seen(self) -> None:
        recorder = Recorder()
        for _ in range(3):
            _record(recorder, build_event("state"))
        version, changed = recorder.snapshot(0)[:2]
        assert [d["id"] for d in changed] == [3, 2, 1]
        assert recorder.snapshot(version)[:2] == (version, [])

    def test_health_checks_and_other_gets_are_not_deliveries(self) -> None:
        recorder = Recorder()
        recorder.http_request("health", "GET", {}, b"")(200, b'{"status":"ok"}')
        assert recorder.ids() == []

    def test_a_capacity_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least one delivery, got capacity 0"):
            Recorder(capacity=0)


class TestOutcomesFromSpans:
    """The receiver's and processor's own spans say what was decided; the trace id joins
    the processing of a message to the request that stored it."""

    def test_receive_and_processing_outcomes_join_their_request(self) -> None:
        provider = TracerProvider()
        recorder = Recorder()
        assert recorder.attach(provider)
        tracer = provider.get_tracer("test")
        body = build_event("state")
        answered = recorder.http_request("webhooks/smartcar", "POST", {}, body)
        with tracer.start_as_current_span(names.SPAN_RECEIVE) as span:
            span.set_attribute(names.ATTR_OUTCOME, "accepted")
            receive_context = span.get_span_context()
        answered(200, b"{}")
        with tracer.start_as_current_span(names.SPAN_PROCESS, context=None) as other:
            other.set_attribute(names.ATTR_OUTCOME, "handled")  # another trace: another row
        from opentelemetry import trace

        parent = trace.set_span_in_context(trace.NonRecordingSpan(receive_context))
        with tracer.start_as_current_span(names.SPAN_PROCESS, context=parent) as process:
            process.set_attribute(names.ATTR_OUTCOME, "dead_lettered")
            process.set_attribute(names.ATTR_DEAD_LETTER_REASON, "InvalidPayload")
            process.set_attribute(names.ATTR_DELIVERY_COUNT, 1)
        detail = recorder.detail(1)
        assert detail is not None
        assert detail["outcome"] == "accepted"
        assert detail["traceId"] == format(receive_context.trace_id, "032x")
        assert [(a["outcome"], a["deadLetterReason"]) for a in detail["processingAttempts"]] == [
            ("dead_lettered", "InvalidPayload")
        ]
        unknown = recorder.detail(2)
        assert unknown is not None and unknown["route"] is None and unknown["body"] is None

    def test_processing_that_ends_before_the_receive_span_still_joins_its_request(self) -> None:
        # The message is stored inside the receive span: a worker may process it (and end
        # its span) before the receive span ends. Seen under load in the browser test.
        provider = TracerProvider()
        recorder = Recorder()
        recorder.attach(provider)
        tracer = provider.get_tracer("test")
        answered = recorder.http_request("webhooks/smartcar", "POST", {}, build_event("state"))
        with tracer.start_as_current_span(names.SPAN_RECEIVE) as receive:
            with tracer.start_as_current_span(names.SPAN_PROCESS) as process:
                process.set_attribute(names.ATTR_OUTCOME, "handled")
            receive.set_attribute(names.ATTR_OUTCOME, "accepted")
        answered(200, b"{}")
        assert recorder.ids() == [1]
        detail = recorder.detail(1)
        assert detail is not None and detail["outcome"] == "accepted"
        assert [a["outcome"] for a in detail["processingAttempts"]] == ["handled"]

    def test_without_the_sdk_there_are_no_outcomes_and_it_says_so(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        from opentelemetry.trace import NoOpTracerProvider

        assert Recorder().attach(NoOpTracerProvider()) is False
        assert "outcomes not shown" in caplog.text


class TestSetting:
    def test_unset_means_the_webhook_port_plus_one(self) -> None:
        from shared.local.inspector_server import inspector_port

        assert inspector_port(load_settings({}), 7071) == 7072
        assert inspector_port(load_settings({"INSPECTOR_PORT": "9000"}), 7071) == 9000
        assert inspector_port(load_settings({}), 0) == 0

    @pytest.mark.parametrize("raw", ["abc", "70000", "-1", "7072.5", "²"])
    def test_a_malformed_port_is_named_with_what_came(self, raw: str) -> None:
        with pytest.raises(SettingsError, match=f"INSPECTOR_PORT must be a TCP port .*got {raw!r}"):
            load_settings({"INSPECTOR_PORT": raw})


# -- who can reach it ------------------------------------------------------------------------


class TestAccess:
    def test_requests_without_the_token_are_refused_with_403(self, tmp_path: Path) -> None:
        with HostProcess(tmp_path) as host:
            port = host.inspector_port
            wrong = "x" * len(host.token)
            for path in ("/", "/api/deliveries", f"/{wrong}/", f"/{wrong}/api/deliveries",
                         f"/{host.token[:-1]}/api/deliveries", "/static/inspector.js"):
                answer = http_request(port, "GET", path)
                assert answer.status == 403, path
                assert b"open the URL the local host printed" in answer.body
            purge = http_request(port, "POST", f"/{wrong}/api/dlq/1/purge")
            assert purge.status == 403
            page = host.inspector("")
            assert page.status == 200 and b"local inspector" in page.body
            assert page.headers["referrer-policy"] == "no-referrer"
            # Exactly: a substring would also pass "script-src 'self' 'unsafe-inline'", which
            # lets markup in a stranger's body run.
            directives = {d.split()[0]: d.split()[1:] for d in
                          page.headers["content-security-policy"].split(";") if d.strip()}
            assert directives["script-src"] == ["'self'"]
            assert directives["default-src"] == ["'none'"]
            assert directives["style-src"] == ["'self'"]
            assert host.inspector("api/deliveries").status == 200

    def test_a_page_reaching_it_under_another_host_name_is_refused(self, tmp_path: Path) -> None:
        # A DNS-rebinding page sends its own host name; the token alone must not be enough.
        with HostProcess(tmp_path) as host:
            foreign = host.inspector("api/deliveries",
                                     headers={"Host": f"attacker.example:{host.inspector_port}"})
            assert foreign.status == 403
            assert host.inspector("api/deliveries",
                                  headers={"Host": f"localhost:{host.inspector_port}"}).status == 200

    def test_the_webhook_port_does_not_serve_it_even_with_the_token(self, tmp_path: Path) -> None:
        with HostProcess(tmp_path) as host:
            for path in (f"/{host.token}/", f"/{host.token}/api/deliveries",
                         f"/{host.token}/static/inspector.js"):
                assert http_request(host.port, "GET", path).status == 404, path
            assert http_request(host.port, "GET", "/api/health").status == 200

    def test_it_listens_on_loopback_only_while_the_webhooks_listen_everywhere(
        self, tmp_path: Path
    ) -> None:
        # HOST=0.0.0.0 is what a tunnel or a container setup uses for the webhook port.
        # On Linux all of 127/8 reaches a socket bound to 0.0.0.0, but not one bound to
        # 127.0.0.1: 127.0.0.2 tells the two apart without any outside interface.
        with HostProcess(tmp_path, host="0.0.0.0") as host:
            assert http_request_to("127.0.0.2", host.port, "/api/health") == 200
            with pytest.raises(ConnectionRefusedError):
                http_request_to("127.0.0.2", host.inspector_port, f"/{host.token}/")
            assert listening_addresses(host.inspector_port) == {"127.0.0.1"}
            assert listening_addresses(host.port) == {"0.0.0.0"}

    def test_a_taken_inspector_port_leaves_the_webhooks_running(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            host = HostProcess(tmp_path, extra_env={"INSPECTOR_PORT": str(port)},
                               expect_inspector=False)
            with host:
                wait_until(lambda: "Inspector: not started" in host.output(), timeout=60)
                assert f"cannot listen on 127.0.0.1:{port}" in host.output()
                assert "set INSPECTOR_PORT to a free port" in host.output()
                body = build_event("state")
                assert host.post(body).status == 200


def http_request_to(address: str, port: int, path: str) -> int:
    import http.client

    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (Linux /proc/net/tcp*)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            if len(address) == 8:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
            else:
                found.add(f"ipv6:{address}")
    return found


# -- what reaches the disk -------------------------------------------------------------------

# Runs the local host with an audit hook that logs every file Python opens for writing, and
# which of those opens came from the inspector's modules (none may).
AUDITED_HOST = textwrap.dedent(
    """
    import os, runpy, sys
    log = open(os.environ["WRITES_LOG"], "a", buffering=1)
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
    INSPECTOR = ("inspector.py", "inspector_server.py")

    def hook(event, args):
        if event != "open" or isinstance(args[0], int):
            return
        path, mode, flags = args
        if not ((mode and any(c in mode for c in "wax+")) or (flags or 0) & WRITE):
            return
        frame, by_inspector = sys._getframe(1), False
        while frame is not None:
            by_inspector = by_inspector or frame.f_code.co_filename.endswith(INSPECTOR)
            frame = frame.f_back
        log.write(("INSPECTOR " if by_inspector else "") + os.fsdecode(path) + "\\n")

    sys.addaudithook(hook)
    sys.argv = ["shared.local"]
    runpy.run_module("shared.local", run_name="__main__", alter_sys=True)
    """
)


def files_containing(root: Path, marker: bytes) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and marker in p.read_bytes()}


class TestBodiesStayInMemory:
    def test_no_body_reaches_the_disk_through_the_inspector(self, tmp_path: Path) -> None:
        # Three bodies, each with a marker: one handled (then deleted from the queue), one
        # dead-lettered (kept in the queue: the control that the scan finds markers on disk),
        # one forged (never stored anywhere). The inspector shows all three.
        markers = {kind: f"{kind}-marker-{uuid.uuid4()}" for kind in ("handled", "dead", "forged")}
        handled = json.loads(build_event("state"))
        handled["data"]["vehicle"]["model"] = markers["handled"]
        dead = {"eventId": str(uuid.uuid4()), "eventType": "VEHICLE_STATE",
                "data": markers["dead"], "meta": {}}
        forged = json.loads(build_event("state"))
        forged["data"]["vehicle"]["model"] = markers["forged"]
        bodies = {kind: json.dumps(doc).encode() for kind, doc in
                  (("handled", handled), ("dead", dead), ("forged", forged))}
        writes = tmp_path / "writes.log"
        host = HostProcess(tmp_path, python=[sys.executable, "-c", AUDITED_HOST],
                           extra_env={"WRITES_LOG": str(writes)})
        with host:
            assert host.post(bodies["handled"]).status == 200
            assert host.post(bodies["dead"]).status == 200
            assert host.post(bodies["forged"], signature=sign("wrong", bodies["forged"])
                             ).status == 401
            host.wait_for(lambda: sorted(
                (d["outcome"], (d["processing"] or {}).get("outcome", "")) for d in host.deliveries()
            ) == [("accepted", "dead_lettered"), ("accepted", "handled"),
                  ("signature_rejected", "")])
            shown = b"".join(host.inspector(f"api/deliveries/{d['id']}").body
                             for d in host.deliveries())
            (letter,) = json.loads(host.inspector("api/dlq").body)["deadLetters"]
            shown += host.inspector(f"api/dlq/{letter['sequenceNumber']}").body
            assert all(marker.encode() in shown for marker in markers.values())
        assert host.proc is not None and host.proc.returncode == 0, host.output()

        written = writes.read_text().splitlines()
        assert any(w.endswith("handled.jsonl") for w in written), "the hook sees the host's writes"
        assert [w for w in written if w.startswith("INSPECTOR ")] == []
        # Everywhere the process wrote, and the test's own directory (state, TMPDIR, the log).
        roots = {tmp_path, *(Path(w).parent for w in written)}
        for root in sorted(r for r in roots if r.is_dir()):
            assert files_containing(root, markers["forged"].encode()) == set(), root
            for kind in ("handled", "dead"):
                holding = files_containing(root, markers[kind].encode())
                # The queue file stores what was accepted; nothing else may.
                assert {p.name for p in holding} <= {QUEUE_FILE, f"{QUEUE_FILE}-wal"}, holding
        assert files_containing(host.state, markers["dead"].encode()), (
            "the queue keeps the dead letter's body: the scan does find a marker on disk")
