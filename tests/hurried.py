"""An asyncio event loop on a virtual clock, for the time budgets.

A budget of seconds (a send's 5 s, a spill's 5 s) is tested by what happens on either side of
it: a call that ends just inside the budget succeeds and one that ends just outside fails. On
this loop both take milliseconds. Its clock stands still while anything is ready to run, and
when the loop would wait for its next timer with nothing to do, the clock jumps to that timer.
So timers fire one at a time in the order of their times, however slow the machine: the tests
compare timers, never the wall clock.

Work in threads (`asyncio.to_thread`) gets `THREAD_GRACE` of real time to finish before the
clock jumps; these tests give threads only quick file operations.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Real seconds the loop waits for I/O or a thread before it moves its clock to the next timer.
THREAD_GRACE = 0.02


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> Any:
        if timeout is None or timeout <= 0:  # no timer to jump to, or nothing to wait for
            return super().select(timeout)
        ready = super().select(min(timeout, THREAD_GRACE))
        if not ready:
            self.now += timeout
        return ready


class HurriedLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def run_hurried[T](main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a `HurriedLoop`."""
    with asyncio.Runner(loop_factory=HurriedLoop) as runner:
        return runner.run(main)
