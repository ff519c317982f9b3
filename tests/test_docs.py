"""The README's Configure table names every setting the settings module reads."""

from __future__ import annotations

import re
from pathlib import Path

from shared.settings import APP_SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def configure_section() -> str:
    match = re.search(r"^## Configure\n(.*?)^## ", README, re.S | re.M)
    assert match is not None, "README has no '## Configure' section"
    return match.group(1)


def test_every_setting_is_documented_in_configure() -> None:
    section = configure_section()
    missing = sorted(name for name in APP_SETTINGS if f"`{name}`" not in section)
    assert missing == []


def test_quick_start_is_the_two_commands() -> None:
    quick = re.search(r"^## Quick start\n(.*?)^### ", README, re.S | re.M)
    assert quick is not None
    commands = re.findall(r"^(?:\$ )?make (\w+)", quick.group(1), re.M)
    assert commands == ["run", "test"]
