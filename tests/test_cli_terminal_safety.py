"""Human CLI output is safe to print: no stored byte reaches the operator's terminal raw.

Incident (issue 11, point 3): a forged body holding ESC c BEL ("\\u001bc\\u0007FAKE" decoded)
was dead-lettered, and `dlq show` wrote those bytes to the operator's terminal, which reset
it. Injected here by storing such a dead letter in a real queue file (raw control bytes, a C1
control, a bidi override, a newline in an id that could forge a table row), then running the
real CLI as a subprocess and inspecting the bytes it writes. `--json` stays exact JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_BODY = "\x1bc\x07FAKE \x1b]0;pwned\x07 \x9b2J \u202egnp.exe\r\nsecond line\ttab"
HOSTILE_ID = "evt\x1b[2J\n99  VEHICLE_STATE  forged-row"


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    drop = ("SMARTCAR_", "ServiceBusConnection", "KEY_VAULT", "LOCAL_STATE_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["LOCAL_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, timeout=120)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    queue = LocalQueue(tmp_path / QUEUE_FILE)
    try:
        queue.send(HOSTILE_BODY.encode("utf-8"), message_id="m-1",
                   application_properties={"eventId": HOSTILE_ID, "eventType": "\x07BEL"})
        (received,) = queue.receive()
        queue.dead_letter(received.lock_token or "", reason="InvalidPayload\x1b[31m",
                          description="body is not valid JSON\x1b[0m\rOK")
    finally:
        queue.close()
    return tmp_path


def unsafe_characters(output: bytes) -> list[str]:
    """Every character a terminal would act on beyond line breaks and tabs (which only move
    the cursor to the next line or tab stop)."""
    text = output.decode("utf-8")  # strict: a stray byte would fail here
    return [repr(ch) for ch in text if not (ch.isprintable() or ch in "\n\t")]


class TestHumanOutputEscapesWhatIsStored:
    def test_dlq_show_prints_no_raw_control_character(self, state: Path) -> None:
        result = cli(state, "dlq", "show", "1")
        assert result.returncode == 0, result.stderr
        assert unsafe_characters(result.stdout) == []
        text = result.stdout.decode()
        assert "\\x1bc\\x07FAKE" in text  # shown, escaped, not dropped
        assert "\\u202egnp.exe\\x0d" in text
        assert "\nsecond line\ttab" in text  # the body's own line breaks and tabs stay

    def test_dlq_list_escapes_cells_so_no_row_can_be_forged(self, state: Path) -> None:
        result = cli(state, "dlq", "list")
        assert result.returncode == 0, result.stderr
        assert unsafe_characters(result.stdout) == []
        lines = result.stdout.decode().splitlines()
        # which queue, the header, the one row, the count: the id's newline is escaped
        assert len(lines) == 4
        assert "evt\\x1b[2J\\x0a99" in lines[2]

    def test_error_messages_escape_the_id_the_operator_pasted(self, state: Path) -> None:
        result = cli(state, "dlq", "show", "nope\x1b[2J")
        assert result.returncode == 1
        assert unsafe_characters(result.stderr) == []


class TestJsonOutputStaysExact:
    def test_dlq_show_json_round_trips_the_stored_text(self, state: Path) -> None:
        result = cli(state, "dlq", "show", "1", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["body"] == HOSTILE_BODY
        assert doc["eventId"] == HOSTILE_ID
        assert doc["description"] == "body is not valid JSON\x1b[0m\rOK"
