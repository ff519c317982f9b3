"""The operations CLI against the real local host over HTTP and the real SQLite queue."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shared.cli import commands as cli
from shared.cli.simulate import build_event, redact_url
from shared.handlers import HandlerRegistry
from shared.local.command import banner
from shared.settings import load_settings

from .support import (
    WEBHOOK,
    RunningHost,
    encode,
    local_env,
    signed_headers,
    state_event,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"messageId", "eventId", "eventType", "reason", "description", "deliveryCount", "enqueuedTime"}


class Switch:
    """A VEHICLE_STATE handler that fails while `broken` is True."""

    def __init__(self) -> None:
        self.broken = True
        self.registry = HandlerRegistry()

        @self.registry.on("VEHICLE_STATE")
        def handle(event: Any, context: Any) -> None:
            if self.broken:
                raise RuntimeError("downstream system is down")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = local_env(tmp_path, MAX_DELIVERY_COUNT="2")
    monkeypatch.delenv("ServiceBusConnection__fullyQualifiedNamespace", raising=False)
    monkeypatch.delenv("KEY_VAULT_URI", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def switch() -> Switch:
    return Switch()


@pytest.fixture
def host(env: dict[str, str], switch: Switch) -> Any:
    with RunningHost(env, registry=switch.registry) as running:
        yield running


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str) -> Any:
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def url(host: RunningHost, path: str = WEBHOOK) -> str:
    return f"http://127.0.0.1:{host.port}{path}"


def poison_state(host: RunningHost) -> str:
    """A signed VEHICLE_STATE whose handler fails until it is dead-lettered; its eventId."""
    event = state_event()
    body = encode(event)
    assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
    wait_until(lambda: any(d.application_properties.get("eventId") == event["eventId"]
                           for d in host.dead_letters()))
    return str(event["eventId"])


def poison_invalid(host: RunningHost) -> None:
    body = b"{this is not JSON"
    assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
    wait_until(lambda: any(d.dead_letter_reason == "InvalidPayload" for d in host.dead_letters()))


class TestSend:
    @pytest.mark.parametrize("kind", ["verify", "state", "error"])
    def test_each_type_is_accepted(self, host: RunningHost, switch: Switch, kind: str) -> None:
        switch.broken = False
        doc = run_json("send", "--url", url(host), "--type", kind)
        assert doc["status"] == 200
        if kind == "verify":
            assert doc["challengeVerified"] is True and doc["eventType"] == "VERIFY"
        else:
            assert doc["response"] == {"status": "accepted", "eventId": doc["eventId"]}
            wait_until(lambda: doc["eventId"] in [r["eventId"] for r in host.handled()])

    def test_a_wrong_token_fails_with_the_status_and_body(self, host: RunningHost) -> None:
        code, out, err = run("send", "--url", url(host), "--token", "not-the-token")
        assert code == 1
        assert out == ""
        assert "401" in err
        assert host.runtime.queue.stats()["active"] == 0

    def test_verify_answered_with_another_tokens_hash_fails(self, host: RunningHost) -> None:
        # Unsigned, so the host answers; but with the HMAC of its own token, not ours.
        code, _, err = run("send", "--url", url(host), "--type", "verify", "--unsigned",
                           "--token", "another-token")
        assert code == 1
        assert "VERIFY" in err and "expected" in err

    def test_a_file_is_signed_byte_for_byte(self, host: RunningHost, tmp_path: Path, switch: Switch) -> None:
        switch.broken = False
        payload = tmp_path / "event.json"
        delivered = int(time.time() * 1000)  # a float literal: re-serialized, it would change
        payload.write_bytes(b'{ "eventId": "file-1",\n  "eventType": "VEHICLE_STATE", "data": {"signals": []}, "meta": {"deliveredAt": %d.0} }' % delivered)
        doc = run_json("send", "--url", url(host), "--file", str(payload))
        assert doc["eventId"] == "file-1"
        wait_until(lambda: "file-1" in [r["eventId"] for r in host.handled()])

    def test_the_error_route_and_the_function_key_is_never_printed(self, host: RunningHost, switch: Switch) -> None:
        switch.broken = False
        target = url(host, WEBHOOK + "/errors") + "?code=s3cr3t-key"
        code, out, err = run("send", "--url", target, "--type", "error")
        assert code == 0, err
        assert "s3cr3t-key" not in out + err
        assert "code=REDACTED" in out

    def test_unreachable_url_is_a_clean_failure(self) -> None:
        code, _, err = run("send", "--url", "http://127.0.0.1:9/api/webhooks/smartcar?code=k3y")
        assert code == 1
        assert "cannot reach" in err and "k3y" not in err and "Traceback" not in err

    def test_usage_errors_exit_2(self, env: dict[str, str]) -> None:
        assert run("send", "--url", "not-a-url")[0] == 2
        assert run("send", "--url", "http://x/", "--type", "nope")[0] == 2
        assert run("send", "--url", "http://x/", "--type", "state", "--file", "x.json")[0] == 2
        assert run("dlq", "replay")[0] == 2
        assert run("dlq", "purge", "--all", "3")[0] == 2
        assert run("frobnicate")[0] == 2

    def test_a_usage_error_with_json_still_prints_one_json_document(self) -> None:
        code, out, err = run("vehicles", "show", "", "--json")
        assert code == 2 and "error:" in err
        assert json.loads(out)["error"] == err.removeprefix("error: ").strip()

    def test_built_events_are_fresh(self) -> None:
        first, second = json.loads(build_event("state")), json.loads(build_event("state"))
        assert first["eventId"] != second["eventId"]
        assert first["meta"]["deliveryId"] != second["meta"]["deliveryId"]
        assert first["data"]["signals"][0]["body"] == {"unit": "percent", "value": 78}

    def test_redaction_keeps_other_parameters(self) -> None:
        assert redact_url("https://a.net/api/x?code=abc&x=1") == "https://a.net/api/x?code=REDACTED&x=1"
        assert redact_url("http://a/b") == "http://a/b"


class TestDeadLetters:
    def test_poison_messages_are_listed_with_every_field(self, host: RunningHost) -> None:
        event_id = poison_state(host)
        poison_invalid(host)
        entries = run_json("dlq", "list")
        assert len(entries) == 2
        for entry in entries:
            assert FIELDS <= set(entry)
        by_reason = {e["reason"]: e for e in entries}
        failed = by_reason["MaxDeliveryCountExceeded"]
        assert failed["eventId"] == event_id and failed["eventType"] == "VEHICLE_STATE"
        assert failed["deliveryCount"] == 2
        assert "2 delivery attempts" in failed["description"]
        invalid = by_reason["InvalidPayload"]
        assert invalid["eventId"] is None and invalid["description"]
        assert invalid["enqueuedTime"].endswith("+00:00")

        code, text, _ = run("dlq", "list")
        assert code == 0 and "InvalidPayload" in text and "2 dead-lettered" in text

    def test_stats_agree_with_the_queue(self, host: RunningHost) -> None:
        poison_state(host)
        poison_invalid(host)
        assert run_json("stats") == {"active": 0, "deadLettered": 2, "scheduled": 0}
        assert run_json("stats") == host.runtime.queue.stats()

    def test_show_prints_the_body(self, host: RunningHost) -> None:
        poison_invalid(host)
        [entry] = run_json("dlq", "list")
        doc = run_json("dlq", "show", str(entry["sequenceNumber"]))
        assert doc["body"] == "{this is not JSON"
        assert run("dlq", "show", "999999")[0] == 1

    def test_replay_of_a_still_poison_message_brings_it_back(self, host: RunningHost) -> None:
        event_id = poison_state(host)
        [before] = run_json("dlq", "list")
        doc = run_json("dlq", "replay", str(before["sequenceNumber"]))
        assert [r["sequenceNumber"] for r in doc["replayed"]] == [before["sequenceNumber"]]
        # Processed again (not dropped as a duplicate), failed again, dead-lettered again.
        wait_until(lambda: [d.application_properties.get("replayCount") for d in host.dead_letters()] == ["1"])
        [after] = run_json("dlq", "list")
        assert after["eventId"] == event_id
        assert after["sequenceNumber"] != before["sequenceNumber"]
        assert after["deliveryCount"] == 2

    def test_replay_after_a_fix_is_handled_and_leaves_the_dlq(self, host: RunningHost, switch: Switch) -> None:
        event_id = poison_state(host)

        def handled() -> list[str]:
            return [r["eventId"] for r in host.handled() if r["outcome"] == "handled"]

        assert event_id not in handled()
        switch.broken = False
        code, out, err = run("dlq", "replay", "--all")
        assert code == 0, err
        assert "replayed 1" in out
        wait_until(lambda: event_id in handled())
        assert run_json("dlq", "list") == []
        # Completed by the host's next queue transaction, moments after the record is written.
        wait_until(lambda: run_json("stats") == {"active": 0, "deadLettered": 0, "scheduled": 0})

    def test_purge_removes_only_what_it_names(self, host: RunningHost) -> None:
        poison_state(host)
        poison_invalid(host)
        first, second = run_json("dlq", "list")
        doc = run_json("dlq", "purge", str(first["sequenceNumber"]))
        assert doc == {"purged": 1, "notFound": []}
        assert [e["sequenceNumber"] for e in run_json("dlq", "list")] == [second["sequenceNumber"]]
        code, out, _ = run("dlq", "purge", str(first["sequenceNumber"]))
        assert code == 1 and "purged 0" in out
        code, out, _ = run("dlq", "purge", "--all")
        assert code == 0 and "purged 1 dead letter(s)" in out
        assert run_json("stats")["deadLettered"] == 0

    def test_replay_of_a_dead_letter_copy_drops_the_copy_markers(self, host: RunningHost, switch: Switch) -> None:
        switch.broken = False
        queue = host.runtime.queue
        body = encode(state_event(eventId="copy-1"))
        # As ServiceBusDeadLetterer marks a copy; the processor refuses such a message.
        queue.send(body, message_id="copy-1:dead-letter",
                   application_properties={"deadLetterReason": "InvalidPayload",
                                           "deadLetterDescription": "was broken"})
        wait_until(lambda: host.dead_letters())
        [entry] = run_json("dlq", "list")
        assert (entry["reason"], entry["description"]) == ("InvalidPayload", "was broken")
        run_json("dlq", "replay", str(entry["sequenceNumber"]))
        wait_until(lambda: "copy-1" in [r["eventId"] for r in host.handled()])
        assert run_json("dlq", "list") == []


def subprocess_env(env: dict[str, str]) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("ServiceBusConnection__fullyQualifiedNamespace", "KEY_VAULT_URI")}
    full.update(env)
    return full


class TestAsAProcess:
    def test_banner_command_works_and_dlq_list_reads_the_hosts_state(self, host: RunningHost, switch: Switch, env: dict[str, str]) -> None:
        switch.broken = False
        base = f"http://127.0.0.1:{host.port}"
        [line] = [ln for ln in banner(load_settings(env), base).splitlines() if "-m shared.cli send" in ln]
        argv = shlex.split(line)
        # A non-default token: the command names it, so it works pasted into another shell.
        assert argv[1:] == ["-m", "shared.cli", "send", "--url", f"{base}{WEBHOOK}", "--type", "state",
                            "--token", "$SMARTCAR_MANAGEMENT_TOKEN"]
        # Run it as pasted, through a shell; the banner's path is relative to the host's directory.
        command = line.strip().replace(argv[0], shlex.quote(sys.executable), 1)
        sent = subprocess.run(["bash", "-c", command], cwd=ROOT, env=subprocess_env(env),
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert "200" in sent.stdout
        wait_until(lambda: len(host.handled()) == 1)

        switch.broken = True
        poison_invalid(host)
        listed = subprocess.run([sys.executable, "-m", "shared.cli", "dlq", "list", "--json"], cwd=ROOT,
                                env=subprocess_env({"LOCAL_STATE_DIR": env["LOCAL_STATE_DIR"]}),
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        [entry] = json.loads(listed.stdout)
        assert entry["reason"] == "InvalidPayload"

    def test_json_output_holds_a_dead_letter_s_eventid_that_is_not_unicode(
        self, host: RunningHost, env: dict[str, str]
    ) -> None:
        """A signed event whose eventId is the JSON escape of a lone surrogate is stored and
        dead-lettered (stale). `--json` on a real UTF-8 stdout prints it escaped, still exact
        JSON, instead of failing on the whole list."""
        body = (b'{"eventId":"\\ud800","eventType":"VEHICLE_STATE","vehicleId":"v1",'
                b'"data":{"signals":[]},"meta":{"deliveredAt":"2020-01-01T00:00:00Z",'
                b'"version":"4.0","mode":"LIVE","deliveryId":"d"}}')
        assert host.post(WEBHOOK, body, signed_headers(body)).status == 200
        wait_until(lambda: host.dead_letters())
        for args in (["dlq", "list", "--json"], ["dlq", "show", "1", "--json"]):
            done = subprocess.run(
                [sys.executable, "-m", "shared.cli", *args], cwd=ROOT, capture_output=True,
                env=subprocess_env({"LOCAL_STATE_DIR": env["LOCAL_STATE_DIR"]}), timeout=60)
            assert done.returncode == 0, done.stderr.decode(errors="replace")
            doc = json.loads(done.stdout)
            entry = doc[0] if isinstance(doc, list) else doc
            assert entry["eventId"] == "\ud800" and b"\\ud800" in done.stdout

    def test_wrong_token_exits_non_zero_without_traceback(self, host: RunningHost, env: dict[str, str]) -> None:
        result = subprocess.run([sys.executable, "-m", "shared.cli", "send", "--url", url(host), "--token", "wrong"],
                                cwd=ROOT, env=subprocess_env(env), capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "401" in result.stderr and "Traceback" not in result.stderr
