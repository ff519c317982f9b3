"""`make run` on a machine without Python 3.13 says so and how to get it, before it builds anything.

The Makefile is run for real in a scratch directory (a copy of it and the requirements files),
with a PATH and HOME that hold no python3.13, or with PYTHON pointing at another version.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_run(tmp_path: Path, *args: str, path: str) -> subprocess.CompletedProcess[str]:
    for name in ("Makefile", *(p.name for p in ROOT.glob("requirements*.txt"))):
        shutil.copy(ROOT / name, tmp_path / name)
    make = shutil.which("make")
    assert make is not None
    env = {"PATH": path, "HOME": str(tmp_path / "home")}
    return subprocess.run([make, "run", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def fake_python(directory: Path, version: str) -> Path:
    """An interpreter that reports `version` and fails the Makefile's 3.13 check, as a real one
    of that version does (it runs `python -c '...sys.version_info...'`)."""
    directory.mkdir()
    script = directory / "python"
    script.write_text(f'#!/bin/sh\n[ "$1" = -V ] && echo "Python {version}" && exit 0\nexit 1\n')
    script.chmod(0o755)
    return script


def test_without_python_3_13_make_run_says_how_to_get_it(tmp_path: Path) -> None:
    result = make_run(tmp_path, path="/usr/bin:/bin")
    assert result.returncode != 0
    assert "Python 3.13 is required" in result.stderr
    assert "pyenv install 3.13" in result.stderr
    assert "make run PYTHON=/path/to/python3.13" in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_a_python_of_another_version_is_refused_by_name(tmp_path: Path) -> None:
    python = fake_python(tmp_path / "bin", "3.12.4")
    result = make_run(tmp_path, f"PYTHON={python}", path="/usr/bin:/bin")
    assert result.returncode != 0
    assert f"PYTHON={python} is not Python 3.13 (Python 3.12.4)" in result.stderr
    assert not (tmp_path / ".venv").exists()
