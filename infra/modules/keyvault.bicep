// Key Vault for the Smartcar management token (the webhook signing secret). RBAC only, soft
// delete and purge protection on. The secret's VALUE is normally set after deployment
// (docs/deploy.md); it is created here only when the optional secure parameter is given.
//
// Purge protection means a deleted vault (resource group deleted, `azd down`) stays soft-deleted
// under its name for softDeleteRetentionInDays and cannot be purged early, so a redeployment with
// the same name fails until it is recovered: createMode 'recover' brings it back, secrets and all.

@description('Key Vault name: 3-24 letters, digits and hyphens, globally unique.')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region.')
param location string

@description('Name of the secret that holds the Smartcar management token (SMARTCAR_TOKEN_SECRET_NAME).')
param tokenSecretName string

@description('\'default\' creates the vault (or updates it). \'recover\' brings back the soft-deleted vault of this name, with its secrets, after a teardown; use it for that one redeployment only (it fails when no deleted vault exists).')
@allowed([
  'default'
  'recover'
])
param createMode string = 'default'

@description('Optional: the Smartcar management token. Empty (the default) leaves the secret to be set after deployment.')
@secure()
param smartcarManagementToken string = ''

param tags object = {}

resource vault 'Microsoft.KeyVault/vaults@2026-02-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    createMode: createMode
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
  }
}

resource tokenSecret 'Microsoft.KeyVault/vaults/secrets@2026-02-01' = if (!empty(smartcarManagementToken)) {
  parent: vault
  name: tokenSecretName
  properties: {
    value: smartcarManagementToken
    contentType: 'text/plain'
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
output tokenSecretName string = tokenSecretName
