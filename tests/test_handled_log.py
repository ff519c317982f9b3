"""The local handled log keeps its file open but follows the path it was given."""

from __future__ import annotations

import json
from pathlib import Path

from shared.local.adapters import HandledLog


def test_lines_are_appended_and_readable_at_once(tmp_path: Path) -> None:
    log = HandledLog(tmp_path / "state" / "handled.jsonl")
    log.append({"eventId": "a"})
    log.append({"eventId": "b", "outcome": "handled"})
    assert log.read() == [{"eventId": "a"}, {"eventId": "b", "outcome": "handled"}]
    log.close()


def test_a_deleted_file_is_recreated_rather_than_written_into_the_void(tmp_path: Path) -> None:
    path = tmp_path / "handled.jsonl"
    log = HandledLog(path)
    log.append({"eventId": "a"})
    path.unlink()
    log.append({"eventId": "b"})
    assert log.read() == [{"eventId": "b"}]
    log.close()


def test_a_rotated_file_is_left_alone_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "handled.jsonl"
    log = HandledLog(path)
    log.append({"eventId": "a"})
    path.rename(tmp_path / "handled.jsonl.1")
    log.append({"eventId": "b"})
    assert [json.loads(x) for x in (tmp_path / "handled.jsonl.1").read_text().splitlines()] == [
        {"eventId": "a"}
    ]
    assert log.read() == [{"eventId": "b"}]
    log.close()
    log.close()  # idempotent
