"""`check-endpoint`: Smartcar's VERIFY, in both formats, against a receiver.

It sends VERIFY in the current format and in the older `eventName: verify` format, and checks
each answer as Smartcar's Dashboard does: 200, a JSON body, the HMAC of the challenge with the
token, soon enough. Optionally one signed VEHICLE_STATE in mode TEST follows. Each failure is
one line naming its likely cause: a different token, a missing function key, a redirect, TLS,
a timeout, nothing listening.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..signature import sign
from .doctor import Tokens
from .simulate import build_event, redact_url

#: Smartcar's own limit: an answer later than this is a failed delivery.
SMARTCAR_TIMEOUT_SECONDS = 15.0
#: Slower than this fails the check: Smartcar alerts its own users above 5 s.
DEFAULT_MAX_SECONDS = 5.0
_MAX_READ = 64 * 1024
_SHOWN = 200


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lowercased
    body: bytes
    seconds: float


class NoAnswer(Exception):
    """The POST got no HTTP answer; the message is the one-line reason."""


def _tls_reason(exc: ssl.SSLError, where: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS error: the certificate of {where} is not trusted "
                f"({exc.verify_message}): Smartcar needs a publicly trusted certificate")
    return (f"TLS error talking to {where} ({exc.reason or exc}): the port does not answer "
            "TLS; is it a plain-HTTP port (the local host serves http://; a tunnel gives "
            "you https://)?")


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float) -> Answer:
    """POST without following redirects (Smartcar does not); raises NoAnswer."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    where = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(_MAX_READ)
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                      time.perf_counter() - started)
    except ssl.SSLError as exc:
        raise NoAnswer(_tls_reason(exc, where)) from None
    except TimeoutError:
        raise NoAnswer(f"timeout: no answer from {where} within {timeout:g} s; Smartcar gives "
                       "up after 15 s and retries (a cold start, a stopped or overloaded "
                       "host?)") from None
    except ConnectionRefusedError:
        raise NoAnswer(f"nothing listens on {where} (connection refused): is the host "
                       "running (make run, func start) on that port?") from None
    except socket.gaierror as exc:
        raise NoAnswer(f"cannot resolve {host!r} ({exc.strerror}): check the URL's host "
                       "name") from None
    except (http.client.RemoteDisconnected, ConnectionResetError):
        raise NoAnswer(f"{where} closed the connection without an answer") from None
    except (OSError, http.client.HTTPException) as exc:
        raise NoAnswer(f"cannot reach {where}: {exc}") from None
    finally:
        conn.close()


# -- check-endpoint --------------------------------------------------------------------------


@dataclass(slots=True)
class Check:
    name: str
    passed: bool = False
    status: int | None = None
    seconds: float | None = None
    reason: str | None = None
    answer: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.name, "passed": self.passed, "status": self.status,
            "latencyMs": None if self.seconds is None else round(self.seconds * 1000, 1),
            "reason": self.reason, "answer": self.answer, "notes": self.notes,
        }

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        timing = "" if self.seconds is None else f"{self.status} in {_ms(self.seconds)}"
        detail = self.reason if not self.passed else "; ".join([timing, *self.notes])
        return f"{verdict}  {self.name}: {detail}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _shown(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    text = " ".join(text.split())  # one line, whatever the body holds
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _json_error(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) else None


def _http_problem(answer: Answer, url: str, *, signed: bool) -> str | None:
    """Why a non-2xx answer (or a redirect) fails, with its likely cause; None for 2xx."""
    status = answer.status
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        location = answer.headers.get("location", "(no Location header)")
        return (f"answered {status} redirect to {redact_url(location)}: Smartcar does not "
                "follow redirects; register the final URL (https, exact path) as the "
                "callback URI")
    if status == 401:
        error = _json_error(answer.body)
        if error is None:
            has_key = "code=" in (urlsplit(url).query or "")
            return ("answered 401 before the function ran (no JSON error): "
                    + ("the function key in ?code= is not valid for this function"
                       if has_key else "the Functions host wants the function key: add "
                       "?code=<key> (az functionapp function keys list)"))
        if signed and "signature" in error:
            return (f"answered 401 {error!r}: the receiver's management token differs from "
                    "the one used here (HMAC mismatch)")
        return f"answered 401 {error!r}"
    if status == 404:
        return (f"answered 404: nothing at {urlsplit(url).path or '/'}; the data callback "
                "route is /api/webhooks/smartcar")
    if status == 503:
        return ("answered 503: the receiver could not read its signing token or store the "
                f"event ({_shown(answer.body) or 'empty body'}); Smartcar retries")
    return f"answered {status}: {_shown(answer.body) or '(empty body)'}"


def _verify_body(kind: str) -> tuple[bytes, str]:
    if kind == "current":
        body = build_event("verify")
        challenge: str = json.loads(body)["data"]["challenge"]
        return body, challenge
    # Smartcar's older format: {"version":"2.0","eventName":"verify","payload":{...}}
    challenge = str(uuid.uuid4())
    doc = {"version": "2.0", "webhookId": str(uuid.uuid4()), "eventName": "verify",
           "payload": {"challenge": challenge}}
    return json.dumps(doc, separators=(",", ":")).encode(), challenge


def check_verify(url: str, kind: str, tokens: Tokens, *, timeout: float,
                 max_seconds: float) -> Check:
    name = ("VERIFY (eventType VERIFY)" if kind == "current"
            else 'VERIFY (older eventName "verify")')
    check = Check(name)
    body, challenge = _verify_body(kind)
    # Unsigned, as whether Smartcar signs a VERIFY is not documented: the answer's HMAC is
    # what shows whether the receiver holds the same token.
    answer = post(url, body, {"Content-Type": "application/json",
                              "User-Agent": "smartcar-webhook-cli check-endpoint"},
                  timeout=timeout)
    check.status, check.seconds, check.answer = answer.status, answer.seconds, _shown(answer.body)
    problem = _http_problem(answer, url, signed=False)
    if problem is None and answer.status != 200:
        problem = f"answered {answer.status}; Smartcar's VERIFY wants 200"
    if problem is None:
        problem = _verify_answer_problem(answer, challenge, tokens, check)
    if problem is None and answer.seconds > max_seconds:
        problem = (f"answered in {_ms(answer.seconds)}, slower than {max_seconds:g} s: "
                   "Smartcar wants well inside 15 s (a cold start? raise alwaysReady)")
    check.reason, check.passed = problem, problem is None
    return check


def _verify_answer_problem(answer: Answer, challenge: str, tokens: Tokens,
                           check: Check) -> str | None:
    content_type = answer.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return (f"answered Content-Type {content_type or '(none)'!r}; Smartcar wants "
                "application/json")
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return f"answered 200 with a body that is not JSON: {_shown(answer.body)!r}"
    answered = doc.get("challenge") if isinstance(doc, dict) else None
    if not isinstance(answered, str):
        return f'answered {_shown(answer.body)!r}, not {{"challenge": "<hex HMAC>"}}'
    for index, token in enumerate(tokens.values):
        if answered == sign(token, challenge):
            check.notes.append("challenge HMAC matches")
            if index:
                check.notes.append(f"with the {tokens.label(index)}")
            return None
    return ("the challenge answer is not HMAC-SHA256(token, challenge) with the "
            f"{tokens.label(0)}: the receiver uses a different management token")


def check_test_event(url: str, tokens: Tokens, *, timeout: float,
                     max_seconds: float) -> Check:
    check = Check("test event (VEHICLE_STATE, mode TEST)")
    body = build_event("state")
    answer = post(url, body, {"Content-Type": "application/json",
                              "SC-Signature": sign(tokens.values[0], body),
                              "User-Agent": "smartcar-webhook-cli check-endpoint"},
                  timeout=timeout)
    check.status, check.seconds, check.answer = answer.status, answer.seconds, _shown(answer.body)
    problem = _http_problem(answer, url, signed=True)
    if problem is None and answer.seconds > max_seconds:
        problem = (f"answered in {_ms(answer.seconds)}, slower than {max_seconds:g} s: "
                   "Smartcar wants well inside 15 s")
    if problem is None:
        check.notes.append(check.answer or "(empty body)")
    check.reason, check.passed = problem, problem is None
    return check


@dataclass(slots=True)
class EndpointReport:
    url: str  # redacted
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def reason(self) -> str | None:
        failed = next((c for c in self.checks if not c.passed), None)
        return None if failed is None else f"{failed.name}: {failed.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "passed": self.passed, "reason": self.reason,
                "checks": [c.to_json() for c in self.checks]}

    def text(self) -> str:
        lines = [f"check-endpoint {self.url}", *(c.line() for c in self.checks)]
        lines.append("passed: the endpoint answers as Smartcar expects" if self.passed
                     else "failed")
        return "\n".join(lines)


def check_endpoint(url: str, tokens: Tokens, *, send_test_event: bool,
                   timeout: float = SMARTCAR_TIMEOUT_SECONDS,
                   max_seconds: float = DEFAULT_MAX_SECONDS) -> EndpointReport:
    """Both VERIFY formats, then the test event when asked; stops at a POST that got no
    answer (the next would fail the same way, after the same wait)."""
    report = EndpointReport(redact_url(url), [])
    steps: list[Callable[[], Check]] = [
        lambda: check_verify(url, "current", tokens, timeout=timeout, max_seconds=max_seconds),
        lambda: check_verify(url, "older", tokens, timeout=timeout, max_seconds=max_seconds),
    ]
    names = ["VERIFY (eventType VERIFY)", 'VERIFY (older eventName "verify")']
    if send_test_event:
        steps.append(lambda: check_test_event(url, tokens, timeout=timeout,
                                              max_seconds=max_seconds))
        names.append("test event (VEHICLE_STATE, mode TEST)")
    for name, step in zip(names, steps, strict=True):
        try:
            report.checks.append(step())
        except NoAnswer as exc:
            report.checks.append(Check(name, reason=str(exc)))
            break
    return report
