"""Property-based tests (hypothesis) of the receive decision and the event parser.

Over arbitrary headers and bytes: no exception escapes, no 5xx other than the defined 503, no
2xx for a request without a valid signature (VERIFY aside), nothing stored that is not signed,
and the receiver is never a signing oracle.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.events import Envelope, InvalidEventError, parse_event, peek_envelope
from shared.receiver import Reply, receive
from shared.signature import challenge_problem, matching_token, sign
from shared.tokens import StaticTokenProvider, TokenUnavailableError

from .fakes import RecordingPublisher

TOKEN = "amt-current"
PREVIOUS = "amt-previous"
MAX_BODY = 1024
MANY = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class NoTokens:
    async def get_tokens(self) -> Sequence[str]:
        raise TokenUnavailableError("Key Vault unreachable")

    async def refresh(self) -> bool:
        raise TokenUnavailableError("Key Vault unreachable")


# One loop for every example: asyncio.run per example would dominate the run time.
_LOOP = asyncio.new_event_loop()


# ---- strategies --------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
event_types = st.one_of(
    st.sampled_from(["VERIFY", "VEHICLE_STATE", "VEHICLE_ERROR", "verify", ""]),
    st.text(max_size=12), json_values,
)


@st.composite
def event_like(draw: st.DrawFn) -> dict[str, Any]:
    event = draw(json_objects)
    event["eventType"] = draw(event_types)
    if draw(st.booleans()):
        event["eventId"] = draw(st.one_of(st.uuids().map(str), st.text(max_size=200), json_values))
    if draw(st.booleans()):
        challenge = draw(st.one_of(st.text(max_size=300), st.from_regex(r"[A-Za-z0-9_-]{1,64}",
                                                                        fullmatch=True),
                                   json_values))
        event["data"] = {"challenge": challenge}
    return event


def dumps(value: Any, style: int) -> bytes:
    if style == 0:
        return json.dumps(value).encode("utf-8")
    if style == 1:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return json.dumps(value, indent=2, sort_keys=True).encode("utf-8")


bodies = st.one_of(
    st.binary(max_size=MAX_BODY + 64),
    st.builds(dumps, event_like(), st.integers(0, 2)),
    st.builds(dumps, json_values, st.integers(0, 2)),
)
header_names = st.one_of(
    st.sampled_from(["SC-Signature", "sc-signature", "SC-SIGNATURE", "Content-Type", "X-Other"]),
    st.text(min_size=1, max_size=20),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str], str]:
    """A body, headers, and how the signature was made: valid, previous, wrong, none."""
    body = draw(bodies)
    headers = draw(st.dictionaries(header_names, st.text(max_size=80), max_size=4))
    headers = {k: v for k, v in headers.items() if k.lower() != "sc-signature"}
    kind = draw(st.sampled_from(["valid", "previous", "wrong", "garbage", "none"]))
    name = draw(st.sampled_from(["SC-Signature", "sc-signature", "Sc-Signature"]))
    if kind == "valid":
        headers[name] = draw(st.sampled_from([sign(TOKEN, body), sign(TOKEN, body).upper(),
                                              f" {sign(TOKEN, body)} "]))
    elif kind == "previous":
        headers[name] = sign(PREVIOUS, body)
    elif kind == "wrong":
        headers[name] = sign("not-the-token", body)
    elif kind == "garbage":
        headers[name] = draw(st.text(max_size=80))
    return body, headers, kind


def run(body: bytes, headers: dict[str, str], *, tokens: Any = None,
        publisher: RecordingPublisher | None = None) -> tuple[Reply, RecordingPublisher]:
    publisher = publisher or RecordingPublisher()
    reply = _LOOP.run_until_complete(
        receive(body, headers, tokens=tokens or StaticTokenProvider(TOKEN, PREVIOUS),
                publisher=publisher, max_body_bytes=MAX_BODY)
    )
    return reply, publisher


def truly_signed(body: bytes, headers: dict[str, str]) -> bool:
    values = [v for k, v in headers.items() if k.lower() == "sc-signature"]
    return bool(values) and matching_token(body, values[0], (TOKEN, PREVIOUS)) is not None


def never_an_oracle(reply: Reply, body: bytes) -> None:
    text = reply.body_bytes().decode("utf-8")
    for token in (TOKEN, PREVIOUS):
        assert sign(token, body) not in text.lower()


# ---- the receive decision ----------------------------------------------------------------------
class TestReceiveDecision:
    @MANY
    @given(requests())
    def test_decision_over_arbitrary_requests(self, request: tuple[bytes, dict[str, str], str]) -> None:
        body, headers, _ = request
        reply, publisher = run(body, headers)  # no exception escapes: receive never raises
        assert reply.status in {200, 400, 401, 413}, reply
        never_an_oracle(reply, body)
        signed = truly_signed(body, headers)
        envelope = peek_envelope(body)
        if len(body) > MAX_BODY:
            assert reply.status == 413 and not publisher.sent
        elif reply.status == 200 and reply.outcome == "verify_answered":
            assert envelope.event_type == "VERIFY"
            assert challenge_problem(envelope.challenge) is None
            assert envelope.challenge is not None
            assert reply.body["challenge"] in {sign(TOKEN, envelope.challenge),
                                               sign(PREVIOUS, envelope.challenge)}
            assert not publisher.sent
        elif reply.status == 200:
            assert signed, "2xx for an unsigned non-VERIFY request"
            assert [m.body for m in publisher.sent] == [body]
        else:
            assert not publisher.sent
        if signed and len(body) <= MAX_BODY and envelope.event_type != "VERIFY":
            assert reply.status == 200, "a signed payload is never rejected for its content"

    @MANY
    @given(requests(), st.booleans(), st.booleans())
    def test_the_only_5xx_is_the_defined_503(
        self, request: tuple[bytes, dict[str, str], str], vault_down: bool, queue_down: bool
    ) -> None:
        body, headers, _ = request
        reply, _ = run(body, headers, tokens=NoTokens() if vault_down else None,
                               publisher=RecordingPublisher(fail_after=0 if queue_down else None))
        assert reply.status in {200, 400, 401, 413, 503}, reply
        never_an_oracle(reply, body)
        if reply.status == 503:
            assert reply.body == {"error": reply.body["error"]} and reply.outcome == "unavailable"
            assert vault_down or queue_down
        if reply.status == 200 and reply.outcome != "verify_answered":
            assert truly_signed(body, headers) and not queue_down and not vault_down

    @MANY
    @given(json_objects, st.integers(0, 2), st.booleans(), st.sampled_from(["VERIFY", "verify"]))
    def test_never_a_signing_oracle_for_json_object_bodies(
        self, target: dict[str, Any], style: int, signed: bool, event_type: str
    ) -> None:
        # An attacker wants sign(token, B) for a webhook body B: it asks for B as a challenge.
        forged = dumps(target, style)
        challenge = forged.decode("utf-8")
        request = json.dumps({"eventType": event_type, "data": {"challenge": challenge}}).encode()
        headers = {"SC-Signature": sign(TOKEN, request)} if signed else {}
        reply, publisher = run(request, headers)
        text = reply.body_bytes().decode("utf-8")
        for token in (TOKEN, PREVIOUS):
            assert sign(token, forged) not in text
            assert sign(token, forged.strip()) not in text
        if event_type == "VERIFY":
            assert reply.status == 400 or (reply.status == 413 and len(request) > MAX_BODY)
        assert not publisher.sent or signed


# ---- the event parser --------------------------------------------------------------------------
class TestParser:
    @MANY
    @given(st.one_of(st.binary(max_size=4096), st.builds(dumps, event_like(), st.integers(0, 2))))
    def test_parse_event_returns_an_event_or_raises_invalid_event_error(self, body: bytes) -> None:
        try:
            event = parse_event(body)
        except InvalidEventError as exc:
            assert str(exc)
        else:
            assert isinstance(event.event_type, str)

    @MANY
    @given(st.one_of(st.binary(max_size=4096), st.builds(dumps, event_like(), st.integers(0, 2))))
    def test_peek_envelope_never_raises_and_yields_only_strings(self, body: bytes) -> None:
        envelope = peek_envelope(body)
        assert isinstance(envelope, Envelope)
        for name in Envelope.__dataclass_fields__:
            assert isinstance(getattr(envelope, name), str | None)
