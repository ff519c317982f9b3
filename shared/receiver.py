"""The receive decision: raw bytes and headers in, a reply out. No Azure objects here.

Order of checks (contract.md): size → signature → VERIFY challenge → unsigned → JSON object
→ enqueue. A signed JSON object is authentic and is never rejected for its content: whatever
it holds is stored, and the processor dead-letters what it cannot read. A signed body that is
not a JSON object is refused (Smartcar never sends one): with the challenge rules this closes
the signing oracle by construction (see shared/signature.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .delivery_signals import DeliverySignals, default_signals
from .events import peek
from .publisher import Publisher, PublishError, outbound_message
from .signature import challenge_problem, get_signature, matching_token, sign, storable_body
from .telemetry import Telemetry, get_telemetry, with_trace_context
from .tokens import TokenProvider, TokenUnavailableError

logger = logging.getLogger(__name__)

# Outcomes, one per row of the contract's status table (also used as telemetry values).
ACCEPTED = "accepted"
DUPLICATE = "duplicate"
VERIFY_ANSWERED = "verify_answered"
VERIFY_REFUSED = "verify_refused"
SIGNATURE_REJECTED = "signature_rejected"
UNSIGNED_REJECTED = "unsigned_rejected"
NOT_AN_OBJECT = "not_an_object"
OVERSIZE = "oversize"
UNAVAILABLE = "unavailable"
#: All of them: the queries that break deliveries down by outcome cover each one.
OUTCOMES: Final = frozenset({ACCEPTED, DUPLICATE, VERIFY_ANSWERED, VERIFY_REFUSED,
                             SIGNATURE_REJECTED, UNSIGNED_REJECTED, NOT_AN_OBJECT, OVERSIZE,
                             UNAVAILABLE})

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Mapping[str, Any]
    outcome: str
    event_id: str | None = None
    event_type: str | None = None
    #: True once `SC-Signature` matched: only then are `event_id` / `event_type` trustworthy
    #: enough to log (otherwise they are whatever a stranger sent).
    authenticated: bool = False
    headers: Mapping[str, str] = field(default_factory=lambda: JSON_HEADERS)
    #: The body as decoded for the envelope (None: not a JSON object), for the delivery
    #: signals (shared/delivery_signals.py): read it, never change it.
    decoded: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")


def _error(status: int, outcome: str, message: str, **extra: Any) -> Reply:
    return Reply(status=status, body={"error": message}, outcome=outcome, **extra)


async def receive(
    body: bytes,
    headers: Mapping[str, str],
    *,
    tokens: TokenProvider,
    publisher: Publisher,
    max_body_bytes: int,
    telemetry: Telemetry | None = None,
    trace_parent: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    signals: DeliverySignals | None = None,
) -> Reply:
    """Decide and act on one webhook POST. Never raises for any input.

    `trace_parent` is the invocation's trace context (`traceparent`, `tracestate`); `clock`
    (epoch seconds) stamps the time of receipt on the stored message. `signals` (default: the
    process's) records what an authenticated delivery says: retries, latency, shape."""
    recorder = telemetry or get_telemetry()

    async def decide_and_observe() -> Reply:
        reply = await _decide(body, headers, tokens=tokens, publisher=publisher,
                              max_body_bytes=max_body_bytes, clock=clock)
        # Inside the receive span, so the signals land on it too.
        (signals or default_signals()).observe(reply.decoded, reply, answered_at=clock(),
                                               recorder=recorder)
        return reply

    return await recorder.observe_receive(decide_and_observe, parent=trace_parent)


async def _decide(
    body: bytes,
    headers: Mapping[str, str],
    *,
    tokens: TokenProvider,
    publisher: Publisher,
    max_body_bytes: int,
    clock: Callable[[], float],
) -> Reply:
    if len(body) > max_body_bytes:
        return _error(413, OVERSIZE, f"body exceeds the {max_body_bytes}-byte limit")

    envelope, decoded = peek(body)  # one decode, shared with the delivery signals
    extra: dict[str, Any] = {"event_id": envelope.event_id, "event_type": envelope.event_type,
                             "decoded": decoded}
    signature = get_signature(headers)

    if signature is not None or envelope.event_type == "VERIFY":
        try:
            accepted = await tokens.get_tokens()
        except TokenUnavailableError:
            logger.error("signing token unavailable; answering 503 so Smartcar retries")
            return _error(503, UNAVAILABLE, "signing token unavailable, retry later", **extra)
    else:
        accepted = ()

    signing_token = 0
    if signature is not None:
        matched = matching_token(body, signature, accepted)
        if matched is None:
            # The token may have just been rotated in Key Vault: re-read once (rate-limited).
            try:
                refreshed = await tokens.refresh()
                if refreshed:
                    accepted = await tokens.get_tokens()
            except TokenUnavailableError:
                refreshed = False
            matched = matching_token(body, signature, accepted) if refreshed else None
            if matched is None:
                logger.warning(
                    "signature matches no accepted token; check that the Application "
                    "Management Token is the one this webhook uses"
                )
                return _error(401, SIGNATURE_REJECTED, "invalid signature", **extra)
        signing_token = matched
        extra["authenticated"] = True

    if envelope.event_type == "VERIFY":
        problem = challenge_problem(envelope.challenge, envelope.challenge_path)
        if problem is not None:
            return _error(400, VERIFY_REFUSED, f"VERIFY refused: {problem}", **extra)
        assert envelope.challenge is not None
        # Answer with the token Smartcar signed with, the current one when unsigned.
        return Reply(
            status=200,
            body={"challenge": sign(accepted[signing_token], envelope.challenge)},
            outcome=VERIFY_ANSWERED,
            **extra,
        )

    if signature is None:
        return _error(401, UNSIGNED_REJECTED, "missing SC-Signature header", **extra)

    if not storable_body(body):
        return _error(
            400, NOT_AN_OBJECT,
            "signed body is not a JSON object (its first byte after whitespace must be '{'); "
            "nothing was stored",
            **extra,
        )

    # The receive span is current: its trace context travels with the message. The time of
    # receipt travels too: a delivery's age is measured at receipt, never at processing.
    message = with_trace_context(outbound_message(body, envelope, received_at=clock()))
    try:
        stored = await publisher.publish(message)
    except PublishError as exc:
        logger.error("event %s not stored: %s; answering 503", message.message_id, exc)
        return _error(503, UNAVAILABLE, "event could not be stored, retry later", **extra)
    # Not stored means the queue already holds this eventId (within its duplicate window):
    # still 200, so Smartcar stops retrying, but the sender can tell nothing new was stored.
    return Reply(
        status=200,
        body={"status": ACCEPTED if stored else DUPLICATE, "eventId": envelope.event_id},
        outcome=ACCEPTED if stored else DUPLICATE,
        **extra,
    )
