// Smartcar webhook receiver: everything it needs in one resource group.
//   az deployment group create -g <rg> -f infra/main.bicep -p infra/main.bicepparam
// Names are an abbreviation (abbreviations.json) plus one resourceToken, so a re-deployment to
// the same subscription, resource group and region updates the same resources.

targetScope = 'resourceGroup'

@description('Azure region; defaults to the resource group\'s. Must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
param location string = resourceGroup().location

@description('Environment name, used in tags (azd sets it from AZURE_ENV_NAME).')
param environmentName string = 'prod'

@description('Service Bus tier.')
@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string = 'Standard'

@description('Queue that holds accepted webhook events (SERVICEBUS_QUEUE_NAME).')
param queueName string = 'smartcar-events'

@description('Deliveries before an event is dead-lettered: the queue\'s maxDeliveryCount and the app\'s MAX_DELIVERY_COUNT.')
@minValue(1)
@maxValue(100)
param maxDeliveryCount int = 5

@description('Key Vault secret that holds the Smartcar management token (SMARTCAR_TOKEN_SECRET_NAME).')
param tokenSecretName string = 'smartcar-management-token'

@description('Key Vault create mode. After a teardown (azd down, or deleting the resource group) the vault stays soft-deleted for 90 days under its name and blocks a redeployment: \'recover\' brings it back with its secrets (for that one redeployment; docs/deploy.md).')
@allowed([
  'default'
  'recover'
])
param keyVaultCreateMode string = 'default'

@description('Optional: letters or digits appended to the Key Vault name (kv-<token>-<suffix>), to redeploy with a new, empty vault while the old one is still soft-deleted.')
@maxLength(7)
param keyVaultNameSuffix string = ''

@description('Optional: the Smartcar management token, to create the secret during deployment. Empty: set it afterwards with az keyvault secret set.')
@secure()
param smartcarManagementToken string = ''

@description('Largest accepted webhook body in bytes (MAX_BODY_BYTES). At most 196608: Service Bus Standard\'s 256 KB message less its 64 KB of headers, so every accepted body can be queued.')
@minValue(1024)
@maxValue(196608)
param maxBodyBytes int = 196608

@description('A delivery whose meta.deliveredAt is older than this at receipt is dead-lettered as StaleDelivery, never processed (MAX_DELIVERY_AGE_SECONDS). At most the queue\'s one-hour duplicate-detection window, so a replay is always a duplicate or stale.')
@minValue(300)
@maxValue(3600)
param maxDeliveryAgeSeconds int = 900

@description('Seconds the signing token is cached in memory (TOKEN_CACHE_SECONDS).')
@minValue(1)
param tokenCacheSeconds int = 300

@description('Processor retry backoff base in seconds (RETRY_BACKOFF_BASE_SECONDS).')
@minValue(0)
@maxValue(604800)
param retryBackoffBaseSeconds int = 2

@description('Processor retry backoff ceiling in seconds (RETRY_BACKOFF_MAX_SECONDS).')
@minValue(0)
@maxValue(604800)
param retryBackoffMaxSeconds int = 60

@description('The vehicle state store (VEHICLE_STATE_STORE): on, or off.')
@allowed([
  'on'
  'off'
])
param vehicleStateStore string = 'on'

@description('Low-battery threshold of the example handler, percent (LOW_BATTERY_PERCENT).')
@minValue(0)
@maxValue(100)
param lowBatteryPercent int = 20

@description('Flex Consumption: maximum instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Flex Consumption: memory per instance, MB (512, 2048 or 4096). 512: the measured worker peaks near 82 MB under load, see docs/cost.md for the headroom.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 512

@description('Flex Consumption: concurrent HTTP invocations per instance; the receiver is async and I/O bound.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 64

@description('Flex Consumption: always-ready instances, e.g. [{ name: \'http\', instanceCount: 1 }]. Empty: scale to zero.')
param alwaysReady array = []

@description('Optional e-mail address for alerts.')
param alertEmail string = ''

@description('Optional: object id of the operator (az ad signed-in-user show --query id -o tsv), granted Service Bus Data Owner on the queue and Key Vault Secrets Officer on the vault.')
param deployerPrincipalId string = ''

@description('Principal type of deployerPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param deployerPrincipalType string = 'User'

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, location))
var tags = {
  'azd-env-name': environmentName
  application: 'smartcar-webhooks'
}
var functionAppName = '${abbrs.functionApp}${resourceToken}'
var keyVaultName = empty(keyVaultNameSuffix)
  ? '${abbrs.keyVault}${resourceToken}'
  : '${abbrs.keyVault}${resourceToken}-${toLower(keyVaultNameSuffix)}'

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: '${abbrs.managedIdentity}${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: '${abbrs.storageAccount}${resourceToken}'
    location: location
    deploymentContainerName: '${abbrs.blobContainerDeployment}${functionAppName}'
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: '${abbrs.logAnalyticsWorkspace}${resourceToken}'
    appInsightsName: '${abbrs.appInsights}${resourceToken}'
    location: location
    tags: tags
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    name: '${abbrs.serviceBusNamespace}${resourceToken}'
    location: location
    sku: serviceBusSku
    queueName: queueName
    maxDeliveryCount: maxDeliveryCount
    tags: tags
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: keyVaultName
    location: location
    createMode: keyVaultCreateMode
    tokenSecretName: tokenSecretName
    smartcarManagementToken: smartcarManagementToken
    tags: tags
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    appPrincipalId: identity.outputs.principalId
    deployerPrincipalId: deployerPrincipalId
    deployerPrincipalType: deployerPrincipalType
    serviceBusNamespaceName: serviceBus.outputs.name
    queueName: serviceBus.outputs.queueName
    keyVaultName: keyVault.outputs.name
    storageAccountName: storage.outputs.name
    vehicleStateTableName: storage.outputs.vehicleStateTableName
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: functionAppName
    planName: '${abbrs.functionPlan}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    spillContainerName: storage.outputs.spillContainerName
    storageTableEndpoint: storage.outputs.tableEndpoint
    vehicleStateTableName: storage.outputs.vehicleStateTableName
    vehicleStateStore: vehicleStateStore
    appInsightsConnectionString: monitoring.outputs.connectionString
    keyVaultUri: keyVault.outputs.uri
    tokenSecretName: keyVault.outputs.tokenSecretName
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    queueName: serviceBus.outputs.queueName
    maxDeliveryCount: maxDeliveryCount
    maxBodyBytes: maxBodyBytes
    maxDeliveryAgeSeconds: maxDeliveryAgeSeconds
    tokenCacheSeconds: tokenCacheSeconds
    retryBackoffBaseSeconds: retryBackoffBaseSeconds
    retryBackoffMaxSeconds: retryBackoffMaxSeconds
    lowBatteryPercent: lowBatteryPercent
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    alwaysReady: alwaysReady
  }
  // The host starts with its identity: let it find its storage, queue and vault roles in place.
  dependsOn: [
    roles
  ]
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    namePrefix: '${abbrs.metricAlert}${resourceToken}'
    location: location
    appInsightsId: monitoring.outputs.appInsightsId
    alertEmail: alertEmail
    serviceBusNamespaceId: serviceBus.outputs.id
    queueName: serviceBus.outputs.queueName
    tags: tags
  }
}

module workbook 'modules/workbook.bicep' = {
  name: 'workbook'
  params: {
    location: location
    appInsightsId: monitoring.outputs.appInsightsId
    tags: tags
  }
}

// Every name the runbook (docs/operations.md) and the deploy steps use: `azd env get-values`
// shows them, as does `az deployment group show -n smartcar-webhooks --query properties.outputs`.
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output FUNCTION_APP_NAME string = functionApp.outputs.name
@description('Vehicle data callback URI without the function key; add ?code=<key> when registering it with Smartcar.')
output WEBHOOK_URL string = 'https://${functionApp.outputs.defaultHostName}/api/webhooks/smartcar'
output ERROR_WEBHOOK_URL string = 'https://${functionApp.outputs.defaultHostName}/api/webhooks/smartcar/errors'
output KEY_VAULT_NAME string = keyVault.outputs.name
output KEY_VAULT_URI string = keyVault.outputs.uri
output SMARTCAR_TOKEN_SECRET_NAME string = keyVault.outputs.tokenSecretName
output SERVICEBUS_NAMESPACE_NAME string = serviceBus.outputs.name
output SERVICEBUS_NAMESPACE_FQDN string = serviceBus.outputs.fullyQualifiedNamespace
output SERVICEBUS_QUEUE_NAME string = serviceBus.outputs.queueName
@description('The Application Insights resource the queries in infra/queries/ run against (az monitor app-insights query --app).')
output APPLICATION_INSIGHTS_NAME string = monitoring.outputs.appInsightsName
output LOG_ANALYTICS_WORKSPACE_NAME string = monitoring.outputs.workspaceName
output STORAGE_ACCOUNT_NAME string = storage.outputs.name
output SPILL_CONTAINER_NAME string = storage.outputs.spillContainerName
output MANAGED_IDENTITY_NAME string = identity.outputs.name
