"""Settings are read in one place and fail fast with messages naming the setting."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared.retry import retry_copy
from shared.settings import (
    APP_SETTINGS,
    DEFAULTS,
    DEV_MANAGEMENT_TOKEN,
    LOCAL_ONLY_SETTINGS,
    SettingsError,
    load_settings,
)

#: As the Application Insights resource shows it (a made-up key).
CONNECTION_STRING = (
    "InstrumentationKey=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0;"
    "IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/;"
    "LiveEndpoint=https://westeurope.livediagnostics.monitor.azure.com/;"
    "ApplicationId=11111111-2222-3333-4444-555555555555")


class TestDefaults:
    def test_empty_environment_is_a_valid_local_setup_with_the_dev_token(self) -> None:
        s = load_settings({})
        assert s.using_dev_token and s.management_token == DEV_MANAGEMENT_TOKEN
        assert s.queue_backend == "local" and s.token_source == "environment"
        assert s.max_body_bytes == 196608
        assert s.max_delivery_count == 5
        assert str(s.local_state_dir) == ".local"
        assert s.queue_name == "smartcar-events"

    def test_the_signing_tokens_are_kept_out_of_repr(self) -> None:
        """A Settings object in a log line or a traceback shows no token."""
        s = load_settings({"SMARTCAR_MANAGEMENT_TOKEN": "current-amt-5b1f",
                           "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN": "previous-amt-77c2"})
        assert "current-amt-5b1f" not in repr(s) and "previous-amt-77c2" not in repr(s)
        assert "using_dev_token=False" in repr(s)  # the rest is still shown

    @pytest.mark.parametrize("name", ["SMARTCAR_MANAGEMENT_TOKEN",
                                      "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN"])
    def test_a_token_that_is_not_utf8_is_refused_by_name_and_never_echoed(
        self, name: str
    ) -> None:
        """os.environ surrogate-escapes bytes that are not UTF-8; no HMAC key can be made of
        them, so every signed request and VERIFY would fail while /api/health said ok."""
        undecodable = "amt-secret-\udcff"  # what os.environ gives for the byte 0xFF
        env = {"SMARTCAR_MANAGEMENT_TOKEN": "current-amt", name: undecodable}
        with pytest.raises(SettingsError) as err:
            load_settings(env)
        assert (f"{name} is not valid UTF-8 text (the environment holds bytes that do not "
                "decode): set it to the token exactly as Smartcar's Dashboard shows it"
                in str(err.value))
        assert "amt-secret" not in str(err.value)

    def test_blank_values_count_as_unset(self) -> None:
        s = load_settings({"MAX_BODY_BYTES": "  ", "SMARTCAR_MANAGEMENT_TOKEN": ""})
        assert s.max_body_bytes == 196608 and s.using_dev_token

    def test_set_values_are_taken_over_the_defaults(self) -> None:
        """Rotating the signing token: both are read, and neither is the development one."""
        s = load_settings({"SMARTCAR_MANAGEMENT_TOKEN": "new-amt",
                           "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN": "old-amt",
                           "SERVICEBUS_QUEUE_NAME": "fleet-events",
                           "SPILL_CONTAINER_NAME": "fleet-spill",
                           "VEHICLE_STATE_TABLE": "fleetstate",
                           "APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION_STRING,
                           "SMARTCAR_TOKEN_SECRET_NAME": "fleet-amt",
                           "LOCAL_STATE_DIR": "/var/lib/fleet"})
        assert (s.management_token, s.previous_management_token) == ("new-amt", "old-amt")
        assert s.using_dev_token is False
        assert (s.queue_name, s.spill_container_name, s.vehicle_state_table) == (
            "fleet-events", "fleet-spill", "fleetstate")
        assert s.appinsights_connection_string == CONNECTION_STRING
        assert (s.token_secret_name, s.local_state_dir) == ("fleet-amt", Path("/var/lib/fleet"))

    @pytest.mark.parametrize(("name", "lowest", "field"), [
        ("MAX_DELIVERY_COUNT", "1", "max_delivery_count"),
        ("MAX_BODY_BYTES", "1024", "max_body_bytes"),
        ("LOCAL_MAX_CONNECTIONS", "1", "local_max_connections"),
        ("RETRY_BACKOFF_BASE_SECONDS", "0", "retry_backoff_base_seconds"),
        ("RETRY_BACKOFF_MAX_SECONDS", "0", "retry_backoff_max_seconds"),
        ("TOKEN_CACHE_SECONDS", "1", "token_cache_seconds"),
    ])
    def test_each_number_is_accepted_at_its_minimum(
            self, name: str, lowest: str, field: str) -> None:
        """The lowest value is allowed, and is the value used; one less is refused, named."""
        assert getattr(load_settings({name: lowest}), field) == float(lowest)
        with pytest.raises(SettingsError, match=f"{name} must be at least {lowest}, got "):
            load_settings({name: str(int(lowest) - 1)})

    def test_the_body_limit_is_accepted_at_its_maximum(self) -> None:
        """With Service Bus the default is also the largest: the contract's 196608 still
        holds. The embedded queue takes larger bodies."""
        bus = {"ServiceBusConnection__fullyQualifiedNamespace": "sb.servicebus.windows.net"}
        assert load_settings({}).max_body_bytes == 196608
        assert load_settings({"MAX_BODY_BYTES": "196608", **bus}).max_body_bytes == 196608
        assert load_settings({"MAX_BODY_BYTES": "1048576"}).max_body_bytes == 1048576

    @pytest.mark.parametrize("value", ["65536", "-1", "any", "\u0663"])  # a digit, not ASCII
    def test_an_inspector_port_that_is_no_tcp_port_is_refused(self, value: str) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"INSPECTOR_PORT": value})
        assert (f"INSPECTOR_PORT must be a TCP port (0-65535, 0 for any free port), got "
                f"{value!r}; leave it unset for the local host's PORT + 1") in str(err.value)

    @pytest.mark.parametrize(("value", "port"), [(None, None), ("8123", 8123), ("0", 0),
                                                 ("65535", 65535)])
    def test_the_inspector_port_is_read_when_set(self, value: str | None,
                                                 port: int | None) -> None:
        """Unset, the local host picks PORT + 1; 0 asks for any free port."""
        env = {} if value is None else {"INSPECTOR_PORT": value}
        assert load_settings(env).inspector_port == port

    def test_every_default_is_a_known_setting(self) -> None:
        assert set(DEFAULTS) <= APP_SETTINGS
        assert LOCAL_ONLY_SETTINGS <= APP_SETTINGS


class TestAzure:
    def test_azure_settings(self) -> None:
        s = load_settings(
            {
                "WEBSITE_SITE_NAME": "app",
                "KEY_VAULT_URI": "https://kv.vault.azure.net/",
                "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
                "AzureWebJobsStorage__accountName": "stabc123",
            }
        )
        assert s.in_azure and s.token_source == "keyvault" and s.queue_backend == "servicebus"
        assert s.spill_backend == "blob" and s.spill_container_name == "spill"
        assert s.spill_blob_account_url == "https://stabc123.blob.core.windows.net/"
        assert s.management_token is None and not s.using_dev_token
        assert s.token_secret_name == "smartcar-management-token"

    @pytest.mark.parametrize("name", ["SMARTCAR_MANAGEMENT_TOKEN",
                                      "SMARTCAR_PREVIOUS_MANAGEMENT_TOKEN"])
    def test_a_local_only_token_setting_is_refused_in_azure(self, name: str) -> None:
        """The contract says local only: in Azure a token in an app setting is a secret
        outside Key Vault, and one the app never verifies with (Key Vault wins)."""
        with pytest.raises(SettingsError) as err:
            load_settings({"WEBSITE_SITE_NAME": "app",
                           "KEY_VAULT_URI": "https://kv.vault.azure.net/",
                           "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
                           "AzureWebJobsStorage__accountName": "stabc123",
                           name: "plain-secret-amt"})
        message = str(err.value)
        assert f"{name} is set, which is for local development only" in message
        assert "plain-secret-amt" not in message

    def test_a_token_setting_in_azure_does_not_hide_a_missing_vault(self) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"WEBSITE_SITE_NAME": "app", "SMARTCAR_MANAGEMENT_TOKEN": "amt"})
        assert "KEY_VAULT_URI is not set" in str(err.value)

    def test_in_azure_missing_settings_are_all_named(self) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"WEBSITE_SITE_NAME": "app"})
        message = str(err.value)
        assert "KEY_VAULT_URI is not set" in message
        assert "ServiceBusConnection__fullyQualifiedNamespace is not set" in message
        assert "AzureWebJobsStorage__accountName (or AzureWebJobsStorage__blobServiceUri) is not set" in message


class TestMalformed:
    def test_every_problem_is_named_at_once_with_where_to_look(self) -> None:
        """One start-up failure lists every problem, so a deploy is fixed in one round."""
        with pytest.raises(SettingsError) as err:
            load_settings({"MAX_BODY_BYTES": "10", "MAX_DELIVERY_COUNT": "0"})
        assert str(err.value) == (
            "Invalid configuration: MAX_DELIVERY_COUNT must be at least 1, got '0'; "
            "MAX_BODY_BYTES must be at least 1024, got '10'. See docs/configuration.md and "
            "local.settings.json.example.")

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES must be a whole number, got 'lots'"),
            ({"MAX_BODY_BYTES": "10"}, "MAX_BODY_BYTES must be at least 1024"),
            # A body Service Bus Standard might refuse would be spilled and never re-driven.
            ({"MAX_BODY_BYTES": "196609",
              "ServiceBusConnection__fullyQualifiedNamespace": "sb.servicebus.windows.net"},
             "MAX_BODY_BYTES must be at most 196608 (Service Bus Standard's 256 KB message "
             "less its 64 KB of headers: a larger body may never be queued), got '196609'"),
            ({"MAX_DELIVERY_COUNT": "0"}, "MAX_DELIVERY_COUNT must be at least 1"),
            ({"RETRY_BACKOFF_BASE_SECONDS": "x"}, "RETRY_BACKOFF_BASE_SECONDS must be a number"),
            ({"KEY_VAULT_URI": "kv.vault.azure.net"}, "KEY_VAULT_URI must be the vault's https URI"),
            # The token must not travel in clear text, nor go to a host the URI does not name.
            ({"KEY_VAULT_URI": "http://kv.vault.azure.net/"},
             "KEY_VAULT_URI must be the vault's https URI"),
            ({"KEY_VAULT_URI": "https:kv.vault.azure.net"},
             "KEY_VAULT_URI must be the vault's https URI"),
            ({"SPILL_CONTAINER_NAME": "Spill_Box"}, "SPILL_CONTAINER_NAME must be a blob container name"),
            ({"SPILL_CONTAINER_NAME": "spill--box"},  # Blob refuses consecutive hyphens
             "SPILL_CONTAINER_NAME must be a blob container name"),
            ({"AzureWebJobsStorage__accountName": "my-account"}, "AzureWebJobsStorage__accountName must be a storage account name"),
            (
                {"ServiceBusConnection__fullyQualifiedNamespace": "Endpoint=sb://x/;Key=y"},
                "ServiceBusConnection__fullyQualifiedNamespace must be a host name",
            ),
            (  # a URL, though it names a host
                {"ServiceBusConnection__fullyQualifiedNamespace": "sb://x.servicebus.windows.net"},
                "ServiceBusConnection__fullyQualifiedNamespace must be a host name",
            ),
            (  # local.settings.json.example's placeholder, left as it is
                {"ServiceBusConnection__fullyQualifiedNamespace":
                 "<your-namespace>.servicebus.windows.net"},
                "ServiceBusConnection__fullyQualifiedNamespace must be a host name",
            ),
            ({"ServiceBusConnection__fullyQualifiedNamespace": "my ns.servicebus.windows.net"},
             "ServiceBusConnection__fullyQualifiedNamespace must be a host name"),
            ({"ServiceBusConnection__fullyQualifiedNamespace": "-ns.servicebus.windows.net"},
             "ServiceBusConnection__fullyQualifiedNamespace must be a host name"),
        ],
    )
    def test_malformed_setting_is_named(self, env: dict[str, str], message: str) -> None:
        with pytest.raises(SettingsError, match="Invalid configuration") as err:
            load_settings(env)
        assert message in str(err.value)

    def test_several_problems_are_reported_together(self) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"MAX_BODY_BYTES": "x", "MAX_DELIVERY_COUNT": "y"})
        assert "MAX_BODY_BYTES" in str(err.value) and "MAX_DELIVERY_COUNT" in str(err.value)


class TestFiniteNumbers:
    """NaN passes every `<` check and infinity clears every minimum: refused by name, so the
    first handler failure does not crash scheduling its retry and a token cache expires."""

    @pytest.mark.parametrize("name", ["RETRY_BACKOFF_BASE_SECONDS", "RETRY_BACKOFF_MAX_SECONDS",
                                      "TOKEN_CACHE_SECONDS"])
    @pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
    def test_a_value_that_is_not_finite_is_refused_by_name(self, name: str, value: str) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({name: value})
        assert f"{name} must be a finite number, got {value!r}" in str(err.value)

    def test_finite_values_still_load(self) -> None:
        s = load_settings({"RETRY_BACKOFF_BASE_SECONDS": "0.5", "RETRY_BACKOFF_MAX_SECONDS": "1e3",
                           "TOKEN_CACHE_SECONDS": "60"})
        assert (s.retry_backoff_base_seconds, s.retry_backoff_max_seconds,
                s.token_cache_seconds) == (0.5, 1000.0, 60.0)

    @pytest.mark.parametrize("name", ["RETRY_BACKOFF_BASE_SECONDS", "RETRY_BACKOFF_MAX_SECONDS"])
    def test_a_backoff_is_at_most_a_week(self, name: str) -> None:
        # A retry is scheduled at now + the delay: 1e12 s lies past the last date a timestamp
        # holds, and every retry failed to be scheduled.
        assert getattr(load_settings({name: "604800"}), name.lower()) == 604800.0
        with pytest.raises(SettingsError) as err:
            load_settings({name: "604801"})
        assert f"{name} must be at most 604800, got '604801'" in str(err.value)
        with pytest.raises(SettingsError):
            load_settings({name: "1e12"})

    def test_the_longest_backoff_schedules_a_retry(self) -> None:
        settings = load_settings({"RETRY_BACKOFF_BASE_SECONDS": "604800",
                                  "RETRY_BACKOFF_MAX_SECONDS": "604800"})
        copy = retry_copy(b"{}", {"attempt": "30"}, event_key="e", error=ValueError(),
                          now=time.time(), base=settings.retry_backoff_base_seconds,
                          maximum=settings.retry_backoff_max_seconds)
        assert copy.delay_seconds == 604800.0


AZURE = {
    "WEBSITE_SITE_NAME": "app",
    "KEY_VAULT_URI": "https://kv.vault.azure.net/",
    "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
}
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class TestHostStorageConventions:
    """`AzureWebJobsStorage` is read the way the Functions host reads it: a connection string
    in the setting itself wins; else `__blobServiceUri`; else `__accountName` (public cloud)."""

    def test_blob_service_uri_serves_sovereign_clouds_and_wins_over_the_account_name(self) -> None:
        s = load_settings({
            **AZURE,
            "AzureWebJobsStorage__accountName": "stabc123",
            "AzureWebJobsStorage__blobServiceUri": "https://stabc123.blob.core.chinacloudapi.cn/",
        })
        assert s.spill_backend == "blob"
        assert s.spill_blob_account_url == "https://stabc123.blob.core.chinacloudapi.cn/"

    def test_blob_service_uri_alone_is_enough_in_azure(self) -> None:
        s = load_settings({**AZURE, "AzureWebJobsStorage__blobServiceUri": "https://st.example.net"})
        assert s.spill_blob_account_url == "https://st.example.net"

    def test_the_account_name_alone_means_the_public_cloud_endpoint(self) -> None:
        s = load_settings({**AZURE, "AzureWebJobsStorage__accountName": "stabc123"})
        assert s.spill_blob_account_url == "https://stabc123.blob.core.windows.net/"

    def test_azurite_connection_string_selects_blob_locally(self) -> None:
        s = load_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
        assert s.spill_backend == "blob"
        assert s.storage_connection_string == "UseDevelopmentStorage=true"
        assert s.spill_blob_account_url is None

    def test_a_full_connection_string_is_accepted_locally_and_kept_out_of_repr(self) -> None:
        conn = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;")
        s = load_settings({"AzureWebJobsStorage": conn})
        assert s.storage_connection_string == conn
        assert AZURITE_KEY not in repr(s)

    def test_a_connection_string_in_azure_is_refused(self) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({**AZURE, "AzureWebJobsStorage__accountName": "stabc123",
                           "AzureWebJobsStorage": f"AccountName=st;AccountKey={AZURITE_KEY}"})
        message = str(err.value)
        assert "AzureWebJobsStorage holds a connection string, which is for local development only" in message
        assert AZURITE_KEY not in message

    @pytest.mark.parametrize("conn", [
        f"AccountName=st;AccountKey={AZURITE_KEY}",  # the account's public-cloud endpoints
        "BlobEndpoint=https://st.blob.core.windows.net/;"
        "SharedAccessSignature=sv=2024-11-04&ss=b&srt=co&sp=rwdlac&se=2030-01-01&sig=c2ln",
        "AccountName=X;AccountKey=X;",  # one character each, and a trailing separator
        f"accountname=st;accountkey={AZURITE_KEY}",  # names in any letter case
    ])
    def test_each_shape_the_storage_sdk_takes_is_accepted(self, conn: str) -> None:
        """An endpoint (an account name or a blob endpoint) and a credential (a key or a
        SAS): the shapes the Storage SDK builds a client from, here Azure's own parser."""
        from azure.storage.blob import BlobServiceClient

        kept = load_settings({"AzureWebJobsStorage": conn}).storage_connection_string
        assert kept == conn.strip()
        client = BlobServiceClient.from_connection_string(kept)
        assert client.url.startswith("https://")
        assert client.credential is not None or "sig=" in client.url  # a key, or the SAS

    @pytest.mark.parametrize("value", [
        "not a connection string",
        f"AccountKey={AZURITE_KEY}",  # no account, no endpoint
        "AccountName=st",  # no credential
        "UseDevelopmentStorage=True",  # the SDK only knows lower-case true
        f"=orphan;AccountName=st;AccountKey={AZURITE_KEY}",  # a value without a name
        "BlobEndpoint=https://st.blob.core.windows.net/",  # an endpoint, no credential
        f"AccountName=st; AccountKey={AZURITE_KEY}",  # " AccountKey" is no name the SDK knows
    ])
    def test_a_malformed_connection_string_is_named_without_echoing_it(self, value: str) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"AzureWebJobsStorage": value})
        message = str(err.value)
        assert "AzureWebJobsStorage is not a storage connection string" in message
        assert value not in message

    @pytest.mark.parametrize("uri", ["http://st.blob.core.windows.net", "st.blob.core.windows.net",
                                     "https://st.blob.core.windows.net/?sv=2024&sig=x"])
    def test_blob_service_uri_must_be_an_https_endpoint(self, uri: str) -> None:
        with pytest.raises(SettingsError, match="AzureWebJobsStorage__blobServiceUri must be the https blob endpoint"):
            load_settings({"AzureWebJobsStorage__blobServiceUri": uri})

    def test_in_azure_without_storage_both_identity_settings_are_named(self) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings(AZURE)
        assert ("AzureWebJobsStorage__accountName (or AzureWebJobsStorage__blobServiceUri) "
                "is not set") in str(err.value)

    def test_the_connection_string_is_local_only_and_the_identity_settings_are_not(self) -> None:
        assert "AzureWebJobsStorage" in LOCAL_ONLY_SETTINGS
        assert {"AzureWebJobsStorage__blobServiceUri", "AzureWebJobsStorage__accountName"} <= (
            APP_SETTINGS - LOCAL_ONLY_SETTINGS
        )


class TestClientId:
    def test_azure_client_id_is_read(self) -> None:
        s = load_settings({"AZURE_CLIENT_ID": "00000000-0000-0000-0000-0000000000aa"})
        assert s.azure_client_id == "00000000-0000-0000-0000-0000000000aa"
        assert "AZURE_CLIENT_ID" in APP_SETTINGS
        assert load_settings({}).azure_client_id is None


class TestFunctionTimeout:
    """FUNCTION_TIMEOUT_SECONDS defaults to host.json's functionTimeout, read from the file."""

    def test_the_default_is_the_functiontimeout_of_the_repositorys_host_json(self) -> None:
        host_json = json.loads((Path(__file__).resolve().parent.parent / "host.json").read_text())
        hours, minutes, seconds = (int(p) for p in host_json["functionTimeout"].split(":"))
        assert load_settings({}).function_timeout_seconds == hours * 3600 + minutes * 60 + seconds

    @pytest.mark.parametrize(("timespan", "seconds"), [
        ("00:00:42", 42.0), ("01:30:00", 5400.0), ("1.00:00:00.5", 86400.5), ("00:00:01", 1.0),
    ])
    def test_a_changed_host_json_changes_the_default(
        self, tmp_path: Path, timespan: str, seconds: float
    ) -> None:
        host_json = tmp_path / "host.json"
        host_json.write_text(json.dumps({"version": "2.0", "functionTimeout": timespan}))
        assert load_settings({}, host_json=host_json).function_timeout_seconds == seconds

    @pytest.mark.parametrize("seconds", ["2.5", "0.5"])
    def test_the_setting_overrides_host_json(self, seconds: str) -> None:
        # Any positive time, a fraction of a second too (the tests' own hosts use one).
        assert (load_settings({"FUNCTION_TIMEOUT_SECONDS": seconds}).function_timeout_seconds
                == float(seconds))

    @pytest.mark.parametrize("value", ["soon", "0", "-1", "inf"])
    def test_a_bad_value_is_named(self, value: str) -> None:
        with pytest.raises(SettingsError, match=(
            f"FUNCTION_TIMEOUT_SECONDS must be a positive number of seconds, got '{value}'"
        )):
            load_settings({"FUNCTION_TIMEOUT_SECONDS": value})

    @pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
    def test_host_json_is_read_in_any_unicode_encoding(self, tmp_path: Path,
                                                       encoding: str) -> None:
        """Whatever the machine's locale, a host.json saved by a Windows editor (with a byte
        order mark, or as UTF-16) gives the local host its timeout."""
        host_json = tmp_path / "host.json"
        host_json.write_text(json.dumps({"version": "2.0", "functionTimeout": "00:00:42",
                                         "description": "Zürich"}, ensure_ascii=False),
                             encoding=encoding)
        assert load_settings({}, host_json=host_json).function_timeout_seconds == 42.0

    def test_a_zero_timeout_in_host_json_is_refused(self, tmp_path: Path) -> None:
        """The local host always bounds a delivery: no time at all is no bound it can keep."""
        host_json = tmp_path / "host.json"
        host_json.write_text('{"functionTimeout": "00:00:00"}')
        with pytest.raises(SettingsError) as err:
            load_settings({}, host_json=host_json)
        assert (f"FUNCTION_TIMEOUT_SECONDS is unset and its default failed: functionTimeout in "
                f"{host_json} must be positive, got '00:00:00'") in str(err.value)

    @pytest.mark.parametrize("content", ['{"version": "2.0"}', '{"functionTimeout": "-1"}', "{"])
    def test_an_unusable_host_json_is_named_when_the_setting_is_unset(
        self, tmp_path: Path, content: str
    ) -> None:
        host_json = tmp_path / "host.json"
        host_json.write_text(content)
        with pytest.raises(SettingsError, match="FUNCTION_TIMEOUT_SECONDS is unset and its "
                           f"default failed: .*{host_json}"):
            load_settings({}, host_json=host_json)


class TestMaxDeliveryAge:
    def test_default_is_900_seconds(self) -> None:
        assert load_settings({}).max_delivery_age_seconds == 900
        assert load_settings({"MAX_DELIVERY_AGE_SECONDS": "1800"}).max_delivery_age_seconds == 1800

    @pytest.mark.parametrize("value", ["300", "3600"])
    def test_both_ends_of_the_range_are_allowed(self, value: str) -> None:
        assert load_settings({"MAX_DELIVERY_AGE_SECONDS": value}).max_delivery_age_seconds == (
            float(value))

    @pytest.mark.parametrize("value", ["299", "3601", "-5", "nan", "inf"])
    def test_values_outside_the_duplicate_window_are_refused(self, value: str) -> None:
        # Below Smartcar's retry schedule genuine retries would be stale; above the queue's
        # duplicate-detection window a replay could be neither a duplicate nor stale.
        with pytest.raises(SettingsError) as err:
            load_settings({"MAX_DELIVERY_AGE_SECONDS": value})
        assert (
            "MAX_DELIVERY_AGE_SECONDS must be between 300 and 3600 seconds (at least Smartcar's "
            "~3-minute retry schedule, so no genuine retry is stale; at most the queue's one-hour "
            "duplicate-detection window, so a replay is a duplicate or stale), "
            f"got {value!r}") in str(err.value)

    def test_the_local_example_sets_the_default(self) -> None:
        example = Path(__file__).resolve().parents[1] / "local.settings.json.example"
        values = json.loads(example.read_text())["Values"]
        assert values["MAX_DELIVERY_AGE_SECONDS"] == DEFAULTS["MAX_DELIVERY_AGE_SECONDS"]


class TestVehicleStateSettings:
    def test_the_store_is_on_by_default_and_local_is_sqlite(self) -> None:
        s = load_settings({})
        assert s.vehicle_state_store and s.vehicle_state_backend == "sqlite"
        assert s.vehicle_state_table == "vehiclestate"

    @pytest.mark.parametrize("value", ["off", "OFF", " off "])
    def test_off_turns_it_off(self, value: str) -> None:
        s = load_settings({"VEHICLE_STATE_STORE": value})
        assert not s.vehicle_state_store and s.vehicle_state_backend == "off"

    @pytest.mark.parametrize(("env", "url"), [
        ({"AzureWebJobsStorage__accountName": "acct1"}, "https://acct1.table.core.windows.net/"),
        ({"AzureWebJobsStorage__accountName": "acct1",
          "AzureWebJobsStorage__tableServiceUri": "https://acct1.table.core.chinacloudapi.cn/"},
         "https://acct1.table.core.chinacloudapi.cn/"),
    ])
    def test_the_storage_account_makes_it_table(self, env: dict[str, str], url: str) -> None:
        s = load_settings(env)
        assert s.vehicle_state_backend == "table" and s.table_account_url == url

    def test_a_connection_string_makes_it_table_too(self) -> None:
        s = load_settings({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})
        assert s.vehicle_state_backend == "table" and s.table_account_url is None

    @pytest.mark.parametrize(("name", "value", "message"), [
        ("VEHICLE_STATE_STORE", "maybe", "VEHICLE_STATE_STORE must be on or off, got 'maybe'"),
        ("VEHICLE_STATE_TABLE", "vehicle-state", "VEHICLE_STATE_TABLE must be a table name"),
        ("VEHICLE_STATE_TABLE", "1abc", "VEHICLE_STATE_TABLE must be a table name"),
        ("AzureWebJobsStorage__tableServiceUri", "http://a.table.core.windows.net",
         "AzureWebJobsStorage__tableServiceUri must be the https table endpoint"),
    ])
    def test_malformed_values_are_refused(self, name: str, value: str, message: str) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({name: value})
        assert message in str(err.value)


class TestLowBatteryPercent:
    """The example handler's threshold is a percentage: NaN is never crossed, and neither is
    anything outside 0..100 in the way its reader means it."""

    @pytest.mark.parametrize("value", ["0", "100", "20", "12.5"])
    def test_a_percentage_is_used(self, value: str) -> None:
        assert load_settings({"LOW_BATTERY_PERCENT": value}).low_battery_percent == float(value)

    @pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "100.5", "101",
                                       "-1", "-0.1", "twenty"])
    def test_anything_else_is_refused_by_name(self, value: str) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"LOW_BATTERY_PERCENT": value})
        assert (f"LOW_BATTERY_PERCENT must be a percentage from 0 to 100, got {value!r}"
                in str(err.value))


class TestAppInsightsConnectionString:
    """Refused at start, by name, when the Azure Monitor exporter would refuse it on the first
    request (a 500, then telemetry silently off)."""

    KEY = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    ACCEPTED = (
        CONNECTION_STRING,
        f"InstrumentationKey={KEY}",
        f"instrumentationkey={KEY};Authorization=ikey",
        f"InstrumentationKey={KEY};EndpointSuffix=applicationinsights.azure.cn;Location=chinaeast2",
    )
    REFUSED = (
        ("InstrumentationKey=oops", "its InstrumentationKey is not a lower-case GUID"),
        (f"InstrumentationKey={KEY.upper()}", "its InstrumentationKey is not a lower-case GUID"),
        (f"{KEY}", "it is not ;-separated Name=value pairs"),
        (f"InstrumentationKey={KEY};", "it is not ;-separated Name=value pairs"),
        (f"InstrumentationKey={KEY};IngestionEndpoint=https://x/?a=b",
         "it is not ;-separated Name=value pairs"),
        (f"InstrumentationKey={KEY};Authorization=AAD", "its Authorization is not ikey"),
        ("IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/",
         "it has no InstrumentationKey"),
    )

    @pytest.mark.parametrize("value", ACCEPTED)
    def test_the_resource_s_connection_string_is_accepted(self, value: str) -> None:
        settings = load_settings({"APPLICATIONINSIGHTS_CONNECTION_STRING": value})
        assert settings.appinsights_connection_string == value

    @pytest.mark.parametrize(("value", "why"), REFUSED)
    def test_anything_else_is_refused_by_name_saying_why(self, value: str, why: str) -> None:
        with pytest.raises(SettingsError) as err:
            load_settings({"APPLICATIONINSIGHTS_CONNECTION_STRING": value})
        message = str(err.value)
        assert ("APPLICATIONINSIGHTS_CONNECTION_STRING must be the Application Insights "
                f"resource's connection string (InstrumentationKey=<GUID>;IngestionEndpoint="
                f"https://...), but {why}") in message
        assert value not in message  # never echoed

    @pytest.mark.parametrize("value", [*ACCEPTED, *(value for value, _ in REFUSED)])
    def test_the_rule_is_the_exporter_s(self, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
        # The exporter's own parser (private, so not used by the app): an upgrade that
        # changes what it accepts fails here.
        from azure.monitor.opentelemetry.exporter._connection_string_parser import (
            ConnectionStringParser,
        )

        for name in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "APPINSIGHTS_INSTRUMENTATIONKEY"):
            monkeypatch.delenv(name, raising=False)
        try:
            ConnectionStringParser(value)
        except ValueError:
            exporter_accepts = False
        else:
            exporter_accepts = True
        try:
            load_settings({"APPLICATIONINSIGHTS_CONNECTION_STRING": value})
        except SettingsError:
            we_accept = False
        else:
            we_accept = True
        assert we_accept is exporter_accepts
