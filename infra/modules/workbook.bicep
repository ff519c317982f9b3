// An Application Insights workbook ("Smartcar webhooks: operations") built from the same ops
// queries as the alerts (infra/queries/*.kql), one panel per query.

@description('Azure region (the Application Insights region).')
param location string

@description('Application Insights component the workbook queries.')
param appInsightsId string

@description('Workbook title shown in the portal.')
param displayName string = 'Smartcar webhooks: operations'

param tags object = {}

var last24h = {
  durationMs: 86400000
}

// Workbook JSON (Notebook/1.0): type 1 is a text panel, type 3 a query panel.
var workbook = {
  version: 'Notebook/1.0'
  isLocked: false
  fallbackResourceIds: [
    appInsightsId
  ]
  items: [
    {
      type: 1
      name: 'intro'
      content: {
        json: 'Are we receiving, are we processing, what failed and why. The queries are the files in infra/queries/ (docs/operations.md).'
      }
    }
    {
      type: 3
      name: 'delivery-success-rate'
      content: {
        version: 'KqlItem/1.0'
        title: 'Delivery success rate (%)'
        query: loadTextContent('../queries/delivery_success_rate.kql')
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: last24h
        visualization: 'table'
        size: 0
      }
    }
    {
      type: 3
      name: 'receive-latency'
      content: {
        version: 'KqlItem/1.0'
        title: 'Receive latency (ms)'
        query: loadTextContent('../queries/receive_latency.kql')
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: last24h
        visualization: 'table'
        size: 0
      }
    }
    {
      type: 3
      name: 'signature-failures'
      content: {
        version: 'KqlItem/1.0'
        title: 'Signature failures (401)'
        query: loadTextContent('../queries/signature_failures.kql')
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: last24h
        visualization: 'table'
        size: 0
      }
    }
    {
      type: 3
      name: 'processing-failures'
      content: {
        version: 'KqlItem/1.0'
        title: 'Processing failures and dead-letter reasons'
        query: loadTextContent('../queries/processing_failures.kql')
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: last24h
        visualization: 'table'
        size: 0
      }
    }
    {
      type: 3
      name: 'end-to-end-lag'
      content: {
        version: 'KqlItem/1.0'
        title: 'End-to-end lag (ms)'
        query: loadTextContent('../queries/end_to_end_lag.kql')
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: last24h
        visualization: 'table'
        size: 0
      }
    }
    {
      type: 3
      name: 'top-vehicles-by-errors'
      content: {
        version: 'KqlItem/1.0'
        title: 'Top vehicles by errors'
        query: loadTextContent('../queries/top_vehicles_by_errors.kql')
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: last24h
        visualization: 'table'
        size: 0
      }
    }
  ]
}

resource opsWorkbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // A workbook's resource name must be a GUID.
  name: guid(resourceGroup().id, appInsightsId, 'smartcar-webhooks-operations')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: appInsightsId
    serializedData: string(workbook)
  }
}

output workbookId string = opsWorkbook.id
