"""What `func azure functionapp publish` ships is only what runs in Azure.

The local host, its SQLite queue and the operations CLI are excluded by `.funcignore`; nothing
that deploys may need them. The package's file list is decided by git's own ignore matcher
reading `.funcignore` (the Core Tools use the same gitignore syntax), not by our own parser.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ONLY_IMPORTS = ("sqlite3", "aiohttp.web")


def _ignored(paths: list[str]) -> set[str]:
    result = subprocess.run(
        ["git", "-c", "core.excludesFile=.funcignore", "check-ignore", "--no-index", "--stdin"],
        cwd=ROOT, input="\n".join(paths), capture_output=True, text=True, check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return set(result.stdout.split())


def deployed_python_files() -> list[str]:
    candidates = sorted(
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
        if ".venv" not in p.parts and "node_modules" not in p.parts
    )
    ignored = _ignored(candidates)
    return [p for p in candidates if p not in ignored]


def test_local_and_operator_packages_are_not_deployed() -> None:
    deployed = deployed_python_files()
    assert "function_app.py" in deployed and "shared/receiver.py" in deployed
    for path in deployed:
        assert not path.startswith(
            ("shared/local/", "shared/cli/", "tests/", "benchmarks/", "mutation/", "mutants/")
        ), path


def test_the_inspector_page_is_not_deployed() -> None:
    page = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "shared/local/static").iterdir())
    assert page and _ignored(page) == set(page)


def test_no_deployed_module_imports_sqlite_or_aiohttp_web() -> None:
    offenders = []
    for path in deployed_python_files():
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            offenders += [f"{path}: {n}" for n in names if n.startswith(LOCAL_ONLY_IMPORTS)]
    assert offenders == []


def test_the_app_indexes_and_builds_its_azure_runtime_without_local_packages() -> None:
    # As in Azure: shared.local and shared.cli are absent. Indexing function_app.py and
    # building the Service Bus runtime must neither need them nor load sqlite3/aiohttp.web.
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith(("shared.local", "shared.cli", "sqlite3", "_sqlite3",
                                    "aiohttp.web")):
                    raise ModuleNotFoundError(f"not deployed: {name}")
                return None

        sys.meta_path.insert(0, Absent())
        import function_app
        from shared.runtime import build_runtime
        from shared.settings import load_settings
        functions = function_app.app.get_functions()
        runtime = build_runtime(load_settings({
            "KEY_VAULT_URI": "https://kv.vault.azure.net/",
            "SMARTCAR_TOKEN_SECRET_NAME": "smartcar-amt",
            "ServiceBusConnection__fullyQualifiedNamespace": "sb.servicebus.windows.net",
            "SERVICEBUS_QUEUE_NAME": "smartcar-events",
            "AzureWebJobsStorage__accountName": "stsmartcar",
        }))
        assert runtime.queue is None
        print(len(functions))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) == 7  # with the inbox prune timer


def test_funcignore_names_directories_with_a_trailing_slash() -> None:
    # Without the slash, a matcher that compares prefixes (and some do) would also leave out
    # a future shared/localization.py or tests_helpers.py that the app imports.
    patterns = [line.strip() for line in (ROOT / ".funcignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    directories = [p for p in patterns if (ROOT / p.rstrip("/")).is_dir() or p.endswith("/")]
    assert "shared/local/" in directories and "shared/cli/" in directories
    assert [p for p in directories if not p.endswith("/")] == []
    assert [p for p in patterns if not p.endswith("/") and (ROOT / p).is_dir()] == []


def test_a_module_named_like_an_ignored_directory_still_ships() -> None:
    ignored = _ignored(["shared/localization.py", "shared/cli_helpers.py", "testsuite.py",
                        "shared/local/host.py", "shared/cli/commands.py", "docs/deploy.md"])
    assert ignored == {"shared/local/host.py", "shared/cli/commands.py", "docs/deploy.md"}


def test_no_virtual_environment_or_installed_tools_are_tracked() -> None:
    """`.venv` and `node_modules` are made by `make` on each machine. A symlink to either is a
    file to git (a `dir/` ignore pattern does not match it), and a tracked one sends a fresh
    clone's installs to a path that exists only on the machine that committed it."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (mutation testing runs the tests in a copy)")
    tracked = subprocess.run(["git", "ls-files", "--", ".venv", "node_modules"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == []
    ignored = subprocess.run(["git", "check-ignore", "--no-index", ".venv", "node_modules"],
                             cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    assert ignored == [".venv", "node_modules"]
