"""The local host: runs `function_app.py`'s functions without Azure tools.

It serves the app's HTTP routes under `/api` and drives its Service Bus queue trigger from the
embedded SQLite queue, with the host's built-in settlement: return completes, raise abandons,
`maxDeliveryCount` dead-letters.

Keys: the webhook routes take none, like `func start` (contract.md). Every other route whose
auth level is not anonymous (the vehicle state, `GET /api/vehicles/{vehicleId}`) needs this
run's key, as `?code=` or `x-functions-key`: the port may be tunnelled to the internet for
Smartcar's deliveries, and vehicle data must not go out through that tunnel to whoever finds
it. The key is random per run and printed in the banner; anything else gets 401.

It also runs the app's timer functions (the spill re-drive) every `--timer-interval` seconds.

    python -m shared.local [--host 127.0.0.1] [--port 7071] [--workers N]
                               [--lock-duration 60] [--timer-interval 60]

`--workers` defaults to host.json's `extensions.serviceBus.maxConcurrentCalls`, the number of
messages the Functions host processes at once in Azure, so the two cannot drift.
"""

# The docstring above is `--help`'s description (see `main`), so it tells the whole host's
# story. This module is only the command line: PORT and LOG_LEVEL, the banner, loading
# `function_app.py`, and running `LocalHost` (host.py) until a signal stops it.

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit

import azure.functions as func

from ..clockcheck import CLOCK_WATCH
from ..printable import PrintableFormatter
from ..runtime import Runtime, build_runtime, set_runtime
from ..settings import SERVICEBUS_NAMESPACE, Settings, SettingsError, load_settings
from ..telemetry import configure as configure_telemetry
from .clockstate import judge_stored_deliveries
from .connections import BODY_TIMEOUT_SECONDS, HEADER_TIMEOUT_SECONDS, IDLE_TIMEOUT_SECONDS
from .host import DEFAULT_PORT, ROUTE_PREFIX, LocalHost, http_origin
from .inspector import Recorder
from .inspector_server import start_inspector
from .private import make_private
from .queue_rows import QueueUnavailableError


def run_event_loop[T](main: Coroutine[Any, Any, T]) -> T:
    """Run `main` as the local host runs: on uvloop where it is installed (requirements-local.txt,
    not on Windows), whose C transports cut the host's CPU per event by a few per cent
    (docs/performance.md); on asyncio's own loop otherwise, with the same behaviour."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def load_function_app() -> func.FunctionApp:
    """Import the project's `function_app.py` (the repository root is on sys.path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("function_app")
    app: func.FunctionApp = module.app
    return app

def banner(settings: Settings, base_url: str, *, inspector: str | None = None,
           warnings: list[str] | None = None,
           function_key: str | None = None) -> str:
    # The host only verifies: the CLI (and Smartcar) sign.
    token_line = (
        f"Verifies signatures with the development token {settings.management_token!r} "
        "(SMARTCAR_MANAGEMENT_TOKEN is unset). Never register it with Smartcar."
        if settings.using_dev_token
        else "Verifies signatures with the token in SMARTCAR_MANAGEMENT_TOKEN."
    )
    python = os.path.relpath(sys.executable) if sys.executable else "python"
    # Pasted into another terminal, the command must sign with the token this host uses.
    token_arg = "" if settings.using_dev_token else ' --token "$SMARTCAR_MANAGEMENT_TOKEN"'

    url = f"{base_url}{ROUTE_PREFIX}/webhooks/smartcar"
    port = base_url.rsplit(":", 1)[-1]
    listening_on = urlsplit(base_url).hostname or ""
    reach = (
        "Local URLs (this machine only: Smartcar cannot reach them):"
        if listening_on in ("127.0.0.1", "localhost", "::1")
        else "URLs (listening on every interface: reachable from your network, not by "
             "Smartcar, which needs public HTTPS):"
        if listening_on in ("0.0.0.0", "::")  # noqa: S104 - naming it, not binding it
        else f"URLs (listening on {listening_on}: not reachable by Smartcar, which needs "
             "public HTTPS):"
    )
    return "\n".join(
        [
            f"Smartcar webhook receiver (local host) listening on {base_url}",
            token_line,
            f"Queue: embedded SQLite in {settings.local_state_dir}/ "
            f"(handled events: {settings.local_state_dir}/handled.jsonl)",
            reach,
            f"  vehicle data webhook:  {url}",
            f"  vehicle error webhook: {url}/errors",
            f"  health:                {base_url}{ROUTE_PREFIX}/health",
            *([f"  vehicle state:         {base_url}{ROUTE_PREFIX}/vehicles/<vehicleId>"
               f"?code={function_key}",
               "    (this run's key, also accepted as an x-functions-key header; the webhook "
               "routes take none)"] if function_key else []),
            *([inspector] if inspector else []),
            "To receive real Smartcar deliveries, tunnel the port to public HTTPS, e.g.",
            f"  devtunnel host -p {port} --allow-anonymous   (or: ngrok http {port})",
            "  and register https://<tunnel>/api/webhooks/smartcar (README: \"Receive real "
            "deliveries on your machine\").",
            "Send a signed test event (in another terminal):",
            f"  {python} -m shared.cli send --url {url} --type state{token_arg}",
            "Press Ctrl-C to stop.",
            *(f"WARNING: {warning}" for warning in warnings or ()),
        ]
    )


def served_host(
    settings: Settings, runtime: Runtime, **options: Any,
) -> tuple[LocalHost, Recorder]:
    """The host `serve` runs (not started), with what it observes: spans to the console, or to
    Application Insights when a connection string is set, and the inspector's recorder fed by
    the host. The end-to-end benchmark builds its host here too, so it measures this one."""
    configure_telemetry(connection_string=settings.appinsights_connection_string, console=True)
    recorder = Recorder()
    recorder.attach()  # to the tracer provider set up just above
    runtime.on_processed = recorder.processed  # what each delivery did to the vehicle state
    local = LocalHost(load_function_app(), runtime, observer=recorder.http_request,
                      attempt_observer=recorder.attempt_finished, **options)
    return local, recorder


def log_handler(stream: TextIO | None = None) -> logging.Handler:
    """The host's log lines, one per record (messages carry senders' ids, and an eventId may
    hold a line break), to `stream` (default: standard error)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


async def serve(
    host: str, port: int, workers: int | None, *, lock_duration: float = 60.0,
    timer_interval: float = 60.0, header_timeout: float = HEADER_TIMEOUT_SECONDS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS, body_timeout: float = BODY_TIMEOUT_SECONDS,
) -> None:
    settings = load_settings()
    if settings.queue_backend != "local":
        # Checked before anything is built: a one-line error, like every other setting's.
        raise SettingsError(
            f"{SERVICEBUS_NAMESPACE} is set: the local host runs on the embedded queue only; "
            "unset it to run locally (the operations CLI uses it to reach Service Bus)"
        )
    make_private(settings.local_state_dir)  # before anything in it is created or opened
    runtime = build_runtime(settings)
    set_runtime(runtime)
    local, recorder = served_host(settings, runtime, host=host, port=port, workers=workers,
                                  lock_duration=lock_duration, timer_interval=timer_interval,
                                  header_timeout=header_timeout, idle_timeout=idle_timeout,
                                  body_timeout=body_timeout)
    await local.start()
    # A host listening on every interface is reached on loopback, as the page itself is.
    reach = "127.0.0.1" if local.host in ("0.0.0.0", "::", "") else local.host  # noqa: S104
    inspector, inspector_line = await start_inspector(
        settings, runtime.queue, webhook_port=port, recorder=recorder,
        vehicles=runtime.vehicle_state,
        webhook_base=f"{http_origin(reach, local.port)}{ROUTE_PREFIX}",
    )
    judge_stored_deliveries(runtime.queue, settings.max_delivery_age_seconds)
    clock = CLOCK_WATCH.problem()
    print(banner(settings, local.base_url, inspector=inspector_line,
                 warnings=[clock] if clock else None, function_key=local.function_key),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("Stopping: messages in progress are abandoned and redelivered on the next start.",
          flush=True)
    await local.stop()
    if inspector is not None:
        await inspector.stop()
    runtime.queue.close()
    if runtime.handled_log is not None:
        runtime.handled_log.close()


def port_from_env(environ: Mapping[str, str]) -> int:
    """`PORT`, checked like the app's settings: a clear error instead of a traceback."""
    raw = environ.get("PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise SettingsError(
            f"PORT must be a TCP port number from 0 to 65535 (the local host's port), "
            f"got {raw!r}; e.g. PORT=7072 make run"
        )
    return int(raw)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level_from_env(environ: Mapping[str, str]) -> str:
    level = environ.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in _LOG_LEVELS:
        raise SettingsError(
            f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {environ['LOG_LEVEL']!r}"
        )
    return level


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        default_port = port_from_env(os.environ)
        log_level = log_level_from_env(os.environ)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--workers", type=int, default=None,
                        help="queue messages processed concurrently (default: host.json's "
                             "extensions.serviceBus.maxConcurrentCalls)")
    parser.add_argument("--lock-duration", type=float, default=60.0,
                        help="seconds a received message stays locked (default 60)")
    parser.add_argument("--timer-interval", type=float, default=60.0,
                        help="seconds between runs of the timer functions (default 60)")
    # The slow-client limits (connections.py); changed only by tests that cannot wait for them.
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_SECONDS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_SECONDS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_SECONDS,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level, handlers=[log_handler()])
    try:
        run_event_loop(serve(args.host, args.port, args.workers,
                          lock_duration=args.lock_duration, timer_interval=args.timer_interval,
                          header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                          body_timeout=args.body_timeout))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except QueueUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
