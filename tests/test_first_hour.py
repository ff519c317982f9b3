"""A newcomer's first hour: every message true and actionable (issue 13, point 6).

Each test runs what a user types (`make run`, `python -m shared.cli`) as a real subprocess and
reads what it prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.local.command import port_from_env
from shared.local.host import DEFAULT_PORT
from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE
from shared.settings import SettingsError

from .support import WEBHOOK, RunningHost, local_env

ROOT = Path(__file__).resolve().parent.parent
HAS_VENV = (ROOT / ".venv" / "bin" / "python").exists()


def user_env(state: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no token (the development token), no Azure, this state directory."""
    drop = ("SMARTCAR_", "ServiceBusConnection", "KEY_VAULT", "MAKE", "MFLAGS", "PORT",
            "LOG_LEVEL", "LOCAL_STATE_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(LOCAL_STATE_DIR=str(state), PYTHONUNBUFFERED="1", **extra)
    return env


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT,
                          env=user_env(state), capture_output=True, text=True, timeout=120)


def dead_letter(state: Path, *event_ids: str) -> None:
    queue = LocalQueue(state / QUEUE_FILE)
    try:
        for event_id in event_ids:
            queue.send(b'{"eventId":"%s"}' % event_id.encode(), message_id=event_id,
                       application_properties={"eventId": event_id})
            (received,) = queue.receive()
            queue.dead_letter(received.lock_token or "", reason="InvalidPayload",
                              description="eventType is missing")
    finally:
        queue.close()


class TestSettingsErrorsAreMessagesNotTracebacks:
    @pytest.mark.skipif(not HAS_VENV, reason="make run uses the .venv that make test created")
    def test_a_port_that_is_not_a_number_names_port_and_what_it_must_be(
        self, tmp_path: Path
    ) -> None:
        result = subprocess.run(["make", "run"], cwd=ROOT, env=user_env(tmp_path, PORT="abc"),
                                capture_output=True, text=True, timeout=120)
        assert "Traceback" not in result.stderr
        assert ("error: PORT must be a TCP port number from 0 to 65535 (the local host's port), "
                "got 'abc'; e.g. PORT=7072 make run") in result.stderr
        assert result.returncode == 2

    @pytest.mark.parametrize(("raw", "port"), [
        ("", DEFAULT_PORT), ("0", 0), ("1", 1), (" 7072 ", 7072), ("65535", 65535),
    ])
    def test_every_tcp_port_is_taken_and_0_means_any_free_one(self, raw: str, port: int) -> None:
        assert port_from_env({"PORT": raw}) == port

    @pytest.mark.parametrize("raw", ["65536", "-1", "70000", "1e3", "abc"])
    def test_a_port_out_of_range_is_refused_with_the_range(self, raw: str) -> None:
        with pytest.raises(SettingsError, match="from 0 to 65535") as err:
            port_from_env({"PORT": raw})
        assert repr(raw) in str(err.value)

    def test_an_unknown_log_level_names_the_levels(self, tmp_path: Path) -> None:
        result = subprocess.run([sys.executable, "-m", "shared.local"], cwd=ROOT,
                                env=user_env(tmp_path, LOG_LEVEL="loud"),
                                capture_output=True, text=True, timeout=120)
        assert "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            "error: LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'")
        assert result.returncode == 2


class TestDlqListSaysWhatTheLimitLeftOut:
    def test_limit_1_of_3_says_1_of_3_shown(self, tmp_path: Path) -> None:
        dead_letter(tmp_path, "e-1", "e-2", "e-3")
        result = cli(tmp_path, "dlq", "list", "--limit", "1")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 4  # which queue, header, one row, the count
        assert lines[0] == f"Dead letters of the local queue {tmp_path / 'queue.sqlite3'}:"
        assert "e-1" in lines[2]
        assert lines[3] == ("1 of 3 dead-lettered shown (raise --limit for more). "
                            "Details: dlq show ID")

    def test_without_a_limit_reached_it_says_how_many(self, tmp_path: Path) -> None:
        dead_letter(tmp_path, "e-1", "e-2")
        result = cli(tmp_path, "dlq", "list", "--limit", "2")
        assert result.stdout.splitlines()[-1] == "2 dead-lettered. Details: dlq show ID"

    def test_json_stays_the_list_of_entries(self, tmp_path: Path) -> None:
        import json

        dead_letter(tmp_path, "e-1", "e-2", "e-3")
        result = cli(tmp_path, "dlq", "list", "--limit", "2", "--json")
        assert [e["eventId"] for e in json.loads(result.stdout)] == ["e-1", "e-2"]


class TestSendSaysWhatItDid:
    def test_unsigned_does_not_claim_to_sign(self, tmp_path: Path) -> None:
        with RunningHost(local_env(tmp_path / "host")) as host:
            url = f"http://127.0.0.1:{host.port}{WEBHOOK}"
            result = cli(tmp_path, "send", "--unsigned", "--url", url)
        assert "signing" not in result.stderr + result.stdout
        assert result.stderr.startswith(f"error: {url} answered 401")
        assert result.returncode == 1

    def test_unsigned_verify_says_the_token_only_checks_the_answer(self, tmp_path: Path) -> None:
        with RunningHost(local_env(tmp_path / "host", SMARTCAR_MANAGEMENT_TOKEN="")) as host:
            url = f"http://127.0.0.1:{host.port}{WEBHOOK}"
            result = cli(tmp_path, "send", "--unsigned", "--type", "verify", "--url", url)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ("note: checking the VERIFY answer with the development token "
                                 "(SMARTCAR_MANAGEMENT_TOKEN is unset)\n")
        assert "(unsigned)" in result.stdout
        assert "VERIFY challenge answered with the expected HMAC" in result.stdout


class TestMakeShortcutsExitStatus:
    @pytest.mark.skipif(not HAS_VENV, reason="make uses the .venv that make test created")
    def test_make_exits_2_and_shows_the_clis_own_status(self, tmp_path: Path) -> None:
        result = subprocess.run(["make", "dlq-show", "ID=999"], cwd=ROOT, env=user_env(tmp_path),
                                capture_output=True, text=True, timeout=120)
        assert "error: no dead letter with ID 999" in result.stderr
        assert "] Error 1" in result.stderr  # make reports the CLI's status...
        assert result.returncode == 2  # ...and exits 2 itself, as the runbook says
        runbook = (ROOT / "docs" / "operations.md").read_text()
        assert "`make` itself exits 2" in runbook


class TestTheBannerSaysLocalIsLocal:
    @pytest.mark.skipif(not HAS_VENV, reason="make run uses the .venv that make test created")
    def test_make_run_labels_its_urls_local_and_says_how_to_tunnel(self, tmp_path: Path) -> None:
        from .host_process import free_port, host_process

        port = free_port()
        env = user_env(tmp_path, PORT=str(port))
        with host_process(["make", "run"], env, port) as proc:
            os.killpg(proc.pid, signal.SIGINT)
            out = proc.communicate(timeout=30)[0].decode()
        banner = out[: out.index("Press Ctrl-C to stop.")]
        local = f"http://127.0.0.1:{port}/api/webhooks/smartcar"
        assert "Local URLs (this machine only: Smartcar cannot reach them):" in banner
        assert f"  vehicle data webhook:  {local}\n" in banner
        assert "callback URI" not in banner  # nothing local is offered for registration
        assert f"devtunnel host -p {port} --allow-anonymous   (or: ngrok http {port})" in banner
        assert "register https://<tunnel>/api/webhooks/smartcar" in banner

    def test_readme_walks_through_a_tunnel_to_a_real_delivery(self) -> None:
        readme = (ROOT / "README.md").read_text()
        start = readme.index("\n## Receive real deliveries on your machine\n")
        section = readme[start: readme.index("\n## ", start + 1)]
        for step in ("devtunnel host -p 7071 --allow-anonymous", "ngrok http 7071",
                     "`https://<tunnel>/api/webhooks/smartcar`", "`VERIFY`",
                     "Send a test event from the webhook's page in the Smartcar Dashboard",
                     "?code=<function key>", "az functionapp function keys list",
                     "SMARTCAR_MANAGEMENT_TOKEN"):
            assert step in section, step
