"""orjson's results are used only where they are the standard library's (shared/fastjson.py).

The standard library is the reference: on hand-written JSON text (escapes, lone surrogates,
NaN, 1e400, huge integers), on `json.dumps` output of arbitrary values and on arbitrary bytes,
`loads_or_declined` either declines or returns a value identical to `json.loads`, type for
type and bit for bit. The parser and the receiver's envelope, which use it, are compared with
their standard-library path (a `str` body, which is always declined).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.common import state_payload
from shared.events import _DECODER, InvalidEventError, _load, _text_of, peek_envelope
from shared.fastjson import DECLINED, loads_or_declined

from .test_properties import MANY, dumps, json_value_text, json_values


def identical(a: Any, b: Any) -> bool:
    """Equal, with the same types throughout, floats bit for bit (-0.0 is not 0.0), and
    object keys in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return bool(a.hex() == b.hex())
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def reference(body: bytes) -> Any:
    """The standard library's reading; raises what it raises."""
    return json.loads(body.decode("utf-8"))


def check_against_reference(body: bytes) -> None:
    fast = loads_or_declined(body)
    try:
        expected = reference(body)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int limits
        assert fast is DECLINED, f"json refuses {body[:80]!r}, orjson returned {fast!r:.80}"
        return
    assert fast is DECLINED or identical(fast, expected), (body[:200], fast, expected)


written = st.builds(
    lambda text, bom, pad: (bom + pad + text + pad).encode("utf-8", "surrogatepass"),
    json_value_text, st.sampled_from(["", "\ufeff"]), st.sampled_from(["", " ", "\n\t "]),
)
dumped = st.builds(dumps, json_values, st.integers(0, 2))
# Numbers near orjson's 64-bit limits and float edge cases, alone and inside arrays.
numbers = st.one_of(
    st.integers(-(2**64), 2**65), st.integers(), st.floats(allow_nan=False),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**18 - 1]),
).map(lambda n: json.dumps([n, {"v": n}]).encode())


class TestLoadsOrDeclined:
    @MANY
    @given(written)
    def test_hand_written_text_is_read_as_json_reads_it_or_declined(self, body: bytes) -> None:
        check_against_reference(body)

    @MANY
    @given(dumped)
    def test_dumped_values_are_read_as_json_reads_them_or_declined(self, body: bytes) -> None:
        check_against_reference(body)

    @MANY
    @given(numbers)
    def test_numbers_keep_their_type_and_value(self, body: bytes) -> None:
        check_against_reference(body)

    @MANY
    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_never_raise_and_never_differ(self, body: bytes) -> None:
        check_against_reference(body)

    @pytest.mark.parametrize("body", [
        b"18446744073709551616",  # 2**64: orjson alone would make it a float
        b"[-9223372036854775809]",
        b'{"a": 123456789012345678901234567890}',
        b"NaN", b"[Infinity]", b"[1e400]", b"[-1e400]",  # json reads these; orjson refuses
        b'"\\ud800"',  # a lone surrogate: json reads it
        b"\xef\xbb\xbf{}",  # a byte order mark
        b"[" * 1100 + b"]" * 1100,
        b"\xff{}",
    ])
    def test_what_orjson_would_read_differently_or_refuse_is_declined(self, body: bytes) -> None:
        assert loads_or_declined(body) is DECLINED

    @pytest.mark.parametrize("body", [bytearray(b"{}"), memoryview(b"{}"), "{}", None, 1])
    def test_anything_but_bytes_is_declined(self, body: object) -> None:
        assert loads_or_declined(body) is DECLINED

    def test_an_event_is_decoded_by_orjson_not_declined(self) -> None:
        """Declining everything would be correct and slow: the fast path must be taken for
        what Smartcar sends, 18-digit integers included."""
        body = state_payload(5 * 1024)
        assert loads_or_declined(body) == json.loads(body)
        assert loads_or_declined(b'{"n": 999999999999999999}') == {"n": 10**18 - 1}


    def test_without_exact_numbers_huge_integers_skip_the_digit_check(self) -> None:
        """For callers that read only strings: no 19-digit scan, orjson's reading kept."""
        body = b'{"eventId": "e", "n": 18446744073709551616}'
        assert loads_or_declined(body) is DECLINED
        assert loads_or_declined(body, exact_numbers=False) == {"eventId": "e", "n": 2.0**64}
        assert loads_or_declined(b"NaN", exact_numbers=False) is DECLINED


class TestCallersMatchTheirStandardLibraryPath:
    @MANY
    @given(st.one_of(written, dumped, numbers))
    def test_the_parser_reads_or_refuses_exactly_as_before(self, body: bytes) -> None:
        try:
            expected: Any = _DECODER.decode(_text_of(body))
        except InvalidEventError as exc:
            expected = exc
        except (ValueError, RecursionError) as exc:
            expected = exc
        try:
            got: Any = _load(body)
        except Exception as exc:  # compared with the reference below
            got = exc
        if isinstance(expected, Exception):
            assert isinstance(got, InvalidEventError), (body[:120], got)
            if isinstance(expected, InvalidEventError):
                assert str(got) == str(expected)
        else:
            assert identical(got, expected), (body[:200], got, expected)

    def test_the_receivers_envelope_takes_orjson_even_past_64_bit_integers(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Its speed is the point: an event, and one with a huge integer the envelope never
        reads, are decoded without the json path (which would answer the same, slower)."""

        def no_json(*args: object, **kwargs: object) -> object:
            raise AssertionError("the json path was taken")

        bodies = (state_payload(2048, event_id="e-1"),
                  b'{"eventId": "e-1", "data": {"n": 123456789012345678901234567890}}')
        monkeypatch.setattr("shared.events.json.loads", no_json)
        for body in bodies:
            assert peek_envelope(body).event_id == "e-1"

    def test_the_processor_decodes_an_event_without_the_json_path(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As for the envelope: a usual event is decoded by orjson; the json path (which
        would give the same event) is for what orjson cannot promise."""

        def no_json(*args: object, **kwargs: object) -> object:
            raise AssertionError("the json path was taken")

        body = state_payload(2048, event_id="e-1")
        monkeypatch.setattr("shared.events.json.loads", no_json)
        monkeypatch.setattr(_DECODER, "decode", no_json)
        assert _load(body)["eventId"] == "e-1"

    @MANY
    @given(st.one_of(written, dumped))
    def test_the_receivers_envelope_is_the_standard_librarys(self, body: bytes) -> None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return
        assert peek_envelope(body) == peek_envelope(text)  # type: ignore[arg-type]
