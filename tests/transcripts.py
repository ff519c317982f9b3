"""Transcripts in the README and docs/: the ```console blocks, parsed into commands and output.

A transcript is a fenced block with the info string `console`. A line starting with `$ ` is a
command (a line ending in a backslash continues on the next line); every other line until the
next command is the output the command prints (stdout and stderr together, as a terminal shows
them). A line that is exactly `...` stands for any number of lines.

`TranscriptShell` runs a transcript's commands one after another in one bash process, so
variables set by one command are seen by the next, as in a terminal.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\S*)\s*$")
ANY_LINES = "..."


@dataclass
class Step:
    command: str
    line: int  # 1-based line of the command in the README
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    heading: str
    lines: list[str]
    source: str = "README.md"  # the page, relative to the repository

    def steps(self) -> list[Step]:
        steps: list[Step] = []
        continuing = False
        for offset, text in enumerate(self.lines, start=self.line + 1):
            if continuing:
                steps[-1].command += "\n" + text
            elif text.startswith("$ "):
                steps.append(Step(text[2:], offset))
            elif not steps:
                raise ValueError(f"{self.source} line {offset}: transcript output before any "
                                 "`$ ` command")
            else:
                steps[-1].expected.append(text)
            continuing = (continuing or text.startswith("$ ")) and text.endswith("\\")
        return steps

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line} ({self.heading})"


def blocks(markdown: str, source: str = "README.md") -> list[Block]:
    found: list[Block] = []
    heading = ""
    current: Block | None = None
    for number, text in enumerate(markdown.splitlines(), start=1):
        fence = FENCE.match(text)
        if current is None:
            if text.startswith("#"):
                heading = text.lstrip("#").strip()
            elif fence:
                current = Block(fence.group(1), number, heading, [], source)
        elif text.startswith("```"):
            found.append(current)
            current = None
        else:
            current.lines.append(text)
    if current is not None:
        raise ValueError(f"{source} line {current.line}: code block never closed")
    return found


def commands_of(block: Block) -> list[tuple[int, str]]:
    """(line, command) for every command in any block: a transcript's `$ ` lines, or a
    script's lines (joined over backslash continuations, comments dropped)."""
    if block.lang == "console":
        return [(s.line, s.command) for s in block.steps()]
    found: list[tuple[int, str]] = []
    pending = ""
    start = block.line
    for offset, text in enumerate(block.lines, start=block.line + 1):
        if not pending:
            start = offset
        pending += text
        if pending.endswith("\\"):
            pending = pending[:-1] + "\n"
            continue
        command = pending.split(" #", 1)[0].strip() if not pending.startswith("#") else ""
        if command:
            found.append((start, command))
        pending = ""
    return found


# -- comparing output --------------------------------------------------------------------------

_NORMALISE = [
    # Ports: the test's host listens on a free port, the README shows 7071.
    (re.compile(r"(127\.0\.0\.1|localhost):\d+"), r"\1:<port>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<hex>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"\b1\d{12}\b"), "<epoch-ms>"),  # meta.deliveredAt and friends
    (re.compile(r"token=[A-Za-z0-9_-]{16,}"), "token=<token>"),
    # How long an answer took (check-endpoint's "200 in 3 ms"): differs on every run.
    (re.compile(r"\b\d+ ms\b"), "<n> ms"),
    # The local host's per-run key for the vehicle state route (`?code=`, in its banner).
    # (`\b` would miss a key that ends in `-`: there is no word boundary after it.)
    (re.compile(r"code=[A-Za-z0-9_-]{32}(?![A-Za-z0-9_-])"), "code=<key>"),
    # The inspector's per-run token, the first segment of its URL's path.
    (re.compile(r"(:<port>)/[A-Za-z0-9_-]{32}/"), r"\1/<token>/"),
    (re.compile(r"\s+"), " "),
]


def normalise(line: str, replacements: Mapping[str, str] | None = None, *,
              port: int = 7071) -> str:
    """`port` is the host's port wherever it stands alone (e.g. `devtunnel host -p 7071`)."""
    for literal, shown in (replacements or {}).items():
        line = line.replace(literal, shown)
    for pattern, repl in _NORMALISE:
        line = pattern.sub(repl, line)
    return re.sub(rf"\b{port}\b", "<port>", line).strip()


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1]:
        lines = lines[:-1]
    return lines


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line after `normalise`; a `...` line matches any number of lines."""
    exp, act = _trim(expected), _trim(actual)

    def match(i: int, j: int) -> bool:
        if i == len(exp):
            return j == len(act)
        if exp[i] == ANY_LINES:
            return any(match(i + 1, k) for k in range(j, len(act) + 1))
        return j < len(act) and exp[i] == act[j] and match(i + 1, j + 1)

    return match(0, 0)


# -- running -----------------------------------------------------------------------------------


class TranscriptShell:
    """One bash process; `run(command)` returns the command's output lines and exit status."""

    def __init__(self, cwd: Path, env: Mapping[str, str], *, timeout: float = 120.0) -> None:
        self._marker = f"__transcript_done_{uuid.uuid4().hex}__"
        self._timeout = timeout
        self._proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=cwd, env=dict(env),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._buffer = b""

    def run(self, command: str) -> tuple[list[str], int]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        # stdin from /dev/null: a command must not read the script that drives the shell.
        # `$?` is restored before each command, so `echo $?` shows the previous one's status.
        script = ("(exit ${__transcript_status:-0})\n"
                  f"{{ {command}\n}} </dev/null 2>&1\n"
                  "__transcript_status=$?\n"
                  f"printf '\\n{self._marker} %s\\n' \"$__transcript_status\"\n")
        self._proc.stdin.write(script.encode())
        self._proc.stdin.flush()
        deadline = time.monotonic() + self._timeout
        fd = self._proc.stdout.fileno()
        pattern = re.compile(rb"\n" + re.escape(self._marker.encode()) + rb" (\d+)\n")
        while True:
            found = pattern.search(self._buffer)
            if found:
                output, self._buffer = self._buffer[: found.start()], self._buffer[found.end():]
                return output.decode("utf-8", "replace").split("\n"), int(found.group(1))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no end of command within {self._timeout}s: {command}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"the shell exited while running: {command}\n"
                                         + self._buffer.decode("utf-8", "replace"))
                self._buffer += chunk

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, 9)
                self._proc.wait(10)
