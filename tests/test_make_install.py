"""`make run` installs what running needs; `make test` adds the development tools.

Read from make's own dry run (`make -n`), which prints the recipe it would run for a fresh
virtual environment, so the test needs no network and installs nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
DEV_TOOLS = {"pytest", "pytest-timeout", "hypothesis", "smartcar", "ruff", "mypy", "mutmut",
             "selenium", "tree-sitter", "tree-sitter-bicep"}


def dry_run(target: str, venv: Path) -> str:
    result = subprocess.run(["make", "-n", target, f"VENV={venv}", f"PYTHON={sys.executable}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def requirements(name: str) -> tuple[list[str], set[str]]:
    """(files it includes with -r, package names it lists)."""
    includes, names = [], set()
    for line in (ROOT / name).read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text.startswith("-r "):
            includes.append(text[3:].strip())
        elif text:
            names.add(Requirement(text).name)
    return includes, names


class TestMakeRunInstallsOnlyWhatRunningNeeds:
    def test_make_run_installs_the_local_requirements_and_says_so(self, tmp_path: Path) -> None:
        recipe = dry_run("run", tmp_path / "venv")
        assert "first run: installing dependencies" in recipe
        assert re.search(r"pip install .*-r requirements-local\.txt", recipe)
        assert "requirements-dev.txt" not in recipe
        assert "shared.local" in recipe  # and then runs the host

    def test_make_test_installs_the_development_tools(self, tmp_path: Path) -> None:
        recipe = dry_run("lint", tmp_path / "venv")
        assert re.search(r"pip install .*-r requirements-dev\.txt", recipe)

    @pytest.mark.parametrize("target", ["stats", "dlq", "send"])
    def test_the_cli_shortcuts_need_only_the_running_install(self, tmp_path: Path,
                                                              target: str) -> None:
        recipe = dry_run(target, tmp_path / "venv")
        assert "requirements-local.txt" in recipe
        assert "requirements-dev.txt" not in recipe

    @pytest.mark.parametrize("target", ["dlq-show", "vehicles-show"])
    def test_an_id_reaches_the_cli_as_one_argument(self, target: str) -> None:
        """An eventId may hold spaces or `;`: unquoted, the shell split it (and ran the rest).
        PY stands in for the interpreter and prints the arguments it was given."""
        given = "evt 1; echo split'; echo injected '"
        # Under `make test` this make is a sub-make: without these it would print "Entering
        # directory" lines into what it prints.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "--no-print-directory", target, f"ID={given}",
                                 "RUN_STAMP=", "PY=printf %s/"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("/")[:5] == ["-m", "shared.cli", target.split("-")[0],
                                                "show", given]

    @pytest.mark.parametrize("target", ["send", "check-endpoint"])
    def test_a_url_and_a_token_reach_the_cli_as_one_argument_each(self, target: str) -> None:
        url, token = "http://127.0.0.1:1/x?code=a'b; echo injected", "t'k; echo injected '"
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
        result = subprocess.run(["make", "--no-print-directory", target, f"URL={url}",
                                 f"TOKEN={token}", "RUN_STAMP=", "PY=printf '%s\\n'"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        argv = result.stdout.splitlines()  # PY prints each argument on a line of its own
        assert "injected" not in result.stdout.replace(url, "").replace(token, "")
        assert url in argv and argv[argv.index("--token") + 1] == token

    def test_the_local_file_is_the_app_plus_the_hosts_own_and_no_dev_tool(self) -> None:
        includes, names = requirements("requirements-local.txt")
        assert includes == ["requirements.txt"]
        assert {"uvloop", "httptools"} <= names
        assert not names & DEV_TOOLS

    def test_the_dev_file_builds_on_the_local_one(self) -> None:
        includes, names = requirements("requirements-dev.txt")
        assert includes == ["requirements-local.txt"]
        assert {"pytest", "ruff", "mypy"} <= names
