"""The README is short and has a table of contents; every page's links lead somewhere; the
settings page names every setting the settings module reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.settings import APP_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAX_README_LINES = 300
# Markdown files whose relative links must resolve.
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Settings that only make sense in Azure, set there by the Bicep (docs/configuration.md says so).
AZURE_ONLY = {"AZURE_CLIENT_ID", "AzureWebJobsStorage__accountName",
              "AzureWebJobsStorage__blobServiceUri"}


def section(text: str, heading: str) -> str:
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#{{1,{heading.count('#')}}} |\Z)",
                      text, re.S | re.M)
    assert match is not None, f"no {heading!r} section"
    return match.group(1)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        file, _, fragment = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{path.name}: {target} (no file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{path.name}: {target} (no heading)")
    return broken


class TestTheReadme:
    def test_is_at_most_300_lines(self) -> None:
        lines = len(README.splitlines())
        assert lines <= MAX_README_LINES, (
            f"README.md has {lines} lines; keep it at most {MAX_README_LINES} and move "
            "reference material to docs/"
        )

    def test_has_a_table_of_contents_linking_every_section(self) -> None:
        contents = re.search(r"^\*\*Contents:\*\*\n(.*?)\n\n", README, re.S | re.M)
        assert contents is not None, "README has no **Contents:** block"
        linked = set(re.findall(r"\]\(#([^)]+)\)", contents.group(1)))
        sections = {anchor(h) for h in re.findall(r"^## (.+)$", README, re.M)}
        assert linked == sections

    def test_quick_start_is_the_two_commands_and_python_3_13(self) -> None:
        quick = section(README, "## Quick start")
        commands = re.findall(r"^(?:\$ )?make (\w+)", quick, re.M)
        assert commands == ["run", "test"]
        assert "Python 3.13" in quick
        assert "python3.13 -m venv .venv" in quick
        assert "WSL" in quick

    def test_links_every_docs_page(self) -> None:
        for page in sorted((ROOT / "docs").glob("*.md")):
            assert f"(docs/{page.name})" in README, page.name

    def test_names_no_issue_or_commit(self) -> None:
        for path in PAGES:
            text = path.read_text()
            found = re.search(r"\b[Ii]ssue \d+|`[0-9a-f]{7,10}`|\bcommit [0-9a-f]{7,}", text)
            assert found is None, f"{path.name}: {found and found.group(0)}"


class TestLinks:
    @pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
    def test_every_relative_link_resolves(self, page: Path) -> None:
        assert broken_links(page) == []

    def test_the_checker_finds_a_missing_file_and_a_missing_heading(self, tmp_path: Path) -> None:
        (tmp_path / "other.md").write_text("# Other\n## Real heading\n")
        page = tmp_path / "page.md"
        page.write_text("[a](other.md#real-heading) [b](missing.md) [c](other.md#nope) "
                        "[d](#here)\n## Here\n")
        assert broken_links(page) == ["page.md: missing.md (no file)",
                                      "page.md: other.md#nope (no heading)"]


class TestConfiguration:
    PAGE = (ROOT / "docs" / "configuration.md").read_text()

    def test_every_setting_is_in_the_settings_table(self) -> None:
        table = section(self.PAGE, "## Settings")
        missing = sorted(name for name in APP_SETTINGS if f"| `{name}`" not in table
                         and f"/ `{name}`" not in table)
        assert missing == []

    def test_the_example_file_lists_every_setting_but_the_azure_only_ones(self) -> None:
        example = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
        assert sorted(set(APP_SETTINGS) - set(example)) == sorted(AZURE_ONLY)
        said = section(self.PAGE, "## `local.settings.json.example`")
        for name in AZURE_ONLY:
            assert f"`{name}`" in said, name
