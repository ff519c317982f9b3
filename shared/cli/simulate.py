"""Simulated Smartcar deliveries: realistic signed events, sent over HTTP with urllib.

`build_event` makes a fresh event (new `eventId`, `deliveryId`, `deliveredAt` = now) from
templates shaped like Smartcar's documented payloads; `deliver` POSTs any body signed byte for
byte, as Smartcar does, and checks a VERIFY answer. Standard library only, so the smoke test
needs nothing beyond the app's own dependencies.
"""

from __future__ import annotations

import copy
import json
import ssl
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..events import peek_envelope
from ..signature import sign

EVENT_TYPES = ("verify", "state", "error")
DEFAULT_TIMEOUT = 15.0  # Smartcar's own limit for an answer
_REDACTED_PARAMS = frozenset({"code"})
_MAX_SHOWN_BODY = 2000

_VEHICLE = {
    "id": "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2",
    "make": "TESLA",
    "model": "Model 3",
    "year": 2020,
}
_META = {
    "version": "4.0",
    "webhookId": "abde94ff-d57d-43b9-8d09-6020db2d977a",
    "webhookName": "Battery Monitoring",
    "mode": "TEST",
}

_TEMPLATES: dict[str, dict[str, Any]] = {
    "verify": {
        "eventType": "VERIFY",
        "data": {"challenge": ""},
        "meta": {k: v for k, v in _META.items() if k != "mode"},
    },
    "state": {
        "eventType": "VEHICLE_STATE",
        "vehicleId": _VEHICLE["id"],
        "data": {
            "user": {"id": "93b3ea96-ca37-43a9-9073-f4334719c8a7"},
            "vehicle": _VEHICLE,
            "triggers": [
                {
                    "code": "tractionbattery-stateofcharge",
                    "name": "StateOfCharge",
                    "group": "TractionBattery",
                }
            ],
            "signals": [
                {
                    "code": "tractionbattery-stateofcharge",
                    "name": "StateOfCharge",
                    "group": "TractionBattery",
                    "body": {"unit": "percent", "value": 78},
                    "meta": {"oemUpdatedAt": 0, "fetchedAt": 0},
                },
                {
                    "code": "charge-ischarging",
                    "name": "IsCharging",
                    "group": "Charge",
                    "body": {"value": True},
                    "meta": {"oemUpdatedAt": 0, "fetchedAt": 0},
                },
                {
                    "code": "location-isathome",
                    "name": "IsAtHome",
                    "group": "Location",
                    "status": {
                        "error": {"code": "VEHICLE_NOT_CAPABLE", "type": "COMPATIBILITY"},
                        "value": "ERROR",
                    },
                },
            ],
        },
        "meta": {**_META, "signalCount": 3},
    },
    "error": {
        "eventType": "VEHICLE_ERROR",
        "vehicleId": _VEHICLE["id"],
        "data": {
            "user": {"id": "93b3ea96-ca37-43a9-9073-f4334719c8a7"},
            "vehicle": _VEHICLE,
            "errors": [
                {
                    "type": "COMPATIBILITY",
                    "code": "VEHICLE_NOT_CAPABLE",
                    "state": "ERROR",
                    "description": "The vehicle is incapable of performing your request.",
                    "suggestedUserMessage": "Your car is unable to perform this request.",
                    "docURL": "https://smartcar.com/docs/errors/api-errors/"
                    "compatibility-errors#vehicle-not-capable",
                    "resolution": {"type": "CONTACT_SUPPORT"},
                    "signals": [
                        {
                            "code": "tractionbattery-stateofcharge",
                            "name": "StateOfCharge",
                            "group": "TractionBattery",
                        }
                    ],
                }
            ],
        },
        "meta": _META,
    },
}


class DeliveryError(RuntimeError):
    """The endpoint could not be reached, answered non-2xx, or answered VERIFY wrongly."""

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class Delivery:
    """What was sent and what came back."""

    url: str  # redacted
    event_id: str | None
    event_type: str | None
    signed: bool
    status: int
    body: str
    challenge_verified: bool | None  # None when the event was not a VERIFY


@dataclass(frozen=True, slots=True)
class Shape:
    """What `send` changes in the template: ids, signal values and their `oemUpdatedAt`, so an
    out-of-order update or a handler's own case can be tried without writing JSON."""

    event_id: str | None = None
    vehicle_id: str | None = None
    signals: tuple[tuple[str, str, Any], ...] = ()  # (group, name, value)
    oem_updated_at_ms: int | None = None

    @property
    def empty(self) -> bool:
        return self == Shape()


def parse_signal_setting(text: str) -> tuple[str, str, Any]:
    """`Group.Name=value` as (group, name, value). The value is read as JSON when it is JSON
    (`12`, `true`, `null`, `{"value": 1}`), else kept as the string given (`Parked`). NaN,
    Infinity and numbers too large for a double (1e999) are refused: Python's json reads them,
    but the signed body would not be JSON."""
    path, sep, raw = text.partition("=")
    group, dot, name = path.partition(".")
    if not sep or not dot or not group or not name or "." in name:
        raise ValueError(f"--set expects Group.Name=value (e.g. TractionBattery.StateOfCharge=12),"
                         f" got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        return group, name, raw
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise ValueError(f"--set {text!r}: NaN, Infinity and numbers beyond a double's range "
                         "are not JSON: give a finite number, or a JSON string such as "
                         '"NaN" for text') from None
    return group, name, value


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO-8601 time (with an offset, or `Z`), as epoch ms."""
    digits = text.removeprefix("-")
    if digits.isascii() and digits.isdigit():
        return int(text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--oem-updated-at expects epoch milliseconds or an ISO-8601 time "
                         f"such as 2026-01-31T08:00:00Z, got {text!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"--oem-updated-at {text!r} has no UTC offset: add Z or +HH:MM")
    return int(parsed.timestamp() * 1000)


def build_event(kind: str, *, now_ms: int | None = None, shape: Shape | None = None) -> bytes:
    """A fresh event of `kind` (verify, state or error), serialized as Smartcar sends it."""
    if kind not in _TEMPLATES:
        raise ValueError(f"unknown event type {kind!r}; expected one of {', '.join(EVENT_TYPES)}")
    shape = shape or Shape()
    if kind == "verify" and (shape.vehicle_id is not None or shape.signals
                             or shape.oem_updated_at_ms is not None):
        raise ValueError("a VERIFY event has no vehicle or signals: --vehicle-id, --set and "
                         "--oem-updated-at apply to --type state (and --vehicle-id to error)")
    if kind == "error" and (shape.signals or shape.oem_updated_at_ms is not None):
        raise ValueError("--set and --oem-updated-at shape the signals of --type state")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    event = copy.deepcopy(_TEMPLATES[kind])
    event = {"eventId": shape.event_id or str(uuid.uuid4()), **event}
    event["meta"]["deliveryId"] = str(uuid.uuid4())
    event["meta"]["deliveredAt"] = now
    if kind == "verify":
        event["data"]["challenge"] = str(uuid.uuid4())
    if shape.vehicle_id is not None:
        event["vehicleId"] = shape.vehicle_id
        event["data"]["vehicle"]["id"] = shape.vehicle_id
    signals = event["data"].get("signals", [])
    for group, name, value in shape.signals:
        _set_signal(signals, group, name, value)
    if signals:
        event["meta"]["signalCount"] = len(signals)
    oem = now - 2000 if shape.oem_updated_at_ms is None else shape.oem_updated_at_ms
    for signal in signals:
        if "meta" in signal:
            signal["meta"] = {"oemUpdatedAt": oem, "fetchedAt": now - 500}
    # allow_nan=False: what is signed must be JSON (NaN is not), or it is dead-lettered.
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _set_signal(signals: list[dict[str, Any]], group: str, name: str, value: Any) -> None:
    """Set the signal's value (a JSON object is its whole body), adding the signal when the
    template has none of that name. A signal that was an error becomes a value."""
    body = value if isinstance(value, dict) else {"value": value}
    for signal in signals:
        if signal["group"].lower() == group.lower() and signal["name"].lower() == name.lower():
            unit = signal.get("body", {}).get("unit")
            signal.pop("status", None)
            signal["body"] = {"unit": unit, **body} if unit and "unit" not in body else body
            signal.setdefault("meta", {})
            return
    signals.append({"code": f"{group}-{name}".lower(), "name": name, "group": group,
                    "body": body, "meta": {}})


def redact_url(url: str) -> str:
    """The URL with the function key (`code=`) replaced, safe to print or log; one that does
    not parse (a bracketed host left open) loses its whole query instead."""
    try:
        parts = urlsplit(url)
    except ValueError:
        path, sep, _ = url.partition("?")
        return f"{path}?REDACTED" if sep else path
    if not parts.query:
        return url
    query = [
        (name, "REDACTED" if name.lower() in _REDACTED_PARAMS else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="")))


def check_url(url: str) -> str | None:
    """Why `url` cannot be used, or None."""
    expected = ("--url must be an http(s) URL such as "
                f"http://127.0.0.1:7071/api/webhooks/smartcar, got {redact_url(url)!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - read for its ValueError: a port outside 0-65535, not a number
    except ValueError as exc:  # also a bracketed (IPv6) host left open or malformed
        return f"{expected}: {exc}"
    if parts.scheme not in ("http", "https") or not parts.netloc or not parts.hostname:
        return expected
    return None


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def unreachable(url: str, reason: object) -> str:
    """Why `url` could not be reached, with what to do: the two first-run mistakes are a host
    that is not running (or runs on another port) and https sent to the local host's plain
    HTTP port."""
    parts = urlsplit(url)
    shown = redact_url(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    local = host in _LOOPBACK
    if isinstance(reason, ConnectionRefusedError):
        hint = (f" Is `make run` running, and on port {port}? It listens on PORT (default "
                "7071) and prints its URLs when it starts." if local else "")
        return f"cannot reach {shown}: connection refused (nothing listens on {host}:{port}).{hint}"
    if isinstance(reason, ssl.SSLError) and parts.scheme == "https":
        plain = urlunsplit(parts._replace(scheme="http"))
        if local:
            return (f"cannot reach {shown}: TLS failed ({reason.reason or reason}). The local "
                    f"host speaks plain HTTP: use {redact_url(plain)}")
        return (f"cannot reach {shown}: TLS failed ({reason.reason or reason}); does that port "
                "serve plain HTTP?")
    return f"cannot reach {shown}: {reason}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Smartcar treats a 3xx as a failed delivery, so the smoke test does too.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _shown(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= _MAX_SHOWN_BODY else text[:_MAX_SHOWN_BODY] + "..."


def deliver(
    url: str,
    body: bytes,
    *,
    token: str | None,
    signed: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Delivery:
    """POST `body` like Smartcar: `SC-Signature` = HMAC-SHA256(token, body) unless unsigned.

    Raises `DeliveryError` for an unreachable URL, a timeout, any non-2xx answer, or a VERIFY
    answer whose challenge hash is not the expected one. Messages never contain the key.
    """
    if signed and not token:
        raise DeliveryError("no signing token: pass --token or set SMARTCAR_MANAGEMENT_TOKEN")
    shown_url = redact_url(url)
    headers = {"Content-Type": "application/json", "User-Agent": "smartcar-webhook-cli"}
    if signed:
        assert token is not None
        headers["SC-Signature"] = sign(token, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            raw = response.read()
    except urllib.error.HTTPError as exc:
        text = _shown(exc.read() or b"")
        raise DeliveryError(
            f"{shown_url} answered {exc.code}: {text or '(empty body)'}",
            status=exc.code,
            body=text,
        ) from None
    except urllib.error.URLError as exc:
        raise DeliveryError(unreachable(url, exc.reason)) from None
    except TimeoutError:
        raise DeliveryError(f"no answer from {shown_url} within {timeout:g}s") from None
    except OSError as exc:
        raise DeliveryError(unreachable(url, exc)) from None
    text = _shown(raw)
    if not 200 <= status < 300:
        raise DeliveryError(f"{shown_url} answered {status}: {text}", status=status, body=text)

    envelope = peek_envelope(body)
    verified: bool | None = None
    if envelope.event_type == "VERIFY" and envelope.challenge is not None:
        if not token:
            raise DeliveryError("cannot check the VERIFY answer without a token: pass --token")
        expected = sign(token, envelope.challenge)
        try:
            answered = json.loads(raw).get("challenge")
        except (ValueError, AttributeError):
            answered = None
        if answered != expected:
            raise DeliveryError(
                f"{shown_url} answered VERIFY with {text!r}, expected "
                f'{{"challenge": "{expected}"}} (HMAC-SHA256 of the challenge with the token): '
                "is the app configured with the same management token?",
                status=status,
                body=text,
            )
        verified = True
    return Delivery(
        url=shown_url,
        event_id=envelope.event_id,
        event_type=envelope.event_type,
        signed=signed,
        status=status,
        body=text,
        challenge_verified=verified,
    )
