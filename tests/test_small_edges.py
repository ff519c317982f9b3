"""Two small edges of the local runtime, with real processes and files: the one-line error for
a Service Bus namespace given to the local host, and the handled.jsonl line for a message the
lock-expiry sweep dead-letters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from shared.local.queue_open import QUEUE_FILE, open_state_queue

from .host_process import REPO, base_env, free_port
from .support import encode, state_event


class TestServiceBusNamespaceLocally:
    def test_the_local_host_refuses_it_in_one_line_naming_the_setting(
        self, tmp_path: Path
    ) -> None:
        env = base_env(tmp_path, free_port())
        env["ServiceBusConnection__fullyQualifiedNamespace"] = "ns.servicebus.windows.net"
        result = subprocess.run([sys.executable, "-m", "shared.local"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ServiceBusConnection__fullyQualifiedNamespace is set")
        assert "unset it" in lines[0]


class TestLockExpirySweep:
    def test_a_message_whose_last_lock_expired_gets_its_handled_line_from_any_process(
        self, tmp_path: Path
    ) -> None:
        state = tmp_path / "state"
        event = state_event()
        queue = open_state_queue(state, max_delivery_count=1)
        try:
            queue.send(encode(event), message_id=event["eventId"],
                       application_properties={"eventType": "VEHICLE_STATE"})
            (received,) = queue.receive(lock_duration=0.05)  # a host that then died
            assert received.delivery_count == 1
        finally:
            queue.close()
        time.sleep(0.1)
        assert not (state / "handled.jsonl").exists()
        # The operations CLI, another process, finds the lock expired and dead-letters it.
        env = base_env(tmp_path, free_port())
        env["MAX_DELIVERY_COUNT"] = "1"
        result = subprocess.run([sys.executable, "-m", "shared.cli", "stats", "--json"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["deadLettered"] == 1
        (line,) = (state / "handled.jsonl").read_text().splitlines()
        record = json.loads(line)
        assert record["eventId"] == event["eventId"]
        assert record["vehicleId"] == event["vehicleId"]
        assert (record["outcome"], record["reason"], record["deliveryCount"]) == (
            "dead_lettered", "MaxDeliveryCountExceeded", 1)
        assert "lock" in record["description"]
        assert (state / QUEUE_FILE).exists()
