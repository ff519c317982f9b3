"""The runtime wires the production boundaries from settings, and misconfiguration is visible."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import azure.functions as func
import pytest

from shared import functions
from shared.credentials import ProcessCredential
from shared.local.adapters import LocalDeadLetterer, LocalQueuePublisher
from shared.processor import ServiceBusDeadLetterer
from shared.publisher import OutboundMessage, RememberingPublisher, ServiceBusPublisher
from shared.runtime import Runtime, build_runtime, build_spill_store, set_runtime
from shared.settings import load_settings
from shared.spill import BlobSpillStore, FileSpillStore, SpillingPublisher
from shared.tokens import KeyVaultTokenProvider, StaticTokenProvider

from .fakes import FakeServiceBusClient


def test_azure_settings_build_service_bus_and_key_vault_boundaries() -> None:
    settings = load_settings({
        "WEBSITE_SITE_NAME": "app",
        "KEY_VAULT_URI": "https://kv.vault.azure.net/",
        "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
        "AzureWebJobsStorage__accountName": "st1",
    })
    runtime = build_runtime(settings)  # constructs clients lazily: no network here
    assert isinstance(runtime.tokens, KeyVaultTokenProvider)
    assert isinstance(runtime.publisher, RememberingPublisher)
    assert isinstance(runtime.publisher._inner, SpillingPublisher)
    assert isinstance(runtime.spill, BlobSpillStore)
    assert isinstance(runtime.redrive_publisher, ServiceBusPublisher)
    assert isinstance(runtime.dead_letterer, ServiceBusDeadLetterer)
    assert runtime.handled_log is None and runtime.queue is None


def test_local_settings_build_the_embedded_queue(tmp_path: Path) -> None:
    runtime = build_runtime(load_settings({"LOCAL_STATE_DIR": str(tmp_path)}))
    try:
        assert isinstance(runtime.tokens, StaticTokenProvider)
        assert isinstance(runtime.publisher, SpillingPublisher)
        assert isinstance(runtime.spill, FileSpillStore)
        assert isinstance(runtime.redrive_publisher, LocalQueuePublisher)
        assert isinstance(runtime.dead_letterer, LocalDeadLetterer)
        assert (tmp_path / "queue.sqlite3").exists()
    finally:
        runtime.queue.close()


def test_a_connection_string_wins_over_the_account_for_the_spill_store() -> None:
    # The host's precedence (settings.py, TestHostStorageConventions): a connection string
    # in AzureWebJobsStorage before the identity-based account. Both set locally: Azurite.
    settings = load_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true",
                              "AzureWebJobsStorage__accountName": "stabc123"})
    assert settings.spill_blob_account_url == "https://stabc123.blob.core.windows.net/"
    store = build_spill_store(settings, ProcessCredential(None))
    assert isinstance(store, BlobSpillStore)
    try:
        client = store._container()  # built here, no request sent
        assert client.url == "http://127.0.0.1:10000/devstoreaccount1/spill"
    finally:
        asyncio.run(store.close())


class _Credential:
    """The Azure identity boundary (the credential the clients share)."""

    closed = False

    async def close(self) -> None:
        self.closed = True


class _ClientThatFailsToClose(FakeServiceBusClient):
    async def close(self) -> None:
        raise ConnectionError("the connection dropped while closing")


class TestClose:
    """`Runtime.close` at the local host's stop: every part, then the shared credential."""

    @staticmethod
    def runtime(tmp_path: Path, **parts: object) -> tuple[Runtime, _Credential]:
        credential = _Credential()
        shared = ProcessCredential(None, default=lambda: credential)
        shared.get()  # a client used it
        runtime = build_runtime(load_settings({"LOCAL_STATE_DIR": str(tmp_path)}),
                                credential=shared, **parts)  # type: ignore[arg-type]
        return runtime, credential

    @staticmethod
    def is_closed(runtime: Runtime) -> bool:
        assert runtime.vehicle_state is not None
        try:
            asyncio.run(runtime.vehicle_state.list_vehicles())
        except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
            return True
        return False

    def test_the_vehicle_state_store_and_the_credential_are_closed(self, tmp_path: Path) -> None:
        runtime, credential = self.runtime(tmp_path)
        try:
            assert not self.is_closed(runtime)
            asyncio.run(runtime.close())
            assert self.is_closed(runtime) and credential.closed
        finally:
            runtime.queue.close()
            assert runtime.handled_log is not None
            runtime.handled_log.close()

    def test_a_part_that_fails_to_close_is_logged_and_the_rest_are_closed(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # The first part closed is the publisher: Service Bus (faked at its client) fails to
        # close; the vehicle state store and the credential after it are closed all the same.
        publisher = ServiceBusPublisher(_ClientThatFailsToClose, "q", send_timeout=1.0)
        runtime, credential = self.runtime(tmp_path, publisher=publisher)

        async def use_then_close() -> None:
            assert await publisher.publish(OutboundMessage(b"{}", "m-1"))
            await runtime.close()

        try:
            with caplog.at_level(logging.WARNING, logger="shared.runtime"):
                asyncio.run(use_then_close())
            assert "closing ServiceBusPublisher failed" in caplog.text
            assert self.is_closed(runtime) and credential.closed
        finally:
            runtime.queue.close()
            assert runtime.handled_log is not None
            runtime.handled_log.close()


class TestMisconfiguration:
    @pytest.fixture(autouse=True)
    def broken_env(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setenv("WEBSITE_SITE_NAME", "app")  # in Azure, without KEY_VAULT_URI
        monkeypatch.delenv("KEY_VAULT_URI", raising=False)
        monkeypatch.delenv("ServiceBusConnection__fullyQualifiedNamespace", raising=False)
        set_runtime(None)
        yield
        set_runtime(None)

    def test_health_answers_503_and_reveals_no_settings(self, caplog: pytest.LogCaptureFixture) -> None:
        resp = asyncio.run(functions.handle_health(func.HttpRequest("GET", "/api/health", body=b"")))
        assert resp.status_code == 503
        assert json.loads(resp.get_body()) == {"status": "misconfigured"}
        assert "KEY_VAULT_URI is not set" in caplog.text

    def test_webhook_answers_503_so_smartcar_retries(self) -> None:
        req = func.HttpRequest("POST", "/api/webhooks/smartcar", body=b"{}")
        resp = asyncio.run(functions.handle_webhook(req))
        assert resp.status_code == 503
