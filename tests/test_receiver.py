"""The receive decision in-process: what each request reads, what it stores, what it answers.

The HTTP suite (test_http_contract.py) proves the same rows through the local host; these tests
also watch the boundaries a request must NOT touch: the signing tokens (Key Vault traffic) and
the queue. The token source is the real Key Vault provider over a fake SecretClient, except
where a provider has to fail in a way the real one never does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from shared.local.adapters import LocalQueuePublisher
from shared.local.queue import LocalQueue
from shared.receiver import Reply, receive
from shared.signature import sign
from shared.tokens import KeyVaultTokenProvider, StaticTokenProvider, TokenUnavailableError

from .fakes import FakeSecretClient, ManualClock, RecordingPublisher
from .support import encode, state_event

TOKEN = "amt"
MAX_BODY = 196608


def decide(body: bytes, headers: dict[str, str], *, tokens: Any = None,
           publisher: RecordingPublisher | None = None, max_body_bytes: int = MAX_BODY) -> Reply:
    return asyncio.run(receive(
        body, headers,
        tokens=tokens if tokens is not None else StaticTokenProvider(TOKEN),
        publisher=publisher if publisher is not None else RecordingPublisher(),
        max_body_bytes=max_body_bytes,
    ))


def key_vault_down() -> tuple[KeyVaultTokenProvider, FakeSecretClient]:
    """Key Vault unreachable from the start: nothing cached, every read fails."""
    client = FakeSecretClient()
    client.set_secret(TOKEN)
    client.fail_with = ConnectionError("Key Vault unreachable")
    return KeyVaultTokenProvider(client, "smartcar-amt", clock=ManualClock(1000.0)), client


def verify_body(challenge: str) -> bytes:
    return json.dumps(
        {"eventId": "v1", "eventType": "VERIFY", "data": {"challenge": challenge}}
    ).encode()


class FailingRefreshTokens:
    """A token provider whose re-read fails with TokenUnavailableError (allowed by the
    TokenProvider protocol), as a Key Vault outage during a rotation could make one do."""

    def __init__(self) -> None:
        self.refreshes = 0

    async def get_tokens(self) -> Sequence[str]:
        return (TOKEN,)

    async def refresh(self) -> bool:
        self.refreshes += 1
        raise TokenUnavailableError("Key Vault unreachable")


class TestUnsignedRequestsNeverReadTheToken:
    """Strangers must not drive Key Vault traffic: only a signed request or a VERIFY needs it."""

    def test_unsigned_event_during_a_key_vault_outage_is_401_with_no_token_read(self) -> None:
        tokens, client = key_vault_down()
        publisher = RecordingPublisher()
        reply = decide(encode(state_event()), {}, tokens=tokens, publisher=publisher)
        assert (reply.status, reply.body) == (401, {"error": "missing SC-Signature header"})
        assert client.get_calls == 0
        assert publisher.sent == []

    def test_unsigned_body_that_is_not_json_is_401_with_no_token_read(self) -> None:
        tokens, client = key_vault_down()
        reply = decide(b"\x00not json", {}, tokens=tokens)
        assert reply.status == 401
        assert client.get_calls == 0

    def test_signed_event_during_a_key_vault_outage_is_503_so_smartcar_retries(self) -> None:
        tokens, client = key_vault_down()
        body = encode(state_event())
        publisher = RecordingPublisher()
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)}, tokens=tokens,
                       publisher=publisher)
        assert (reply.status, reply.body) == (503, {"error": "signing token unavailable, retry later"})
        assert client.get_calls >= 1
        assert publisher.sent == []

    def test_unsigned_verify_during_a_key_vault_outage_is_503(self) -> None:
        tokens, client = key_vault_down()
        reply = decide(verify_body("abc"), {}, tokens=tokens)
        assert reply.status == 503
        assert client.get_calls >= 1


class TestBadSignatureWhenTheReReadFails:
    def test_is_401_and_never_raises_when_refresh_raises(self) -> None:
        tokens = FailingRefreshTokens()
        body = encode(state_event())
        publisher = RecordingPublisher()
        reply = decide(body, {"SC-Signature": sign("forged", body)}, tokens=tokens,
                       publisher=publisher)
        assert (reply.status, reply.body) == (401, {"error": "invalid signature"})
        assert tokens.refreshes == 1
        assert publisher.sent == []

    def test_good_signature_does_not_re_read(self) -> None:
        tokens = FailingRefreshTokens()
        body = encode(state_event())
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)}, tokens=tokens)
        assert reply.status == 200
        assert tokens.refreshes == 0


class TestErrorReplies:
    """Every refusal is `{"error": "<what to do>"}` as JSON; the texts are part of the contract
    users read in their logs and in Smartcar's dashboard."""

    def assert_error(self, reply: Reply, status: int, message: str) -> None:
        assert reply.status == status
        assert reply.body == {"error": message}
        assert json.loads(reply.body_bytes()) == {"error": message}
        assert reply.headers == {"Content-Type": "application/json"}

    def test_refusals_carry_the_envelope_for_the_callers_telemetry(self) -> None:
        event = state_event()
        body = encode(event)
        unsigned = decide(body, {})
        forged = decide(body, {"SC-Signature": "0" * 64})
        for reply in (unsigned, forged):
            assert (reply.event_id, reply.event_type) == (event["eventId"], "VEHICLE_STATE")
            assert reply.authenticated is False
        refused = verify_body("a b")
        signed_refusal = decide(refused, {"SC-Signature": sign(TOKEN, refused)})
        assert (signed_refusal.status, signed_refusal.authenticated) == (400, True)
        assert (signed_refusal.event_id, signed_refusal.event_type) == ("v1", "VERIFY")

    def test_oversize_body(self) -> None:
        publisher = RecordingPublisher()
        reply = decide(b"x" * 11, {}, publisher=publisher, max_body_bytes=10)
        self.assert_error(reply, 413, "body exceeds the 10-byte limit")
        assert publisher.sent == []

    def test_body_of_exactly_the_limit_is_read(self) -> None:
        body = encode(state_event())
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)}, max_body_bytes=len(body))
        assert reply.status == 200

    def test_wrong_signature(self) -> None:
        body = encode(state_event())
        self.assert_error(decide(body, {"sc-signature": "0" * 64}), 401, "invalid signature")

    def test_missing_signature(self) -> None:
        self.assert_error(decide(encode(state_event()), {}), 401, "missing SC-Signature header")

    def test_refused_verify_says_why(self) -> None:
        self.assert_error(decide(verify_body("a b"), {}), 400,
                          "VERIFY refused: data.challenge may hold only printable ASCII "
                          "characters (0x21-0x7E) other than { } [ ] \" \\, and has U+0020 at "
                          "position 1; a Smartcar challenge never has one")

    def test_token_unavailable(self) -> None:
        tokens, _ = key_vault_down()
        body = encode(state_event())
        self.assert_error(decide(body, {"SC-Signature": sign(TOKEN, body)}, tokens=tokens), 503,
                          "signing token unavailable, retry later")

    def test_queue_unavailable(self) -> None:
        body = encode(state_event())
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)},
                       publisher=RecordingPublisher(fail_after=0))
        self.assert_error(reply, 503, "event could not be stored, retry later")


class TestWhatIsStored:
    def test_a_signed_event_is_stored_once_with_its_body_and_id(self) -> None:
        event = state_event()
        body = encode(event)
        publisher = RecordingPublisher()
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)}, publisher=publisher)
        assert (reply.status, reply.body) == (200, {"status": "accepted", "eventId": event["eventId"]})
        assert reply.authenticated is True
        assert [m.body for m in publisher.sent] == [body]

    def test_replies_are_compact_json_on_the_wire(self) -> None:
        event = state_event()
        body = encode(event)
        accepted = decide(body, {"SC-Signature": sign(TOKEN, body)})
        assert accepted.body_bytes() == (
            b'{"status":"accepted","eventId":"' + event["eventId"].encode() + b'"}'
        )
        assert decide(body, {}).body_bytes() == b'{"error":"missing SC-Signature header"}'

    def test_a_verify_is_answered_and_never_stored(self) -> None:
        publisher = RecordingPublisher()
        reply = decide(verify_body("abc"), {}, publisher=publisher)
        assert (reply.status, reply.body) == (200, {"challenge": sign(TOKEN, "abc")})
        assert reply.authenticated is False
        assert publisher.sent == []

    def test_a_store_failure_is_not_acknowledged(self) -> None:
        body = encode(state_event())
        publisher = RecordingPublisher(fail_after=0)
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)}, publisher=publisher)
        assert reply.status == 503
        assert publisher.sent == []



class TestWhatOperatorsReadInTheLog:
    """Each refusal an operator must act on is logged once, saying what to check; no token,
    signature or body in it."""

    def records(self, caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "shared.receiver"]

    def test_token_unavailable_is_an_error_saying_smartcar_retries(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        tokens, _ = key_vault_down()
        body = encode(state_event())
        with caplog.at_level(logging.INFO, logger="shared.receiver"):
            decide(body, {"SC-Signature": sign(TOKEN, body)}, tokens=tokens)
        assert self.records(caplog) == [
            (logging.ERROR, "signing token unavailable; answering 503 so Smartcar retries")
        ]

    def test_wrong_signature_is_a_warning_naming_the_token_to_check(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        body = encode(state_event())
        with caplog.at_level(logging.INFO, logger="shared.receiver"):
            decide(body, {"SC-Signature": sign("forged", body)})
        assert self.records(caplog) == [(
            logging.WARNING,
            "signature matches no accepted token; check that the Application Management Token "
            "is the one this webhook uses",
        )]

    def test_store_failure_is_an_error_naming_the_event_and_the_cause(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        event = state_event()
        body = encode(event)
        with caplog.at_level(logging.INFO, logger="shared.receiver"):
            decide(body, {"SC-Signature": sign(TOKEN, body)},
                   publisher=RecordingPublisher(fail_after=0))
        assert self.records(caplog) == [(
            logging.ERROR,
            f"event {event['eventId']} not stored: the queue is unavailable; answering 503",
        )]

    def test_accepted_events_log_nothing_at_info_or_above(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        body = encode(state_event())
        with caplog.at_level(logging.INFO, logger="shared.receiver"):
            decide(body, {"SC-Signature": sign(TOKEN, body)})
        assert self.records(caplog) == []


class TestOutcomes:
    """Each reply names its row of the contract's table (`Reply.outcome`): the value the
    host puts on the receive metrics and span, and the one the alerts count."""

    def test_each_row_has_its_outcome_and_carries_the_envelope(self) -> None:
        event = state_event()
        body = encode(event)
        signed = {"SC-Signature": sign(TOKEN, body)}
        tokens, _ = key_vault_down()
        cases = {
            "oversize": decide(body, signed, max_body_bytes=10),
            "signature_rejected": decide(body, {"SC-Signature": "0" * 64}),
            "unsigned_rejected": decide(body, {}),
            "unavailable": decide(body, signed, tokens=tokens),
            "accepted": decide(body, signed),
        }
        for outcome, reply in cases.items():
            assert reply.outcome == outcome
        for outcome in ("signature_rejected", "unsigned_rejected", "unavailable", "accepted"):
            assert cases[outcome].event_id == event["eventId"], outcome
            assert cases[outcome].event_type == "VEHICLE_STATE", outcome
        assert cases["oversize"].event_id is None  # the body was never read
        failed_store = decide(body, signed, publisher=RecordingPublisher(fail_after=0))
        assert (failed_store.outcome, failed_store.event_id) == ("unavailable", event["eventId"])

    def test_a_signed_body_that_is_not_an_object_is_its_own_authenticated_refusal(self) -> None:
        # A JSON array holding an event: signed, so authenticated, but never stored.
        body = json.dumps([state_event()]).encode()
        publisher = RecordingPublisher()
        reply = decide(body, {"SC-Signature": sign(TOKEN, body)}, publisher=publisher)
        assert (reply.status, reply.outcome, reply.authenticated) == (400, "not_an_object", True)
        assert not publisher.sent

    def test_verify_outcomes_carry_the_envelope(self) -> None:
        answered = decide(verify_body("abc"), {})
        refused = decide(verify_body("a b"), {})
        assert (answered.outcome, answered.event_id, answered.event_type) == (
            "verify_answered", "v1", "VERIFY"
        )
        assert (refused.outcome, refused.event_id, refused.event_type) == (
            "verify_refused", "v1", "VERIFY"
        )

    def test_a_retried_event_is_stored_once_and_reported_as_duplicate(
        self, tmp_path: Path
    ) -> None:
        queue = LocalQueue(tmp_path / "queue.sqlite3")
        publisher = LocalQueuePublisher(queue)
        event = state_event()
        body = encode(event)
        signed = {"SC-Signature": sign(TOKEN, body)}

        async def twice() -> tuple[Reply, Reply]:
            first = await receive(body, signed, tokens=StaticTokenProvider(TOKEN),
                                  publisher=publisher, max_body_bytes=MAX_BODY)
            second = await receive(body, signed, tokens=StaticTokenProvider(TOKEN),
                                   publisher=publisher, max_body_bytes=MAX_BODY)
            return first, second

        first, second = asyncio.run(twice())
        assert (first.status, first.outcome) == (200, "accepted")
        assert (second.status, second.outcome) == (200, "duplicate")
        assert second.body == {"status": "duplicate", "eventId": event["eventId"]}
        assert queue.stats()["active"] == 1
        queue.close()
