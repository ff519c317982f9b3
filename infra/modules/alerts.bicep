// Alert rules and where they notify: any dead-lettered event on the queue (a metric alert), and
// log alerts over Application Insights that run the ops queries in infra/queries/*.kql: the same
// files an operator runs by hand (docs/operations.md). Each rule loads its file and appends only
// its threshold, so the query and the alert cannot drift apart.

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

@description('Azure region of the log alert rules (the Application Insights region).')
param location string

@description('Application Insights component the log alerts query.')
param appInsightsId string

@description('Delivery success rate alert: fire below this percentage of 2xx answers (Smartcar alerts its users below 95).')
@minValue(0)
@maxValue(100)
param successRateThreshold int = 95

@description('Delivery success rate alert: ignore 5-minute bins with fewer POSTs than this.')
param successRateMinimumRequests int = 10

@description('Signature failure alert: fire when more POSTs than this are refused 401 in 5 minutes.')
param signatureFailureThreshold int = 20

@description('Processing lag alert: fire when the average delivery-to-processed lag exceeds this (ms).')
param processingLagThresholdMs int = 300000

@description('Receive latency alert: fire when the 99th percentile answer time exceeds this (ms; Smartcar alerts its users above 5 s and gives up at 15 s).')
param receiveLatencyThresholdMs int = 5000

@description('Receive latency alert: ignore 5-minute bins with fewer POSTs than this (one slow first request on a fresh instance is not a trend).')
@minValue(1)
param receiveLatencyMinimumRequests int = 10

@description('Smartcar retries alert: fire when more than this percentage of deliveries in 15 minutes repeat an eventId with a new deliveryId.')
@minValue(0)
@maxValue(100)
param redeliveryRateThreshold int = 1

@description('Smartcar retries alert: ignore 15-minute bins with fewer authenticated deliveries than this.')
param redeliveryMinimumDeliveries int = 100

@description('Delivery-to-answer latency alert: fire when the 95th percentile of answer time minus meta.deliveredAt exceeds this (ms; Smartcar alerts its users above 5 s).')
param deliveryToAnswerThresholdMs int = 5000

@description('Delivery-to-answer latency alert: ignore 15-minute bins with fewer deliveries than this.')
param deliveryToAnswerMinimumDeliveries int = 10

param tags object = {}

var actionGroups = empty(alertEmail) ? [] : [actionGroup.id]

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
resource deadLetterAlert 'Microsoft.Insights/metricAlerts@2026-01-01' = {
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

// Each log alert fires when its query, with the threshold appended, returns any row in the window.
var logAlertCriterion = {
  timeAggregation: 'Count'
  operator: 'GreaterThan'
  threshold: 0
  failingPeriods: {
    numberOfEvaluationPeriods: 1
    minFailingPeriodsToAlert: 1
  }
}

resource successRateAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-delivery-success-rate'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar webhook delivery success rate below ${successRateThreshold} %'
    description: 'Fewer than ${successRateThreshold} % of webhook POSTs were answered 2xx. Smartcar makes 4 attempts (3 retries) over ~3 minutes, then drops the event. Run infra/queries/delivery_success_rate.kql: unavailable = Service Bus or Key Vault failing (503); rejected = forged requests or a wrong signing token (see signature_failures.kql).'
    severity: 1
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/delivery_success_rate.kql')}\n| where total >= ${successRateMinimumRequests} and successRate < ${successRateThreshold}\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource signatureFailureAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-signature-failures'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar webhook signature failures spike'
    description: 'More than ${signatureFailureThreshold} webhook POSTs in 5 minutes were refused for a missing or wrong SC-Signature. Run infra/queries/signature_failures.kql. If real deliveries fail too (delivery success rate alert), the signing token in Key Vault is wrong or was rotated: set the current Application Management Token. Otherwise someone is sending forged requests: they are refused and nothing is stored.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/signature_failures.kql')}\n| where failures > ${signatureFailureThreshold}\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource processingLagAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-processing-lag'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar event processing lag above ${processingLagThresholdMs} ms'
    description: 'Events are processed more than ${processingLagThresholdMs} ms after Smartcar delivered them. Run infra/queries/end_to_end_lag.kql and processing_failures.kql; check the queue backlog (python -m shared.cli stats) and the handlers\' duration.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/end_to_end_lag.kql')}\n| where avgLagMs > ${processingLagThresholdMs}\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource receiveLatencyAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-receive-latency'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar webhook answers slower than ${receiveLatencyThresholdMs} ms (p99)'
    description: 'The slowest webhook POSTs took more than ${receiveLatencyThresholdMs} ms to answer; Smartcar gives up after 15 s and retries. Run infra/queries/receive_latency.kql. Usual causes: the first requests of a cold start (reading the token from Key Vault, connecting to Service Bus; raise alwaysReady), Service Bus sends timing out (the spill-over then takes over after 5 s), or Key Vault slow to answer.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/receive_latency.kql')}\n| where requests >= ${receiveLatencyMinimumRequests} and p99 > ${receiveLatencyThresholdMs}\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource smartcarRetriesAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-smartcar-retries'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar is retrying more than ${redeliveryRateThreshold} % of deliveries'
    description: 'More than ${redeliveryRateThreshold} % of authenticated deliveries in 15 minutes repeated an eventId with a new deliveryId: Smartcar did not get our 2xx in time for an earlier attempt, and drops an event after 4 attempts. Run infra/queries/smartcar_retries.kql, then receive_latency.kql and delivery_success_rate.kql (slow answers, cold starts, 503s). Check the endpoint the way Smartcar does: python -m shared.cli check-endpoint URL.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'  // the last whole 15-minute bin, which the query's last line picks
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/smartcar_retries.kql')}\n| where timestamp == bin(now(), 15m) - 15m and deliveries >= ${redeliveryMinimumDeliveries} and redeliveryRate > ${redeliveryRateThreshold}\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource deliveryToAnswerAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-delivery-to-answer-latency'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar deliveries answered more than ${deliveryToAnswerThresholdMs} ms after deliveredAt (p95)'
    description: 'The 95th percentile of our answer time minus meta.deliveredAt exceeded ${deliveryToAnswerThresholdMs} ms in 15 minutes. deliveredAt is Smartcar\'s clock: compare with receive_latency.kql (our own answer time). If ours is fast, the time is spent before the request reaches us (Smartcar, network, the Functions front end, cold starts). Run infra/queries/delivery_to_answer_latency.kql.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'  // the last whole 15-minute bin, which the query's last line picks
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/delivery_to_answer_latency.kql')}\n| where timestamp == bin(now(), 15m) - 15m and deliveries >= ${deliveryToAnswerMinimumDeliveries} and p95Ms > ${deliveryToAnswerThresholdMs}\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

// The window is twice the frequency: a sighting counted once per instance, exported each
// minute and ingested minutes later, may land in Log Analytics after the evaluation whose
// window its timestamp falls in; the next evaluation still covers it.
resource newPayloadShapeAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: '${namePrefix}-new-payload-shape'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Smartcar sent a payload shape the receiver does not know'
    description: 'An authenticated delivery had a shape (meta.version, keys, where triggers or signals sit, the type of deliveredAt, or signal codes) that the project does not read. It was stored; check that the processor reads what it needs. Run infra/queries/payload_shapes.kql; the log line "payload shape <shapeId> first seen" says which part is new.'
    severity: 3
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'
    autoMitigate: true
    criteria: {
      allOf: [
        union(logAlertCriterion, {
          query: '${loadTextContent('../queries/payload_shapes.kql')}\n| where shapeKnown == \'false\'\n'
        })
      ]
    }
    actions: {
      actionGroups: actionGroups
    }
  }
}

output actionGroupId string = empty(alertEmail) ? '' : actionGroup.id
output deadLetterAlertId string = deadLetterAlert.id
output logAlertIds array = [
  successRateAlert.id
  signatureFailureAlert.id
  processingLagAlert.id
  receiveLatencyAlert.id
  smartcarRetriesAlert.id
  deliveryToAnswerAlert.id
  newPayloadShapeAlert.id
]
