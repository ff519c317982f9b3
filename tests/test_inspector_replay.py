"""The inspector's additions below the page: a failed attempt's exception and the handlers'
own run time, and sending a verified delivery again ("Copy as curl", "Resend") with its
original bytes and signature. The browser test (tests/test_inspector_browser.py) drives the
same through the page."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from shared import telemetry_names as names
from shared.cli.simulate import build_event
from shared.events import parse_event
from shared.handlers import HANDLER_SECONDS, HandlerContext, HandlerRegistry
from shared.local.inspector import ERROR_MESSAGE_SHOWN, Recorder, curl_command
from shared.publisher import PublishError
from shared.receiver import receive
from shared.settings import load_settings
from shared.signature import sign
from shared.telemetry import Telemetry
from shared.tokens import StaticTokenProvider, TokenUnavailableError

from .inspector_host import HostProcess
from .support import TOKEN, local_env

# -- the command -------------------------------------------------------------------------------

AWKWARD_BODIES = [
    b'{"eventId":"e1"}',
    b"{\"quote\":\"it's\",\"backslash\":\"a\\\\b\",\"dollar\":\"$(touch /tmp/x) `id` $HOME\"}",
    b'{\n  "pretty": true,\n\t"tab": 1\n}\n',
    '{"unicode":"Ünïcødé ✓ 🚗"}'.encode(),
    b'@not-a-file',
    b"-d not an option",
    b'{"raw":"\xff\xfe bytes that are not UTF-8"}',
]


class TestCurlCommand:
    @pytest.mark.parametrize("body", AWKWARD_BODIES, ids=range(len(AWKWARD_BODIES)))
    def test_bash_passes_the_body_on_byte_for_byte(self, body: bytes) -> None:
        command = curl_command("http://127.0.0.1:9/x", body, "ab" * 32)
        printed = command.split(" | curl ", 1)[0]
        result = subprocess.run(["bash", "-c", printed], capture_output=True, timeout=10,
                                check=True)
        assert result.stdout == body

    def test_the_original_signature_and_the_body_from_standard_input(self) -> None:
        body = b'{"eventId":"e1"}'
        signature = sign(TOKEN, body)
        command = curl_command("http://127.0.0.1:7071/api/webhooks/smartcar", body, signature)
        assert command.endswith(
            "| curl -sS -X POST http://127.0.0.1:7071/api/webhooks/smartcar "
            f"-H 'Content-Type: application/json' -H 'SC-Signature: {signature}' "
            "--data-binary @-")

    def test_a_nul_byte_has_no_command(self) -> None:
        with pytest.raises(ValueError, match="NUL byte"):
            curl_command("http://127.0.0.1:9/x", b'{"a":"\x00"}', "ab" * 32)


# -- what can be sent again ----------------------------------------------------------------------


def _record(recorder: Recorder, body: bytes, headers: dict[str, str], status: int) -> int:
    answered = recorder.http_request("webhooks/smartcar", "POST", headers, body)
    answered(status, b"{}")
    return recorder.ids()[-1]


class _NoToken:
    async def get_tokens(self) -> list[str]:
        raise TokenUnavailableError("Key Vault unreachable")

    async def refresh(self) -> bool:
        return False


class _Queue:
    def __init__(self, *, down: bool = False) -> None:
        self.down = down

    async def publish(self, message: Any) -> bool:
        if self.down:
            raise PublishError("queue unreachable")
        return True

    async def close(self) -> None:
        return None


class TestWhatCanBeSentAgain:
    def test_only_a_signed_delivery_whose_signature_the_receiver_verified(self) -> None:
        """The receiver's verdict (its span's `authenticated`), not the status: a 413 and a
        503 for want of a token are answered before any check, so a signature sent with them
        is not known to verify; a 503 because the queue is down comes after the check."""
        provider, recorder = TracerProvider(), Recorder()
        recorder.attach(provider)
        telemetry = Telemetry(tracer_provider=provider)
        body = build_event("state")
        good, forged = sign(TOKEN, body), sign("wrong", body)

        async def post(headers: dict[str, str], *, tokens: Any = None, publisher: Any = None,
                       limit: int = 1 << 20) -> int:
            answered = recorder.http_request("webhooks/smartcar", "POST", headers, body)
            reply = await receive(body, headers, tokens=tokens or StaticTokenProvider(TOKEN),
                                  publisher=publisher or _Queue(),
                                  max_body_bytes=limit, telemetry=telemetry)
            answered(reply.status, reply.body_bytes())
            return recorder.ids()[-1]

        async def scenario() -> dict[str, int]:
            return {
                "verified": await post({"sc-SIGNATURE": good}),
                "forged": await post({"SC-Signature": forged}),
                "unsigned": await post({}),
                "too large": await post({"SC-Signature": "forged-not-hex"}, limit=10),
                "no token": await post({"SC-Signature": "forged-not-hex"}, tokens=_NoToken()),
                "queue down": await post({"SC-Signature": good}, publisher=_Queue(down=True)),
            }

        ids = asyncio.run(scenario())
        statuses = {name: recorder.detail(i)["status"]  # type: ignore[index]
                    for name, i in ids.items()}
        assert statuses == {"verified": 200, "forged": 401, "unsigned": 401, "too large": 413,
                            "no token": 503, "queue down": 503}
        assert recorder.original(ids["verified"]) == ("webhooks/smartcar", body, good)
        assert recorder.original(ids["queue down"]) == ("webhooks/smartcar", body, good)
        assert recorder.original(999) is None
        summaries = {s["id"]: s["replayable"] for s in recorder.snapshot(0)[1]}
        assert {name: summaries[i] for name, i in ids.items()} == {
            "verified": True, "forged": False, "unsigned": False, "too large": False,
            "no token": False, "queue down": True}
        for name in ("forged", "unsigned", "too large", "no token"):
            assert recorder.original(ids[name]) is None, name

    def test_not_before_it_was_answered(self) -> None:
        recorder = Recorder()
        body = build_event("state")
        recorder.http_request("webhooks/smartcar", "POST", {"SC-Signature": sign(TOKEN, body)},
                              body)
        assert recorder.original(recorder.ids()[-1]) is None


# -- the attempt ---------------------------------------------------------------------------------


def _attempt(recorder: Recorder, provider: TracerProvider, message_id: str, count: int) -> None:
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(names.SPAN_PROCESS, context=trace.set_span_in_context(
            trace.INVALID_SPAN)) as span:
        span.set_attribute(names.ATTR_MESSAGE_ID, message_id)
        span.set_attribute(names.ATTR_DELIVERY_COUNT, count)
        span.set_attribute(names.ATTR_OUTCOME, "retried")
        span.set_attribute(names.ATTR_ERROR_TYPE, "HandlerFailedError")


class TestAttemptFinished:
    def test_the_handler_time_and_the_exception_go_to_their_attempt(self) -> None:
        provider, recorder = TracerProvider(), Recorder()
        recorder.attach(provider)
        _attempt(recorder, provider, "m-1", 1)
        _attempt(recorder, provider, "m-1", 2)
        _attempt(recorder, provider, "m-2", 1)
        recorder.attempt_finished("m-1", 1, 12.34, ValueError("downstream said no"))
        recorder.attempt_finished("m-1", 2, 5.0, None)
        attempts = {(a["messageId"], a["deliveryCount"]): a
                    for d in recorder.snapshot(0)[1]
                    for a in recorder.detail(d["id"])["processingAttempts"]}  # type: ignore[index]
        first = attempts[("m-1", 1)]
        assert (first["handlerMs"], first["errorType"], first["errorMessage"]) == (
            12.3, "ValueError", "downstream said no")
        second = attempts[("m-1", 2)]
        assert (second["handlerMs"], second["errorType"], second["errorMessage"]) == (
            5.0, "HandlerFailedError", None)
        untouched = attempts[("m-2", 1)]
        assert (untouched["handlerMs"], untouched["errorMessage"]) == (None, None)

    def test_a_long_message_is_cut(self) -> None:
        provider, recorder = TracerProvider(), Recorder()
        recorder.attach(provider)
        _attempt(recorder, provider, "m-1", 1)
        recorder.attempt_finished("m-1", 1, None, RuntimeError("x" * 2000))
        (attempt,) = recorder.detail(1)["processingAttempts"]  # type: ignore[index]
        assert len(attempt["errorMessage"]) == ERROR_MESSAGE_SHOWN
        assert attempt["errorMessage"].endswith("…")

    def test_an_attempt_changes_the_version_the_page_polls(self) -> None:
        provider, recorder = TracerProvider(), Recorder()
        recorder.attach(provider)
        _attempt(recorder, provider, "m-1", 1)
        version, _ = recorder.snapshot(0)[:2]
        recorder.attempt_finished("m-1", 1, 1.0, None)
        later, changed = recorder.snapshot(version)[:2]
        assert later > version and len(changed) == 1


class TestHandlerSeconds:
    """Measured around the handlers alone: whether they return, raise or are cancelled."""

    def _dispatch(self, registry: HandlerRegistry, tmp_path: Path) -> float | None:
        event = parse_event(build_event("state"))
        context = HandlerContext(settings=load_settings(local_env(tmp_path)), message_id="m",
                                 delivery_count=1)

        async def run() -> float | None:
            try:
                await asyncio.wait_for(registry.dispatch(event, context), 0.5)
            except (ValueError, TimeoutError):
                pass
            return HANDLER_SECONDS.get()

        return asyncio.run(run())

    def test_a_handler_that_raises(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        def fail(event: Any, context: Any) -> None:
            time.sleep(0.2)
            raise ValueError("no")

        seconds = self._dispatch(registry, tmp_path)
        assert seconds is not None and 0.2 <= seconds < 0.45

    def test_a_handler_cancelled_by_the_timeout(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()

        @registry.on("VEHICLE_STATE")
        async def hang(event: Any, context: Any) -> None:
            await asyncio.sleep(10)

        seconds = self._dispatch(registry, tmp_path)
        # Up to the cancellation (0.5 s, later on a busy machine), not the 10 s it would sleep.
        assert seconds is not None and 0.5 <= seconds < 9


# -- over HTTP -----------------------------------------------------------------------------------


class TestOverHttp:
    def test_resend_posts_the_original_bytes_and_signature_to_the_webhook(
            self, tmp_path: Path) -> None:
        with HostProcess(tmp_path) as host:
            body = build_event("state")
            assert host.post(body).status == 200
            forged = build_event("state")
            assert host.post(forged, signature=sign("wrong", forged)).status == 401
            ids = {json.loads(host.inspector(f"api/deliveries/{d['id']}").body)["eventId"]: d["id"]
                   for d in host.deliveries()}
            resent = host.inspector(f"api/deliveries/{ids[json.loads(body)['eventId']]}/resend",
                                    method="POST")
            assert resent.status == 200
            answer = json.loads(resent.body)
            assert answer["status"] == 200
            assert json.loads(answer["body"]) == {"status": "duplicate",
                                                  "eventId": json.loads(body)["eventId"]}
            refused = host.inspector(f"api/deliveries/{ids[json.loads(forged)['eventId']]}/curl")
            assert refused.status == 404
            assert b"only a signed delivery whose signature verified" in refused.body
            assert host.inspector(
                f"api/deliveries/{ids[json.loads(forged)['eventId']]}/resend",
                method="POST").status == 404
