"""The vehicle state store the settings choose (`Settings.vehicle_state_backend`).

- `off` (VEHICLE_STATE_STORE=off): no store; processing runs the handlers as before.
- `table`: the VEHICLE_STATE_TABLE table of the host's storage account, by the same rules as
  the spill store: a connection string in `AzureWebJobsStorage` first (local development with
  Azurite; the table is created on first use), else the app's identity on
  `AzureWebJobsStorage__tableServiceUri` or `__accountName`'s endpoint (Bicep creates the
  table and grants the identity its data role on it).
- `sqlite`: `LOCAL_STATE_DIR/vehicle_state.sqlite3`, so the local host needs nothing else.

Build the store once per process and reuse it (the runtime does), like every Azure client.
"""

from __future__ import annotations

from typing import Any

from ..credentials import ProcessCredential
from ..settings import (
    STORAGE_ACCOUNT_NAME,
    STORAGE_TABLE_SERVICE_URI,
    VEHICLE_STATE_STORE,
    Settings,
    SettingsError,
)
from . import VehicleStateStore


def _table_options() -> dict[str, Any]:
    # Bounded retries: a delivery must not wait out the SDK's default ~minute of backoff on a
    # storage outage; the queue's own redelivery retries later.
    return {"retry_total": 3, "retry_backoff_factor": 0.2, "retry_backoff_max": 2}


def open_store(
    settings: Settings, *, credential: ProcessCredential | None = None
) -> VehicleStateStore | None:
    """The configured store, or None when VEHICLE_STATE_STORE is `off`."""
    backend = settings.vehicle_state_backend
    if backend == "off":
        return None
    if backend == "sqlite":
        # Local only: shared/local is not deployed (.funcignore), and in Azure the settings
        # always name a storage account, so this import never runs there.
        try:
            from ..local.vehicle_state import FILE_NAME, SqliteVehicleStateStore
        except ImportError:
            raise SettingsError(
                f"{VEHICLE_STATE_STORE} is on but no storage account is configured, and the "
                f"local SQLite backend is not part of the deployed package: set "
                f"{STORAGE_ACCOUNT_NAME} (or {STORAGE_TABLE_SERVICE_URI}), or set "
                f"{VEHICLE_STATE_STORE}=off"
            ) from None
        return SqliteVehicleStateStore(settings.local_state_dir / FILE_NAME)
    from azure.data.tables.aio import TableClient

    from .table_store import TableVehicleStateStore

    name = settings.vehicle_state_table
    if settings.storage_connection_string:
        client = TableClient.from_connection_string(
            settings.storage_connection_string, name, **_table_options())
        return TableVehicleStateStore(client, create_table=True)
    url = settings.table_account_url
    assert url is not None  # vehicle_state_backend is "table" only with one
    credential = credential or ProcessCredential(settings.azure_client_id)
    client = TableClient(url, name, credential=credential.get(), **_table_options())
    return TableVehicleStateStore(client)
