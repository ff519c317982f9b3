"""A small real disk for the full-disk tests: a tmpfs of a given size, mounted for one test.

Mounting needs root, or passwordless sudo (a GitHub runner's user has it): the mount is tried
directly, then through `sudo -n`. Without either the test is skipped, saying why, except under
CI, where it fails: SECURITY.md names these tests as proofs, and a proof that quietly does not
run proves nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run_privileged(command: list[str]) -> subprocess.CompletedProcess[str]:
    """`command` as this user, then, if that is refused and sudo needs no password, as root."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 and os.geteuid() != 0 and shutil.which("sudo"):
        done = subprocess.run(["sudo", "-n", *command], capture_output=True, text=True,
                              check=False)
    return done


@contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """`path`, made and with a tmpfs of `size` (mount's notation: 64k, 2m) mounted on it,
    owned by this user; unmounted on exit, lazily, so a file a killed host left open cannot
    keep it mounted."""
    path.mkdir()
    options = f"size={size},mode=0700,uid={os.getuid()},gid={os.getgid()}"
    mounted = _run_privileged(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    if mounted.returncode != 0:
        message = f"mounting a {size} tmpfs is not permitted here: {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        _run_privileged(["umount", "-l", str(path)])
