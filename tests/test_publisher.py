"""The Service Bus publisher: fake client and sender at the SDK boundary, real logic."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.credentials import ProcessCredential
from shared.events import peek_envelope
from shared.publisher import (
    DEAD_LETTER_COPY_SUFFIX,
    MAX_MESSAGE_ID_LENGTH,
    OutboundMessage,
    PublishError,
    ServiceBusPublisher,
    build_service_bus_publisher,
    dead_letter_copy_id,
    message_id_for,
    outbound_message,
)
from shared.receiver import receive
from shared.signature import sign
from shared.spill import FileSpillStore, SpillingPublisher
from shared.tokens import StaticTokenProvider

from .fakes import FakeSender, FakeServiceBusClient
from .hurried import run_hurried
from .support import encode, fixture_bytes, state_event


def make_publisher() -> tuple[ServiceBusPublisher, list[FakeServiceBusClient]]:
    clients: list[FakeServiceBusClient] = []

    def factory() -> FakeServiceBusClient:
        client = FakeServiceBusClient()
        clients.append(client)
        return client

    return ServiceBusPublisher(factory, "smartcar-events", send_timeout=1.0), clients


class TestMessageShape:
    def test_raw_body_message_id_and_properties(self) -> None:
        publisher, clients = make_publisher()
        body = fixture_bytes("vehicle_state.json")  # pretty-printed: must stay byte-identical
        asyncio.run(publisher.publish(outbound_message(body, peek_envelope(body))))
        (sent,) = clients[0].senders[0].sent
        assert b"".join(sent.body) == body
        assert sent.message_id == "550e8400-e29b-41d4-a716-446655440000"
        assert dict(sent.application_properties) == {
            "eventId": "550e8400-e29b-41d4-a716-446655440000",
            "eventType": "VEHICLE_STATE",
            "vehicleId": "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2",
            "webhookId": "abde94ff-d57d-43b9-8d09-6020db2d977a",
            "deliveryId": "48b25f8f-9fea-42e1-9085-81043682cbb8",
            "mode": "LIVE",
        }
        assert clients[0].queue_names == ["smartcar-events"]

    def test_body_without_event_id_gets_a_body_hash_id(self) -> None:
        body = b"not json"
        expected = "sha256:" + hashlib.sha256(body).hexdigest()
        assert message_id_for(body, None) == expected
        assert outbound_message(body, peek_envelope(body)).message_id == expected

    def test_event_id_with_a_lone_surrogate_falls_back_to_the_body_hash(self) -> None:
        body = b'{"eventId": "\\ud800", "eventType": "VEHICLE_STATE", "vehicleId": "\\udfff"}'
        message = outbound_message(body, peek_envelope(body))
        assert message.message_id.startswith("sha256:")
        assert "vehicleId" not in message.application_properties

    def test_over_long_event_id_falls_back_to_the_body_hash(self) -> None:
        assert message_id_for(b"x", "e" * 129).startswith("sha256:")
        assert message_id_for(b"x", "e" * 128) == "e" * 128

    def test_vehicle_id_property_comes_from_data_vehicle_when_not_top_level(self) -> None:
        body = fixture_bytes("vehicle_state_top_level_triggers.json")
        message = outbound_message(body, peek_envelope(body))
        assert message.application_properties["vehicleId"] == "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"


class TestClientReuse:
    def test_one_client_and_sender_for_many_sends(self) -> None:
        publisher, clients = make_publisher()

        async def scenario() -> None:
            await asyncio.gather(
                *(
                    publisher.publish(outbound_message(b, peek_envelope(b)))
                    for b in (encode(state_event()) for _ in range(20))
                )
            )

        asyncio.run(scenario())
        assert len(clients) == 1
        assert len(clients[0].senders) == 1
        assert len(clients[0].senders[0].sent) == 20


class TestFailures:
    def test_send_failure_raises_publish_error_and_reconnects(self) -> None:
        publisher, clients = make_publisher()
        body = encode(state_event())
        message = outbound_message(body, peek_envelope(body))

        async def scenario() -> None:
            await publisher.publish(message)
            clients[0].senders[0].fail_with = ConnectionError("link detached")
            with pytest.raises(PublishError, match="ConnectionError"):
                await publisher.publish(message)
            assert clients[0].senders[0].closed
            await publisher.publish(message)  # a fresh sender on the same client

        asyncio.run(scenario())
        assert len(clients) == 1
        assert len(clients[0].senders) == 2
        assert len(clients[0].senders[1].sent) == 1

    def test_hanging_send_times_out_as_publish_error(self) -> None:
        publisher = ServiceBusPublisher(lambda: OneSender(SlowSender(60)), "q",
                                        send_timeout=0.05)
        body = encode(state_event())
        with pytest.raises(PublishError, match="TimeoutError"):
            asyncio.run(publisher.publish(outbound_message(body, peek_envelope(body))))

    def test_send_failure_maps_to_503_through_the_receiver(self) -> None:
        publisher, clients = make_publisher()
        body = encode(state_event())

        async def scenario() -> int:
            await publisher._get_sender()
            clients[0].senders[0].fail_with = ConnectionError("namespace unreachable")
            reply = await receive(
                body,
                {"SC-Signature": sign("amt", body)},
                tokens=StaticTokenProvider("amt"),
                publisher=publisher,
                max_body_bytes=196608,
            )
            assert json.loads(reply.body_bytes()) == {"error": "event could not be stored, retry later"}
            return reply.status

        assert asyncio.run(scenario()) == 503


class SlowSender:
    """Sends after `seconds` of loop time (a `HurriedLoop`'s, in the budget tests)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sent: list[object] = []

    async def send_messages(self, message: object) -> None:
        await asyncio.sleep(self.seconds)
        self.sent.append(message)

    async def close(self) -> None:
        return None


class OneSender:
    def __init__(self, sender: object) -> None:
        self.sender = sender

    def get_queue_sender(self, queue_name: str) -> object:
        return self.sender


def _message() -> OutboundMessage:
    body = encode(state_event())
    return outbound_message(body, peek_envelope(body))


class TestSendBudget:
    """A send ends within `send_timeout` (5 s by default), well inside Smartcar's 15 s: a
    queue that hangs must become a 503 (or a spill), never a webhook that times out."""

    @pytest.mark.parametrize(("seconds", "stored"), [(4.9, True), (5.1, False)])
    def test_the_default_budget_is_five_seconds(self, seconds: float, stored: bool) -> None:
        sender = SlowSender(seconds)
        publisher = ServiceBusPublisher(lambda: OneSender(sender), "q")

        async def publish() -> bool:
            try:
                return await publisher.publish(_message())
            except PublishError as exc:
                assert str(exc) == "Service Bus send failed: TimeoutError"
                return False

        assert run_hurried(publish()) is stored
        assert len(sender.sent) == int(stored)

    @pytest.mark.parametrize(("seconds", "stored"), [(0.9, True), (1.1, False)])
    def test_send_raw_keeps_the_same_budget(self, seconds: float, stored: bool) -> None:
        # The processor's dead-letter copies and scheduled retries go through `send_raw`.
        sender = SlowSender(seconds)
        publisher = ServiceBusPublisher(lambda: OneSender(sender), "q", send_timeout=1.0)

        async def send() -> bool:
            try:
                await publisher.send_raw(object())
            except PublishError as exc:
                assert str(exc) == "Service Bus send failed: TimeoutError"
                return False
            return True

        assert run_hurried(send()) is stored


class TestWhatTheSdkSees:
    def test_the_message_is_marked_as_json(self) -> None:
        publisher, clients = make_publisher()
        asyncio.run(publisher.publish(_message()))
        (sent,) = clients[0].senders[0].sent
        assert sent.content_type == "application/json"

    def test_build_makes_the_sdk_client_for_the_namespace_queue_and_credential(self) -> None:
        from azure.servicebus.aio import ServiceBusClient, ServiceBusSender

        credential = object()
        process_credential = ProcessCredential(None, default=lambda: credential)
        publisher = build_service_bus_publisher(
            "sb-smartcar.servicebus.windows.net", "smartcar-events", process_credential)

        async def sender() -> tuple[Any, Any]:
            made = await publisher._get_sender()  # the SDK connects on the first send only
            return publisher._client, made

        client, made = asyncio.run(sender())
        assert isinstance(client, ServiceBusClient)
        assert client.fully_qualified_namespace == "sb-smartcar.servicebus.windows.net"
        assert client._credential is credential
        assert isinstance(made, ServiceBusSender)
        assert made.entity_name == "smartcar-events"


class TestFailureReports:
    def test_a_failed_send_is_logged_with_its_id_and_error_type_only(
            self, caplog: pytest.LogCaptureFixture) -> None:
        publisher, clients = make_publisher()
        message = _message()

        async def scenario() -> None:
            await publisher._get_sender()
            clients[0].senders[0].fail_with = ConnectionError(message.body.decode())
            with pytest.raises(PublishError) as raised:
                await publisher.publish(message)
            assert str(raised.value) == "Service Bus send failed: ConnectionError"

        with caplog.at_level(logging.DEBUG, logger="shared.publisher"):
            asyncio.run(scenario())
        (record,) = caplog.records
        assert record.levelno == logging.WARNING
        assert record.getMessage() == (
            f"Service Bus send of message {message.message_id} failed: ConnectionError")
        assert message.body.decode() not in caplog.text  # the error's text held the body

    def test_send_raw_failure_says_which_error_and_reconnects(self) -> None:
        publisher, clients = make_publisher()

        async def scenario() -> None:
            await publisher._get_sender()
            clients[0].senders[0].fail_with = OSError("link detached")
            with pytest.raises(PublishError) as raised:
                await publisher.send_raw(object())
            assert str(raised.value) == "Service Bus send failed: OSError"
            await publisher.send_raw("again")

        asyncio.run(scenario())
        assert clients[0].senders[0].closed
        assert clients[0].senders[1].sent == ["again"]

    def test_a_sender_that_fails_to_close_is_logged_at_debug_and_replaced(
            self, caplog: pytest.LogCaptureFixture) -> None:
        closing = RuntimeError("close failed too")

        class Broken(FakeSender):
            async def close(self) -> None:
                raise closing

        client = FakeServiceBusClient()
        broken = Broken(fail_with=ConnectionError("link detached"))
        client.senders.append(broken)
        senders = iter([broken])

        class Client:
            def get_queue_sender(self, queue_name: str) -> FakeSender:
                return next(senders, None) or client.get_queue_sender(queue_name)

        publisher = ServiceBusPublisher(Client, "q")

        async def scenario() -> None:
            with pytest.raises(PublishError):
                await publisher.publish(_message())
            await publisher.publish(_message())

        with caplog.at_level(logging.DEBUG, logger="shared.publisher"):
            asyncio.run(scenario())
        debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert [r.getMessage() for r in debug] == ["closing the Service Bus sender failed"]
        assert debug[0].exc_info is not None and debug[0].exc_info[1] is closing
        assert len(client.senders[1].sent) == 1


class TestConcurrentFailures:
    @pytest.mark.parametrize("call", ["publish", "send_raw"])
    def test_a_late_failure_on_the_old_link_keeps_the_new_one(self, call: str) -> None:
        """Two sends in flight on one link; the first fails and the link is replaced; a send
        on the new link succeeds; then the second fails on the old link. Its reset must not
        close the new link, which the sends in flight on it (and the next ones) use."""
        gates: dict[str, asyncio.Event] = {}

        class OldLink(FakeSender):
            async def send_messages(self, message: Any) -> None:
                await gates[message.message_id].wait()
                raise ConnectionError("link detached")

        old, new = OldLink(), FakeSender()
        made = iter([old, new])

        class Client:
            def get_queue_sender(self, queue_name: str) -> FakeSender:
                return next(made)

            async def close(self) -> None:
                return None

        publisher = ServiceBusPublisher(Client, "q", send_timeout=5.0)
        first, second, third, fourth = (_message() for _ in range(4))
        gates.update({first.message_id: asyncio.Event(), second.message_id: asyncio.Event()})

        async def send(message: OutboundMessage) -> None:
            if call == "publish":
                await publisher.publish(message)
            else:
                await publisher.send_raw(SimpleNamespace(message_id=message.message_id))

        async def scenario() -> None:
            failing = [asyncio.create_task(send(m)) for m in (first, second)]
            await asyncio.sleep(0)  # both in flight on the old link
            gates[first.message_id].set()
            with pytest.raises(PublishError):
                await failing[0]
            await send(third)  # on a new link
            gates[second.message_id].set()
            with pytest.raises(PublishError):
                await failing[1]
            await send(fourth)  # the new link is still open
            await publisher.close()

        asyncio.run(scenario())
        assert old.closed and [m.message_id for m in new.sent] == [third.message_id,
                                                                   fourth.message_id]

    def test_a_sender_whose_close_hangs_does_not_hold_the_failed_send(self) -> None:
        """Closing a broken link may hang as its send did: the close is bounded by the send
        timeout too, so the caller gets its PublishError within two budgets."""
        class Hangs(FakeSender):
            async def close(self) -> None:
                await asyncio.sleep(3600)

        class Client:
            def get_queue_sender(self, queue_name: str) -> FakeSender:
                return Hangs(fail_with=ConnectionError("link detached"))

        publisher = ServiceBusPublisher(Client, "q", send_timeout=1.0)

        async def scenario() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(PublishError, match="ConnectionError"):
                await publisher.publish(_message())
            return loop.time() - started

        assert run_hurried(scenario()) <= 2.0


class TestCancelledSends:
    """Production wraps the publisher in a `SpillingPublisher` whose own budget (5 s) ends no
    later than the send's: the hung send is cancelled, not timed out inside the publisher."""

    def test_a_send_cancelled_by_the_spilling_budget_drops_the_hung_sender(
        self, tmp_path: Path
    ) -> None:
        hung = SlowSender(60)
        fresh = FakeSender()
        senders = iter([hung, fresh])
        closed: list[object] = []

        class Client:
            def get_queue_sender(self, queue_name: str) -> object:
                return next(senders)

            async def close(self) -> None:
                return None

        async def close_hung() -> None:
            closed.append(hung)

        hung.close = close_hung  # type: ignore[method-assign]
        publisher = ServiceBusPublisher(Client, "q", send_timeout=1.0)
        spilling = SpillingPublisher(publisher, FileSpillStore(tmp_path), primary_timeout=0.05)

        async def scenario() -> None:
            assert await spilling.publish(_message())  # spilled: the queue hung
            assert await spilling.publish(_message())  # a new link, not the hung one
            await publisher.close()

        asyncio.run(scenario())
        assert len(fresh.sent) == 1 and len(list(tmp_path.iterdir())) == 1
        assert closed == [hung] and hung.sent == []
        assert not publisher._closing  # each background close forgets itself when done

    def test_a_send_raw_cancelled_by_its_caller_drops_the_sender_too(self) -> None:
        hung, fresh = SlowSender(60), FakeSender()
        senders = iter([hung, fresh])

        class Client:
            def get_queue_sender(self, queue_name: str) -> object:
                return next(senders)

        publisher = ServiceBusPublisher(Client, "q", send_timeout=1.0)

        async def scenario() -> None:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await publisher.send_raw("first")
            await publisher.send_raw("second")

        asyncio.run(scenario())
        assert fresh.sent == ["second"]

    def test_a_sender_already_replaced_is_not_dropped_again(self) -> None:
        publisher, _ = make_publisher()

        async def scenario() -> None:
            stale = object()
            current = await publisher._get_sender()
            publisher._drop(stale)
            assert publisher._sender is current

        asyncio.run(scenario())


class TestClose:
    def test_close_closes_the_sender_and_the_client_once(self) -> None:
        publisher, clients = make_publisher()

        async def scenario() -> None:
            await publisher.publish(_message())
            await publisher.close()
            await publisher.close()  # nothing left to close

        asyncio.run(scenario())
        assert clients[0].senders[0].closed
        assert clients[0].closed

    def test_a_publisher_never_used_closes_without_a_client(self) -> None:
        publisher, clients = make_publisher()
        asyncio.run(publisher.close())
        assert clients == []


class TestDeadLetterCopyId:
    """A copy's id must stay within Service Bus's 128 characters and differ from the original's,
    whatever the original id holds."""

    def test_the_suffix_is_added_while_it_fits(self) -> None:
        fits = "e" * (MAX_MESSAGE_ID_LENGTH - len(DEAD_LETTER_COPY_SUFFIX))
        assert dead_letter_copy_id(fits) == fits + DEAD_LETTER_COPY_SUFFIX
        assert len(dead_letter_copy_id(fits)) == MAX_MESSAGE_ID_LENGTH

    def test_a_longer_id_is_hashed(self) -> None:
        long = "e" * (MAX_MESSAGE_ID_LENGTH - len(DEAD_LETTER_COPY_SUFFIX) + 1)
        digest = hashlib.sha256(long.encode()).hexdigest()
        assert dead_letter_copy_id(long) == f"sha256:{digest}{DEAD_LETTER_COPY_SUFFIX}"

    def test_a_long_id_with_a_lone_surrogate_is_hashed_too(self) -> None:
        long = "\ud800" + "e" * MAX_MESSAGE_ID_LENGTH
        digest = hashlib.sha256(b"\xed\xa0\x80" + b"e" * MAX_MESSAGE_ID_LENGTH).hexdigest()
        assert dead_letter_copy_id(long) == f"sha256:{digest}{DEAD_LETTER_COPY_SUFFIX}"
