"""Group commit for the embedded queue, and how the event loop calls the queue.

Each SQLite commit costs an fsync. Under load, callers that arrive while a batch is being
written wait for the next one, so the number of commits grows with time, not with traffic, and
every caller still resumes only after *its* item was committed.

`on_loop_unless_busy` makes a queue call on the event loop's own thread, and in a worker thread
only when the queue is busy and the call would have to wait. On a small virtual machine a trip
to a worker thread and back costs about 100 us of CPU (thread and loop wake-ups), more than the
SQLite work itself; an fsync of a few hundred microseconds holds the loop, and the requests
that arrive meanwhile make the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from .queue_rows import QueueBusyError

T = TypeVar("T")
R = TypeVar("R")


async def on_loop_unless_busy[R](
    call: Callable[..., R], *args: Any,
    in_thread: Mapping[str, Any] | None = None,
    track: set[asyncio.Task[R]] | None = None,
    **kwargs: Any,
) -> R:
    """`call(*args, wait=False, **kwargs)` here, on the loop; if the queue is busy (it raised
    `QueueBusyError` having done nothing), `call(*args, **kwargs, **in_thread)` in a worker
    thread, which may wait for it.

    A thread cannot be interrupted. With `track`, the thread's call is kept in it while it
    runs, and a cancellation of the caller leaves it there: whoever cancelled collects what
    it did (the local host's stop releases the messages a receive took)."""
    try:
        return call(*args, wait=False, **kwargs)
    except QueueBusyError:
        pass
    thread = asyncio.create_task(
        asyncio.to_thread(call, *args, **kwargs, **(in_thread or {})))
    if track is None:
        return await thread
    track.add(thread)
    try:
        result = await asyncio.shield(thread)
    except asyncio.CancelledError:
        raise  # it stays in `track`
    except BaseException:
        track.discard(thread)
        raise
    track.discard(thread)
    return result


class Batcher[T, R]:
    """Awaits `operation(items)` for everything submitted meanwhile.

    `operation` returns one result per item, in order; a result that is an exception is
    raised to that item's caller. If `operation` itself raises, every caller of the batch gets
    the exception (the batch is one transaction: nothing of it was stored).
    """

    def __init__(
        self,
        operation: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 256,
    ) -> None:
        self._operation = operation
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # callers resumed in this turn of the loop join the batch
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._operation([item for item, _ in batch])
            except BaseException as exc:  # the whole batch failed: tell every caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the caller went away; the item was still written
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
