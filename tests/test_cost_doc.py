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
    # Every documented deployment (az, azd, the workflow) passes the parameters file, so its
    # value is the size deployed.
    deployed = load(ROOT / "infra" / "main.bicepparam").variables()["instanceMemoryMB"]
    assert literal(deployed) == int(chosen.group(1)), "main.bicepparam"


def _table(heading: str) -> dict[str, list[str]]:
    """The first markdown table after `heading`, as {first cell: the other cells}."""
    section = COST[COST.index(heading):]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows:
            return rows
    return rows


def _number(text: str) -> float:
    found = re.search(r"[\d,]*\.?\d+", text)
    assert found is not None, f"expected a number in {text!r}"
    return float(found.group().replace(",", ""))


def _found(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    assert found is not None, f"expected {pattern!r} in the page"
    return found.group(1)


def _dollars(cell: str) -> list[float]:
    """Every bold dollar amount in a bill cell, e.g. both amounts of a range."""
    return [float(amount.replace(",", ""))
            for bold in re.findall(r"\*\*(.+?)\*\*", cell)
            for amount in re.findall(r"\$([\d,]+(?:\.\d+)?)", bold)]


def test_the_bill_is_the_stated_arithmetic_on_the_stated_prices_and_measurements() -> None:
    measured = {_found(r"`(\w+)`", name): _number(cells[0])
                for name, cells in _table("| Figure | Value |").items() if "`" in name}
    prices = _table("| Item | Price |")

    def price(item: str) -> float:
        return _number(prices[item][0].split("$", 1)[1])

    def grant(item: str) -> float:
        return _number(prices[item][1])

    round_trip_ms = _number(_found(r"round trip inside Azure \((\d+) ms", COST))
    events_per_vehicle = _number(_found(r"([\d,]+) a month \(30 days\)", COST))
    busy_s = (measured["cpuMsPerWebhook"] + round_trip_ms + measured["cpuMsPerProcessedEvent"]) / 1000
    hours, gb = 730, 0.5
    span_cap_gb = 5 * 30 * 86_400 * measured["spanBytesPerEvent"] / 1e9
    instances = {10_000: 1, 100_000: 2, 1_000_000: 6}
    bill = _table("| | 10,000 vehicles |")

    def ops_cost(millions: float) -> float:
        tiers = [(100, price("Service Bus Standard, operations 13M to 100M")),
                 (2_500, price("Service Bus Standard, operations 100M to 2,500M")),
                 (float("inf"), price("Service Bus Standard, operations over 2,500M"))]
        cost, floor = 0.0, _number(prices["Service Bus Standard, operations 13M to 100M"][1])
        for ceiling, rate in tiers:
            cost += max(0.0, min(millions, ceiling) - floor) * rate
            floor = max(floor, ceiling)
        return cost

    for column, vehicles in enumerate(instances):
        events = vehicles * events_per_vehicle
        lines = {
            "Flex execution time (512 MB)": max(0.0, events * busy_s * gb - grant(
                "Flex on demand, execution time")) * price("Flex on demand, execution time"),
            "Flex executions": max(0.0, 2 * events - grant("Flex on demand, executions"))
            / 1e6 * price("Flex on demand, executions"),
            "App Insights, log records": max(0.0, events * measured["logBytesPerEvent"] / 1e9 - grant(
                "Log Analytics, Analytics logs ingestion (Application Insights)"))
            * price("Log Analytics, Analytics logs ingestion (Application Insights)"),
            "App Insights, spans (sampled, see below)": min(
                events * measured["spanBytesPerEvent"] / 1e9, instances[vehicles] * span_cap_gb)
            * price("Log Analytics, Analytics logs ingestion (Application Insights)"),
        }
        standard = price("Service Bus Standard, base charge") * hours + ops_cost(3 * events / 1e6)
        premium = [units * price("Service Bus Premium, messaging unit") * hours for units in (2, 4)]
        stated = {line: _dollars(bill[line][column]) for line in lines}
        for line, expected in lines.items():
            assert _cents(stated[line], [expected]), (line, vehicles, stated[line], expected)
        rounded = sum(amount for amounts in stated.values() for amount in amounts)
        stated_sb = _dollars(bill["Service Bus Standard"][column])
        if stated_sb:
            assert _cents(stated_sb, [standard]), (vehicles, stated_sb, standard)
            totals = [rounded + stated_sb[0]]
        else:
            stated_premium = _dollars(bill["Service Bus Premium"][column])
            assert _cents(stated_premium, premium), (stated_premium, premium)
            totals = [rounded + amount for amount in stated_premium]
        assert _cents(_dollars(bill["**Total a month**"][column]), totals), (vehicles, totals)


def _cents(stated: list[float], exact: list[float]) -> bool:
    """The stated amounts are the exact ones rounded to cents (either way at a half cent)."""
    return len(stated) == len(exact) and all(
        abs(s - e) <= 0.005 + 1e-9 for s, e in zip(stated, exact, strict=True))
