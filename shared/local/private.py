"""The local state directory is its user's alone: payloads (vehicle locations) live there.

`make_private` is called by the processes that write it (the local host and the operations
CLI) before they touch it: from then on every file the process creates is 0600 and every
directory 0700 (a process umask of 0o077), whoever creates it (the SQLite library's -wal and
-shm files, handled.jsonl, spill files, the vehicle state store, or a file added later), and
the state directory itself is made 0700 even when an earlier run left it open to others.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
DIRECTORY_MODE = 0o700


def make_private(state_dir: Path | None = None) -> None:
    """The process's umask, for all it creates from now on; and `private_directory`."""
    os.umask(PRIVATE_UMASK)
    if state_dir is not None:
        private_directory(state_dir)


def private_directory(state_dir: Path) -> None:
    """The state directory, created if missing, made 0700. What a command does before it
    opens a store in it; the umask is its process's entry point's to set (`make_private`),
    not a library call's."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, DIRECTORY_MODE)
