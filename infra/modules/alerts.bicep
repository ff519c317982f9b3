// Alert rules and where they notify. The first rule: any dead-lettered event on the queue.
// Scheduled query alerts over infra/queries/*.kql (loadTextContent('../queries/<name>.kql'))
// belong in this module too: add the workspace or Application Insights id as an input (main.bicep
// has both from the monitoring module) and one Microsoft.Insights/scheduledQueryRules per query.

@description('Name prefix for alert resources.')
param namePrefix string

@description('Short name shown in alert e-mails and SMS (at most 12 characters).')
@maxLength(12)
param actionGroupShortName string = 'smartcar'

@description('Optional e-mail address for alerts. Empty: no action group; alerts show in the portal only.')
param alertEmail string = ''

@description('Service Bus namespace that holds the queue.')
param serviceBusNamespaceId string

@description('Queue whose dead-letter count is watched.')
param queueName string

param tags object = {}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${namePrefix}-ops'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: actionGroupShortName
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// Max over the window > 0: fires while any message sits in this queue's dead-letter queue and
// resolves by itself once the messages are replayed or purged (python -m shared.cli dlq ...).
resource deadLetterAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'Events were dead-lettered on queue ${queueName}. Inspect with: python -m shared.cli dlq list'
    severity: 2
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          name: 'DeadletteredMessages'
          criterionType: 'StaticThresholdCriterion'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: empty(alertEmail)
      ? []
      : [
          {
            actionGroupId: actionGroup.id
          }
        ]
  }
}

output actionGroupId string = empty(alertEmail) ? '' : actionGroup.id
output deadLetterAlertId string = deadLetterAlert.id
