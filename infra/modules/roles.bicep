// Role assignments: least privilege at the narrowest scope that works.
// Each assignment is named guid(scope id, principal id, role definition id), so it is stable
// across re-deployments and unique per scope, principal and role.
//
// App identity:
//   queue      Azure Service Bus Data Owner       receiver enqueues events; processor (Service
//                                                 Bus trigger) receives and settles; dlq replay
//                                                 re-sends; the scale controller reads the
//                                                 queue length (needs Manage, see below)
//   vault      Key Vault Secrets User             reads the token and its previous version; the
//                                                 secret may not exist yet, so not secret scope
//   storage    Storage Blob Data Owner            host keys, leases and timer schedule state live
//                                                 in blobs; the deployment package and the
//                                                 spilled events (read, write, delete) too
//   storage    Storage Table Data Contributor     the host writes its diagnostic events to tables
//   vehicle-   Storage Table Data Contributor     the vehicle state store reads and writes its
//   state                                         entities; the host's account-wide grant above
//   table                                         covers this table too, and this one, scoped
//                                                 to the table, keeps the store's access if
//                                                 that grant is ever narrowed or dropped
//   appi       Monitoring Metrics Publisher       telemetry with Entra ID (DisableLocalAuth)
// Storage Queue Data Contributor is not granted: no queue or blob trigger uses storage queues.
//
// Deploying user (optional, deployerPrincipalId):
//   queue      Azure Service Bus Data Owner       `python -m shared.cli dlq ...` and `stats`
//   vault      Key Vault Secrets Officer          `az keyvault secret set` for the token

@description('Principal (object) id of the app\'s user-assigned identity.')
param appPrincipalId string

@description('Optional: object id of the person or pipeline that operates the app. Empty: no operator roles.')
param deployerPrincipalId string = ''

@description('Principal type of deployerPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param deployerPrincipalType string = 'User'

param serviceBusNamespaceName string
param queueName string
param keyVaultName string
param storageAccountName string
param vehicleStateTableName string
param appInsightsName string

// Built-in role definition ids (the same in every tenant).
var roles = {
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

var sbOwnerRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
var secretsUserRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
var secretsOfficerRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
var blobOwnerRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
var tableContributorRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
var metricsPublisherRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)

resource namespace 'Microsoft.ServiceBus/namespaces@2026-01-01' existing = {
  name: serviceBusNamespaceName
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2026-01-01' existing = {
  parent: namespace
  name: queueName
}

resource vault 'Microsoft.KeyVault/vaults@2026-02-01' existing = {
  name: keyVaultName
}

resource storage 'Microsoft.Storage/storageAccounts@2026-04-01' existing = {
  name: storageAccountName
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2026-04-01' existing = {
  parent: storage
  name: 'default'
}

resource vehicleStateTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2026-04-01' existing = {
  parent: tableService
  name: vehicleStateTableName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Trade-off: Data Sender + Data Receiver would be enough to send, receive and settle, but the
// Functions scale controller reads the queue's message count with the app's identity, and that
// needs Manage rights (with Listen only, scaling is less accurate). Data Owner grants Manage;
// scoped to this one queue it cannot touch other entities in the namespace. What the app gains
// beyond send/receive is managing this queue itself (e.g. changing or deleting it).
resource appQueueOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, appPrincipalId, sbOwnerRoleId)
  scope: queue
  properties: {
    roleDefinitionId: sbOwnerRoleId
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: secretsUserRoleId
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, blobOwnerRoleId)
  scope: storage
  properties: {
    roleDefinitionId: blobOwnerRoleId
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, appPrincipalId, tableContributorRoleId)
  scope: storage
  properties: {
    roleDefinitionId: tableContributorRoleId
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Entity reads and writes (queries, transactions) on the vehicle state table only: a table is
// the narrowest scope Azure RBAC offers for table data.
resource appVehicleStateTable 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vehicleStateTable.id, appPrincipalId, tableContributorRoleId)
  scope: vehicleStateTable
  properties: {
    roleDefinitionId: tableContributorRoleId
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, appPrincipalId, metricsPublisherRoleId)
  scope: appInsights
  properties: {
    roleDefinitionId: metricsPublisherRoleId
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource deployerQueueOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(queue.id, deployerPrincipalId, sbOwnerRoleId)
  scope: queue
  properties: {
    roleDefinitionId: sbOwnerRoleId
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

resource deployerSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(vault.id, deployerPrincipalId, secretsOfficerRoleId)
  scope: vault
  properties: {
    roleDefinitionId: secretsOfficerRoleId
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}
