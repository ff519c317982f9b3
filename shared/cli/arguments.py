"""Argument types and input reading shared by the CLI's commands: each refuses what would
otherwise fail deep inside a backend (an integer SQLite cannot bind, a file that does not fit
in memory) with a usage error naming the option."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The most `send --file` and `explain-signature --body` read: far more than any webhook body
#: (Smartcar sends at most 50 KB; MAX_BODY_BYTES is at most 192 KiB with Service Bus), far less
#: than a reader's memory (/dev/zero would otherwise be read until MemoryError).
MAX_INPUT_BYTES = 16 * 1024 * 1024

#: The most `--limit` takes: as many dead letters as the CLI ever reads at once
#: (ops.ALL_DEAD_LETTERS); more would overflow SQLite's 64-bit integer at some size anyway.
MAX_LIMIT = 1_000_000


def limit_argument(text: str) -> int:
    """`--limit` (argparse `type`): a whole number from 1 to MAX_LIMIT."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"--limit must be at least 1 and at most {MAX_LIMIT}, got {text}")
    return value


def read_input(path: Path, option: str) -> bytes:
    """The bytes of `path` ('-': standard input), at most MAX_INPUT_BYTES. Raises ValueError
    naming `option` for more, and OSError as opening or reading raises it."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    else:
        with path.open("rb") as file:
            data = file.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"{option} {path} holds more than {MAX_INPUT_BYTES // (1024 * 1024)} "
                         "MiB: no webhook body is that large (Smartcar sends at most 50 KB); "
                         "give the body of one request")
    return data
