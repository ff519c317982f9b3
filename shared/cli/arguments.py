"""Argument types and input reading shared by the CLI's commands: each refuses what would
otherwise fail deep inside a backend (an integer SQLite cannot bind, a file that does not fit
in memory) with a usage error naming the option."""

from __future__ import annotations

import argparse

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
