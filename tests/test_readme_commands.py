"""The README's and docs' commands are run, and print what the pages show beside them.

Every local command in a code block of the README or of a page in docs/ (`make ...`,
`python -m shared.cli ...`, `curl` against the local host) must sit in a ```console
transcript, and every such transcript is run here, in the order a reader meets them: the
README first, then the pages in the order its "More documentation" table lists them. All of
them run in ONE workspace: one real `make run` on a free port, one LOCAL_STATE_DIR, so an
example that only works on a fresh queue (a sequence number, an empty dead-letter queue)
fails. Each transcript's commands run in one bash session, and their output is compared with
the lines shown after them (after `normalise`: ids, times, hashes and ports may differ; `...`
stands for any lines). Commands for Azure and for the tools this machine does not have (`az`,
`azd`, `func`, `devtunnel`, `ngrok`, any https:// URL) are not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.local.queue import LocalQueue
from shared.local.queue_open import QUEUE_FILE

from .support import http_request, wait_until
from .transcripts import Block, TranscriptShell, blocks, commands_of, matches, normalise

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent

# Tools that are not on this machine or that reach Azure: their lines are documentation only.
NOT_LOCAL_TOOLS = ("az", "azd", "func", "devtunnel", "ngrok")
LOCAL_COMMAND = re.compile(
    r"^(?:[A-Z_]+=\S*\s+)*"  # environment assignments, e.g. PORT=abc
    r"(?:make\b|(?:\S*/)?python3?\s+-m\s+shared\.cli\b|curl\b)"
)
# Local commands that no transcript runs, and why.
NOT_RUN = {
    "make test": "the suite this test is part of",
    "make test-browser": "a test of its own (tests/test_inspector_browser.py)",
    "make bench": "the benchmarks: tests/test_benchmarks.py runs them in --quick mode",
}
BANNER_END = "Press Ctrl-C to stop."


def reading_order() -> list[str]:
    """README.md, then each docs page in the order the README's table links it."""
    table = README.split("\n## More documentation\n", 1)[1].split("\n## ", 1)[0]
    pages = list(dict.fromkeys(re.findall(r"^\| \[[^\]]+\]\((docs/[\w.-]+\.md)\)", table,
                                          re.M)))
    unlisted = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")
                      if str(p.relative_to(ROOT)) not in pages)
    return ["README.md", *pages, *unlisted]


def page_blocks() -> list[Block]:
    return [b for page in reading_order() for b in blocks((ROOT / page).read_text(), page)]


def first_word(command: str) -> str:
    words = [w for w in command.split() if not re.match(r"^[A-Z_]+=", w)]
    return words[0] if words else ""


def is_remote(command: str) -> bool:
    return first_word(command) in NOT_LOCAL_TOOLS or "https://" in command


def is_local(command: str) -> bool:
    return bool(LOCAL_COMMAND.match(command.strip())) and not is_remote(command)


def runnable(block: Block) -> bool:
    return block.lang == "console" and not any(is_remote(c) for _, c in commands_of(block))


def transcripts() -> list[Block]:
    return [b for b in page_blocks() if runnable(b)]


class TestEveryLocalCommandIsRun:
    def test_local_commands_appear_only_in_transcripts_that_are_run(self) -> None:
        stray = [
            f"{block.source}:{line}: {command.splitlines()[0]}"
            for block in page_blocks() if not runnable(block)
            for line, command in commands_of(block)
            if is_local(command) and command.strip() not in NOT_RUN
        ]
        assert stray == [], (
            "local commands outside a ```console transcript (or in one that also reaches "
            "Azure) are never run by this test; write them as `$ command` lines with their "
            "output in a transcript of their own"
        )

    def test_the_pages_have_transcripts_and_they_hold_local_commands(self) -> None:
        run = [c for b in transcripts() for _, c in commands_of(b) if is_local(c)]
        assert any(c.startswith("make run") for c in run)
        assert any("python -m shared.cli dlq" in c for c in run)
        assert any(c.startswith("curl") for c in run)
        assert {b.source for b in transcripts()} >= {"README.md", "docs/operations.md"}

    def test_the_readme_comes_first_then_its_table_of_pages(self) -> None:
        order = reading_order()
        assert order[0] == "README.md"
        assert set(order[1:]) == {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
        assert order.index("docs/how-it-works.md") < order.index("docs/operations.md")
        # The host starts in the README's first transcript, before anything is sent to it.
        first = transcripts()[0]
        assert (first.source, commands_of(first)[0][1]) == ("README.md", "make run")


# -- running a transcript ----------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, held together while chosen so none is picked twice."""
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def transcript_env(state: Path, port: int, inspector_port: int) -> dict[str, str]:
    """A newcomer's shell: no Azure settings, no token (the development token), the venv that
    `make run` made on PATH; only the ports and the state directory are the test's. The
    inspector gets a port of its own: its default, PORT+1, may belong to another process on a
    busy CI machine, and the banner would then (rightly) say it did not start."""
    drop = ("SMARTCAR_", "ServiceBusConnection", "KEY_VAULT", "APPLICATIONINSIGHTS", "MAKE",
            "MFLAGS", "LOCAL_STATE_DIR", "PORT", "HOST", "LOG_LEVEL", "INSPECTOR_PORT",
            "AzureWebJobsStorage", "PYTEST_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        PORT=str(port),
        INSPECTOR_PORT=str(inspector_port),
        LOCAL_STATE_DIR=str(state),
        PYTHONUNBUFFERED="1",
    )
    return env


class Host:
    """`make run` in the background; its output is drained by a thread so it never blocks."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", "-c", command], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def banner(self, timeout: float = 120.0) -> list[str]:
        """The output up to the banner's last line, or everything if the host exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if BANNER_END in self.lines:
                return self.lines[: self.lines.index(BANNER_END) + 1]
            if self.proc.poll() is not None:
                self._reader.join(10)
                return list(self.lines)
            time.sleep(0.05)
        raise AssertionError("make run printed no banner in time:\n" + "\n".join(self.lines))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(10)


def wait_for_idle(state: Path, port: int) -> None:
    """Wait until the host has settled every message: a person reads the previous output
    before typing the next command, and the processor answers in milliseconds."""
    wait_until(lambda: http_request(port, "GET", "/api/health").status == 200, timeout=60)
    queue = LocalQueue(state / QUEUE_FILE)
    try:
        wait_until(lambda: queue.stats()["active"] == 0, timeout=60, interval=0.05)
    finally:
        queue.close()


def localise(command: str, port: int) -> str:
    """The README's command on this test's port and state directory."""
    return (command.replace("127.0.0.1:7071", f"127.0.0.1:{port}")
            .replace(".local/", '"$LOCAL_STATE_DIR"/'))


def mismatch(block: Block, line: int, command: str, expected: list[str], actual: list[str],
             status: int | None = None) -> str:
    return (
        f"{block.where}, line {line}: `{command}`"
        + (f" (exit status {status})" if status is not None else "")
        + f"\n--- {block.source} shows (normalised) ---\n" + "\n".join(expected)
        + "\n--- it printed (normalised) ---\n" + "\n".join(actual)
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    port, inspector = free_ports(2)
    yield tmp_path / "state", port, inspector


def run_block(block: Block, env: dict[str, str], state: Path, port: int,
              host: Host | None, started: list[Host]) -> Host | None:
    """Run one transcript against the workspace's host (starting it at a `make run`, or
    when none runs yet); returns the host, still running. Every host it starts is also put
    in `started`, so a failed assertion cannot leave one running behind the test."""
    shown = {str(state): ".local"}
    shell = TranscriptShell(ROOT, env)
    try:
        for step in block.steps():
            expected = [normalise(line) for line in step.expected]
            command = localise(step.command, port)
            if first_word(step.command) == "make" and re.search(r"\bmake run\b", step.command):
                assert host is None or not host.running, f"{block.where}: two `make run`"
                host = Host(command, env)
                started.append(host)
                actual = [normalise(line, shown, port=port) for line in host.banner()]
                assert matches(expected, actual), mismatch(block, step.line, step.command,
                                                           expected, actual)
                continue
            if host is None or not host.running:
                host = Host("make run", env)
                started.append(host)
                banner = host.banner()
                assert host.running, "make run exited:\n" + "\n".join(banner)
            wait_for_idle(state, port)
            output, status = shell.run(command)
            actual = [normalise(line, shown, port=port) for line in output]
            assert matches(expected, actual), mismatch(block, step.line, step.command,
                                                       expected, actual, status)
    finally:
        shell.close()
    return host


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="the transcripts use the .venv that make test (or make run) created")
@pytest.mark.timeout(900)
def test_every_transcript_in_reading_order_in_one_workspace(
        workspace: tuple[Path, int, int]) -> None:
    """As a reader would: README first, then each page, one `make run`, one queue."""
    state, port, inspector = workspace
    env = transcript_env(state, port, inspector)
    host: Host | None = None
    started: list[Host] = []
    try:
        for block in transcripts():
            host = run_block(block, env, state, port, host, started)
    finally:
        for each in started:
            each.stop()
