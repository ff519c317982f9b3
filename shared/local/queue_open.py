"""Opening a state directory's queue: the file, its markers, and the checks that refuse one
that lost acknowledged events.

`open_state_queue` (and `open_local_queue`, from the settings) is how the local host and the
CLI get their `LocalQueue`: serialised with other processes opening the same directory, the
"initialised" marker telling a lost queue file from a fresh start, and the acknowledged mark
(ackmark.py) telling a lost write-ahead log from an intact one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ..settings import Settings
from .ackmark import ACK_MARK_FILE, AckMark
from .queue import LocalQueue
from .queue_rows import QueueDamagedError, QueueUnavailableError
from .queue_schema import INITIALISED_MARKER, recovery_advice

__all__ = [
    "QUEUE_FILE",
    "open_local_queue",
    "open_state_queue",
]

QUEUE_FILE = "queue.sqlite3"


def _write_marker(marker: Path, queue_path: Path) -> None:
    text = (
        f"This directory holds the local queue {queue_path.name}, initialised "
        f"{datetime.now(UTC).isoformat()}. While this file exists, a missing or empty "
        f"{queue_path.name} is reported as an error instead of starting with an empty queue.\n"
    )
    tmp = marker.with_name(marker.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, marker)
    dir_fd = os.open(marker.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _opening(state_dir: Path) -> Iterator[None]:
    """Holds an exclusive `flock` on the state directory while a process opens its queue.

    Two hosts (or a host and the CLI) starting at once on a fresh directory raced: SQLite's
    switch to WAL and the schema creation can fail with "database is locked" without waiting,
    and both wrote the marker. Serialised, the second simply finds the queue ready. The lock
    is released when the queue is open (a second host then shares the queue, as designed).
    """
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise QueueUnavailableError(
            f"cannot create the state directory {state_dir}: {exc}") from exc
    try:
        import fcntl
    except ImportError:  # Windows: no flock; SQLite's own locking is all there is
        yield
        return
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_state_queue(state_dir: Path, *, max_delivery_count: int = 5) -> LocalQueue:
    """The queue of a state directory; `QueueDamagedError` when a directory that was
    initialised has lost its queue file or had it emptied."""
    with _opening(state_dir):
        return _open_state_queue(state_dir, max_delivery_count=max_delivery_count)


def _open_state_queue(state_dir: Path, *, max_delivery_count: int) -> LocalQueue:
    path = state_dir / QUEUE_FILE
    marker = state_dir / INITIALISED_MARKER
    if marker.exists():
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise QueueDamagedError(
                f"local queue {path} is missing, but {marker} says this state directory was "
                "initialised: the events it held are not there. Restore the file (with its -wal "
                f"file), or start with an empty queue by deleting {marker}."
            ) from None
        if size == 0:
            raise QueueDamagedError(
                f"local queue {path} is empty (0 bytes), but {marker} says this state directory "
                f"was initialised: the file was truncated. {recovery_advice(path)}"
            )
    queue = LocalQueue(path, max_delivery_count=max_delivery_count)
    mark = AckMark(state_dir / ACK_MARK_FILE)
    if marker.exists():
        try:
            _check_ack_mark(queue, mark)
        except BaseException:
            queue.close()
            raise
    else:
        mark.reset()  # a fresh queue: marks of an earlier one mean nothing
    queue.ack_mark = mark
    # Imported here: the CLI imports this module (for QUEUE_FILE) at start, and needs neither
    # the runtime nor the host's adapters unless it opens a queue.
    from ..runtime import HANDLED_FILE
    from .adapters import HandledLog, expired_recorder

    queue.on_expired = expired_recorder(HandledLog(state_dir / HANDLED_FILE),
                                        max_delivery_count)
    if not marker.exists():
        try:
            _write_marker(marker, path)
        except OSError as exc:
            queue.close()
            raise QueueUnavailableError(
                f"local queue {path}: cannot write {marker}: {exc}"
            ) from exc
    return queue


def _check_ack_mark(queue: LocalQueue, mark: AckMark) -> None:
    """`QueueDamagedError` when the queue holds fewer messages than were acknowledged."""
    acknowledged = mark.read()
    highest = queue.highest_sequence_number()
    if acknowledged is None or highest >= acknowledged:
        return
    path = queue.path
    raise QueueDamagedError(
        f"local queue {path} has lost acknowledged events: the highest sequence number it "
        f"holds is {highest}, but events up to {acknowledged} were acknowledged (recorded in "
        f"{mark.path}). Its write-ahead log ({path}-wal) was deleted, truncated or damaged "
        "after the host stopped abnormally, and SQLite started without the lost part. The "
        f"lost events (sequence numbers {highest + 1} to {acknowledged}) were answered 200, "
        "so Smartcar will not send them again. To recover: stop every process using the "
        f"queue; if a copy of the -wal file exists (a backup, a snapshot), put it back as "
        f"{path}-wal, delete {path}-shm, and start again. Otherwise, to go on with what the "
        f"queue still holds and accept the loss, delete {mark.path}."
    )


def open_local_queue(settings: Settings) -> LocalQueue:
    """The embedded queue in `LOCAL_STATE_DIR`, as the settings configure it."""
    return open_state_queue(
        settings.local_state_dir, max_delivery_count=settings.max_delivery_count
    )
