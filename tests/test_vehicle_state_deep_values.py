"""Incident: a signed VEHICLE_STATE whose one signal value is an array nested 3,000 deep
(about 7 KB, far under every size bound).

Fault: the local host as users run it (`python -m shared.local`, a process of its own)
receives it over loopback HTTP. The parser accepts such nesting and freezes it into tuples;
orjson corrupted its heap serialising tuples nested that deep, and glibc aborted the whole
process, on every redelivery. What must hold: the event is answered 200 and processed, that one
signal is skipped as `too-large`, the event's other signals are stored, and the host is still
alive and healthy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .host_process import base_env, free_port, healthy, host_process
from .support import WEBHOOK, http_request, signed_headers, state_event, wait_until

DEPTH = 3000


def handled_record(state: Path, event_id: str) -> dict[str, object] | None:
    path = state / "handled.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["eventId"] == event_id:
            return dict(record)
    return None


def test_a_value_nested_thousands_deep_is_skipped_and_the_host_lives_on(
    tmp_path: Path,
) -> None:
    event = state_event()
    signals = event["data"]["signals"]
    deep_code = signals[0]["code"]
    signals[0]["body"]["value"] = "DEEP"
    body = json.dumps(event).replace('"DEEP"', "[" * DEPTH + "1" + "]" * DEPTH).encode()
    port = free_port()
    env = base_env(tmp_path, port)
    state = Path(env["LOCAL_STATE_DIR"])
    with host_process([sys.executable, "-m", "shared.local"], env, port) as proc:
        answer = http_request(port, "POST", WEBHOOK, body, signed_headers(body, "amt"))
        assert answer.status == 200, answer.body
        record = wait_until(lambda: handled_record(state, event["eventId"])
                            or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, f"the host died with {proc.returncode}"
        # Processed (no handler subscribes to what changed: "unhandled"), not dead-lettered.
        assert isinstance(record, dict) and record["outcome"] in {"handled", "unhandled"}, record
        vehicle_state = record["vehicleState"]
        assert isinstance(vehicle_state, dict)
        assert vehicle_state["skipped"][0] == {"code": deep_code, "reason": "too-large"}
        assert vehicle_state["changed"] == [s["code"] for s in signals[1:]]
        assert healthy(port)
