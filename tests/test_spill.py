"""Spill-over and re-drive (shared/spill.py): nothing acknowledged is lost while the queue is down."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import ContainerClient, LinearRetry

from shared import telemetry_names as names
from shared.credentials import ProcessCredential
from shared.local.adapters import LocalQueuePublisher
from shared.local.app_functions import index_functions
from shared.local.command import load_function_app
from shared.local.queue import LocalQueue
from shared.publisher import OutboundMessage, Publisher, PublishError
from shared.spill import (
    BlobSpillStore,
    FileSpillStore,
    SpillError,
    SpillingPublisher,
    blob_client_options,
    build_blob_spill_store,
    build_connection_string_spill_store,
    decode_record,
    encode_record,
    redrive,
    spill_name,
)
from shared.telemetry import set_telemetry

from .azurite import connection_string
from .fakes import (
    FailingPublisher,
    FakeContainerClient,
    FakeDownloader,
    FakePageIterator,
    ManualClock,
    RecordingPublisher,
)
from .hurried import run_hurried
from .otel_capture import Captured

MESSAGE = OutboundMessage(
    body=b'{"eventId":"e1", "x": 1.0, "s": "\\u00e9"}',
    message_id="e1",
    application_properties={"eventId": "e1", "eventType": "VEHICLE_STATE"},
)
#: A body with something private in it: no log line may ever show it.
LOCATION = "52.520008,13.404954"
PRIVATE = OutboundMessage(
    body=b'{"eventId":"e1","data":{"location":"%s"}}' % LOCATION.encode(),
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


# -- time budgets on the loop's clock ------------------------------------------------------------
#: Longer than any budget under test: an operation without its budget runs into this one.
NO_BUDGET = 3600.0


async def given_up_after(operation: Awaitable[object]) -> tuple[float, BaseException]:
    """How long (loop seconds) `operation` ran before it raised, and what it raised."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.wait_for(operation, NO_BUDGET)
    except Exception as exc:
        return loop.time() - started, exc
    raise AssertionError("the operation ended without an error")


async def forever() -> NoReturn:
    """A call that never answers (a stalled connection, a held write lock)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


# -- boundaries ----------------------------------------------------------------------------------
@dataclass
class StallingDownloader(FakeDownloader):
    async def readall(self) -> bytes:
        return await forever()


@dataclass
class StallingContainer(FakeContainerClient):
    """The Blob client of a storage account whose calls named in `stalls` never answer; it
    notes the loop time of each call."""

    stalls: set[str] = field(default_factory=set)
    called_at: dict[str, float] = field(default_factory=dict)

    async def _call(self, operation: str) -> None:
        self.called_at[operation] = asyncio.get_running_loop().time()
        if operation in self.stalls:
            await forever()

    async def upload_blob(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        await self._call("upload_blob")
        await super().upload_blob(name, data, overwrite=overwrite)

    async def download_blob(self, name: str) -> FakeDownloader:
        await self._call("download_blob")
        downloader = await super().download_blob(name)
        if "readall" in self.stalls:
            return StallingDownloader(downloader.data)
        return downloader

    async def delete_blob(self, name: str) -> None:
        await self._call("delete_blob")
        await super().delete_blob(name)


@dataclass
class ListedBlob:
    name: str
    last_modified: datetime | None


@dataclass
class ListingContainer(FakeContainerClient):
    """The Blob client listing the given blobs, in the given (service) order."""

    listed: list[ListedBlob] = field(default_factory=list)

    def listing(self) -> list[Any]:
        return list(self.listed)


class FirstPageOnly(FakePageIterator):
    """Pages after the first never answer."""

    served = False

    async def __anext__(self) -> AsyncIterator[Any]:
        if self.served:
            await forever()
        self.served = True
        return await super().__anext__()


@dataclass
class HugeBacklogContainer(FakeContainerClient):
    """A container holding more spilled records than a listing gets through in its time."""

    page_iterator = FirstPageOnly


class LateStoringQueue:
    """The local queue while another process holds its write lock: a send outlives the time
    budget (or, with `refuse`, fails at once), and `stored_late` (`LateStoreCheck`) answers
    afterwards whether it was stored after all: `answer` (an exception is raised; None: it
    never answers)."""

    def __init__(self, answer: bool | Exception | None, *, refuse: bool = False) -> None:
        self.answer = answer
        self.refuse = refuse
        self.asked: list[str] = []
        self.cancelled = False
        self.closed = False

    async def publish(self, message: OutboundMessage) -> bool:
        if self.refuse:
            raise PublishError("local queue send failed: OperationalError: database is locked")
        return await forever()

    async def stored_late(self, message_id: str) -> bool:
        self.asked.append(message_id)
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer is None:
            try:
                await forever()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return bool(self.answer)

    async def close(self) -> None:
        self.closed = True


def logged(log: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    """Every record logged (any logger): its logger, level and message as a reader sees it."""
    return [(r.name, r.levelno, r.getMessage()) for r in log.records]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of shared.spill from DEBUG up (and what any other logger logs)."""
    caplog.set_level(logging.DEBUG, logger="shared.spill")
    return caplog


@pytest.fixture
def counted(otel: Captured) -> Iterator[Callable[[str], float]]:
    """The process's telemetry on an in-memory meter: the total of one counter so far."""
    set_telemetry(otel.telemetry)
    try:
        yield otel.total
    finally:
        set_telemetry(None)


class TestRecord:
    def test_round_trip_keeps_the_raw_body_id_and_properties(self) -> None:
        assert decode_record(encode_record(MESSAGE)) == MESSAGE

    def test_a_record_is_one_compact_sorted_line_that_says_when_it_was_spilled(self) -> None:
        """The exact layout: compact, keys sorted (the properties too), and `spilledAt`, the
        epoch seconds of the spill, so an operator reading a record that waits in the container
        sees how long it has waited. A round trip cannot tell: decoding ignores all three."""
        spilled = OutboundMessage(body=b'{"eventId":"e1"}', message_id="e1",
                                  application_properties={"eventType": "VEHICLE_STATE",
                                                          "eventId": "e1"})
        before = time.time()
        data = encode_record(spilled)
        after = time.time()
        spilled_at = json.loads(data)["spilledAt"]
        assert type(spilled_at) is float and before <= spilled_at <= after
        assert data == (
            b'{"applicationProperties":{"eventId":"e1","eventType":"VEHICLE_STATE"},'
            b'"body":"' + base64.b64encode(spilled.body) + b'","messageId":"e1",'
            b'"spilledAt":' + repr(spilled_at).encode() + b',"version":1}'
        )

    @pytest.mark.parametrize(
        "data", [b"", b"not json", b'{"version":1,"messageId":"a"}',
                 b'{"version":1,"messageId":"a","applicationProperties":{},"body":"!!"}']
    )
    def test_unreadable_records_raise_spill_error(self, data: bytes) -> None:
        with pytest.raises(SpillError, match="unreadable spill record"):
            decode_record(data)

    @pytest.mark.parametrize(
        ("record", "reason"),
        [
            ([], "expected a version 1 spill record"),
            ({"version": 2}, "expected a version 1 spill record"),
            ({"version": 1, "messageId": "a", "applicationProperties": [], "body": ""},
             "applicationProperties must map strings to strings"),
            ({"version": 1, "messageId": "a", "applicationProperties": "eventId=a", "body": ""},
             "applicationProperties must map strings to strings"),
            ({"version": 1, "messageId": "a", "applicationProperties": {"eventId": 1},
              "body": ""}, "applicationProperties must map strings to strings"),
            ({"version": 1, "messageId": "", "applicationProperties": {}, "body": ""},
             "messageId must be a non-empty string"),
            ({"version": 1, "messageId": 5, "applicationProperties": {}, "body": ""},
             "messageId must be a non-empty string"),
        ],
    )
    def test_an_unreadable_record_says_what_is_wrong(self, record: object, reason: str) -> None:
        """A record re-drive cannot send is kept and logged with this reason, for whoever
        repairs it by hand; a record that is almost right (a number where a property string
        should be, an empty id) must not be sent as if it were right."""
        with pytest.raises(SpillError) as err:
            decode_record(json.dumps(record).encode())
        assert str(err.value) == f"unreadable spill record: {reason}"
        assert isinstance(err.value.__cause__, ValueError)

    def test_one_name_per_message_id(self) -> None:
        assert spill_name("e1") == spill_name("e1") != spill_name("e2")


class TestFileSpillStore:
    def test_put_is_atomic_and_leaves_no_temp_file(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path / "spill")
        asyncio.run(store.put(MESSAGE))
        assert [p.name for p in (tmp_path / "spill").iterdir()] == [spill_name("e1")]
        assert asyncio.run(store.get(spill_name("e1"))) == MESSAGE

    def test_the_first_spill_creates_the_missing_state_directory(self, tmp_path: Path) -> None:
        """On a fresh machine `LOCAL_STATE_DIR` may not exist yet when the queue first fails:
        the spill creates it, parents and all, rather than answering 503."""
        store = FileSpillStore(tmp_path / "state" / "spill")
        asyncio.run(store.put(MESSAGE))
        assert asyncio.run(store.get(spill_name("e1"))) == MESSAGE

    def test_retries_of_one_event_overwrite_one_record(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        for _ in range(3):
            asyncio.run(store.put(MESSAGE))
        assert asyncio.run(store.names(limit=10)) == [spill_name("e1")]

    def test_a_failed_write_reports_its_own_error_and_leaves_no_temp_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The rename fails after its temp file is already gone: the store reports the write's
        error (what an operator must fix), not a FileNotFoundError from cleaning up."""
        failure = OSError(errno.EIO, "Input/output error")

        def replace(src: Any, dst: Any) -> None:
            os.unlink(src)
            raise failure

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(SpillError) as err:
            asyncio.run(FileSpillStore(tmp_path).put(MESSAGE))
        assert str(err.value) == f"spill write to {tmp_path} failed: {failure}"
        assert err.value.__cause__ is failure
        assert list(tmp_path.iterdir()) == []

    def test_stale_temp_files_are_removed_and_never_listed(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        stale, fresh = tmp_path / ".tmp-stale", tmp_path / ".tmp-fresh"
        stale.write_bytes(b"partial")
        fresh.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        assert asyncio.run(store.names(limit=10)) == []
        assert not stale.exists() and fresh.exists()

    def test_a_temp_file_is_stale_only_after_more_than_ten_minutes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A temp file belongs to a write that may still be under way: it is removed once it
        is more than 600 s old (the clock is fixed, so "exactly 600 s" is exact)."""
        now_s = 2_000_000_000
        monkeypatch.setattr("shared.spill.time", SimpleNamespace(time=lambda: float(now_s)))
        ages_ms = {".tmp-600000": 600_000, ".tmp-600001": 600_001}
        for name, age_ms in ages_ms.items():
            (tmp_path / name).write_bytes(b"partial")
            mtime_ns = now_s * 10**9 - age_ms * 10**6
            os.utime(tmp_path / name, ns=(mtime_ns, mtime_ns))
        assert asyncio.run(FileSpillStore(tmp_path).names(limit=10)) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-600000"]

    def test_a_stale_temp_file_removed_meanwhile_is_not_an_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two re-drive runs overlap and both sweep the same stale temp file: the second finds
        it gone, and still lists the records."""
        store = FileSpillStore(tmp_path)
        asyncio.run(store.put(MESSAGE))
        stale = tmp_path / ".tmp-stale"
        stale.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        real_scandir = os.scandir

        def scandir(path: Any) -> Iterator[os.DirEntry[str]]:
            with real_scandir(path) as it:
                entries = list(it)
            for entry in entries:
                if entry.name == stale.name:
                    entry.stat()  # what the sweep read (DirEntry keeps it) ...
                    stale.unlink()  # ... before the other run removed the file
                yield entry

        monkeypatch.setattr(os, "scandir", scandir)
        assert asyncio.run(store.names(limit=10)) == [spill_name("e1")]

    def test_a_record_that_vanishes_while_listing_is_skipped_not_the_rest(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another re-drive deletes a record between this run's directory read and its stat:
        that record is skipped, and the records after it are still listed."""
        store = FileSpillStore(tmp_path)
        for n in range(3):
            asyncio.run(store.put(message(n)))
        vanished = spill_name("e0")
        real_scandir = os.scandir

        def scandir(path: Any) -> Iterator[os.DirEntry[str]]:
            with real_scandir(path) as it:
                entries = sorted(it, key=lambda entry: entry.name != vanished)
            for entry in entries:
                if entry.name == vanished:
                    os.unlink(entry.path)
                yield entry

        monkeypatch.setattr(os, "scandir", scandir)
        assert sorted(asyncio.run(store.names(limit=10))) == sorted(
            [spill_name("e1"), spill_name("e2")])

    def test_names_are_the_oldest_records_up_to_the_limit(self, tmp_path: Path) -> None:
        """One re-drive run takes a bounded batch, the oldest first."""
        store = FileSpillStore(tmp_path)
        for n, age in ((0, 20), (1, 10), (2, 30)):
            asyncio.run(store.put(message(n)))
            mtime = time.time() - age
            os.utime(tmp_path / spill_name(f"e{n}"), (mtime, mtime))
        assert asyncio.run(store.names(limit=2)) == [spill_name("e2"), spill_name("e0")]

    def test_unwritable_directory_raises_spill_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(SpillError, match="spill write"):
            asyncio.run(FileSpillStore(blocker).put(MESSAGE))

    def test_a_record_that_cannot_be_read_is_a_spill_error_naming_it(self, tmp_path: Path) -> None:
        """Re-drive keeps and logs what it cannot read; the message names the record and why."""
        (tmp_path / "odd.json").mkdir()
        with pytest.raises(SpillError) as err:
            asyncio.run(FileSpillStore(tmp_path).get("odd.json"))
        assert isinstance(err.value.__cause__, IsADirectoryError)
        assert str(err.value) == f"spill read of odd.json failed: {err.value.__cause__}"

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

    def test_a_retry_of_one_event_overwrites_its_record(self) -> None:
        """Smartcar retries an event it got no 200 for; each retry that is spilled again
        replaces the one record (the Blob service refuses a second write to a name unless
        told to overwrite)."""
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container)
        asyncio.run(store.put(MESSAGE))
        asyncio.run(store.put(MESSAGE))
        assert list(container.blobs) == [spill_name("e1")]
        assert asyncio.run(store.get(spill_name("e1"))) == MESSAGE

    def test_upload_failure_raises_spill_error(self) -> None:
        container = FakeContainerClient(fail_with=ConnectionError("storage unreachable"))
        with pytest.raises(SpillError, match="ConnectionError"):
            asyncio.run(BlobSpillStore(lambda: container).put(MESSAGE))

    @pytest.mark.parametrize(
        ("stalled", "expected"),
        [
            ("upload_blob", "SpillError: spill upload failed: TimeoutError"),
            ("download_blob", f"SpillError: spill download of {spill_name('e1')} failed: "
                              "TimeoutError"),
            ("readall", f"SpillError: spill download of {spill_name('e1')} failed: TimeoutError"),
            ("delete_blob", "TimeoutError: "),
        ],
    )
    def test_each_storage_call_gives_up_after_five_seconds(self, stalled: str,
                                                           expected: str) -> None:
        """A stalled storage connection costs at most 5 s per call: the spill must fit in the
        webhook's budget (Smartcar waits 15 s), and a re-drive run must move on."""
        container = StallingContainer()
        store = BlobSpillStore(lambda: container)
        asyncio.run(store.put(MESSAGE))
        container.stalls = {stalled}
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            "upload_blob": lambda: store.put(MESSAGE),
            "download_blob": lambda: store.get(spill_name("e1")),
            "readall": lambda: store.get(spill_name("e1")),
            "delete_blob": lambda: store.delete(spill_name("e1")),
        }
        elapsed, error = run_hurried(given_up_after(operations[stalled]()))
        assert elapsed == pytest.approx(5.0)
        assert f"{type(error).__name__}: {error}" == expected

    def test_the_budget_per_call_is_the_stores_timeout(self) -> None:
        container = StallingContainer(stalls={"upload_blob"})
        store = BlobSpillStore(lambda: container, timeout=0.5)
        elapsed, error = run_hurried(given_up_after(store.put(MESSAGE)))
        assert elapsed == pytest.approx(0.5) and isinstance(error, SpillError)

    def test_a_not_found_that_is_not_the_container_is_a_plain_failure(self) -> None:
        """Only the service's ContainerNotFound means "create the container"; any other
        not-found (one without an error code, as azure-core raises it) fails the spill, named."""
        container = FakeContainerClient(fail_with=ResourceNotFoundError("no such resource"))
        store = BlobSpillStore(lambda: container)
        with pytest.raises(SpillError) as err:
            asyncio.run(store.put(MESSAGE))
        assert str(err.value) == "spill upload failed: ResourceNotFoundError"
        with pytest.raises(SpillError) as err:
            asyncio.run(store.names(limit=10))
        assert str(err.value) == "listing spilled records failed: ResourceNotFoundError"

    def test_a_failed_listing_names_the_error_type(self) -> None:
        container = FakeContainerClient(fail_with=ConnectionError("storage unreachable"))
        with pytest.raises(SpillError) as err:
            asyncio.run(BlobSpillStore(lambda: container).names(limit=10))
        assert str(err.value) == "listing spilled records failed: ConnectionError"

    def test_listing_is_oldest_first_then_by_name_with_undated_blobs_last(self) -> None:
        """Re-drive sends the records that waited longest first; blobs listed without a
        Last-Modified time come after the dated ones, never in the way of them."""
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        container = ListingContainer(listed=[
            ListedBlob("b.json", t0 + timedelta(seconds=1)),
            ListedBlob("z.json", None),
            ListedBlob("a.json", t0 + timedelta(seconds=1)),
            ListedBlob("c.json", None),
            ListedBlob("d.json", t0),
        ])
        store = BlobSpillStore(lambda: container)
        assert asyncio.run(store.names(limit=10)) == [
            "d.json", "a.json", "b.json", "c.json", "z.json"]
        assert asyncio.run(store.names(limit=3)) == ["d.json", "a.json", "b.json"]

    def test_a_listing_is_one_page_of_five_thousand(self) -> None:
        container = FakeContainerClient()
        asyncio.run(BlobSpillStore(lambda: container).names(limit=1000))
        assert container.list_calls == [5000] and container.markers == [None]

    def test_each_listing_is_the_page_after_the_last_one_then_the_first_again(self) -> None:
        """Listing time and memory are one page's whatever the backlog; the pages come in
        turn, so no record is left behind by the records a run keeps (unreadable, refused)."""
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container, list_page=3)
        for n in (6, 1, 4, 0, 5, 2, 3):  # spilled in this order: e6 is the oldest
            asyncio.run(store.put(message(n)))
        by_name = sorted(container.blobs)
        age = {spill_name(f"e{n}"): rank for rank, n in enumerate((6, 1, 4, 0, 5, 2, 3))}
        pages = [by_name[0:3], by_name[3:6], by_name[6:7], by_name[0:3]]
        listed = [list(asyncio.run(store.names(limit=2))) for _ in pages]
        assert listed == [sorted(page, key=age.__getitem__)[:2] for page in pages]
        assert container.list_calls == [3, 3, 3, 3]
        assert container.markers == [None, by_name[3], by_name[6], None]

    def test_a_failed_listing_starts_the_next_one_from_the_first_page(self) -> None:
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container, list_page=1)
        for n in range(3):
            asyncio.run(store.put(message(n)))
        first = asyncio.run(store.names(limit=10))
        container.fail_with = ConnectionError("storage unreachable")
        with pytest.raises(SpillError):
            asyncio.run(store.names(limit=10))
        container.fail_with = None
        assert asyncio.run(store.names(limit=10)) == first
        assert container.markers == [None, None]

    def test_a_backlog_too_large_to_list_in_time_is_still_redriven(self) -> None:
        """12,000 spilled records and a listing that could never get past the first page: the
        run sends the oldest 1,000 of that page (it used to list the whole container, time out
        and send nothing)."""
        container = HugeBacklogContainer()
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        for n in range(12_000):
            container.blobs[spill_name(f"e{n}")] = encode_record(message(n))
            container.modified[spill_name(f"e{n}")] = t0 + timedelta(seconds=n)
        first_page = sorted(container.blobs)[:5000]
        target = RecordingPublisher()
        result = run_hurried(redrive(BlobSpillStore(lambda: container), target))
        assert (result.sent, result.failed, result.stopped) == (1000, 0, False)
        assert [spill_name(m.message_id) for m in target.sent] == sorted(
            first_page, key=container.modified.__getitem__)[:1000]
        assert len(container.blobs) == 11_000

    def test_deleting_a_blob_already_gone_is_logged_at_debug(
        self, log: pytest.LogCaptureFixture
    ) -> None:
        asyncio.run(BlobSpillStore(FakeContainerClient).delete("gone.json"))
        assert logged(log) == [("shared.spill", logging.DEBUG,
                                   "spilled blob gone.json was already deleted (another re-drive)")]

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


#: A connection string in Azurite's form; nothing listens there, nothing is sent.
DEV_CONNECTION_STRING = connection_string("blob", 10000)


def sdk_settings(client: Any) -> dict[str, Any]:
    """What the azure-storage-blob SDK made of a client's options: the retry policy in its
    request pipeline and its transport's socket timeouts (azure-core's ConnectionConfiguration)."""
    retry = client._config.retry_policy
    assert any(policy is retry for policy in client._pipeline._impl_policies)
    connection = client._pipeline._transport.connection_config
    return {"policy": type(retry).__name__, "retries": retry.total_retries,
            "backoff": getattr(retry, "backoff", None), "jitter": retry.random_jitter_range,
            "connection_timeout": connection.timeout, "read_timeout": connection.read_timeout}


#: What the spill budget needs (see blob_client_options): 3 retries 0.25 +- 0.1 s apart, 2 s to
#: connect and 3 s to read per attempt.
FITS_THE_BUDGET = {"policy": LinearRetry.__name__, "retries": 3, "backoff": 0.25, "jitter": 0.1,
                   "connection_timeout": 2, "read_timeout": 3}


class TestBlobClients:
    """The Blob clients the app builds: real `azure.storage.blob.aio` clients, configured so
    that the SDK's own retries fit the spill budget. Built without network: a client makes no
    request until it is used."""

    def test_the_sdk_takes_the_options_as_meant(self) -> None:
        """The SDK silently ignores a keyword it does not know: a misspelled option would leave
        its defaults in place (a first retry after ~15 s, past the 5-s budget: a 503)."""
        async def scenario() -> None:
            async with ContainerClient.from_connection_string(DEV_CONNECTION_STRING, "c") as sdk:
                # The default the options replace: exponential, the first retry after ~15 s.
                retry: Any = sdk._config.retry_policy
                assert retry.initial_backoff == 15
                assert sdk_settings(sdk) != FITS_THE_BUDGET
            async with ContainerClient.from_connection_string(
                DEV_CONNECTION_STRING, "c", **blob_client_options()
            ) as client:
                assert sdk_settings(client) == FITS_THE_BUDGET

        asyncio.run(scenario())

    def test_the_production_store_uses_the_account_and_the_process_credential(self) -> None:
        credential = ProcessCredential("11111111-2222-3333-4444-555555555555")
        store = build_blob_spill_store("https://stabc123.blob.core.windows.net", "spill",
                                       credential)

        async def scenario() -> None:
            try:
                client = store._container()  # created on first use, without I/O
                assert isinstance(client, ContainerClient)
                assert client.url == "https://stabc123.blob.core.windows.net/spill"
                assert client.container_name == "spill"
                assert client.credential is credential.get()
                assert sdk_settings(client) == FITS_THE_BUDGET
            finally:
                await store.close()
                await credential.close()

        asyncio.run(scenario())

    def test_the_local_store_uses_the_connection_string(self) -> None:
        store = build_connection_string_spill_store(DEV_CONNECTION_STRING, "spill")

        async def scenario() -> None:
            try:
                client = store._container()
                assert isinstance(client, ContainerClient)
                assert client.url == "http://127.0.0.1:10000/devstoreaccount1/spill"
                assert client.container_name == "spill"
                assert client.account_name == "devstoreaccount1"
                assert sdk_settings(client) == FITS_THE_BUDGET
            finally:
                await store.close()

        asyncio.run(scenario())


class TestSpillingPublisher:
    def test_queue_first_nothing_spilled_when_it_works(self, tmp_path: Path) -> None:
        primary = RecordingPublisher()
        publisher = SpillingPublisher(primary, FileSpillStore(tmp_path))
        assert asyncio.run(publisher.publish(MESSAGE)) is True
        assert primary.sent == [MESSAGE] and not list(tmp_path.iterdir())

    def test_queue_failure_spills(self, tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
        """A 200 for a spilled event, and one warning naming the message and what the queue
        raised (its type: the body never appears in a log)."""
        store = FileSpillStore(tmp_path)
        assert asyncio.run(SpillingPublisher(FailingPublisher(), store).publish(PRIVATE)) is True
        assert asyncio.run(store.get(spill_name("e1"))) == PRIVATE
        assert logged(log) == [("shared.spill", logging.WARNING,
                                   "queue unavailable (PublishError); message e1 spilled for "
                                   "re-drive")]
        assert LOCATION not in log.text

    def test_hanging_queue_spills_within_the_time_budget(self, tmp_path: Path) -> None:
        store = FileSpillStore(tmp_path)
        publisher = SpillingPublisher(HangingPublisher(), store, primary_timeout=0.05)
        assert asyncio.run(publisher.publish(MESSAGE))
        assert asyncio.run(store.names(limit=10)) == [spill_name("e1")]

    def test_the_queue_gets_five_seconds_then_the_event_is_spilled(
        self, log: pytest.LogCaptureFixture
    ) -> None:
        """The default budgets: 5 s for the queue, then 5 s for the spill, so both together
        stay well inside Smartcar's 15-s response timeout."""
        container = StallingContainer()
        publisher = SpillingPublisher(HangingPublisher(), BlobSpillStore(lambda: container))

        async def scenario() -> float:
            started = asyncio.get_running_loop().time()
            assert await publisher.publish(PRIVATE) is True
            return container.called_at["upload_blob"] - started

        assert run_hurried(scenario()) == pytest.approx(5.0)
        assert logged(log) == [("shared.spill", logging.WARNING,
                                   "queue unavailable (TimeoutError); message e1 spilled for "
                                   "re-drive")]

    def test_the_spill_store_gets_five_seconds(self, log: pytest.LogCaptureFixture) -> None:
        container = StallingContainer(stalls={"upload_blob"})
        store = BlobSpillStore(lambda: container, timeout=NO_BUDGET)  # the publisher's own bound
        publisher = SpillingPublisher(FailingPublisher(), store)
        elapsed, error = run_hurried(given_up_after(publisher.publish(PRIVATE)))
        assert elapsed == pytest.approx(5.0)
        assert isinstance(error, PublishError)
        assert str(error) == ("queue failed (Service Bus send failed: ServiceBusConnectionError) "
                              "and spill failed (TimeoutError)")
        assert logged(log) == [("shared.spill", logging.ERROR,
                                   "message e1 could not be queued (PublishError) nor spilled "
                                   "(TimeoutError)")]

    def test_a_503_comes_within_ten_seconds_when_queue_and_spill_both_hang(self) -> None:
        container = StallingContainer(stalls={"upload_blob"})
        publisher = SpillingPublisher(HangingPublisher(), BlobSpillStore(lambda: container))
        elapsed, error = run_hurried(given_up_after(publisher.publish(PRIVATE)))
        assert elapsed == pytest.approx(10.0)
        assert str(error) == "queue failed (TimeoutError) and spill failed (TimeoutError)"

    def test_both_failing_raises_publish_error(self, log: pytest.LogCaptureFixture) -> None:
        """The receiver answers 503 (Smartcar retries) with an error that says what each side
        raised; the log line names the message and the two exception types, never the body."""
        store = BlobSpillStore(lambda: FakeContainerClient(fail_with=OSError("disk")))
        with pytest.raises(PublishError) as err:
            asyncio.run(SpillingPublisher(FailingPublisher(), store).publish(PRIVATE))
        assert str(err.value) == ("queue failed (Service Bus send failed: "
                                  "ServiceBusConnectionError) and spill failed (spill upload "
                                  "failed: OSError)")
        assert isinstance(err.value.__cause__, SpillError)
        assert logged(log) == [("shared.spill", logging.ERROR,
                                   "message e1 could not be queued (PublishError) nor spilled "
                                   "(SpillError)")]
        assert LOCATION not in log.text

    def test_an_error_without_a_message_is_named_by_its_type(self) -> None:
        class SilentQueue(FailingPublisher):
            async def publish(self, message: OutboundMessage) -> bool:
                raise PublishError()

        store = BlobSpillStore(lambda: FakeContainerClient(fail_with=OSError("disk")))
        with pytest.raises(PublishError) as err:
            asyncio.run(SpillingPublisher(SilentQueue(), store).publish(MESSAGE))
        assert str(err.value) == ("queue failed (PublishError) and spill failed (spill upload "
                                  "failed: OSError)")

    def test_each_spilled_event_is_counted_once(
        self, tmp_path: Path, counted: Callable[[str], float]
    ) -> None:
        """The spilled-webhooks metric (an alert watches it) counts events in the spill store:
        not those the queue took, nor those neither could take (they got a 503)."""
        async def scenario() -> None:
            await SpillingPublisher(RecordingPublisher(), FileSpillStore(tmp_path)).publish(
                message(1))
            await SpillingPublisher(FailingPublisher(), FileSpillStore(tmp_path)).publish(
                message(2))
            store = BlobSpillStore(lambda: FakeContainerClient(fail_with=OSError("disk")))
            with pytest.raises(PublishError):
                await SpillingPublisher(FailingPublisher(), store).publish(message(3))

        asyncio.run(scenario())
        assert counted(names.WEBHOOK_SPILLED) == 1

    def test_duplicate_answer_of_the_queue_passes_through(self, tmp_path: Path) -> None:
        queue = LocalQueue(tmp_path / "q.sqlite3")
        publisher = SpillingPublisher(LocalQueuePublisher(queue), FileSpillStore(tmp_path / "s"))
        assert asyncio.run(publisher.publish(MESSAGE)) is True
        assert asyncio.run(publisher.publish(MESSAGE)) is False
        queue.close()

    # -- a send that timed out may still have been stored (LateStoreCheck) ----------------------
    def late_store(self, queue: Publisher, container: FakeContainerClient) -> SpillingPublisher:
        """Publish PRIVATE (spilled), then let the follow-up run (it waits for no timer: the
        loop finishes it before its clock moves on)."""
        publisher = SpillingPublisher(queue, BlobSpillStore(lambda: container))

        async def scenario() -> None:
            assert await publisher.publish(PRIVATE) is True
            await asyncio.sleep(1)

        run_hurried(scenario())
        return publisher

    def test_a_send_stored_after_its_timeout_has_its_spilled_copy_deleted(
        self, log: pytest.LogCaptureFixture
    ) -> None:
        """Else a re-drive after the duplicate window (a restart an hour later) would queue
        the event a second time, and it would be handled twice."""
        queue, container = LateStoringQueue(True), FakeContainerClient()
        self.late_store(queue, container)
        assert queue.asked == ["e1"]
        assert container.blobs == {}
        assert logged(log) == [
            ("shared.spill", logging.WARNING,
             "queue unavailable (TimeoutError); message e1 spilled for re-drive"),
            ("shared.spill", logging.INFO,
             "message e1 was stored after its send timed out; its spilled copy is deleted"),
        ]

    def test_a_send_not_stored_after_its_timeout_keeps_its_spilled_copy(
        self, log: pytest.LogCaptureFixture
    ) -> None:
        queue, container = LateStoringQueue(False), FakeContainerClient()
        self.late_store(queue, container)
        assert queue.asked == ["e1"]
        assert list(container.blobs) == [spill_name("e1")]
        assert logged(log) == [("shared.spill", logging.WARNING,
                                   "queue unavailable (TimeoutError); message e1 spilled for "
                                   "re-drive")]

    @pytest.mark.parametrize("failing", ["stored_late", "delete"])
    def test_a_late_store_check_that_fails_keeps_the_copy_and_says_why(
        self, failing: str, log: pytest.LogCaptureFixture
    ) -> None:
        """The copy stays (a re-drive within the duplicate window drops the duplicate); the
        warning names the message and the exception type, never the body."""
        answer: bool | Exception = True
        container = FakeContainerClient()
        if failing == "stored_late":
            answer, error = sqlite3.OperationalError("disk I/O error"), "OperationalError"
        else:
            async def failing_delete(name: str) -> NoReturn:
                raise ConnectionError("storage unreachable")

            container.delete_blob = failing_delete  # type: ignore[method-assign]
            error = "ConnectionError"
        self.late_store(LateStoringQueue(answer), container)
        assert list(container.blobs) == [spill_name("e1")]
        assert logged(log) == [
            ("shared.spill", logging.WARNING,
             "queue unavailable (TimeoutError); message e1 spilled for re-drive"),
            ("shared.spill", logging.WARNING,
             f"could not check whether spilled message e1 was stored late: {error}"),
        ]
        assert LOCATION not in log.text

    def test_only_a_timed_out_send_is_checked_later(self, log: pytest.LogCaptureFixture) -> None:
        """A send that failed (rather than kept waiting) stored nothing: nothing to check."""
        queue, container = LateStoringQueue(True, refuse=True), FakeContainerClient()
        self.late_store(queue, container)
        assert queue.asked == []
        assert list(container.blobs) == [spill_name("e1")]
        assert logged(log) == [("shared.spill", logging.WARNING,
                                   "queue unavailable (PublishError); message e1 spilled for "
                                   "re-drive")]

    def test_a_queue_that_cannot_tell_is_not_asked(self, log: pytest.LogCaptureFixture) -> None:
        """Service Bus has no `stored_late`: a timed-out send there is left to the queue's
        duplicate detection, without a failing follow-up."""
        container = FakeContainerClient()
        self.late_store(HangingPublisher(), container)
        assert list(container.blobs) == [spill_name("e1")]
        assert logged(log) == [("shared.spill", logging.WARNING,
                                   "queue unavailable (TimeoutError); message e1 spilled for "
                                   "re-drive")]

    def test_close_cancels_a_pending_check_and_closes_both_sides(self) -> None:
        queue, container = LateStoringQueue(None), FakeContainerClient()
        publisher = SpillingPublisher(queue, BlobSpillStore(lambda: container))

        async def scenario() -> None:
            assert await publisher.publish(PRIVATE) is True
            await asyncio.sleep(1)
            assert queue.asked == ["e1"] and not queue.cancelled
            await publisher.close()
            await asyncio.sleep(1)
            assert queue.cancelled

        run_hurried(scenario())
        assert queue.closed and container.closed
        assert list(container.blobs) == [spill_name("e1")]


class GatedQueue:
    """A queue that holds every send until `open` is set, counting the sends in flight."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.in_flight = 0
        self.peak = 0
        self.sent: list[OutboundMessage] = []

    async def publish(self, message: OutboundMessage) -> bool:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await self.open.wait()
        self.in_flight -= 1
        self.sent.append(message)
        return True

    async def close(self) -> None:
        return None


class PacedQueue(RecordingPublisher):
    """Each send takes `seconds` on the injected clock."""

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        super().__init__()
        self.clock = clock
        self.seconds = seconds

    async def publish(self, message: OutboundMessage) -> bool:
        self.clock.now += self.seconds
        return await super().publish(message)


class RefusingQueue(RecordingPublisher):
    """A working queue that refuses the messages with the given ids, as Service Bus refuses a
    message over its size limit."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__()
        self.refused = refused

    async def publish(self, message: OutboundMessage) -> bool:
        await asyncio.sleep(0)  # sends in flight at once finish in any order
        if message.message_id in self.refused:
            raise PublishError("Service Bus send failed: MessageSizeExceededError")
        return await super().publish(message)


class TestRedrive:
    def spilled(self, tmp_path: Path, count: int) -> FileSpillStore:
        store = FileSpillStore(tmp_path)
        for n in range(count):
            asyncio.run(store.put(message(n)))
        return store

    def blob_spilled(self, count: int) -> tuple[BlobSpillStore, FakeContainerClient]:
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container)
        for n in range(count):
            asyncio.run(store.put(message(n)))
        return store, container

    def test_sends_with_the_original_message_id_then_deletes(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 5)
        target = RecordingPublisher()
        result = asyncio.run(redrive(store, target))
        assert (result.sent, result.failed, result.stopped) == (5, 0, False)
        assert sorted(m.message_id for m in target.sent) == [f"e{n}" for n in range(5)]
        assert asyncio.run(store.names(limit=10)) == []

    def test_one_run_takes_at_most_a_thousand_records_oldest_first(self) -> None:
        """A backlog is worked off over several runs (one a minute), each bounded."""
        store, container = self.blob_spilled(1001)
        target = RecordingPublisher()
        result = asyncio.run(redrive(store, target))
        assert (result.sent, result.failed, result.stopped) == (1000, 0, False)
        assert list(container.blobs) == [spill_name("e1000")]  # the newest waits

    def test_eight_sends_are_in_flight_at_once(self) -> None:
        """Enough sends at once to work off a backlog within a run, few enough not to flood
        the queue (or the local host's write lock) that just came back."""
        store, _ = self.blob_spilled(20)
        queue = GatedQueue()

        async def scenario() -> int:
            run = asyncio.create_task(redrive(store, queue))
            await asyncio.sleep(1)  # every send that can start has started
            held = queue.in_flight
            queue.open.set()
            assert (await run).sent == 20
            return held

        assert run_hurried(scenario()) == 8
        assert queue.peak == 8 and len(queue.sent) == 20

    def test_sixteen_failed_sends_in_a_row_keep_their_records_and_stop_the_run(
        self, tmp_path: Path
    ) -> None:
        """The queue went down after three sends: the run stops at the sixteenth failure in a
        row (the twentieth record is not tried), and every record not sent is kept."""
        store = self.spilled(tmp_path, 20)
        target = RecordingPublisher(fail_after=3)
        result = asyncio.run(redrive(store, target, concurrency=1))
        assert (result.sent, result.failed, result.refused, result.stopped) == (3, 16, 0, True)
        assert len(asyncio.run(store.names(limit=100))) == 17
        # Every record still there was never sent: deleted only after a successful send.
        remaining = {asyncio.run(store.get(n)).message_id for n in asyncio.run(store.names(limit=100))}  # type: ignore[union-attr]
        assert remaining.isdisjoint(m.message_id for m in target.sent)

    def test_sends_already_in_flight_when_one_fails_are_each_counted(
        self, log: pytest.LogCaptureFixture
    ) -> None:
        store, container = self.blob_spilled(2)

        class DownQueue(RecordingPublisher):
            def __init__(self) -> None:
                super().__init__()
                self.both = asyncio.Barrier(2)

            async def publish(self, message: OutboundMessage) -> bool:
                await self.both.wait()  # both sends under way before either fails
                raise PublishError("the queue is unavailable")

        result = run_hurried(redrive(store, DownQueue(), failures_to_stop=1))
        assert (result.sent, result.failed, result.stopped) == (0, 2, True)
        assert len(container.blobs) == 2
        assert sorted(r.getMessage() for r in log.records if r.levelno == logging.WARNING) == [
            f"re-drive of e{n} failed (the queue is unavailable); retrying next run"
            for n in range(2)
        ]

    def test_queue_still_down_keeps_everything(self, tmp_path: Path) -> None:
        """Sixteen failures, then the sends already in flight: a down queue costs a run
        at most 16 + 7 sends, not one per record."""
        store = self.spilled(tmp_path, 40)
        target = FailingPublisher()
        result = asyncio.run(redrive(store, target))
        assert (result.sent, result.refused, result.stopped) == (0, 0, True)
        assert result.failed == target.calls and 16 <= target.calls <= 23
        assert len(asyncio.run(store.names(limit=100))) == 40

    def test_a_record_the_queue_refuses_does_not_hold_back_the_others(
        self, tmp_path: Path, log: pytest.LogCaptureFixture
    ) -> None:
        """The oldest record is one the queue always refuses (a body over its message size
        limit): every run sends all the others, keeps it, and names it, by message id only."""
        store = FileSpillStore(tmp_path)
        asyncio.run(store.put(PRIVATE))
        old = time.time() - 100
        os.utime(tmp_path / spill_name(PRIVATE.message_id), (old, old))  # the oldest record
        for n in range(2, 42):
            asyncio.run(store.put(message(n)))
        target = RefusingQueue({PRIVATE.message_id})
        result = asyncio.run(redrive(store, target))
        assert (result.sent, result.failed, result.refused, result.stopped) == (40, 1, 1, False)
        assert asyncio.run(store.names(limit=100)) == [spill_name(PRIVATE.message_id)]
        assert asyncio.run(store.get(spill_name(PRIVATE.message_id))) == PRIVATE
        assert [line for line in logged(log) if line[1] >= logging.WARNING] == [
            ("shared.spill", logging.WARNING, "re-drive of e1 failed (Service Bus send failed: "
                                              "MessageSizeExceededError); retrying next run"),
            ("shared.spill", logging.ERROR, "spilled message e1 was refused by the queue while "
                                            "it took others; kept for the next run"),
        ]
        assert LOCATION not in log.text

    def test_refused_records_together_stop_no_run(self, tmp_path: Path) -> None:
        """Fifteen refused records side by side, oldest of all, sent at once: a run still
        sends every other record."""
        store = self.spilled(tmp_path, 40)
        target = RefusingQueue({f"e{n}" for n in range(15)})
        result = asyncio.run(redrive(store, target))
        assert (result.sent, result.failed, result.refused, result.stopped) == (25, 15, 15, False)
        assert len(asyncio.run(store.names(limit=100))) == 15

    def test_a_successful_send_starts_the_count_of_failures_again(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 40)
        target = RefusingQueue({f"e{n}" for n in range(40) if n % 16})  # 15 refused, 1 sent
        result = asyncio.run(redrive(store, target, concurrency=1))
        assert (result.sent, result.failed, result.refused, result.stopped) == (3, 37, 30, False)
        assert len(asyncio.run(store.names(limit=100))) == 37

    def test_a_failure_followed_by_none_sent_is_not_counted_as_refused(
        self, tmp_path: Path, log: pytest.LogCaptureFixture
    ) -> None:
        """Only a send that succeeds after a failure tells that the queue works."""
        store = self.spilled(tmp_path, 3)
        target = RefusingQueue({"e2"})
        result = asyncio.run(redrive(store, target, concurrency=1))
        assert (result.sent, result.failed, result.refused, result.stopped) == (2, 1, 0, False)
        assert [line for line in logged(log) if line[1] >= logging.ERROR] == []

    def test_unreadable_record_is_kept_not_deleted(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 1)
        (tmp_path / "corrupt.json").write_bytes(b"{oops")
        result = asyncio.run(redrive(store, RecordingPublisher()))
        assert (result.sent, result.unreadable) == (1, 1)
        assert (tmp_path / "corrupt.json").exists()

    def test_a_run_says_what_it_did_record_by_record_and_in_sum(
        self, log: pytest.LogCaptureFixture, counted: Callable[[str], float]
    ) -> None:
        """The log lines an operator reads after an outage: each record kept and why, the
        send that failed, and one summary line; the re-driven metric counts what was sent."""
        container = FakeContainerClient()
        store = BlobSpillStore(lambda: container)

        async def scenario() -> Any:
            for n in (1, 2):
                await store.put(message(n))
            for n in (1, 2, 3):
                await container.upload_blob(f"bad-{n}.json", b'{"version": 2}')
            for n in (3, 4):
                await store.put(message(n))
            return await redrive(store, RecordingPublisher(fail_after=2), concurrency=1,
                                 failures_to_stop=1)

        result = asyncio.run(scenario())
        assert (result.sent, result.failed, result.unreadable, result.stopped) == (2, 1, 3, True)
        kept = ("kept, it cannot be re-driven: unreadable spill record: expected a version 1 "
                "spill record")
        assert logged(log) == [
            *[("shared.spill", logging.ERROR, f"spilled record bad-{n}.json {kept}")
              for n in (1, 2, 3)],
            ("shared.spill", logging.WARNING,
             "re-drive of e3 failed (the queue is unavailable); retrying next run"),
            ("shared.spill", logging.INFO, "re-drive: 2 sent, 1 failed, 3 unreadable, 7 listed"),
        ]
        assert counted(names.SPILL_REDRIVEN) == 2

    def test_a_record_sent_but_not_deleted_is_logged_by_name_and_error_type(
        self, log: pytest.LogCaptureFixture
    ) -> None:
        """Sent already: a later run sends it again, and the queue drops the duplicate."""
        store, container = self.blob_spilled(1)

        async def failing_delete(name: str) -> NoReturn:
            raise ConnectionError("storage unreachable")

        container.delete_blob = failing_delete  # type: ignore[method-assign]
        result = asyncio.run(redrive(store, RecordingPublisher()))
        assert (result.sent, result.failed, result.stopped) == (1, 0, False)
        assert logged(log) == [
            ("shared.spill", logging.WARNING,
             f"spilled record {spill_name('e0')} was sent but not deleted: ConnectionError"),
            ("shared.spill", logging.INFO, "re-drive: 1 sent, 0 failed, 0 unreadable, 1 listed"),
        ]

    def test_an_empty_store_is_a_quiet_run(
        self, log: pytest.LogCaptureFixture, counted: Callable[[str], float]
    ) -> None:
        result = asyncio.run(redrive(BlobSpillStore(FakeContainerClient), RecordingPublisher()))
        assert result == type(result)(sent=0, failed=0, unreadable=0, stopped=False)
        assert logged(log) == [] and counted(names.SPILL_REDRIVEN) == 0

    def test_time_budget_stops_the_run(self, tmp_path: Path) -> None:
        store = self.spilled(tmp_path, 3)
        ticks = iter(range(0, 1000, 100))
        result = asyncio.run(redrive(store, RecordingPublisher(), time_budget=150,
                                     concurrency=1, clock=lambda: float(next(ticks))))
        assert result.stopped and result.sent < 3

    @pytest.mark.parametrize(("seconds_per_send", "sent"), [(120.0, 3), (120.25, 2)])
    def test_a_run_starts_no_send_more_than_four_minutes_in(
        self, seconds_per_send: float, sent: int
    ) -> None:
        """The timer function has five minutes: a send may start until 240 s after the run
        started (exactly 240 s is still in), none later."""
        store, _ = self.blob_spilled(4)
        clock = ManualClock(1000.0)
        result = asyncio.run(redrive(store, PacedQueue(clock, seconds_per_send),
                                     concurrency=1, clock=clock))
        assert (result.sent, result.stopped) == (sent, True)

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
