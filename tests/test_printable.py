"""`shared.printable`: a sender's text on one line of a terminal or a log."""

from __future__ import annotations

import io
import logging

from shared.printable import PrintableFormatter, printable


class TestPrintable:
    def test_printable_text_is_kept_as_it_is(self) -> None:
        text = "vehicle 36ab27d0 · Ladestand 12 % — ✓ 𝄞"
        assert printable(text) is text

    def test_controls_line_breaks_and_bidi_overrides_are_escaped(self) -> None:
        assert printable("a\nb\x1b[2J\x85\u202e\U000e0001") == (
            "a\\x0ab\\x1b[2J\\x85\\u202e\\U000e0001")

    def test_kept_characters_stay(self) -> None:
        assert printable("a\nb\tc", keep="\n") == "a\nb\\x09c"


class TestPrintableFormatter:
    def _logger(self) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("tests.printable")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
        return logger, out

    def test_a_record_is_one_line_whatever_its_arguments_hold(self) -> None:
        logger, out = self._logger()
        logger.info("event %s stored", "e1\nERROR app: forged\x1b[31m")
        assert out.getvalue() == "INFO tests.printable: event e1\\x0aERROR app: forged\\x1b[31m stored\n"

    def test_a_traceback_keeps_its_lines(self) -> None:
        logger, out = self._logger()
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception("event %s failed", "e\n2")
        first, *rest = out.getvalue().splitlines()
        assert first == "ERROR tests.printable: event e\\x0a2 failed"
        assert rest[0] == "Traceback (most recent call last):"
        assert rest[-2:] == ["ValueError: bad", "value"]
