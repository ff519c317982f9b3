"""Smartcar payload signatures: pure functions over raw bytes, no Azure objects.

Smartcar signs the raw request body with HMAC-SHA256 keyed by the Application Management
Token (AMT) and sends the lowercase hex digest in `SC-Signature`. The body must never be
re-serialized before verification: whitespace, `1.0`, `\\u00e9` and `\\/` change on a round trip.

The rules are those of Smartcar's Python SDK (`smartcar.hash_challenge`: HMAC-SHA256 of the
UTF-8 bytes, lowercase hex; `smartcar.verify_payload`: the hex digest must be equal, so an
uppercase signature is refused), except that we verify the bytes as received.

No signing oracle, by construction. A VERIFY is answered with HMAC(AMT, challenge), so the
answer must never be the signature of a body we would store. `challenge_problem` hashes only
1-256 printable ASCII characters (0x21-0x7E) other than `{ } [ ] " \\`, and `storable_body`
lets a signed body be stored only if its first byte after JSON whitespace is `{`. An answered
challenge's UTF-8 bytes therefore start with neither whitespace nor `{`, so they are never a
storable body, and HMAC-SHA256 (a PRF) gives no other way to turn an answer into a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

SIGNATURE_HEADER = "sc-signature"

MAX_CHALLENGE_LENGTH = 256
# The JSON structural characters and quoting; with whitespace and non-ASCII excluded too, no
# answered challenge can be (or start) a JSON object or array, or contain a JSON string.
FORBIDDEN_CHALLENGE_CHARS = frozenset('{}[]"\\')
# A JSON object's start: what JSON (RFC 8259) allows as whitespace before a value, then `{`.
_OBJECT_START = re.compile(rb"[ \t\n\r]*\{")
# Optional whitespace around an HTTP field value (RFC 9110, 5.5) is not part of the value.
_HTTP_OWS = " \t"


def sign(token: str | bytes, message: str | bytes) -> str:
    """Lowercase hex HMAC-SHA256 of `message` keyed with `token`."""
    key = token.encode("utf-8") if isinstance(token, str) else token
    data = message.encode("utf-8") if isinstance(message, str) else message
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def get_signature(headers: Mapping[str, str]) -> str | None:
    """The `SC-Signature` header value, whatever the header name's case; None when absent."""
    for name, value in headers.items():
        if name.lower() == SIGNATURE_HEADER:
            return value
    return None


def matching_token(body: bytes, signature: str, tokens: Iterable[str]) -> int | None:
    """Index of the first token whose HMAC of `body` equals `signature`, else None.

    Every token is compared in constant time, and all of them are always compared, so the
    time taken does not tell which (if any) matched.
    """
    # Exactly the lowercase hex digest, as Smartcar sends it and its SDK's verify_payload
    # requires: an uppercase or otherwise altered digest is not a signature we issued.
    supplied = signature.strip(_HTTP_OWS).encode("ascii", "replace")
    found: int | None = None
    for index, token in enumerate(tokens):
        expected = sign(token, body).encode("ascii")
        if hmac.compare_digest(expected, supplied) and found is None:
            found = index
    return found


def challenge_problem(challenge: object, path: str = "data.challenge") -> str | None:
    """Why a VERIFY challenge must not be hashed, or None when it is acceptable.

    `path` names the challenge's place in the body for the message (`payload.challenge` in
    Smartcar's older format)."""
    if not isinstance(challenge, str):
        return f"{path} must be a string"
    if challenge == "":
        return f"{path} is empty"
    if len(challenge) > MAX_CHALLENGE_LENGTH:
        return f"{path} is longer than {MAX_CHALLENGE_LENGTH} characters"
    for position, ch in enumerate(challenge):
        if not "\x21" <= ch <= "\x7e" or ch in FORBIDDEN_CHALLENGE_CHARS:
            return (
                f"{path} may hold only printable ASCII characters (0x21-0x7E) other than "
                f"{{ }} [ ] \" \\, and has U+{ord(ch):04X} at position {position}; "
                "a Smartcar challenge never has one"
            )
    return None


def storable_body(body: bytes) -> bool:
    """True when a signed body may be stored: its first byte after JSON whitespace is `{`.

    Smartcar sends only JSON objects; with `challenge_problem` this keeps every VERIFY answer
    from ever being the signature of a stored body (see the module docstring)."""
    return _OBJECT_START.match(body) is not None  # matching, unlike lstrip, copies nothing
