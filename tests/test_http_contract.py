"""The contract's status table, row by row, over real HTTP against the local host."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from shared.handlers import HandlerRegistry
from shared.local.adapters import LocalQueuePublisher
from shared.publisher import PublishError
from shared.runtime import Runtime
from shared.signature import sign
from shared.spill import FileSpillStore, SpillingPublisher
from shared.tokens import TokenUnavailableError

from .support import (
    ERRORS_WEBHOOK,
    TOKEN,
    WEBHOOK,
    RunningHost,
    delivered_now,
    encode,
    fixture_bytes,
    fixture_json,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)


@pytest.fixture
def host(tmp_path: Path) -> Any:
    with RunningHost(local_env(tmp_path)) as running:
        yield running


def handled_ids(host: RunningHost) -> list[str]:
    return [record["eventId"] for record in host.handled()]


class TestHealth:
    def test_health_is_ok_and_reveals_no_settings(self, host: RunningHost) -> None:
        resp = host.get("/api/health")
        assert resp.status == 200
        assert resp.json() == {"status": "ok"}
        assert TOKEN.encode() not in resp.body


class TestVerify:
    def test_fixture_challenge_is_answered_with_its_hmac(self, host: RunningHost) -> None:
        resp = host.post(WEBHOOK, fixture_bytes("verify.json"))
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json() == {
            "challenge": "2f0e63b32f2dca91ae5c5f9c10e8647463d58288734aa8bb84fa3ede78b9b50d"
        }

    def test_signed_verify_is_answered(self, host: RunningHost) -> None:
        body = fixture_bytes("verify.json")
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.status == 200

    def test_verify_with_wrong_signature_is_rejected(self, host: RunningHost) -> None:
        body = fixture_bytes("verify.json")
        resp = host.post(WEBHOOK, body, signed_headers(body, "not-the-token"))
        assert resp.status == 401
        assert b"challenge" not in resp.body

    def test_verify_is_not_enqueued(self, host: RunningHost) -> None:
        host.post(WEBHOOK, fixture_bytes("verify.json"))
        assert host.runtime.queue.stats()["active"] == 0

    @pytest.mark.parametrize(
        "challenge",
        [
            '{"eventId":"x","eventType":"VEHICLE_STATE"}',
            "[1,2]",
            'a"b',
            "back\\slash",
            "has space",
            "tab\there",
            "new\nline",
            "",
            "x" * 257,
        ],
        ids=["json-object", "json-array", "quote", "backslash", "space", "tab", "newline",
             "empty", "too-long"],
    )
    def test_challenge_that_could_be_a_body_is_refused(
        self, host: RunningHost, challenge: str
    ) -> None:
        event = fixture_json("verify.json")
        event["data"]["challenge"] = challenge
        resp = host.post(WEBHOOK, encode(event))
        assert resp.status == 400
        assert sign(TOKEN, challenge).encode() not in resp.body
        assert b"challenge\":\"" not in resp.body.replace(b" ", b"")

    def test_challenge_of_256_characters_is_answered(self, host: RunningHost) -> None:
        event = fixture_json("verify.json")
        event["data"]["challenge"] = "c" * 256
        resp = host.post(WEBHOOK, encode(event))
        assert resp.status == 200
        assert resp.json() == {"challenge": sign(TOKEN, "c" * 256)}

    def test_non_string_challenge_is_refused(self, host: RunningHost) -> None:
        event = fixture_json("verify.json")
        event["data"]["challenge"] = {"eventType": "VEHICLE_STATE"}
        resp = host.post(WEBHOOK, encode(event))
        assert resp.status == 400

    def test_lone_surrogate_challenge_is_refused_not_a_crash(self, host: RunningHost) -> None:
        # Incident: the JSON escape "\ud800" decodes to a lone surrogate, which has no UTF-8
        # form; hashing it raised UnicodeEncodeError and the host answered 500.
        body = b'{"eventId":"v1","eventType":"VERIFY","data":{"challenge":"\\ud800"}}'
        resp = host.post(WEBHOOK, body)
        assert resp.status == 400
        assert resp.json() == {"error": "VERIFY refused: data.challenge may hold only printable "
                               "ASCII characters (0x21-0x7E) other than { } [ ] \" \\, and has "
                               "U+D800 at position 0; a Smartcar challenge never has one"}

    @pytest.mark.parametrize(
        "challenge",
        [
            r"\u001bc\u0007FAKE", r"nul\u0000", "del\x7f", r"caf\u00e9", r"nbsp\u00a0x",
            r"car\ud83d\ude97", "car\U0001f697", "{", "}", "[", "]", r"\"", "\\\\", r"tab\t",
            "space here",
        ],
        ids=["escape-sequence", "nul", "del", "latin-1", "nbsp", "non-bmp-escaped", "non-bmp-raw",
             "open-brace", "close-brace", "open-bracket", "close-bracket", "quote", "backslash",
             "tab", "space"],
    )
    def test_control_non_ascii_and_forbidden_characters_are_refused(
        self, host: RunningHost, challenge: str
    ) -> None:
        # `challenge` is JSON text inside the string literal, escapes and all.
        body = b'{"eventId":"v1","eventType":"VERIFY","data":{"challenge":"%s"}}' % (
            challenge.encode())
        decoded = json.loads(body)["data"]["challenge"]
        resp = host.post(WEBHOOK, body)
        assert resp.status == 400
        assert "VERIFY refused" in resp.json()["error"]
        assert sign(TOKEN, decoded.encode("utf-8", "surrogatepass")).encode() not in resp.body

    def test_every_printable_ascii_challenge_character_but_the_forbidden_is_answered(
        self, host: RunningHost
    ) -> None:
        allowed = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '{}[]"\\')
        event = fixture_json("verify.json")
        event["data"]["challenge"] = allowed
        resp = host.post(WEBHOOK, encode(event))
        assert resp.status == 200
        assert resp.json() == {"challenge": sign(TOKEN, allowed)}


class TestSmartcarSdkOverHttp:
    """What Smartcar's own Python SDK computes is what the receiver answers and accepts."""

    def test_the_verify_answer_is_the_sdks_hash_challenge(self, host: RunningHost) -> None:
        import smartcar

        event = fixture_json("verify.json")
        resp = host.post(WEBHOOK, encode(event))
        assert resp.json() == {"challenge": smartcar.hash_challenge(TOKEN,
                                                                    event["data"]["challenge"])}

    @pytest.mark.parametrize("note", ["plain ascii", "Stra\u00dfe caf\u00e9 \U0001f697 \u4e2d\u6587"])
    def test_a_body_signed_with_the_sdks_hash_is_accepted(self, host: RunningHost,
                                                          note: str) -> None:
        import smartcar

        text = json.dumps(state_event(note=note), ensure_ascii=False)
        body = text.encode("utf-8")
        signature = smartcar.hash_challenge(TOKEN, text)
        assert smartcar.verify_payload(TOKEN, signature, text)
        assert host.post(WEBHOOK, body, {"SC-Signature": signature}).status == 200
        assert host.post(WEBHOOK, body, {"SC-Signature": signature.upper()}).status == 401
        assert not smartcar.verify_payload(TOKEN, signature.upper(), text)


class TestOlderVerifyFormat:
    """Smartcar's older webhooks verify with `eventName` and `payload` (format "2.0")."""

    @staticmethod
    def older_verify(challenge: object) -> bytes:
        return json.dumps({"version": "2.0", "webhookId": "5a8e5e38-1e12-4011-a36d-56f120053f9e",
                           "eventName": "verify", "payload": {"challenge": challenge}}).encode()

    def test_older_verify_is_answered_with_the_challenges_hmac(self, host: RunningHost) -> None:
        resp = host.post(WEBHOOK, self.older_verify("3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f"))
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json() == {
            "challenge": "2f0e63b32f2dca91ae5c5f9c10e8647463d58288734aa8bb84fa3ede78b9b50d"
        }
        assert host.runtime.queue.stats()["active"] == 0

    def test_signed_older_verify_is_answered(self, host: RunningHost) -> None:
        body = self.older_verify("abc")
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.json() == {"challenge": sign(TOKEN, "abc")}

    def test_older_verify_with_a_wrong_signature_is_rejected(self, host: RunningHost) -> None:
        body = self.older_verify("abc")
        assert host.post(WEBHOOK, body, signed_headers(body, "not-the-token")).status == 401

    @pytest.mark.parametrize("challenge", ['{"eventId":"x"}', "a b", "caf\u00e9", "", None, 42])
    def test_older_verify_follows_the_same_challenge_rules(
        self, host: RunningHost, challenge: object
    ) -> None:
        resp = host.post(WEBHOOK, self.older_verify(challenge))
        assert resp.status == 400
        assert "payload.challenge" in resp.json()["error"]
        if isinstance(challenge, str):
            assert sign(TOKEN, challenge).encode() not in resp.body


class TestSignedEvents:
    @pytest.mark.parametrize("route", [WEBHOOK, ERRORS_WEBHOOK])
    @pytest.mark.parametrize("fixture", ["vehicle_state.json", "vehicle_error.json",
                                         "vehicle_state_top_level_triggers.json"])
    def test_signed_event_is_accepted_and_processed(
        self, host: RunningHost, route: str, fixture: str
    ) -> None:
        body = delivered_now(fixture)
        event_id = json.loads(body)["eventId"]
        resp = host.post(route, body, signed_headers(body))
        assert resp.status == 200
        assert resp.json() == {"status": "accepted", "eventId": event_id}
        records = wait_until(host.handled)
        assert [r["eventId"] for r in records] == [event_id]
        record = records[0]
        assert record["eventType"] == json.loads(body)["eventType"]
        assert record["deliveryCount"] == 1
        assert "vehicleId" in record

    @pytest.mark.parametrize("header", ["SC-Signature", "sc-signature", "SC-SIGNATURE",
                                        "Sc-Signature"])
    def test_header_name_in_any_case(self, host: RunningHost, header: str) -> None:
        body = encode(state_event())
        resp = host.post(WEBHOOK, body, signed_headers(body, header=header))
        assert resp.status == 200

    def test_uppercase_hex_signature_is_refused_as_smartcars_sdk_refuses_it(
        self, host: RunningHost
    ) -> None:
        # Smartcar sends lowercase hex, and its SDK's verify_payload compares with ==.
        body = encode(state_event())
        resp = host.post(WEBHOOK, body, {"SC-Signature": sign(TOKEN, body).upper()})
        assert resp.status == 401
        assert host.runtime.queue.stats()["active"] == 0

    def test_queued_message_carries_raw_body_id_and_properties(self, tmp_path: Path) -> None:
        with RunningHost(local_env(tmp_path), workers=0) as idle:  # nothing consumes
            event = state_event()
            body = json.dumps(event, indent=4, ensure_ascii=False).encode()
            before = int(time.time() * 1000)
            resp = idle.post(WEBHOOK, body, signed_headers(body))
            after = int(time.time() * 1000)
            assert resp.status == 200
            (stored,) = idle.runtime.queue.receive(max_messages=10)
            assert stored.body == body
            assert stored.message_id == event["eventId"]
            # The time of receipt, from which the processor measures the delivery's age.
            received = stored.application_properties.pop("receivedAt")
            assert before <= int(received) <= after
            assert stored.application_properties == {
                "eventId": event["eventId"],
                "eventType": "VEHICLE_STATE",
                "vehicleId": event["vehicleId"],
                "webhookId": event["meta"]["webhookId"],
                "deliveryId": event["meta"]["deliveryId"],
                "mode": "LIVE",
            }


class TestRejections:
    def test_unsigned_event_is_rejected_and_not_stored(self, host: RunningHost) -> None:
        resp = host.post(WEBHOOK, encode(state_event()))
        assert resp.status == 401
        assert host.runtime.queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 0}

    def test_wrong_signature_is_rejected(self, host: RunningHost) -> None:
        body = encode(state_event())
        resp = host.post(WEBHOOK, body, signed_headers(body, "wrong-token"))
        assert resp.status == 401
        assert host.runtime.queue.stats()["active"] == 0

    def test_tampered_body_is_rejected(self, host: RunningHost) -> None:
        body = encode(state_event())
        headers = signed_headers(body)
        tampered = body.replace(b'"value": 78', b'"value": 79')
        assert tampered != body
        resp = host.post(WEBHOOK, tampered, headers)
        assert resp.status == 401

    def test_garbage_signature_is_rejected(self, host: RunningHost) -> None:
        body = encode(state_event())
        resp = host.post(WEBHOOK, body, {"SC-Signature": "zz\u00e9"})
        assert resp.status == 401

    def test_oversize_body_is_rejected_before_anything_else(self, host: RunningHost) -> None:
        event = state_event(padding="x" * 200_000)
        body = encode(event)
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.status == 413
        assert host.runtime.queue.stats()["active"] == 0

    def test_oversize_is_checked_even_without_content_length(self, host: RunningHost) -> None:
        import http.client

        body = encode(state_event(padding="x" * 200_000))
        conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=30)
        conn.putrequest("POST", WEBHOOK)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("SC-Signature", sign(TOKEN, body))
        conn.endheaders()
        for start in range(0, len(body), 65536):
            chunk = body[start : start + 65536]
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 413
        conn.close()

    def test_body_at_the_limit_is_accepted(self, tmp_path: Path) -> None:
        with RunningHost(local_env(tmp_path, MAX_BODY_BYTES="4096")) as small:
            event = state_event()
            body = encode(event)
            body = body[:-1] + b"," + b'"pad":"' + b"x" * (4096 - len(body) - 9) + b'"}'
            assert len(body) == 4096
            assert small.post(WEBHOOK, body, signed_headers(body)).status == 200
            bigger = body[:-2] + b'x"}'
            assert small.post(WEBHOOK, bigger, signed_headers(bigger)).status == 413


class TestSignedNonObjects:
    """A signed body that is not a JSON object is refused: Smartcar never sends one, and a
    VERIFY answer could otherwise sign it (contract: 400, nothing stored)."""

    @pytest.mark.parametrize("body", [b"true", b"12345", b'"x"', b"[]", b"abc", b"", b" \r\n\t",
                                      b"\xef\xbb\xbf{}", b"oracle-50df0cd1"])
    def test_signed_non_object_gets_400_and_nothing_is_stored(
        self, host: RunningHost, body: bytes
    ) -> None:
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.status == 400
        assert resp.json() == {"error": "signed body is not a JSON object (its first byte after "
                               "whitespace must be '{'); nothing was stored"}
        assert host.runtime.queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 0}

    def test_a_verify_answer_replayed_as_a_signature_stores_nothing(
        self, host: RunningHost
    ) -> None:
        # Incident: the attacker asked VERIFY to hash `true`, then posted `true` with that
        # hash as SC-Signature; it was accepted and dead-lettered, filling the DLQ at will.
        for forged in ("true", "12345", "oracle-50df0cd1"):
            verify = {"eventId": "v1", "eventType": "VERIFY", "data": {"challenge": forged}}
            answer = host.post(WEBHOOK, encode(verify))
            assert answer.status == 200
            resp = host.post(WEBHOOK, forged.encode(),
                             {"SC-Signature": answer.json()["challenge"]})
            assert resp.status == 400
        assert host.runtime.queue.stats() == {"active": 0, "deadLettered": 0, "scheduled": 0}

    @pytest.mark.parametrize("body", [b'{"eventId":"e"}', b' \n\t\r{"eventId":"e"}'])
    def test_an_object_after_json_whitespace_is_stored(self, host: RunningHost,
                                                       body: bytes) -> None:
        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: host.runtime.queue.stats()["deadLettered"] == 1)


class TestAuthenticPayloadsAreNeverRejectedForContent:
    @pytest.mark.parametrize(
        ("body", "why"),
        [(b"{this is not json", "not valid JSON"), (b'{"eventId": "\xff"}', "not valid UTF-8")],
    )
    def test_signed_non_json_is_accepted_then_dead_lettered(
        self, host: RunningHost, body: bytes, why: str
    ) -> None:
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.status == 200
        assert resp.json() == {"status": "accepted", "eventId": None}
        (dead,) = wait_until(host.dead_letters)
        assert dead.dead_letter_reason == "InvalidPayload"
        assert why in (dead.dead_letter_description or "")
        assert dead.body == body
        (record,) = wait_until(host.handled)
        assert (record["outcome"], record["reason"]) == ("dead_lettered", "InvalidPayload")

    def test_signed_json_without_event_type_is_dead_lettered_with_a_description(
        self, host: RunningHost
    ) -> None:
        event = state_event()
        del event["eventType"]
        body = encode(event)
        resp = host.post(WEBHOOK, body, signed_headers(body))
        assert resp.status == 200
        assert resp.json()["eventId"] == event["eventId"]
        (dead,) = wait_until(host.dead_letters)
        assert dead.dead_letter_reason == "InvalidPayload"
        assert "eventType" in (dead.dead_letter_description or "")
        assert dead.delivery_count == 1

    def test_unknown_event_type_is_completed_not_dead_lettered(self, host: RunningHost) -> None:
        event = state_event(eventType="SOMETHING_NEW")
        body = encode(event)
        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        (record,) = wait_until(host.handled)
        assert record["outcome"] == "unhandled"
        assert host.dead_letters() == []
        # Completed by the fetcher's next transaction, moments after the record is written.
        wait_until(lambda: host.runtime.queue.stats() == {
            "active": 0, "deadLettered": 0, "scheduled": 0})


class TestDuplicates:
    def test_same_event_id_is_stored_and_processed_once(self, host: RunningHost) -> None:
        event = state_event()
        body = encode(event)
        answers = [host.post(WEBHOOK, body, signed_headers(body)) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 200]
        assert [a.json() for a in answers] == [
            {"status": "accepted", "eventId": event["eventId"]},
            {"status": "duplicate", "eventId": event["eventId"]},
            {"status": "duplicate", "eventId": event["eventId"]},
        ]
        wait_until(host.handled)
        # Give a duplicate the chance to be processed before asserting it was not.
        marker = state_event()
        marker_body = encode(marker)
        host.post(WEBHOOK, marker_body, signed_headers(marker_body))
        wait_until(lambda: marker["eventId"] in handled_ids(host))
        assert handled_ids(host).count(event["eventId"]) == 1

    def test_retry_with_a_new_delivery_id_is_processed_once(self, host: RunningHost) -> None:
        event = state_event()
        first = encode(event)
        event["meta"]["deliveryId"] = str(uuid.uuid4())
        event["meta"]["deliveredAt"] += 25_000
        retry = encode(event)
        assert first != retry
        assert host.post(WEBHOOK, first, signed_headers(first)).json()["status"] == "accepted"
        answer = host.post(WEBHOOK, retry, signed_headers(retry))
        assert (answer.status, answer.json()) == (
            200, {"status": "duplicate", "eventId": event["eventId"]})
        marker = state_event()
        marker_body = encode(marker)
        host.post(WEBHOOK, marker_body, signed_headers(marker_body))
        wait_until(lambda: marker["eventId"] in handled_ids(host))
        assert handled_ids(host).count(event["eventId"]) == 1


class _BrokenQueue:
    """A queue boundary that fails every send (disk full, locked database, ...)."""

    def send_many(self, *args: Any, **kwargs: Any) -> list[bool]:
        raise OSError("disk I/O error")


class _NoTokens:
    async def get_tokens(self) -> list[str]:
        raise TokenUnavailableError("Key Vault unreachable")

    async def refresh(self) -> bool:
        raise TokenUnavailableError("Key Vault unreachable")


class TestUnavailable:
    def test_queue_and_spill_unavailable_gives_503_and_nothing_acknowledged(
        self, tmp_path: Path
    ) -> None:
        def break_queue_and_spill(runtime: Runtime) -> None:
            runtime.publisher = SpillingPublisher(
                LocalQueuePublisher(_BrokenQueue()), FileSpillStore(tmp_path / "not-a-dir")
            )

        (tmp_path / "not-a-dir").write_text("a file where the spill directory should be")
        with RunningHost(local_env(tmp_path), customize=break_queue_and_spill) as broken:
            body = encode(state_event())
            resp = broken.post(WEBHOOK, body, signed_headers(body))
            assert resp.status == 503
            assert "accepted" not in resp.body.decode()

    def test_queue_unavailable_spills_and_answers_200(self, tmp_path: Path) -> None:
        def break_queue(runtime: Runtime) -> None:
            assert runtime.spill is not None
            runtime.publisher = SpillingPublisher(
                LocalQueuePublisher(_BrokenQueue()), runtime.spill
            )

        with RunningHost(local_env(tmp_path), customize=break_queue) as broken:
            body = encode(state_event())
            assert broken.post(WEBHOOK, body, signed_headers(body)).status == 200
            assert len(list((tmp_path / "spill").glob("*.json"))) == 1

    def test_token_unavailable_gives_503(self, tmp_path: Path) -> None:
        def no_tokens(runtime: Runtime) -> None:
            runtime.tokens = _NoTokens()

        with RunningHost(local_env(tmp_path), customize=no_tokens) as broken:
            body = encode(state_event())
            assert broken.post(WEBHOOK, body, signed_headers(body)).status == 503
            assert broken.post(WEBHOOK, fixture_bytes("verify.json")).status == 503
            assert broken.runtime.queue.stats()["active"] == 0

    def test_publish_error_type_is_what_the_receiver_maps(self) -> None:
        # The local publisher turns any queue failure into PublishError (mapped to 503).
        import asyncio

        from shared.local.adapters import LocalQueuePublisher
        from shared.publisher import OutboundMessage

        publisher = LocalQueuePublisher(_BrokenQueue())
        with pytest.raises(PublishError, match="disk I/O error"):
            asyncio.run(publisher.publish(OutboundMessage(b"{}", "id")))


class TestProcessingFailures:
    def test_failing_handler_is_retried_then_dead_lettered(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()
        attempts: list[int] = []

        @registry.on("VEHICLE_STATE")
        def always_fails(event: Any, context: Any) -> None:
            attempts.append(context.delivery_count)
            raise RuntimeError("downstream is down")

        with RunningHost(local_env(tmp_path, MAX_DELIVERY_COUNT="3"), registry=registry) as host:
            body = encode(state_event())
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            (dead,) = wait_until(host.dead_letters)
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            # The third attempt is the second scheduled copy, dead-lettered with the history.
            assert dead.application_properties["attempt"] == "3"
            assert dead.dead_letter_description.count("RuntimeError") == 3
            assert attempts == [1, 2, 3]
            (record,) = wait_until(host.handled)
            assert (record["outcome"], record["reason"]) == (
                "dead_lettered", "MaxDeliveryCountExceeded")

    def test_handler_that_recovers_is_handled_once(self, tmp_path: Path) -> None:
        registry = HandlerRegistry()
        attempts: list[int] = []

        @registry.on("VEHICLE_STATE")
        def flaky(event: Any, context: Any) -> None:
            attempts.append(context.delivery_count)
            if context.delivery_count < 2:
                raise RuntimeError("transient")

        with RunningHost(local_env(tmp_path), registry=registry) as host:
            body = encode(state_event())
            host.post(WEBHOOK, body, signed_headers(body))
            (record,) = wait_until(host.handled)
            assert record["deliveryCount"] == 2
            assert attempts == [1, 2]
            assert host.dead_letters() == []


class TestLockRenewal:
    def test_a_long_handler_keeps_its_lock_with_the_hosts_lock_duration(
        self, tmp_path: Path
    ) -> None:
        import time

        from shared.local.queue import LocalQueue

        registry = HandlerRegistry()
        calls: list[int] = []

        @registry.on("VEHICLE_STATE")
        def slow(event: Any, context: Any) -> None:
            calls.append(context.delivery_count)
            time.sleep(1.6)  # longer than the lock: only renewal keeps it

        def short_queue_default(runtime: Runtime) -> None:
            # The queue's own default lock is shorter than the host's: renewals must use the
            # host's duration, as the Functions host renews with the lock it took.
            from shared.local.adapters import LocalDeadLetterer, LocalQueuePublisher

            runtime.queue.close()
            runtime.queue = LocalQueue(runtime.settings.local_state_dir / "q.sqlite3",
                                       lock_duration=0.3)
            runtime.publisher = LocalQueuePublisher(runtime.queue)
            runtime.dead_letterer = LocalDeadLetterer(runtime.queue)

        with RunningHost(local_env(tmp_path), registry=registry, lock_duration=1.0,
                         customize=short_queue_default) as host:
            body = encode(state_event())
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            (record,) = wait_until(host.handled)
            assert record["deliveryCount"] == 1
            assert calls == [1]


class TestBlockingHandlers:
    def test_a_blocking_plain_handler_does_not_stall_the_webhook_receiver(
        self, tmp_path: Path
    ) -> None:
        import threading

        registry = HandlerRegistry()
        started, release = threading.Event(), threading.Event()
        outcome: list[bool] = []

        @registry.on("VEHICLE_STATE")
        def blocking(event: Any, context: Any) -> None:
            started.set()
            outcome.append(release.wait(10))  # True only if the test could answer meanwhile

        with RunningHost(local_env(tmp_path), registry=registry) as host:
            body = encode(state_event())
            assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
            assert started.wait(10)
            other = encode(state_event())
            assert host.post(WEBHOOK, other, signed_headers(other)).status == 200
            release.set()
            wait_until(lambda: len(host.handled()) == 2)
        assert outcome[0] is True
