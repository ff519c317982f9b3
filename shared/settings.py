"""Every setting the app reads, read and validated in one place.

`load_settings()` reads the environment once and fails fast with a `SettingsError` that names
each missing or malformed setting, says what was expected and what to do. Nothing else in the
package reads `os.environ` for its own configuration.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .events import is_unicode

# Development token used by the local host when SMARTCAR_MANAGEMENT_TOKEN is unset.
# It is published in the README: never use it for a registered webhook.
DEV_MANAGEMENT_TOKEN = "local-dev-management-token"

# Names the settings module reads (app settings in Azure, environment variables locally).
SMARTCAR_MANAGEMENT_TOKEN = "SMARTCAR_MANAGEMENT_TOKEN"
SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN = "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN"
KEY_VAULT_URI = "KEY_VAULT_URI"
SMARTCAR_TOKEN_SECRET_NAME = "SMARTCAR_TOKEN_SECRET_NAME"
TOKEN_CACHE_SECONDS = "TOKEN_CACHE_SECONDS"
SERVICEBUS_NAMESPACE = "ServiceBusConnection__fullyQualifiedNamespace"
SERVICEBUS_QUEUE_NAME = "SERVICEBUS_QUEUE_NAME"
MAX_DELIVERY_COUNT = "MAX_DELIVERY_COUNT"
MAX_BODY_BYTES = "MAX_BODY_BYTES"
MAX_DELIVERY_AGE_SECONDS = "MAX_DELIVERY_AGE_SECONDS"
RETRY_BACKOFF_BASE_SECONDS = "RETRY_BACKOFF_BASE_SECONDS"
RETRY_BACKOFF_MAX_SECONDS = "RETRY_BACKOFF_MAX_SECONDS"
LOW_BATTERY_PERCENT = "LOW_BATTERY_PERCENT"
LOCAL_STATE_DIR = "LOCAL_STATE_DIR"
APPLICATIONINSIGHTS_CONNECTION_STRING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
SPILL_CONTAINER_NAME = "SPILL_CONTAINER_NAME"
# The host's storage connection, `AzureWebJobsStorage`, read by the Functions host's own rules:
# a connection string in the setting itself (an exact match wins), else the identity-based
# `__blobServiceUri`, else `__accountName` (public cloud only). It also holds the spill container.
STORAGE_CONNECTION_STRING = "AzureWebJobsStorage"
STORAGE_BLOB_SERVICE_URI = "AzureWebJobsStorage__blobServiceUri"
STORAGE_ACCOUNT_NAME = "AzureWebJobsStorage__accountName"
# The identity-based table endpoint of the same account (the vehicle state store); without it,
# the public-cloud endpoint of `__accountName`.
STORAGE_TABLE_SERVICE_URI = "AzureWebJobsStorage__tableServiceUri"
# The vehicle state store (shared/vehicle_state): `on` (default) or `off`, and its table.
VEHICLE_STATE_STORE = "VEHICLE_STATE_STORE"
VEHICLE_STATE_TABLE = "VEHICLE_STATE_TABLE"
# The app's user-assigned identity: with it, one ManagedIdentityCredential per process.
AZURE_CLIENT_ID = "AZURE_CLIENT_ID"
# Local host only: what host.json's functionTimeout is to the Functions host in Azure.
FUNCTION_TIMEOUT_SECONDS = "FUNCTION_TIMEOUT_SECONDS"

#: The app's host.json, deployed next to `shared/`; its `functionTimeout` is the default of
#: FUNCTION_TIMEOUT_SECONDS, so the local bound and Azure's cannot drift apart.
HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"

# The local inspector page's port (shared/local/inspector_server.py); default PORT + 1.
INSPECTOR_PORT = "INSPECTOR_PORT"
# The local host's cap on open client connections (shared/local/connections.py).
LOCAL_MAX_CONNECTIONS = "LOCAL_MAX_CONNECTIONS"

#: Every name `load_settings` reads.
APP_SETTINGS: frozenset[str] = frozenset(
    {
        SMARTCAR_MANAGEMENT_TOKEN,
        SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN,
        KEY_VAULT_URI,
        SMARTCAR_TOKEN_SECRET_NAME,
        TOKEN_CACHE_SECONDS,
        SERVICEBUS_NAMESPACE,
        SERVICEBUS_QUEUE_NAME,
        MAX_DELIVERY_COUNT,
        MAX_BODY_BYTES,
        MAX_DELIVERY_AGE_SECONDS,
        RETRY_BACKOFF_BASE_SECONDS,
        RETRY_BACKOFF_MAX_SECONDS,
        LOW_BATTERY_PERCENT,
        LOCAL_STATE_DIR,
        APPLICATIONINSIGHTS_CONNECTION_STRING,
        SPILL_CONTAINER_NAME,
        STORAGE_CONNECTION_STRING,
        STORAGE_BLOB_SERVICE_URI,
        STORAGE_ACCOUNT_NAME,
        STORAGE_TABLE_SERVICE_URI,
        VEHICLE_STATE_STORE,
        VEHICLE_STATE_TABLE,
        AZURE_CLIENT_ID,
        INSPECTOR_PORT,
        FUNCTION_TIMEOUT_SECONDS,
        LOCAL_MAX_CONNECTIONS,
    }
)

#: Read only when running outside Azure; never set by the Bicep templates.
LOCAL_ONLY_SETTINGS: frozenset[str] = frozenset(
    {
        SMARTCAR_MANAGEMENT_TOKEN,
        SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN,
        LOCAL_STATE_DIR,
        STORAGE_CONNECTION_STRING,
        FUNCTION_TIMEOUT_SECONDS,
        INSPECTOR_PORT,
        LOCAL_MAX_CONNECTIONS,
    }
)

#: Read by the Functions host or the Azure SDKs, not by this module; Bicep sets them.
HOST_SETTINGS: frozenset[str] = frozenset(
    {
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
        "ServiceBusConnection__credential",
        "ServiceBusConnection__clientId",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        # The Functions host's own bound on a request body, read before any code runs.
        "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT",
    }
)

DEFAULTS: Mapping[str, str] = {
    SMARTCAR_TOKEN_SECRET_NAME: "smartcar-management-token",
    TOKEN_CACHE_SECONDS: "300",
    SERVICEBUS_QUEUE_NAME: "smartcar-events",
    MAX_DELIVERY_COUNT: "5",
    MAX_BODY_BYTES: "196608",
    MAX_DELIVERY_AGE_SECONDS: "900",
    RETRY_BACKOFF_BASE_SECONDS: "2",
    RETRY_BACKOFF_MAX_SECONDS: "60",
    LOW_BATTERY_PERCENT: "20",
    LOCAL_STATE_DIR: ".local",
    SPILL_CONTAINER_NAME: "spill",
    VEHICLE_STATE_STORE: "on",
    VEHICLE_STATE_TABLE: "vehiclestate",
    LOCAL_MAX_CONNECTIONS: "1000",
}

_CONTAINER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{1,61})[a-z0-9]")
_ACCOUNT_NAME = re.compile(r"[a-z0-9]{3,24}")
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{2,62}")

# A delivery older than MAX_DELIVERY_AGE_SECONDS at receipt is dead-lettered, never processed.
# At least Smartcar's retry schedule (about 3 minutes) with margin, so no genuine retry is
# stale; at most the queue's duplicate-detection window (one hour, Service Bus and local), so
# every replay is either a duplicate or stale.
MIN_DELIVERY_AGE_SECONDS = 300
#: The largest MAX_BODY_BYTES with Service Bus: a Standard queue's 256 KB message less its 64
#: KB of headers (application properties included). A body over it might never be queued:
#: spilled, then refused by every re-drive. Also the default; Smartcar sends at most 50 KB.
MAX_BODY_BYTES_LIMIT = 196608
MAX_DELIVERY_AGE_LIMIT_SECONDS = 3600
#: A DNS host name of two labels or more (a Service Bus namespace's): letters, digits and
#: inner hyphens per label. Not a URL, not the example file's `<your-namespace>` placeholder.
_HOST_NAME = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                        r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: RETRY_BACKOFF_BASE_SECONDS and _MAX_SECONDS at most: a week. A retry copy is scheduled at
#: now + the delay, and a delay of 1e12 s lies past the last date a timestamp can hold: every
#: failed attempt then failed to schedule its retry, and was redelivered without backoff.
MAX_RETRY_BACKOFF_SECONDS = 7 * 86400

# Set by App Service / Functions on every Azure instance; its presence means "in Azure".
_AZURE_MARKER = "WEBSITE_SITE_NAME"


class SettingsError(ValueError):
    """One or more settings are missing or malformed; the message names each of them."""


@dataclass(frozen=True, slots=True)
class Settings:
    in_azure: bool
    # The signing tokens: kept out of repr (and so out of logs and tracebacks).
    management_token: str | None = field(repr=False)
    previous_management_token: str | None = field(repr=False)
    using_dev_token: bool
    key_vault_uri: str | None
    token_secret_name: str
    token_cache_seconds: float
    servicebus_namespace: str | None
    queue_name: str
    max_delivery_count: int
    max_body_bytes: int
    retry_backoff_base_seconds: float
    retry_backoff_max_seconds: float
    low_battery_percent: float
    local_state_dir: Path
    appinsights_connection_string: str | None
    spill_container_name: str = DEFAULTS[SPILL_CONTAINER_NAME]
    storage_account_name: str | None = None
    max_delivery_age_seconds: float = float(DEFAULTS[MAX_DELIVERY_AGE_SECONDS])
    storage_blob_service_uri: str | None = None
    # May hold an account key: kept out of repr (and so out of logs and tracebacks).
    storage_connection_string: str | None = field(default=None, repr=False)
    azure_client_id: str | None = None
    #: None: the local host's PORT + 1.
    inspector_port: int | None = None
    #: Bounds every delivery on the local host (host.json `functionTimeout` in Azure).
    function_timeout_seconds: float = 300.0
    #: VEHICLE_STATE_STORE: False when `off`.
    vehicle_state_store: bool = True
    vehicle_state_table: str = DEFAULTS[VEHICLE_STATE_TABLE]
    storage_table_service_uri: str | None = None
    #: The local host's open client connections at most (fewer under a low descriptor limit).
    local_max_connections: int = int(DEFAULTS[LOCAL_MAX_CONNECTIONS])

    @property
    def token_source(self) -> str:
        """`keyvault` when KEY_VAULT_URI is set, else `environment`."""
        return "keyvault" if self.key_vault_uri else "environment"

    @property
    def queue_backend(self) -> str:
        """`servicebus` when a namespace is configured, else the embedded `local` queue."""
        return "servicebus" if self.servicebus_namespace else "local"

    @property
    def spill_blob_account_url(self) -> str | None:
        """The identity-based blob endpoint of the host's storage account, when configured:
        `__blobServiceUri` as given, else the public-cloud endpoint of `__accountName`."""
        if self.storage_blob_service_uri:
            return self.storage_blob_service_uri
        if not self.storage_account_name:
            return None
        return f"https://{self.storage_account_name}.blob.core.windows.net/"

    @property
    def table_account_url(self) -> str | None:
        """The identity-based table endpoint of the host's storage account, when configured:
        `__tableServiceUri` as given, else the public-cloud endpoint of `__accountName`."""
        if self.storage_table_service_uri:
            return self.storage_table_service_uri
        if not self.storage_account_name:
            return None
        return f"https://{self.storage_account_name}.table.core.windows.net/"

    @property
    def vehicle_state_backend(self) -> str:
        """`off`, `table` (the storage account's, as for the spill store) or `sqlite`
        (LOCAL_STATE_DIR/vehicle_state.sqlite3)."""
        if not self.vehicle_state_store:
            return "off"
        if self.storage_connection_string or self.table_account_url:
            return "table"
        return "sqlite"

    @property
    def spill_backend(self) -> str:
        """`blob` (container in the storage account) or `local` (LOCAL_STATE_DIR/spill)."""
        if self.storage_connection_string or self.spill_blob_account_url:
            return "blob"
        return "local"


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        default = DEFAULTS.get(name)
        return default
    return value.strip()


def _finite(value: float) -> bool:
    """Every numeric setting's first rule. NaN passes any `<` check (nan < 1 is False) and
    infinity clears any minimum; either then breaks what it feeds (a retry that cannot be
    scheduled, a token cache that never expires)."""
    return math.isfinite(value)


_TIMESPAN = re.compile(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2}(?:\.\d+)?)")


def function_timeout_from_host_json(path: Path = HOST_JSON) -> float:
    """host.json's `functionTimeout` (a TimeSpan, `[d.]hh:mm:ss[.fff]`) in seconds.

    ValueError says what was found; `-1` (unbounded, allowed on some plans) is refused here
    because the local host always bounds a delivery.
    """
    try:
        # Bytes: json detects UTF-8 (with or without a byte order mark), -16 and -32 itself.
        value = json.loads(path.read_bytes()).get("functionTimeout")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot read functionTimeout from {path}: {exc}") from None
    match = _TIMESPAN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"functionTimeout in {path} must be a TimeSpan such as \"00:05:00\", got {value!r}"
        )
    days, hours, minutes, seconds = match.groups()
    total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if total <= 0:
        raise ValueError(f"functionTimeout in {path} must be positive, got {value!r}")
    return total


def load_settings(
    environ: Mapping[str, str] | None = None, *, host_json: Path = HOST_JSON
) -> Settings:
    """Read and validate every setting; raise `SettingsError` naming all problems at once.

    `host_json` gives FUNCTION_TIMEOUT_SECONDS its default (tests point it elsewhere)."""
    env = os.environ if environ is None else environ
    problems: list[str] = []

    def number(name: str, *, kind: type[int] | type[float], minimum: float,
               maximum: float = math.inf) -> float:
        raw = _get(env, name)
        assert raw is not None  # every numeric setting has a default
        try:
            value = kind(raw)
        except ValueError:
            what = "whole number" if kind is int else "number"
            problems.append(f"{name} must be a {what}, got {raw!r}")
            return float(DEFAULTS[name])
        if not _finite(value):
            problems.append(f"{name} must be a finite number, got {raw!r}")
        elif value < minimum:
            problems.append(f"{name} must be at least {minimum}, got {raw!r}")
        elif value > maximum:
            problems.append(f"{name} must be at most {maximum:g}, got {raw!r}")
        return value

    in_azure = bool(env.get(_AZURE_MARKER))
    key_vault_uri = _get(env, KEY_VAULT_URI)
    if key_vault_uri is not None:
        parsed = urlparse(key_vault_uri)
        if parsed.scheme != "https" or not parsed.netloc:
            problems.append(
                f"{KEY_VAULT_URI} must be the vault's https URI "
                f"(https://<name>.vault.azure.net/), got {key_vault_uri!r}"
            )

    token = _get(env, SMARTCAR_MANAGEMENT_TOKEN)
    previous = _get(env, SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN)
    for name, value in ((SMARTCAR_MANAGEMENT_TOKEN, token),
                        (SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN, previous)):
        # Bytes the environment could not decode arrive as lone surrogates, which no HMAC
        # key can be made of: every signed request would fail. Never echoed: it is a secret.
        if not is_unicode(value):
            problems.append(
                f"{name} is not valid UTF-8 text (the environment holds bytes that do not "
                "decode): set it to the token exactly as Smartcar's Dashboard shows it"
            )
    using_dev_token = False
    if in_azure:
        for name, value in ((SMARTCAR_MANAGEMENT_TOKEN, token),
                            (SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN, previous)):
            if value is not None:
                # A token in an app setting is a secret outside Key Vault, and not the one the
                # app verifies with (Key Vault wins): refused, as the contract says local only.
                problems.append(
                    f"{name} is set, which is for local development only: in Azure the signing "
                    f"token is read from Key Vault (remove it; keep the token in the secret "
                    f"{SMARTCAR_TOKEN_SECRET_NAME} names, in the vault of {KEY_VAULT_URI})"
                )
    if key_vault_uri is None and (token is None or in_azure):
        if in_azure:
            problems.append(
                f"{KEY_VAULT_URI} is not set: in Azure the signing token is read from Key Vault "
                f"(set {KEY_VAULT_URI} and {SMARTCAR_TOKEN_SECRET_NAME})"
            )
        else:
            token = DEV_MANAGEMENT_TOKEN
            using_dev_token = True

    namespace = _get(env, SERVICEBUS_NAMESPACE)
    if namespace is not None and not _HOST_NAME.fullmatch(namespace):
        problems.append(
            f"{SERVICEBUS_NAMESPACE} must be a host name such as "
            f"<namespace>.servicebus.windows.net, got {namespace!r}"
        )
    if namespace is None and in_azure:
        problems.append(
            f"{SERVICEBUS_NAMESPACE} is not set: in Azure events are queued in Service Bus"
        )

    queue_name = _get(env, SERVICEBUS_QUEUE_NAME) or DEFAULTS[SERVICEBUS_QUEUE_NAME]
    max_delivery_count = int(number(MAX_DELIVERY_COUNT, kind=int, minimum=1))
    max_body_bytes = int(number(MAX_BODY_BYTES, kind=int, minimum=1024))
    # Only with Service Bus: the embedded queue holds a body of any size.
    if max_body_bytes > MAX_BODY_BYTES_LIMIT and namespace is not None:
        problems.append(
            f"{MAX_BODY_BYTES} must be at most {MAX_BODY_BYTES_LIMIT} (Service Bus Standard's "
            "256 KB message less its 64 KB of headers: a larger body may never be queued), "
            f"got {_get(env, MAX_BODY_BYTES)!r}"
        )
    max_connections = int(number(LOCAL_MAX_CONNECTIONS, kind=int, minimum=1))
    backoff_base = number(RETRY_BACKOFF_BASE_SECONDS, kind=float, minimum=0,
                          maximum=MAX_RETRY_BACKOFF_SECONDS)
    backoff_max = number(RETRY_BACKOFF_MAX_SECONDS, kind=float, minimum=0,
                         maximum=MAX_RETRY_BACKOFF_SECONDS)
    token_cache = number(TOKEN_CACHE_SECONDS, kind=float, minimum=1)
    raw_low_battery = _get(env, LOW_BATTERY_PERCENT)
    try:
        low_battery = float(raw_low_battery or DEFAULTS[LOW_BATTERY_PERCENT])
    except ValueError:
        low_battery = math.nan
    if not 0 <= low_battery <= 100:  # NaN too: the threshold would never be crossed
        problems.append(f"{LOW_BATTERY_PERCENT} must be a percentage from 0 to 100, "
                        f"got {raw_low_battery!r}")
    max_age = number(MAX_DELIVERY_AGE_SECONDS, kind=float, minimum=-math.inf)
    if not MIN_DELIVERY_AGE_SECONDS <= max_age <= MAX_DELIVERY_AGE_LIMIT_SECONDS:  # NaN too
        problems.append(
            f"{MAX_DELIVERY_AGE_SECONDS} must be between {MIN_DELIVERY_AGE_SECONDS} and "
            f"{MAX_DELIVERY_AGE_LIMIT_SECONDS} seconds (at least Smartcar's ~3-minute retry "
            "schedule, so no genuine retry is stale; at most the queue's one-hour duplicate-"
            f"detection window, so a replay is a duplicate or stale), "
            f"got {_get(env, MAX_DELIVERY_AGE_SECONDS)!r}"
        )

    function_timeout = 300.0
    raw_timeout = _get(env, FUNCTION_TIMEOUT_SECONDS)
    if raw_timeout is not None:
        try:
            function_timeout = float(raw_timeout)
        except ValueError:
            function_timeout = math.nan
        if not (_finite(function_timeout) and function_timeout > 0):
            problems.append(
                f"{FUNCTION_TIMEOUT_SECONDS} must be a positive number of seconds, "
                f"got {raw_timeout!r}"
            )
    elif not in_azure:  # in Azure the Functions host reads host.json itself
        try:
            function_timeout = function_timeout_from_host_json(host_json)
        except ValueError as exc:
            problems.append(f"{FUNCTION_TIMEOUT_SECONDS} is unset and its default failed: {exc}")

    spill_container = _get(env, SPILL_CONTAINER_NAME) or DEFAULTS[SPILL_CONTAINER_NAME]
    if not _CONTAINER_NAME.fullmatch(spill_container) or "--" in spill_container:
        problems.append(
            f"{SPILL_CONTAINER_NAME} must be a blob container name (3-63 lowercase letters, "
            f"digits and single hyphens), got {spill_container!r}"
        )
    account = _get(env, STORAGE_ACCOUNT_NAME)
    if account is not None and not _ACCOUNT_NAME.fullmatch(account):
        problems.append(
            f"{STORAGE_ACCOUNT_NAME} must be a storage account name (3-24 lowercase letters "
            f"and digits), got {account!r}"
        )
    blob_uri = _get(env, STORAGE_BLOB_SERVICE_URI)
    if blob_uri is not None:
        if not _is_https_endpoint(blob_uri):
            problems.append(
                f"{STORAGE_BLOB_SERVICE_URI} must be the https blob endpoint of the storage "
                f"account (https://<account>.blob.core.windows.net, or your cloud's), "
                f"got {blob_uri!r}"
            )
    connection_string = _get(env, STORAGE_CONNECTION_STRING)
    if connection_string is not None:
        if in_azure:
            problems.append(
                f"{STORAGE_CONNECTION_STRING} holds a connection string, which is for local "
                f"development only: in Azure the app reaches storage with its identity "
                f"(remove it; set {STORAGE_ACCOUNT_NAME} or {STORAGE_BLOB_SERVICE_URI})"
            )
        elif not _is_storage_connection_string(connection_string):
            # The value may hold an account key: never echo it.
            problems.append(
                f"{STORAGE_CONNECTION_STRING} is not a storage connection string: expected "
                f"UseDevelopmentStorage=true (Azurite) or key=value pairs with AccountName or "
                f"BlobEndpoint and AccountKey or SharedAccessSignature"
            )
    if account is None and blob_uri is None and in_azure:
        problems.append(
            f"{STORAGE_ACCOUNT_NAME} (or {STORAGE_BLOB_SERVICE_URI}) is not set: in Azure "
            f"events that Service Bus cannot take are spilled to the {spill_container!r} "
            f"container of that storage account"
        )

    store_switch = (_get(env, VEHICLE_STATE_STORE) or DEFAULTS[VEHICLE_STATE_STORE]).lower()
    if store_switch not in ("on", "off"):
        problems.append(
            f"{VEHICLE_STATE_STORE} must be on or off, got {_get(env, VEHICLE_STATE_STORE)!r}"
        )
    table_name = _get(env, VEHICLE_STATE_TABLE) or DEFAULTS[VEHICLE_STATE_TABLE]
    if not _TABLE_NAME.fullmatch(table_name):
        problems.append(
            f"{VEHICLE_STATE_TABLE} must be a table name (3-63 letters and digits, starting "
            f"with a letter), got {table_name!r}"
        )
    table_uri = _get(env, STORAGE_TABLE_SERVICE_URI)
    if table_uri is not None:
        if not _is_https_endpoint(table_uri):
            problems.append(
                f"{STORAGE_TABLE_SERVICE_URI} must be the https table endpoint of the storage "
                f"account (https://<account>.table.core.windows.net, or your cloud's), "
                f"got {table_uri!r}"
            )

    inspector_port: int | None = None
    raw_port = _get(env, INSPECTOR_PORT)
    if raw_port is not None:
        if not (raw_port.isascii() and raw_port.isdigit()) or int(raw_port) > 65535:
            problems.append(
                f"{INSPECTOR_PORT} must be a TCP port (0-65535, 0 for any free port), "
                f"got {raw_port!r}; leave it unset for the local host's PORT + 1"
            )
        else:
            inspector_port = int(raw_port)

    appinsights = _get(env, APPLICATIONINSIGHTS_CONNECTION_STRING)
    if appinsights is not None and (why := _appinsights_problem(appinsights)) is not None:
        # Not echoed: refused here rather than by the exporter on the first request (a 500,
        # then telemetry silently off).
        problems.append(
            f"{APPLICATIONINSIGHTS_CONNECTION_STRING} must be the Application Insights "
            "resource's connection string (InstrumentationKey=<GUID>;IngestionEndpoint=https://"
            f"...), but {why}"
        )

    if problems:
        raise SettingsError(
            "Invalid configuration: "
            + "; ".join(problems)
            + ". See docs/configuration.md and local.settings.json.example."
        )
    return Settings(
        in_azure=in_azure,
        management_token=token,
        previous_management_token=previous,
        using_dev_token=using_dev_token,
        key_vault_uri=key_vault_uri,
        token_secret_name=(_get(env, SMARTCAR_TOKEN_SECRET_NAME)
                           or DEFAULTS[SMARTCAR_TOKEN_SECRET_NAME]),
        token_cache_seconds=token_cache,
        servicebus_namespace=namespace,
        queue_name=queue_name,
        max_delivery_count=max_delivery_count,
        max_body_bytes=max_body_bytes,
        retry_backoff_base_seconds=backoff_base,
        retry_backoff_max_seconds=backoff_max,
        low_battery_percent=low_battery,
        local_state_dir=Path(_get(env, LOCAL_STATE_DIR) or DEFAULTS[LOCAL_STATE_DIR]),
        appinsights_connection_string=appinsights,
        spill_container_name=spill_container,
        storage_account_name=account,
        max_delivery_age_seconds=max_age,
        storage_blob_service_uri=blob_uri,
        storage_connection_string=connection_string,
        azure_client_id=_get(env, AZURE_CLIENT_ID),
        inspector_port=inspector_port,
        function_timeout_seconds=function_timeout,
        vehicle_state_store=store_switch != "off",
        vehicle_state_table=table_name,
        storage_table_service_uri=table_uri,
        local_max_connections=max_connections,
    )

def _is_https_endpoint(uri: str) -> bool:
    """A storage service endpoint as Azure gives it: https, a host, no query (no SAS)."""
    parsed = urlparse(uri)
    return parsed.scheme == "https" and bool(parsed.netloc) and not parsed.query


def _is_storage_connection_string(value: str) -> bool:
    """The shape the Storage SDK accepts: `;`-separated key=value pairs naming an endpoint and
    a credential, or the Azurite shortcut. Read as the SDK reads it: names in any letter case,
    but nothing trimmed (` AccountKey` is not `AccountKey` to the SDK)."""
    pairs = [part.split("=", 1) for part in value.rstrip(";").split(";")]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        return False
    keys = {key.lower(): val for key, val in pairs}
    if keys.get("usedevelopmentstorage") == "true":  # the SDK matches it case-sensitively
        return True
    has_endpoint = bool(keys.get("accountname") or keys.get("blobendpoint"))
    has_credential = bool(keys.get("accountkey") or keys.get("sharedaccesssignature"))
    return has_endpoint and has_credential


# What the Azure Monitor exporter's connection-string parser (azure-monitor-opentelemetry-
# exporter, `_connection_string_parser.py`, private) accepts; tests/test_settings.py checks
# this against it, so an upgrade that changes the rules fails there, not on a request.
_IKEY = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _appinsights_problem(value: str) -> str | None:
    """Why the exporter would refuse `value` as a connection string, None if it would not."""
    pairs = [part.split("=") for part in value.split(";")]
    if any(len(pair) != 2 for pair in pairs):
        return "it is not ;-separated Name=value pairs"
    keys = {name.lower(): val for name, val in pairs}
    auth = keys.get("authorization")
    if auth is not None and auth.lower() != "ikey":
        return "its Authorization is not ikey"
    ikey = keys.get("instrumentationkey")
    if not ikey:
        return "it has no InstrumentationKey"
    if not _IKEY.fullmatch(ikey):
        return "its InstrumentationKey is not a lower-case GUID"
    return None
