"""Group commit for the embedded queue: many awaiting callers, one blocking call per batch.

Each SQLite commit costs an fsync and a trip through a worker thread. Under load, callers
that arrive while a batch is being written wait for the next one, so the number of commits
grows with time, not with traffic, and every caller still resumes only after *its* item was
committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs `operation(items)` in a worker thread for everything submitted meanwhile.

    `operation` returns one result per item, in order; a result that is an exception is
    raised to that item's caller. If `operation` itself raises, every caller of the batch gets
    the exception (the batch is one transaction: nothing of it was stored).
    """

    def __init__(
        self,
        operation: Callable[[Sequence[T]], Sequence[R | BaseException]],
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
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await asyncio.to_thread(self._operation, [item for item, _ in batch])
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
