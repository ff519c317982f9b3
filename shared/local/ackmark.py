"""The acknowledged high-water mark: detects a lost or damaged write-ahead log at start.

An acknowledged event may live only in the queue's `-wal` file until a checkpoint copies it into
the database file. SQLite cannot tell a deleted, truncated or damaged WAL from one that never
held more: it replays the valid frames and starts, and the events in the rest are gone without
a word. So after each send commits, the queue records the highest sequence number it has
acknowledged in a small file of its own (`acknowledged`, next to the queue file). At start, a
queue whose highest sequence number ever assigned (SQLite's `sqlite_sequence`, which deletes do
not lower) is below that mark has lost acknowledged events: the host refuses it, as it refuses a
damaged database file.

The mark is written after the commit's fsync and without one of its own (one `pwrite`), so it
never claims more than the database holds: a power cut can only leave it behind, never ahead
(the check then misses a loss; it never refuses a good queue). Several processes sending to
one queue each write their own highest: the file holds one of them, never more than the truth.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

ACK_MARK_FILE = "acknowledged"
_WIDTH = 20  # digits: a fixed-size record, rewritten in place


class AckMark:
    """The `acknowledged` file of a state directory (0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._written = 0

    def read(self) -> int | None:
        """The mark; None when there is none (a fresh directory) or it cannot be read."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def record(self, sequence_number: int) -> None:
        """Raise the mark to `sequence_number` (never lowers it). OSError when it cannot be
        written (a full disk): the caller logs it; the event is stored all the same."""
        with self._lock:
            if sequence_number <= self._written:
                return
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                self._written = max(self._written, self.read() or 0)
                if sequence_number <= self._written:
                    return
            os.pwrite(self._fd, f"{sequence_number:0{_WIDTH}d}\n".encode("ascii"), 0)
            self._written = sequence_number

    def reset(self) -> None:
        """Forget the mark (a state directory starting with an empty queue)."""
        with self._lock:
            self._close()
            self.path.unlink(missing_ok=True)
            self._written = 0

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._close()
