"""Token providers: rotation through Key Vault without a restart (fake SecretClient only)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from shared.receiver import receive
from shared.signature import sign
from shared.tokens import KeyVaultTokenProvider, StaticTokenProvider, TokenUnavailableError

from .fakes import FakeSecret, FakeSecretClient, ManualClock, RecordingPublisher
from .hurried import run_hurried
from .support import encode, state_event


def provider(client: FakeSecretClient, clock: ManualClock, **kw: float) -> KeyVaultTokenProvider:
    return KeyVaultTokenProvider(client, "smartcar-management-token", clock=clock, **kw)


async def settled() -> None:
    """Let the background reads a provider started finish."""
    await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))


class HangingSecretClient(FakeSecretClient):
    """Key Vault behind a black-holed network: while `hanging`, a read waits an hour first (the
    SDK's own connect and read timeouts, times its retries), then answers."""

    def __init__(self) -> None:
        super().__init__()
        self.hanging = False
        self.hung = 0

    async def get_secret(self, name: str, version: str | None = None) -> FakeSecret:
        if self.hanging:
            self.hung += 1
            await asyncio.sleep(3600)
        return await super().get_secret(name, version)


NAME = "smartcar-management-token"


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
            assert await p.get_tokens() == ("t1",)  # expired: served while re-read behind it
            await settled()
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
            await settled()
            assert await p.get_tokens() == ("t1",)

        asyncio.run(scenario())

    def test_no_token_at_all_raises_token_unavailable(self) -> None:
        client = FakeSecretClient()
        client.fail_with = ConnectionError("vault unreachable")
        with pytest.raises(TokenUnavailableError, match="smartcar-management-token"):
            asyncio.run(provider(client, ManualClock(1000.0)).get_tokens())

    def test_a_secret_that_is_not_unicode_is_unavailable_not_a_crash(self) -> None:
        """JSON's \\ud800 escape (what the SDK decodes a secret from) gives a lone surrogate:
        refused as unavailable (the receiver answers 503), never used as an HMAC key."""
        client = FakeSecretClient()
        client.set_secret("amt-\ud800")
        with pytest.raises(TokenUnavailableError) as raised:
            asyncio.run(provider(client, ManualClock(1000.0)).get_tokens())
        assert str(raised.value.__cause__) == (
            "Key Vault secret 'smartcar-management-token' is not valid Unicode text: set it to "
            "the token exactly as Smartcar's Dashboard shows it")

    def test_a_previous_version_that_is_not_unicode_is_left_out(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = FakeSecretClient()
        client.set_secret("amt-\ud800")
        client.set_secret("t2")
        with caplog.at_level(logging.WARNING, logger="shared.tokens"):
            assert asyncio.run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t2",)
        assert [r.getMessage() for r in caplog.records] == [
            "Key Vault secret 'smartcar-management-token': the previous version is not valid "
            "Unicode text; only the current version is accepted"]

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

    def test_a_secret_that_is_not_unicode_answers_503_not_500(self) -> None:
        client = FakeSecretClient()
        client.set_secret("amt-\udcff")
        body = encode(state_event())
        reply = asyncio.run(receive(body, {"SC-Signature": sign("anything", body)},
                                    tokens=provider(client, ManualClock(1000.0)),
                                    publisher=RecordingPublisher(), max_body_bytes=196608))
        assert reply.status == 503

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


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class TestStaticProviderNeverReReads:
    def test_refresh_reports_that_nothing_was_re_read(self) -> None:
        assert run(StaticTokenProvider("t").refresh()) is False


class TestKeyVaultTimings:
    """The cache's clock: TTL, the pause after a failure, the refresh rate limit. Each boundary
    is exact: at the limit the provider goes back to Key Vault."""

    def test_defaults_are_a_300_second_ttl_and_a_10_second_refresh_limit(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = KeyVaultTokenProvider(client, "amt", clock=clock)

        async def scenario() -> None:
            await p.get_tokens()
            reads = client.get_calls
            clock.now = 1009.9
            assert await p.refresh() is False
            clock.now = 1010.0
            assert await p.refresh() is True  # re-read at 1010: cached until 1310
            reads = client.get_calls
            clock.now = 1309.9
            await p.get_tokens()
            await settled()
            assert client.get_calls == reads
            clock.now = 1310.0
            await p.get_tokens()
            await settled()
            assert client.get_calls > reads

        run(scenario())

    def test_concurrent_requests_after_expiry_read_key_vault_once(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        answer = client.get_secret

        async def network_read(name: str, version: str | None = None) -> FakeSecret:
            await asyncio.sleep(0)  # a real read suspends: other requests arrive meanwhile
            return await answer(name, version)

        client.get_secret = network_read  # type: ignore[method-assign]
        clock = ManualClock(0.0)
        p = provider(client, clock, ttl_seconds=300)

        async def scenario() -> None:
            await p.get_tokens()
            clock.now = 400.0
            reads = client.get_calls
            results = await asyncio.gather(*(p.get_tokens() for _ in range(5)))
            assert results == [("t1",)] * 5
            await settled()
            assert client.get_calls - reads == 1  # one get_secret, no previous version

        run(scenario())

    def test_concurrent_first_requests_read_key_vault_once(self) -> None:
        client = HangingSecretClient()
        client.set_secret("t1")
        client.hanging = True  # a slow first read: the others wait for it, then use its tokens

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            p = KeyVaultTokenProvider(client, NAME, read_timeout=3600.5, clock=loop.time)
            results = await asyncio.gather(*(p.get_tokens() for _ in range(3)))
            assert results == [("t1",)] * 3
            assert client.hung == 1

        run_hurried(scenario())

    def test_after_a_failure_with_nothing_cached_the_next_attempt_waits_exactly_the_limit(
        self,
    ) -> None:
        client = FakeSecretClient()
        client.fail_with = ConnectionError("vault unreachable")
        clock = ManualClock(1000.0)
        p = provider(client, clock, min_refresh_interval=10)

        async def scenario() -> None:
            with pytest.raises(TokenUnavailableError):
                await p.get_tokens()
            client.fail_with = None
            client.set_secret("t1")
            clock.now = 1010.0
            assert await p.get_tokens() == ("t1",)

        run(scenario())

    def test_a_failed_re_read_keeps_the_cache_and_retries_after_the_refresh_limit(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, ttl_seconds=300, min_refresh_interval=10)

        async def scenario() -> None:
            await p.get_tokens()
            client.fail_with = ConnectionError("vault unreachable")
            clock.now = 1300.0  # TTL over: the read fails, the cached token is kept
            assert await p.get_tokens() == ("t1",)
            await settled()
            failed_reads = client.get_calls
            assert failed_reads == 2
            client.fail_with = None
            client.set_secret("t2")
            clock.now = 1309.9
            assert await p.get_tokens() == ("t1",)
            await settled()
            assert client.get_calls == failed_reads  # not on every request
            clock.now = 1310.0
            assert await p.get_tokens() == ("t1",)
            await settled()
            assert await p.get_tokens() == ("t2", "t1")  # nor a whole TTL later

        run(scenario())

    def test_refresh_during_an_outage_keeps_serving_the_cache_without_raising(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, min_refresh_interval=10)

        async def scenario() -> None:
            await p.get_tokens()
            client.fail_with = ConnectionError("vault unreachable")
            clock.now += 10
            assert await p.refresh() is True
            assert await p.get_tokens() == ("t1",)

        run(scenario())

    def test_refresh_with_nothing_cached_during_an_outage_raises(self) -> None:
        client = FakeSecretClient()
        client.fail_with = ConnectionError("vault unreachable")
        p = provider(client, ManualClock(1000.0))
        with pytest.raises(TokenUnavailableError, match="ConnectionError"):
            run(p.refresh())


class TestKeyVaultReads:
    def test_every_read_names_the_configured_secret(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        client.set_secret("t2")
        assert run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t2", "t1")
        assert set(client.names) == {"smartcar-management-token"}
        assert len(client.names) == 3  # current, the version list, the previous version

    def test_a_newer_disabled_version_does_not_hide_the_previous_one(self) -> None:
        # A rotation rolled back: v3 was added, then disabled; v2 is current again.
        client = FakeSecretClient()
        for token in ("t1", "t2", "t3"):
            client.set_secret(token)
        client.disable("v3")
        assert run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t2", "t1")

    def test_a_previous_version_created_in_the_same_instant_is_accepted(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        client.set_secret("t2")
        client.versions[0].properties.created_on = client.versions[1].properties.created_on
        assert run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t2", "t1")

    def test_versions_without_creation_time_do_not_break_the_read(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        client.set_secret("t2")
        for secret in client.versions:
            secret.properties.created_on = None  # type: ignore[assignment]
        assert run(provider(client, ManualClock(1000.0)).get_tokens())[0] == "t2"

    def test_a_current_secret_without_version_metadata_is_still_read(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")

        class NoVersion:
            pass

        current = FakeSecret("t1", NoVersion())  # type: ignore[arg-type]

        async def get_secret(name: str, version: str | None = None) -> FakeSecret:
            client.names.append(name)
            return current

        client.get_secret = get_secret  # type: ignore[method-assign]
        assert run(provider(client, ManualClock(1000.0)).get_tokens()) == ("t1",)

    def test_an_empty_secret_is_no_token(self, caplog: pytest.LogCaptureFixture) -> None:
        client = FakeSecretClient()
        client.set_secret("")
        with caplog.at_level(logging.ERROR, logger="shared.tokens"), pytest.raises(
            TokenUnavailableError,
            match="could not be read from Key Vault secret 'smartcar-management-token': "
                  "TokenUnavailableError",
        ):
            run(provider(client, ManualClock(1000.0)).get_tokens())
        assert [r.getMessage() for r in caplog.records] == [
            "Key Vault read of secret 'smartcar-management-token' failed: TokenUnavailableError: "
            "Key Vault secret 'smartcar-management-token' has no value"
        ]


class TestKeyVaultLog:
    def test_a_failure_with_nothing_cached_is_an_error_with_the_cause(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = FakeSecretClient()
        client.fail_with = ConnectionError("vault unreachable")
        with caplog.at_level(logging.INFO, logger="shared.tokens"), pytest.raises(
            TokenUnavailableError, match="smartcar-management-token': ConnectionError"
        ):
            run(provider(client, ManualClock(1000.0)).get_tokens())
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(
            logging.ERROR,
            "Key Vault read of secret 'smartcar-management-token' failed: ConnectionError: "
            "vault unreachable",
        )]

    def test_a_failure_with_a_cached_token_is_a_warning_saying_it_is_kept(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, ttl_seconds=300)
        run(p.get_tokens())
        client.fail_with = ConnectionError("vault unreachable")
        clock.now += 300

        async def scenario() -> None:
            await p.get_tokens()
            await settled()

        with caplog.at_level(logging.INFO, logger="shared.tokens"):
            run(scenario())
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(
            logging.WARNING,
            "Key Vault read of secret 'smartcar-management-token' failed (ConnectionError); "
            "keeping the cached token",
        )]



async def hung_in_the_background() -> KeyVaultTokenProvider:
    """A provider (300 s TTL, on the loop's clock) whose TTL passed while Key Vault hangs:
    its background read has started and hangs, 301 s in."""
    client = HangingSecretClient()
    client.set_secret("t1")
    p = KeyVaultTokenProvider(client, NAME, ttl_seconds=300,
                              clock=asyncio.get_running_loop().time)
    await p.get_tokens()
    client.hanging = True
    await asyncio.sleep(300)
    await p.get_tokens()
    await asyncio.sleep(1)
    assert client.hung == 1
    return p


class TestKeyVaultHangs:
    """A Key Vault that hangs instead of failing: no answer may wait on it longer than the read
    timeout, and none at all while a token is cached. On the hurried loop, whose clock only
    moves when every task waits, `loop.time()` says how long a call waited."""

    def test_past_the_ttl_requests_get_the_cached_token_at_once_and_one_read_runs_behind(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = HangingSecretClient()
        client.set_secret("t1")

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            p = KeyVaultTokenProvider(client, NAME, ttl_seconds=300, clock=loop.time)
            assert await p.get_tokens() == ("t1",)
            client.hanging = True
            await asyncio.sleep(300)
            asked = loop.time()
            results = await asyncio.gather(*(p.get_tokens() for _ in range(5)))
            assert results == [("t1",)] * 5
            assert loop.time() == asked  # nobody waited on Key Vault
            assert len(asyncio.all_tasks()) == 2  # this one and a single background read
            await settled()
            assert loop.time() == asked + 5  # the default read timeout ended the read
            assert client.hung == 1
            assert await p.get_tokens() == ("t1",)

        with caplog.at_level(logging.INFO, logger="shared.tokens"):
            run_hurried(scenario())
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(
            logging.WARNING,
            "Key Vault read of secret 'smartcar-management-token' failed (TimeoutError); "
            "keeping the cached token",
        )]

    def test_a_hanging_first_read_is_token_unavailable_after_the_read_timeout(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = HangingSecretClient()
        client.set_secret("t1")
        client.hanging = True

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            p = KeyVaultTokenProvider(client, NAME, read_timeout=2, clock=loop.time)
            with pytest.raises(TokenUnavailableError, match="'smartcar-management-token': "
                                                            "TimeoutError"):
                await p.get_tokens()
            assert loop.time() == 2
            with pytest.raises(TokenUnavailableError, match="retrying after 10s"):
                await p.get_tokens()  # the rate limit: no second hanging read right behind
            assert loop.time() == 2 and client.hung == 1

        with caplog.at_level(logging.INFO, logger="shared.tokens"):
            run_hurried(scenario())
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(
            logging.ERROR,
            "Key Vault read of secret 'smartcar-management-token' failed: TimeoutError: "
            "no answer within 2s",
        )]

    def test_the_client_s_own_timeout_is_logged_with_its_own_message(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = FakeSecretClient()
        client.fail_with = TimeoutError("connection timed out")
        with caplog.at_level(logging.INFO, logger="shared.tokens"), pytest.raises(
            TokenUnavailableError, match="TimeoutError"
        ):
            run(provider(client, ManualClock(1000.0)).get_tokens())
        assert [r.getMessage() for r in caplog.records] == [
            "Key Vault read of secret 'smartcar-management-token' failed: TimeoutError: "
            "connection timed out"
        ]

    def test_a_hanging_refresh_ends_at_the_read_timeout_and_keeps_the_cache(self) -> None:
        client = HangingSecretClient()
        client.set_secret("t1")

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            p = KeyVaultTokenProvider(client, NAME, read_timeout=3, clock=loop.time)
            await p.get_tokens()
            client.hanging = True
            await asyncio.sleep(10)
            assert await p.refresh() is True
            assert loop.time() == 13
            assert await p.get_tokens() == ("t1",)

        run_hurried(scenario())

    def test_a_hanging_refresh_with_nothing_cached_raises_at_the_read_timeout(self) -> None:
        client = HangingSecretClient()
        client.set_secret("t1")
        client.hanging = True

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            p = KeyVaultTokenProvider(client, NAME, read_timeout=3, clock=loop.time)
            with pytest.raises(TokenUnavailableError, match="TimeoutError"):
                await p.refresh()
            assert loop.time() == 3

        run_hurried(scenario())

    def test_a_refresh_while_a_read_is_under_way_answers_at_once(self) -> None:
        async def scenario() -> None:
            p = await hung_in_the_background()
            assert await p.refresh() is False  # that read is the attempt the limit counts
            assert asyncio.get_running_loop().time() == 301

        run_hurried(scenario())

    def test_refreshes_queued_behind_a_long_read_re_read_once(self) -> None:
        # A read longer than the refresh limit: refreshes that passed the limit while it ran
        # do not each read again once it is over.
        client = HangingSecretClient()
        client.set_secret("t1")

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            p = KeyVaultTokenProvider(client, NAME, ttl_seconds=300, min_refresh_interval=1,
                                      clock=loop.time)
            await p.get_tokens()
            client.hanging = True
            await asyncio.sleep(300)
            await p.get_tokens()
            await asyncio.sleep(2)  # the background read hangs until 305
            client.hanging = False
            client.set_secret("t2")
            reads = client.get_calls
            assert list(await asyncio.gather(p.refresh(), p.refresh())) == [True, False]
            assert loop.time() == 305
            assert client.get_calls - reads == 2  # one read: current and previous version
            assert await p.get_tokens() == ("t2", "t1")

        run_hurried(scenario())

    def test_a_read_made_while_the_background_read_waited_is_not_repeated(self) -> None:
        client = FakeSecretClient()
        client.set_secret("t1")
        clock = ManualClock(1000.0)
        p = provider(client, clock, ttl_seconds=300)

        async def scenario() -> None:
            await p.get_tokens()
            clock.now += 300
            client.set_secret("t2")
            assert await p.get_tokens() == ("t1",)  # a background read is started
            assert await p.refresh() is True  # a mismatch re-reads before it runs
            reads = client.get_calls
            await settled()
            assert client.get_calls == reads
            assert await p.get_tokens() == ("t2", "t1")

        run(scenario())

    def test_close_cancels_a_background_read_without_waiting_for_it(self) -> None:
        async def scenario() -> None:
            p = await hung_in_the_background()
            await p.close()
            assert asyncio.get_running_loop().time() == 301
            assert asyncio.all_tasks() == {asyncio.current_task()}

        run_hurried(scenario())


class TestProductionWiring:
    def test_build_key_vault_provider_reads_the_named_secret_from_the_vault(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import azure.identity.aio
        import azure.keyvault.secrets.aio

        from shared.credentials import ProcessCredential
        from shared.tokens import build_key_vault_provider

        made: list[tuple[str, object]] = []
        client = FakeSecretClient()
        client.set_secret("t1")

        def secret_client(*, vault_url: str, credential: object) -> FakeSecretClient:
            made.append((vault_url, credential))
            return client

        class Credential:
            pass

        monkeypatch.setattr(azure.keyvault.secrets.aio, "SecretClient", secret_client)
        monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", Credential)
        p = build_key_vault_provider("https://kv.vault.azure.net/", "amt-secret", ttl_seconds=0,
                                     credential=ProcessCredential(None))

        async def scenario() -> None:
            assert await p.get_tokens() == ("t1",)
            reads = client.get_calls
            assert await p.get_tokens() == ("t1",)
            await settled()
            assert client.get_calls > reads  # ttl_seconds=0 is passed on: no caching

        run(scenario())
        ((url, credential),) = made
        assert url == "https://kv.vault.azure.net/" and isinstance(credential, Credential)
        assert set(client.names) == {"amt-secret"}

    def test_closing_the_provider_closes_the_key_vault_client_and_its_transport(self) -> None:
        # Azure's own SecretClient, over a transport that records what the client does with it:
        # the HTTP session under it is what a stopping host must give back.
        from azure.core.pipeline.transport import AsyncHttpTransport
        from azure.keyvault.secrets.aio import SecretClient

        class RecordingTransport(AsyncHttpTransport[Any, Any]):
            def __init__(self) -> None:
                self.calls: list[str] = []

            async def __aenter__(self) -> RecordingTransport:
                self.calls.append("enter")
                return self

            async def __aexit__(self, *exc: object) -> None:
                self.calls.append("exit")

            async def send(self, request: Any, **kwargs: Any) -> Any:
                raise AssertionError("closing a client sends nothing")

            async def open(self) -> None:
                self.calls.append("open")

            async def close(self) -> None:
                self.calls.append("close")

        class Credential:
            async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
                raise AssertionError("closing a client asks for no token")

        transport = RecordingTransport()
        # As build_key_vault_provider holds it (the SDK's types are wider than SecretReader's).
        client: Any = SecretClient("https://kv.vault.azure.net/", Credential(),  # type: ignore[arg-type]
                                   transport=transport)
        run(KeyVaultTokenProvider(client, "amt").close())
        assert transport.calls == ["exit"]

    def test_a_client_without_close_is_left_alone(self) -> None:
        client = FakeSecretClient()  # as a client that holds no session: no close()
        assert not hasattr(client, "close")
        run(KeyVaultTokenProvider(client, "amt").close())
