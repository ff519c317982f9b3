"""The Azure Functions app (Python v2 programming model): a table of contents.

Each function hands over to `shared/`, where the logic lives and is tested.
"""

import azure.functions as func

from shared import functions, inbox_prune, redrive

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.route(route="webhooks/smartcar", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def smartcar_webhook(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Smartcar's Vehicle data callback URI (and VERIFY challenges)."""
    return await functions.handle_webhook(req, context)


@app.route(route="webhooks/smartcar/errors", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def smartcar_error_webhook(
    req: func.HttpRequest, context: func.Context
) -> func.HttpResponse:
    """Smartcar's optional Vehicle error callback URI: same rules as the data route."""
    return await functions.handle_webhook(req, context)


@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def health(req: func.HttpRequest) -> func.HttpResponse:
    """200 {"status": "ok"} when the configuration is valid; reveals no settings."""
    return await functions.handle_health(req)


@app.route(route="vehicles/{vehicleId}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def vehicle_state(req: func.HttpRequest) -> func.HttpResponse:
    """A vehicle's latest signals and open errors from the vehicle state store; needs a key."""
    return await functions.handle_vehicle(req)


# Binary: the host passes the message body's bytes as stored (the signed body). As a string,
# a body that is not UTF-8 would reach the processor with U+FFFD where its bytes were.
@app.service_bus_queue_trigger(
    arg_name="msg", queue_name="%SERVICEBUS_QUEUE_NAME%", connection="ServiceBusConnection",
    data_type=func.DataType.BINARY,
)
async def process_event(msg: func.ServiceBusMessage) -> None:
    """Process one queued event: return completes it, raising abandons it for a retry."""
    await functions.handle_queue_message(msg)


@app.timer_trigger(schedule=redrive.REDRIVE_SCHEDULE, arg_name="timer", run_on_startup=False)
async def redrive_spilled(timer: func.TimerRequest) -> None:
    """Send events spilled while Service Bus was down back to the queue, oldest first."""
    await redrive.handle_redrive_timer(timer)


@app.timer_trigger(
    schedule=inbox_prune.INBOX_PRUNE_SCHEDULE, arg_name="timer", run_on_startup=False
)
async def prune_vehicle_inbox(timer: func.TimerRequest) -> None:
    """Delete the processed-event records past their 8-day retention, of every vehicle."""
    await inbox_prune.handle_inbox_prune_timer(timer)
