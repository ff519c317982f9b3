"""libfaketime (Debian's `faketime` package) for fault tests: a real process whose wall clock
is offset, or stepped while it runs, through LD_PRELOAD. The monotonic clock stays real, as
a wrong or stepped system clock leaves it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)


def library() -> str:
    """The library's path; the test is skipped without it, but fails under CI (.ci/run
    installs the package)."""
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    message = "libfaketime is not installed (Debian: apt-get install faketime)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def offset_env(offset: str) -> dict[str, str]:
    """Environment for a process whose wall clock is `offset` (e.g. "-10m", "+2h") off."""
    return {"LD_PRELOAD": library(), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def stepping_env(control: Path, offset: str = "+0") -> dict[str, str]:
    """Environment for a process whose wall-clock offset is read from `control` at every call:
    write a new offset (e.g. "+2h") to step its clock while it runs."""
    control.write_text(offset)
    return {"LD_PRELOAD": library(), "FAKETIME_TIMESTAMP_FILE": str(control),
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
