// Log Analytics workspace and workspace-based Application Insights. Local (key-based) ingestion
// is disabled: the app sends telemetry with its managed identity (Monitoring Metrics Publisher).
// Alert rules live in alerts.bicep, which receives the ids output here.

@description('Log Analytics workspace name.')
param logAnalyticsName string

@description('Application Insights component name.')
param appInsightsName string

@description('Azure region.')
param location string

@description('Days to keep logs in the workspace.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

param tags object = {}

resource workspace 'Microsoft.OperationalInsights/workspaces@2026-03-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    retentionInDays: retentionInDays
    sku: {
      name: 'PerGB2018'
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

output workspaceId string = workspace.id
output workspaceName string = workspace.name
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
// The connection string is not a credential: with DisableLocalAuth, ingestion also needs an
// Entra ID token (APPLICATIONINSIGHTS_AUTHENTICATION_STRING in the app settings).
output connectionString string = appInsights.properties.ConnectionString
