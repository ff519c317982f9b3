// Function app on the Flex Consumption plan (FC1), Python 3.13, running as the user-assigned
// identity. Every connection is identity-based; the app settings are exactly the names that
// shared/settings.py reads (APP_SETTINGS minus LOCAL_ONLY_SETTINGS) plus the names the host and
// the Azure SDKs read (HOST_SETTINGS). tests/test_infra.py keeps the two in step.
// Flex Consumption rejects FUNCTIONS_WORKER_RUNTIME and FUNCTIONS_EXTENSION_VERSION: the runtime
// is set in functionAppConfig instead.

@description('Function app name (also its host name prefix).')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Azure region.')
param location string

param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity (selects it for the host and DefaultAzureCredential).')
param identityClientId string

@description('Storage account for AzureWebJobsStorage.')
param storageAccountName string

@description('Blob endpoint of that account, e.g. https://<account>.blob.core.windows.net/.')
param storageBlobEndpoint string

@description('Table endpoint of that account, e.g. https://<account>.table.core.windows.net/.')
param storageTableEndpoint string

@description('Table in that account for the vehicle state store.')
param vehicleStateTableName string

@description('The vehicle state store: on, or off to run handlers without it.')
@allowed([
  'on'
  'off'
])
param vehicleStateStore string

@description('Container that holds the deployment package.')
param deploymentContainerName string

@description('Blob container in that account for events spilled while Service Bus is unavailable.')
param spillContainerName string

@description('Application Insights connection string (not a credential; ingestion uses Entra ID).')
param appInsightsConnectionString string

@description('Key Vault URI, e.g. https://<vault>.vault.azure.net/.')
param keyVaultUri string

@description('Secret that holds the Smartcar management token.')
param tokenSecretName string

@description('Service Bus host name, e.g. <namespace>.servicebus.windows.net.')
param serviceBusFullyQualifiedNamespace string

@description('Queue that holds accepted events.')
param queueName string

@description('Same value as the queue maxDeliveryCount, so the processor knows the last attempt.')
param maxDeliveryCount int

@description('Largest accepted webhook body in bytes.')
param maxBodyBytes int

@description('Oldest meta.deliveredAt, in seconds at receipt, that is still processed.')
param maxDeliveryAgeSeconds int

@description('Seconds the signing token is cached in memory.')
param tokenCacheSeconds int

@description('Processor retry backoff base, seconds.')
param retryBackoffBaseSeconds int

@description('Processor retry backoff ceiling, seconds.')
param retryBackoffMaxSeconds int

@description('Battery percentage under which the example handler reports a low battery.')
param lowBatteryPercent int

@description('Upper bound on instances the plan scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory per instance in MB (512, 2048 or 4096). 512: the measured worker peaks near 82 MB under load, see docs/cost.md for the headroom.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 512

@description('Concurrent HTTP invocations per instance. The receiver is async and mostly waits on Service Bus and Key Vault, so it can take far more than the Python default.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 64

@description('Always-ready instances, e.g. [{ name: \'http\', instanceCount: 1 }]. Empty: scale to zero (cold starts, lowest cost).')
param alwaysReady array = []

resource plan 'Microsoft.Web/serverfarms@2025-03-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2025-03-01' = {
  name: name
  location: location
  // azd finds the app to deploy to through this tag (azure.yaml service "api").
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // No siteConfig.ftpsState: Flex Consumption rejects it (ARM error 51021). FTP is off through
    // the basic publishing credentials policy below.
    siteConfig: {
      minTlsVersion: '1.2'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReady
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.13'
      }
    }
  }
}

resource appSettings 'Microsoft.Web/sites/config@2025-03-01' = {
  parent: site
  name: 'appsettings'
  properties: {
    // Read by shared/settings.py.
    KEY_VAULT_URI: keyVaultUri
    SMARTCAR_TOKEN_SECRET_NAME: tokenSecretName
    TOKEN_CACHE_SECONDS: string(tokenCacheSeconds)
    ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace
    SERVICEBUS_QUEUE_NAME: queueName
    MAX_DELIVERY_COUNT: string(maxDeliveryCount)
    MAX_BODY_BYTES: string(maxBodyBytes)
    MAX_DELIVERY_AGE_SECONDS: string(maxDeliveryAgeSeconds)
    RETRY_BACKOFF_BASE_SECONDS: string(retryBackoffBaseSeconds)
    RETRY_BACKOFF_MAX_SECONDS: string(retryBackoffMaxSeconds)
    LOW_BATTERY_PERCENT: string(lowBatteryPercent)
    APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
    SPILL_CONTAINER_NAME: spillContainerName
    VEHICLE_STATE_STORE: vehicleStateStore
    VEHICLE_STATE_TABLE: vehicleStateTableName
    // Read by the host and by shared/settings.py (the spill container lives in this account).
    AzureWebJobsStorage__accountName: storageAccountName
    // The blob endpoint as the account reports it: right in every cloud; the spill store uses it.
    AzureWebJobsStorage__blobServiceUri: storageBlobEndpoint
    // Likewise the table endpoint: the vehicle state store uses it.
    AzureWebJobsStorage__tableServiceUri: storageTableEndpoint
    // Read by the Functions host and the Azure SDKs: identity-based connections.
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    ServiceBusConnection__credential: 'managedidentity'
    ServiceBusConnection__clientId: identityClientId
    AZURE_CLIENT_ID: identityClientId
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
    // The host reads the whole body before the function runs (default limit 100 MB): bound it
    // well above MAX_BODY_BYTES, which still answers 413 for anything in between.
    FUNCTIONS_REQUEST_BODY_SIZE_LIMIT: string(max(maxBodyBytes * 4, 1048576))
  }
}

// No basic (user name + password) publishing: deployments authenticate with Entra ID. The 'ftp'
// policy is what keeps FTP off on Flex Consumption, which has no ftpsState.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName
