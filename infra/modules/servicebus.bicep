// Service Bus namespace and the events queue. Entra ID only (no SAS keys, no authorization
// rules): the app and the operators authenticate with role assignments on the queue.

@description('Namespace name: 6-50 letters, digits and hyphens, globally unique.')
@minLength(6)
@maxLength(50)
param name string

@description('Azure region.')
param location string

@description('Standard is enough for this workload; Premium adds isolation, VNet support and larger messages.')
@allowed([
  'Standard'
  'Premium'
])
param sku string = 'Standard'

@description('Queue that holds the accepted webhook events.')
param queueName string

@description('Deliveries before a message is dead-lettered; the processor reads the same number (MAX_DELIVERY_COUNT).')
@minValue(1)
param maxDeliveryCount int = 5

@description('Peek-lock duration. The host renews the lock while a delivery runs, up to host.json\'s maxAutoLockRenewalDuration (the function timeout); retries are scheduled copies, never waited for under the lock.')
param lockDuration string = 'PT1M'

@description('How long an unprocessed event is kept before it is dead-lettered.')
param defaultMessageTimeToLive string = 'P14D'

param tags object = {}

resource namespace 'Microsoft.ServiceBus/namespaces@2026-01-01' = {
  name: name
  location: location
  tags: tags
  sku: sku == 'Premium'
    ? {
        name: 'Premium'
        tier: 'Premium'
        capacity: 1
      }
    : {
        name: 'Standard'
        tier: 'Standard'
      }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2026-01-01' = {
  parent: namespace
  name: queueName
  properties: {
    // message_id is the Smartcar eventId: a retried delivery within the window is stored once.
    // Smartcar retries for about 3 minutes; one hour is ample margin. The window must be at
    // least MAX_DELIVERY_AGE_SECONDS (main.bicep caps it at one hour): a replay is then either
    // a duplicate or stale (tests/test_infra.py checks the two together).
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT1H'
    maxDeliveryCount: maxDeliveryCount
    lockDuration: lockDuration
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: defaultMessageTimeToLive
    // Standard allows 256 KB per message; MAX_BODY_BYTES (192 KB) leaves room for properties.
    maxSizeInMegabytes: 1024
    requiresSession: false
    enablePartitioning: false
  }
}

output id string = namespace.id
output name string = namespace.name
// serviceBusEndpoint is https://<name>.servicebus.windows.net:443/ (suffix differs per cloud).
output fullyQualifiedNamespace string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
output queueId string = queue.id
output queueName string = queue.name
