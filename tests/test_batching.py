"""Group commit: concurrent callers share commits, and each learns its own item's fate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from shared.local.adapters import LocalQueuePublisher
from shared.local.batching import Batcher, on_loop_unless_busy
from shared.local.queue import LocalQueue
from shared.local.queue_rows import LockLostError, QueueBusyError
from shared.publisher import OutboundMessage, PublishError


class SlowDouble:
    """An operation that takes a little while, so callers pile up behind it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.release.wait(0.05)
        return [ValueError(f"negative {i}") if i < 0 else i * 2 for i in items]


def in_a_thread(op: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
    """A blocking operation as the batcher awaits it: in a worker thread."""
    return lambda items: asyncio.to_thread(op, items)


class TestBatcher:
    def test_callers_during_a_commit_share_the_next_one(self) -> None:
        op = SlowDouble()
        batcher: Batcher[int, int] = Batcher(in_a_thread(op))

        async def scenario() -> list[int]:
            return await asyncio.gather(*(batcher.submit(i) for i in range(50)))

        assert asyncio.run(scenario()) == [i * 2 for i in range(50)]
        assert sorted(i for batch in op.batches for i in batch) == list(range(50))
        assert len(op.batches) < 50

    def test_an_item_error_reaches_only_its_caller(self) -> None:
        batcher: Batcher[int, int] = Batcher(in_a_thread(SlowDouble()))

        async def scenario() -> list[int | BaseException]:
            return await asyncio.gather(*(batcher.submit(i) for i in (12, -1, 14)),
                                        return_exceptions=True)

        ok12, err, ok14 = asyncio.run(scenario())
        assert (ok12, ok14) == (24, 28)
        assert isinstance(err, ValueError) and str(err) == "negative -1"

    def test_a_failed_batch_fails_every_caller_and_the_next_batch_still_runs(self) -> None:
        calls: list[list[str]] = []

        def op(items: Sequence[str]) -> list[str]:
            calls.append(list(items))
            if "boom" in items:
                raise OSError("disk full")
            return [i.upper() for i in items]

        batcher: Batcher[str, str] = Batcher(in_a_thread(op), max_batch=2)

        async def scenario() -> list[str | BaseException]:
            return await asyncio.gather(*(batcher.submit(i) for i in ("a", "boom", "c")),
                                        return_exceptions=True)

        a, boom, c = asyncio.run(scenario())
        assert isinstance(a, OSError) and isinstance(boom, OSError)
        assert c == "C"
        assert calls == [["a", "boom"], ["c"]]


class TestOnLoopUnlessBusy:
    """`on_loop_unless_busy`: the call runs on the loop's thread with `wait=False`; when the queue
    says it is busy (having done nothing), again in a worker thread, allowed to wait."""

    def test_a_call_runs_on_the_loop_and_a_busy_one_again_in_a_worker_thread(self) -> None:
        calls: list[tuple[int, bool]] = []

        def call(x: int, *, wait: bool = True) -> int:
            calls.append((threading.get_ident(), wait))
            if x == 7 and not wait:
                raise QueueBusyError("would have to wait")
            return x * 2

        async def scenario() -> tuple[int, int, int]:
            return (await on_loop_unless_busy(call, 3), await on_loop_unless_busy(call, 7),
                    threading.get_ident())

        free, busy, loop_thread = asyncio.run(scenario())
        assert (free, busy) == (6, 14)
        (first, wait1), (second, wait2), (third, wait3) = calls
        assert (first, wait1) == (loop_thread, False)  # on the loop, never waiting
        assert (second, wait2) == (loop_thread, False)  # refused: busy
        assert third != loop_thread and wait3 is True  # retried in a worker, may wait

    def test_in_thread_arguments_reach_only_the_thread_and_track_holds_it_while_it_runs(
            self) -> None:
        """`in_thread` is for the worker thread's call alone; `track` holds that call while it
        runs, drops it when it returns or fails, and keeps it when the caller is cancelled
        (the thread runs on, and whoever cancelled collects its result)."""
        seen: list[dict[str, Any]] = []
        release = threading.Event()

        def call(x: int, *, wait: bool = True, **extra: Any) -> int:
            seen.append({"wait": wait, **extra})
            if not wait and x > 0:
                raise QueueBusyError("would have to wait")
            if x == 2:
                raise OSError("disk")
            if x == 3:
                release.wait(5)
            return x

        async def scenario() -> tuple[Any, ...]:
            track: set[asyncio.Task[int]] = set()
            on_loop = await on_loop_unless_busy(call, 0, in_thread={"tag": 1}, track=track)
            threaded = await on_loop_unless_busy(call, 1, in_thread={"tag": 1}, track=track)
            after_return = set(track)
            with pytest.raises(OSError):
                await on_loop_unless_busy(call, 2, track=track)
            after_failure = set(track)
            caller = asyncio.create_task(on_loop_unless_busy(call, 3, track=track))
            await asyncio.sleep(0)  # the caller runs until it awaits the thread, tracked
            running = set(track)
            assert running
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            kept = set(track)
            release.set()
            (thread,) = kept
            return (on_loop, threaded, after_return, after_failure, running == kept,
                    await thread)

        on_loop, threaded, after_return, after_failure, same, collected = asyncio.run(scenario())
        assert (on_loop, threaded) == (0, 1)
        assert seen[0] == {"wait": False}  # on the loop: no thread-only argument
        assert seen[1:3] == [{"wait": False}, {"wait": True, "tag": 1}]
        assert after_return == set() and after_failure == set()
        assert same and collected == 3  # cancelled caller: the thread's call stayed tracked

    def test_a_failed_batch_reaches_every_caller_of_it(self) -> None:
        async def failing(items: Sequence[int]) -> list[int | BaseException]:
            raise OSError("disk full")

        batcher: Batcher[int, int] = Batcher(failing)

        async def scenario() -> list[int | BaseException]:
            return await asyncio.gather(*(batcher.submit(i) for i in range(3)),
                                        return_exceptions=True)

        assert all(isinstance(r, OSError) for r in asyncio.run(scenario()))


class TestQueueBatches:
    def test_send_many_detects_duplicates_within_and_across_batches(self, tmp_path: Path) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        try:
            first = queue.send_many([(b"1", "a", None), (b"2", "b", {"k": "v"}), (b"3", "a", None)])
            assert first == [True, True, False]
            assert queue.send_many([(b"4", "b", None), (b"5", "c", None)]) == [False, True]
            bodies = [m.body for m in queue.receive(max_messages=10)]
            assert bodies == [b"1", b"2", b"5"]
        finally:
            queue.close()

    def test_send_many_is_all_or_nothing_on_invalid_input(self, tmp_path: Path) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        try:
            with pytest.raises(ValueError, match="message_id"):
                queue.send_many([(b"1", "a", None), (b"2", "", None)])
            assert queue.stats()["active"] == 0
        finally:
            queue.close()

    def test_complete_many_reports_lost_locks_per_token(self, tmp_path: Path) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        try:
            queue.send_many([(b"1", "a", None), (b"2", "b", None)])
            m1, m2 = queue.receive(max_messages=2)
            assert m1.lock_token and m2.lock_token
            results = queue.complete_many([m1.lock_token, "no-such-lock", m2.lock_token])
            assert results[0] is None and results[2] is None
            assert isinstance(results[1], LockLostError)
            assert queue.stats()["active"] == 0
        finally:
            queue.close()


class CountingQueue:
    def __init__(self, inner: LocalQueue) -> None:
        self.inner = inner
        self.calls = 0

    def send_many(
        self, messages: Sequence[tuple[bytes, str, dict[str, str]]], *, wait: bool = True
    ) -> list[bool]:
        self.calls += 1
        return self.inner.send_many(messages, wait=wait)


class TestLocalQueuePublisher:
    def test_concurrent_publishes_share_commits_and_are_all_stored(self, tmp_path: Path) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        counting = CountingQueue(queue)
        publisher = LocalQueuePublisher(counting)

        async def scenario() -> list[bool]:
            messages = [OutboundMessage(b"x%d" % i, f"m{i % 40}") for i in range(60)]
            return await asyncio.gather(*(publisher.publish(m) for m in messages))

        try:
            results = asyncio.run(scenario())
            assert results == [True] * 40 + [False] * 20
            assert counting.calls < 60
            assert queue.stats()["active"] == 40
        finally:
            queue.close()

    def test_a_failed_commit_is_a_publish_error_for_each_caller(self) -> None:
        class Broken:
            def send_many(self, messages: object, *, wait: bool = True) -> list[bool]:
                raise OSError("database is locked")

        publisher = LocalQueuePublisher(Broken())
        with pytest.raises(PublishError, match="database is locked"):
            asyncio.run(publisher.publish(OutboundMessage(b"{}", "id")))
