// Storage for the Functions host (AzureWebJobsStorage, identity-based) and the Flex Consumption
// deployment package. Shared keys are disabled: every client authenticates with Entra ID.
// The spill container holds events the receiver acknowledged while Service Bus was unavailable,
// until the re-drive timer sends them to the queue (shared/spill.py). The app identity reaches
// it through Storage Blob Data Owner on the account (modules/roles.bicep).
// The vehicle state table holds the latest signals and errors per vehicle (shared/vehicle_state);
// the app identity reaches it through Storage Table Data Contributor on the account, which the
// host needs for its diagnostic events, and again on that table (modules/roles.bicep says why).

@description('Storage account name: 3-24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Blob container that holds the Flex Consumption deployment package.')
param deploymentContainerName string

@description('Blob container for events spilled while Service Bus is unavailable (SPILL_CONTAINER_NAME).')
param spillContainerName string = 'spill'

@description('Table for the vehicle state store (VEHICLE_STATE_TABLE): 3-63 letters and digits.')
@minLength(3)
@maxLength(63)
param vehicleStateTableName string = 'vehiclestate'

param tags object = {}

resource storage 'Microsoft.Storage/storageAccounts@2026-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2026-04-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2026-04-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource spillContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2026-04-01' = {
  parent: blobService
  name: spillContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2026-04-01' = {
  parent: storage
  name: 'default'
}

resource vehicleStateTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2026-04-01' = {
  parent: tableService
  name: vehicleStateTableName
}

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output deploymentContainerName string = deploymentContainer.name
output spillContainerName string = spillContainer.name
output tableEndpoint string = storage.properties.primaryEndpoints.table
output vehicleStateTableName string = vehicleStateTable.name
