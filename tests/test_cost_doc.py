"""docs/cost.md rests on the measurement command and states the size the Bicep deploys."""

from __future__ import annotations

import re
from pathlib import Path

from .bicep_tree import literal, load

ROOT = Path(__file__).resolve().parent.parent
COST = (ROOT / "docs" / "cost.md").read_text(encoding="utf-8")


def test_the_page_cites_the_one_command_that_measures() -> None:
    assert "make measure-memory" in COST
    assert "python -m benchmarks.memory" in COST
    recipe = re.search(r"(?m)^measure-memory:.*\n\t(.+)$", (ROOT / "Makefile").read_text())
    assert recipe is not None, "the Makefile has no measure-memory target"
    assert recipe.group(1).endswith("-m benchmarks.memory")


def test_the_page_names_every_figure_the_command_reports() -> None:
    for figure in ("peakRssMB", "cpuMsPerWebhook", "cpuMsPerProcessedEvent",
                   "spanBytesPerEvent", "logBytesPerEvent"):
        assert f"`{figure}`" in COST, figure
    source = (ROOT / "benchmarks" / "memory.py").read_text()
    for figure in re.findall(r"\(`(\w+)`\)", COST):  # a table row's "(`name`)"
        assert f'"{figure}"' in source, f"cost.md cites {figure}, which the command never reports"


def test_the_default_instance_size_is_the_one_the_page_chose() -> None:
    chosen = re.search(r"defaults to \*\*(\d+)\*\*", COST)
    assert chosen is not None
    for path in (ROOT / "infra" / "main.bicep", ROOT / "infra" / "modules" / "functionapp.bicep"):
        memory = load(path).params()["instanceMemoryMB"]
        assert literal(memory.default) == int(chosen.group(1)), path.name
