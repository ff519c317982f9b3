"""The runtime wires the production boundaries from settings, and misconfiguration is visible."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import azure.functions as func
import pytest

from shared import functions
from shared.local.adapters import LocalDeadLetterer, LocalQueuePublisher
from shared.processor import ServiceBusDeadLetterer
from shared.publisher import RememberingPublisher, ServiceBusPublisher
from shared.runtime import build_runtime, set_runtime
from shared.settings import load_settings
from shared.spill import BlobSpillStore, FileSpillStore, SpillingPublisher
from shared.tokens import KeyVaultTokenProvider, StaticTokenProvider


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
