"""The inspector against strangers: any stored body is shown (never a 5xx), a flood of unsigned
requests cannot push real deliveries out of its memory, which is bounded in bytes, and a page
on another site cannot replay or purge dead letters.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from shared.cli.simulate import build_event
from shared.local.adapters import LocalQueuePublisher
from shared.local.inspector import Recorder, describe_body
from shared.local.inspector_server import InspectorServer
from shared.receiver import receive
from shared.signature import sign
from shared.telemetry import Telemetry
from shared.tokens import StaticTokenProvider

from .inspector_host import HostProcess
from .support import compare_digest_calls, http_request

DEEP = b"[" * 50_000


def _record(recorder: Recorder, body: bytes, status: int) -> None:
    answered = recorder.http_request("webhooks/smartcar", "POST",
                                     {"SC-Signature": sign("amt", body)}, body)
    answered(status, b'{"error":"x"}' if status >= 300 else b'{"status":"accepted"}')


class TestAnyBody:
    def test_a_deeply_nested_body_is_shown_as_it_came(self) -> None:
        doc = describe_body(DEEP)
        assert doc["body"] == DEEP.decode()
        assert doc["parseError"]

    @staticmethod
    def nested(depth: int) -> bytes:
        event = json.loads(build_event("state"))
        event["data"]["signals"][0]["body"]["value"] = "DEEP"
        return json.dumps(event).replace('"DEEP"', "[" * depth + "1" + "]" * depth).encode()

    @pytest.mark.parametrize("depth", [900, 3000])
    def test_a_body_nested_thousands_deep_is_shown_as_it_came(self, depth: int) -> None:
        """Indenting a body nested n deep makes it n² long (3,000 levels: 7 KB in, 18 MB
        out): it is shown as it came, and the signal's value says why it is not shown; the
        detail stays about the body's size."""
        body = self.nested(depth)
        doc = describe_body(body)
        assert doc["body"] == body.decode() and doc["parseError"] is None
        assert doc["signals"][0]["value"] == "(nested deeper than 64 levels)"
        assert len(json.dumps(doc)) < 2 * len(body) + 4096

    @pytest.mark.parametrize(("depth", "shown"), [(64, True), (65, False)])
    def test_a_value_is_shown_to_the_store_s_depth_in_an_indented_body(
        self, depth: int, shown: bool
    ) -> None:
        body = self.nested(depth)
        doc = describe_body(body)
        assert doc["body"] == json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        value = doc["signals"][0]["value"]
        assert (json.dumps(value, separators=(",", ":"))
                == "[" * depth + "1" + "]" * depth) if shown else (
            value == "(nested deeper than 64 levels)")

    @settings(max_examples=200, deadline=None)
    @given(body=st.one_of(st.binary(max_size=300),
                          st.integers(1, 100_000).map(lambda n: b"{" * n),
                          st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                       lambda inner: st.lists(inner, max_size=3)
                                       | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                                       ).map(lambda v: json.dumps({"data": v}).encode())))
    def test_every_body_has_a_detail(self, body: bytes) -> None:
        recorder = Recorder()
        _record(recorder, body, 401)
        (delivery_id,) = recorder.ids()
        detail = recorder.detail(delivery_id)
        assert detail is not None and json.dumps(detail)


class TestBoundedRing:
    def test_unsigned_requests_cannot_evict_accepted_deliveries(self) -> None:
        recorder = Recorder(capacity=50)
        for i in range(20):
            _record(recorder, b'{"eventId":"real-%d"}' % i, 200)
        for i in range(2000):
            _record(recorder, b'{"eventId":"flood-%d"}' % i, 401)
        kept = [recorder.detail(i) for i in recorder.ids()]
        real = [d for d in kept if d is not None and d["status"] == 200]
        assert len(real) == 20
        assert len(recorder.ids()) <= 50
        # Accepted deliveries still take turns among themselves: the oldest goes first.
        for i in range(60):
            _record(recorder, b'{"eventId":"later-%d"}' % i, 200)
        assert len(recorder.ids()) == 50
        assert all(recorder.detail(i)["status"] == 200 for i in recorder.ids())  # type: ignore[index]

    def test_unsigned_verifies_answered_cannot_evict_accepted_deliveries(self) -> None:
        # Anyone can have a VERIFY answered (200): the receiver itself tells the recorder,
        # through its span, what each request was.
        provider = TracerProvider()
        recorder = Recorder(capacity=50)
        recorder.attach(provider)
        telemetry = Telemetry(tracer_provider=provider)
        publisher = LocalQueuePublisher(None)

        async def post(body: bytes, headers: dict[str, str]) -> int:
            answered = recorder.http_request("webhooks/smartcar", "POST", headers, body)
            reply = await receive(body, headers, tokens=StaticTokenProvider("amt"),
                                  publisher=publisher, max_body_bytes=1 << 20,
                                  telemetry=telemetry)
            answered(reply.status, reply.body_bytes())
            return reply.status

        def verify(event_id: str) -> bytes:
            return json.dumps({"eventId": event_id, "eventType": "VERIFY",
                               "data": {"challenge": "abc"}}).encode()

        async def scenario() -> None:
            signed = verify("smartcar-verify")
            assert await post(signed, {"SC-Signature": sign("amt", signed)}) == 200
            for i in range(300):
                assert await post(verify(f"flood-{i}"), {}) == 200

        asyncio.run(scenario())
        kept = [recorder.detail(i) for i in recorder.ids()]
        assert len(kept) <= 50
        assert [d["eventId"] for d in kept if d is not None
                and d["eventId"] == "smartcar-verify"] == ["smartcar-verify"]

    def test_a_full_ring_of_accepted_deliveries_is_not_read_whole_for_each_new_one(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Looking for an unaccepted delivery to drop read every delivery held, for every new
        # one once the ring was full: 500 checks per delivery, a quarter of `make run`'s CPU.
        from shared.local import inspector

        recorder = Recorder(capacity=50)
        for i in range(50):
            _record(recorder, b'{"eventId":"real-%d"}' % i, 200)
        checks = 0
        trusted = inspector.Delivery.trusted

        def counting(delivery: inspector.Delivery) -> bool:
            nonlocal checks
            checks += 1
            return trusted(delivery)

        monkeypatch.setattr(inspector.Delivery, "trusted", counting)
        for i in range(100):
            _record(recorder, b'{"eventId":"later-%d"}' % i, 200)
        assert len(recorder.ids()) == 50
        assert checks <= 3 * 100

    def test_the_oldest_unaccepted_request_goes_first_whatever_order_they_were_answered(
        self,
    ) -> None:
        recorder = Recorder(capacity=3)
        first = recorder.http_request("webhooks/smartcar", "POST", {}, b'{"n":1}')
        second = recorder.http_request("webhooks/smartcar", "POST", {}, b'{"n":2}')
        second(401, b"{}")
        first(401, b"{}")  # answered last, arrived first
        _record(recorder, b'{"eventId":"real-1"}', 200)
        _record(recorder, b'{"eventId":"real-2"}', 200)
        bodies = [recorder.detail(i)["body"] for i in recorder.ids()]  # type: ignore[index]
        assert [json.loads(body) for body in bodies] == [
            {"n": 2}, {"eventId": "real-1"}, {"eventId": "real-2"}]

    def test_an_unsigned_verify_whose_outcome_comes_after_its_answer_can_still_go(
        self,
    ) -> None:
        # The local host ends the receive span before it answers; were the outcome to come
        # second, the answered VERIFY is found untrusted then, and a flood of them still
        # cannot push accepted deliveries out.
        from opentelemetry.sdk.trace import ReadableSpan

        from shared import telemetry_names as names
        from shared.receiver import VERIFY_ANSWERED

        recorder = Recorder(capacity=3)
        _record(recorder, b'{"eventId":"real-1"}', 200)
        _record(recorder, b'{"eventId":"real-2"}', 200)
        for i in range(5):
            answered = recorder.http_request("webhooks/smartcar", "POST", {},
                                             b'{"eventId":"verify-%d"}' % i)
            answered(200, b"{}")
            recorder._receive_span(ReadableSpan(
                name=names.SPAN_RECEIVE, attributes={names.ATTR_OUTCOME: VERIFY_ANSWERED}))
        bodies = [recorder.detail(i)["body"] for i in recorder.ids()]  # type: ignore[index]
        assert [json.loads(body)["eventId"] for body in bodies] == [
            "real-1", "real-2", "verify-4"]

    def test_memory_is_bounded_in_bytes_not_only_in_entries(self) -> None:
        recorder = Recorder(capacity=500, max_bytes=1_000_000)
        body = b"x" * 100_000
        for _ in range(100):
            _record(recorder, body, 200)
        kept = len(recorder.ids())
        assert 5 <= kept <= 10  # 10 bodies of 100 KB fit in 1 MB with their answers


class TestForeignOrigin:
    def test_replay_and_purge_from_another_origin_are_refused(self, tmp_path: Path) -> None:
        with HostProcess(tmp_path) as host:
            own = f"http://127.0.0.1:{host.inspector_port}"
            for action in ("replay", "purge"):
                for origin in ("https://attacker.example", "null",
                               f"http://127.0.0.1:{host.port}"):
                    answer = host.inspector(f"api/dlq/1/{action}", method="POST",
                                            headers={"Origin": origin})
                    assert answer.status == 403, (action, origin)
                    assert b"may not change anything" in answer.body
                # The page itself (same origin) and a client without Origin (curl) may.
                assert host.inspector(f"api/dlq/1/{action}", method="POST",
                                      headers={"Origin": own}).status == 200
                assert host.inspector(f"api/dlq/1/{action}", method="POST").status == 200

    def test_the_detail_of_a_deeply_nested_body_is_answered(self, tmp_path: Path) -> None:
        with HostProcess(tmp_path) as host:
            assert host.post(DEEP, signed=False).status == 401
            (delivery,) = host.wait_for(lambda: host.deliveries() or None)
            detail = host.inspector(f"api/deliveries/{delivery['id']}")
            assert detail.status == 200
            assert json.loads(detail.body)["body"] == DEEP.decode()


class TestTokenComparison:
    def test_the_token_is_compared_in_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # SECURITY.md: every inspector request's token is compared in constant time, so its
        # answer's timing says nothing of how much of a guessed token was right.
        import aiohttp

        seen = compare_digest_calls(monkeypatch, "shared.local.inspector_server")
        server = InspectorServer(Recorder(), cast(Any, None), port=0, token="t0ken")

        async def scenario() -> list[int]:
            await server.start()
            try:
                async with aiohttp.ClientSession() as session:
                    statuses = []
                    for token in ("t0kex", "t0ken"):
                        async with session.get(f"http://127.0.0.1:{server.port}/{token}/") as r:
                            statuses.append(r.status)
                    return statuses
            finally:
                await server.stop()

        assert asyncio.run(scenario()) == [403, 200]
        assert seen == [(b"t0kex", b"t0ken"), (b"t0ken", b"t0ken")]


class TestNumbersInUrls:
    def test_an_id_or_sequence_number_too_large_for_an_integer_column_is_a_404(
        self, tmp_path: Path
    ) -> None:
        # Above 2**63 SQLite cannot bind it; above 4,300 digits Python will not even parse it.
        # Either was a 500 with a traceback in the host's log; the page never asks for one.
        huge = ("9223372036854775808", "1" * 19, "9" * 5000)
        with HostProcess(tmp_path) as host:
            for number in huge:
                for path, method in ((f"api/deliveries/{number}", "GET"),
                                     (f"api/deliveries/{number}/curl", "GET"),
                                     (f"api/deliveries/{number}/resend", "POST"),
                                     (f"api/dlq/{number}", "GET"),
                                     (f"api/dlq/{number}/replay", "POST"),
                                     (f"api/dlq/{number}/purge", "POST")):
                    answer = host.inspector(path, method=method)
                    assert answer.status == 404, (path[:40], answer.status)
                    assert answer.headers["x-content-type-options"] == "nosniff"
            # The largest number a route takes is still answered as an unknown one.
            assert host.inspector(f"api/dlq/{'9' * 18}").status == 404
            assert host.inspector(f"api/deliveries/{'9' * 18}").status == 404
            assert "Traceback" not in host.output()

    def test_an_unexpected_failure_still_carries_the_security_headers(self) -> None:
        class BrokenOps:
            def stats(self) -> dict[str, int]:
                raise RuntimeError("a bug in the page's server")

        async def ask() -> tuple[int, dict[str, str], bytes]:
            server = InspectorServer(Recorder(), BrokenOps(), port=0)  # type: ignore[arg-type]
            await server.start()
            try:
                answer = await asyncio.to_thread(
                    http_request, server.port, "GET", f"/{server.token}/api/deliveries")
                return answer.status, answer.headers, answer.body
            finally:
                await server.stop()

        status, headers, body = asyncio.run(ask())
        assert status == 500
        assert b"a bug in the page's server" not in body
        assert headers["content-security-policy"].startswith("default-src 'none'")
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"


class TestThePollsAnswer:
    def test_every_id_it_lists_has_a_summary_while_requests_pour_in(
        self, tmp_path: Path
    ) -> None:
        """The page keeps the summaries it was given and lists the answer's `ids`; an id
        without a summary (a request that came in while the queue's counts were read) broke
        the page ("Cannot read properties of undefined")."""
        import aiohttp

        with HostProcess(tmp_path) as host:
            webhook = f"http://127.0.0.1:{host.port}/api/webhooks/smartcar"
            api = f"http://127.0.0.1:{host.inspector_port}/{host.token}/api/deliveries"

            async def run() -> list[list[int]]:
                async with aiohttp.ClientSession() as session:
                    stop = asyncio.Event()

                    async def flood() -> None:
                        while not stop.is_set():
                            await asyncio.gather(*(session.post(
                                webhook, data=b"{}", headers={"Content-Type": "application/json"})
                                for _ in range(10)))

                    task = asyncio.create_task(flood())
                    known: set[int] = set()
                    version, lacking = 0, []
                    for _ in range(150):
                        async with session.get(f"{api}?since={version}") as answer:
                            doc = await answer.json()
                        known.update(d["id"] for d in doc["deliveries"])
                        known &= set(doc["ids"])
                        missing = [i for i in doc["ids"] if i not in known]
                        if missing:
                            lacking.append(missing)
                        version = doc["version"]
                    stop.set()
                    await task
                    return lacking

            assert asyncio.run(run()) == []
