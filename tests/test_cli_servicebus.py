"""The Service Bus backend of the operations CLI, with fakes only at the SDK boundary."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.servicebus import ServiceBusSubQueue
from azure.servicebus.exceptions import ServiceBusConnectionError

from shared.cli import commands as cli
from shared.cli.ops import ServiceBusOps, open_ops, replay_message_id
from shared.settings import load_settings

from .cli_fakes import FakeAdminClient, FakeNamespace, FakeReceivedMessage, FakeSyncServiceBusClient

NAMESPACE = "sb-test.servicebus.windows.net"
QUEUE = "smartcar-events"


def poison(seq: int, **overrides: Any) -> FakeReceivedMessage:
    body = json.dumps({"eventId": f"evt-{seq}", "eventType": "VEHICLE_STATE"}).encode()
    fields: dict[str, Any] = {
        "sequence_number": seq,
        "message_id": f"evt-{seq}",
        "payload": body,
        "application_properties": {b"eventId": f"evt-{seq}", b"eventType": b"VEHICLE_STATE"},
        "dead_letter_reason": "MaxDeliveryCountExceeded",
        "dead_letter_error_description": "Message could not be consumed after 5 delivery attempts.",
        "delivery_count": 5,
    }
    fields.update(overrides)
    return FakeReceivedMessage(**fields)


def invalid_copy(seq: int) -> FakeReceivedMessage:
    """What ServiceBusDeadLetterer's 1 s TTL copy looks like once the broker dead-letters it."""
    return FakeReceivedMessage(
        sequence_number=seq,
        message_id="sha256:abc:dead-letter",
        payload=b"not json",
        application_properties={
            b"deadLetterReason": "InvalidPayload",
            b"deadLetterDescription": "body is not valid JSON",
            b"mode": "LIVE",
        },
        dead_letter_reason="TTLExpiredException",
        dead_letter_error_description="The message expired and was dead lettered.",
        delivery_count=0,
    )


def test_a_copy_shows_the_event_s_delivery_count_not_its_own_refusals() -> None:
    copy = invalid_copy(21)
    copy.application_properties[b"deadLetterDeliveryCount"] = 1  # delivered once, refused 3x
    copy.delivery_count = 3
    retried = invalid_copy(22)  # a retried event's copy without the count: as before
    retried.application_properties[b"attempt"] = "5"
    retried.delivery_count = 1
    unreadable = invalid_copy(23)
    unreadable.application_properties[b"deadLetterDeliveryCount"] = "many"
    unreadable.delivery_count = 2
    ops = make_ops(FakeNamespace(dlq=[copy, retried, unreadable]))
    assert [d.delivery_count for d in ops.dead_letters(limit=10)] == [1, 5, 2]


@pytest.fixture
def ns() -> FakeNamespace:
    return FakeNamespace(dlq=[poison(11), invalid_copy(12), poison(13)])


def make_ops(ns: FakeNamespace, admin: FakeAdminClient | None = None) -> ServiceBusOps:
    return ServiceBusOps(
        NAMESPACE, QUEUE,
        admin_factory=lambda: admin or FakeAdminClient(),
        client_factory=lambda: FakeSyncServiceBusClient(ns),
        receive_wait=0.01,
    )


def run_cli(monkeypatch: pytest.MonkeyPatch, ops: ServiceBusOps, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("ServiceBusConnection__fullyQualifiedNamespace", NAMESPACE)
    monkeypatch.setattr(cli, "open_ops", lambda settings: ops)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class TestBackendSelection:
    def test_a_namespace_selects_service_bus_without_connecting(self) -> None:
        settings = load_settings({"ServiceBusConnection__fullyQualifiedNamespace": NAMESPACE,
                                  "SERVICEBUS_QUEUE_NAME": "q1"})
        ops = open_ops(settings)
        assert isinstance(ops, ServiceBusOps)
        assert (ops.namespace, ops.queue_name) == (NAMESPACE, "q1")


class TestStats:
    def test_runtime_properties_become_the_contract_counts(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        admin = FakeAdminClient(active=7, dead=3, scheduled=2)
        code, out, _ = run_cli(monkeypatch, make_ops(ns, admin), "stats", "--json")
        assert code == 0
        assert json.loads(out) == {"active": 7, "deadLettered": 3, "scheduled": 2}
        assert admin.asked == [QUEUE]
        assert admin.closed

    def test_missing_permission_is_a_clear_failure_without_traceback(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        admin = FakeAdminClient(fail_with=ClientAuthenticationError("Unauthorized. Claim 'Manage' missing"))
        code, out, err = run_cli(monkeypatch, make_ops(ns, admin), "stats")
        assert code == 1
        assert out == ""
        assert "not authorized" in err and NAMESPACE in err and "az login" in err
        assert "Traceback" not in err

    def test_unreachable_namespace_is_a_failure(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        admin = FakeAdminClient(fail_with=ServiceRequestError("name resolution failed"))
        code, out, err = run_cli(monkeypatch, make_ops(ns, admin), "stats", "--json")
        assert code == 1
        assert "name resolution failed" in json.loads(out)["error"]
        assert "ServiceRequestError" in err


class TestListAndShow:
    def test_list_peeks_the_dead_letter_sub_queue_with_all_fields(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "list", "--json")
        assert code == 0
        entries = json.loads(out)
        assert [e["sequenceNumber"] for e in entries] == [11, 12, 13]
        assert entries[0] == {
            "sequenceNumber": 11, "messageId": "evt-11", "eventId": "evt-11",
            "eventType": "VEHICLE_STATE", "reason": "MaxDeliveryCountExceeded",
            "description": "Message could not be consumed after 5 delivery attempts.",
            "deliveryCount": 5, "enqueuedTime": "2026-01-02T03:04:05+00:00",
        }
        assert ns.receivers == [{"queue_name": QUEUE, "sub_queue": ServiceBusSubQueue.DEAD_LETTER}]
        assert ns.completed == [] and ns.abandoned == []  # peek only

    def test_a_dead_letter_copy_reports_the_processors_reason(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        _, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "list", "--json")
        copy = json.loads(out)[1]
        assert copy["reason"] == "InvalidPayload"
        assert copy["description"] == "body is not valid JSON"
        assert copy["eventId"] is None and copy["eventType"] is None

    def test_list_pages_through_more_than_one_peek(self, monkeypatch: pytest.MonkeyPatch) -> None:
        many = FakeNamespace(dlq=[poison(n) for n in range(1, 131)])
        _, out, _ = run_cli(monkeypatch, make_ops(many), "dlq", "list", "--json")
        assert len(json.loads(out)) == 130

    def test_show_finds_by_sequence_number(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "show", "13", "--json")
        assert code == 0
        doc = json.loads(out)
        assert doc["sequenceNumber"] == 13
        assert json.loads(doc["body"])["eventId"] == "evt-13"
        assert doc["applicationProperties"]["eventId"] == "evt-13"

    def test_show_falls_back_to_a_scan_from_the_lowest_sequence_number(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Incident: the peek by sequence number 12 came back with 13 (the DLQ browses in its
        # own order). The fallback scan resumed after 13, never looked below it, and `dlq show
        # 12` said "not found" for a dead letter that `dlq list` showed. The scan must start at
        # the lowest sequence number and page forward.
        lands_past = FakeNamespace(dlq=[poison(11), poison(12), poison(13), poison(14)],
                                   peek_lands_past={12})
        code, out, err = run_cli(monkeypatch, make_ops(lands_past), "dlq", "show", "12", "--json")
        assert code == 0, err
        assert json.loads(out)["sequenceNumber"] == 12

    def test_show_scans_every_page_from_the_start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        many = FakeNamespace(dlq=[poison(n) for n in range(1, 131)], peek_lands_past={7, 120})
        for seq in (7, 120):
            code, out, err = run_cli(monkeypatch, make_ops(many), "dlq", "show", str(seq), "--json")
            assert code == 0, err
            assert json.loads(out)["sequenceNumber"] == seq

    def test_show_of_an_unknown_id_fails(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, _, err = run_cli(monkeypatch, make_ops(ns), "dlq", "show", "12345")
        assert code == 1
        assert "no dead letter with ID 12345" in err


class TestReplay:
    def test_replay_sends_a_copy_under_a_new_id_then_completes(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "11", "--json")
        assert code == 0
        assert json.loads(out)["replayed"] == [{"sequenceNumber": 11, "messageId": "evt-11:replay:11"}]
        assert ns.events == ["send evt-11:replay:11", "complete 11"]  # settled only after the send
        [sent] = ns.queue
        assert b"".join(sent.body) == poison(11).payload
        assert sent.application_properties["eventId"] == "evt-11"
        assert sent.application_properties["replayedFrom"] == "11"
        assert sent.application_properties["replayCount"] == "1"
        assert ns.seqs() == [12, 13]
        # The other dead letters received along the way were released, not settled.
        assert all(not m.locked for m in ns.dlq)

    def test_replay_of_a_dead_letter_copy_strips_the_markers_and_the_ttl(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, _, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "12")
        assert code == 0
        [sent] = ns.queue
        assert sent.message_id == "sha256:abc:replay:12"
        assert "deadLetterReason" not in sent.application_properties
        assert "deadLetterDescription" not in sent.application_properties
        assert sent.application_properties["mode"] == "LIVE"
        assert sent.time_to_live is None
        assert b"".join(sent.body) == b"not json"

    def test_replay_all(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "--all")
        assert code == 0
        assert "replayed 3 dead letter(s)" in out
        assert ns.dlq == [] and len(ns.queue) == 3

    def test_replay_all_acts_on_a_snapshot_while_the_app_dead_letters_again(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        def dead_letter_again(message: Any) -> None:
            # Still poison: the running app dead-letters the replay under a new sequence number.
            ns.dlq.append(FakeReceivedMessage(200 + len(ns.queue), message.message_id, b"x"))

        ns.on_send = dead_letter_again
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "--all", "--json")
        assert code == 0
        assert [r["sequenceNumber"] for r in json.loads(out)["replayed"]] == [11, 12, 13]
        assert len(ns.queue) == 3
        assert ns.seqs() == [201, 202, 203] and all(not m.locked for m in ns.dlq)

    def test_a_failed_send_never_completes_the_dead_letter(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        ns.send_fails_with = ServiceBusConnectionError(message="link detached")
        code, out, err = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "--all", "--json")
        assert code == 1
        assert ns.completed == []
        assert ns.seqs() == [11, 12, 13] and all(not m.locked for m in ns.dlq)
        doc = json.loads(out)
        assert doc["replayed"] == [] and [f["sequenceNumber"] for f in doc["failed"]] == [11, 12, 13]
        assert "could not be replayed" in err

    def test_unknown_ids_are_reported_and_nothing_else_is_touched(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "99", "--json")
        assert code == 1
        assert json.loads(out)["notFound"] == [99]
        assert ns.queue == [] and ns.seqs() == [11, 12, 13]

    def test_replay_ids_escape_duplicate_detection_and_stay_valid(self) -> None:
        assert replay_message_id("evt-1", 5) == "evt-1:replay:5"
        assert replay_message_id("evt-1:replay:5", 9) == "evt-1:replay:9"
        assert replay_message_id("sha256:ff:dead-letter", 7) == "sha256:ff:replay:7"
        long_id = replay_message_id("x" * 128, 42)
        assert len(long_id) <= 128 and long_id.endswith(":replay:42")


class TestPurge:
    def test_purge_removes_only_what_it_names(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "purge", "11", "13", "--json")
        assert code == 0
        assert json.loads(out) == {"purged": 2, "notFound": []}
        assert ns.seqs() == [12] and not ns.dlq[0].locked
        assert ns.queue == []

    def test_purge_all(self, monkeypatch: pytest.MonkeyPatch, ns: FakeNamespace) -> None:
        code, out, _ = run_cli(monkeypatch, make_ops(ns), "dlq", "purge", "--all")
        assert code == 0
        assert out.strip() == ("purged 3 dead letter(s) of the Service Bus queue smartcar-events "
                               "on sb-test.servicebus.windows.net")
        assert ns.dlq == []
