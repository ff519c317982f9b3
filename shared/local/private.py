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
    os.umask(PRIVATE_UMASK)
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, DIRECTORY_MODE)
