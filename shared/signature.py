"""Smartcar payload signatures: pure functions over raw bytes, no Azure objects.

Smartcar signs the raw request body with HMAC-SHA256 keyed by the Application Management
Token (AMT) and sends the lowercase hex digest in `SC-Signature`. The body must never be
re-serialized before verification: whitespace, `1.0`, `\\u00e9` and `\\/` change on a round trip.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

SIGNATURE_HEADER = "sc-signature"

# A VERIFY challenge is answered with its HMAC. A challenge that could be a webhook body would
# turn the receiver into a signing oracle, so only short, "word-like" challenges are hashed.
MAX_CHALLENGE_LENGTH = 256
_FORBIDDEN_CHALLENGE_CHARS = frozenset('{}[]"\\')


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
    supplied = signature.strip().lower().encode("ascii", "replace")
    found: int | None = None
    for index, token in enumerate(tokens):
        expected = sign(token, body).encode("ascii")
        if hmac.compare_digest(expected, supplied) and found is None:
            found = index
    return found


def challenge_problem(challenge: object) -> str | None:
    """Why a VERIFY challenge must not be hashed, or None when it is acceptable."""
    if not isinstance(challenge, str):
        return "data.challenge must be a string"
    if challenge == "":
        return "data.challenge is empty"
    if len(challenge) > MAX_CHALLENGE_LENGTH:
        return f"data.challenge is longer than {MAX_CHALLENGE_LENGTH} characters"
    if any(ch in _FORBIDDEN_CHALLENGE_CHARS or ch.isspace() for ch in challenge):
        return "data.challenge contains characters that a challenge never has"
    return None
