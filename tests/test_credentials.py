"""One Azure credential per process: shared by every client, closed on shutdown.

The credential classes are the boundary: `azure.identity.aio`'s ManagedIdentityCredential and
DefaultAzureCredential are replaced by counting fakes; everything that picks, builds and closes
them is the app's own code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import azure.identity.aio
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

from shared.credentials import ProcessCredential
from shared.publisher import OutboundMessage, PublishError
from shared.runtime import build_runtime
from shared.settings import load_settings

CLIENT_ID = "00000000-0000-0000-0000-0000000000aa"


class FakeCredential:
    """Counts instances, token requests and closes; never reaches a token endpoint."""

    instances: ClassVar[list[FakeCredential]]

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.scopes: list[str] = []
        self.closes = 0
        type(self).instances.append(self)

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.extend(scopes)
        raise ClientAuthenticationError("fake credential: no token endpoint in tests")

    async def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        self.scopes.extend(scopes)
        raise ClientAuthenticationError("fake credential: no token endpoint in tests")

    async def close(self) -> None:
        self.closes += 1

    async def __aenter__(self) -> FakeCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class FakeManagedIdentity(FakeCredential):
    instances: ClassVar[list[FakeCredential]] = []


class FakeDefault(FakeCredential):
    instances: ClassVar[list[FakeCredential]] = []


@pytest.fixture
def fake_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeManagedIdentity.instances = []
    FakeDefault.instances = []
    monkeypatch.setattr(azure.identity.aio, "ManagedIdentityCredential", FakeManagedIdentity)
    monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", FakeDefault)


def azure_settings(**extra: str) -> Any:
    env = {
        "WEBSITE_SITE_NAME": "app",
        "KEY_VAULT_URI": "https://kv.vault.azure.net/",
        # A closed loopback port: the send fails at once, no name lookup, no network.
        "ServiceBusConnection__fullyQualifiedNamespace": "127.0.0.1",
        "AzureWebJobsStorage__accountName": "stabc123",
        **extra,
    }
    return load_settings(env)


class TestWhichCredential:
    def test_a_client_id_selects_the_managed_identity_with_that_client_id(self, fake_identity: None) -> None:
        shared = ProcessCredential(CLIENT_ID)
        assert shared.get() is shared.get()
        assert [c.kwargs for c in FakeManagedIdentity.instances] == [{"client_id": CLIENT_ID}]
        assert FakeDefault.instances == []
        assert shared.kind == "managed_identity"

    def test_without_a_client_id_a_developer_machine_gets_default_azure_credential(self, fake_identity: None) -> None:
        shared = ProcessCredential(None)
        assert shared.get() is shared.get()
        assert len(FakeDefault.instances) == 1 and FakeManagedIdentity.instances == []
        assert shared.kind == "default"

    def test_close_closes_the_one_credential_once_and_creates_none(self, fake_identity: None) -> None:
        unused = ProcessCredential(CLIENT_ID)
        asyncio.run(unused.close())
        assert FakeManagedIdentity.instances == []
        used = ProcessCredential(CLIENT_ID)
        credential = used.get()
        asyncio.run(used.close())
        asyncio.run(used.close())
        assert credential.closes == 1


class TestOnePerProcess:
    """Incident: publisher, token provider and spill store each built a DefaultAzureCredential
    of their own (three token caches, three HTTP sessions, three IMDS probes) and none was ever
    closed. Now: one ManagedIdentityCredential(client_id=AZURE_CLIENT_ID), closed on shutdown."""

    def test_publisher_tokens_and_spill_share_one_managed_identity_closed_once(self, fake_identity: None) -> None:
        settings = azure_settings(AZURE_CLIENT_ID=CLIENT_ID)
        assert settings.azure_client_id == CLIENT_ID

        async def scenario() -> None:
            runtime = build_runtime(settings)
            # Publishing builds the Service Bus client (its send fails: nothing listens) and
            # then the spill store's Blob client, which asks the credential for a token.
            with pytest.raises(PublishError):
                await runtime.publisher.publish(OutboundMessage(b"{}", "evt-1"))
            assert len(FakeManagedIdentity.instances) == 1
            (credential,) = FakeManagedIdentity.instances
            assert credential.closes == 0
            await runtime.close()
            assert credential.closes == 1

        asyncio.run(scenario())
        (credential,) = FakeManagedIdentity.instances
        assert credential.kwargs == {"client_id": CLIENT_ID}
        assert "https://storage.azure.com/.default" in credential.scopes  # the spill store used it
        assert FakeDefault.instances == []

    def test_every_client_holds_the_shared_credential(self, fake_identity: None) -> None:
        async def scenario() -> None:
            runtime = build_runtime(azure_settings(AZURE_CLIENT_ID=CLIENT_ID))
            with pytest.raises(PublishError):
                await runtime.publisher.publish(OutboundMessage(b"{}", "evt-1"))
            assert runtime.credential is not None
            shared = runtime.credential.get()
            # The SDK clients keep the credential they were given; there is no public accessor.
            assert runtime.redrive_publisher._client._credential is shared  # type: ignore[union-attr]
            assert runtime.tokens._client._client._config.authentication_policy._credential is shared  # type: ignore[attr-defined]
            await runtime.close()

        asyncio.run(scenario())

    def test_without_a_client_id_one_default_credential_is_shared(self, fake_identity: None) -> None:
        async def scenario() -> None:
            runtime = build_runtime(azure_settings())
            with pytest.raises(PublishError):
                await runtime.publisher.publish(OutboundMessage(b"{}", "evt-1"))
            await runtime.close()

        asyncio.run(scenario())
        assert FakeManagedIdentity.instances == []
        (credential,) = FakeDefault.instances
        assert credential.closes == 1

    def test_the_local_host_closes_the_credential_when_it_stops(self, fake_identity: None, tmp_path: Path) -> None:
        from shared.local.command import load_function_app
        from shared.local.host import LocalHost

        settings = load_settings({
            "LOCAL_STATE_DIR": str(tmp_path),
            "KEY_VAULT_URI": "https://127.0.0.1:9/",  # the token provider uses the credential
        })

        async def scenario() -> None:
            runtime = build_runtime(settings)
            host = LocalHost(load_function_app(), runtime, port=0, timer_interval=3600)
            await host.start()
            try:
                (credential,) = FakeDefault.instances
                assert credential.closes == 0
            finally:
                await host.stop()
                runtime.queue.close()
            assert credential.closes == 1

        asyncio.run(scenario())
