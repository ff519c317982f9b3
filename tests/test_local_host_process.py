"""The local host as users run it: a separate process, `make run`, and `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .host_process import REPO, base_env, free_port, handled_ids, host_process
from .support import WEBHOOK, encode, http_request, signed_headers, state_event, wait_until


class TestMakeRun:
    @pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(),
                        reason="make run reuses the .venv that make test created")
    def test_make_run_serves_health_on_port_and_prints_the_send_command(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = base_env(tmp_path, port)
        del env["SMARTCAR_MANAGEMENT_TOKEN"]
        with host_process(["make", "--no-print-directory", "run"], env, port) as proc:
            assert http_request(port, "GET", "/api/health").json() == {"status": "ok"}
            os.killpg(proc.pid, signal.SIGINT)
            out = proc.communicate(timeout=20)[0].decode()
        assert f"http://127.0.0.1:{port}/api/webhooks/smartcar" in out
        assert "development token" in out
        assert "-m shared.cli send --url" in out


class TestDurability:
    def test_acknowledged_events_survive_kill_9_and_are_processed_after_restart(
        self, tmp_path: Path
    ) -> None:
        port = free_port()
        env = base_env(tmp_path, port)
        cmd = [sys.executable, "-m", "shared.local"]
        events = [state_event() for _ in range(20)]
        with host_process([*cmd, "--workers", "0"], env, port) as proc:  # accepts, never processes
            for event in events:
                body = encode(event)
                assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        state = tmp_path / "state"
        assert handled_ids(state) == []
        with host_process(cmd, env, port):
            wait_until(lambda: len(handled_ids(state)) == len(events), timeout=30)
        assert sorted(handled_ids(state)) == sorted(e["eventId"] for e in events)

    def test_invalid_settings_fail_fast_with_the_setting_named(self, tmp_path: Path) -> None:
        env = base_env(tmp_path, free_port())
        env["MAX_BODY_BYTES"] = "big"
        result = subprocess.run([sys.executable, "-m", "shared.local"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "MAX_BODY_BYTES must be a whole number, got 'big'" in result.stderr


# After `main` returns, the files of LOCAL_STATE_DIR this process still has open.
OPEN_AFTER_STOP = """
import json, os, sys
from shared.local import command
code = command.main([])
state = os.path.realpath(os.environ["LOCAL_STATE_DIR"])
still_open = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the descriptor listdir itself used, closed by now
        continue
    if target.startswith(state + os.sep):
        still_open.add(os.path.relpath(target, state))
print("AFTER STOP " + json.dumps([code, sorted(still_open)]), flush=True)
"""


class TestStop:
    @pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
    def test_a_stopped_host_leaves_no_file_of_its_state_directory_open(
        self, tmp_path: Path
    ) -> None:
        # The stop closes what the run opened: the queue, the vehicle state store, and the
        # handled log (opened by the first event handled), whoever runs `main` in-process.
        port = free_port()
        env = base_env(tmp_path, port)
        env["INSPECTOR_PORT"] = str(free_port())
        event = state_event()
        body = encode(event)
        with host_process([sys.executable, "-c", OPEN_AFTER_STOP], env, port) as proc:
            assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: handled_ids(tmp_path / "state") == [event["eventId"]], timeout=30)
            os.killpg(proc.pid, signal.SIGTERM)
            out = proc.communicate(timeout=30)[0].decode()
        (line,) = [line for line in out.splitlines() if line.startswith("AFTER STOP ")]
        assert json.loads(line.removeprefix("AFTER STOP ")) == [0, []], out


class TestLogLines:
    def test_an_event_id_cannot_forge_a_log_line_or_drive_the_terminal(
        self, tmp_path: Path
    ) -> None:
        # A signed eventId is still the sender's text. The host logs it at INFO when no
        # handler runs for the event: here, a delivery without the battery's charge.
        port = free_port()
        forged = "1970-01-01 00:00:00,000 ERROR shared.receiver: forged"
        event_id = f"evt\n{forged}\x1b[2J\u202e"
        event = state_event(eventId=event_id)
        event["data"]["signals"] = [s for s in event["data"]["signals"]
                                    if s.get("name") != "StateOfCharge"]
        body = encode(event)
        state = tmp_path / "state"
        with host_process([sys.executable, "-m", "shared.local"], base_env(tmp_path, port),
                          port) as proc:
            assert http_request(port, "POST", WEBHOOK, body, signed_headers(body)).status == 200
            wait_until(lambda: handled_ids(state) == [event_id], timeout=30)
            os.killpg(proc.pid, signal.SIGINT)
            out = proc.communicate(timeout=20)[0].decode()
        said = [line for line in out.splitlines() if "no handler ran for event" in line]
        assert len(said) == 1, out
        assert f"evt\\x0a{forged}\\x1b[2J\\u202e of type VEHICLE_STATE" in said[0]
        assert not any(line.startswith(forged) for line in out.splitlines())
        assert "\x1b" not in out and "\u202e" not in out


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class TestIpv6Host:
    @pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
    def test_host_on_ipv6_loopback_prints_urls_that_work_and_resends_there(
        self, tmp_path: Path
    ) -> None:
        """`--host ::1`: the banner's URLs (read by urllib, not by our code) reach the host,
        and the inspector's Resend posts to it (the address in brackets)."""
        import json
        import re
        import threading
        import urllib.request

        port = free_port()
        env = base_env(tmp_path, port)
        env["INSPECTOR_PORT"] = str(free_port())  # the port after `port` may be taken
        proc = subprocess.Popen([sys.executable, "-m", "shared.local", "--host", "::1"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        try:
            wait_until(lambda: any(line.startswith("Inspector") for line in lines)
                       or proc.poll() is not None, timeout=60)
            out = "\n".join(lines)
            found = re.search(r"^Inspector .*?(http://\S+/)$", out, re.M)
            assert found is not None, out
            inspector = found.group(1)
            assert f"listening on http://[::1]:{port}" in out, out
            health = f"http://[::1]:{port}/api/health"
            assert f"  health:                {health}" in out
            with urllib.request.urlopen(health, timeout=10) as answer:
                assert json.loads(answer.read()) == {"status": "ok"}
            event = state_event()
            body = encode(event)
            request = urllib.request.Request(f"http://[::1]:{port}{WEBHOOK}", data=body,
                                             headers={**signed_headers(body, "amt")})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200

            def delivery_id() -> int | None:
                with urllib.request.urlopen(f"{inspector}api/deliveries", timeout=10) as got:
                    listed = json.loads(got.read())["deliveries"]
                return next((d["id"] for d in listed if d.get("eventId") == event["eventId"]),
                            None)

            found = wait_until(delivery_id, timeout=30)
            resend = urllib.request.Request(f"{inspector}api/deliveries/{found}/resend",
                                            method="POST", data=b"")
            with urllib.request.urlopen(resend, timeout=10) as answer:
                resent = json.loads(answer.read())
            assert resent["status"] == 200, resent
            assert json.loads(resent["body"])["status"] == "duplicate"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
