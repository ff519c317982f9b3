"""The deployed package, built the way it reaches Azure, and the worker's own dependencies.

`func azure functionapp publish` zips the app directory minus what `.funcignore` names (gitignore
syntax, read here by `pathspec`, not by a parser of ours), and the remote build installs
`requirements.txt`, and only that, into `.python_packages/lib/site-packages`. The runtime tests
load that package, not the checkout: an import of a local-only module (`shared/local`), of a
file `.funcignore` leaves out, or of a dev-only package fails in them as it would in Azure.

`pip install --target` takes about 15 s, so installed trees are cached under pytest's cache
directory, keyed by a hash of what was installed; CI's fresh clone pays it once per run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

import pathspec

ROOT = Path(__file__).resolve().parent.parent.parent
#: Where the remote build puts the app's dependencies, and where the worker looks for them.
SITE_PACKAGES = Path(".python_packages") / "lib" / "site-packages"
#: What the Functions host's Python worker brings with it (it talks gRPC to the host).
WORKER_REQUIREMENTS = ("grpcio", "protobuf")


def funcignore(root: Path = ROOT) -> pathspec.GitIgnoreSpec:
    lines = (root / ".funcignore").read_text(encoding="utf-8").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def package_files(root: Path = ROOT) -> list[str]:
    """The app's files that a publish ships: every file under `root` that `.funcignore` does
    not exclude, as POSIX paths relative to `root`. An excluded directory is not entered (git's
    rule: nothing under it can be re-included). The build's own `.python_packages` is skipped:
    the remote build makes it from requirements.txt."""
    spec = funcignore(root)
    files: list[str] = []
    for current, dirs, names in os.walk(root):
        base = Path(current).relative_to(root)
        kept = []
        for name in sorted(dirs):
            relative = (base / name).as_posix()
            if relative == SITE_PACKAGES.parts[0] or spec.match_file(relative + "/"):
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            relative = (base / name).as_posix()
            if not spec.match_file(relative):
                files.append(relative)
    return sorted(files)


def pip_target(cache: Path, requirements: Iterable[str], *, label: str) -> Path:
    """A directory with `requirements` installed by `pip install --target`, built once per
    distinct list of requirements (and interpreter) and reused from `cache` after that."""
    lines = sorted(requirements)
    key = hashlib.sha256(
        "\n".join([sys.version, sys.platform, *lines]).encode("utf-8")
    ).hexdigest()[:16]
    target = cache / f"{label}-{key}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{label}-{key}-{uuid.uuid4().hex}"
    requirements_file = cache / f".{label}-{key}.txt"
    requirements_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
         "--no-warn-script-location", "--target", str(partial), "-r", str(requirements_file)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(
            f"pip could not install {label} ({', '.join(lines)}) into {partial}:\n"
            f"{result.stderr[-4000:]}"
        )
    try:
        partial.rename(target)  # atomic: a concurrent or interrupted build never leaves half
    except OSError:  # another process finished the same build first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def app_requirements(root: Path = ROOT) -> list[str]:
    """requirements.txt's requirement lines (comments and blank lines dropped)."""
    lines = (root / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [text for line in lines if (text := line.split("#", 1)[0].strip())]


def worker_requirements() -> list[str]:
    """The worker's gRPC packages at the versions this interpreter has, so the messages
    generated here by grpcio-tools load in the worker too."""
    return [f"{name}=={version(name)}" for name in WORKER_REQUIREMENTS]


def build_package(destination: Path, dependencies: Path, *, root: Path = ROOT) -> Path:
    """Copy the published files of `root` to `destination` and put `dependencies` (a tree
    from `pip_target` of requirements.txt) where the remote build puts them."""
    destination.mkdir(parents=True)
    for relative in package_files(root):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)
    site_packages = destination / SITE_PACKAGES
    site_packages.parent.mkdir(parents=True)
    site_packages.symlink_to(dependencies, target_is_directory=True)
    return destination
