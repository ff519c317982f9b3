"""docs/troubleshooting.md: its transcripts are real runs, and it covers what it promises.

Each ```console block is run as the README's transcripts are (tests/test_readme_commands.py):
`make run` in the background with a newcomer's environment, then every command in one shell,
its output compared line by line. Only what differs per run is masked: ports, ids, the
milliseconds an answer took.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared import telemetry_names as names

from .test_readme_commands import (
    ROOT,
    Host,
    localise,
    mismatch,
    transcript_env,
    wait_for_idle,
    workspace,  # noqa: F401 - the fixture: free ports and a state directory
)
from .transcripts import Block, TranscriptShell, blocks, matches, normalise

DOC = ROOT / "docs" / "troubleshooting.md"
QUERIES = ROOT / "infra" / "queries"
_MILLISECONDS = re.compile(r"\b\d+ ms\b")


def transcripts() -> list[Block]:
    return [b for b in blocks(DOC.read_text()) if b.lang == "console"]


def masked(line: str, replacements: dict[str, str] | None = None, *, port: int = 7071) -> str:
    return _MILLISECONDS.sub("<n> ms", normalise(line, replacements, port=port))


class TestContent:
    def test_there_are_transcripts_for_both_commands(self) -> None:
        commands = " ".join(s.command for b in transcripts() for s in b.steps())
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


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="the transcripts use the .venv that make test (or make run) created")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", transcripts(), ids=lambda b: f"line{b.line}")
def test_troubleshooting_transcript(
    block: Block, workspace: tuple[Path, int, int]  # noqa: F811
) -> None:
    state, port, inspector = workspace
    env = transcript_env(state, port, inspector)
    shown = {str(state): ".local"}
    host = Host("make run", env)
    shell = TranscriptShell(ROOT, env)
    try:
        banner = host.banner()
        assert host.running, "make run exited:\n" + "\n".join(banner)
        for step in block.steps():
            expected = [masked(line) for line in step.expected]
            wait_for_idle(state, port)
            output, status = shell.run(localise(step.command, port))
            actual = [masked(line, shown, port=port) for line in output]
            assert matches(expected, actual), mismatch(block, step.line, step.command,
                                                       expected, actual, status)
    finally:
        shell.close()
        host.stop()
