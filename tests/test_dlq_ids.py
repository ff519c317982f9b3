"""`dlq show/replay/purge` take the IDs operators hold: a sequence number, a messageId or an
eventId (issue 13, point 5), on the embedded queue (the real CLI as a subprocess) and on
Service Bus (fakes at the SDK boundary only). An ID that names two dead letters is refused
with both candidates and the field each matched by: nothing is guessed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

from .cli_fakes import FakeNamespace
from .test_cli_servicebus import make_ops, poison, run_cli

ROOT = Path(__file__).resolve().parent.parent


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    drop = ("SMARTCAR_", "ServiceBusConnection", "KEY_VAULT", "LOCAL_STATE_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["LOCAL_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def dead_letter(state: Path, message_id: str, event_id: str) -> None:
    queue = LocalQueue(state / QUEUE_FILE)
    try:
        body = json.dumps({"eventId": event_id, "eventType": "VEHICLE_STATE"}).encode()
        queue.send(body, message_id=message_id, application_properties={"eventId": event_id})
        (received,) = queue.receive()
        queue.dead_letter(received.lock_token or "", reason="InvalidPayload",
                          description="data is missing")
    finally:
        queue.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    # Sequence numbers 1, 2, 3. The third's eventId is "1": the first's sequence number.
    dead_letter(tmp_path, "msg-a", "evt-a")
    dead_letter(tmp_path, "msg-b", "evt-b")
    dead_letter(tmp_path, "msg-c", "1")
    return tmp_path


def shown(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def shown_list(result: subprocess.CompletedProcess[str]) -> list[Any]:
    assert result.returncode == 0, result.stderr
    entries: list[Any] = json.loads(result.stdout)
    return entries


class TestLocalQueue:
    def test_show_by_sequence_number_event_id_or_message_id(self, state: Path) -> None:
        assert shown(cli(state, "dlq", "show", "2", "--json"))["eventId"] == "evt-b"
        assert shown(cli(state, "dlq", "show", "evt-b", "--json"))["sequenceNumber"] == 2
        assert shown(cli(state, "dlq", "show", "msg-b", "--json"))["sequenceNumber"] == 2

    def test_replay_by_event_id(self, state: Path) -> None:
        doc = shown(cli(state, "dlq", "replay", "evt-a", "--json"))
        assert [r["sequenceNumber"] for r in doc["replayed"]] == [1]
        assert doc["notFound"] == []

    def test_purge_by_message_id_and_sequence_number_together(self, state: Path) -> None:
        assert shown(cli(state, "dlq", "purge", "msg-a", "2", "--json")) == {
            "purged": 2, "notFound": []}
        remaining = json.loads(cli(state, "dlq", "list", "--json").stdout)
        assert [e["messageId"] for e in remaining] == ["msg-c"]

    def test_an_id_naming_two_dead_letters_is_refused_with_both_and_why(
        self, state: Path
    ) -> None:
        result = cli(state, "dlq", "purge", "1")
        assert result.returncode == 2
        assert result.stderr.strip() == (
            "error: ID '1' matches 2 dead letters: 1 (by its sequenceNumber), "
            "3 (by its eventId); name one by its sequence number as seq:N (seq:1 or seq:3), "
            "which means nothing else")
        assert len(json.loads(cli(state, "dlq", "list", "--json").stdout)) == 3  # none purged

    def test_the_hint_for_an_ambiguous_id_always_disambiguates(self, state: Path) -> None:
        """The hint used to say "give the sequence number": 1, the very ID refused. seq:N is
        a sequence number and nothing else, so following the hint always works."""
        assert shown(cli(state, "dlq", "show", "seq:1", "--json"))["messageId"] == "msg-a"
        assert shown(cli(state, "dlq", "purge", "seq:3", "--json")) == {
            "purged": 1, "notFound": []}
        remaining = json.loads(cli(state, "dlq", "list", "--json").stdout)
        assert [e["messageId"] for e in remaining] == ["msg-a", "msg-b"]
        # With the eventId "1" gone, a bare 1 is the sequence number again.
        assert shown(cli(state, "dlq", "show", "1", "--json"))["messageId"] == "msg-a"

    def test_digits_that_int_refuses_are_not_sequence_numbers(self, state: Path) -> None:
        """'²' is a digit to str.isdigit and a ValueError to int(): it was a traceback."""
        missing = cli(state, "dlq", "show", "²")
        assert missing.returncode == 1 and "Traceback" not in missing.stderr
        assert "no dead letter with ID ²" in missing.stderr
        for command in ("replay", "purge"):
            result = cli(state, "dlq", command, "²", "--json")
            assert result.returncode == 1 and "Traceback" not in result.stderr
            assert json.loads(result.stdout)["notFound"] == ["²"]

    def test_not_found_ids_are_reported_as_typed(self, state: Path) -> None:
        result = cli(state, "dlq", "purge", "000123", "seq:99", "99", "--json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["notFound"] == ["000123", "seq:99", 99]

    @pytest.mark.parametrize("limit", ["1000001", "9223372036854775807"])
    def test_a_limit_beyond_the_bound_is_a_usage_error(self, state: Path, limit: str) -> None:
        """limit + 1 went to SQLite as is: an OverflowError traceback at 2**63 - 1."""
        result = cli(state, "dlq", "list", "--limit", limit, "--json")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "--limit must be at least 1 and at most 1000000" in json.loads(
            result.stdout)["error"]
        assert len(shown_list(cli(state, "dlq", "list", "--limit", "1000000", "--json"))) == 3

    def test_unknown_ids_are_reported_as_given(self, state: Path) -> None:
        result = cli(state, "dlq", "replay", "nope", "99", "--json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["notFound"] == ["nope", 99]
        missing = cli(state, "dlq", "show", "nope")
        assert missing.returncode == 1
        assert (f"no dead letter with ID nope in the local queue {state / 'queue.sqlite3'} "
                "(a sequence number, messageId or eventId") in missing.stderr


class TestServiceBus:
    def test_show_and_replay_by_event_id(self, monkeypatch: pytest.MonkeyPatch) -> None:
        ns = FakeNamespace(dlq=[poison(11), poison(13)])
        code, out, err = run_cli(monkeypatch, make_ops(ns), "dlq", "show", "evt-13", "--json")
        assert code == 0, err
        assert json.loads(out)["sequenceNumber"] == 13
        code, out, err = run_cli(monkeypatch, make_ops(ns), "dlq", "replay", "evt-13", "--json")
        assert code == 0, err
        assert [r["sequenceNumber"] for r in json.loads(out)["replayed"]] == [13]
        assert ns.seqs() == [11]

    def test_an_event_dead_lettered_twice_is_ambiguous_by_its_event_id(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A replay re-sent as evt-11:replay:11 that failed again: same eventId, new message.
        again = poison(40, message_id="evt-11:replay:11", payload=poison(11).payload,
                       application_properties=dict(poison(11).application_properties))
        ns = FakeNamespace(dlq=[poison(11), again])
        code, _, err = run_cli(monkeypatch, make_ops(ns), "dlq", "purge", "evt-11")
        assert code == 2
        assert "ID 'evt-11' matches 2 dead letters: 11 (by its eventId), 40 (by its eventId)" in err
        assert ns.seqs() == [11, 40] and ns.completed == []
        code, out, err = run_cli(monkeypatch, make_ops(ns), "dlq", "purge",
                                 "evt-11:replay:11", "--json")
        assert code == 0, err
        assert json.loads(out) == {"purged": 1, "notFound": []}
        assert ns.seqs() == [11]


class TestServiceBusListLimit:
    def test_limit_says_how_many_of_the_queues_count_are_shown(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from .cli_fakes import FakeAdminClient

        ns = FakeNamespace(dlq=[poison(11), poison(12), poison(13)])
        ops = make_ops(ns, FakeAdminClient(dead=3))
        code, out, err = run_cli(monkeypatch, ops, "dlq", "list", "--limit", "1")
        assert code == 0, err
        assert out.splitlines()[-1] == (
            "1 of 3 dead-lettered shown (raise --limit for more). Details: dlq show ID")

    def test_without_the_role_to_count_it_still_says_some_were_left_out(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from azure.core.exceptions import ClientAuthenticationError

        from .cli_fakes import FakeAdminClient

        ns = FakeNamespace(dlq=[poison(11), poison(12), poison(13)])
        admin = FakeAdminClient(fail_with=ClientAuthenticationError("no Manage claim"))
        code, out, err = run_cli(monkeypatch, make_ops(ns, admin), "dlq", "list", "--limit", "2")
        assert code == 0, err
        assert out.splitlines()[-1] == (
            "2 of more than 2 dead-lettered shown (raise --limit for more). "
            "Details: dlq show ID")
