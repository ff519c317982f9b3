"""Every setting the settings module reads is documented: in the README's Configure table, or
under a "## Settings" heading of a page in docs/."""

from __future__ import annotations

import re
from pathlib import Path

from shared.settings import APP_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def configure_section() -> str:
    match = re.search(r"^## Configure\n(.*?)^## ", README, re.S | re.M)
    assert match is not None, "README has no '## Configure' section"
    return match.group(1)


def docs_settings_sections() -> str:
    sections = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        match = re.search(r"^## Settings\n(.*?)(?=^## |\Z)", page.read_text(), re.S | re.M)
        if match is not None:
            sections.append(match.group(1))
    return "\n".join(sections)


def test_every_setting_is_documented_in_configure() -> None:
    section = configure_section() + docs_settings_sections()
    missing = sorted(name for name in APP_SETTINGS if f"`{name}`" not in section)
    assert missing == []


def test_quick_start_is_the_two_commands() -> None:
    quick = re.search(r"^## Quick start\n(.*?)^### ", README, re.S | re.M)
    assert quick is not None
    commands = re.findall(r"^(?:\$ )?make (\w+)", quick.group(1), re.M)
    assert commands == ["run", "test"]
