"""The worker exports no log records: the Functions host does (telemetryMode OpenTelemetry).

Each case runs in a fresh interpreter, because configuring Azure Monitor sets the process's
global providers once. The check reads what the distro installed: the global LoggerProvider's
processors and the root logger's handlers. Nothing is sent: the ingestion endpoint is a closed
loopback port and statsbeat is off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = ("InstrumentationKey=00000000-0000-0000-0000-000000000001;"
              "IngestionEndpoint=https://127.0.0.1:9/")

INSPECT = """
import json, logging
from opentelemetry import _logs
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.instrumentation.logging.handler import LoggingHandler

def exporters(provider):
    found = []
    if isinstance(provider, LoggerProvider):
        multi = provider._multi_log_record_processor
        for processor in getattr(multi, "_log_record_processors", ()):
            exporter = getattr(processor, "_exporter", None)
            if exporter is None:
                exporter = getattr(getattr(processor, "_batch_processor", None), "_exporter", None)
            found.append(type(exporter or processor).__name__)
    return found

print(json.dumps({
    "provider": type(_logs.get_logger_provider()).__name__,
    "processors": exporters(_logs.get_logger_provider()),
    "handlers": [type(h).__name__ for h in logging.getLogger().handlers
                 if isinstance(h, LoggingHandler)],
    "traces": __import__("opentelemetry.trace", fromlist=["x"]).get_tracer_provider()
              .__class__.__name__,
}))
"""


def configured(setup: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_"))}
    env["APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL"] = "true"
    done = subprocess.run([sys.executable, "-c", setup + INSPECT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_app_configures_traces_and_metrics_but_no_log_export() -> None:
    state = configured(
        "from shared import telemetry\n"
        f"assert telemetry.configure(connection_string={CONNECTION!r}) == telemetry.MODE_AZURE_MONITOR\n")
    assert state["traces"] == "TracerProvider"  # the distro did configure export
    assert state["provider"] == "ProxyLoggerProvider"  # no SDK LoggerProvider was set
    assert state["processors"] == []
    assert state["handlers"] == []
    assert "AzureMonitorLogExporter" not in json.dumps(state)


def test_the_distro_ignores_disable_logging_without_the_environment_switch() -> None:
    # Why the app sets OTEL_LOGS_EXPORTER: the pinned distro overwrites `disable_logging`
    # from it. If this starts failing, the argument is honoured again and the switch can go.
    state = configured(
        "from azure.monitor.opentelemetry import configure_azure_monitor\n"
        f"configure_azure_monitor(connection_string={CONNECTION!r}, disable_logging=True)\n")
    assert "AzureMonitorLogExporter" in state["processors"]  # type: ignore[operator]
    assert state["handlers"] == ["LoggingHandler"]
