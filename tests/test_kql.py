"""The ops queries as Microsoft's own KQL parser sees them.

Every infra/queries/*.kql file, and every log alert's final query text exactly as alerts.bicep
builds it (the file plus its appended threshold line, parameter defaults substituted), is parsed
and semantically analysed by Kusto.Language (npm @kusto/language-service-next, run with node by
tests/kql/check.js) against the Application Insights `requests` and `customMetrics` tables.
A query passes when Kusto.Language reports no error and its result columns are the ones the
workbook panel and the alert rely on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from .bicep_tree import (
    Node,
    Param,
    call_arguments,
    find_calls,
    find_properties,
    interpolate,
    literal,
    load,
    text,
)

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ROOT / "infra" / "queries"
MODULES = ROOT / "infra" / "modules"
ALERTS = MODULES / "alerts.bicep"
WORKBOOK = MODULES / "workbook.bicep"
CHECK_JS = ROOT / "tests" / "kql" / "check.js"
QUERY_FILES = sorted(QUERIES.glob("*.kql"))

Report = dict[str, Any]  # check.js's answer for one query: diagnostics and result columns


# ---------------------------------------------------------------------------------------------
# The helper: run Kusto.Language over queries, and rebuild the alerts' query texts from Bicep.
# ---------------------------------------------------------------------------------------------
def analyse(queries: dict[str, str], script: Path = CHECK_JS) -> dict[str, Report]:
    """Kusto.Language's diagnostics and result columns for each query, by id."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(
            "node is not on PATH: the KQL tests run Microsoft's Kusto.Language with node. "
            "Install Node.js 18 or later, then run `make test`."
        )
    done = subprocess.run(
        [node, str(script)],
        input=json.dumps(queries),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} exited {done.returncode}:\n{done.stderr.strip()}")
    report: dict[str, Report] = json.loads(done.stdout)
    return report


def errors(report: Report) -> list[str]:
    return [
        f"{d['line']}:{d['column']}: {d['code']} {d['message']}"
        for d in report["diagnostics"]
        if d["severity"] == "Error"
    ]


def columns(report: Report) -> list[tuple[str, str]]:
    assert report["columns"] is not None, "the query returns no table"
    return [(c["name"], c["type"]) for c in report["columns"]]


@dataclass(frozen=True)
class AlertQuery:
    rule: str  # the scheduledQueryRules resource's symbol in alerts.bicep
    query_file: str  # the .kql file it loads
    text: str  # the query exactly as deployed


def loaded_file(expression: Node) -> str:
    """The path in `loadTextContent('<path>')`, the only call the query strings make."""
    (call,) = find_calls(expression, "loadTextContent")
    (argument,) = call_arguments(call)
    file_name = literal(argument)
    assert isinstance(file_name, str), f"not a literal path: {text(call)}"
    return file_name


def alert_queries(path: Path = ALERTS) -> list[AlertQuery]:
    """Each log alert's `query` string, evaluated as Bicep does with the parameter defaults."""
    template = load(path)
    params = template.params()
    found = []
    for rule in template.resources_of_type("Microsoft.Insights/scheduledQueryRules"):
        (query,) = find_properties(rule.body, "query")
        (query_file,) = [loaded_file(call) for call in find_calls(query, "loadTextContent")]
        final = interpolate(query, partial(evaluate, base=path.parent, params=params))
        found.append(AlertQuery(rule=rule.symbol, query_file=Path(query_file).name, text=final))
    return found


def evaluate(expression: Node, *, base: Path, params: dict[str, Param]) -> str:
    """An interpolated expression of a query string: loadTextContent() or a parameter."""
    if expression.type == "call_expression":
        # loadTextContent reads UTF-8 and keeps the bytes as they are (no newline fix-up).
        return (base / loaded_file(expression)).read_bytes().decode("utf-8")
    name = text(expression)
    assert name in params, f"${{{name}}} is neither loadTextContent() nor a parameter"
    default = literal(params[name].default)
    assert isinstance(default, (int, str)), f"parameter {name} has no literal default"
    return str(default)


def workbook_panels(path: Path = WORKBOOK) -> dict[str, str]:
    """Workbook panel name -> the .kql file its query loads."""
    panels: dict[str, str] = {}
    for item in find_properties(load(path).root, "items")[0].named_children:
        if item.type != "object":
            continue
        for query in find_properties(item, "query"):
            name = literal(find_properties(item, "name")[0])
            panels[name] = Path(loaded_file(query)).name
    return panels


# ---------------------------------------------------------------------------------------------
# What the workbook panels and the alerts read from each query's result.
# ---------------------------------------------------------------------------------------------
# The workbook shows each query as a table: these are its columns, in order, as Kusto types
# them. docs/operations.md "Observe" names the ones an operator reads (unavailable, rejected, p99, ...).
PANEL_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "delivery_success_rate.kql": [
        ("timestamp", "datetime"), ("total", "real"), ("succeeded", "real"),
        ("unavailable", "real"), ("rejected", "real"), ("successRate", "real"),
    ],
    "end_to_end_lag.kql": [
        ("timestamp", "datetime"), ("eventType", "string"), ("events", "long"),
        ("avgLagMs", "real"), ("maxLagMs", "real"),
    ],
    "processing_failures.kql": [
        ("eventType", "string"), ("outcome", "string"), ("deadLetterReason", "string"),
        ("errorType", "string"), ("failures", "long"), ("eventsSeen", "long"),
        ("lastSeen", "datetime"), ("sampleOperationId", "string"),
    ],
    "receive_latency.kql": [
        ("timestamp", "datetime"), ("requests", "long"), ("p50", "real"), ("p95", "real"),
        ("p99", "real"), ("slowerThan5s", "long"),
    ],
    "signature_failures.kql": [
        ("timestamp", "datetime"), ("failures", "real"), ("signatureRejected", "real"),
        ("unsignedRejected", "real"),
    ],
    "open_vehicle_errors.kql": [
        ("errorType", "string"), ("errorCode", "string"), ("vehicles", "long"),
        ("sampleVehicleIds", "dynamic"), ("lastReported", "datetime"),
    ],
    "top_vehicles_by_errors.kql": [
        ("vehicleId", "string"), ("processingFailures", "long"),
        ("vehicleErrorEvents", "long"), ("lastSeen", "datetime"),
    ],
    "smartcar_retries.kql": [
        ("timestamp", "datetime"), ("deliveries", "real"), ("redeliveries", "real"),
        ("redeliveryRate", "real"),
    ],
    "delivery_to_answer_latency.kql": [
        ("timestamp", "datetime"), ("deliveries", "long"), ("p50Ms", "real"), ("p95Ms", "real"),
        ("maxMs", "real"),
    ],
    "payload_shapes.kql": [
        ("shapeId", "string"), ("shapeKnown", "string"), ("eventType", "string"),
        ("metaVersion", "string"), ("firstSeen", "datetime"), ("lastSeen", "datetime"),
        ("instances", "long"), ("sightings", "real"),
    ],
}

# The columns each alert's threshold line compares, and the line as deployed with the defaults.
ALERT_THRESHOLDS: dict[str, tuple[set[str], str]] = {
    "successRateAlert": (
        {"total", "successRate"}, "| where total >= 10 and successRate < 95"
    ),
    "signatureFailureAlert": ({"failures"}, "| where failures > 20"),
    "processingLagAlert": ({"avgLagMs"}, "| where avgLagMs > 300000"),
    "receiveLatencyAlert": ({"requests", "p99"}, "| where requests >= 10 and p99 > 5000"),
    # A 15-minute window never holds a whole 15-minute bin: these look back 30 minutes and
    # judge the last whole bin only, so the minimum counts apply to whole bins.
    "smartcarRetriesAlert": (
        {"timestamp", "deliveries", "redeliveryRate"},
        "| where timestamp == bin(now(), 15m) - 15m and deliveries >= 100 and redeliveryRate > 1"
    ),
    "deliveryToAnswerAlert": (
        {"timestamp", "deliveries", "p95Ms"},
        "| where timestamp == bin(now(), 15m) - 15m and deliveries >= 10 and p95Ms > 5000"
    ),
    "newPayloadShapeAlert": ({"shapeKnown"}, "| where shapeKnown == 'false'"),
}
NUMERIC = {"int", "long", "real", "decimal"}
#: Alerts whose threshold is a string comparison rather than a number.
STRING_THRESHOLDS = {"newPayloadShapeAlert": {"shapeKnown"}}


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    """One node run for every query file and every alert's final query."""
    queries = {p.name: p.read_text() for p in QUERY_FILES}
    queries |= {a.rule: a.text for a in alert_queries()}
    return analyse(queries)


# ---------------------------------------------------------------------------------------------
# 1. The query files, as the workbook shows them.
# ---------------------------------------------------------------------------------------------
class TestQueryFiles:
    def test_every_query_file_has_a_panel_spec(self) -> None:
        assert {p.name for p in QUERY_FILES} == set(PANEL_COLUMNS)

    @pytest.mark.parametrize("path", QUERY_FILES, ids=lambda p: p.name)
    def test_kusto_language_reports_no_error(
        self, path: Path, reports: dict[str, Report]
    ) -> None:
        assert errors(reports[path.name]) == []

    @pytest.mark.parametrize("path", QUERY_FILES, ids=lambda p: p.name)
    def test_result_columns_are_what_the_workbook_panel_shows(
        self, path: Path, reports: dict[str, Report]
    ) -> None:
        assert columns(reports[path.name]) == PANEL_COLUMNS[path.name]

    def test_every_workbook_panel_shows_a_checked_query_file(self) -> None:
        panels = workbook_panels()
        assert set(panels.values()) == set(PANEL_COLUMNS)
        assert panels["top-vehicles-by-errors"] == "top_vehicles_by_errors.kql"


# ---------------------------------------------------------------------------------------------
# 2. The alerts: the file plus the threshold line, exactly as deployed.
# ---------------------------------------------------------------------------------------------
class TestAlertQueries:
    def test_every_log_alert_is_checked(self) -> None:
        assert {a.rule for a in alert_queries()} == set(ALERT_THRESHOLDS)

    @pytest.mark.parametrize("rule", sorted(ALERT_THRESHOLDS))
    def test_final_query_is_the_file_plus_the_threshold_line(self, rule: str) -> None:
        (alert,) = [a for a in alert_queries() if a.rule == rule]
        file_text = (QUERIES / alert.query_file).read_text()
        _, line = ALERT_THRESHOLDS[rule]
        assert alert.text == f"{file_text}\n{line}\n"

    @pytest.mark.parametrize("rule", sorted(ALERT_THRESHOLDS))
    def test_kusto_language_reports_no_error(self, rule: str, reports: dict[str, Report]) -> None:
        assert errors(reports[rule]) == []

    @pytest.mark.parametrize("rule", sorted(ALERT_THRESHOLDS))
    def test_threshold_compares_numeric_columns_the_query_returns(
        self, rule: str, reports: dict[str, Report]
    ) -> None:
        (alert,) = [a for a in alert_queries() if a.rule == rule]
        returned = dict(columns(reports[alert.query_file]))
        compared, _ = ALERT_THRESHOLDS[rule]
        assert compared <= set(returned), compared - set(returned)
        strings = STRING_THRESHOLDS.get(rule, set())
        times = compared & {"timestamp"}
        assert {returned[c] for c in compared - strings - times} <= NUMERIC
        assert {returned[c] for c in strings} <= {"string"}
        assert {returned[c] for c in times} <= {"datetime"}
        # A where clause keeps the columns: the alert returns the panel's rows, filtered.
        assert columns(reports[rule]) == columns(reports[alert.query_file])


# ---------------------------------------------------------------------------------------------
# 3. The helper itself: it catches what it is here to catch.
# ---------------------------------------------------------------------------------------------
OLD_TOP_LINE = "| top 20 by processingFailures desc, vehicleErrorEvents desc"
FIXED_TOP_LINES = "| sort by processingFailures desc, vehicleErrorEvents desc\n| take 20"


def deliberately_broken() -> dict[str, str]:
    """Real queries with one known fault each (never written to infra/)."""
    top_vehicles = (QUERIES / "top_vehicles_by_errors.kql").read_text()
    assert FIXED_TOP_LINES in top_vehicles
    latency = (QUERIES / "receive_latency.kql").read_text()
    assert "percentilew(duration, itemCount, 99)" in latency
    success_rate = (QUERIES / "delivery_success_rate.kql").read_text()
    return {
        # The line top_vehicles_by_errors.kql had: `top` takes one sort expression.
        "old_top": top_vehicles.replace(FIXED_TOP_LINES, OLD_TOP_LINE),
        # Parses fine; only the table schema says `durationMs` is not a column of `requests`.
        "unknown_column": latency.replace("percentilew(duration, itemCount, 99)",
                                          "percentilew(durationMs, itemCount, 99)"),
        "unknown_table": "customMetric | take 1",
        "threshold_on_a_missing_column": f"{success_rate}\n| where successRatio < 95\n",
    }


@pytest.fixture(scope="module")
def broken() -> dict[str, Report]:
    return analyse(deliberately_broken())


class TestTheChecker:
    def test_the_old_two_key_top_line_is_a_syntax_error_on_its_line(
        self, broken: dict[str, Report]
    ) -> None:
        found = errors(broken["old_top"])
        assert found and all("KS198" in e for e in found), found
        top_line = deliberately_broken()["old_top"].splitlines().index(OLD_TOP_LINE) + 1
        assert found[0].startswith(f"{top_line}:"), found

    def test_an_unknown_column_is_a_semantic_error(self, broken: dict[str, Report]) -> None:
        found = errors(broken["unknown_column"])
        assert len(found) == 1 and "KS142" in found[0] and "durationMs" in found[0], found

    def test_an_unknown_table_is_a_semantic_error(self, broken: dict[str, Report]) -> None:
        found = errors(broken["unknown_table"])
        assert found and "customMetric" in found[0], found

    def test_a_threshold_on_a_column_the_query_does_not_return_is_an_error(
        self, broken: dict[str, Report]
    ) -> None:
        found = errors(broken["threshold_on_a_missing_column"])
        assert len(found) == 1 and "successRatio" in found[0], found

    def test_a_missing_kusto_language_install_fails_with_what_to_run(
        self, tmp_path: Path
    ) -> None:
        # A checkout without node_modules: the same script, with nothing installed beside it.
        script = tmp_path / "tests" / "kql" / "check.js"
        script.parent.mkdir(parents=True)
        shutil.copy(CHECK_JS, script)
        with pytest.raises(RuntimeError) as failure:
            analyse({"q": "requests | take 1"}, script=script)
        message = str(failure.value)
        assert "Kusto.Language is not installed" in message
        assert "npm ci" in message and "make test" in message

    def test_alert_queries_are_rebuilt_with_escapes_files_and_parameter_defaults(
        self, tmp_path: Path
    ) -> None:
        (tmp_path / "q.kql").write_text("requests\n")
        bicep = tmp_path / "alerts.bicep"
        bicep.write_text(
            "param limit int = 7\nparam label string = 'tag'\n"
            "resource r 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {\n"
            "  name: 'r'\n  properties: {\n    criteria: {\n      allOf: [\n"
            "        {\n          query: '${loadTextContent('q.kql')}\\n| where n > ${limit}"
            " and tag == \\'${label}\\' \\u{41}\\n'\n        }\n      ]\n    }\n  }\n}\n"
        )
        (alert,) = alert_queries(bicep)
        assert alert.query_file == "q.kql"
        assert alert.text == "requests\n\n| where n > 7 and tag == 'tag' A\n"
