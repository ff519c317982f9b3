"""The Azure deployment (infra/, azure.yaml, the deploy workflow, docs/deploy.md) as a spec.

Bicep is read through tree-sitter-bicep (tests/bicep_tree.py), so these tests assert on the
parsed templates, not on text patterns, wherever the structure matters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import pytest

from shared import settings

from .bicep_tree import (
    Expr,
    Template,
    call_arguments,
    find_calls,
    keys,
    literal,
    load,
    prop,
    text,
)

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
PARAMS = INFRA / "main.bicepparam"
MODULES = INFRA / "modules"
WORKFLOW = ROOT / ".github" / "workflows" / "deploy.yml"

BICEP_FILES = sorted(INFRA.rglob("*.bicep")) + sorted(INFRA.rglob("*.bicepparam"))


def iso_duration_seconds(duration: str) -> int:
    """An ISO 8601 duration as Service Bus takes it (days, hours, minutes, seconds)."""
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", duration)
    assert match is not None and duration not in {"P", "PT"}, duration
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def signature_default(function: Any, name: str) -> Any:
    import inspect

    return inspect.signature(function).parameters[name].default


def module(name: str) -> Template:
    return load(MODULES / f"{name}.bicep")


def all_templates() -> list[Template]:
    return [load(p) for p in sorted(INFRA.rglob("*.bicep"))]


# ---------------------------------------------------------------------------------------------
# 1. Syntax: every template parses cleanly.
# ---------------------------------------------------------------------------------------------
class TestSyntax:
    def test_there_is_a_main_template_params_file_and_modules(self) -> None:
        assert MAIN.is_file() and PARAMS.is_file()
        assert len(list(MODULES.glob("*.bicep"))) >= 5

    @pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_file_parses_without_error_or_missing_nodes(self, path: Path) -> None:
        assert load(path).syntax_problems() == []

    def test_the_syntax_check_reports_a_broken_template(self, tmp_path: Path) -> None:
        broken = tmp_path / "broken.bicep"
        broken.write_text("resource sb 'Microsoft.ServiceBus/namespaces@2024-01-01' = {\n  name:\n")
        problems = Template(broken).syntax_problems()
        assert problems and all("broken.bicep" in p for p in problems)

    def test_the_bicepparam_shim_still_catches_a_broken_value(self, tmp_path: Path) -> None:
        broken = tmp_path / "broken.bicepparam"
        broken.write_text("using './main.bicep'\nparam queueName = 'unterminated\n")
        assert Template(broken).syntax_problems()


# ---------------------------------------------------------------------------------------------
# 2. API versions: every resource type@version is one verified as current (GA unless noted).
# ---------------------------------------------------------------------------------------------
# Verified against the Azure template reference (learn.microsoft.com/azure/templates/<provider>)
# and the Bicep type definitions (Azure/bicep-types-az generated/<provider>/<namespace>/<version>/
# types.json): the newest non-preview version of each type, with every property the templates set
# present in that version's schema with the same type and allowed values.
VERIFIED_API_VERSIONS: dict[str, str] = {
    # .../msi/microsoft.managedidentity/2024-11-30 (userAssignedIdentities)
    "Microsoft.ManagedIdentity/userAssignedIdentities": "2024-11-30",
    # .../storage/microsoft.storage/2026-04-01: storageAccounts and child types
    "Microsoft.Storage/storageAccounts": "2026-04-01",
    "Microsoft.Storage/storageAccounts/blobServices": "2026-04-01",
    "Microsoft.Storage/storageAccounts/blobServices/containers": "2026-04-01",
    # .../operationalinsights/microsoft.operationalinsights/2026-03-01 (workspaces)
    "Microsoft.OperationalInsights/workspaces": "2026-03-01",
    # .../applicationinsights/microsoft.insights/2020-02-02/components (the newest GA version)
    "Microsoft.Insights/components": "2020-02-02",
    # .../monitor_1/microsoft.insights/2023-01-01 actionGroups (newer ones are previews)
    "Microsoft.Insights/actionGroups": "2023-01-01",
    # .../monitor_1/microsoft.insights/2026-01-01 metricAlerts (GA after 2018-03-01; same
    # SingleResourceMultipleMetricCriteria / StaticThresholdCriterion fields)
    "Microsoft.Insights/metricAlerts": "2026-01-01",
    # .../monitor_1/microsoft.insights/2026-03-01 scheduledQueryRules (2024-01-01-preview and
    # 2025-01-01-preview are previews)
    "Microsoft.Insights/scheduledQueryRules": "2026-03-01",
    # .../applicationinsights/microsoft.insights/2023-06-01 workbooks (the newest GA version)
    "Microsoft.Insights/workbooks": "2023-06-01",
    # .../servicebus/microsoft.servicebus/2026-01-01 namespaces: has disableLocalAuth,
    # minimumTlsVersion
    "Microsoft.ServiceBus/namespaces": "2026-01-01",
    "Microsoft.ServiceBus/namespaces/queues": "2026-01-01",
    # .../keyvault/microsoft.keyvault/2026-02-01 (vaults, vaults/secrets)
    "Microsoft.KeyVault/vaults": "2026-02-01",
    "Microsoft.KeyVault/vaults/secrets": "2026-02-01",
    # .../microsoft.web/2025-03-01/sites: the newest GA version (2024-04-01 was the first with
    # functionAppConfig); instanceMemoryMB is a plain int in every version's schema, the
    # service checks the size (512, 2048, 4096)
    "Microsoft.Web/serverfarms": "2025-03-01",
    "Microsoft.Web/sites": "2025-03-01",
    "Microsoft.Web/sites/config": "2025-03-01",
    "Microsoft.Web/sites/basicPublishingCredentialsPolicies": "2025-03-01",
    # .../authorization/microsoft.authorization/2022-04-01 roleAssignments (the newest GA)
    "Microsoft.Authorization/roleAssignments": "2022-04-01",
    # .../storage/microsoft.storage/2026-04-01 tableServices/tables (the account's version)
    "Microsoft.Storage/storageAccounts/tableServices": "2026-04-01",
    "Microsoft.Storage/storageAccounts/tableServices/tables": "2026-04-01",
}


def api_version_problems(templates: list[Template], verified: dict[str, str]) -> list[str]:
    problems: list[str] = []
    for template in templates:
        for r in template.resources():
            where = f"{template.path.name}:{r.line} {r.symbol}"
            if not r.api_version:
                problems.append(f"{where}: declare the full type@version, not a nested short type")
                continue
            if verified.get(r.type) != r.api_version:
                problems.append(
                    f"{where}: {r.type}@{r.api_version} is not in the verified table "
                    f"(verified: {verified.get(r.type, 'none')})"
                )
            if "preview" in r.api_version and "preview" not in r.leading_comment.lower():
                problems.append(f"{where}: preview API version without a comment saying why")
    return problems


class TestApiVersions:
    def test_every_resource_uses_a_verified_current_api_version(self) -> None:
        assert api_version_problems(all_templates(), VERIFIED_API_VERSIONS) == []

    def test_no_api_version_in_the_table_is_a_preview(self) -> None:
        assert not [v for v in VERIFIED_API_VERSIONS.values() if "preview" in v]

    def test_every_verified_type_is_used(self) -> None:
        used = {r.type for t in all_templates() for r in t.resources()}
        assert set(VERIFIED_API_VERSIONS) <= used

    def test_an_unlisted_or_uncommented_preview_version_is_reported(self, tmp_path: Path) -> None:
        path = tmp_path / "old.bicep"
        path.write_text(
            "resource a 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {\n  name: 'x'\n}\n"
            "resource b 'Microsoft.Web/sites@2022-03-01' = {\n  name: 'y'\n}\n"
        )
        problems = api_version_problems([Template(path)], VERIFIED_API_VERSIONS)
        assert any("preview API version without a comment" in p for p in problems)
        stale = "Microsoft.Web/sites@2022-03-01 is not in the verified table"
        assert any(stale in p for p in problems)


# ---------------------------------------------------------------------------------------------
# 3. Composition: main.bicep wires modules correctly; names come from one resourceToken.
# ---------------------------------------------------------------------------------------------
class TestComposition:
    def test_main_is_resource_group_scoped(self) -> None:
        assert re.search(r"(?m)^targetScope = 'resourceGroup'$", MAIN.read_text())

    def test_names_come_from_one_resource_token(self) -> None:
        token = load(MAIN).variables()["resourceToken"]
        assert text(token) == (
            "toLower(uniqueString(subscription().id, resourceGroup().id, location))"
        )
        abbrs = load(MAIN).variables()["abbrs"]
        assert text(abbrs) == "loadJsonContent('abbreviations.json')"
        variables = load(MAIN).variables()
        for m in load(MAIN).modules():
            name = text(prop(m.body, "params.name"))
            if name:
                resolved = text(variables[name]) if name in variables else name
                assert "resourceToken" in resolved, m.symbol

    def test_every_module_file_exists_and_gets_only_declared_params(self) -> None:
        for m in load(MAIN).modules():
            path = (INFRA / m.path).resolve()
            assert path.is_file(), m.path
            declared = load(path).params()
            passed = set(keys(prop(m.body, "params")))  # type: ignore[arg-type]
            assert passed <= set(declared), f"{m.symbol}: unknown {passed - set(declared)}"
            required = {n for n, p in declared.items() if p.default is None}
            assert required <= passed, f"{m.symbol}: missing {required - passed}"

    def test_queue_and_app_share_one_max_delivery_count(self) -> None:
        main = load(MAIN)
        for symbol in ("serviceBus", "functionApp"):
            value = prop(main.module(symbol).body, "params.maxDeliveryCount")
            assert text(value) == "maxDeliveryCount", symbol
        assert literal(main.params()["maxDeliveryCount"].default) == 5

    @pytest.mark.parametrize(
        ("output", "expected"),
        [
            ("FUNCTION_APP_NAME", "functionApp.outputs.name"),
            (
                "WEBHOOK_URL",
                "'https://${functionApp.outputs.defaultHostName}/api/webhooks/smartcar'",
            ),
            ("KEY_VAULT_NAME", "keyVault.outputs.name"),
            ("SERVICEBUS_NAMESPACE_FQDN", "serviceBus.outputs.fullyQualifiedNamespace"),
            ("SERVICEBUS_QUEUE_NAME", "serviceBus.outputs.queueName"),
            ("SERVICEBUS_NAMESPACE_NAME", "serviceBus.outputs.name"),
            ("APPLICATION_INSIGHTS_NAME", "monitoring.outputs.appInsightsName"),
            ("LOG_ANALYTICS_WORKSPACE_NAME", "monitoring.outputs.workspaceName"),
            ("STORAGE_ACCOUNT_NAME", "storage.outputs.name"),
            ("SPILL_CONTAINER_NAME", "storage.outputs.spillContainerName"),
            ("MANAGED_IDENTITY_NAME", "identity.outputs.name"),
            ("AZURE_RESOURCE_GROUP", "resourceGroup().name"),
        ],
    )
    def test_outputs(self, output: str, expected: str) -> None:
        assert text(load(MAIN).outputs()[output]) == expected

    def test_every_output_is_named_in_the_deploy_and_operations_pages(self) -> None:
        # The pages say where each name comes from; an output nobody documents, or a page
        # that names an output the template does not have, is a gap for on-call.
        outputs = set(load(MAIN).outputs())
        deploy = (ROOT / "docs" / "deploy.md").read_text()
        assert [o for o in sorted(outputs) if f"`{o}`" not in deploy] == []
        named = set(re.findall(r"`([A-Z][A-Z_]+_NAME)`", deploy + (ROOT / "docs" / "operations.md").read_text()))
        assert named - outputs - {"AZURE_ENV_NAME", "DEPLOYER_PRINCIPAL_ID", "SMARTCAR_TOKEN_SECRET_NAME", "KEY_VAULT_NAME_SUFFIX"} == set()

    def test_the_monitoring_module_outputs_its_names(self) -> None:
        outputs = module("monitoring").outputs()
        assert text(outputs["appInsightsName"]) == "appInsights.name"
        assert text(outputs["workspaceName"]) == "workspace.name"

    def test_params_file_uses_main_and_sets_only_declared_params(self) -> None:
        params_file = load(PARAMS)
        assert params_file.using() == "./main.bicep"
        declared = load(MAIN).params()
        assigned = params_file.variables()
        assert set(assigned) <= set(declared)
        assert literal(assigned["maxDeliveryCount"]) == 5
        assert literal(assigned["serviceBusSku"]) == "Standard"
        assert literal(assigned["httpPerInstanceConcurrency"]) == 64
        assert literal(assigned["alwaysReady"]) == []
        assert "smartcarManagementToken" not in assigned  # set in Key Vault, not in a file

    def test_params_file_takes_the_deployer_principal_type_from_the_environment(self) -> None:
        # Azure refuses a role assignment whose principalType does not match the id: a group's
        # or a pipeline's id needs its type too, by the same route as the id.
        assigned = load(PARAMS).variables()
        assert text(assigned["deployerPrincipalType"]) == (
            "readEnvironmentVariable('DEPLOYER_PRINCIPAL_TYPE', 'User')")
        allowed = load(MAIN).params()["deployerPrincipalType"].decorator_argument("allowed")
        assert allowed == ["User", "Group", "ServicePrincipal"]
        assert "`DEPLOYER_PRINCIPAL_TYPE`" in (ROOT / "docs" / "deploy.md").read_text()

    def test_params_file_defaults_match_settings_module_defaults(self) -> None:
        assigned = load(PARAMS).variables()
        defaults = settings.DEFAULTS
        assert literal(assigned["queueName"]) == defaults[settings.SERVICEBUS_QUEUE_NAME]
        assert literal(assigned["tokenSecretName"]) == defaults[settings.SMARTCAR_TOKEN_SECRET_NAME]
        assert str(literal(assigned["maxBodyBytes"])) == defaults[settings.MAX_BODY_BYTES]
        assert str(literal(assigned["maxDeliveryCount"])) == defaults[settings.MAX_DELIVERY_COUNT]

    def test_the_template_accepts_the_body_sizes_the_app_accepts(self) -> None:
        """A body Service Bus Standard may refuse is refused at deployment, as at start-up:
        accepted, it would be spilled and then refused by every re-drive."""
        param = load(MAIN).params()["maxBodyBytes"]
        limits = {d.split("(")[0]: int(d.split("(")[1].rstrip(")")) for d in param.decorators
                  if d.startswith(("@minValue", "@maxValue"))}
        assert limits == {"@minValue": 1024, "@maxValue": settings.MAX_BODY_BYTES_LIMIT}
        assert literal(param.default) == int(settings.DEFAULTS[settings.MAX_BODY_BYTES])
        assert literal(param.default) <= settings.MAX_BODY_BYTES_LIMIT


# ---------------------------------------------------------------------------------------------
# 4. Resources: the properties that make the deployment secure and correct.
# ---------------------------------------------------------------------------------------------
# siteConfig properties that Flex Consumption rejects, and what to use instead: ftpsState (ARM
# error 51021 on newer stamps) and linuxFxVersion (the runtime moved to functionAppConfig).
FLEX_REJECTED_SITE_CONFIG = {
    "ftpsState": "keep FTP off with the 'ftp' basicPublishingCredentialsPolicies resource",
    "linuxFxVersion": "set functionAppConfig.runtime",
}


def flex_site_config_problems(template: Template) -> list[str]:
    problems = []
    for site in template.resources_of_type("Microsoft.Web/sites"):
        site_config = prop(site.body, "properties.siteConfig")
        for key in keys(site_config) if site_config is not None else []:
            if key in FLEX_REJECTED_SITE_CONFIG:
                problems.append(
                    f"{site.symbol}: siteConfig.{key} is rejected on Flex Consumption; "
                    f"{FLEX_REJECTED_SITE_CONFIG[key]}"
                )
    return problems


class TestResources:
    def test_user_assigned_identity(self) -> None:
        identity = module("identity")
        assert identity.resources_of_type("Microsoft.ManagedIdentity/userAssignedIdentities")

    def test_storage_account_is_identity_only(self) -> None:
        (account,) = module("storage").resources_of_type("Microsoft.Storage/storageAccounts")
        p = literal(prop(account.body, "properties"))
        assert p["allowSharedKeyAccess"] is False
        assert p["allowBlobPublicAccess"] is False
        assert p["minimumTlsVersion"] == "TLS1_2"
        assert p["supportsHttpsTrafficOnly"] is True

    def test_storage_has_private_deployment_and_spill_containers(self) -> None:
        containers = module("storage").resources_of_type(
            "Microsoft.Storage/storageAccounts/blobServices/containers"
        )
        assert {text(prop(c.body, "name")) for c in containers} == {
            "deploymentContainerName",
            "spillContainerName",
        }
        for container in containers:
            assert literal(prop(container.body, "properties.publicAccess")) == "None"

    def test_the_vehicle_state_table_is_created_and_named_as_the_settings_module_expects(
        self,
    ) -> None:
        storage = module("storage")
        (table,) = storage.resources_of_type(
            "Microsoft.Storage/storageAccounts/tableServices/tables")
        assert text(prop(table.body, "name")) == "vehicleStateTableName"
        default = literal(storage.params()["vehicleStateTableName"].default)
        assert default == settings.DEFAULTS[settings.VEHICLE_STATE_TABLE]
        main = load(MAIN)
        fa_params = main.module("functionApp").body
        assert text(prop(fa_params, "params.vehicleStateTableName")) == (
            "storage.outputs.vehicleStateTableName")
        assert text(prop(fa_params, "params.storageTableEndpoint")) == (
            "storage.outputs.tableEndpoint")
        assert text(prop(main.module("roles").body, "params.vehicleStateTableName")) == (
            "storage.outputs.vehicleStateTableName")
        app = app_settings_object()
        assert text(prop(app, "VEHICLE_STATE_TABLE")) == "vehicleStateTableName"
        assert text(prop(app, "VEHICLE_STATE_STORE")) == "vehicleStateStore"
        assert text(prop(app, "AzureWebJobsStorage__tableServiceUri")) == "storageTableEndpoint"
        assert literal(main.params()["vehicleStateStore"].default) == (
            settings.DEFAULTS[settings.VEHICLE_STATE_STORE])

    def test_the_vehicle_state_table_role_is_scoped_to_that_one_table(self) -> None:
        roles = module("roles")
        table = roles.resource("vehicleStateTable")
        assert table.existing
        assert table.type == "Microsoft.Storage/storageAccounts/tableServices/tables"
        assert text(prop(table.body, "name")) == "vehicleStateTableName"
        assert text(prop(table.body, "parent")) == "tableService"
        assert ("vehicleStateTable", "storageTableDataContributor", "appPrincipalId") in {
            (s, r, p) for s, r, p, _, _ in role_assignments()}

    def test_spill_container_default_and_app_setting_agree_with_the_settings_module(
        self,
    ) -> None:
        params = module("storage").params()
        default = literal(params["spillContainerName"].default)
        assert default == settings.DEFAULTS[settings.SPILL_CONTAINER_NAME]
        main = load(MAIN)
        passed = prop(main.module("functionApp").body, "params.spillContainerName")
        assert text(passed) == "storage.outputs.spillContainerName"
        (config,) = module("functionapp").resources_of_type("Microsoft.Web/sites/config")
        values = literal(prop(config.body, "properties"))
        assert values[settings.SPILL_CONTAINER_NAME] == Expr("spillContainerName")

    def test_application_insights_is_workspace_based_without_local_auth(self) -> None:
        mon = module("monitoring")
        (appi,) = mon.resources_of_type("Microsoft.Insights/components")
        assert literal(prop(appi.body, "properties.DisableLocalAuth")) is True
        assert text(prop(appi.body, "properties.WorkspaceResourceId")) == "workspace.id"
        assert mon.resources_of_type("Microsoft.OperationalInsights/workspaces")

    def test_service_bus_namespace_is_entra_only_with_a_sku_parameter(self) -> None:
        sb = module("servicebus")
        (ns,) = sb.resources_of_type("Microsoft.ServiceBus/namespaces")
        assert literal(prop(ns.body, "properties.disableLocalAuth")) is True
        assert literal(prop(ns.body, "properties.minimumTlsVersion")) == "1.2"
        assert literal(sb.params()["sku"].default) == "Standard"
        assert "'Premium'" in " ".join(sb.params()["sku"].decorators)
        assert "sku == 'Premium'" in text(prop(ns.body, "sku"))

    def test_queue_detects_duplicates_and_dead_letters(self) -> None:
        sb = module("servicebus")
        (queue,) = sb.resources_of_type("Microsoft.ServiceBus/namespaces/queues")
        p = literal(prop(queue.body, "properties"))
        assert p["requiresDuplicateDetection"] is True
        assert p["duplicateDetectionHistoryTimeWindow"] == "PT1H"
        assert p["maxDeliveryCount"] == Expr("maxDeliveryCount")
        assert literal(sb.params()["maxDeliveryCount"].default) == 5
        assert p["lockDuration"] == Expr("lockDuration")
        assert literal(sb.params()["lockDuration"].default) == "PT1M"
        assert p["deadLetteringOnMessageExpiration"] is True
        assert literal(sb.params()["defaultMessageTimeToLive"].default) == "P14D"

    def test_the_retry_backoffs_are_bounded_as_the_settings_bound_them(self) -> None:
        # The app refuses a backoff over a week at start; the template refuses it at deploy.
        params = load(MAIN).params()
        for name in ("retryBackoffBaseSeconds", "retryBackoffMaxSeconds"):
            limits = {d.split("(")[0]: int(d.split("(")[1].rstrip(")"))
                      for d in params[name].decorators
                      if d.startswith(("@minValue", "@maxValue"))}
            assert limits == {"@minValue": 0, "@maxValue": settings.MAX_RETRY_BACKOFF_SECONDS}
            assert 0 <= literal(params[name].default) <= settings.MAX_RETRY_BACKOFF_SECONDS

    def test_the_low_battery_threshold_is_bounded_as_the_settings_bound_it(self) -> None:
        # The app refuses to start outside 0..100; the template refuses such a value at deploy,
        # and every value it accepts, ends included, starts the app.
        param = load(MAIN).params()["lowBatteryPercent"]
        limits = {d.split("(")[0]: int(d.split("(")[1].rstrip(")")) for d in param.decorators
                  if d.startswith(("@minValue", "@maxValue"))}
        assert limits == {"@minValue": 0, "@maxValue": 100}
        for value in (*limits.values(), literal(param.default)):
            loaded = settings.load_settings({settings.LOW_BATTERY_PERCENT: str(value)})
            assert loaded.low_battery_percent == value
        for outside in (limits["@minValue"] - 1, limits["@maxValue"] + 1):
            with pytest.raises(settings.SettingsError):
                settings.load_settings({settings.LOW_BATTERY_PERCENT: str(outside)})

    def test_a_replay_is_a_duplicate_or_stale_the_window_covers_max_delivery_age(self) -> None:
        # SECURITY.md "Replayed payloads": a re-sent delivery inside the duplicate-detection
        # window is dropped as a duplicate; outside it, its deliveredAt is older than
        # MAX_DELIVERY_AGE_SECONDS. That holds only while the window is at least the max age,
        # for the default, the parameters file, and every value the template accepts.
        from shared.local.queue import LocalQueue

        (queue,) = module("servicebus").resources_of_type("Microsoft.ServiceBus/namespaces/queues")
        window = iso_duration_seconds(
            literal(prop(queue.body, "properties.duplicateDetectionHistoryTimeWindow")))
        param = load(MAIN).params()["maxDeliveryAgeSeconds"]
        limits = {d.split("(")[0]: int(d.split("(")[1].rstrip(")")) for d in param.decorators
                  if d.startswith(("@minValue", "@maxValue"))}
        default = literal(param.default)
        assigned = literal(load(PARAMS).variables()["maxDeliveryAgeSeconds"])
        assert default == assigned == int(settings.DEFAULTS[settings.MAX_DELIVERY_AGE_SECONDS])
        assert limits == {"@minValue": settings.MIN_DELIVERY_AGE_SECONDS,
                          "@maxValue": settings.MAX_DELIVERY_AGE_LIMIT_SECONDS}
        assert default <= limits["@maxValue"] <= window
        # Locally the embedded queue's window bounds it the same way.
        assert settings.MAX_DELIVERY_AGE_LIMIT_SECONDS <= signature_default(
            LocalQueue.__init__, "duplicate_window")
        # And the app reads the value the template was given.
        assert text(prop(load(MAIN).module("functionApp").body,
                         "params.maxDeliveryAgeSeconds")) == "maxDeliveryAgeSeconds"
        assert text(prop(app_settings_object(), "MAX_DELIVERY_AGE_SECONDS")) == (
            "string(maxDeliveryAgeSeconds)")

    @pytest.mark.parametrize(("duration", "seconds"),
                             [("PT1H", 3600), ("PT15M", 900), ("P1DT30S", 86430), ("PT20S", 20)])
    def test_iso_durations_are_read_as_seconds(self, duration: str, seconds: int) -> None:
        assert iso_duration_seconds(duration) == seconds

    def test_no_authorization_rules_anywhere(self) -> None:
        for t in all_templates():
            assert not [r for r in t.resources() if "authorizationrules" in r.type.lower()]

    def test_key_vault_is_rbac_with_purge_protection(self) -> None:
        (vault,) = module("keyvault").resources_of_type("Microsoft.KeyVault/vaults")
        p = literal(prop(vault.body, "properties"))
        assert p["enableRbacAuthorization"] is True
        assert p["enableSoftDelete"] is True
        assert p["enablePurgeProtection"] is True

    def test_key_vault_create_mode_is_a_parameter_that_can_recover(self) -> None:
        kv = module("keyvault")
        (vault,) = kv.resources_of_type("Microsoft.KeyVault/vaults")
        assert literal(prop(vault.body, "properties.createMode")) == Expr("createMode")
        mode = kv.params()["createMode"]
        assert mode.decorator_argument("allowed") == ["default", "recover"]
        assert literal(mode.default) == "default"

    def test_redeploying_after_teardown_is_a_parameter_away(self) -> None:
        main = load(MAIN)
        params = main.params()
        mode = params["keyVaultCreateMode"]
        assert mode.decorator_argument("allowed") == ["default", "recover"]
        assert literal(mode.default) == "default"  # 'recover' fails when nothing was deleted
        passed = prop(main.module("keyVault").body, "params")
        assert text(prop(passed, "createMode")) == "keyVaultCreateMode"  # type: ignore[arg-type]
        assert text(prop(passed, "name")) == "keyVaultName"  # type: ignore[arg-type]
        assigned = load(PARAMS).variables()
        assert text(assigned["keyVaultCreateMode"]) == (
            "readEnvironmentVariable('KEY_VAULT_CREATE_MODE', 'default')"
        )
        assert text(assigned["keyVaultNameSuffix"]) == (
            "readEnvironmentVariable('KEY_VAULT_NAME_SUFFIX', '')"
        )

    def test_key_vault_name_is_unchanged_without_a_suffix(self) -> None:
        # Existing deployments keep their vault: with no suffix the name is what it always was.
        name = load(MAIN).variables()["keyVaultName"]
        assert name.type == "ternary_expression"
        condition, unsalted, salted = name.named_children
        assert text(condition) == "empty(keyVaultNameSuffix)"
        assert text(unsalted) == "'${abbrs.keyVault}${resourceToken}'"
        assert text(salted) == "'${abbrs.keyVault}${resourceToken}-${toLower(keyVaultNameSuffix)}'"
        assert literal(load(MAIN).params()["keyVaultNameSuffix"].default) == ""

    def test_a_suffixed_key_vault_name_still_fits_the_24_character_limit(self) -> None:
        abbrs = json.loads((INFRA / "abbreviations.json").read_text())
        suffix_max = load(MAIN).params()["keyVaultNameSuffix"].decorator_argument("maxLength")
        vault_max = module("keyvault").params()["name"].decorator_argument("maxLength")
        unique_string = 13  # uniqueString() always returns 13 characters
        assert vault_max == 24
        assert len(abbrs["keyVault"]) + unique_string + len("-") + suffix_max <= vault_max

    def test_token_secret_is_created_only_when_a_value_is_given(self) -> None:
        kv = module("keyvault")
        (secret,) = kv.resources_of_type("Microsoft.KeyVault/vaults/secrets")
        assert secret.conditional
        token = kv.params()["smartcarManagementToken"]
        assert "@secure()" in token.decorators
        assert literal(token.default) == ""
        assert "@secure()" in load(MAIN).params()["smartcarManagementToken"].decorators

    def test_every_secure_param_defaults_to_empty(self) -> None:
        for t in all_templates():
            for p in t.params().values():
                if "@secure()" in p.decorators:
                    assert p.default is None or literal(p.default) == "", (t.path, p.name)

    def test_plan_is_flex_consumption(self) -> None:
        (plan,) = module("functionapp").resources_of_type("Microsoft.Web/serverfarms")
        assert literal(prop(plan.body, "sku")) == {"name": "FC1", "tier": "FlexConsumption"}
        assert literal(prop(plan.body, "properties.reserved")) is True

    def test_site_is_linux_function_app_https_only(self) -> None:
        (site,) = module("functionapp").resources_of_type("Microsoft.Web/sites")
        assert literal(prop(site.body, "kind")) == "functionapp,linux"
        assert literal(prop(site.body, "properties.httpsOnly")) is True
        assert literal(prop(site.body, "properties.siteConfig.minTlsVersion")) == "1.2"
        assert literal(prop(site.body, "identity.type")) == "UserAssigned"

    def test_site_config_holds_nothing_flex_consumption_rejects(self) -> None:
        # ARM error 51021 on Flex Consumption: "site configuration properties ... invalid".
        assert flex_site_config_problems(module("functionapp")) == []

    def test_the_flex_site_config_check_reports_ftps_state(self, tmp_path: Path) -> None:
        path = tmp_path / "site.bicep"
        path.write_text(
            "resource site 'Microsoft.Web/sites@2024-04-01' = {\n  name: 'x'\n  properties: {\n"
            "    siteConfig: {\n      minTlsVersion: '1.2'\n      ftpsState: 'Disabled'\n"
            "    }\n  }\n}\n"
        )
        assert flex_site_config_problems(Template(path)) == [
            "site: siteConfig.ftpsState is rejected on Flex Consumption; keep FTP off with "
            "the 'ftp' basicPublishingCredentialsPolicies resource"
        ]

    @pytest.mark.parametrize("path", [MAIN, MODULES / "functionapp.bicep"], ids=lambda p: p.name)
    def test_instance_memory_allows_only_the_flex_sizes_and_defaults_to_the_measured_one(
        self, path: Path
    ) -> None:
        # Flex Consumption's instance sizes; the default is chosen from `make measure-memory`
        # with the headroom docs/cost.md states.
        memory = load(path).params()["instanceMemoryMB"]
        assert memory.decorator_argument("allowed") == [512, 2048, 4096]
        assert literal(memory.default) == 512

    def test_flex_runtime_deployment_and_scale(self) -> None:
        fa = module("functionapp")
        (site,) = fa.resources_of_type("Microsoft.Web/sites")
        config = prop(site.body, "properties.functionAppConfig")
        assert config is not None
        assert literal(prop(config, "runtime")) == {"name": "python", "version": "3.13"}
        storage = literal(prop(config, "deployment.storage"))
        assert storage["type"] == "blobContainer"
        assert storage["authentication"] == {
            "type": "UserAssignedIdentity",
            "userAssignedIdentityResourceId": Expr("identityId"),
        }
        scale = literal(prop(config, "scaleAndConcurrency"))
        assert scale["maximumInstanceCount"] == Expr("maximumInstanceCount")
        assert scale["instanceMemoryMB"] == Expr("instanceMemoryMB")
        assert scale["alwaysReady"] == Expr("alwaysReady")
        assert scale["triggers"] == {
            "http": {"perInstanceConcurrency": Expr("httpPerInstanceConcurrency")}
        }
        params = fa.params()
        assert literal(params["httpPerInstanceConcurrency"].default) == 64
        assert literal(params["alwaysReady"].default) == []

    def test_basic_publishing_credentials_are_disabled(self) -> None:
        # The 'ftp' policy is what keeps FTP off: Flex Consumption has no siteConfig.ftpsState.
        policies = module("functionapp").resources_of_type(
            "Microsoft.Web/sites/basicPublishingCredentialsPolicies"
        )
        assert {literal(prop(p.body, "name")) for p in policies} == {"ftp", "scm"}
        assert all(literal(prop(p.body, "properties.allow")) is False for p in policies)

    def test_dead_letter_metric_alert_filters_on_the_queue(self) -> None:
        alerts = module("alerts")
        (alert,) = alerts.resources_of_type("Microsoft.Insights/metricAlerts")
        criteria = literal(prop(alert.body, "properties.criteria"))
        assert criteria["odata.type"] == (
            "Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria"
        )
        (criterion,) = criteria["allOf"]
        assert criterion["metricName"] == "DeadletteredMessages"
        assert criterion["metricNamespace"] == "Microsoft.ServiceBus/namespaces"
        assert criterion["dimensions"] == [
            {"name": "EntityName", "operator": "Include", "values": [Expr("queueName")]}
        ]
        assert criterion["operator"] == "GreaterThan" and criterion["threshold"] == 0

    def test_action_group_exists_only_with_an_email(self) -> None:
        alerts = module("alerts")
        (group,) = alerts.resources_of_type("Microsoft.Insights/actionGroups")
        assert group.conditional
        assert literal(alerts.params()["alertEmail"].default) == ""


# ---------------------------------------------------------------------------------------------
# 5. Role assignments: least privilege, narrowest scope, deterministic names.
# ---------------------------------------------------------------------------------------------
# Built-in role definition ids, checked against
# learn.microsoft.com/azure/role-based-access-control/built-in-roles.
BUILT_IN_ROLES = {
    "serviceBusDataOwner": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "keyVaultSecretsUser": "4633458b-17de-408a-b874-0445c86b69e6",
    "keyVaultSecretsOfficer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "monitoringMetricsPublisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}

# (scope symbol, role, principal parameter) for every assignment, and nothing else.
EXPECTED_ASSIGNMENTS = {
    # Data Owner, not Sender + Receiver: the scale controller needs Manage to read the queue
    # length. Scoped to the queue only (test_service_bus_roles_are_scoped_to_the_queue...).
    ("queue", "serviceBusDataOwner", "appPrincipalId"),
    ("vault", "keyVaultSecretsUser", "appPrincipalId"),
    ("storage", "storageBlobDataOwner", "appPrincipalId"),
    ("storage", "storageTableDataContributor", "appPrincipalId"),
    # The vehicle state store: its one table (test_the_vehicle_state_table_...).
    ("vehicleStateTable", "storageTableDataContributor", "appPrincipalId"),
    ("appInsights", "monitoringMetricsPublisher", "appPrincipalId"),
    ("queue", "serviceBusDataOwner", "deployerPrincipalId"),
    ("vault", "keyVaultSecretsOfficer", "deployerPrincipalId"),
}


def role_assignments() -> list[tuple[str, str, str, str, str]]:
    """(scope, role key, principal, name expression, principalType) per assignment."""
    roles = module("roles")
    variables = roles.variables()
    found = []
    for r in roles.resources_of_type("Microsoft.Authorization/roleAssignments"):
        role_var = text(prop(r.body, "properties.roleDefinitionId"))
        (call,) = find_calls(variables[role_var], "subscriptionResourceId")
        role_key = text(call_arguments(call)[1]).removeprefix("roles.")
        found.append(
            (
                text(prop(r.body, "scope")),
                role_key,
                text(prop(r.body, "properties.principalId")),
                text(prop(r.body, "name")),
                text(prop(r.body, "properties.principalType")),
            )
        )
    return found


class TestRoleAssignments:
    def test_role_ids_are_the_built_in_ones(self) -> None:
        assert literal(module("roles").variables()["roles"]) == BUILT_IN_ROLES

    def test_exactly_the_expected_roles_at_the_expected_scopes(self) -> None:
        assert {(s, role, p) for s, role, p, _, _ in role_assignments()} == EXPECTED_ASSIGNMENTS

    def test_service_bus_roles_are_scoped_to_the_queue_not_the_namespace(self) -> None:
        roles = module("roles")
        queue = roles.resource("queue")
        assert queue.existing and queue.type == "Microsoft.ServiceBus/namespaces/queues"
        for scope, role, *_ in role_assignments():
            if role.startswith("serviceBus"):
                assert scope == "queue"

    def test_the_apps_queue_ownership_says_why_next_to_the_assignment(self) -> None:
        roles = module("roles")
        (owner,) = [
            r
            for r in roles.resources_of_type("Microsoft.Authorization/roleAssignments")
            if text(prop(r.body, "properties.principalId")) == "appPrincipalId"
            and text(prop(r.body, "scope")) == "queue"
        ]
        assert text(prop(owner.body, "properties.roleDefinitionId")) == "sbOwnerRoleId"
        why = owner.leading_comment
        for needle in ("scale controller", "Manage", "Sender", "Receiver", "this one queue"):
            assert needle in why, needle

    def test_names_are_guid_of_scope_principal_and_role(self) -> None:
        for scope, _, principal, name, _ in role_assignments():
            assert re.fullmatch(rf"guid\({scope}\.id, {principal}, \w+RoleId\)", name), name

    def test_app_assignments_are_for_a_service_principal(self) -> None:
        for _, _, principal, _, principal_type in role_assignments():
            expected = (
                "'ServicePrincipal'" if principal == "appPrincipalId" else ("deployerPrincipalType")
            )
            assert principal_type == expected

    def test_deployer_assignments_are_optional(self) -> None:
        roles = module("roles")
        assert literal(roles.params()["deployerPrincipalId"].default) == ""
        for r in roles.resources_of_type("Microsoft.Authorization/roleAssignments"):
            if text(prop(r.body, "properties.principalId")) == "deployerPrincipalId":
                assert r.conditional, r.symbol


# ---------------------------------------------------------------------------------------------
# 6. App settings: Bicep sets exactly what the settings module and the host read.
# ---------------------------------------------------------------------------------------------
FLEX_FORBIDDEN = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION"}


def expected_app_settings(
    app: AbstractSet[str], local_only: AbstractSet[str], host: AbstractSet[str]
) -> set[str]:
    return (set(app) - set(local_only)) | set(host)


def compare_settings(bicep: set[str], expected: set[str]) -> list[str]:
    """What is wrong, in both directions; empty when Bicep and the code agree."""
    problems = [f"Bicep sets {n}, which nothing reads" for n in sorted(bicep - expected)]
    problems += [f"Bicep does not set {n}, which the app reads" for n in sorted(expected - bicep)]
    return problems


def app_settings_object() -> Any:
    """The function app's one inline `appsettings` object (a tree-sitter node)."""
    fa = module("functionapp")
    (config,) = [
        r
        for r in fa.resources_of_type("Microsoft.Web/sites/config")
        if literal(prop(r.body, "name")) == "appsettings"
    ]
    properties = prop(config.body, "properties")
    assert properties is not None and properties.type == "object", "inline app settings object"
    (site,) = fa.resources_of_type("Microsoft.Web/sites")
    assert prop(site.body, "properties.siteConfig.appSettings") is None, "one place for settings"
    return properties


def bicep_app_settings() -> set[str]:
    return set(keys(app_settings_object()))


class TestAppSettings:
    def test_bicep_and_settings_module_agree_in_both_directions(self) -> None:
        expected = expected_app_settings(
            settings.APP_SETTINGS, settings.LOCAL_ONLY_SETTINGS, settings.HOST_SETTINGS
        )
        assert compare_settings(bicep_app_settings(), expected) == []

    def test_the_host_bounds_request_bodies_above_max_body_bytes(self) -> None:
        limit = prop(app_settings_object(), "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT")
        assert limit is not None
        assert text(limit).replace(" ", "") == "string(max(maxBodyBytes*4,1048576))"

    def test_local_only_settings_are_never_deployed(self) -> None:
        assert not bicep_app_settings() & settings.LOCAL_ONLY_SETTINGS

    def test_flex_consumption_forbidden_settings_are_absent(self) -> None:
        assert not bicep_app_settings() & FLEX_FORBIDDEN

    def test_comparison_reports_an_unknown_bicep_setting(self) -> None:
        expected = expected_app_settings({"A", "LOCAL"}, {"LOCAL"}, {"H"})
        assert compare_settings({"A", "H", "TYPO"}, expected) == [
            "Bicep sets TYPO, which nothing reads"
        ]

    def test_comparison_reports_a_setting_bicep_forgot(self) -> None:
        expected = expected_app_settings({"A", "B", "LOCAL"}, {"LOCAL"}, {"H"})
        assert compare_settings({"A", "H"}, expected) == [
            "Bicep does not set B, which the app reads"
        ]

    def test_comparison_reports_a_local_only_setting_in_bicep(self) -> None:
        expected = expected_app_settings({"A", "LOCAL"}, {"LOCAL"}, set())
        assert compare_settings({"A", "LOCAL"}, expected) == [
            "Bicep sets LOCAL, which nothing reads"
        ]

    def test_identity_based_connection_values(self) -> None:
        fa = module("functionapp")
        (config,) = [r for r in fa.resources_of_type("Microsoft.Web/sites/config")]
        values = literal(prop(config.body, "properties"))
        assert values["ServiceBusConnection__credential"] == "managedidentity"
        assert values["AzureWebJobsStorage__credential"] == "managedidentity"
        assert values["ServiceBusConnection__clientId"] == Expr("identityClientId")
        assert values["AzureWebJobsStorage__clientId"] == Expr("identityClientId")
        assert values["AZURE_CLIENT_ID"] == Expr("identityClientId")
        # The endpoint the account reports, so the spill store is right in every cloud.
        assert values["AzureWebJobsStorage__blobServiceUri"] == Expr("storageBlobEndpoint")
        assert values["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == Expr(
            "'ClientId=${identityClientId};Authorization=AAD'"
        )
        assert values["MAX_DELIVERY_COUNT"] == Expr("string(maxDeliveryCount)")


# ---------------------------------------------------------------------------------------------
# 7. No secrets or keys anywhere in infra or code.
# ---------------------------------------------------------------------------------------------
FORBIDDEN_PATTERNS = {
    "listKeys(": re.compile(r"listKeys\s*\(", re.IGNORECASE),
    "listConnectionStrings": re.compile(r"listConnectionStrings", re.IGNORECASE),
    "listSecrets": re.compile(r"\blistSecrets\s*\(", re.IGNORECASE),
    "AccountKey=": re.compile(r"AccountKey\s*=", re.IGNORECASE),
    "SharedAccessKey=": re.compile(r"SharedAccessKey\s*=", re.IGNORECASE),
    "authorizationRules": re.compile(r"authorizationRules", re.IGNORECASE),
}
# The Service Bus emulator's connection string carries a fixed, published placeholder key; it
# only ever points at localhost, so a line that says UseDevelopmentEmulator=true is allowed.
EMULATOR_MARKER = re.compile(r"UseDevelopmentEmulator\s*=\s*true", re.IGNORECASE)


def secret_findings(path: Path, content: str) -> list[str]:
    findings = []
    for number, line in enumerate(content.splitlines(), start=1):
        if EMULATOR_MARKER.search(line):
            continue
        for label, pattern in FORBIDDEN_PATTERNS.items():
            if pattern.search(line):
                findings.append(f"{path}:{number}: {label}")
    return findings


def scanned_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    files += [p for p in (ROOT / "shared").rglob("*.py")]
    files += [p for p in [ROOT / "function_app.py", ROOT / "azure.yaml"] if p.is_file()]
    files += [p for p in ROOT.glob("*.json")]
    files += [p for p in ROOT.glob("*.json.example")]
    files += [p for p in (ROOT / ".github" / "workflows").glob("*.y*ml")]
    return sorted(files)


class TestNoSecrets:
    def test_scan_covers_infra_code_and_workflows(self) -> None:
        names = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
        assert "infra/main.bicep" in names
        assert "shared/settings.py" in names
        assert ".github/workflows/deploy.yml" in names

    def test_no_keys_or_connection_strings_with_secrets(self) -> None:
        findings = [f for p in scanned_files() for f in secret_findings(p, p.read_text())]
        assert findings == []

    @pytest.mark.parametrize(
        "line",
        [
            "output k string = storage.listKeys().keys[0].value",
            "value: sb.listConnectionStrings().primaryConnectionString",
            "'DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abc=='",
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b",
            "resource r 'Microsoft.ServiceBus/namespaces/authorizationRules@2024-01-01' = {",
        ],
    )
    def test_scanner_reports_each_kind_of_secret(self, line: str) -> None:
        assert secret_findings(Path("bad.bicep"), f"// ok\n{line}\n") != []

    def test_scanner_allows_the_local_emulator_connection_string(self) -> None:
        emulator = (
            "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;"
            "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
        )
        assert secret_findings(Path("local.settings.json.example"), emulator) == []


# ---------------------------------------------------------------------------------------------
# 8. Delivery: azd, the GitHub workflow (OIDC, no stored credentials), the README.
# ---------------------------------------------------------------------------------------------
class TestDelivery:
    def test_azure_yaml_deploys_the_function_app_with_bicep(self) -> None:
        azure_yaml = (ROOT / "azure.yaml").read_text()
        assert re.search(r"(?m)^\s+host: function$", azure_yaml)
        assert re.search(r"(?m)^\s+language: python$", azure_yaml)
        assert re.search(r"(?m)^\s+provider: bicep$", azure_yaml)
        assert re.search(r"(?m)^\s+path: infra$", azure_yaml)
        # azd finds the app through this tag.
        (site,) = module("functionapp").resources_of_type("Microsoft.Web/sites")
        assert "'azd-service-name': 'api'" in text(prop(site.body, "tags"))
        assert re.search(r"(?m)^  api:$", azure_yaml)

    def test_workflow_logs_in_with_openid_connect(self) -> None:
        workflow = WORKFLOW.read_text()
        assert re.search(r"(?m)^\s+id-token: write\b", workflow)
        assert "azure/login@v2" in workflow
        for field in ("client-id", "tenant-id", "subscription-id"):
            assert re.search(rf"(?m)^\s+{field}: \$\{{\{{ vars\.AZURE_", workflow), field
        assert "creds:" not in workflow
        assert "AZURE_CREDENTIALS" not in workflow
        assert "client-secret" not in workflow

    def test_workflow_deploys_infra_then_code(self) -> None:
        workflow = WORKFLOW.read_text()
        deploy = workflow.index("az deployment group create")
        publish = workflow.index("func azure functionapp publish")
        assert deploy < publish
        assert "-f infra/main.bicep" in workflow and "-p infra/main.bicepparam" in workflow
        assert "python-version: '3.13'" in workflow

    def test_workflow_passes_every_setting_main_bicepparam_reads(self) -> None:
        # After a teardown the vault's name is reserved: a CI redeploy needs the same two
        # settings as `az` and azd; without the deployer principal a CI-only deployment grants
        # nobody the right to store the token. main.bicepparam reads them all from the
        # environment; the workflow passes each from a repository variable (azd's environment
        # name is azd's own).
        workflow = WORKFLOW.read_text()
        params = PARAMS.read_text()
        read = set(re.findall(r"readEnvironmentVariable\('(\w+)'", params)) - {"AZURE_ENV_NAME"}
        assert {"KEY_VAULT_CREATE_MODE", "DEPLOYER_PRINCIPAL_ID"} <= read
        for name in read:
            assert re.search(rf"(?m)^\s+{name}: \$\{{\{{ vars\.{name}\b", workflow), name
        # A variable left unset is an empty string, which these two parameters refuse.
        for name, value in (
            ("KEY_VAULT_CREATE_MODE", "${{ vars.KEY_VAULT_CREATE_MODE || 'default' }}"),
            ("DEPLOYER_PRINCIPAL_TYPE", "${{ vars.DEPLOYER_PRINCIPAL_TYPE || 'User' }}"),
        ):
            assert re.search(rf"(?m)^\s+{name}: {re.escape(value)}$", workflow), name
        setup = (ROOT / "docs" / "deploy.md").read_text().split(
            "## Continuous deployment (GitHub Actions)", 1)[1]
        assert "`DEPLOYER_PRINCIPAL_ID`" in setup

    def test_workflow_test_job_installs_what_ci_run_installs_before_make_test(self) -> None:
        # The browser and clock tests fail under CI=true without Chromium, chromium-driver and
        # faketime; .ci/run installs them as root, the workflow's test job on GitHub's runner
        # with sudo (each one only if missing: the runner ships Chromium at /usr/bin).
        ci_run = (ROOT / ".ci" / "run").read_text()
        command = re.search(r"apt-get install((?:[^\n]*\\\n)*[^\n]*)", ci_run)
        assert command is not None, ".ci/run no longer installs with apt-get"
        ci_packages = {word for word in command.group(1).replace("\\", " ").split()
                       if not word.startswith("-")}
        assert {"chromium", "chromium-driver", "faketime"} <= ci_packages, ci_packages
        workflow = WORKFLOW.read_text()
        test_job = workflow[workflow.index("\n  test:\n"):workflow.index("\n  deploy:\n")]
        assert set(re.findall(r"\|\| missing\+=\(([\w.-]+)\)", test_job)) == ci_packages
        install = test_job.index("sudo DEBIAN_FRONTEND=noninteractive apt-get install -y")
        assert test_job.index("sudo apt-get update") < install < test_job.index("run: make test")
        assert '"${missing[@]}"' in test_job[install:]

    def test_one_deployment_name_in_the_workflow_and_the_docs(self) -> None:
        workflow = WORKFLOW.read_text()
        assert "--name smartcar-webhooks \\" in workflow
        deploy = (ROOT / "docs" / "deploy.md").read_text()
        operations = (ROOT / "docs" / "operations.md").read_text()
        for page in (deploy, operations):
            names = re.findall(r"az deployment group (?:create|show)[^\n]*?(?:-n|--name) (\S+)", page)
            assert names and set(names) == {"smartcar-webhooks"}, names
        assert "azd env get-values" in deploy

    def test_deploy_page(self) -> None:
        section = (ROOT / "docs" / "deploy.md").read_text()
        for needle in (
            "Functions Core Tools",
            "Python 3.13",
            "az group create",
            "az deployment group create -g",
            "-f infra/main.bicep -p infra/main.bicepparam",
            "az keyvault secret set --vault-name",
            "--name smartcar-management-token",
            "Key Vault Secrets Officer",
            "func azure functionapp publish",
            "--python",
            "az functionapp function keys list",
            "/api/webhooks/smartcar?code=",
            "/api/webhooks/smartcar/errors",
            "python -m shared.cli send --url",
            # The azd path: what it prompts for, the deployer principal, the names afterwards.
            "azd up` prompts for",
            "azd env set DEPLOYER_PRINCIPAL_ID",
            "azd env get-values",
            "**The deployer role is required.**",
            # Before the CLI lines, how to get the venv they run in.
            ". .venv/bin/activate",
        ):
            assert needle in section, needle
        # The token never goes on a command line.
        assert "-p smartcarManagementToken=\"$AMT\"" not in section
        assert "--value \"$AMT\"" not in section
        assert "--token \"$AMT\"" not in section

    def test_deploy_page_says_how_teardown_and_redeploy_work(self) -> None:
        page = (ROOT / "docs" / "deploy.md").read_text()
        section = page.split("\n## Tear down and redeploy\n", 1)[1].split("\n## ", 1)[0]
        for needle in (
            "azd down --purge",
            "DeletedVaultPurge",
            "azd down",
            "az group delete",
            "az keyvault list-deleted",
            "azd env set KEY_VAULT_CREATE_MODE recover",
            "-p keyVaultCreateMode=recover",
            "KEY_VAULT_NAME_SUFFIX",
            "-p keyVaultNameSuffix=",
        ):
            assert needle in section, needle


# ---------------------------------------------------------------------------------------------
# 9. host.json: only settings the host reads in the mode it runs in.
# ---------------------------------------------------------------------------------------------
# A log category of the built-in Application Insights logger (request results); in OpenTelemetry
# mode the host exports through OpenTelemetry and the category does nothing.
APPLICATION_INSIGHTS_ONLY_CATEGORIES = {"Host.Results"}


class TestHostJson:
    def test_no_log_category_that_opentelemetry_mode_ignores(self) -> None:
        host = json.loads((ROOT / "host.json").read_text())
        assert host["telemetryMode"] == "OpenTelemetry"
        levels = host["logging"]["logLevel"]
        assert not set(levels) & APPLICATION_INSIGHTS_ONLY_CATEGORIES
        assert levels["default"] == "Information"
