"""The threads that run plain (blocking) handlers, apart from everything else.

`asyncio.to_thread` would share the event loop's default executor (min(32, cores + 4) threads)
with the receiver, the queue and the SDKs: a few hung handlers would stall webhooks. These
threads are daemons, so a thread stuck in a handler is abandoned at shutdown instead of holding
the process (its message is redelivered, as in Azure).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context,
             Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the delivery timed out or the host stopped: nobody waits
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BlockingPool:
    """At most `threads` daemon threads, started as needed; `run` awaits a call in one."""

    def __init__(self, threads: int, *, name: str = "handler") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs no thread has taken yet

    @property
    def busy(self) -> int:
        """Threads running a call now (including any stuck in one)."""
        with self._lock:
            return self._started - self._idle

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a pool thread, with the caller's context (trace spans carry over).

        Cancelling the await abandons the call: its thread finishes it and the result is
        dropped; a call still queued is skipped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, contextvars.copy_context(), fn, args))
        with self._lock:
            self._queued += 1
            if self._queued > self._idle and self._started < self.threads:
                self._started += 1
                threading.Thread(target=self._work, daemon=True,
                                 name=f"{self._name}-{self._started}").start()
        return await future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            loop, future, context, fn, args = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if not future.cancelled():
                result: Any = None
                error: BaseException | None = None
                try:
                    result = context.run(fn, *args)
                except BaseException as exc:  # handed to the awaiting coroutine
                    error = exc
                try:
                    loop.call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:  # the loop is closed: the host has stopped
                    pass
