"""Spill-over and re-drive (shared/spill.py): nothing acknowledged is lost while the queue is down."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import NoReturn

import pytest

from shared.local.adapters import LocalQueuePublisher
from shared.local.host import index_functions, load_function_app
from shared.local.queue import LocalQueue
from shared.publisher import OutboundMessage, PublishError
from shared.spill import (
    BlobSpillStore,
    FileSpillStore,
    SpillError,
    SpillingPublisher,
    decode_record,
    encode_record,
    redrive,
    spill_name,
)

from .fakes import FailingPublisher, FakeContainerClient, RecordingPublisher

MESSAGE = OutboundMessage(
    body=b'{"eventId":"e1", "x": 1.0, "s": "\\u00e9"}',
    message_id="e1",
    application_properties={"eventId": "e1", "eventType": "VEHICLE_STATE"},
)


def message(n: int) -> OutboundMessage:
    return OutboundMessage(body=f'{{"eventId":"e{n}"}}'.encode(), message_id=f"e{n}",
                           application_properties={"eventId": f"e{n}"})


class HangingPublisher:
    async def publish(self, message: OutboundMessage) -> bool:
        await asyncio.sleep(3600)
        return True

    async def close(self) -> None:
        return None


class TestRecord:
    def test_round_trip_keeps_the_raw_body_id_and_properties(self) -> None:
        assert decode_record(encode_record(MESSAGE)) == MESSAGE

    @pytest.mark.parametrize(
        "data", [b"", b"not json", b"[]", b'{"version": 2}', b'{"version":1,"messageId":"a"}',
                 b'{"version":1,"messageId":"a","applicationProperties":{},"body":"!!"}']
    )
    def test_unreadable_records_raise_spill_error(self, data: bytes) -> None:
        with pytest.raises(SpillError, match="unreadable spill record"):
            decode_record(data)

    def test_one_name_per_message_id(self) -> None:
        assert spill_name("e1") == spill_name("e1") != spill_name("e2")


class TestFileSpillStore:
    def test_put_is_atomic_and_leaves_no_temp_file(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path / "spill")
        asyncio.run(store.put(MESSAGE))
        assert [p.name for p in (tmp_path / "spill").iterdir()] == [spill_name("e1")]
        assert asyncio.run(store.get(spill_name("e1"))) == MESSAGE

    def test_retries_of_one_event_overwrite_one_record(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        for _ in range(3):
            asyncio.run(store.put(MESSAGE))
        assert asyncio.run(store.names(limit=10)) == [spill_name("e1")]

    def test_stale_temp_files_are_removed_and_never_listed(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        stale, fresh = tmp_path / ".tmp-stale", tmp_path / ".tmp-fresh"
        stale.write_bytes(b"partial")
        fresh.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        assert asyncio.run(store.names(limit=10)) == []
        assert not stale.exists() and fresh.exists()

    def test_unwritable_directory_raises_spill_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(SpillError, match="spill write"):
            asyncio.run(FileSpillStore(blocker).put(MESSAGE))

    def test_get_and_delete_of_a_missing_record(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        assert asyncio.run(store.get("gone.json")) is None
        asyncio.run(store.delete("gone.json"))


class TestBlobSpillStore:
    def test_put_list_get_delete(self) -> None:
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container)

        async def scenario() -> None:
            await store.put(message(1))
            await store.put(message(2))
            names = await store.names(limit=10)
            assert names == [spill_name("e1"), spill_name("e2")]
            assert await store.get(names[0]) == message(1)
            await store.delete(names[0])
            await store.delete(names[0])  # another re-drive got there first: not an error
            assert await store.get(names[0]) is None
            await store.close()

        asyncio.run(scenario())
        assert container.closed

    def test_upload_failure_raises_spill_error(self) -> None:
        container = FakeContainerClient(fail_with=ConnectionError("storage unreachable"))
        with pytest.raises(SpillError, match="ConnectionError"):
            asyncio.run(BlobSpillStore(lambda: container).put(MESSAGE))

    def test_download_failure_is_a_spill_error_so_redrive_keeps_the_record(self) -> None:
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container)
        asyncio.run(store.put(MESSAGE))
        container.fail_with = ConnectionError("storage unreachable")

        async def failing_download(name: str) -> NoReturn:
            raise ConnectionError("storage unreachable")

        container.download_blob = failing_download  # type: ignore[method-assign]
        with pytest.raises(SpillError, match="ConnectionError"):
            asyncio.run(store.get(spill_name("e1")))

    def test_client_is_created_once_and_reused(self) -> None:
        made: list[FakeContainerClient] = []

        def factory() -> FakeContainerClient:
            made.append(FakeContainerClient())
            return made[-1]

        store = BlobSpillStore(factory)
        asyncio.run(store.put(message(1)))
        asyncio.run(store.put(message(2)))
        assert len(made) == 1 and len(made[0].blobs) == 2


class TestSpillingPublisher:
    def test_queue_first_nothing_spilled_when_it_works(self, tmp_path: Path) -> None:
        primary = RecordingPublisher()
        publisher = SpillingPublisher(primary, FileSpillStore(tmp_path))
        assert asyncio.run(publisher.publish(MESSAGE)) is True
        assert primary.sent == [MESSAGE] and not list(tmp_path.iterdir())

    def test_queue_failure_spills(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        assert asyncio.run(SpillingPublisher(FailingPublisher(), store).publish(MESSAGE))
        assert asyncio.run(store.get(spill_name("e1"))) == MESSAGE

    def test_hanging_queue_spills_within_the_time_budget(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        publisher = SpillingPublisher(HangingPublisher(), store, primary_timeout=0.05)
        assert asyncio.run(publisher.publish(MESSAGE))
        assert asyncio.run(store.names(limit=10)) == [spill_name("e1")]

    def test_both_failing_raises_publish_error(self) -> None:
        store = BlobSpillStore(lambda: FakeContainerClient(fail_with=OSError("disk")))
        with pytest.raises(PublishError, match=r"queue failed .* and spill failed"):
            asyncio.run(SpillingPublisher(FailingPublisher(), store).publish(MESSAGE))

    def test_duplicate_answer_of_the_queue_passes_through(self, tmp_path: Path) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        publisher = SpillingPublisher(LocalQueuePublisher(queue), FileSpillStore(tmp_path / "s"))
        assert asyncio.run(publisher.publish(MESSAGE)) is True
        assert asyncio.run(publisher.publish(MESSAGE)) is False
        queue.close()


class TestRedrive:
    def spilled(self, tmp_path: Path, count: int) -> FileSpillStore:
        store = FileSpillStore(tmp_path)
        for n in range(count):
            asyncio.run(store.put(message(n)))
        return store

    def test_sends_with_the_original_message_id_then_deletes(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 5)
        target = RecordingPublisher()
        result = asyncio.run(redrive(store, target))
        assert (result.sent, result.failed, result.stopped) == (5, 0, False)
        assert sorted(m.message_id for m in target.sent) == [f"e{n}" for n in range(5)]
        assert asyncio.run(store.names(limit=10)) == []

    def test_a_failed_send_keeps_the_record_and_stops_the_run(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 20)
        target = RecordingPublisher(fail_after=3)
        result = asyncio.run(redrive(store, target, concurrency=1))
        assert result.sent == 3 and result.failed == 1 and result.stopped
        assert len(asyncio.run(store.names(limit=100))) == 17
        # Every record still there was never sent: deleted only after a successful send.
        remaining = {asyncio.run(store.get(n)).message_id for n in asyncio.run(store.names(limit=100))}  # type: ignore[union-attr]
        assert remaining.isdisjoint(m.message_id for m in target.sent)

    def test_queue_still_down_keeps_everything(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 4)
        target = FailingPublisher()
        result = asyncio.run(redrive(store, target))
        assert result.sent == 0 and result.stopped
        assert len(asyncio.run(store.names(limit=10))) == 4

    def test_unreadable_record_is_kept_not_deleted(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 1)
        (tmp_path / "corrupt.json").write_bytes(b"{oops")
        result = asyncio.run(redrive(store, RecordingPublisher()))
        assert (result.sent, result.unreadable) == (1, 1)
        assert (tmp_path / "corrupt.json").exists()

    def test_time_budget_stops_the_run(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 3)
        ticks = iter(range(0, 1000, 100))
        result = asyncio.run(redrive(store, RecordingPublisher(), time_budget=150,
                                     concurrency=1, clock=lambda: float(next(ticks))))
        assert result.stopped and result.sent < 3

    def test_concurrent_redrives_queue_each_message_once(self, tmp_path: Path) -> None:
        # Several instances re-driving at once: at-least-once sends, and the queue's duplicate
        # detection on message_id keeps one copy of each.
        store = self.spilled(tmp_path / "spill", 30)
        queue = LocalQueue(tmp_path / "q.sqlite3")
        target = LocalQueuePublisher(queue)

        async def scenario() -> None:
            await asyncio.gather(*(redrive(store, target) for _ in range(4)))

        asyncio.run(scenario())
        assert queue.stats()["active"] == 30
        assert asyncio.run(store.names(limit=100)) == []
        queue.close()

    def test_blob_store_redrive(self) -> None:
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container)
        for n in range(3):
            asyncio.run(store.put(message(n)))
        target = RecordingPublisher()
        assert asyncio.run(redrive(store, target)).sent == 3
        assert container.blobs == {}


class TestTimerFunction:
    def test_function_app_declares_the_redrive_timer(self) -> None:
        _, _, timers = index_functions(load_function_app())
        assert [(t.name, t.schedule) for t in timers if t.name == "redrive_spilled"] == [
            ("redrive_spilled", "0 */1 * * * *")]

    def test_the_local_host_runs_it(self, tmp_path: Path) -> None:
        from shared.events import peek_envelope
        from shared.publisher import outbound_message

        from .support import RunningHost, encode, local_env, state_event, wait_until

        body = encode(state_event())
        spilled = outbound_message(body, peek_envelope(body))
        with RunningHost(local_env(tmp_path), timer_interval=0.05) as host:
            spill = host.runtime.spill
            assert spill is not None
            asyncio.run(spill.put(spilled))
            wait_until(lambda: [r["messageId"] for r in host.handled()] == [spilled.message_id])
            # Deleted once its send returned: the handler may run before that.
            wait_until(lambda: not list((tmp_path / "spill").glob("*.json")), timeout=5)
