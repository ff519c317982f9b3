"""The local queue's file: its schema and migration, the bound on its write-ahead log, and
telling a damaged file from a busy one, with the advice for recovering it.

`LocalQueue` applies these when it opens the file and when it checks its integrity; the
vehicle state store, which shares the state directory's disk, bounds its WAL the same way.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .ackmark import ACK_MARK_FILE

__all__ = [
    "INITIALISED_MARKER",
    "SCHEMA_VERSION",
    "bound_wal",
    "recovery_advice",
]

#: Version of the on-disk schema, stored in ``PRAGMA user_version``. 2 added the clock
#: reference (`LocalQueue._follow_clock`).
SCHEMA_VERSION = 2
#: Bytes the write-ahead log is cut back to when a checkpoint resets it (at most).
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
#: Pages in the WAL that trigger the automatic checkpoint: SQLite's default, less on a small
#: disk (see `LocalQueue._bound_wal`).
DEFAULT_WAL_PAGES = 1000
MIN_WAL_PAGES = 16

_SCHEMA = """
CREATE TABLE messages (
    sequence_number   INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id        TEXT    NOT NULL,
    body              BLOB    NOT NULL,
    properties        TEXT    NOT NULL,
    enqueued_time     REAL    NOT NULL,
    scheduled_time    REAL,
    visible_at        REAL    NOT NULL,
    delivery_count    INTEGER NOT NULL DEFAULT 0,
    lock_token        TEXT,
    locked_until      REAL,
    state             TEXT    NOT NULL CHECK (state IN ('active', 'deadlettered')),
    dl_reason         TEXT,
    dl_description    TEXT,
    dead_lettered_at  REAL
);
CREATE INDEX messages_by_state ON messages (state, sequence_number);
CREATE UNIQUE INDEX messages_by_lock ON messages (lock_token) WHERE lock_token IS NOT NULL;
CREATE INDEX messages_by_lock_expiry ON messages (locked_until) WHERE lock_token IS NOT NULL;
CREATE TABLE duplicates (
    message_id   TEXT PRIMARY KEY,
    accepted_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX duplicates_by_time ON duplicates (accepted_at);
"""

#: Version 2: where the wall clock stood against the system's monotonic clock when the stored
#: times were last written (see `LocalQueue._follow_clock`).
_SCHEMA_V2 = """
CREATE TABLE clock_reference (
    id                    INTEGER PRIMARY KEY CHECK (id = 1),
    boot_id               TEXT NOT NULL,
    wall_minus_monotonic  REAL NOT NULL
);
"""

#: Written next to the queue file once it exists: from then on a missing or emptied queue
#: file is an error (acknowledged events are gone), not a fresh start.
INITIALISED_MARKER = "initialised"


def _migrate(conn: sqlite3.Connection) -> None:
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
        return  # the common case needs no write lock: opening never waits for a writer
    conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one creates it
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version < SCHEMA_VERSION:
            scripts = [_SCHEMA, _SCHEMA_V2][version:]
            for script in scripts:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this code understands "
                f"({SCHEMA_VERSION}); upgrade the app or use another LOCAL_STATE_DIR"
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def bound_wal(conn: sqlite3.Connection, directory: Path) -> None:
    """Keep a database's write-ahead log a small part of the disk that holds `directory`.

    SQLite checkpoints once the WAL holds 1,000 pages (4 MB): on a small disk the WAL
    filled it first, and with no space left the checkpoint (which grows the database
    file) could never run. So the automatic checkpoint comes after at most an eighth of
    the disk, and a checkpoint that resets the WAL cuts the file back to that size. The
    queue and the vehicle state store share the state directory, so both are bounded.
    """
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    try:
        disk = os.statvfs(directory)
        total = disk.f_blocks * disk.f_frsize
    except (OSError, AttributeError):  # no statvfs (Windows): SQLite's defaults
        total = 0
    pages = DEFAULT_WAL_PAGES if total <= 0 else max(
        MIN_WAL_PAGES, min(DEFAULT_WAL_PAGES, total // (8 * page)))
    conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
    conn.execute(f"PRAGMA journal_size_limit = {min(JOURNAL_SIZE_LIMIT, pages * page)}")


def _is_damage(exc: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT and SQLITE_NOTADB (and their extended codes): the file, not a lock."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or (
        not name and "malformed" in str(exc)
    )


def recovery_advice(path: Path) -> str:
    """How to get going again after a damaged queue file, for the error that refuses it."""
    aside = path.with_name(path.name + ".damaged")
    marker = path.parent / INITIALISED_MARKER
    return (
        "Acknowledged events may be in it, so the host does not start on it. To recover: stop "
        f"every process using it, move it aside with its write-ahead log (`mv {path} {aside}`; "
        f"`mv {path}-wal {aside}-wal` if present; delete {path}-shm), then either salvage "
        f"what can still be read with `sqlite3 {aside} .recover | sqlite3 {path}` (rows on "
        "intact pages come back with their delivery counts; rows on destroyed pages are lost; "
        "a row that comes back damaged is dead-lettered as CorruptMessage when received; "
        "`.recover` needs a sqlite3 shell built with the dbpage virtual table, as the "
        f"sqlite.org downloads are; if rows were lost, the host then says so, and deleting "
        f"{path.parent / ACK_MARK_FILE} accepts the loss), or start with an empty queue by "
        f"also deleting {marker}."
    )
