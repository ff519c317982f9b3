"""`explain-signature`: why an `SC-Signature` does or does not match a body.

It tries the current and the previous token, the body re-serialised (compact, indented, keys
sorted: Smartcar's own Node SDK and recipe re-serialise), a trailing newline added or removed
and CRLF, and the digest's case and surrounding whitespace, and reports the first match. The
receiver's own verdict (shared/signature.py) decides whether the signature is accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..signature import matching_token
from .doctor import Tokens


def _js_numbers(value: Any) -> Any:
    """Floats with an integral value as ints: JavaScript's JSON.stringify writes 1.0 as 1."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _js_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_js_numbers(v) for v in value]
    return value


def reserialised(raw: bytes) -> list[tuple[str, bytes]]:
    """The body as common JSON libraries re-write it; empty when it is not JSON, or nested
    too deeply to re-write here (each step recurses: json.loads, `_js_numbers`, json.dumps)."""
    try:
        return _reserialised(raw)
    except (ValueError, RecursionError):
        return []


def _reserialised(raw: bytes) -> list[tuple[str, bytes]]:
    doc = json.loads(raw)
    js = _js_numbers(doc)
    compact = (",", ":")
    forms = [
        ("re-serialised compact, as JavaScript's JSON.stringify(body) writes it",
         json.dumps(js, separators=compact, ensure_ascii=False)),
        ("re-serialised indented by 2, as JSON.stringify(body, null, 2) writes it",
         json.dumps(js, indent=2, ensure_ascii=False)),
        ("re-serialised with Python's json.dumps(body)", json.dumps(doc)),
        ("re-serialised compact with non-ASCII escaped",
         json.dumps(doc, separators=compact)),
        ("re-serialised indented by 4", json.dumps(doc, indent=4, ensure_ascii=False)),
        ("re-serialised compact with keys sorted",
         json.dumps(js, separators=compact, ensure_ascii=False, sort_keys=True)),
        ("re-serialised with keys sorted, as json.dumps(body, sort_keys=True) writes it",
         json.dumps(doc, sort_keys=True)),
    ]
    return [(label, text.encode("utf-8")) for label, text in forms]


def newline_variants(raw: bytes) -> list[tuple[str, bytes]]:
    found = []
    if raw.endswith(b"\n"):
        found.append(("with its trailing newline removed", raw.rstrip(b"\r\n")))
    else:
        found.append(("with a trailing newline added", raw + b"\n"))
    if b"\r\n" in raw:
        found.append(("with CRLF line ends turned into LF", raw.replace(b"\r\n", b"\n")))
    elif b"\n" in raw:
        found.append(("with LF line ends turned into CRLF", raw.replace(b"\n", b"\r\n")))
    return found


def signature_variants(signature: str) -> list[tuple[str, str]]:
    stripped = signature.strip()
    found = [
        ("once the surrounding whitespace is removed", stripped),
        ("once lowercased", signature.lower()),
        ("once lowercased and the surrounding whitespace removed", stripped.lower()),
    ]
    for prefix in ("sha256=", "SHA256="):
        if stripped.startswith(prefix):
            found.append((f"once its {prefix!r} prefix is removed",
                          stripped.removeprefix(prefix).lower()))
    return [(label, value) for label, value in found if value != signature]


@dataclass(frozen=True, slots=True)
class Candidate:
    body_label: str
    body: bytes
    signature_label: str
    signature: str


def candidates(raw: bytes, signature: str) -> Iterator[Candidate]:
    """In the order of the explanation: the body as given, re-serialised, with newline
    changes; then the signature's case and whitespace, with each body."""
    as_given = "as given"
    newlines = newline_variants(raw)
    # A re-serialisation that only adds or drops a newline is explained by the newline.
    seen: set[bytes] = {body for _, body in newlines}
    bodies = [("the body as given", raw), *reserialised(raw)]
    unique = []
    for label, body in bodies:
        if body not in seen:
            seen.add(body)
            unique.append((label, body))
    unique += newlines
    for label, body in unique:
        yield Candidate(label, body, as_given, signature)
    for sig_label, value in signature_variants(signature):
        for label, body in unique:
            yield Candidate(label, body, sig_label, value)


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(slots=True)
class Explanation:
    signature: str
    accepted: bool  # would the receiver accept this body and signature
    match: Candidate | None
    token_label: str | None
    token_index: int | None
    tried: int

    def sentence(self) -> str:
        if self.match is None:
            shape = ""
            if not _HEX_DIGEST.fullmatch(self.signature.strip().lower()):
                shape = (f"The signature is not 64 hex digits ({len(self.signature)} "
                         "characters): it is not a whole SC-Signature value (cut or padded "
                         "when copied?). ")
            return (shape + "No match with the current or the previous token, as given, "
                    "re-serialised, with newline changes or with the signature's case and "
                    "whitespace fixed. "
                    "Most likely the sender signs with another Application Management Token "
                    "(compare the token in Smartcar's Dashboard with the one the receiver "
                    "reads), or the signature was made for another body.")
        m = self.match
        how = f"with the {self.token_label}"
        if self.accepted:
            text = f"The signature matches the body as given {how}: the receiver accepts it."
            if self.token_index:
                text += (" Only the previous token matches: the sender still signs with the "
                         "older token, so keep that Key Vault version enabled until Smartcar's "
                         "application uses the new one.")
            return text
        parts = []
        if m.body_label != "the body as given":
            parts.append(f"the body {m.body_label.removeprefix('the body ')}")
        if m.signature_label != "as given":
            parts.append(f"the signature {m.signature_label}")
        why = []
        if m.body_label.startswith("re-serialised"):
            why.append("the file's bytes differ from the signed bytes only in JSON formatting: "
                       "something parsed and re-wrote the body (a framework, a log, an SDK "
                       "helper); verify and keep the raw request bytes")
        elif m.body_label.startswith("with"):
            why.append("the file gained or lost a newline (an editor, echo, a copy-paste); "
                       "save the body exactly as received, e.g. curl --data-binary @FILE")
        if m.signature_label != "as given":
            why.append("Smartcar sends lowercase hex, compared exactly (as its SDK does); "
                       "something changed the header value")
        return (f"The signature matches {how} only for {' and '.join(parts)}: the receiver "
                f"refuses it as given. Why: {'; '.join(why)}.")

    def to_json(self) -> dict[str, Any]:
        m = self.match
        return {
            "acceptedByReceiver": self.accepted,
            "match": None if m is None else {"token": self.token_label, "body": m.body_label,
                                             "signature": m.signature_label},
            "explanation": self.sentence(),
            "tried": self.tried,
        }


def explain_signature(raw: bytes, signature: str, tokens: Tokens) -> Explanation:
    """The first candidate (in `candidates` order, current token before previous) that
    matches; `accepted` is the receiver's own verdict (shared/signature.py)."""
    accepted = matching_token(raw, signature, tokens.values) is not None
    tried = 0
    for candidate in candidates(raw, signature):
        for index, token in enumerate(tokens.values):
            tried += 1
            if matching_token(candidate.body, candidate.signature, (token,)) is not None:
                return Explanation(signature, accepted, candidate, tokens.label(index), index,
                                   tried)
    return Explanation(signature, accepted, None, None, None, tried)
