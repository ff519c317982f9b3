"""Token providers: rotation through Key Vault without a restart (fake SecretClient only)."""

from __future__ import annotations

import asyncio
import json

import pytest

from shared.receiver import receive
from shared.signature import sign
from shared.tokens import KeyVaultTokenProvider, StaticTokenProvider, TokenUnavailableError

from .fakes import FakeSecretClient, ManualClock, RecordingPublisher
from .support import encode, state_event


def provider(client: FakeSecretClient, clock: ManualClock, **kw: float) -> KeyVaultTokenProvider:
    return KeyVaultTokenProvider(client, "smartcar-management-token", clock=clock, **kw)


class TestStaticProvider:
    def test_current_then_previous(self) -> None:
        assert asyncio.run(StaticTokenProvider("new", "old").get_tokens()) == ("new", "old")
        assert asyncio.run(StaticTokenProvider("new").get_tokens()) == ("new",)


class TestKeyVaultProvider:
    def test_reads_current_and_previous_enabled_version(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        client.set_secret("t2")
        client.set_secret("t3")
        assert asyncio.run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t3", "t2")

    def test_disabled_previous_version_is_not_accepted(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        client.set_secret("t2")
        client.set_secret("t3")
        client.disable("v2")
        assert asyncio.run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t3",)

    def test_older_versions_never_come_back_even_when_left_enabled(self) -> None:
        # An emergency rotation: t2 leaked, t3 replaces it and t2 is disabled; t1 was
        # never disabled but must not be accepted again.
        client = FakeSecretClient()
        for token in ("t1", "t2", "t3"):
            client.set_secret(token)
        client.disable("v2")
        tokens = asyncio.run(provider(client, ManualClock(1000.0)).get_tokens())
        assert "t1" not in tokens and "t2" not in tokens

    def test_no_token_and_a_fresh_failure_answers_at_once(self) -> None:
        client = FakeSecretClient()
        client.fail_with = ConnectionError("vault unreachable")
        clock = ManualClock(1000.0)
        p = provider(client, clock, min_refresh_interval=10)

        async def scenario() -> None:
            with pytest.raises(TokenUnavailableError):
                await p.get_tokens()
            calls = client.get_calls
            with pytest.raises(TokenUnavailableError, match="retrying after 10s"):
                await p.get_tokens()
            assert client.get_calls == calls  # no second slow read right behind the first
            client.fail_with = None
            client.set_secret("t1")
            clock.now += 11
            assert await p.get_tokens() == ("t1",)

        asyncio.run(scenario())

    def test_tokens_are_cached_within_the_ttl(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, ttl_seconds=300)

        async def scenario() -> None:
            await p.get_tokens()
            calls = client.get_calls
            clock.now += 299
            await p.get_tokens()
            assert client.get_calls == calls
            client.set_secret("t2")
            clock.now += 2
            assert await p.get_tokens() == ("t2", "t1")

        asyncio.run(scenario())

    def test_key_vault_failure_keeps_the_cached_token(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, ttl_seconds=300)

        async def scenario() -> None:
            assert await p.get_tokens() == ("t1",)
            client.fail_with = ConnectionError("vault unreachable")
            clock.now += 10_000
            assert await p.get_tokens() == ("t1",)

        asyncio.run(scenario())

    def test_no_token_at_all_raises_token_unavailable(self) -> None:
        client = FakeSecretClient()
        client.fail_with = ConnectionError("vault unreachable")
        with pytest.raises(TokenUnavailableError, match="smartcar-management-token"):
            asyncio.run(provider(client, ManualClock(1000.0)).get_tokens())

    def test_refresh_is_rate_limited(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, min_refresh_interval=10)

        async def scenario() -> None:
            await p.get_tokens()
            clock.now += 11
            assert await p.refresh() is True
            assert await p.refresh() is False
            clock.now += 11
            assert await p.refresh() is True

        asyncio.run(scenario())


class TestRotationThroughTheReceiver:
    """Real receiver + real provider; only the SecretClient is fake."""

    def test_payload_signed_with_previous_token_is_accepted(self) -> None:
        client = FakeSecretClient()
        client.set_secret("old-token")
        client.set_secret("new-token")
        body = encode(state_event())
        publisher = RecordingPublisher()
        reply = asyncio.run(
            receive(
                body,
                {"SC-Signature": sign("old-token", body)},
                tokens=provider(client, ManualClock(1000.0)),
                publisher=publisher,
                max_body_bytes=196608,
            )
        )
        assert reply.status == 200
        assert [m.body for m in publisher.sent] == [body]

    def test_new_secret_is_picked_up_without_restart(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        tokens = provider(client, clock, ttl_seconds=3600, min_refresh_interval=5)
        publisher = RecordingPublisher()

        async def post(token: str) -> int:
            body = encode(state_event())
            reply = await receive(
                body,
                {"SC-Signature": sign(token, body)},
                tokens=tokens,
                publisher=publisher,
                max_body_bytes=196608,
            )
            return reply.status

        async def scenario() -> None:
            assert await post("t1") == 200
            client.set_secret("t2")  # rotated in Key Vault; the TTL has not expired
            clock.now += 6
            assert await post("t2") == 200  # unmatched signature triggers an immediate re-read
            assert await post("t1") == 200  # the previous version is still accepted
            client.set_secret("t3")
            clock.now += 3601  # after the TTL the cache reflects Key Vault again
            assert await post("t3") == 200
            assert await post("t1") == 401  # t1 is now two versions old
            assert await post("forged") == 401

        asyncio.run(scenario())

    def test_verify_is_answered_with_the_token_that_signed_it(self) -> None:
        client = FakeSecretClient()
        client.set_secret("old-token")
        client.set_secret("new-token")
        body = json.dumps({"eventId": "e", "eventType": "VERIFY", "data": {"challenge": "abc"}})
        raw = body.encode()
        reply = asyncio.run(
            receive(
                raw,
                {"sc-signature": sign("old-token", raw)},
                tokens=provider(client, ManualClock(1000.0)),
                publisher=RecordingPublisher(),
                max_body_bytes=196608,
            )
        )
        assert reply.status == 200
        assert reply.body == {"challenge": sign("old-token", "abc")}
