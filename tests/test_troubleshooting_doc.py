"""docs/troubleshooting.md covers what it promises, with transcripts of both commands.

Its ```console transcripts are run with every other page's, in reading order, by
tests/test_readme_commands.py: real runs against `make run`, where only what differs per run
is masked (ports, ids, the milliseconds an answer took).
"""

from __future__ import annotations

from shared import telemetry_names as names

from .test_readme_commands import ROOT
from .test_readme_commands import transcripts as run_transcripts

DOC = ROOT / "docs" / "troubleshooting.md"
QUERIES = ROOT / "infra" / "queries"


class TestContent:
    def test_both_commands_have_transcripts_that_are_run(self) -> None:
        mine = [b for b in run_transcripts() if b.source == "docs/troubleshooting.md"]
        commands = " ".join(s.command for b in mine for s in b.steps())
        assert "check-endpoint" in commands and "explain-signature" in commands
        assert "--token not-the-right-token" in commands  # a failing run, not only a pass

    def test_it_covers_the_new_metrics_queries_and_alert_runbooks(self) -> None:
        text = DOC.read_text()
        for metric in (names.WEBHOOK_REDELIVERED, names.WEBHOOK_DELIVERY_TO_ANSWER,
                       names.PAYLOAD_SHAPE_FIRST_SEEN):
            assert f"`{metric}`" in text, metric
        for query in ("smartcar_retries.kql", "delivery_to_answer_latency.kql",
                      "payload_shapes.kql"):
            assert (QUERIES / query).is_file() and f"`{query}`" in text, query
        for heading in ("### Smartcar retries above 1 %",
                        "### Delivery-to-answer latency p95 above 5 s",
                        "### New payload shape", "## Settings"):
            assert f"\n{heading}\n" in text, heading
