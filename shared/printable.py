"""Text from strangers made safe to show on one line of a terminal or a log.

Vehicle ids, eventIds, values and header values are a sender's characters: printed raw, an
ESC sequence could rewrite what an operator sees and a line break could forge a line of a log.
"""

from __future__ import annotations

import logging


def printable(text: str, *, keep: str = "") -> str:
    """`text` safe to print on a terminal: every character that is not printable (control
    characters such as ESC and BEL, C1 controls, bidi overrides, unassigned code points, and
    line breaks unless kept) is shown as a Python-style escape (\\x1b, \\u202e)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class PrintableFormatter(logging.Formatter):
    """A formatter whose records are one line each, whatever their messages hold: what a
    message and its arguments hold is escaped as `printable` does (an eventId with a line
    break cannot forge a record). A traceback, appended after, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))
