// Defaults for `az deployment group create -g <rg> -f infra/main.bicep -p infra/main.bicepparam`.
// Override any of them on the command line, e.g. `-p alertEmail=ops@example.com`.
// The Smartcar management token is deliberately not here: set it in Key Vault after deployment.
using './main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'prod')
param serviceBusSku = 'Standard'
param queueName = 'smartcar-events'
param maxDeliveryCount = 5
param tokenSecretName = 'smartcar-management-token'
// After a teardown, redeploying into the same name: KEY_VAULT_CREATE_MODE=recover (once), or a
// new vault name with KEY_VAULT_NAME_SUFFIX (docs/deploy.md).
param keyVaultCreateMode = readEnvironmentVariable('KEY_VAULT_CREATE_MODE', 'default')
param keyVaultNameSuffix = readEnvironmentVariable('KEY_VAULT_NAME_SUFFIX', '')
param maxBodyBytes = 196608
param maxDeliveryAgeSeconds = 900
param httpPerInstanceConcurrency = 64
param maximumInstanceCount = 100
param instanceMemoryMB = 512
param alwaysReady = []
param alertEmail = readEnvironmentVariable('ALERT_EMAIL', '')
param deployerPrincipalId = readEnvironmentVariable('DEPLOYER_PRINCIPAL_ID', '')
// User, Group or ServicePrincipal: what DEPLOYER_PRINCIPAL_ID is (Azure refuses a mismatch).
param deployerPrincipalType = readEnvironmentVariable('DEPLOYER_PRINCIPAL_TYPE', 'User')
