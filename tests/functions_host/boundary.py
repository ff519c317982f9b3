"""The tests' Service Bus and Key Vault fakes, installed in the worker process.

The app runs in the worker's process, so its boundaries are faked there: the async SDK client
classes the app builds (`azure.servicebus.aio.ServiceBusClient`,
`azure.keyvault.secrets.aio.SecretClient`) are replaced in their modules before the app first
uses them, which is all the deployed code sees. Nothing in the deployed package changes.

The test process reads what happened from files in the fakes' directory:
- `keyvault.json` (written by the test): `{"secrets": {name: [value, ...]}}`, versions oldest
  first, served by `tests/fakes.py`'s `FakeSecretClient`;
- `servicebus.jsonl` (written here): one line per message the app sent or scheduled, with its
  namespace, queue, id, body (base64), application properties, time to live and scheduled
  enqueue time.
- `worker.json` (written here): the worker's `sys.path`, and where each module of
  `PROBED_MODULES` would be imported from (null: not importable), so the tests see what the
  deployed code can and cannot import in that process;
- `handlers.json` (written by the test): `{"failing": [eventType, ...]}`, event types whose
  handler raises, registered on the app's registry the way a user's handler module does.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

FAKES = Path(__file__).resolve().parent.parent / "fakes.py"
SERVICE_BUS_LOG = "servicebus.jsonl"
KEY_VAULT = "keyvault.json"
HANDLERS = "handlers.json"
WORKER_STATE = "worker.json"
#: The app's own modules and its runtime, and development-only packages that must not be there.
PROBED_MODULES = ("function_app", "shared", "shared.local", "shared.cli", "azure.functions",
                  "azure_functions_runtime", "pytest", "hypothesis", "uvloop", "grpc_tools",
                  "smartcar", "selenium", "mutmut", "tests")


class HandlerFailure(RuntimeError):
    """What a handler registered as failing raises."""


def _load_fakes() -> Any:
    spec = importlib.util.spec_from_file_location("runtime_test_fakes", FAKES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _record_of(message: Any, *, namespace: str, queue: str,
               scheduled: datetime | None = None) -> dict[str, Any]:
    body = b"".join(bytes(section) for section in message.body)
    ttl = message.time_to_live
    enqueue_at = scheduled or message.scheduled_enqueue_time_utc
    return {
        "namespace": namespace,
        "queue": queue,
        "messageId": message.message_id,
        "body": base64.b64encode(body).decode("ascii"),
        "applicationProperties": {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (message.application_properties or {}).items()
        },
        "contentType": message.content_type,
        "timeToLiveSeconds": ttl.total_seconds() if ttl is not None else None,
        "scheduledEnqueueTimeUtc": enqueue_at.isoformat() if enqueue_at is not None else None,
    }


class RecordingSender:
    """`ServiceBusSender`'s async surface: every message sent or scheduled is one JSON line."""

    def __init__(self, log: Path, lock: threading.Lock, *, namespace: str, queue: str) -> None:
        self._log = log
        self._lock = lock
        self._namespace = namespace
        self._queue = queue

    def _write(self, messages: Any, scheduled: datetime | None = None) -> None:
        batch = messages if isinstance(messages, list) else [messages]
        lines = "".join(json.dumps(_record_of(m, namespace=self._namespace, queue=self._queue,
                                              scheduled=scheduled)) + "\n" for m in batch)
        with self._lock, self._log.open("a", encoding="utf-8") as log:
            log.write(lines)

    async def send_messages(self, messages: Any, **_: Any) -> None:
        self._write(messages)

    async def schedule_messages(self, messages: Any, schedule_time_utc: datetime,
                                **_: Any) -> list[int]:
        self._write(messages, schedule_time_utc)
        return [0] * (len(messages) if isinstance(messages, list) else 1)

    async def close(self) -> None:
        return None


class RecordingServiceBusClient:
    def __init__(self, fully_qualified_namespace: str, credential: Any = None,
                 **_: Any) -> None:
        self.namespace = fully_qualified_namespace

    def get_queue_sender(self, queue_name: str, **_: Any) -> RecordingSender:
        return RecordingSender(_STATE["log"], _STATE["lock"], namespace=self.namespace,
                               queue=queue_name)

    async def close(self) -> None:
        return None


_STATE: dict[str, Any] = {}


def install(directory: Path) -> None:
    import azure.keyvault.secrets.aio as key_vault
    import azure.servicebus.aio as service_bus

    fakes = _load_fakes()
    _STATE.update(log=directory / SERVICE_BUS_LOG, lock=threading.Lock())
    config = json.loads((directory / KEY_VAULT).read_text(encoding="utf-8"))
    secrets: dict[str, Any] = {}
    for name, values in config["secrets"].items():
        client = fakes.FakeSecretClient()
        for value in values:
            client.set_secret(value)
        secrets[name] = client

    class SecretClientBySecretName:
        """One FakeSecretClient per secret name; asked for any other name, Key Vault's 404."""

        def __init__(self, vault_url: str, credential: Any = None, **_: Any) -> None:
            self.vault_url = vault_url

        def _client(self, name: str) -> Any:
            if name not in secrets:
                raise LookupError(f"secret {name} not found in {self.vault_url}")
            return secrets[name]

        async def get_secret(self, name: str, version: str | None = None) -> Any:
            return await self._client(name).get_secret(name, version)

        def list_properties_of_secret_versions(self, name: str) -> Any:
            return self._client(name).list_properties_of_secret_versions(name)

        async def close(self) -> None:
            return None

    service_bus.ServiceBusClient = RecordingServiceBusClient  # type: ignore[misc, assignment]
    key_vault.SecretClient = SecretClientBySecretName  # type: ignore[misc, assignment]
    _register_failing_handlers(directory / HANDLERS)
    _record_imports(directory / WORKER_STATE)


def _record_imports(path: Path) -> None:
    found: dict[str, str | None] = {}
    for name in PROBED_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent package is missing
            spec = None
        found[name] = None if spec is None else str(spec.origin or spec.submodule_search_locations)
    path.write_text(json.dumps({"sysPath": sys.path, "found": found}), encoding="utf-8")


def _register_failing_handlers(path: Path) -> None:
    if not path.exists():
        return
    from shared.handlers import registry

    for event_type in json.loads(path.read_text(encoding="utf-8")).get("failing", []):
        @registry.on(event_type)
        async def fail(event: Any, context: Any, _type: str = event_type) -> None:
            raise HandlerFailure(f"the {_type} handler failed (a test's failing handler)")
