"""One runtime session: the package built, the worker started on it, the fakes' records read.

`RuntimeSession` is what the tests (and the benchmark) use: `start_session(...)` builds the
deployed package into a temporary directory, writes the fakes' configuration, and starts the
test host with the app settings an Azure deployment has for Service Bus and Key Vault.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import boundary, package, rpc
from .host import FunctionsHost

TOKEN = "amt"
SECRET_NAME = "smartcar-management-token"
NAMESPACE = "sb-runtime-test.servicebus.windows.net"
QUEUE = "smartcar-events"
VAULT = "https://kv-runtime-test.vault.azure.net/"
#: The app settings of the session: Service Bus and Key Vault by identity, as Bicep sets them.
#: Storage is the spill directory under LOCAL_STATE_DIR (set per session).
SETTINGS = {
    "KEY_VAULT_URI": VAULT,
    "SMARTCAR_TOKEN_SECRET_NAME": SECRET_NAME,
    "ServiceBusConnection__fullyQualifiedNamespace": NAMESPACE,
    "SERVICEBUS_QUEUE_NAME": QUEUE,
    "AZURE_CLIENT_ID": "00000000-0000-0000-0000-0000000000aa",
    "MAX_DELIVERY_COUNT": "5",
    "RETRY_BACKOFF_BASE_SECONDS": "0.01",
    "RETRY_BACKOFF_MAX_SECONDS": "0.05",
    # No storage account here, and the store's SQLite backend is local-only (not deployed):
    # the store runs on both its backends in tests/test_vehicle_state_store.py.
    "VEHICLE_STATE_STORE": "off",
}


@dataclass(frozen=True)
class Sent:
    """One message the app sent to (or scheduled on) Service Bus, as the fake recorded it."""

    namespace: str
    queue: str
    message_id: str
    body: bytes
    application_properties: dict[str, Any]
    content_type: str | None
    time_to_live_seconds: float | None
    scheduled_enqueue_time_utc: str | None


class RuntimeSession:
    def __init__(self, host: FunctionsHost, fakes_dir: Path, state_dir: Path) -> None:
        self.host = host
        self.fakes_dir = fakes_dir
        self.state_dir = state_dir

    def sent(self) -> list[Sent]:
        log = self.fakes_dir / boundary.SERVICE_BUS_LOG
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
        return [Sent(r["namespace"], r["queue"], r["messageId"], base64.b64decode(r["body"]),
                     r["applicationProperties"], r["contentType"], r["timeToLiveSeconds"],
                     r["scheduledEnqueueTimeUtc"]) for r in records]

    def sent_with_id(self, message_id: str) -> list[Sent]:
        return [s for s in self.sent() if s.message_id == message_id]

    def worker_imports(self) -> dict[str, Any]:
        """The worker's `sys.path` and where it finds each probed module (boundary.py)."""
        state: dict[str, Any] = json.loads(
            (self.fakes_dir / boundary.WORKER_STATE).read_text(encoding="utf-8"))
        return state

    def close(self) -> None:
        self.host.stop()


def dependencies(cache: Path) -> tuple[Path, Path]:
    """(the app's requirements.txt installed, the worker's gRPC packages installed), cached."""
    app = package.pip_target(cache, package.app_requirements(), label="app")
    worker = package.pip_target(cache, package.worker_requirements(), label="worker")
    return app, worker


def start_session(tmp: Path, cache: Path, *, protos: rpc.Protos | None = None,
                  failing_event_types: Iterable[str] = (),
                  settings: Mapping[str, str] | None = None,
                  root: Path = package.ROOT) -> RuntimeSession:
    """Build the package from `root` and start the real runtime on it. `settings` replace the
    defaults above (a value of "" drops the setting)."""
    app_deps, worker_deps = dependencies(cache.resolve())  # the worker runs elsewhere
    protos = protos or rpc.generate(_mkdir(tmp / "protos"))
    app_dir = package.build_package(tmp / "wwwroot", app_deps, root=root)
    fakes_dir = _mkdir(tmp / "fakes")
    state_dir = tmp / "state"
    (fakes_dir / boundary.KEY_VAULT).write_text(json.dumps({"secrets": {SECRET_NAME: [TOKEN]}}))
    (fakes_dir / boundary.HANDLERS).write_text(json.dumps({"failing": list(failing_event_types)}))
    merged = {**SETTINGS, "LOCAL_STATE_DIR": str(state_dir), **(settings or {})}
    host = FunctionsHost(
        protos, app_dir=app_dir, settings={k: v for k, v in merged.items() if v},
        worker_path=[protos.directory, worker_deps], fakes_dir=fakes_dir,
        log_file=tmp / "worker.log")
    host.__enter__()
    return RuntimeSession(host, fakes_dir, state_dir)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
