"""The Blob spill store against Azurite, through the real azure-storage-blob SDK.

Azurite (npm, pinned in package.json; `make test` runs `npm ci`) is started on a free loopback
port for this module and stopped at the end. Faults are injected for real: a loopback TCP proxy
that resets connections, and a closed loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import uuid
from typing import Any

import pytest
from azure.storage.blob.aio import ContainerClient

from shared.publisher import OutboundMessage
from shared.spill import (
    BlobSpillStore,
    SpillError,
    SpillingPublisher,
    blob_client_options,
    build_connection_string_spill_store,
    redrive,
    spill_name,
)

from .azurite import azurite_blob_port, connection_string
from .fakes import FailingPublisher, RecordingPublisher
from .support import free_port

__all__ = ["azurite_blob_port"]  # the fixture, used by name

# Generous: only a broken setup comes near this; it is not a performance target.
BOUND_SECONDS = 60.0


@pytest.fixture
def container_name() -> str:
    return f"spill-{uuid.uuid4().hex[:12]}"


def message(n: int) -> OutboundMessage:
    return OutboundMessage(
        body=b'{"eventId":"evt-%d","data":{"location":"secret"}}' % n,
        message_id=f"evt-{n}",
        application_properties={"eventType": "VEHICLE_STATE", "eventId": f"evt-{n}"},
    )


class ResettingProxy:
    """A loopback TCP proxy to Azurite that resets its first `resets` connections (RST after
    the request arrives), then forwards bytes both ways."""

    def __init__(self, target_port: int, *, resets: int) -> None:
        self.target_port = target_port
        self.resets_left = resets
        self.reset = 0
        self.forwarded = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ResettingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.resets_left > 0:
            self.resets_left -= 1
            await reader.read(1)  # the client has started its request
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            self.reset += 1
            return
        self.forwarded += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def container_exists(port: int, name: str) -> bool:
    cs = connection_string("blob", port)
    async with ContainerClient.from_connection_string(cs, name) as client:
        exists: bool = await client.exists()
        return exists


class TestSpillListRedriveDelete:
    def test_spilled_events_are_listed_oldest_first_redriven_and_deleted(
        self, azurite_blob_port: int, container_name: str
    ) -> None:
        async def scenario() -> None:
            store = build_connection_string_spill_store(
                connection_string("blob", azurite_blob_port), container_name
            )
            queue = RecordingPublisher()
            try:
                for n in range(3):
                    await store.put(message(n))
                    await asyncio.sleep(1.1)  # Last-Modified has one-second resolution
                await store.put(message(0))  # Smartcar's retry overwrites the one record
                names = await store.names(limit=10)
                assert len(names) == 3
                assert [(await store.get(name)).message_id for name in names] == [  # type: ignore[union-attr]
                    "evt-1", "evt-2", "evt-0"
                ]
                result = await redrive(store, queue)
                assert (result.sent, result.failed, result.unreadable) == (3, 0, 0)
                assert sorted(m.message_id for m in queue.sent) == ["evt-0", "evt-1", "evt-2"]
                sent = {m.message_id: m for m in queue.sent}
                assert sent["evt-2"] == message(2)  # raw body and properties unchanged
                assert await store.names(limit=10) == []
                await store.delete(names[0])  # already gone: not an error
            finally:
                await store.close()

        asyncio.run(scenario())


class TestPagedListing:
    def test_each_listing_is_the_next_page_then_the_first_again(
        self, azurite_blob_port: int, container_name: str
    ) -> None:
        """The SDK's pages and continuation tokens as the service gives them: a listing reads
        one page, the next listing the page after it, and after the last the first again."""

        async def scenario() -> None:
            cs = connection_string("blob", azurite_blob_port)
            store = BlobSpillStore(
                lambda: ContainerClient.from_connection_string(cs, container_name),
                list_page=2,
            )
            try:
                for n in range(5):
                    await store.put(message(n))
                listed = [list(await store.names(limit=10)) for _ in range(4)]
                assert [len(names) for names in listed] == [2, 2, 1, 2]
                assert sorted(name for names in listed[:3] for name in names) == sorted(
                    spill_name(f"evt-{n}") for n in range(5))
                assert sorted(listed[0]) == sorted(listed[3])
            finally:
                await store.close()

        asyncio.run(scenario())


class TestMissingContainer:
    def test_the_first_spill_creates_the_container(
        self, azurite_blob_port: int, container_name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def scenario() -> None:
            store = build_connection_string_spill_store(
                connection_string("blob", azurite_blob_port), container_name
            )
            try:
                assert not await container_exists(azurite_blob_port, container_name)
                assert await store.names(limit=10) == []  # nothing spilled yet: not an error
                assert await store.get("missing.json") is None
                await store.put(message(7))
                assert await container_exists(azurite_blob_port, container_name)
                (name,) = await store.names(limit=10)
                assert await store.get(name) == message(7)
            finally:
                await store.close()

        asyncio.run(scenario())
        # Once, and said: an operator seeing it more than once has a container that vanishes.
        assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "shared.spill"] == [
            (logging.WARNING, "spill container missing; creating it")]

    def test_a_container_created_meanwhile_by_another_instance_is_used(
        self, azurite_blob_port: int, container_name: str
    ) -> None:
        # Two instances spill the same event at once (Smartcar's retry reached the second) into
        # a container neither has seen: both find it missing, the other creates it and stores
        # the record first. This instance's create then finds it existing, and its write
        # replaces the record: the spill succeeds (a refused write was a 503 for an event that
        # was in fact stored).
        cs = connection_string("blob", azurite_blob_port)
        other = build_connection_string_spill_store(cs, container_name)

        class Raced:
            """The real ContainerClient; the other instance's spill runs just before its
            create_container."""

            def __init__(self) -> None:
                self.client = ContainerClient.from_connection_string(
                    cs, container_name, **blob_client_options())

            async def upload_blob(self, *args: Any, **kwargs: Any) -> Any:
                return await self.client.upload_blob(*args, **kwargs)

            async def create_container(self) -> Any:
                await other.put(message(5))
                return await self.client.create_container()

            async def close(self) -> None:
                await self.client.close()

        async def scenario() -> None:
            store = BlobSpillStore(Raced)
            try:
                await store.put(message(5))
                (name,) = await other.names(limit=10)
                assert await other.get(name) == message(5)
            finally:
                await store.close()
                await other.close()

        asyncio.run(scenario())


class TestTransientFailure:
    def test_a_reset_connection_is_retried_within_the_spill_budget(
        self, azurite_blob_port: int, container_name: str
    ) -> None:
        # Fault: the storage endpoint resets the first two connections of the upload (a proxy
        # in front of Azurite sends RST; aiohttp itself re-sends an idempotent request once, so
        # the second reset reaches the SDK's retry policy). The SDK's default policy waits
        # ~15 s before that retry, past the 5 s spill budget: the event got a 503. It must be
        # spilled.
        async def scenario() -> None:
            async with ContainerClient.from_connection_string(
                connection_string("blob", azurite_blob_port), container_name
            ) as admin:
                await admin.create_container()
            async with ResettingProxy(azurite_blob_port, resets=2) as proxy:
                store = build_connection_string_spill_store(
                    connection_string("blob", proxy.port), container_name
                )
                publisher = SpillingPublisher(FailingPublisher(), store)
                try:
                    assert await publisher.publish(message(3)) is True
                finally:
                    await publisher.close()
                assert proxy.reset == 2 and proxy.forwarded >= 1
            check = build_connection_string_spill_store(
                connection_string("blob", azurite_blob_port), container_name
            )
            try:
                (name,) = await check.names(limit=10)
                assert await check.get(name) == message(3)
            finally:
                await check.close()

        asyncio.run(scenario())


class TestUnreachableStorage:
    """Fault: nothing listens on the storage endpoint (a closed loopback port). Every
    operation fails with SpillError, and within a bounded time (a re-drive run used to take
    85 s to fail while the SDK retried the listing)."""

    def store(self) -> BlobSpillStore:
        return build_connection_string_spill_store(connection_string("blob", free_port()), "spill")

    def test_spilling_fails_with_spill_error(self) -> None:
        async def scenario() -> None:
            store = self.store()
            try:
                with pytest.raises(SpillError):
                    await asyncio.wait_for(store.put(message(1)), BOUND_SECONDS)
            finally:
                await store.close()

        asyncio.run(scenario())

    def test_listing_and_redrive_fail_with_spill_error(self) -> None:
        async def scenario() -> None:
            store = self.store()
            try:
                with pytest.raises(SpillError):
                    await asyncio.wait_for(store.names(limit=10), BOUND_SECONDS)
                with pytest.raises(SpillError):
                    await asyncio.wait_for(redrive(store, RecordingPublisher()), BOUND_SECONDS)
            finally:
                await store.close()

        asyncio.run(scenario())

    def test_a_listing_that_hangs_is_cut_off(self) -> None:
        # Fault: the endpoint accepts connections and never answers.
        async def scenario() -> None:
            async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()  # hold the connection open without answering

            server = await asyncio.start_server(silent, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            cs = connection_string("blob", port)
            store = BlobSpillStore(
                lambda: ContainerClient.from_connection_string(cs, "spill", **blob_client_options()),
                list_timeout=1.0,  # the production bound (30 s) is for real listings
            )
            try:
                with pytest.raises(SpillError) as err:
                    await asyncio.wait_for(store.names(limit=10), BOUND_SECONDS)
                # Cut off by the listing's own bound, not by the SDK giving up after retries.
                assert isinstance(err.value.__cause__, TimeoutError)
            finally:
                await store.close()
                server.close()

        asyncio.run(scenario())
