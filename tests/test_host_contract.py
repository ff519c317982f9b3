"""One table of the contract's HTTP cases, run against both hosts with the same expectations.

The local host (shared/local, over HTTP on loopback) and the real `azure-functions-runtime`
(tests/functions_host, over gRPC) get the same request bytes, case by case. Each must give the
table's answer, and they must give each other the same one (status, content type, body): a
difference between the two hosts is a failure even where the table is loose (an error text).
"Stored" counts what each host's receiver durably stored for the case's event: the local
queue's new messages, or the messages sent through the Service Bus fake.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest

from shared.publisher import OutboundMessage, message_id_for
from shared.runtime import Runtime
from shared.signature import sign

from .functions_host.host import FUNCTION_KEY
from .functions_host.session import RuntimeSession
from .support import (
    ERRORS_WEBHOOK,
    TOKEN,
    WEBHOOK,
    Response,
    RunningHost,
    encode,
    fixture_bytes,
    local_env,
    signed_headers,
    state_event,
)

#: Sent to both hosts: the runtime's host checks it on `function` routes, the local host (like
#: `func start`) ignores it.
# The first test also waits for the session's installs and start; only the test is bounded.
pytestmark = pytest.mark.timeout(120, func_only=True)
KEY = {"x-functions-key": FUNCTION_KEY}
OLDER_VERIFY_CHALLENGE = "3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f"


class Host(Protocol):
    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        ...

    def stored(self, message_id: str) -> int:
        ...


@dataclass
class Step:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    """Requests sent in order; the last one's answer is checked, and what was stored."""

    name: str
    steps: Callable[[], tuple[list[Step], str | None]]  # (steps, the event's message id)
    status: int
    body: Callable[[Any], bool]
    stored: int = 0


def single(step: Step, message_id: str | None = None) -> Callable[[], tuple[list[Step],
                                                                            str | None]]:
    return lambda: ([step], message_id)


def signed_event(route: str = WEBHOOK, *, times: int = 1) -> Callable[[], tuple[list[Step],
                                                                               str | None]]:
    def build() -> tuple[list[Step], str | None]:
        event = state_event()
        body = encode(event)
        return [Step("POST", route, body, signed_headers(body))] * times, event["eventId"]
    return build


def older_verify(challenge: object) -> bytes:
    return json.dumps({"version": "2.0", "webhookId": str(uuid.uuid4()), "eventName": "verify",
                       "payload": {"challenge": challenge}}).encode()


def unsigned_event() -> tuple[list[Step], str | None]:
    event = state_event()
    return [Step("POST", WEBHOOK, encode(event), {"Content-Type": "application/json"})], \
        event["eventId"]


def wrongly_signed_event() -> tuple[list[Step], str | None]:
    event = state_event()
    body = encode(event)
    return [Step("POST", WEBHOOK, body, signed_headers(body, "not-the-token"))], event["eventId"]


def oversize_event() -> tuple[list[Step], str | None]:
    event = state_event(padding="x" * 200_000)
    body = encode(event)
    return [Step("POST", WEBHOOK, body, signed_headers(body))], event["eventId"]


def signed(body: bytes) -> Step:
    return Step("POST", WEBHOOK, body, signed_headers(body))


def object_shaped_non_json() -> tuple[list[Step], str | None]:
    body = b'{"eventId": "' + str(uuid.uuid4()).encode() + b'", not json'
    return [signed(body)], message_id_for(body, None)


VERIFY_HMAC = sign(TOKEN, "3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f")

CASES = [
    Case("verify, unsigned", single(Step("POST", WEBHOOK, fixture_bytes("verify.json"))),
         200, lambda b: b == {"challenge": VERIFY_HMAC}),
    Case("verify, signed", single(signed(fixture_bytes("verify.json"))),
         200, lambda b: b == {"challenge": VERIFY_HMAC}),
    Case("verify on the errors route", single(Step("POST", ERRORS_WEBHOOK,
                                                   fixture_bytes("verify.json"))),
         200, lambda b: b == {"challenge": VERIFY_HMAC}),
    Case("verify, older format", single(Step("POST", WEBHOOK,
                                             older_verify(OLDER_VERIFY_CHALLENGE))),
         200, lambda b: b == {"challenge": VERIFY_HMAC}),
    Case("verify, older format, signed", single(signed(older_verify("abc"))),
         200, lambda b: b == {"challenge": sign(TOKEN, "abc")}),
    Case("verify with a wrong signature", single(Step(
        "POST", WEBHOOK, fixture_bytes("verify.json"),
        signed_headers(fixture_bytes("verify.json"), "not-the-token"))),
         401, lambda b: "challenge" not in b),
    Case("verify, unacceptable challenge", single(Step("POST", WEBHOOK, older_verify("a b"))),
         400, lambda b: "payload.challenge" in b["error"] and "challenge" not in b),
    Case("signed event: accepted", signed_event(), 200,
         lambda b: b["status"] == "accepted" and b["eventId"], stored=1),
    Case("signed event on the errors route: accepted", signed_event(ERRORS_WEBHOOK), 200,
         lambda b: b["status"] == "accepted", stored=1),
    Case("the same event twice: duplicate", signed_event(times=2), 200,
         lambda b: b["status"] == "duplicate" and b["eventId"], stored=1),
    Case("unsigned event", unsigned_event, 401, lambda b: b["error"]),
    Case("wrong signature", wrongly_signed_event, 401, lambda b: b["error"]),
    Case("signed, not a JSON object", single(signed(b"[1, 2, 3]")), 400, lambda b: b["error"]),
    Case("signed, object-shaped but not JSON: accepted", object_shaped_non_json, 200,
         lambda b: b == {"status": "accepted", "eventId": None}, stored=1),
    Case("larger than MAX_BODY_BYTES", oversize_event, 413, lambda b: b["error"]),
    Case("health", single(Step("GET", "/api/health")), 200, lambda b: b == {"status": "ok"}),
]


class LocalHost:
    def __init__(self, running: RunningHost, stored: dict[str, int]) -> None:
        self._running = running
        self._stored = stored

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        if method == "GET":
            return self._running.get(path)
        return self._running.post(path, body, headers)

    def stored(self, message_id: str) -> int:
        return self._stored.get(message_id, 0)


class RealRuntime:
    def __init__(self, session: RuntimeSession) -> None:
        self._session = session

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        return self._session.host.http(method, path, body, headers)

    def stored(self, message_id: str) -> int:
        return len(self._session.sent_with_id(message_id))


@pytest.fixture(scope="module")
def local_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHost]:
    stored: dict[str, int] = {}

    def count_stores(runtime: Runtime) -> None:
        inner = runtime.publisher

        class Counting:
            async def publish(self, message: OutboundMessage) -> bool:
                new = await inner.publish(message)
                if new:
                    stored[message.message_id] = stored.get(message.message_id, 0) + 1
                return new

            async def close(self) -> None:
                await inner.close()

        runtime.publisher = Counting()

    with RunningHost(local_env(tmp_path_factory.mktemp("local")), customize=count_stores) as host:
        yield LocalHost(host, stored)


def run(host: Host, steps: list[Step]) -> Response:
    answers = [host.request(s.method, s.path, s.body, {**KEY, **s.headers}) for s in steps]
    return answers[-1]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_hosts_answer_as_the_contract_says(case: Case, local_host: LocalHost,
                                                runtime: RuntimeSession) -> None:
    steps, message_id = case.steps()
    answers = {}
    for name, host in (("local host", local_host), ("azure-functions-runtime",
                                                    RealRuntime(runtime))):
        answer = run(host, steps)
        assert answer.status == case.status, (name, answer.status, answer.body)
        assert answer.headers.get("content-type", "").startswith("application/json"), name
        assert case.body(answer.json()), (name, answer.body)
        if message_id is not None:
            assert host.stored(message_id) == case.stored, name
        answers[name] = (answer.status, answer.headers["content-type"], answer.json())
    assert answers["local host"] == answers["azure-functions-runtime"]


def test_the_table_covers_every_status_of_the_webhook_contract() -> None:
    assert {c.status for c in CASES} >= {200, 400, 401, 413}
