"""Signatures over raw bytes, the challenge guard, rotation: pure functions, no Azure."""

from __future__ import annotations

import json

import pytest
import smartcar
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.signature import (
    challenge_problem,
    get_signature,
    matching_token,
    sign,
    storable_body,
)


class TestKnownVectors:
    @pytest.mark.parametrize(
        ("message", "expected"),
        [
            ("challenge", "9baf5a7464bd86740ad5a06e439dcf535a075022ed2c92d74efacf646d79328e"),
            ('{"pizza":"pasta"}', "4c05a8da471f05156ad717baa4017acd13a3a809850b9ca7d3301dcaaa854f70"),
            ('{"pizza": "pasta"}', "04040b7103998aefa260b790c63a8f1502fe3e93f5db7cf5f1427c0a1dd1dc15"),
            (
                "3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f",
                "2f0e63b32f2dca91ae5c5f9c10e8647463d58288734aa8bb84fa3ede78b9b50d",
            ),
        ],
    )
    def test_smartcar_test_vectors(self, message: str, expected: str) -> None:
        assert sign("amt", message) == expected
        assert sign(b"amt", message.encode()) == expected


class TestRawBytes:
    """A re-serialized body would not match: verification must use the bytes as received."""

    @pytest.mark.parametrize(
        "body",
        [
            b'{\n    "eventId": "e1",\n    "eventType": "VEHICLE_STATE"\n}',
            '{"eventId":"e1","note":"Stra\u00dfe caf\u00e9 \U0001f697"}'.encode(),
            b'{"eventId":"e1","note":"caf\\u00e9"}',
            b'{"eventId":"e1","value":1.0}',
            b'{"eventId":"e1","url":"https:\\/\\/smartcar.com\\/docs"}',
        ],
        ids=["pretty-printed", "non-ascii", "unicode-escape", "float-1.0", "escaped-slash"],
    )
    def test_signature_over_received_bytes_matches(self, body: bytes) -> None:
        signature = sign("amt", body)
        assert matching_token(body, signature, ["amt"]) == 0
        reserialized = json.dumps(json.loads(body)).encode()
        assert reserialized != body
        assert matching_token(reserialized, signature, ["amt"]) is None


class TestMatchingToken:
    def test_current_token_matches_first(self) -> None:
        assert matching_token(b"x", sign("new", b"x"), ["new", "old"]) == 0

    def test_previous_token_is_accepted_during_rotation(self) -> None:
        assert matching_token(b"x", sign("old", b"x"), ["new", "old"]) == 1

    def test_no_token_matches(self) -> None:
        assert matching_token(b"x", sign("other", b"x"), ["new", "old"]) is None

    def test_no_tokens_at_all(self) -> None:
        assert matching_token(b"x", sign("amt", b"x"), []) is None

    def test_uppercase_hex_is_refused_as_smartcars_sdk_refuses_it(self) -> None:
        assert matching_token(b"x", sign("amt", b"x").upper(), ["amt"]) is None

    def test_whitespace_around_the_header_value_is_not_part_of_it(self) -> None:
        # RFC 9110 5.5: servers strip it before the value reaches us; the local host too.
        assert matching_token(b"x", " \t" + sign("amt", b"x") + " ", ["amt"]) == 0

    @pytest.mark.parametrize("other", ["\n", "\r", "\x0b", "\x0c", "\u00a0"])
    def test_only_space_and_tab_are_optional_whitespace(self, other: str) -> None:
        # Anything else around the digest is part of the value, and so not our signature.
        assert matching_token(b"x", sign("amt", b"x") + other, ["amt"]) is None
        assert matching_token(b"x", other + sign("amt", b"x"), ["amt"]) is None

    @pytest.mark.parametrize("bad", ["", "zz", "\u00e9" * 64, sign("amt", b"x")[:-1]])
    def test_malformed_signature_never_matches_nor_raises(self, bad: str) -> None:
        assert matching_token(b"x", bad, ["amt"]) is None

    def test_comparison_is_constant_time(self) -> None:
        import inspect

        import shared.signature as module

        source = inspect.getsource(module.matching_token)
        assert "hmac.compare_digest" in source
        assert "==" not in source.split('"""')[-1]


class TestHeader:
    @pytest.mark.parametrize("name", ["SC-Signature", "sc-signature", "SC-SIGNATURE"])
    def test_header_found_in_any_case(self, name: str) -> None:
        assert get_signature({"Content-Type": "x", name: "abc"}) == "abc"

    def test_missing_header(self) -> None:
        assert get_signature({"Content-Type": "application/json"}) is None


class TestChallengeGuard:
    @pytest.mark.parametrize("challenge", ["3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f", "c", "x" * 256,
                                           "!", "~", "true", "12345", "a:b/c?d=e&f#g%h"])
    def test_acceptable_challenges(self, challenge: str) -> None:
        assert challenge_problem(challenge) is None

    def test_every_printable_ascii_character_outside_the_forbidden_six_is_answered(self) -> None:
        # Contract: 0x21-0x7E except { } [ ] " \. Plain letters and digits above all: a guard
        # that refused one of them would leave real Smartcar challenges unanswered.
        allowed = [chr(c) for c in range(0x21, 0x7F) if chr(c) not in '{}[]"\\']
        assert len(allowed) == 88
        refused = [ch for ch in allowed if challenge_problem(ch) is not None]
        assert refused == []
        assert challenge_problem("".join(allowed)) is None

    @pytest.mark.parametrize(
        ("challenge", "message"),
        [
            ("", "empty"),
            ("x" * 257, "longer than 256"),
            ('{"a":1}', "characters"),
            ("[1]", "characters"),
            ('"', "characters"),
            ("\\", "characters"),
            ("a b", "characters"),
            ("a\u00a0b", "characters"),
            ("\ud800", "U+D800 at position 0"),
            ("ok\x1bc", "U+001B at position 2"),
            ("\x7f", "U+007F"),
            ("caf\u00e9", "U+00E9"),
            ("\U0001f697", "U+1F697"),
            ("{", "U+007B"),
            ("}", "U+007D"),
            ("]", "U+005D"),
            (None, "must be a string"),
            (42, "must be a string"),
        ],
    )
    def test_challenges_that_could_be_a_body_are_refused(
        self, challenge: object, message: str
    ) -> None:
        problem = challenge_problem(challenge)
        assert problem is not None and message in problem

    @pytest.mark.parametrize(("challenge", "reason"), [
        (None, "data.challenge must be a string"),
        ("", "data.challenge is empty"),
        ("x" * 257, "data.challenge is longer than 256 characters"),
        ("a{b", "data.challenge may hold only printable ASCII characters (0x21-0x7E) other "
                "than { } [ ] \" \\, and has U+007B at position 1; a Smartcar challenge never "
                "has one"),
    ])
    def test_each_refusal_says_exactly_what_is_wrong(self, challenge: object, reason: str) -> None:
        # These texts reach Smartcar's dashboard in the 400 reply; they name the field.
        assert challenge_problem(challenge) == reason

    def test_the_message_names_the_older_formats_path(self) -> None:
        assert challenge_problem(None, "payload.challenge") == "payload.challenge must be a string"


class TestStorableBody:
    @pytest.mark.parametrize("body", [b"{}", b'{"eventId":"e"}', b" \t\r\n{", b"{not json"])
    def test_an_object_after_json_whitespace_is_storable(self, body: bytes) -> None:
        assert storable_body(body)

    @pytest.mark.parametrize("body", [b"", b"   ", b"true", b"[{}]", b'"{}"', b"\xef\xbb\xbf{}",
                                      b"\x0b{}", b"\x0c{}", b"\xc2\xa0{}", b"x{}"])
    def test_anything_else_is_not(self, body: bytes) -> None:
        assert not storable_body(body)


# ---- Smartcar's official Python SDK ------------------------------------------------------------
# Its algorithm as documented (smartcar.py): hash_challenge(amt, challenge) is the lowercase hex
# HMAC-SHA256 of challenge.encode() keyed with amt.encode(); verify_payload(amt, signature, body)
# is hash_challenge(amt, body) == signature. Written out here, and checked against the SDK too.
def sdk_hash_challenge(amt: str, challenge: str) -> str:
    import hashlib
    import hmac

    return hmac.new(amt.encode("utf-8"), challenge.encode("utf-8"), hashlib.sha256).hexdigest()


def sdk_verify_payload(amt: str, signature: str, body: str) -> bool:
    return sdk_hash_challenge(amt, body) == signature


TEXTS = ["challenge", "3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f", '{"pizza":"pasta"}',
         '{"note":"Stra\u00dfe caf\u00e9 \U0001f697"}', "\u00e9t\u00e9", "\U0001f697", "\u4e2d\u6587"]
TOKENS = ["amt", "3b5f1a8e-0f6a-4a63-9d1f-3f2d8c9b7e10", "t\u00f6ken"]


class TestSmartcarSdkParity:
    """We sign and verify exactly as Smartcar's Python SDK does, ASCII or not."""

    @pytest.mark.parametrize("token", TOKENS)
    @pytest.mark.parametrize("text", TEXTS)
    def test_sign_is_the_sdks_hash_challenge(self, token: str, text: str) -> None:
        assert sign(token, text) == sdk_hash_challenge(token, text)
        assert sign(token, text) == smartcar.hash_challenge(token, text)
        assert sign(token, text.encode("utf-8")) == smartcar.hash_challenge(token, text)

    @pytest.mark.parametrize("token", TOKENS)
    @pytest.mark.parametrize("text", TEXTS)
    def test_verification_agrees_with_the_sdks_verify_payload(self, token: str,
                                                              text: str) -> None:
        right = smartcar.hash_challenge(token, text)
        for signature in (right, right.upper(), right[:-1], right + "0", sign("other", text), ""):
            ours = matching_token(text.encode("utf-8"), signature, [token]) == 0
            assert ours == smartcar.verify_payload(token, signature, text), signature
            assert ours == sdk_verify_payload(token, signature, text), signature

    @settings(max_examples=500, deadline=None)
    @given(st.text(), st.text(min_size=1), st.sampled_from(["right", "upper", "other"]))
    def test_agreement_over_generated_bodies_and_tokens(self, body: str, token: str,
                                                        variant: str) -> None:
        try:
            data = body.encode("utf-8")
            token.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: neither side can sign them
            return
        right = smartcar.hash_challenge(token, body)
        signature = {"right": right, "upper": right.upper(), "other": sign("x" + token, data)}[
            variant]
        ours = matching_token(data, signature, [token]) == 0
        assert ours == smartcar.verify_payload(token, signature, body)
        assert ours == sdk_verify_payload(token, signature, body)
