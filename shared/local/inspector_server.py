"""The inspector page's HTTP server: loopback only, behind a per-run token in the URL.

It listens on 127.0.0.1 whatever address the webhook port uses, so a tunnel that exposes the
webhook port never exposes it. Every path starts with the token
(`http://127.0.0.1:7072/<token>/`, printed in the banner); anything else is answered 403,
including a request whose `Host` is not this loopback address (a DNS-rebinding page). The
dead-letter actions go through the same operations code as `python -m shared.cli dlq`. The
Vehicles tab reads the app's own vehicle state store (the runtime's), as the read route does,
from this loopback port only: the page needs no function key, its token stands for one. It opens
any vehicle it lists, as `vehicles show` does, not only those whose id the read route takes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from ..cli.ops import LocalOps, OpsError
from ..settings import INSPECTOR_PORT, Settings
from ..vehicle_read import stored_vehicle_id_problem
from ..vehicle_state import VehicleStateStore
from .inspector import Recorder, curl_command, describe_body

logger = logging.getLogger(__name__)

#: The only address the inspector ever binds: not configurable on purpose.
LOOPBACK = "127.0.0.1"
DLQ_LIMIT = 500
VEHICLES_LIMIT = 500
SIGNATURE_HEADER_NAME = "SC-Signature"
RESEND_TIMEOUT_SECONDS = 15.0  # Smartcar's own limit for an answer
STATIC_DIR = Path(__file__).resolve().parent / "static"

_STATIC = {
    "": ("inspector.html", "text/html"),
    "inspector.css": ("inspector.css", "text/css"),
    "inspector.js": ("inspector.js", "text/javascript"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_SECURITY_HEADERS = {
    # Everything comes from this origin; a stranger's body rendered as text cannot run.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # The token is in the URL: never send it to another site.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A delivery id or a sequence number in a URL: at most 18 digits, so below 2**63 (SQLite's
#: and Service Bus's integers); a longer one matches no route and is answered 404.
_ID = r"{id:\d{1,18}}"
_SEQ = r"{seq:\d{1,18}}"


def _first[T](items: Sequence[T], limit: int) -> tuple[Sequence[T], bool]:
    """The first `limit` of `items` (asked for with one more), and whether there were more."""
    return items[:limit], len(items) > limit


def _forbidden(why: str) -> web.Response:
    return web.Response(status=403, text=f"403 Forbidden: {why}\n",
                        headers=dict(_SECURITY_HEADERS))


class InspectorServer:
    """Serves the page and its JSON API. Start with `await start()`, stop with `await stop()`."""

    def __init__(self, recorder: Recorder, ops: LocalOps, *, port: int,
                 token: str | None = None, webhook_base: str | None = None,
                 vehicles: VehicleStateStore | None = None) -> None:
        self.recorder = recorder
        self.ops = ops
        self.vehicles = vehicles
        self.port = port
        # Where "Copy as curl" and "Resend" send a delivery again: this host's webhook routes
        # (`http://127.0.0.1:7071/api`); None: they are not offered.
        self.webhook_base = webhook_base
        self.token = token or secrets.token_urlsafe(24)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/{self.token}/"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/{token}", self._slash)
        app.router.add_get("/{token}/", self._static)
        app.router.add_get("/{token}/static/{name}", self._static)
        app.router.add_get("/{token}/api/deliveries", self._deliveries)
        app.router.add_get("/{token}/api/deliveries/" + _ID, self._delivery)
        app.router.add_get("/{token}/api/deliveries/" + _ID + "/curl", self._curl)
        app.router.add_post("/{token}/api/deliveries/" + _ID + "/resend", self._resend)
        app.router.add_get("/{token}/api/dlq", self._dlq)
        app.router.add_get("/{token}/api/dlq/" + _SEQ, self._dead_letter)
        app.router.add_post("/{token}/api/dlq/" + _SEQ + "/replay", self._replay)
        app.router.add_post("/{token}/api/dlq/" + _SEQ + "/purge", self._purge)
        app.router.add_get("/{token}/api/vehicles", self._vehicle_list)
        app.router.add_get("/{token}/api/vehicles/{vehicle_id}", self._vehicle)
        # The page's way: an id in the query string reaches the route whatever it is, `.` and
        # `..` too (a browser resolves those, and `%2E`, as path segments before it sends).
        app.router.add_get("/{token}/api/vehicle", self._vehicle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.host not in (f"{LOOPBACK}:{self.port}", f"localhost:{self.port}"):
            return _forbidden(f"the inspector answers only to {LOOPBACK}:{self.port}")
        first = request.path.split("/", 2)[1]
        if not hmac.compare_digest(first.encode("utf-8"), self.token.encode("utf-8")):
            return _forbidden(
                "this URL lacks the inspector's token; open the URL the local host printed "
                "at start-up (it changes on every run)"
            )
        origin = request.headers.get("Origin")
        if request.method != "GET" and origin is not None and origin not in (
                f"http://{LOOPBACK}:{self.port}", f"http://localhost:{self.port}"):
            # A page on another site (or a sandboxed one, Origin: null) that learnt the URL
            # must not replay or purge: browsers send Origin with every such request.
            return _forbidden(f"requests from {origin} may not change anything here")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        except Exception:
            # A bug, not the page's business to show: the traceback goes to the host's log,
            # and the answer carries the security headers as every other one does.
            logger.exception("inspector: %s /%s failed", request.method,
                             request.path.split("/", 2)[-1])
            response = web.Response(
                status=500, text="500 Internal Server Error: see the local host's log\n")
        response.headers.update(_SECURITY_HEADERS)
        return response

    # -- page ------------------------------------------------------------------------------
    async def _slash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"/{self.token}/")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        entry = _STATIC.get(request.match_info.get("name", ""))
        if entry is None:
            raise web.HTTPNotFound()
        filename, content_type = entry
        text = (STATIC_DIR / filename).read_text("utf-8")
        return web.Response(text=text, content_type=content_type, charset="utf-8")

    # -- deliveries ------------------------------------------------------------------------
    async def _deliveries(self, request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="since must be a whole number") from None
        # Before the await: a delivery that arrives while the stats are read is in the next
        # answer, never in `ids` without its summary.
        version, changed, ids = self.recorder.snapshot(since)
        stats: dict[str, Any] | None
        try:
            stats = await asyncio.to_thread(self.ops.stats)
            stats_error = None
        except OpsError as exc:
            stats, stats_error = None, str(exc)
        return web.json_response({
            "version": version,
            "capacity": self.recorder.capacity,
            "ids": ids,
            "deliveries": changed,
            "stats": stats,
            "statsError": stats_error,
        })

    async def _delivery(self, request: web.Request) -> web.StreamResponse:
        detail = self.recorder.detail(int(request.match_info["id"]))
        if detail is None:
            raise web.HTTPNotFound(
                text=f"no delivery {request.match_info['id']}: only the last "
                f"{self.recorder.capacity} are kept, in memory"
            )
        return web.json_response(detail)

    def _original(self, request: web.Request) -> tuple[str, bytes, str]:
        """The URL, body and signature of a delivery to send again (404 when it cannot be)."""
        delivery_id = int(request.match_info["id"])
        original = self.recorder.original(delivery_id)
        if original is None or self.webhook_base is None:
            raise web.HTTPNotFound(
                text=f"delivery {delivery_id} cannot be sent again: only a signed delivery "
                "whose signature verified, among the last "
                f"{self.recorder.capacity} kept in memory, can")
        route, body, signature = original
        return f"{self.webhook_base}/{route}", body, signature

    async def _curl(self, request: web.Request) -> web.StreamResponse:
        url, body, signature = self._original(request)
        try:
            command = curl_command(url, body, signature)
        except ValueError as exc:
            raise web.HTTPUnprocessableEntity(text=str(exc)) from None
        return web.json_response({"command": command})

    async def _resend(self, request: web.Request) -> web.StreamResponse:
        url, body, signature = self._original(request)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER_NAME: signature}
        timeout = ClientTimeout(total=RESEND_TIMEOUT_SECONDS)
        try:
            async with ClientSession(timeout=timeout) as session, \
                    session.post(url, data=body, headers=headers) as response:
                answer = await response.text(errors="replace")
                status = response.status
        except (ClientError, TimeoutError) as exc:
            raise web.HTTPBadGateway(text=f"cannot send to {url}: {exc}") from None
        logger.info("inspector: resent delivery %s (answer %d)", request.match_info["id"], status)
        return web.json_response({"status": status, "body": answer})

    # -- dead letters (the CLI's operations) ------------------------------------------------
    async def _ops(self, call: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(call)
        except OpsError as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None

    async def _dlq(self, request: web.Request) -> web.StreamResponse:
        # One more than shown tells whether the limit left some out (`more`).
        letters, more = _first(
            await self._ops(lambda: self.ops.dead_letters(limit=DLQ_LIMIT + 1)), DLQ_LIMIT)
        return web.json_response({"deadLetters": [dl.summary() for dl in letters],
                                  "limit": DLQ_LIMIT, "more": more})

    async def _dead_letter(self, request: web.Request) -> web.StreamResponse:
        seq = int(request.match_info["seq"])
        letter = await self._ops(lambda: self.ops.dead_letter(seq))
        if letter is None:
            raise web.HTTPNotFound(text=f"no dead letter with sequence number {seq}")
        doc = letter.summary()
        doc["applicationProperties"] = {
            str(k): str(v) for k, v in letter.application_properties.items()
        }
        doc.update(describe_body(letter.body))
        return web.json_response(doc)

    async def _replay(self, request: web.Request) -> web.StreamResponse:
        seq = int(request.match_info["seq"])
        result = await self._ops(lambda: self.ops.replay([seq]))
        logger.info("inspector: replayed dead letter %d", seq)
        return web.json_response({"replayed": result.replayed, "failed": result.failed,
                                  "notFound": result.not_found})

    async def _purge(self, request: web.Request) -> web.StreamResponse:
        seq = int(request.match_info["seq"])
        result = await self._ops(lambda: self.ops.purge([seq]))
        logger.info("inspector: purged dead letter %d", seq)
        return web.json_response({"purged": result.purged, "notFound": result.not_found})


    # -- vehicle state (the store the app's read route reads) --------------------------------
    def _store(self) -> VehicleStateStore:
        if self.vehicles is None:
            raise web.HTTPServiceUnavailable(
                text="the vehicle state store is turned off (VEHICLE_STATE_STORE=off)")
        return self.vehicles

    async def _vehicle_list(self, request: web.Request) -> web.StreamResponse:
        store = self._store()
        try:
            summaries, more = _first(await store.list_vehicles(limit=VEHICLES_LIMIT + 1),
                                     VEHICLES_LIMIT)
        except Exception as exc:  # the store's failure is the page's message, not a 500
            raise web.HTTPServiceUnavailable(
                text=f"the vehicle state store failed: {type(exc).__name__}: {exc}") from None
        return web.json_response({"vehicles": [s.to_json() for s in summaries],
                                  "limit": VEHICLES_LIMIT, "more": more})

    async def _vehicle(self, request: web.Request) -> web.StreamResponse:
        vehicle_id = request.match_info.get("vehicle_id")
        if vehicle_id is None:
            vehicle_id = request.query.get("id")
            if vehicle_id is None:
                raise web.HTTPBadRequest(text="which vehicle? ?id=<vehicleId>")
        problem = stored_vehicle_id_problem(vehicle_id)
        if problem is not None:
            raise web.HTTPBadRequest(text=problem)
        store = self._store()
        try:
            view = await store.get_vehicle(vehicle_id)
        except Exception as exc:
            raise web.HTTPServiceUnavailable(
                text=f"the vehicle state store failed: {type(exc).__name__}: {exc}") from None
        if view is None:
            raise web.HTTPNotFound(text=f"no state for vehicle {vehicle_id}")
        return web.json_response(view.to_json())


def inspector_port(settings: Settings, webhook_port: int) -> int:
    """`INSPECTOR_PORT`, else the webhook port + 1 (any free port when that is not one)."""
    if settings.inspector_port is not None:
        return settings.inspector_port
    return webhook_port + 1 if 0 < webhook_port < 65535 else 0


async def start_inspector(
    settings: Settings, queue: Any, *, webhook_port: int, recorder: Recorder,
    vehicles: VehicleStateStore | None = None,
    webhook_base: str | None = None,
) -> tuple[InspectorServer | None, str]:
    """The running inspector (None if its port is taken) and the banner's line about it.

    A taken port does not stop the local host: the webhook routes matter more than the page.
    """
    port = inspector_port(settings, webhook_port)
    server = InspectorServer(recorder, LocalOps(queue), port=port, webhook_base=webhook_base,
                             vehicles=vehicles)
    try:
        await server.start()
    except OSError as exc:
        return None, (
            f"Inspector: not started, cannot listen on {LOOPBACK}:{port} ({exc.strerror}); "
            f"set {INSPECTOR_PORT} to a free port"
        )
    return server, f"Inspector (loopback only; the URL holds this run's token): {server.url}"
