"""The local handled log keeps its file open but follows the path it was given."""

from __future__ import annotations

import json
import os
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


def open_descriptors_on(path: Path) -> list[str]:
    """This process's file descriptors that point at `path` (Linux /proc)."""
    fd_dir = Path("/proc/self/fd")
    found = []
    for entry in fd_dir.iterdir():
        try:
            if Path(os.readlink(entry)) == path:
                found.append(entry.name)
        except OSError:
            continue  # the directory's own descriptor, gone by the time it is read
    return found


def test_close_releases_the_descriptor_kept_open_for_appends(tmp_path: Path) -> None:
    # A leaked descriptor per host restart (or per test) ends in EMFILE; close must release it.
    path = tmp_path / "handled.jsonl"
    log = HandledLog(path)
    log.append({"eventId": "a"})
    assert len(open_descriptors_on(path)) == 1
    log.close()
    assert open_descriptors_on(path) == []
    log.append({"eventId": "b"})  # a closed log reopens on the next append
    assert log.read() == [{"eventId": "a"}, {"eventId": "b"}]
    log.close()
    assert open_descriptors_on(path) == []
