"""Group commit for the embedded queue: many awaiting callers, one blocking call per batch.

Each SQLite commit costs an fsync. Under load, callers that arrive while a batch is being
written wait for the next one, so the number of commits grows with time, not with traffic, and
every caller still resumes only after *its* item was committed.

With `try_inline`, a batch is first tried on the event loop's own thread, and goes to a worker
thread only when that would have to wait (the callable returns None). On a small virtual
machine a trip to a worker thread and back costs about 100 us of CPU (thread and loop
wake-ups), more than the SQLite work itself; an fsync of a few hundred microseconds holds the
loop, and the requests that arrive meanwhile make the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs `operation(items)` in a worker thread for everything submitted meanwhile, or
    `try_inline(items)` on the loop when given and it does not return None.

    `operation` returns one result per item, in order; a result that is an exception is
    raised to that item's caller. If `operation` itself raises, every caller of the batch gets
    the exception (the batch is one transaction: nothing of it was stored).
    """

    def __init__(
        self,
        operation: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 256,
        try_inline: Callable[[Sequence[T]], Sequence[R | BaseException] | None] | None = None,
    ) -> None:
        self._operation = operation
        self._max_batch = max_batch
        self._try_inline = try_inline
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        if self._try_inline is not None:
            await asyncio.sleep(0)  # callers resumed in this turn of the loop join the batch
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            items = [item for item, _ in batch]
            try:
                results = self._try_inline(items) if self._try_inline is not None else None
                if results is None:
                    results = await asyncio.to_thread(self._operation, items)
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
