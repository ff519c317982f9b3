"""The threads that run plain (blocking) handlers, apart from everything else.

`asyncio.to_thread` would share the event loop's default executor (min(32, cores + 4) threads)
with the receiver, the queue and the SDKs: a few hung handlers would stall webhooks. These
threads are daemons, so a thread stuck in a handler is abandoned at shutdown instead of holding
the process (its message is redelivered, as in Azure).

A thread can be stuck for good in a handler that timed out (a call without a timeout of its
own). Its caller has given up, so it no longer counts toward the pool's `threads`: another is
started in its place, up to `limit` threads in all. Once every thread the limit allows is stuck
the pool is `exhausted`, and the local host stops taking messages until one returns (they stay
in the queue) instead of failing deliveries whose handlers could never start.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any


class DeliveryJobs:
    """Counts one delivery's calls that wait for a thread (`CURRENT_DELIVERY`): at its timeout,
    the host tells a handler that never started from one that hung."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = 0


#: Set by the local host for each delivery; `BlockingPool.run` counts its waiting calls there.
CURRENT_DELIVERY: contextvars.ContextVar[DeliveryJobs | None] = contextvars.ContextVar(
    "CURRENT_DELIVERY", default=None)


class _Job:
    __slots__ = ("abandoned", "args", "context", "delivery", "fn", "future", "loop", "running")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any],
                 fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.loop = loop
        self.future = future
        self.context = contextvars.copy_context()
        self.fn = fn
        self.args = args
        self.delivery = CURRENT_DELIVERY.get()
        self.running = False
        self.abandoned = False


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the delivery timed out or the host stopped: nobody waits
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BlockingPool:
    """`threads` daemon threads at work at most, started as needed; `run` awaits a call in
    one. Threads stuck in calls their callers gave up on are replaced, up to `limit` threads
    (default: twice `threads`)."""

    def __init__(self, threads: int, *, limit: int | None = None, name: str = "handler") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        limit = 2 * threads if limit is None else limit
        if limit < threads:
            raise ValueError(f"limit must be >= threads ({threads}), got {limit}")
        self.threads = threads
        self.limit = limit
        self._name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs no thread has taken yet
        self._stuck = 0  # threads still running a call whose caller gave up

    @property
    def busy(self) -> int:
        """Threads running a call now (including any stuck in one)."""
        with self._lock:
            return self._started - self._idle

    @property
    def stuck(self) -> int:
        """Threads still running a call whose caller gave up (a handler that timed out)."""
        with self._lock:
            return self._stuck

    @property
    def exhausted(self) -> bool:
        """Every thread the limit allows is stuck: no call can start until one returns."""
        with self._lock:
            return self._stuck >= self.limit

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a pool thread, with the caller's context (trace spans carry over).

        Cancelling the await abandons the call: its thread finishes it and the result is
        dropped (the thread is counted as stuck meanwhile, and replaced); a call still queued
        is skipped.
        """
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), fn, args)
        with self._lock:
            if job.delivery is not None:
                job.delivery.waiting += 1
            self._queued += 1
            self._jobs.put(job)
            self._start_thread_if_needed()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._lock:
                if job.running and not job.abandoned:
                    job.abandoned = True
                    self._stuck += 1
                    # Calls already queued behind it get the replacement now, not at the
                    # next `run` (which may never come) or their own timeout.
                    self._start_thread_if_needed()
            raise

    def _start_thread_if_needed(self) -> None:
        """Start a thread when a queued call has no idle thread to take it, fewer than
        `threads` are at work on calls someone awaits, and the limit allows. Under the lock."""
        if (self._queued > self._idle and self._started - self._stuck < self.threads
                and self._started < self.limit):
            self._started += 1
            threading.Thread(target=self._work, daemon=True,
                             name=f"{self._name}-{self._started}").start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
                if job.delivery is not None:
                    job.delivery.waiting -= 1
                if job.future.cancelled():
                    continue
                job.running = True
            result: Any = None
            error: BaseException | None = None
            try:
                result = job.context.run(job.fn, *job.args)
            except Exception as exc:  # handed to the awaiting coroutine
                error = exc
            except BaseException as exc:
                # SystemExit (sys.exit in a library, argparse) or the like, raised in this
                # thread: awaited as it is, it would stop the event loop and the whole host
                # or worker. Only this call fails.
                error = RuntimeError(f"handler raised {exc!r} in a pool thread")
                error.__cause__ = exc
            with self._lock:
                job.running = False
                if job.abandoned:
                    self._stuck -= 1
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the loop is closed: the host has stopped
                pass
