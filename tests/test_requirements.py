"""The runtime dependency floors that the deployment relies on.

`requirements.txt` is what `func azure functionapp publish` installs in Azure, so a range that
admits a version without a feature we rely on is a deployment bug, found here rather than in a
user's subscription.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def runtime_requirement(name: str) -> Requirement:
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        if text and Requirement(text).name == name:
            return Requirement(text)
    raise AssertionError(f"requirements.txt has no line for {name}")


class TestAzureMonitorDistro:
    """Local auth is off on Application Insights (infra), so telemetry export must use Entra ID,
    configured through APPLICATIONINSIGHTS_AUTHENTICATION_STRING; 1.8 is the floor for it."""

    def test_the_floor_is_1_8_with_an_upper_bound(self) -> None:
        spec = runtime_requirement("azure-monitor-opentelemetry").specifier
        assert not spec.contains("1.7.2"), f"{spec} admits 1.7.x"
        assert spec.contains("1.8.0"), f"{spec} rejects 1.8.0"
        assert not spec.contains("2.0.0"), f"{spec} has no upper bound below 2.0"

    def test_the_installed_version_is_in_range(self) -> None:
        spec = runtime_requirement("azure-monitor-opentelemetry").specifier
        assert spec.contains(version("azure-monitor-opentelemetry"))

    def test_the_installed_exporter_takes_its_credential_from_the_authentication_string(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from azure.identity import ManagedIdentityCredential
        from azure.monitor.opentelemetry.exporter import AzureMonitorTraceExporter

        monkeypatch.setenv("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "true")
        monkeypatch.setenv(
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
            "Authorization=AAD;ClientId=00000000-0000-0000-0000-0000000000aa",
        )
        exporter = AzureMonitorTraceExporter(
            connection_string="InstrumentationKey=00000000-0000-0000-0000-000000000001;"
            "IngestionEndpoint=https://127.0.0.1:9/",
            disable_offline_storage=True,
        )
        try:
            # The exporter keeps the credential it resolved; there is no public accessor.
            assert isinstance(exporter._credential, ManagedIdentityCredential)
        finally:
            exporter.shutdown()
