"""The Service Bus publisher: fake client and sender at the SDK boundary, real logic."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from shared.events import peek_envelope
from shared.publisher import (
    PublishError,
    ServiceBusPublisher,
    message_id_for,
    outbound_message,
)
from shared.receiver import receive
from shared.signature import sign
from shared.tokens import StaticTokenProvider

from .fakes import FakeServiceBusClient
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
        class Hanging:
            async def send_messages(self, message: object) -> None:
                await asyncio.sleep(60)

            async def close(self) -> None:
                return None

        class Client:
            def get_queue_sender(self, queue_name: str) -> Hanging:
                return Hanging()

        publisher = ServiceBusPublisher(Client, "q", send_timeout=0.05)
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
