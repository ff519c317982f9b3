"""SECURITY.md is a claim list: every defence names a test, and every named test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECURITY = ROOT / "SECURITY.md"
TEST_REF = re.compile(r"tests/[\w/]+\.py::[\w:]+")


def defined_tests(path: Path) -> set[str]:
    """`Class::test` and `test` names defined in a test file."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}::{item.name}")
    return names


def missing_tests(text: str, root: Path) -> list[str]:
    missing = []
    for ref in sorted(set(TEST_REF.findall(text))):
        file, _, name = ref.partition("::")
        path = root / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(ref)
    return missing


def defence_rows(text: str) -> list[str]:
    """Table rows under "## Threats and defences", header and separator rows excluded."""
    section = text.split("## Threats and defences", 1)[1].split("\n## ", 1)[0]
    return [
        line for line in section.splitlines()
        if line.startswith("|") and not line.startswith("| Defence") and not line.startswith("| ---")
    ]


class TestSecurityDoc:
    def test_every_named_test_exists(self) -> None:
        text = SECURITY.read_text()
        assert len(set(TEST_REF.findall(text))) >= 20
        assert missing_tests(text, ROOT) == []

    def test_every_defence_names_a_test(self) -> None:
        rows = defence_rows(SECURITY.read_text())
        assert len(rows) >= 15
        assert [row for row in rows if not TEST_REF.search(row)] == []

    def test_covers_the_threat_model_and_rotation(self) -> None:
        text = SECURITY.read_text()
        for heading in ("### Forged payloads", "### Replayed payloads", "### Signing oracle",
                        "### Token theft", "### Denial of service", "### Personal data",
                        "## Rotating the token"):
            assert heading in text

    def test_the_checker_reports_a_renamed_test(self) -> None:
        text = "tests/test_security_doc.py::TestSecurityDoc::test_that_does_not_exist"
        assert missing_tests(text, ROOT) == [text]
        assert missing_tests("tests/nope.py::test_x", ROOT) == ["tests/nope.py::test_x"]

    def test_the_checker_reports_a_defence_without_a_test(self) -> None:
        doc = "## Threats and defences\n| Defence | Proved by |\n| --- | --- |\n| trust me | - |\n"
        assert defence_rows(doc) == ["| trust me | - |"]
        assert not TEST_REF.search(defence_rows(doc)[0])
