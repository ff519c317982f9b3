"""`kill -9` just after a handler ran: the event's completion must already be committed.

A delivery that succeeded is completed once the vehicle state store committed its writes (at
most 20 ms after the first write of the commit), by the next send's transaction or, when none
comes within 2 ms, by the fetcher; so a crash 50 ms after the handler ran (past that bound,
with margin for a loaded machine) finds nothing to redeliver. Measured with
real processes by `tests/kill_after_handling.py` (also a command for the figure per kill).
"""

from __future__ import annotations

from pathlib import Path

from .kill_after_handling import measure


class TestKillJustAfterHandling:
    def test_no_event_is_handled_twice_after_a_kill_50_ms_after_its_handler(
        self, tmp_path: Path
    ) -> None:
        result = measure(tmp_path / "state", rounds=4, delay=0.05)
        assert result["missing"] == 0
        assert result["doubles"] == 0, result
