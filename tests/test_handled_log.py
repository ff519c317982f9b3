"""The local handled log keeps its file open but follows the path it was given."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.local.adapters import HandledLog, json_line


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


class TestWholeLinesOrNone:
    """handled.jsonl never holds a torn line, whatever `os.write` does on a full disk."""

    def test_short_writes_are_continued_until_the_line_is_whole(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_write = os.write
        sizes: list[int] = []

        def seven_bytes_at_a_time(fd: int, data: bytes | memoryview) -> int:
            written = real_write(fd, bytes(data[:7]))
            sizes.append(written)
            return written

        log = HandledLog(tmp_path / "handled.jsonl")
        monkeypatch.setattr("shared.local.adapters.os.write", seven_bytes_at_a_time)
        log.append({"eventId": "a", "outcome": "handled"})
        monkeypatch.undo()
        assert len(sizes) > 3
        assert log.read() == [{"eventId": "a", "outcome": "handled"}]
        log.close()

    def test_a_write_failing_after_part_of_the_line_leaves_the_file_as_it_was(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_write = os.write
        log = HandledLog(tmp_path / "handled.jsonl")
        log.append({"eventId": "before"})
        before = (tmp_path / "handled.jsonl").read_bytes()
        calls = 0

        def disk_fills_up(fd: int, data: bytes | memoryview) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                return real_write(fd, bytes(data[:10]))  # what a nearly full disk does
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("shared.local.adapters.os.write", disk_fills_up)
        with pytest.raises(OSError, match="No space left"):
            log.append({"eventId": "after"})
        monkeypatch.undo()
        assert (tmp_path / "handled.jsonl").read_bytes() == before
        log.append({"eventId": "later"})
        assert log.read() == [{"eventId": "before"}, {"eventId": "later"}]
        log.close()


_values = st.one_of(
    st.text(), st.text(st.characters(min_codepoint=0, max_codepoint=0x7F)), st.integers(),
    st.none(), st.booleans(),
    st.sampled_from(["\ud800", "a\u2028b", "\x85", "\x7f", "\x1f", "é", "\U0001f697"]),
)


class TestLineBytes:
    """`json_line` is json.dumps's line, byte for byte, whichever encoder writes it."""

    @settings(max_examples=1000, deadline=None)
    @given(st.dictionaries(st.one_of(st.text(), st.sampled_from(["eventId", "é"])), _values,
                           max_size=8))
    def test_is_the_standard_librarys_line(self, record: dict[str, object]) -> None:
        expected = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        assert json_line(record) == expected

    def test_is_ascii_whatever_the_text(self) -> None:
        line = json_line({"eventId": "a\u2028b\x85é", "n": 2**70})
        assert line.isascii() and len(line.splitlines()) == 1
